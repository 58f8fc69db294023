"""The LM head of a fused-linear loss: its validated inputs, the model's logit post-processing, and how many
positions (and vocabulary columns) one chunk of logits holds."""
from typing import NamedTuple, Optional

import torch

from .. import dispatch, distributed
from ..checks import check_logits, check_positive, check_same_device
from ..contract import compute_dtype
from ..reference import select_topk


# Memory for one chunk of positions (its fp32 logits and the temporaries of its gradient; ours): 10 % of what the
# logits path holds (the logits and their gradient in the head's dtype), at least 64 MiB and at most 1 GiB; the
# full-vocabulary ULD is differentiated on blocks of a chunk's positions that get 5 % of its own working set.
# Chunks of half that size made the head's per-chunk matmuls 15 % slower on CPU (benchmarks/RESULTS.md).
# ``chunk_size`` overrides the positions per chunk (and per block).
CHUNK_FRACTION, ULD_BLOCK_FRACTION, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 0.1, 0.05, 64 * 2**20, 2**30
# Vocabulary columns per pass of the statistics and the gradient over a chunk's logits: their temporaries
# (about _TILE_TEMPORARIES fp32 tiles of this width) stay small beside the logits.
VOCAB_TILE, _TILE_TEMPORARIES = 8192, 5
# fp32 (V,) rows per position that differentiating the full-vocabulary ULD may hold: the torch implementation of
# ``uld_full`` (its distributions, their sorted copies and sort indices, autograd); its kernels hold about 3 (the
# kept signs, the gradient).
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


def gathered(tensor: Optional[torch.Tensor], differentiable: bool = True) -> Optional[torch.Tensor]:
    """A DTensor (an FSDP2-sharded head) gathered whole, once per call; its gradient goes back reduce-scattered and
    averaged over the mesh, as FSDP2 averages the gradients of data-parallel ranks. Other tensors as they are."""
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(tensor, DTensor):
        return tensor
    if not differentiable:
        return tensor.detach().full_tensor()
    return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)


class _GradientShare(torch.autograd.Function):
    """The identity; its backward passes on 1/W of the gradient (see :func:`whole_vocabulary`)."""

    @staticmethod
    def forward(ctx, tensor, world):
        ctx.world = world
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.world, None


def whole_vocabulary(hidden, weight, bias, group):
    """A vocabulary-parallel head (rank r of ``group`` holds the rows ``[r * V_r, (r + 1) * V_r)`` of the weight and
    bias): every rank gathers the whole head, once per call (an O(V*H) exchange, never O(B*T*V)), and computes the
    whole loss, as on the logits path. The gather's backward keeps the rank's own rows; the hidden states receive
    1/W of their gradient on each rank, so that the group's sum (the all-reduce of a column-parallel head) is it."""
    world = distributed.group_rank(group, "vocab_parallel_group")[1]

    def whole(shard):  # (V_r, ...) -> (W * V_r, ...) through gather_vocab's (B, T, V_r) layout
        rows = shard.reshape(shard.shape[0], -1).t().unsqueeze(0)
        return distributed.gather_vocab(rows, group)[0].t().reshape(-1, *shard.shape[1:])
    return _GradientShare.apply(hidden, world), whole(weight), None if bias is None else whole(bias)


def project_(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias, transform) -> torch.Tensor:
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


class Head(NamedTuple):
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
        return project_(out, hidden, self.weight, self.bias, self.transform)


def validated_head(hidden, weight, bias, logit_scale, logit_softcapping, names, reference=None,
                   differentiable=True, vocab_group=None) -> Head:
    """Validate one model's hidden states (B, T, H) and head ``weight`` (V, H), ``bias`` (V,) (with
    ``vocab_group``: this rank's rows of a vocabulary-parallel head, gathered whole)."""
    hidden_name, weight_name, bias_name = names
    for tensor, name, ndim, layout in ((hidden, hidden_name, 3, "(batch, positions, hidden)"),
                                       (weight, weight_name, 2, "(vocab, hidden)"), (bias, bias_name, 1, "(vocab,)")):
        if tensor is not None or name != bias_name:
            check_logits(tensor, name, ndim, layout)
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
    weight, bias = gathered(weight, differentiable), gathered(bias, differentiable)
    if vocab_group is not None:
        hidden, weight, bias = whole_vocabulary(hidden, weight, bias, vocab_group)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)  # a mixed pair runs in the wider dtype (cast once)
    bias = None if bias is None else bias.to(compute_dtype(dtype))
    batch, length = hidden.shape[:2]
    return Head(hidden.reshape(batch * length, -1).to(dtype), weight.to(dtype), bias,
                 LogitTransform(float(logit_scale), None if logit_softcapping is None else float(logit_softcapping)),
                 torch.Size((batch, length, weight.shape[0])))


# ----------------------------------------------------------------------------------------------- chunks
def chunks(total: int, size: int):
    for start in range(0, total, size):
        yield slice(start, min(total, start + size))


def vocab_tiles(vocab: int, k: int = 1):
    """Column ranges of at most max(VOCAB_TILE, k) entries (a last range narrower than k joins the one before)."""
    width = max(VOCAB_TILE, k)
    starts = list(range(0, vocab, width))
    if len(starts) > 1 and vocab - starts[-1] < k:
        starts.pop()
    return [slice(start, stop) for start, stop in zip(starts, starts[1:] + [vocab])]


def chunk_rows(chunk_size: Optional[int], rows: int, vocab: int, itemsize: int):
    """(positions per chunk, positions per block of the full-vocabulary ULD's autograd): ``chunk_size`` for both,
    or as many as each budget holds, within [:data:`MIN_CHUNK_BYTES`, :data:`MAX_CHUNK_BYTES`]: a chunk
    :data:`CHUNK_FRACTION` of the logits path's logits and gradient (``itemsize`` bytes each), for each position
    its fp32 logits row and the vocabulary tile's temporaries; a ULD block :data:`ULD_BLOCK_FRACTION` of the full
    ULD's working set, ``_ROWS_FULL_ULD`` fp32 rows per position."""
    if chunk_size is not None:
        return chunk_size, chunk_size

    def budget(fraction, logits_path_bytes):
        return min(max(fraction * logits_path_bytes, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
    row = 4 * vocab + 4 * _TILE_TEMPORARIES * min(vocab, VOCAB_TILE)
    chunk = int(max(1, min(rows, budget(CHUNK_FRACTION, 2 * rows * vocab * itemsize) // row)))
    uld_row = 4 * vocab * _ROWS_FULL_ULD
    return chunk, int(max(1, min(chunk, budget(ULD_BLOCK_FRACTION, rows * uld_row) // uld_row)))


def _merge_topk(kept_a, ids_a, kept_b, ids_b, k: int):
    """The top-k of two candidate sets of each row under the contract's tie rule (ties to the smaller id)."""
    ids, order = torch.cat([ids_a, ids_b], -1).sort(-1)
    kept, position = select_topk(torch.cat([kept_a, kept_b], -1).gather(-1, order), k)
    return kept, ids.gather(-1, position)


def row_statistics(logits, valid, k: int, temperature: float, unit: bool, backend: str):
    """kept (c, k), ids (c, k), lse (c,), unit (c,) or empty of a chunk's logits (c, V) through the dispatched
    ``topk_summary`` op: whole rows where it runs a kernel (which needs no temporaries); its torch implementation
    one vocabulary tile at a time (its temporaries are the size of its input), merged (the top-k under the tie
    rule, online logsumexps)."""
    name, summarize = dispatch.resolve("topk_summary", backend, logits.device, k)
    vocab = logits.shape[-1]
    kept = ids = lse = unit_lse = None
    for tile in vocab_tiles(vocab, k) if name == "torch" else [slice(0, vocab)]:
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
