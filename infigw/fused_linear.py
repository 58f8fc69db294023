"""Fused-linear losses: GLD, ULD and the InfiGFusion objective from hidden states and the LM head, never forming
the (B*T, V) logits (docs/fused_linear.md).

The student's logits exist one chunk of positions at a time: ``transform(hidden @ W^T + b)`` in fp32, reduced at
once to what the losses read from each row (its :class:`~infigw.summary.TopKSummary` through the dispatched
``topk_summary`` op: the top-k logits and ids, the logsumexps, the gold logit; and the full-vocabulary ULD terms),
then dropped. Everything after that is the logits path's own code on O(B*T*k) tensors, so values and gradients
are the logits path's.

How the gradient reaches the hidden states and the head (accumulated in fp32):

- *folded*: under ``reduction="mean"``/``"sum"`` the loss is linear in the per-position cross-entropy and
  full-vocabulary ULD terms, with coefficients known before the pass (teacher weights are detached). The forward
  differentiates those terms on each chunk and projects them to the hidden/weight gradients at once; the backward
  only scales them (Liger's fused-linear design);
- *sparse*: the kept top-k logits (GLD with values "logits"/"topk_probs", the top-k ULD) and the gold logit have a
  k-sparse gradient: the backward reads the k rows of W each position kept, and no logits;
- *recomputed*: the rest (the logsumexp behind ``values="probs"``, every term under ``reduction="none"``)
  recomputes each chunk's logits in the backward.

A teacher may be dense logits, :class:`~infigw.TopKRecord` records, or a :class:`TeacherHead` (its own hidden
states and head, never materialised either): that teacher is summarised once per call, chunk by chunk, into a
record of its top logits and logsumexp, and for the full-vocabulary ULD its paired rows are projected per chunk.
"""
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch

from . import dispatch, functional, objective, uld
from .checks import (FLOAT_DTYPES, check_choice, check_count, check_k, check_optional_count, check_positive,
                     check_same_device)
from .contract import REDUCTIONS, compute_dtype
from .inputs import CallInputs, StudentSpec, resolve
from .reference import select_topk, uld_probabilities
from .reference.uld import padded_l1
from .summary import TopKSummary
from .teacher import TopKRecord, check_records_serve, teacher_name
from .weighting import resolve_rule

# Memory for one chunk of positions (its fp32 logits and the temporaries of its statistics; ours): 5 % of what
# the logits path holds (the logits and their gradient in the head's dtype), at least 64 MiB and at most 1 GiB.
# ``chunk_size`` overrides the positions per chunk.
CHUNK_FRACTION, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 0.05, 64 * 2**20, 2**30
# Vocabulary columns per pass of the statistics and the gradient over a chunk's logits: their temporaries
# (about _TILE_TEMPORARIES fp32 tiles of this width) stay small beside the logits.
VOCAB_TILE, _TILE_TEMPORARIES = 8192, 5
# fp32 (V,) rows per position with the full-vocabulary ULD: its logits, both sorted distributions, the sort
# indices and the autograd of the sorted L1.
_ROWS_FULL_ULD = 12


# ----------------------------------------------------------------------------------------------- logits
class LogitTransform(NamedTuple):
    """A model's logits from its head's output ``raw``: ``raw * scale``, then with ``softcap`` the Gemma-style
    ``tanh(. / softcap) * softcap``: the ops and order of transformers' forwards."""

    scale: float = 1.0
    softcap: Optional[float] = None

    def apply_(self, raw: torch.Tensor) -> torch.Tensor:
        """The logits, in place of ``raw`` (fp32/fp64)."""
        if self.scale != 1:
            raw.mul_(self.scale)
        if self.softcap is not None:
            raw.div_(self.softcap).tanh_().mul_(self.softcap)
        return raw

    def derivative(self, logits: torch.Tensor) -> torch.Tensor:
        """d logits / d raw, from the logits themselves: ``scale * (1 - (logits / softcap)^2)`` (tanh's derivative
        read from its output, as autograd does)."""
        if self.softcap is None:
            return torch.full_like(logits, self.scale)
        return (1 - (logits / self.softcap).square()).mul_(self.scale)


# How transformers' forwards apply a config's logit scale: attribute -> (model type prefix, operation) pairs, read
# in the modeling files of transformers 5.x (Llama, Gemma-2, Cohere and Granite are checked in the tests).
_LOGIT_SCALES = {
    "logit_scale": (("cohere", "multiply"),),  # Cohere, Cohere2: logits * logit_scale
    "output_multiplier": (("muse", "multiply"),),  # MuseSpark: logits * output_multiplier, then the soft cap
    "logits_scaling": (("granite", "divide"), ("hyperclovax", "multiply")),
}


def logit_settings(model_or_config) -> dict:
    """``{"logit_scale": s, "logit_softcapping": c}``: how a transformers model post-processes its LM head's output
    (``final_logit_softcapping``; Cohere's ``logit_scale``; Granite's ``logits_scaling``, a divisor, as
    ``1 / logits_scaling``), as keyword arguments of the fused-linear losses. A scaling attribute whose use by this
    model family is not known here raises: pass the settings yourself then (read the model's ``forward``)."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    model_type = str(getattr(config, "model_type", ""))
    scale = 1.0
    for attribute, families in _LOGIT_SCALES.items():
        value = getattr(config, attribute, None)
        if value is None:
            continue
        operation = next((how for prefix, how in families if model_type.startswith(prefix)), None)
        if operation is None:
            raise ValueError(f"{model_type or 'this model'} sets {attribute}={value!r}, whose use in its forward is "
                             "not known here: pass logit_scale / logit_softcapping yourself")
        scale = scale * float(value) if operation == "multiply" else scale / float(value)
    softcap = getattr(config, "final_logit_softcapping", None)
    return {"logit_scale": scale, "logit_softcapping": None if softcap is None else float(softcap)}


def _gathered(tensor: Optional[torch.Tensor], differentiable: bool = True) -> Optional[torch.Tensor]:
    """A DTensor (an FSDP2-sharded head) gathered whole, once per call; its gradient goes back reduce-scattered and
    averaged over the mesh, as FSDP2 averages the gradients of data-parallel ranks. Other tensors as they are."""
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(tensor, DTensor):
        return tensor
    if not differentiable:
        return tensor.detach().full_tensor()
    return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)


def _project_(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias, transform) -> torch.Tensor:
    """``out`` (c, V) fp32 (fp64) := the logits ``transform(hidden @ weight^T + bias)``. Low-precision operands are
    multiplied as such with fp32 accumulation, like the model's own head; on CPU, where matmuls have no fp32 output
    for them, the product is rounded to their dtype first, as the model's logits are."""
    if weight.dtype == out.dtype:
        torch.mm(hidden, weight.t(), out=out)
    elif out.device.type == "cuda":
        torch.mm(hidden, weight.t(), out_dtype=out.dtype, out=out)
    else:
        out.copy_(torch.mm(hidden, weight.t()))
    if bias is not None:
        out.add_(bias)
    return transform.apply_(out)


class _Head(NamedTuple):
    """One model's validated hidden states (N, H) and head in one matmul dtype, the head gathered whole."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]  # fp32 (fp64)
    transform: LogitTransform
    shape: torch.Size  # (B, T, V)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.weight.dtype)

    def logits(self, rows, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp32 (fp64) logits of the flat rows ``rows`` (a slice or an index tensor), in ``out`` if given."""
        hidden = self.hidden[rows]
        if out is None:
            out = torch.empty((hidden.shape[0], self.shape[-1]), dtype=self.dtype, device=hidden.device)
        return _project_(out, hidden, self.weight, self.bias, self.transform)


def _head(hidden, weight, bias, logit_scale, logit_softcapping, names, reference=None, differentiable=True) -> _Head:
    """Validate one model's hidden states (B, T, H) and head ``weight`` (V, H), ``bias`` (V,)."""
    hidden_name, weight_name, bias_name = names
    for tensor, name, ndim in ((hidden, hidden_name, 3), (weight, weight_name, 2), (bias, bias_name, 1)):
        if tensor is None and name == bias_name:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 (or float64), got {tensor.dtype}")
        if tensor.dim() != ndim or tensor.numel() == 0:
            layout = {3: "(batch, positions, hidden)", 2: "(vocab, hidden)", 1: "(vocab,)"}[ndim]
            raise ValueError(f"{name} must be a non-empty {layout} tensor, got shape {tuple(tensor.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{weight_name} has shape {tuple(weight.shape)}: its hidden size must match "
                         f"{hidden_name}'s {hidden.shape[-1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},) (the vocabulary of {weight_name}), "
                         f"got {tuple(bias.shape)}")
    reference = hidden if reference is None else reference
    for tensor, name in ((hidden, hidden_name), (weight, weight_name), (bias, bias_name)):
        if tensor is not None:
            check_same_device(reference, tensor, name, "the student's hidden states")
    if getattr(weight, "ds_id", None) is not None:
        raise ValueError(f"{weight_name} is a DeepSpeed ZeRO-3 parameter: the fused loss reads the head in its "
                         "backward too, where ZeRO-3 has released it; not supported (use FSDP2 or the logits path)")
    check_positive(logit_scale, "logit_scale")
    if logit_softcapping is not None:
        check_positive(logit_softcapping, "logit_softcapping")
    weight, bias = _gathered(weight, differentiable), _gathered(bias, differentiable)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)  # a mixed pair runs in the wider dtype (cast once)
    bias = None if bias is None else bias.to(compute_dtype(dtype))
    batch, length = hidden.shape[:2]
    return _Head(hidden.reshape(batch * length, -1).to(dtype), weight.to(dtype), bias,
                 LogitTransform(float(logit_scale), None if logit_softcapping is None else float(logit_softcapping)),
                 torch.Size((batch, length, weight.shape[0])))


# ----------------------------------------------------------------------------------------------- chunks
def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield slice(start, min(total, start + size))


def _vocab_tiles(vocab: int, k: int = 1):
    """Column ranges of at most max(VOCAB_TILE, k) entries (a last range narrower than k joins the one before)."""
    width = max(VOCAB_TILE, k)
    starts = list(range(0, vocab, width))
    if len(starts) > 1 and vocab - starts[-1] < k:
        starts.pop()
    return [slice(start, stop) for start, stop in zip(starts, starts[1:] + [vocab])]


def _chunk_rows(chunk_size: Optional[int], rows: int, vocab: int, itemsize: int):
    """(positions per chunk, positions per block of the full-vocabulary ULD's autograd): ``chunk_size`` for both,
    or as many as each budget holds, within [:data:`MIN_CHUNK_BYTES`, :data:`MAX_CHUNK_BYTES`]: a chunk
    :data:`CHUNK_FRACTION` of the logits path's logits and gradient (``itemsize`` bytes each), for each position
    its fp32 logits row and the vocabulary tile's temporaries; a ULD block the same fraction of the logits path's
    ULD working set, ``_ROWS_FULL_ULD`` fp32 rows per position (its sorted distributions and their autograd)."""
    if chunk_size is not None:
        return chunk_size, chunk_size

    def budget(logits_path_bytes):
        return min(max(CHUNK_FRACTION * logits_path_bytes, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
    chunk = budget(2 * rows * vocab * itemsize) // (4 * vocab + 4 * _TILE_TEMPORARIES * min(vocab, VOCAB_TILE))
    chunk = int(max(1, min(rows, chunk)))
    uld_row = 4 * vocab * _ROWS_FULL_ULD
    return chunk, int(max(1, min(chunk, budget(rows * uld_row) // uld_row)))


def _merge_topk(kept_a, ids_a, kept_b, ids_b, k: int):
    """The top-k of two candidate sets of each row under the contract's tie rule (ties to the smaller id)."""
    ids, order = torch.cat([ids_a, ids_b], -1).sort(-1)
    kept, position = select_topk(torch.cat([kept_a, kept_b], -1).gather(-1, order), k)
    return kept, ids.gather(-1, position)


def _row_statistics(logits, valid, k: int, temperature: float, unit: bool, summarize):
    """kept (c, k), ids (c, k), lse (c,), unit (c,) or empty of a chunk's logits (c, V), one vocabulary tile at a
    time through the ``topk_summary`` op, merged (the top-k under the tie rule, online logsumexps)."""
    kept = ids = lse = unit_lse = None
    for tile in _vocab_tiles(logits.shape[-1], k):
        tile_kept, tile_ids, tile_lse, tile_unit, _ = summarize(logits[:, tile], valid, k, temperature, None, unit)
        tile_ids = tile_ids + tile.start
        if kept is None:
            kept, ids, lse, unit_lse = tile_kept, tile_ids, tile_lse, tile_unit
            continue
        kept, ids = _merge_topk(kept, ids, tile_kept, tile_ids, k)
        lse = torch.logaddexp(lse, tile_lse)
        unit_lse = torch.logaddexp(unit_lse, tile_unit) if unit else unit_lse
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)  # invalid rows read 0, as in the logits path
    return kept, ids, torch.where(valid, lse, zero), torch.where(valid, unit_lse, zero) if unit else unit_lse


def _dense_gradient_(logits, transform: LogitTransform, temperature: float, *, lse=None, unit=None, kept=None,
                     gold=None, uld=None) -> torch.Tensor:
    """Overwrite a chunk's logits (c, V) with the gradient, with respect to the head's raw output, of
    ``sum(coefficient * quantity)`` over the per-row quantities the loss reads, one vocabulary tile at a time and
    in place where it can (the softmax of the cross-entropy's normaliser is taken in the logits' own storage).

    lse / unit: (coefficients (c,), values (c,)) of logsumexp(logits / T) and logsumexp(logits); kept / gold:
    (coefficients (c, m), ids (c, m)) of single logits; uld: (c, V) gradient of the ULD terms w.r.t. the logits.
    """
    for tile in _vocab_tiles(logits.shape[-1]):
        chunk = logits[:, tile]
        # the transform's derivative and the temperature's softmax read the logits before they are overwritten
        derivative = transform.derivative(chunk) if transform.softcap is not None else None
        tempered = None
        if lse is not None:
            coefficient, value = lse
            tempered = torch.div(chunk, temperature).sub_(value.unsqueeze(-1)).exp_()
            tempered.mul_((coefficient / temperature).unsqueeze(-1))
        if unit is not None:
            coefficient, value = unit
            chunk.sub_(value.unsqueeze(-1)).exp_().mul_(coefficient.unsqueeze(-1))
        else:
            chunk.zero_()
        for part in (tempered, None if uld is None else uld[:, tile]):
            if part is not None:
                chunk.add_(part)
        for entries in (kept, gold):
            if entries is not None:
                coefficient, ids = entries
                inside = (ids >= tile.start) & (ids < tile.stop)
                chunk.scatter_add_(1, torch.where(inside, ids - tile.start, 0),
                                   torch.where(inside, coefficient, torch.zeros_like(coefficient)))
        if derivative is not None:
            chunk.mul_(derivative)
        elif transform.scale != 1:
            chunk.mul_(transform.scale)
    return logits


# ----------------------------------------------------------------------------------------------- teachers
@dataclass(frozen=True)
class TeacherHead:
    """A teacher given by its last hidden states and LM head; its logits are never formed either (no gradient).

    Attributes:
        hidden: (B, T', H_t) the teacher's final hidden states (after its final norm).
        weight: (V_t, H_t) its LM head (a DTensor is gathered once per call); bias: (V_t,) or None.
        logit_scale, logit_softcapping: its logit post-processing (see :func:`logit_settings`).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    logit_scale: float = 1.0
    logit_softcapping: Optional[float] = None

    @classmethod
    def from_model(cls, model, hidden: torch.Tensor) -> "TeacherHead":
        """The head and logit settings of a transformers model, with its final hidden states ``hidden``."""
        head = model.get_output_embeddings()
        return cls(hidden, head.weight, getattr(head, "bias", None), **logit_settings(model))


class _FullULD(NamedTuple):
    """The full-vocabulary ULD of each student row against its partner row in every teacher."""

    teachers: list  # dense logits (B, T', V_t), TopKRecord or _Head each; never differentiated
    partners: torch.Tensor  # (S, N) flat teacher row paired with each student row, -1 for none
    temperature: float
    tail: bool  # records: the mass outside the kept entries counts as one more entry

    def terms(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """(S, c) ULD of the chunk's student logits (c, V) (0 where a row has no partner)."""
        p_sorted = uld_probabilities(logits, self.temperature).sort(-1, descending=True).values
        out = []
        for teacher, partner in zip(self.teachers, self.partners[:, rows]):
            with torch.no_grad():
                paired = partner.clamp_min(0)
                if isinstance(teacher, _Head):
                    q = uld_probabilities(teacher.logits(paired), self.temperature)
                elif isinstance(teacher, TopKRecord):
                    q = uld._record_probabilities(teacher, paired, self.temperature, None, False, self.tail)
                else:
                    q = uld_probabilities(teacher.flatten(0, 1)[paired], self.temperature)
                q_sorted = q.sort(-1, descending=True).values
            term = padded_l1(p_sorted, q_sorted)
            out.append(torch.where(partner >= 0, term, torch.zeros_like(term)))
        return torch.stack(out)

    def gradient(self, logits: torch.Tensor, rows: slice, coefficients: torch.Tensor):
        """The terms (S, c) of the rows ``rows`` and the gradient (c, V) of ``sum(coefficients * terms)``
        (coefficients (S, c)) w.r.t. their logits: autograd through the reference definition."""
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            terms = self.terms(leaf, rows)
            return terms.detach(), torch.autograd.grad((coefficients * terms).sum(), leaf)[0]


class _Teachers:
    """The call's teachers: dense logits and records as given; a :class:`TeacherHead` becomes a record of its top
    ``keep`` logits and its logsumexp at the loss temperature (what GLD, the top-k ULD and the entropy weights
    read), and stays a head for the full-vocabulary ULD."""

    def __init__(self, given, student: _Head, required: int, keep: int, temperature: float, backend: str,
                 chunk_size: Optional[int], gold_slot: bool):
        items = list(given) if isinstance(given, (list, tuple)) and given else [given]
        self.heads: List[Optional[_Head]] = []
        self.resolvable = []
        for i, item in enumerate(items):
            if not isinstance(item, (torch.Tensor, TopKRecord, TeacherHead)):
                raise TypeError(f"{teacher_name(i, len(items))} must be a tensor (B, T', V_t), an infigw.TopKRecord "
                                f"or a TeacherHead, or the argument a non-empty list of those, got "
                                f"{type(item).__name__}")
            head = None
            if isinstance(item, TeacherHead):
                name = teacher_name(i, len(items))
                head = _head(item.hidden, item.weight, item.bias, item.logit_scale, item.logit_softcapping,
                             (f"{name}.hidden", f"{name}.weight", f"{name}.bias"), student.hidden, False)
                check_k(required, head.shape[-1], "k", f"{name} vocabulary")
                # the losses and the entropy weights read the top ``keep`` at most; one more slot holds the gold
                item = _record(head, min(keep + gold_slot, head.shape[-1]), temperature, backend, chunk_size)
            self.heads.append(head)
            self.resolvable.append(item)
        self.keep_of = [None if head is None else min(keep, head.shape[-1]) for head in self.heads]

    def uld_teachers(self, inputs: CallInputs) -> list:
        return [inputs.teachers[i] if head is None else head for i, head in enumerate(self.heads)]

    def add_golds(self, inputs: CallInputs) -> None:
        """Put each head teacher's gold token (label-aware weights) in its record's last slot when it is not among
        the top ``keep``: its probability is then exact, as with dense logits."""
        for i, (head, gold, keep) in enumerate(zip(self.heads, inputs.weighting.golds, self.keep_of)):
            record = inputs.teachers[i]
            if head is None or gold is None or record.values.shape[-1] == keep:
                continue
            gold = gold.clamp(0, head.shape[-1] - 1)  # the ids at invalid positions are not checked
            rows, dtype = gold.reshape(-1), head.dtype
            with torch.no_grad():
                raw = (head.hidden.to(dtype) * head.weight[rows].to(dtype)).sum(-1)
                gold_logit = head.transform.apply_(raw if head.bias is None else raw + head.bias[rows])
            replace = ~(record.indices[..., :keep] == gold.unsqueeze(-1)).any(-1) & inputs.teacher_valids[i]
            values, indices = record.values.clone(), record.indices.clone()
            values[..., -1] = torch.where(replace, gold_logit.view(gold.shape).to(values.dtype), values[..., -1])
            indices[..., -1] = torch.where(replace, gold, indices[..., -1])
            inputs.teachers[i] = TopKRecord(values, indices, record.vocab_size, record.logsumexp, record.temperature)
            inputs.weighting.teachers[i] = inputs.teachers[i]


def _record(head: _Head, keep: int, temperature: float, backend: str, chunk_size: Optional[int]) -> TopKRecord:
    """A head teacher's top-``keep`` logits and logsumexp(logits / temperature) at every position, chunk by chunk."""
    batch, length, vocab = head.shape
    total = head.hidden.shape[0]
    _, summarize = dispatch.resolve("topk_summary", backend, head.hidden.device, keep)
    every = torch.ones(total, dtype=torch.bool, device=head.hidden.device)
    rows_per_chunk = _chunk_rows(chunk_size, total, vocab, head.weight.element_size())[0]
    buffer = torch.empty((min(rows_per_chunk, total), vocab), dtype=head.dtype, device=head.hidden.device)
    kept, ids, lse = [], [], []
    with torch.no_grad():
        for rows in _chunks(total, rows_per_chunk):
            logits = head.logits(rows, buffer[:rows.stop - rows.start])
            chunk_kept, chunk_ids, chunk_lse, _ = _row_statistics(logits, every[rows], keep, temperature, False,
                                                                  summarize)
            kept.append(chunk_kept), ids.append(chunk_ids), lse.append(chunk_lse)
    return TopKRecord(torch.cat(kept).view(batch, length, keep), torch.cat(ids).view(batch, length, keep), vocab,
                      torch.cat(lse).view(batch, length), float(temperature))


# ----------------------------------------------------------------------------------------------- the fused pass
class _Fold(NamedTuple):
    """Coefficients of the loss's linear per-position terms, folded into the forward: of logsumexp(logits) (the
    cross-entropy's normaliser) and of the gold logit (N,), of the full-vocabulary ULD terms (S, N); or None."""

    unit: Optional[torch.Tensor]
    gold: Optional[torch.Tensor]
    uld: Optional[torch.Tensor]


class _Plan(NamedTuple):
    """What the fused pass computes for the student."""

    valid: torch.Tensor  # (N,) bool
    k: int
    temperature: float
    gold: Optional[torch.Tensor]  # (N,) int64 label ids (0 at invalid rows), or None
    unit: bool  # also logsumexp(logits) at temperature 1 (the cross-entropy's, when temperature != 1)
    transform: LogitTransform
    rows: int  # positions per chunk
    uld_rows: int  # positions per block of the full-vocabulary ULD's autograd
    backend: str
    uld: Optional[_FullULD]
    fold: Optional[_Fold]


class _Gradients:
    """fp32 (fp64) accumulators of the gradients of the hidden states, weight and bias that are needed."""

    def __init__(self, hidden, weight, bias, needed):
        dtype = compute_dtype(weight.dtype)
        self.hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if needed[0] else None
        self.weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if needed[1] else None
        self.bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if needed[2] else None

    def add_dense(self, rows: slice, hidden, grad_raw, weight) -> None:
        """A chunk's gradient (c, V) with respect to ``hidden @ W^T + b``."""
        if self.hidden is not None:
            target = self.hidden[rows]
            if weight.dtype == target.dtype:
                target.addmm_(grad_raw, weight)
            elif weight.device.type == "cuda":
                torch.addmm(target, grad_raw.to(weight.dtype), weight, out_dtype=target.dtype, out=target)
            else:  # each position's row is written once: rounded like the logits path's bf16 product
                target += torch.mm(grad_raw.to(weight.dtype), weight)
        if self.weight is not None:
            if hidden.dtype == self.weight.dtype:
                self.weight.addmm_(grad_raw.t(), hidden)
            elif hidden.device.type == "cuda":
                torch.addmm(self.weight, grad_raw.t().to(hidden.dtype), hidden, out_dtype=self.weight.dtype,
                            out=self.weight)
            else:  # accumulated over chunks: in fp32
                self.weight.addmm_(grad_raw.t(), hidden.to(self.weight.dtype))
        if self.bias is not None:
            self.bias += grad_raw.sum(0)

    def add_sparse(self, rows: slice, hidden, columns, grad_raw, weight) -> None:
        """A chunk's gradient with respect to the raw outputs at ``columns`` (c, m): ``grad_raw`` (c, m)."""
        weight_rows = weight[columns].to(grad_raw.dtype)  # (c, m, H): the only rows of W this reads
        if self.hidden is not None:
            self.hidden[rows] += torch.einsum("cm,cmh->ch", grad_raw, weight_rows)
        flat = columns.reshape(-1)
        if self.weight is not None:
            outer = grad_raw.unsqueeze(-1) * hidden.to(grad_raw.dtype).unsqueeze(1)
            self.weight.index_add_(0, flat, outer.reshape(-1, hidden.shape[-1]))
        if self.bias is not None:
            self.bias.index_add_(0, flat, grad_raw.reshape(-1))

    def scale(self, factor: torch.Tensor) -> None:
        for grad in (self.hidden, self.weight, self.bias):
            if grad is not None:
                grad.mul_(factor)

    def result(self, hidden, weight, bias):
        return tuple(None if grad is None else grad.to(like.dtype)
                     for grad, like in ((self.hidden, hidden), (self.weight, weight), (self.bias, bias)))


def _chunk_input(hidden: torch.Tensor, valid: torch.Tensor, rows: slice) -> torch.Tensor:
    # invalid rows are zeroed first: NaN there (padding) must not reach the weight gradient as 0 * NaN
    return torch.where(valid[rows].unsqueeze(-1), hidden[rows], torch.zeros((), dtype=hidden.dtype,
                                                                            device=hidden.device))


def _block(entries, block: slice):
    """Rows ``block`` of (coefficients, values) entries for :func:`_dense_gradient_`, or None."""
    return None if entries is None else (entries[0][block], entries[1][block])


def _chunk_gradient_(logits, rows: slice, plan: _Plan, *, lse=None, unit=None, kept=None, gold=None, uld=None):
    """Overwrite a chunk's logits (c, V) with the gradient, w.r.t. the head's raw output, of
    ``sum(coefficient * quantity)``: entries as in :func:`_dense_gradient_`, for the chunk's rows; ``uld``: (S, c)
    coefficients of the full-vocabulary ULD terms, differentiated by blocks of ``plan.uld_rows`` positions.
    Returns the chunk's ULD terms (S, c), or None without ``uld``."""
    terms = []
    for block in _chunks(logits.shape[0], logits.shape[0] if uld is None else plan.uld_rows):
        uld_grad = None
        if uld is not None:
            block_terms, uld_grad = plan.uld.gradient(logits[block], _shifted(block, rows.start), uld[:, block])
            terms.append(block_terms)
        _dense_gradient_(logits[block], plan.transform, plan.temperature, lse=_block(lse, block),
                         unit=_block(unit, block), kept=_block(kept, block), gold=_block(gold, block), uld=uld_grad)
    return torch.cat(terms, dim=1) if terms else None


def _shifted(block: slice, offset: int) -> slice:
    return slice(block.start + offset, block.stop + offset)


def _uld_terms(logits, rows: slice, plan: _Plan) -> torch.Tensor:
    """(S, c) full-vocabulary ULD terms of a chunk, by blocks of ``plan.uld_rows`` positions (no gradient)."""
    return torch.cat([plan.uld.terms(logits[block], _shifted(block, rows.start))
                      for block in _chunks(logits.shape[0], plan.uld_rows)], dim=1)


class _FusedSummary(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), bias (V,) or None) -> the student's per-row statistics, chunk by chunk:
    kept (N, k), ids (N, k), lse (N,), unit (N,) or empty, gold logit (N,) or empty, full-vocabulary ULD terms
    (S, N) or empty, and the value of the folded terms (a scalar, 0 without them)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan):
        ctx.set_materialize_grads(False)
        _, summarize = dispatch.resolve("topk_summary", plan.backend, hidden.device, plan.k)
        fold = plan.fold if any(ctx.needs_input_grad[:3]) else None
        grads = None if fold is None else _Gradients(hidden, weight, bias, ctx.needs_input_grad[:3])
        dtype = compute_dtype(weight.dtype)
        buffer = torch.empty((min(plan.rows, hidden.shape[0]), weight.shape[0]), dtype=dtype, device=hidden.device)
        outputs = [[] for _ in range(6)]
        folded = hidden.new_zeros((), dtype=dtype)
        for rows in _chunks(hidden.shape[0], plan.rows):
            chunk = _chunk_input(hidden, plan.valid, rows)
            logits = _project_(buffer[:chunk.shape[0]], chunk, weight, bias, plan.transform)
            kept, ids, lse, unit = _row_statistics(logits, plan.valid[rows], plan.k, plan.temperature, plan.unit,
                                                   summarize)
            gold_ids = None if plan.gold is None else plan.gold[rows].unsqueeze(-1)
            gold = None if gold_ids is None else logits.gather(-1, gold_ids).squeeze(-1) * plan.valid[rows]
            if fold is None:
                terms = None if plan.uld is None else _uld_terms(logits, rows, plan)
            else:  # the folded terms' gradient now, projected at once; the chunk's logits are overwritten
                normaliser = unit if plan.unit else lse
                terms = _chunk_gradient_(
                    logits, rows, plan, unit=None if fold.unit is None else (fold.unit[rows], normaliser),
                    gold=None if fold.gold is None else (fold.gold[rows].unsqueeze(-1), gold_ids),
                    uld=None if fold.uld is None else fold.uld[:, rows])
                for coefficient, value in ((fold.unit, normaliser), (fold.gold, gold), (fold.uld, terms)):
                    if coefficient is not None:
                        folded += (coefficient[..., rows] * value).sum()
                grads.add_dense(rows, chunk, logits, weight)
            for out, value in zip(outputs, (kept, ids, lse, unit, gold, terms)):
                if value is not None:
                    out.append(value)
        kept, ids, lse, unit, gold = (torch.cat(out) if out else folded.new_empty(0) for out in outputs[:5])
        terms = torch.cat(outputs[5], dim=1) if outputs[5] else folded.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, kept, ids, lse, unit, gold)
        ctx.plan, ctx.grads = plan, grads
        ctx.mark_non_differentiable(ids, *((unit, gold, terms) if fold is not None else ()))
        return kept, ids, lse, unit, gold, terms, folded

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kept, _grad_ids, grad_lse, grad_unit, grad_gold, grad_terms, grad_folded):
        hidden, weight, bias, kept, ids, lse, unit, gold = ctx.saved_tensors
        plan, grads, ctx.grads = ctx.plan, ctx.grads, None  # the folded gradients are scaled in place, once
        needed = ctx.needs_input_grad[:3]
        if plan.fold is not None and grads is None and grad_folded is not None and any(needed):
            raise RuntimeError("a fused-linear loss with folded terms can be backpropagated once: its forward "
                               "computed their gradient and the first backward consumed it (retain_graph=True "
                               "cannot replay it); compute the loss again")
        if grads is not None and grad_folded is not None:
            grads.scale(grad_folded)
        else:
            grads = _Gradients(hidden, weight, bias, needed)
        valid = plan.valid

        def at_valid(grad, row_mask):
            return None if grad is None else torch.where(row_mask, grad, torch.zeros_like(grad))
        grad_kept, grad_lse = at_valid(grad_kept, valid.unsqueeze(-1)), at_valid(grad_lse, valid)
        grad_unit, grad_gold = at_valid(grad_unit, valid), at_valid(grad_gold, valid)
        dense = grad_lse is not None or grad_unit is not None or grad_terms is not None
        sparse = grad_kept is not None or grad_gold is not None
        if not any(needed) or not (dense or sparse):
            return (*grads.result(hidden, weight, bias), None)
        gold_ids = None if plan.gold is None else plan.gold.unsqueeze(-1)
        if dense:  # recompute each chunk's logits

            def entries(coefficients, values, rows):
                return None if coefficients is None else (coefficients[rows], values[rows])
            buffer = torch.empty((min(plan.rows, hidden.shape[0]), weight.shape[0]), dtype=kept.dtype,
                                 device=hidden.device)
            for rows in _chunks(hidden.shape[0], plan.rows):
                chunk = _chunk_input(hidden, valid, rows)
                logits = _project_(buffer[:chunk.shape[0]], chunk, weight, bias, plan.transform)
                _chunk_gradient_(logits, rows, plan, lse=entries(grad_lse, lse, rows),
                                 unit=entries(grad_unit, unit, rows), kept=entries(grad_kept, ids, rows),
                                 gold=entries(None if grad_gold is None else grad_gold.unsqueeze(-1), gold_ids, rows),
                                 uld=None if grad_terms is None else grad_terms[:, rows])
                grads.add_dense(rows, chunk, logits, weight)
            return (*grads.result(hidden, weight, bias), None)
        # sparse: only the kept entries and the gold logit; their logits give the transform's derivative
        columns, grad_logits, logits = [], [], []
        if grad_kept is not None:
            columns.append(ids), grad_logits.append(grad_kept), logits.append(kept)
        if grad_gold is not None:
            columns.append(gold_ids), grad_logits.append(grad_gold.unsqueeze(-1)), logits.append(gold.unsqueeze(-1))
        columns, logits = torch.cat(columns, -1), torch.cat(logits, -1)
        grad_raw = torch.cat(grad_logits, -1) * plan.transform.derivative(logits)
        # (c, m, H) gathered rows of W and their outer products per chunk
        rows_per_chunk = max(1, MIN_CHUNK_BYTES // (12 * columns.shape[-1] * hidden.shape[-1]))
        for rows in _chunks(hidden.shape[0], rows_per_chunk):
            grads.add_sparse(rows, _chunk_input(hidden, valid, rows), columns[rows], grad_raw[rows], weight)
        return (*grads.result(hidden, weight, bias), None)


# ----------------------------------------------------------------------------------------------- orchestration
class _Student(NamedTuple):
    """The fused pass's options for one call (besides what the call's inputs say)."""

    head: _Head
    k: int
    temperature: float
    backend: str
    chunk_size: Optional[int]


def _linear_coefficients(finish, inputs: CallInputs, vocab: int, temperature: float, ce: bool, full_uld: bool,
                         dtype: torch.dtype):
    """The loss's gradient with respect to the per-position logsumexp and gold logit of the cross-entropy and the
    ULD terms. The loss is linear in them (the teacher weights are detached and the reductions are sums), so that
    gradient, taken at zero through ``finish`` itself, is the coefficient each is folded with."""
    batch, length = inputs.valid.shape
    zeros = torch.zeros((batch, length), dtype=dtype, device=inputs.valid.device)
    with torch.enable_grad():
        unit, gold = zeros.clone().requires_grad_(ce), zeros.clone().requires_grad_(ce)
        terms = zeros.expand(len(inputs.teachers), batch, length).clone().requires_grad_(full_uld)
        probe = TopKSummary(zeros.unsqueeze(-1), zeros.long().unsqueeze(-1), zeros, unit, gold, vocab, temperature)
        loss = finish(probe, terms, graphs=False)[0]
        leaves = [leaf for leaf in (unit, gold, terms) if leaf.requires_grad]
        grads = iter(torch.autograd.grad(loss, leaves, allow_unused=True))
    flat = [next(grads) if leaf.requires_grad else None for leaf in (unit, gold, terms)]
    flat = [None if grad is None else grad.reshape(*grad.shape[:-2], -1) for grad in flat]
    return _Fold(*flat)


def _student_pass(student: _Student, inputs: CallInputs, finish, *, ce: bool = False, ce_grad: bool = False,
                  lse_grad: bool = False, full_uld: Optional[_FullULD] = None, reduction: str = "mean"):
    """The student's summary (and full-vocabulary ULD terms) through the fused pass, then ``finish(summary,
    per_position)``, the logits path's own tail; returns its ``(loss, components, token_weights)``.

    ``ce``: the loss reads the cross-entropy (``ce_grad``: with a nonzero factor); ``lse_grad``: it differentiates
    the summary's logsumexp (``values="probs"``)."""
    head = student.head
    batch, length, vocab = head.shape
    linear_terms = ce_grad or full_uld is not None
    # folding pays unless the backward recomputes the chunks anyway (values="probs" without a full-vocabulary ULD)
    fold = None
    if reduction != "none" and linear_terms and not (lse_grad and full_uld is None):
        fold = _linear_coefficients(finish, inputs, vocab, student.temperature, ce_grad, full_uld is not None,
                                    compute_dtype(head.weight.dtype))
    gold = torch.where(inputs.valid, inputs.labels, torch.zeros_like(inputs.labels)).reshape(-1) if ce else None
    rows, uld_rows = _chunk_rows(student.chunk_size, batch * length, vocab, head.weight.element_size())
    plan = _Plan(inputs.valid.reshape(-1), student.k, student.temperature, gold, ce and student.temperature != 1,
                 head.transform, rows, uld_rows, student.backend, full_uld, fold)
    kept, ids, lse, unit, gold_logit, terms, folded = _FusedSummary.apply(head.hidden, head.weight, head.bias, plan)
    lse = lse.view(batch, length)
    unit = unit.view(batch, length) if plan.unit else lse
    if fold is not None or not ce_grad:  # the cross-entropy's gradient is folded, or zero
        unit, gold_logit = unit.detach(), gold_logit.detach()
    summary = TopKSummary(kept.view(batch, length, student.k), ids.view(batch, length, student.k), lse, unit,
                          gold_logit.view(batch, length) if ce else None, vocab, student.temperature)
    per_position = None if full_uld is None else terms.view(-1, batch, length)
    loss, components, token_weights = finish(summary, per_position)
    if fold is not None:  # adds 0, and the folded terms' gradient
        loss = loss + (folded - folded.detach())
    return loss, components, token_weights


def _prepare(student_hidden, lm_head_weight, lm_head_bias, logit_scale, logit_softcapping, teacher_logits, *,
             required: int, keep: int, temperature: float, teacher_weights, backend: str,
             chunk_size: Optional[int]):
    """The student's head and the call's teachers (head teachers summarised into records)."""
    check_optional_count(chunk_size, "chunk_size")
    head = _head(student_hidden, lm_head_weight, lm_head_bias, logit_scale, logit_softcapping,
                 ("student_hidden", "lm_head_weight", "lm_head_bias"))
    num_teachers = len(teacher_logits) if isinstance(teacher_logits, (list, tuple)) else 1
    rule = resolve_rule(teacher_weights, max(num_teachers, 1))
    gold_slot = rule.measure is not None and rule.measure.needs_labels
    return head, _Teachers(teacher_logits, head, required, keep, temperature, backend, chunk_size, gold_slot)


def _resolved(head: _Head, teachers: _Teachers, labels, **options) -> CallInputs:
    inputs = resolve(StudentSpec(head.shape, head.hidden.device), teachers.resolvable, labels, **options)
    teachers.add_golds(inputs)
    return inputs


# ----------------------------------------------------------------------------------------------- public losses
def fused_linear_gld_loss(student_hidden, lm_head_weight, teacher_logits, labels=None, *, lm_head_bias=None,
                          logit_scale: float = 1.0, logit_softcapping: Optional[float] = None, mask=None,
                          teacher_labels=None, teacher_mask=None, ignore_index: int = -100, k: int = 10,
                          values: str = "logits", nodes: str = "vocab", graph_norm: str = "mean",
                          scope: str = "sequence", num_nodes: Optional[int] = None, distance: str = "l1",
                          temperature: float = 1.0, reduction: str = "mean", teacher_weights=None,
                          weight_temperature: float = 1.0, weight_granularity: str = "sequence",
                          deterministic: bool = False, backend: str = "auto", chunk_size: Optional[int] = None,
                          return_components: bool = False):
    """:func:`infigw.functional.gld_loss` of the student logits ``transform(student_hidden @ lm_head_weight^T +
    lm_head_bias)``, never formed (module docstring).

    Args:
        student_hidden: (B, T, H) the student's final hidden states (after its final norm), differentiable.
        lm_head_weight: (V, H) its LM head (tied embeddings too; an FSDP2 DTensor is gathered once per call);
            lm_head_bias: (V,) or None. Both differentiable.
        teacher_logits: dense (B, T', V_t) logits, a TopKRecord, a :class:`TeacherHead`, or a list of those.
        logit_scale, logit_softcapping: the student's logit post-processing (:func:`logit_settings` reads them
            from a transformers model): ``logits = tanh(raw * logit_scale / c) * c`` with c = logit_softcapping.
        chunk_size: positions per chunk (default: as many as :data:`CHUNK_BYTES` holds).
        The other arguments are :func:`~infigw.functional.gld_loss`'s.
    """
    functional.check_graph_options(values, nodes, graph_norm, scope, num_nodes, distance)
    check_choice(reduction, "reduction", REDUCTIONS)
    head, teachers = _prepare(student_hidden, lm_head_weight, lm_head_bias, logit_scale, logit_softcapping,
                              teacher_logits, required=k, keep=k, temperature=temperature,
                              teacher_weights=teacher_weights, backend=backend, chunk_size=chunk_size)
    inputs = _resolved(head, teachers, labels, mask=mask, teacher_labels=teacher_labels, teacher_mask=teacher_mask,
                       ignore_index=ignore_index, k=k, temperature=temperature, teacher_weights=teacher_weights,
                       weight_temperature=weight_temperature, weight_granularity=weight_granularity)
    check_records_serve(inputs.teachers, values=values, exact_probs=values == "probs", temperature=temperature)

    def finish(summary, _per_position, graphs=True):
        terms, included = functional.gld_terms(inputs, k=k, values=values, nodes=nodes, graph_norm=graph_norm,
                                               scope=scope, num_nodes=num_nodes, distance=distance,
                                               temperature=temperature, deterministic=deterministic,
                                               backend=backend, student=summary)
        weights, token_weights = inputs.weighting.graph_weights(included, scope, inputs.granularity,
                                                                lambda: inputs.partners)
        loss = functional.reduce((weights * terms).sum(0), included.any(0), reduction)
        return loss, {"gld": terms.detach(), "weights": weights, "included": included}, token_weights

    student = _Student(head, k, temperature, backend, chunk_size)
    loss, components, token_weights = _student_pass(student, inputs, finish, lse_grad=values == "probs",
                                                    reduction=reduction)
    return functional._with_components(loss, components, token_weights, return_components)


def fused_linear_uld_loss(student_hidden, lm_head_weight, teacher_logits, labels=None, *, lm_head_bias=None,
                          logit_scale: float = 1.0, logit_softcapping: Optional[float] = None, mask=None,
                          teacher_labels=None, teacher_mask=None, ignore_index: int = -100,
                          temperature: float = 1.0, top_k: Optional[int] = None, standardize: bool = False,
                          record_tail: str = "zeros", reduction: str = "mean", teacher_weights=None,
                          weight_temperature: float = 1.0, weight_k: int = 10, weight_granularity: str = "sequence",
                          backend: str = "auto", chunk_size: Optional[int] = None, return_components: bool = False):
    """:func:`infigw.functional.uld_loss` from the student's hidden states and head (arguments as in
    :func:`fused_linear_gld_loss`). The full-vocabulary form sorts each chunk's distributions; a head teacher's
    paired rows are projected per chunk."""
    check_choice(reduction, "reduction", REDUCTIONS)
    check_count(weight_k, "weight_k")
    head, teachers = _prepare(student_hidden, lm_head_weight, lm_head_bias, logit_scale, logit_softcapping,
                              teacher_logits, required=top_k or 1, keep=max(top_k or 1, weight_k),
                              temperature=temperature,
                              teacher_weights=teacher_weights, backend=backend, chunk_size=chunk_size)
    inputs = _resolved(head, teachers, labels, mask=mask, teacher_labels=teacher_labels, teacher_mask=teacher_mask,
                       ignore_index=ignore_index, temperature=temperature, teacher_weights=teacher_weights,
                       weight_temperature=weight_temperature, weight_granularity=weight_granularity,
                       weight_k=weight_k)
    uld.check_options(inputs, top_k, standardize, record_tail)
    check_records_serve(inputs.teachers, exact_probs=top_k is None, temperature=temperature)

    def finish(summary, per_position, graphs=True):
        if per_position is None:  # the top-k form reads the student's summary
            per_position = uld.terms(inputs, temperature=temperature, top_k=top_k, standardized=standardize,
                                     record_tail=record_tail, student=summary)
        per_sequence, mean_terms, included, weights, token_weights = uld.weighted(per_position, inputs)
        loss = functional.reduce(per_sequence, included.any(0), reduction)
        return loss, {"uld": mean_terms.detach(), "weights": weights, "included": included}, token_weights

    full = None if top_k is not None else _FullULD(teachers.uld_teachers(inputs), inputs.partners.flatten(1),
                                                   temperature, record_tail == "bucket")
    student = _Student(head, top_k or 1, temperature, backend, chunk_size)
    loss, components, token_weights = _student_pass(student, inputs, finish, full_uld=full, reduction=reduction)
    return functional._with_components(loss, components, token_weights, return_components)


def fused_linear_infigfusion_loss(student_hidden, lm_head_weight, teacher_logits, labels, *, lm_head_bias=None,
                                  logit_scale: float = 1.0, logit_softcapping: Optional[float] = None,
                                  teacher_labels=None, teacher_mask=None, ignore_index: int = -100,
                                  lam: float = 0.5, gamma: float = 1.0, k: int = 10, values: str = "logits",
                                  nodes: str = "vocab", graph_norm: str = "mean", num_nodes: Optional[int] = None,
                                  distance: str = "l1", temperature: float = 1.0, uld_top_k: Optional[int] = None,
                                  standardize: bool = False, record_tail: str = "zeros", teacher_weights=None,
                                  weight_temperature: float = 1.0, weight_granularity: str = "sequence",
                                  reduction: str = "mean", deterministic: bool = False, backend: str = "auto",
                                  chunk_size: Optional[int] = None, return_components: bool = False):
    """:func:`infigw.functional.infigfusion_loss` from the student's hidden states and head (arguments as in
    :func:`fused_linear_gld_loss`): the cross-entropy, GLD and the top-k ULD read one fused summary; the
    full-vocabulary ULD is computed chunk by chunk."""
    if labels is None:
        raise ValueError("labels (B, T) are required: they define the cross-entropy target and the valid positions")
    functional.check_graph_options(values, nodes, graph_norm, "sequence", num_nodes, distance)
    check_choice(reduction, "reduction", REDUCTIONS)
    objective.check_factors(lam, gamma)
    head, teachers = _prepare(student_hidden, lm_head_weight, lm_head_bias, logit_scale, logit_softcapping,
                              teacher_logits, required=max(k, uld_top_k or 1), keep=max(k, uld_top_k or 1),
                              temperature=temperature,
                              teacher_weights=teacher_weights, backend=backend, chunk_size=chunk_size)
    inputs = _resolved(head, teachers, labels, teacher_labels=teacher_labels, teacher_mask=teacher_mask,
                       ignore_index=ignore_index, k=k, temperature=temperature, teacher_weights=teacher_weights,
                       weight_temperature=weight_temperature, weight_granularity=weight_granularity)
    uld.check_options(inputs, uld_top_k, standardize, record_tail)
    distilled, graphs = lam != 0, lam != 0 and gamma != 0
    check_records_serve(inputs.teachers, values=values if graphs else None, temperature=temperature,
                        exact_probs=distilled and (uld_top_k is None or (graphs and values == "probs")))
    objective.check_labels(inputs, ignore_index)
    gld_options = dict(k=k, values=values, nodes=nodes, graph_norm=graph_norm, scope="sequence",
                       num_nodes=num_nodes, distance=distance, temperature=temperature, deterministic=deterministic,
                       backend=backend)

    def finish(summary, per_position, graphs=True):
        if distilled and per_position is None:  # the top-k form reads the student's summary
            per_position = uld.terms(inputs, temperature=temperature, top_k=uld_top_k, standardized=standardize,
                                     record_tail=record_tail, student=summary)
        return objective.infigfusion(inputs, summary, per_position, lam=lam, gamma=gamma if graphs else 0,
                                     reduction=reduction, gld_options=gld_options)

    full = None
    if distilled and uld_top_k is None:
        full = _FullULD(teachers.uld_teachers(inputs), inputs.partners.flatten(1), temperature, record_tail == "bucket")
    student = _Student(head, objective.summary_k(lam, gamma, k, uld_top_k), temperature, backend, chunk_size)
    loss, components, token_weights = _student_pass(student, inputs, finish, ce=True, ce_grad=lam != 1,
                                                    lse_grad=graphs and values == "probs", full_uld=full,
                                                    reduction=reduction)
    return functional._with_components(loss, components, token_weights, return_components)
