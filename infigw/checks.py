"""Input validation for the public entry points: every error names the argument and what was expected.

Shape, dtype, device and option checks read only metadata. The data-dependent checks (the vocabulary range and
uniqueness of a :class:`~infigw.TopKRecord`'s ids and its normaliser, the range of gold tokens for
``teacher_weights="nll"`` and of the labels of the cross-entropy) each cost a device-to-host sync; turn them off
with ``INFIGW_DATA_CHECKS=0`` (bad ids are then undefined behaviour). They are also skipped while
``torch.compile`` traces (a host sync would break the graph); run one eager step to have them.

Non-finite logits are not scanned for (that would be an extra pass over B*T*V). NaN ranks above every number in
the top-k selection, so a NaN in a valid row is always kept and the loss becomes NaN, never a silently finite
value. ``-inf`` logits are allowed (e.g. padded vocabulary): they are kept only when a row has fewer than k
finite entries, and then give NaN with ``values="logits"`` and probability 0 with the probability values.
"""
import math
import os
from typing import Optional, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Below this, logits / T overflows fp32 for logits of ordinary size and softmaxes become NaN (ours).
MIN_TEMPERATURE = 1e-6


def data_checks_enabled(data: torch.Tensor) -> bool:
    """The data-dependent checks of ``data`` run: ``INFIGW_DATA_CHECKS`` is not ``0``, no ``torch.compile``
    trace is under way, and ``data`` holds values (not a fake or meta tensor)."""
    return (os.environ.get("INFIGW_DATA_CHECKS", "1") != "0" and not torch.compiler.is_compiling()
            and data.device.type != "meta" and not is_fake(data))


def check_ids_in_range(ids: torch.Tensor, valid: Optional[torch.Tensor], size: int, message: str) -> None:
    """Raise ``ValueError(message)`` when an id at a valid position lies outside [0, size) (one host sync)."""
    if not data_checks_enabled(ids):
        return
    outside = (ids < 0) | (ids >= size)
    if valid is not None:
        outside = outside & valid
    if bool(outside.any()):
        raise ValueError(message)


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_logits(logits, name: str, ndim: int = 3, layout: Optional[str] = None) -> torch.Tensor:
    """A floating tensor of rank ``ndim`` (default (B, T, V)) with no empty dimension; ``layout`` names the axes."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 (or float64), got {logits.dtype}")
    if logits.dim() != ndim:
        expected = f"{ndim} dimensions {layout or ('(batch, positions, vocab)' if ndim == 3 else '')}".rstrip()
        raise ValueError(f"{name} must have {expected}, got shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(logits.shape)}")
    return logits


def check_points(points, name: str) -> torch.Tensor:
    """A floating tensor (..., n) of 1-D point sets with n >= 1."""
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(points).__name__}")
    if points.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {points.dtype}")
    if points.dim() == 0 or points.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., n) with n >= 1, got {tuple(points.shape)}")
    return points


def check_lengths(lengths, batch_shape, width: int, reference: torch.Tensor) -> torch.Tensor:
    """Flat int64 set sizes in [0, width] of point sets batched as ``batch_shape`` (all ``width`` when None). Their
    range is checked with a host sync: the 1-D GW op is standalone, not a loss hot path."""
    if lengths is None:
        return torch.full((torch.Size(batch_shape).numel(),), width, dtype=torch.long, device=reference.device)
    if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != tuple(batch_shape):
        raise ValueError(f"lengths must be a tensor of shape {tuple(batch_shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    check_same_device(reference, lengths, "lengths", "x")
    lengths = lengths.reshape(-1).long()
    if lengths.device.type != "meta" and not is_fake(lengths) and bool(((lengths < 0) | (lengths > width)).any()):
        raise ValueError(f"lengths must lie in [0, {width}] (the number of points n)")
    return lengths


def check_k(k, vocab: int, name: str = "k", vocab_name: str = "the vocabulary") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= vocab:
        raise ValueError(f"{name} must be in [1, {vocab}] ({vocab_name} size), got {k}")
    return k


def check_positive(value, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_temperature(value, name: str = "temperature") -> float:
    """A finite temperature >= MIN_TEMPERATURE (smaller ones overflow the fp32 math of logits / T)."""
    check_positive(value, name)
    if value < MIN_TEMPERATURE:
        raise ValueError(f"{name} must be >= {MIN_TEMPERATURE} (logits / {name} overflows float32 below it), "
                         f"got {value!r}")
    return float(value)


def check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_optional_count(value, name: str) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    return value


def check_number(value, name: str, low: float = 0.0) -> float:
    """A finite number >= low."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")
    return float(value)


def check_same_device(reference: torch.Tensor, tensor: torch.Tensor, name: str, reference_name: str) -> None:
    if tensor.device != reference.device:
        raise ValueError(f"{name} is on {tensor.device} but {reference_name} is on {reference.device}")


def valid_positions(labels, mask, shape, ignore_index: int, name: str, reference: torch.Tensor) -> torch.Tensor:
    """(B, T) bool of valid positions from ``labels != ignore_index`` or an explicit mask (all valid if neither)."""
    if labels is not None and mask is not None:
        raise ValueError(f"pass either {name} labels or a mask, not both")
    if labels is None and mask is None:
        return torch.ones(shape, dtype=torch.bool, device=reference.device)
    given, kind = (labels, "labels") if labels is not None else (mask, "mask")
    full_name = f"{name}{'_' if name else ''}{kind}"
    if not isinstance(given, torch.Tensor):
        raise TypeError(f"{full_name} must be a torch.Tensor, got {type(given).__name__}")
    if tuple(given.shape) != tuple(shape):
        raise ValueError(f"{full_name} must have shape {tuple(shape)} to match the logits, got {tuple(given.shape)}")
    check_same_device(reference, given, full_name, "the logits")
    if kind == "labels":
        if given.dtype.is_floating_point or given.dtype.is_complex or given.dtype == torch.bool:
            raise TypeError(f"{full_name} must be an integer tensor, got {given.dtype}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        return given.long() != ignore_index  # int64 first: -100 must not wrap around in uint8 labels
    if given.dtype.is_floating_point:
        raise TypeError(f"{full_name} must be bool or integer 0/1, got {given.dtype}")
    return given.bool()
