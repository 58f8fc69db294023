"""Chunked per-tensor merge engine shared by the in-memory and the streaming merge.

A tensor is processed in row chunks of at most ``chunk_elems`` elements (rows of dim 0), so one merge holds
O(K · chunk) memory whatever the tensor size. Methods that need whole-tensor statistics (TIES, RSAF) read the
chunks up to three times: moments + high radix histogram, low radix histogram inside the selected bucket,
then the merge itself. Tensors that fit one chunk are read once and kept. The chunking depends only on the
tensor shape, so the in-memory and the streaming merge produce identical bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .methods import MagnitudeSelector, MergeMethod, TensorStats, apply_plan, chunk_generator, get_method, keep_count

__all__ = ["DEFAULT_CHUNK_ELEMS", "TensorSource", "validate_metadata", "merge_tensor", "merge_state_dicts"]

# 16 MiB per fp32 chunk buffer: below glibc's largest mmap threshold (32 MiB), so freed chunk buffers are reused
# from the heap instead of being unmapped and page-faulted in again (that costs ~5x on big chunks)
DEFAULT_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True)
class TensorSource:
    """Where to read one tensor: its shape and dtype, and ``read(start, stop)`` → rows [start, stop) of dim 0
    (the whole tensor when ``start is None``, used for 0-d tensors)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[int | None, int | None], torch.Tensor]


def _row_ranges(shape: tuple[int, ...], chunk_elems: int) -> list[tuple[int | None, int | None]]:
    if len(shape) == 0:
        return [(None, None)]
    rows = shape[0]
    row_elems = math.prod(shape[1:])
    if rows == 0 or row_elems == 0:
        return [(0, rows)]
    step = max(1, chunk_elems // row_elems)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def validate_metadata(
    base: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    models: Sequence[Mapping[str, tuple[tuple[int, ...], torch.dtype]]],
    labels: Sequence[str],
) -> None:
    """Raise ``ValueError`` naming the first mismatch of tensor names, shapes or dtypes between base and models."""
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
                raise ValueError(
                    f"{label}: tensor {name!r} has shape {list(other_shape)}, base has {list(shape)}"
                )
            if other_dtype != dtype:
                raise ValueError(
                    f"{label}: tensor {name!r} has dtype {other_dtype}, base has {dtype}; "
                    "models with mixed dtypes are not merged (cast them to one dtype first)"
                )


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


def merge_tensor(
    name: str,
    base: TensorSource,
    models: Sequence[TensorSource],
    method: MergeMethod,
    *,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Iterator[torch.Tensor]:
    """Yield the merged tensor ``name`` as row chunks in the base dtype (in row order).

    ``name`` also keys the DARE random stream, so the same name and seed give the same masks.
    """
    labels = labels or [f"model {i}" for i in range(len(models))]
    ranges = _row_ranges(base.shape, chunk_elems)
    if not (base.dtype.is_floating_point or base.dtype.is_complex):
        yield from _copy_if_equal(name, base, models, labels, ranges)
        return
    if base.dtype.is_complex:
        raise ValueError(f"tensor {name!r}: complex dtype {base.dtype} is not supported")
    numel = math.prod(base.shape)
    if numel == 0:
        yield base.read(*ranges[0])
        return

    cache: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def chunk(i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if i in cache:
            return cache[i]
        start, stop = ranges[i]
        b = base.read(start, stop).to(torch.float32)
        out = (b, [_delta(src.read(start, stop), b) for src in models])
        if len(ranges) == 1:  # one chunk: keep it for the later passes instead of reading again
            cache[i] = out
        return out

    num_models = len(models)
    stats = None
    selectors = None
    if method.needs_stats:
        base_abs = 0.0
        sums = [[0.0, 0.0, 0.0] for _ in range(num_models)]
        selectors = [MagnitudeSelector() for _ in range(num_models)]
        for i in range(len(ranges)):
            b, deltas = chunk(i)
            base_abs += float(torch.linalg.vector_norm(b, 1))
            for m, d in enumerate(deltas):
                # fp32 reductions per chunk, accumulated across chunks in fp64
                a = d.abs().reshape(-1)
                a2 = a * a
                sums[m][0] += float(a.sum())
                sums[m][1] += float(a2.sum())
                sums[m][2] += float(torch.dot(a2, a))
                selectors[m].add_high(a)
        for label, selector in zip(labels, selectors):
            if selector.has_non_finite():
                raise ValueError(f"{label}: tensor {name!r} has inf/NaN deltas from the base")
        stats = TensorStats(numel, base_abs, *(list(col) for col in zip(*sums)))

    plan = method.plan(num_models, stats)
    thresholds = None
    if plan.keep_ratio is not None:
        if selectors is None:
            raise TypeError(f"merge method {method.name!r} returned keep ratios but does not set needs_stats")
        for ratio, selector in zip(plan.keep_ratio, selectors):
            selector.choose_bucket(keep_count(ratio, numel))
        for i in range(len(ranges)):
            for d, selector in zip(chunk(i)[1], selectors):
                selector.add_low(d.abs())
        thresholds = [s.threshold() for s in selectors]

    for i in range(len(ranges)):
        b, deltas = chunk(i)
        generators = None
        if plan.drop_rate is not None:
            generators = [chunk_generator(seed, name, m, i) for m in range(num_models)]
        merged = apply_plan(b, deltas, plan, thresholds, generators)
        # a finite sum proves every entry finite; only a non-finite sum needs the elementwise check
        if not math.isfinite(float(merged.sum())) and not bool(torch.isfinite(merged).all()):
            raise ValueError(f"tensor {name!r}: merged values are not finite (inf/NaN in the inputs?)")
        yield merged.to(base.dtype)
    cache.clear()


def _delta(weights: torch.Tensor, base_fp32: torch.Tensor) -> torch.Tensor:
    """fp32 ``weights − base`` in a new tensor (cast + in-place sub beats mixed-dtype ``torch.sub`` ~2x on CPU)."""
    return weights.to(torch.float32, copy=True).sub_(base_fp32)


def _state_dict_source(t: torch.Tensor) -> TensorSource:
    return TensorSource(tuple(t.shape), t.dtype, lambda start, stop: t if start is None else t[start:stop])


def _storage_key(t: torch.Tensor):
    """Identity of the memory a tensor views (tied weights share it)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def merge_state_dicts(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    method: str | MergeMethod = "rsaf",
    *,
    seed: int = 0,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    progress: bool = False,
    **options,
) -> dict[str, torch.Tensor]:
    """Merge K fine-tuned state dicts of one base model tensor by tensor (CPU tensors).

    ``method`` is a name from :data:`~infigw.merge.methods.METHODS` (``options`` go to its constructor) or
    a :class:`~infigw.merge.methods.MergeMethod` instance. Tensors tied in ``base`` (same storage) are merged
    once and stay tied in the output; each model must hold equal values under all tied names.
    Returns a new state dict in the base dtypes; bit-identical to :func:`~infigw.merge.merge_safetensors`.
    """
    method = get_method(method, **options)
    models = list(models)
    labels = [f"model {i}" for i in range(len(models))]
    for label, sd in zip(["base"] + labels, [base] + models):
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{label}: entry {name!r} is {type(t).__name__}, expected a torch.Tensor")
            if t.device.type != "cpu":
                raise ValueError(f"{label}: tensor {name!r} is on {t.device}, expected a CPU tensor")
    validate_metadata(
        {n: (tuple(t.shape), t.dtype) for n, t in base.items()},
        [{n: (tuple(t.shape), t.dtype) for n, t in sd.items()} for sd in models],
        labels,
    )

    tied: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    names = list(base)
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
            seed=seed, labels=labels, chunk_elems=chunk_elems,
        )
        merged = torch.empty_like(base[name], memory_format=torch.contiguous_format)
        row = 0
        for piece in chunks:
            if merged.dim() == 0:
                merged.copy_(piece)
            else:
                merged[row : row + piece.shape[0]] = piece
                row += piece.shape[0]
        out[name] = merged
    return out
