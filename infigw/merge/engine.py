"""Chunked per-tensor merge engine shared by the in-memory and the streaming merge.

A tensor is processed in row chunks of at most ``chunk_elems`` elements (rows of dim 0), so one merge holds
O(K · chunk) memory whatever the tensor size. A method's :class:`~infigw.merge.methods.MergePlan` is carried
out in up to three passes over the chunks:

- **A** (magnitude sparsification or ``needs_stats``): |Δ| histograms for the exact top-k threshold, L1 norms,
  the moments RSAF reads; **B**: the low radix histogram inside the selected bucket;
- **R** (random sparsification): per model, the DARE keep masks drawn in flat order from the one seeded
  generator of the merge (the generator state at the start of each model is kept) and the kept L1 norm;
- **merge**: the masks again (replayed from the kept states) and the combination, in the working dtype.

Each pass reads a chunk of each input once; tensors that fit one chunk are read once in all. Chunking depends
only on the tensor shape, and no result depends on it, so the in-memory and the streaming merge produce identical
bits.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .methods import MergeMethod, MergePlan, TensorStats, get_method, keep_count
from .sparsify import MagnitudeSelector, TopKMask, draw_keep_mask, l1_rescale_factor, random_mask_dtype

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "TensorSource",
    "validate_metadata",
    "merge_tensor",
    "merge_state_dicts",
    "resolve_dtype",
    "resolve_device",
    "check_chunk_elems",
    "check_seed",
]

# 16 MiB per fp32 chunk buffer: below glibc's largest mmap threshold (32 MiB), so freed chunk buffers are reused
# from the heap instead of being unmapped and page-faulted in again (that costs ~5x on big chunks)
DEFAULT_CHUNK_ELEMS = 1 << 22

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


@dataclass(frozen=True)
class TensorSource:
    """Where to read one tensor: its shape and dtype, and ``read(start, stop)`` → rows [start, stop) of dim 0
    (the whole tensor when ``start is None``, used for 0-d tensors)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[int | None, int | None], torch.Tensor]


def resolve_dtype(value, what: str) -> torch.dtype | None:
    """A floating dtype from a ``torch.dtype`` or a name (``"bfloat16"``, ``"torch.float32"``, …); None stays."""
    if value is None or (isinstance(value, torch.dtype) and value in _DTYPE_NAMES.values()):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.removeprefix("torch.")]
    raise ValueError(f"{what}: expected one of {sorted(_DTYPE_NAMES)} (or None), got {value!r}")


def resolve_device(value) -> torch.device:
    """``"cpu"``, ``"cuda"``/``"cuda:N"`` (only when a GPU is present) or ``"auto"`` (a GPU if there is one)."""
    if value == "auto":
        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {value!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(device)!r} was requested but no CUDA device is available "
                         "(torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {value!r}")
    return device


def check_chunk_elems(chunk_elems) -> int:
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, numbers.Integral) or chunk_elems <= 0:
        raise ValueError(f"chunk_elems must be a positive integer, got {chunk_elems!r}")
    return int(chunk_elems)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _row_ranges(shape: tuple[int, ...], chunk_elems: int) -> list[tuple[int | None, int | None]]:
    if len(shape) == 0:
        return [(None, None)]
    rows = shape[0]
    row_elems = math.prod(shape[1:])
    if rows == 0 or row_elems == 0:
        return [(0, rows)]
    step = max(1, chunk_elems // row_elems)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def validate_metadata(
    base: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    models: Sequence[Mapping[str, tuple[tuple[int, ...], torch.dtype]]],
    labels: Sequence[str],
) -> None:
    """Raise ``ValueError`` naming the first mismatch of tensor names, shapes or dtypes between base and models.

    Floating tensors may differ in floating dtype (they are merged in one working dtype); other tensors must
    have the base's dtype.
    """
    if len(models) == 0:
        raise ValueError("models: expected at least one fine-tuned model, got none")
    names = set(base)
    for label, meta in zip(labels, models):
        missing, extra = sorted(names - set(meta)), sorted(set(meta) - names)
        if missing or extra:
            raise ValueError(
                f"{label}: tensor names differ from the base model: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}"
            )
        for name, (shape, dtype) in base.items():
            other_shape, other_dtype = meta[name]
            if tuple(other_shape) != tuple(shape):
                raise ValueError(f"{label}: tensor {name!r} has shape {list(other_shape)}, base has {list(shape)}")
            if other_dtype != dtype and not (_is_float(dtype) and _is_float(other_dtype)):
                raise ValueError(
                    f"{label}: tensor {name!r} has dtype {other_dtype}, base has {dtype}; only floating tensors "
                    "of different dtypes are merged (integer/bool tensors are copied and must match)"
                )
            if dtype.is_complex or other_dtype.is_complex:
                raise ValueError(f"tensor {name!r}: complex dtype {dtype} is not supported")


def working_dtype(dtype: torch.dtype | None, dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """``dtype``, or (None) the promoted dtype of the inputs as mergekit does; 8-bit floats are merged in fp32."""
    if dtype is not None:
        return dtype
    promoted = dtypes[0]
    for other in dtypes[1:]:
        promoted = torch.promote_types(promoted, other)
    return promoted if promoted.itemsize >= 2 else torch.float32


def _copy_if_equal(name: str, base: TensorSource, models: Sequence[TensorSource], labels, ranges):
    """Integer/bool tensors (buffers) are copied from base, and only when every model holds the same values."""
    for start, stop in ranges:
        chunk = base.read(start, stop)
        for label, src in zip(labels, models):
            if not torch.equal(chunk, src.read(start, stop)):
                raise ValueError(
                    f"{label}: tensor {name!r} has non-float dtype {base.dtype} and differs from the base; "
                    "integer/bool tensors are copied from the base only when all models equal it"
                )
        yield chunk


class _ChunkReader:
    """Row chunks of the base (index 0) and the models (1..K) in the working dtype on the merge device. The last
    chunk read of each source is kept, so a pass reads each chunk once, and a one-chunk tensor is read once."""

    def __init__(self, base, models, ranges, dtype, device):
        self.sources, self.ranges, self.dtype, self.device = [base, *models], ranges, dtype, device
        self.single_chunk = len(ranges) == 1
        self.last: dict[int, tuple[int, torch.Tensor]] = {}

    def read(self, source: int, chunk: int) -> torch.Tensor:
        kept = self.last.get(source)
        if kept is not None and kept[0] == chunk:
            return kept[1]
        t = self.sources[source].read(*self.ranges[chunk]).to(device=self.device, dtype=self.dtype)
        self.last[source] = (chunk, t)
        return t

    def delta(self, model: int, chunk: int) -> torch.Tensor:
        return self.read(model + 1, chunk) - self.read(0, chunk)


def _raise_non_finite(name: str, reader: _ChunkReader, chunks, labels, use_base: bool):
    """Name the input holding inf/NaN in the given chunks (the base first), else report an overflow."""
    for source in range(0 if use_base else 1, len(reader.sources)):
        for i in chunks:
            if not bool(torch.isfinite(reader.read(source, i)).all()):
                raise ValueError(f"{'base' if source == 0 else labels[source - 1]}: tensor {name!r} has inf/NaN values")
    raise ValueError(f"tensor {name!r}: merged values overflow {reader.dtype} although every input is finite "
                     "(weights, lambda or the working dtype too small?)")


def _all_finite(t: torch.Tensor) -> bool:
    # a finite sum proves every entry finite; only a non-finite sum needs the elementwise check
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _checked_plan(method: MergeMethod, num_models: int, stats: TensorStats | None) -> MergePlan:
    plan = method.plan(num_models, stats)
    if not isinstance(plan, MergePlan):
        raise TypeError(f"merge method {method.name!r}: plan() must return a MergePlan, got {type(plan).__name__}")
    return plan.check(num_models, f"merge method {method.name!r}")


def merge_tensor(
    name: str,
    base: TensorSource,
    models: Sequence[TensorSource],
    method: MergeMethod,
    *,
    generator: torch.Generator | None = None,
    labels: Sequence[str] | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    dtype: torch.dtype | None = torch.float32,
    out_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    """Yield the merged tensor ``name`` as CPU row chunks in ``out_dtype`` (default: the base's), in row order.

    ``dtype`` is the working dtype (None: the inputs' promoted dtype, as mergekit). Random sparsification draws
    from ``generator`` (CPU, one per merge, consumed tensor after tensor), so its masks do not depend on the
    device or the chunking.
    """
    chunk_elems = check_chunk_elems(chunk_elems)
    labels = labels or [f"model {i}" for i in range(len(models))]
    ranges = _row_ranges(base.shape, chunk_elems)
    if not _is_float(base.dtype):
        yield from _copy_if_equal(name, base, models, labels, ranges)
        return
    out_dtype = out_dtype or base.dtype
    numel = math.prod(base.shape)
    if numel == 0:
        yield base.read(*ranges[0]).to(out_dtype)
        return
    wd = working_dtype(dtype, [base.dtype, *(m.dtype for m in models)])
    device = torch.device(device)
    num_models, chunks = len(models), range(len(ranges))
    plan = None if method.needs_stats else _checked_plan(method, num_models, None)
    reader = _ChunkReader(base, models, ranges, wd, device)
    use_base = plan is None or not plan.linear

    # pass A: |Δ| histograms, L1 norms and (for needs_stats) the moments
    selectors, abs_sums = None, None
    needs_magnitude = plan is None or (plan.sparsification == "magnitude" and min(plan.density) < 1.0)
    if needs_magnitude:
        selectors = [MagnitudeSelector(device) for _ in range(num_models)]
        sums = [[0.0, 0.0, 0.0] for _ in range(num_models)]
        base_abs = 0.0
        for i in chunks:
            if plan is None:
                base_abs += float(reader.read(0, i).float().abs().sum())
            for m, selector in enumerate(selectors):
                a = reader.delta(m, i).abs().float().reshape(-1)
                sums[m][0] += float(a.sum())  # fp32 per chunk, accumulated across chunks in fp64
                if plan is None:
                    a2 = a * a
                    sums[m][1] += float(a2.sum())
                    sums[m][2] += float(torch.dot(a2, a))
                selector.add_high(a)
        if any(s.has_non_finite() for s in selectors):
            _raise_non_finite(name, reader, chunks, labels, use_base)
        abs_sums = [s[0] for s in sums]
        if plan is None:
            plan = _checked_plan(method, num_models, TensorStats(numel, base_abs, *(list(c) for c in zip(*sums))))

    # pass B: exact top-k thresholds (and the kept L1 norm for rescale)
    top_k: list[TopKMask | None] = [None] * num_models
    factors: list[torch.Tensor | None] = [None] * num_models
    if plan.sparsification == "magnitude":
        active = [m for m in range(num_models) if 0 < keep_count(plan.density[m], numel) < numel]
        for m in active:
            selectors[m].choose_bucket(keep_count(plan.density[m], numel), track_sums=plan.rescale)
        for i in chunks if active else ():
            for m in active:
                selectors[m].add_low(reader.delta(m, i).abs().float())
        for m in active:
            k, threshold = keep_count(plan.density[m], numel), selectors[m].threshold()
            above = selectors[m].count_above()
            top_k[m] = TopKMask(threshold, k - above)
            if plan.rescale:
                factors[m] = l1_rescale_factor(abs_sums[m], selectors[m].sum_above() + (k - above) * threshold, wd)

    # pass R: DARE keep masks, drawn in flat order per model, and their kept L1 norms
    replay: list[torch.Generator | None] = [None] * num_models
    kept_masks: dict[int, torch.Tensor] = {}
    random_dtype = random_mask_dtype(wd)
    if plan.sparsification == "random":
        if generator is None:
            raise ValueError(f"merge method {method.name!r} drops entries at random: pass a seeded generator")
        for m in range(num_models):
            if plan.density[m] >= 1.0:
                continue
            replay[m] = torch.Generator()
            replay[m].set_state(generator.get_state())
            total, kept = 0.0, 0.0
            for i in chunks:
                delta = reader.delta(m, i).to(random_dtype)
                mask = draw_keep_mask(delta.shape, plan.density[m], random_dtype, generator).to(device)
                if plan.rescale:
                    total += float(delta.abs().float().sum())
                    kept += float((delta * mask).abs().float().sum())
                if reader.single_chunk:
                    kept_masks[m] = mask
            if not math.isfinite(total):
                _raise_non_finite(name, reader, chunks, labels, use_base)
            if plan.rescale:
                factors[m] = l1_rescale_factor(total, kept, random_dtype)

    def sparsified(m: int, i: int) -> torch.Tensor:
        delta = reader.delta(m, i)
        if plan.sparsification == "magnitude":
            if keep_count(plan.density[m], numel) == 0:
                return torch.zeros_like(delta)
            if top_k[m] is not None:
                delta = delta * top_k[m].next(delta.abs().float())
        elif plan.sparsification == "random" and plan.density[m] < 1.0:
            mask = kept_masks.get(m)
            if mask is None:
                mask = draw_keep_mask(delta.shape, plan.density[m], random_dtype, replay[m]).to(device)
            delta = delta.to(random_dtype) * mask
            if factors[m] is not None:
                delta = delta * factors[m].to(device)
            return delta.to(wd)
        if factors[m] is not None:
            delta = delta * factors[m].to(device)
        return delta

    for i in chunks:
        if plan.linear:
            merged = _combine_linear(plan, [reader.read(m + 1, i) for m in range(num_models)])
        else:
            merged = _combine_deltas(plan, reader.read(0, i), [sparsified(m, i) for m in range(num_models)])
        if not _all_finite(merged):
            _raise_non_finite(name, reader, [i], labels, use_base)
        yield merged.to(out_dtype).cpu()


def _combine_deltas(plan: MergePlan, base: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """mergekit's generalized task arithmetic on one chunk, op for op in the working dtype (bit-equal)."""
    stacked = torch.stack(deltas)
    weights = torch.tensor(plan.weights, dtype=base.dtype, device=base.device)
    weights = weights.reshape(-1, *([1] * base.dim()))
    stacked.mul_(weights)
    if plan.consensus is not None:
        sign = stacked.sign()
        vote = stacked.sum(dim=0) if plan.consensus == "sum" else sign.sum(dim=0)
        majority = (vote >= 0).to(base.dtype) * 2 - 1  # an exact zero vote elects +1
        agrees = sign == majority
        mixed = (stacked * agrees).sum(dim=0)
        divisor = (weights * agrees).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if plan.normalize:
        mixed /= divisor
    if plan.scale != 1.0:
        mixed *= plan.scale
    return base + mixed


def _combine_linear(plan: MergePlan, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """mergekit's ``linear`` on one chunk: fp32 (fp64 for fp64) weighted sum, divided by Σw with normalize."""
    first = tensors[0]
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor(plan.weights, dtype=acc_dtype, device=first.device)
    acc = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
    for t, w in zip(tensors, weights):
        acc.addcmul_(t, w)
    if plan.normalize:
        acc.div_(weights.sum())
    return acc.to(first.dtype)


def _state_dict_source(t: torch.Tensor) -> TensorSource:
    t = t.detach()  # nn.Parameter inputs must not make the merged tensors part of an autograd graph
    return TensorSource(tuple(t.shape), t.dtype, lambda start, stop: t if start is None else t[start:stop])


def _storage_key(t: torch.Tensor):
    """Identity of the memory a tensor views (tied weights share it)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def _check_state_dicts(base, models) -> list:
    if not isinstance(base, Mapping):
        raise TypeError(f"base: expected a state dict (a mapping of names to tensors), got {type(base).__name__}")
    if isinstance(models, (Mapping, str, bytes)) or not isinstance(models, Sequence):
        raise TypeError(f"models: expected a sequence of state dicts, got {type(models).__name__}")
    for i, sd in enumerate(models):
        if not isinstance(sd, Mapping):
            raise TypeError(f"models[{i}]: expected a state dict (a mapping of names to tensors), "
                            f"got {type(sd).__name__}")
    labels = [f"model {i}" for i in range(len(models))]
    for label, sd in zip(["base"] + labels, [base, *models]):
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{label}: entry {name!r} is {type(t).__name__}, expected a torch.Tensor")
    return labels


def merge_state_dicts(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    method: str | MergeMethod = "rsaf",
    *,
    seed: int = 0,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    progress: bool = False,
    dtype: torch.dtype | str | None = torch.float32,
    out_dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    **options,
) -> dict[str, torch.Tensor]:
    """Merge K fine-tuned state dicts of one base model tensor by tensor.

    ``method`` is a name from :data:`~infigw.merge.methods.METHODS` (``options`` go to its constructor) or
    a :class:`~infigw.merge.methods.MergeMethod` instance. ``dtype`` is the working dtype (None: the inputs'
    promoted dtype, as mergekit; default fp32), ``out_dtype`` the dtype of the merged floating tensors
    (default: the base's). Random drops draw from one generator seeded by ``seed``, tensor after tensor in
    sorted-name order (mergekit's order). Tensors tied in ``base`` (same storage) are merged once and stay
    tied; each model must hold equal values under all tied names. Returns new CPU tensors without autograd
    history, bit-identical to :func:`~infigw.merge.merge_safetensors`.
    """
    method = get_method(method, **options)
    chunk_elems = check_chunk_elems(chunk_elems)
    dtype, out_dtype = resolve_dtype(dtype, "dtype"), resolve_dtype(out_dtype, "out_dtype")
    device, seed = resolve_device(device), check_seed(seed)
    labels = _check_state_dicts(base, models)
    models = list(models)
    validate_metadata(
        {n: (tuple(t.shape), t.dtype) for n, t in base.items()},
        [{n: (tuple(t.shape), t.dtype) for n, t in sd.items()} for sd in models],
        labels,
    )

    generator = torch.Generator().manual_seed(seed)
    tied: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    names = sorted(base)
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc=f"merge ({method.name})", unit="tensor")
    for name in names:
        key = _storage_key(base[name])
        if key in tied:
            first = tied[key]
            for label, sd in zip(labels, models):
                if not torch.equal(sd[name], sd[first]):
                    raise ValueError(
                        f"{label}: tensors {first!r} and {name!r} are tied in the base but differ in this model"
                    )
            out[name] = out[first]
            continue
        tied[key] = name
        chunks = merge_tensor(
            name, _state_dict_source(base[name]), [_state_dict_source(sd[name]) for sd in models], method,
            generator=generator, labels=labels, chunk_elems=chunk_elems, dtype=dtype, out_dtype=out_dtype,
            device=device,
        )
        merged, row = None, 0
        for piece in chunks:
            if merged is None:
                merged = torch.empty(base[name].shape, dtype=piece.dtype)
            if merged.dim() == 0:
                merged.copy_(piece)
            else:
                merged[row : row + piece.shape[0]] = piece
                row += piece.shape[0]
        out[name] = merged
    return {name: out[name] for name in base}
