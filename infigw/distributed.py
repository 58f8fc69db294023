"""The losses on ``torch.distributed``: student logits sharded along the vocabulary (tensor parallelism, the
Megatron layout) and batches split over data-parallel ranks and micro-batches (docs/distributed.md).

**Vocabulary parallel** (``vocab_parallel_group=``). Rank r of the group holds the student logits of the ids
``[r * V_r, (r + 1) * V_r)``, the same V_r on every rank (pad the vocabulary to a multiple of the group size;
padded entries may be -inf). Labels, masks and teachers are replicated on the ranks of the group, and every rank
computes the same loss. Each rank summarises its shard with the dispatched ``topk_summary`` op (its top
min(k, V_r) logits, its logsumexps and, where it owns the label, the gold logit); one all-gather of those numbers
gives every rank the global :class:`~infigw.summary.TopKSummary`: the top-k by merging the shards' candidates
with the contract's tie rule (value descending, then the smaller global id; NaN first), each logsumexp as the
logsumexp of the shards' ones, the gold logit from its owner. That is ``B*T*(2*min(k, V_r) + 3)`` words from each
rank per call, never ``B*T*V``. The backward needs no communication: every rank holds the same graph after the
gather, so the gather's backward keeps the rank's own slice and the local op's backward writes the k-sparse part
and the dense softmax terms into the shard; each rank receives exactly the gradient of the loss with respect to
its shard (as Megatron's vocab-parallel cross-entropy does). The full-vocabulary ULD needs every probability of a
row: it all-gathers the logits (an O(B*T*V) exchange and the unsharded memory on every rank); prefer ``top_k``.
Producers that never form the logits (a fused linear over a vocabulary-sharded LM head) meet the losses at
:func:`gather_summary`, with :func:`shard_labels` giving their shard's gold ids.

**Data parallel** (``data_parallel_group=``, ``num_items_in_batch=``). A rank's loss is its *share*: summed over
the ranks of the group and over the micro-batches of one optimizer step, the shares and their gradients are the
loss of the whole batch in one process and its gradient.

- ``reduction="mean"`` divides the per-sequence terms (GLD at scope "sequence", ULD, the objective's distillation
  part) by the number of included sequences of the whole batch and the objective's cross-entropy by its number of
  valid tokens. ``num_items_in_batch`` gives those counts (an :class:`ItemCounts` from :func:`count_items`, summed
  over the micro-batches and the group; GLD and ULD also take the number of sequences alone). Without it, a
  ``data_parallel_group`` counts the call's own micro-batch over the group (one all-reduce of two integers).
- ``scope="batch"`` with a group: one graph for the micro-batch of the whole group. Degrees (and the cosine
  diagonal, the row count, the touched nodes) are all-reduced before the sort, the student's with autograd (the
  backward all-reduces their gradient, so each rank's rows receive theirs); every rank computes the same distance
  and its share is 1/W of it. With gradient accumulation, ``num_items_in_batch`` is the number of such graphs.
- ``"sum"`` needs no normaliser; ``"none"`` gives per-sequence values (a pooled graph: its 1/W share).

DDP averages gradients over its W ranks: multiply each rank's loss by W to train as one process on the whole
batch (what transformers' Trainer does with ``average_tokens_across_devices``).
"""
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from . import dispatch, functional
from .checks import check_logits, data_checks_enabled, valid_positions
from .contract import TopKDegrees
from .inputs import CallInputs, StudentSpec, per_teacher
from .reference import select_topk
from .reference.degrees import cosine_normalised, node_ids
from .summary import TopKSummary, summarize

Count = Union[int, torch.Tensor]
_WORDS = {4: torch.int32, 8: torch.int64}  # integer views of fp32 / fp64, so ids travel in the same message


def group_rank(group, name: str):
    """(rank, size) of this process in ``group``; clear errors for anything that is not a usable group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name} needs torch.distributed to be initialised (torch.distributed.init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of {name}")
    return rank, dist.get_world_size(group)


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """A position-weighted int64 sum: equal tensors give equal sums, and a moved or changed entry almost never does."""
    flat = tensor.reshape(-1).long()
    return (flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum()


def check_same_on_ranks(group, name: str, what: str, values: Callable[[], list], reference: torch.Tensor) -> None:
    """A data check (one all-reduce and one host sync; off with ``INFIGW_DATA_CHECKS=0``): the ints or 0-d integer
    tensors of ``values()`` are equal on every rank of ``group``."""
    if not data_checks_enabled(reference):
        return
    values = values()
    local = torch.stack([torch.as_tensor(value, dtype=torch.int64, device=reference.device) for value in values])
    extremes = torch.cat([local, -local])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(extremes[:len(values)], -extremes[len(values):]):
        raise ValueError(f"{name}: {what} must be the same on every rank of the group; this rank has "
                         f"{[int(value) for value in local.tolist()]}")


def _all_gather(tensor: torch.Tensor, group, world: int) -> torch.Tensor:
    """(W, *shape): every rank's ``tensor``, in one collective (gathered along dim 0, the layout all backends take)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the former from torch 2.13
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
    gather(out, tensor.contiguous(), group=group)
    return out.view(world, *tensor.shape)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the backward sums the gradients over the group the same way (the adjoint of a sum over
    ranks). Ours because ``torch.distributed.nn.functional.all_reduce`` is deprecated from torch 2.13 and its
    successor is private."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


class _GatherReplicated(torch.autograd.Function):
    """All-gather (W, *shape) for a group whose ranks all compute the same loss from the result: the backward keeps
    this rank's slice (the other slices' gradients are their own ranks' to apply). ``ids`` (optional, integer,
    same leading shape) travel in the same message, bit-packed beside the floats, and are not differentiable."""

    @staticmethod
    def forward(ctx, floats, ids, group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ctx.rank = rank
        if ids is None:
            return _all_gather(floats, group, world), floats.new_empty(0, dtype=torch.long)
        words = _WORDS[floats.element_size()]
        packed = _all_gather(torch.cat([floats.contiguous().view(words), ids.to(words)], -1), group, world)
        width = floats.shape[-1]
        gathered_ids = packed[..., width:].long()
        ctx.mark_non_differentiable(gathered_ids)
        return packed[..., :width].contiguous().view(floats.dtype), gathered_ids

    @staticmethod
    def backward(ctx, grad_floats, grad_ids):
        return grad_floats[ctx.rank], None, None


# ----------------------------------------------------------------------------------------- vocabulary parallel
def shard_labels(labels: torch.Tensor, valid: torch.Tensor, offset: int, shard_vocab: int):
    """The gold ids of one vocabulary shard: (B, T) local ids (0 where the shard does not own the label) and the
    (B, T) bool where it owns it (a valid row whose label lies in ``[offset, offset + shard_vocab)``)."""
    owned = valid & (labels >= offset) & (labels < offset + shard_vocab)
    return torch.where(owned, labels - offset, torch.zeros_like(labels)), owned


def gather_summary(local: TopKSummary, group, k: int, valid: torch.Tensor,
                   owned: Optional[torch.Tensor] = None) -> TopKSummary:
    """The global summary of vocabulary-sharded student logits from every rank's summary of its own shard.

    Args:
        local: this rank's summary of its shard (B, T, V_r) with shard-local ids, keeping min(k, V_r) entries; its
            gold logits taken at the local ids of :func:`shard_labels` (meaningful where ``owned``).
        group: the vocabulary-parallel group (rank r holds ids ``[r * V_r, (r + 1) * V_r)``).
        k: entries of the global summary. valid: (B, T) bool rows. owned: from :func:`shard_labels`, or None
            without labels.
    Returns:
        The :class:`~infigw.summary.TopKSummary` of the full vocabulary (global ids, ``vocab_size = W * V_r``),
        differentiable into ``local`` (and so into the shard) without communication in the backward.
    """
    _, world = group_rank(group, "vocab_parallel_group")
    batch, length, width = local.values.shape
    by_id = local.ids.argsort(-1)  # id-ascending within a shard, so that the ranks' candidates are id-ascending
    columns = [local.values.gather(-1, by_id), local.lse.unsqueeze(-1)]
    separate_unit = local.unit_lse is not local.lse
    if separate_unit:
        columns.append(local.unit_lse.unsqueeze(-1))
    if owned is not None:
        columns.append(torch.where(owned, local.gold, torch.zeros_like(local.gold)).unsqueeze(-1))
    floats, ids = _GatherReplicated.apply(torch.cat(columns, -1), local.ids.gather(-1, by_id), group)
    offsets = torch.arange(world, device=ids.device).view(-1, 1, 1, 1) * local.vocab_size
    candidates = floats[..., :width].permute(1, 2, 0, 3).reshape(batch, length, world * width)
    candidate_ids = (ids + offsets).permute(1, 2, 0, 3).reshape(batch, length, world * width)
    values, position = select_topk(candidates, k)  # a smaller position is a smaller global id: the tie rule holds
    zero = torch.zeros((), dtype=floats.dtype, device=floats.device)
    lse = torch.where(valid, floats[..., width].logsumexp(0), zero)
    unit = torch.where(valid, floats[..., width + 1].logsumexp(0), zero) if separate_unit else lse
    gold = floats[..., -1].sum(0) if owned is not None else None  # one owner per valid row, 0 elsewhere
    return TopKSummary(values, candidate_ids.gather(-1, position), lse, unit, gold, local.vocab_size * world,
                       local.temperature)


def summarize_shard(logits: torch.Tensor, valid: torch.Tensor, k: int, temperature: float,
                    labels: Optional[torch.Tensor], group, backend: str = "auto") -> TopKSummary:
    """:func:`~infigw.summary.summarize` of vocabulary-sharded logits: this rank's shard (B, T, V_r) -> the
    global summary (see the module docstring). ``labels`` (B, T) are global ids, replicated on the group."""
    rank, _ = group_rank(group, "vocab_parallel_group")
    batch, length, shard_vocab = logits.shape
    check_same_on_ranks(group, "vocab_parallel_group", "the student shards' shape (B, T, V_r), k, the valid "
                        "positions and the labels (replicated)",
                        lambda: [batch, length, shard_vocab, k, _checksum(valid),
                                 _checksum(torch.where(valid, labels, 0)) if labels is not None else -1], logits)
    local_labels, owned = (None, None) if labels is None else shard_labels(labels, valid, rank * shard_vocab,
                                                                          shard_vocab)
    local = summarize(logits, valid, min(k, shard_vocab), temperature, local_labels, backend)
    return gather_summary(local, group, k, valid, owned)


def gather_vocab(logits: torch.Tensor, group) -> torch.Tensor:
    """(B, T, V_r) shards -> the (B, T, W * V_r) logits on every rank (an O(B*T*V) exchange, for the
    full-vocabulary ULD); the backward keeps this rank's shard."""
    check_same_on_ranks(group, "vocab_parallel_group", "the student shards' shape (B, T, V_r)",
                        lambda: list(logits.shape), logits)
    gathered = _GatherReplicated.apply(logits, None, group)[0]
    return gathered.permute(1, 2, 0, 3).reshape(*logits.shape[:2], -1)


# ----------------------------------------------------------------------------------------- data parallel
@dataclass(frozen=True)
class ItemCounts:
    """What ``reduction="mean"`` divides by, counted over the whole batch (every micro-batch of one optimizer step
    on every data-parallel rank): the valid student tokens (the cross-entropy) and the included sequences, those
    with a valid position on the student and on at least one teacher (GLD, ULD). ints or 0-d tensors; ``+`` adds."""

    tokens: Count
    sequences: Count

    def __add__(self, other):
        if not isinstance(other, ItemCounts):
            return NotImplemented
        return ItemCounts(self.tokens + other.tokens, self.sequences + other.sequences)

    def __radd__(self, other):  # sum(counts) starts from 0
        return self if isinstance(other, int) and other == 0 else self.__add__(other)


def count_items(labels=None, *, mask=None, teacher_labels=None, teacher_mask=None, ignore_index: int = -100,
                group=None) -> ItemCounts:
    """The :class:`ItemCounts` of one micro-batch, with the losses' rules for valid positions: the student's
    ``labels`` (B, T) (or ``mask``); each teacher's ``teacher_labels`` / ``teacher_mask`` (a tensor, or a list
    with one entry per teacher), a teacher with neither sharing the student's positions. With ``group``, summed
    over its ranks (one all-reduce). Sum the micro-batches' counts of one optimizer step (``sum(counts)``) and
    pass the total as ``num_items_in_batch``. No host sync."""
    given = labels if labels is not None else mask
    if not isinstance(given, torch.Tensor) or given.dim() != 2:
        raise ValueError("count_items needs the student's labels or mask, a (B, T) tensor")
    valid = valid_positions(labels, mask, tuple(given.shape), ignore_index, "", given)
    present = valid.any(-1)
    listed = [x for x in (teacher_labels, teacher_mask) if isinstance(x, (list, tuple))]
    num = len(listed[0]) if listed else 1
    teacher_present = torch.zeros_like(present)
    for own_labels, own_mask in zip(per_teacher(teacher_labels, "teacher_labels", num),
                                    per_teacher(teacher_mask, "teacher_mask", num)):
        if own_labels is None and own_mask is None:
            teacher_present |= present
            continue
        shape = tuple((own_labels if own_labels is not None else own_mask).shape)
        if len(shape) != 2 or shape[0] != given.shape[0]:
            raise ValueError(f"teacher labels / masks must be (B, T') tensors with B = {given.shape[0]}, got {shape}")
        teacher_present |= valid_positions(own_labels, own_mask, shape, ignore_index, "teacher", given).any(-1)
    counts = torch.stack([valid.sum(), (present & teacher_present).sum()])
    if group is not None:
        group_rank(group, "group")
        dist.all_reduce(counts, group=group)
    return ItemCounts(counts[0], counts[1])


def _count(value, name: str) -> Count:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a count: an int >= 0 or a one-element real tensor, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a count: an int >= 0 or a one-element real tensor, got {value!r}")
    return value


def _items(num_items, reduction: str, scope: str, both: bool) -> Optional[ItemCounts]:
    """The validated ``num_items_in_batch`` of a call (None: count locally, or over the data-parallel group)."""
    if num_items is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch normalises reduction='mean'; got reduction={reduction!r}")
    if isinstance(num_items, ItemCounts):
        if scope == "batch":
            raise ValueError("with scope='batch' the items are graphs (one per micro-batch): pass their number as "
                             "num_items_in_batch, not ItemCounts")
        return ItemCounts(_count(num_items.tokens, "num_items_in_batch.tokens"),
                          _count(num_items.sequences, "num_items_in_batch.sequences"))
    if both:
        raise ValueError("infigfusion_loss divides its cross-entropy by tokens and its distillation by sequences: "
                         "pass num_items_in_batch=infigw.distributed.ItemCounts(tokens=..., sequences=...) "
                         "(infigw.distributed.count_items counts both)")
    return ItemCounts(None, _count(num_items, "num_items_in_batch"))


def _denominator(count: Count, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(count, device=like.device).to(like.dtype).clamp_min(1)


class Parallel:
    """One loss call's distributed setting, from the loss's arguments (see the module docstring).

    The losses of :mod:`infigw.functional` ask it what the student is (:meth:`student`, :meth:`sharded_summary`,
    :meth:`summarize`), for the degree stage of pooled graphs (:attr:`degree_stage`), the weights of pooled
    graphs (:meth:`graph_weights`) and the normalisers (:meth:`reduce`, :meth:`denominators`). With no group and
    no ``num_items_in_batch`` every answer is the one-process one.
    """

    def __init__(self, vocab_group, data_group, num_items, reduction: str, scope: str = "sequence",
                 both_counts: bool = False):
        self.vocab, self.data = vocab_group, data_group
        self.vocab_world = None if vocab_group is None else group_rank(vocab_group, "vocab_parallel_group")[1]
        self.data_world = None if data_group is None else group_rank(data_group, "data_parallel_group")[1]
        self.pooled = data_group is not None and scope == "batch"
        self.items = _items(num_items, reduction, scope, both_counts)
        self.logits: Optional[torch.Tensor] = None
        self.gathered: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------------------ the student
    def student(self, logits, dense: bool = False):
        """What :func:`~infigw.inputs.resolve` sees: the logits; under vocabulary parallelism the gathered logits
        when a full-vocabulary term needs them (``dense``), else a :class:`~infigw.inputs.StudentSpec` of the
        global shape."""
        self.logits = logits
        if self.vocab is None:
            return logits
        check_logits(logits, "student_logits")
        if dense:
            self.gathered = gather_vocab(logits, self.vocab)
            return self.gathered
        batch, length, shard_vocab = logits.shape
        return StudentSpec(torch.Size((batch, length, shard_vocab * self.vocab_world)), logits.device)

    def summarize(self, valid, k: int, temperature: float, labels=None, backend: str = "auto",
                  uld=None) -> TopKSummary:
        """The student's :class:`~infigw.summary.TopKSummary`: of its (gathered) logits (with the full-vocabulary
        ULD of ``uld``, see :func:`~infigw.summary.summarize`), or merged from shards."""
        if self.vocab is None or self.gathered is not None:
            dense = self.logits if self.gathered is None else self.gathered
            return summarize(dense, valid, k, temperature, labels, backend, uld)
        return summarize_shard(self.logits, valid, k, temperature, labels, self.vocab, backend)

    def sharded_summary(self, inputs: CallInputs, k: Optional[int], temperature: float,
                        backend: str = "auto") -> Optional[TopKSummary]:
        """The student's summary when its logits are sharded (not gathered); None when the losses read them."""
        if self.vocab is None or self.gathered is not None:
            return None
        return self.summarize(inputs.valid, k, temperature, None, backend)

    # ------------------------------------------------------------------------------------------ pooled graphs
    @property
    def degree_stage(self):
        """The degree stage of :func:`~infigw.functional.gld_terms`: pooled over the data-parallel group for
        ``scope="batch"``, else None (the local one)."""
        return self._pooled_degrees if self.pooled else None

    def _pooled_degrees(self, source, valid, *, k, values, nodes, graph_norm, scope, temperature, deterministic,
                        backend):
        """Degrees of one graph over the whole group's rows: each rank aggregates its rows as one "sum" graph (the
        dispatched degree kernels; cosine: scaled by the all-reduced diagonal first), then the sums, touched nodes
        and row counts are all-reduced, the student's with autograd."""
        num_nodes = k if nodes == "rank" else (source.shape[-1] if isinstance(source, torch.Tensor)
                                               else source.vocab_size)
        check_same_on_ranks(self.data, "data_parallel_group", "the number of graph nodes (vocabulary or k)",
                            lambda: [num_nodes], valid)
        if graph_norm == "cosine":
            local = self._cosine_degrees(source, valid, k, values, nodes, num_nodes, temperature, backend)
        else:
            local = functional._degrees(source, valid, k=k, values=values, nodes=nodes, graph_norm="sum",
                                        scope="batch", temperature=temperature, deterministic=deterministic,
                                        backend=backend)[0]
        degrees = local.degrees
        packed = torch.cat([degrees.reshape(-1), local.touched.reshape(-1).to(degrees.dtype),
                            valid.sum().reshape(1).to(degrees.dtype)])
        packed = _AllReduceSum.apply(packed, self.data)
        degrees = packed[:num_nodes].view(1, num_nodes)
        if graph_norm == "mean":
            degrees = degrees / packed[-1].clamp_min(1)
        touched = (packed[num_nodes:2 * num_nodes] > 0).view(1, num_nodes)
        rows = torch.where(valid, 0, -1).reshape(-1)  # every valid row in graph 0, as the local stage maps them
        return TopKDegrees(degrees, touched, local.kept_values, local.kept_ids), rows, 1

    def _cosine_degrees(self, source, valid, k, values, nodes, num_nodes, temperature, backend) -> TopKDegrees:
        """This rank's rows' "sum" degrees after the cosine scaling by the group's diagonal D_i = sum_p a_p[i]^2:
        :func:`~infigw.reference.degrees.cosine_normalised` with its per-node maxima all-reduced (detached) and its
        sums of squares all-reduced with autograd (the scale depends on every rank's values)."""
        if isinstance(source, torch.Tensor):  # dense logits: the same selection through the summary op
            source = summarize(source, valid, k, temperature, None, backend)
        kept_values, kept_ids, logs = source.kept(k, values, temperature)
        rows = torch.where(valid, 0, -1).reshape(-1)
        present = (rows >= 0).unsqueeze(-1)
        kept_values = torch.where(present, kept_values, torch.zeros_like(kept_values))

        def combine(per_node, op):
            if op == "sum":
                return _AllReduceSum.apply(per_node, self.data)
            merged = per_node.clone()
            dist.all_reduce(merged, op=dist.ReduceOp.MAX, group=self.data)
            return merged

        # one graph: a slot's flat (graph, node) index is its node
        scaled = cosine_normalised(kept_values, logs, node_ids(kept_ids, nodes), present, num_nodes, combine)
        _, aggregate = dispatch.resolve("kept_degrees", backend, kept_values.device)
        degrees, touched = aggregate(scaled, kept_ids, rows, 1, num_nodes, nodes, "sum")
        return TopKDegrees(degrees, touched, scaled.detach(), kept_ids)

    def graph_weights(self, inputs: CallInputs, included: torch.Tensor, scope: str):
        """(S, G) teacher weights of the graphs and the (S, B, T) token weights (or None), as
        :meth:`~infigw.weighting.TeacherWeighting.graph_weights`; a pooled graph's uncertainty means run over the
        whole group's sequences (or covered positions)."""
        return inputs.weighting.graph_weights(included, scope, inputs.granularity, lambda: inputs.partners,
                                              combine=self._sum_over_group if self.pooled else None)

    def _sum_over_group(self, totals: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(totals, group=self.data)
        return totals

    # ------------------------------------------------------------------------------------------ normalisers
    def reduce(self, per_graph: torch.Tensor, included: torch.Tensor, reduction: str) -> torch.Tensor:
        """:func:`~infigw.functional.reduce` with this rank's share: a pooled graph counts 1/W here, and "mean"
        divides by the items of the whole batch (``num_items_in_batch``, else counted over the group)."""
        if self.pooled:
            per_graph = per_graph / self.data_world
        if reduction != "mean" or (self.items is None and self.data is None):
            return functional.reduce(per_graph, included, reduction)
        if self.items is not None:
            return per_graph.sum() / _denominator(self.items.sequences, per_graph)
        count = included.sum()
        if not self.pooled:  # a pooled graph is the same on every rank: its count is already the group's
            dist.all_reduce(count, group=self.data)
        return per_graph.sum() / count.clamp_min(1)

    def denominators(self, tokens: torch.Tensor, sequences: torch.Tensor):
        """The objective's "mean" normalisers (tokens, sequences) from this micro-batch's local counts."""
        if self.items is not None:
            return _denominator(self.items.tokens, tokens), _denominator(self.items.sequences, sequences)
        if self.data is not None:
            counts = torch.stack([tokens, sequences])
            dist.all_reduce(counts, group=self.data)
            tokens, sequences = counts[0], counts[1]
        return tokens.clamp_min(1), sequences.clamp_min(1)
