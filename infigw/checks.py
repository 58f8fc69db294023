"""Input validation for the public entry points: every error names the argument and what was expected.

Shape, dtype, device and option checks read only metadata. The data-dependent checks (the vocabulary range of
a :class:`~infigw.TopKRecord`'s indices, of gold tokens for ``teacher_weights="nll"`` and of the labels of the
cross-entropy) each cost a device-to-host sync; turn them off with ``INFIGW_DATA_CHECKS=0`` (out-of-range ids are
then undefined behaviour). ULD's pairing of valid positions also syncs (it gathers the valid rows).

Non-finite logits are not scanned for (that would be an extra pass over B*T*V). NaN ranks above every number in
the top-k selection, so a NaN in a valid row is always kept and the loss becomes NaN, never a silently finite
value. ``-inf`` logits are allowed (e.g. padded vocabulary): they are kept only when a row has fewer than k
finite entries, and then give NaN with ``values="logits"`` and probability 0 with the probability values.
"""
import math
import os
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def data_checks_enabled() -> bool:
    return os.environ.get("INFIGW_DATA_CHECKS", "1") != "0"


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
        if given.dtype.is_floating_point or given.dtype == torch.bool:
            raise TypeError(f"{full_name} must be an integer tensor, got {given.dtype}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        return given != ignore_index
    if given.dtype.is_floating_point:
        raise TypeError(f"{full_name} must be bool or integer 0/1, got {given.dtype}")
    return given.bool()


def check_record(record, batch: int, k: int, name: str, reference: torch.Tensor, temperature: float) -> None:
    """Shapes, dtypes, device and index range of a TopKRecord, and the temperature of its logsumexp."""
    values, indices = record.values, record.indices
    if not isinstance(values, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name}.values and {name}.indices must be tensors")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}.values must be a floating tensor, got {values.dtype}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"{name}.indices must be an integer tensor, got {indices.dtype}")
    if values.dim() != 3 or values.shape != indices.shape or values.numel() == 0:
        raise ValueError(
            f"{name}.values and {name}.indices must share one non-empty shape (B, T', k_t), "
            f"got {tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if values.shape[0] != batch:
        raise ValueError(f"{name} has batch size {values.shape[0]} but the student has {batch}")
    if isinstance(record.vocab_size, bool) or not isinstance(record.vocab_size, int) or record.vocab_size < values.shape[-1]:
        raise ValueError(f"{name}.vocab_size must be an int >= k_t = {values.shape[-1]}, got {record.vocab_size!r}")
    if values.shape[-1] < k:
        raise ValueError(f"{name} keeps k_t = {values.shape[-1]} entries per position, fewer than k = {k}")
    for tensor, part in ((values, "values"), (indices, "indices")):
        check_same_device(reference, tensor, f"{name}.{part}", "the student logits")
    if record.logsumexp is not None:
        lse = record.logsumexp
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(values.shape[:2]):
            raise ValueError(f"{name}.logsumexp must be a tensor of shape {tuple(values.shape[:2])}")
        if lse.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}.logsumexp must be a floating tensor, got {lse.dtype}")
        if record.temperature != temperature:
            raise ValueError(f"{name}.logsumexp was taken at temperature {record.temperature} but the loss uses "
                             f"temperature {temperature}: record it at the loss temperature (TopKRecord.from_logits"
                             "(..., temperature=...)) or drop the logsumexp")
        check_same_device(reference, lse, f"{name}.logsumexp", "the student logits")
    if data_checks_enabled():
        low, high = torch.aminmax(indices)
        low, high = int(low), int(high)  # the one host sync (see module docstring)
        if low < 0 or high >= record.vocab_size:
            raise ValueError(
                f"{name}.indices must lie in [0, {record.vocab_size}) (vocab_size), found values in [{low}, {high}]"
            )
