"""What every DLF path shares: input checks, the candidate set, the result type and the final selection.

Notation (Fan et al., NeurIPS 2024, "Dynamic Logits Fusion"): large-base logits ``L`` (B, V), small-base logits
``S`` (B, V), small-expert logits ``S_t`` (B, T, V); ``P = softmax(L)``, ``Q = softmax(S)``,
``Q_t = softmax(S_t)``, ``Δ_t = S_t - S``. A *candidate* ``c`` is a coefficient vector ``a_c`` (length T); its
fused logits are ``L + Σ_t a_c[t] Δ_t`` and its objective (main-text KL pairing of the paper, see
``docs`` in :mod:`infigw.dlf`) is

    Σ_t [ (KL(P̃_c‖P) − KL(Q_t‖Q))² + (KL(P‖P̃_c) − KL(Q‖Q_t))² ],   P̃_c = softmax(L + Σ_t a_c[t] Δ_t).

Candidate sets (``mode``):
  ``"single"``  one expert active per step (the paper's acceleration): ``a_c = g · e_t`` for every grid value
              ``g`` and expert ``t``; ``C = G·T``; ordered grid-value-major, ``c = i_g · T + t``.
  ``"full"``    every combination of grid values, ``C = G**T``, in lexicographic order of ``(a[0], …, a[T-1])``.

Tie-breaking (our choice, identical in every path): the argmin takes the *first* minimal candidate in that
order, i.e. in ``"single"`` mode the smallest α, then the smallest expert index; in ``"full"`` mode the
lexicographically smallest coefficient vector. The grid must therefore be strictly increasing.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

# The paper's grid: α ∈ {0.0, 0.1, …, 2.0} (21 values) [DLF Algorithm + appendix].
GRID_STEPS = 20
GRID_MAX = 2.0
DEFAULT_GRID: Tuple[float, ...] = tuple(round(i * GRID_MAX / GRID_STEPS, 10) for i in range(GRID_STEPS + 1))
MODES = ("single", "full")
# "full" mode is G**T candidates; beyond this it stops being a "small T" option.
MAX_FULL_CANDIDATES = 1 << 14
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

ExpertLogits = Union[torch.Tensor, Sequence[torch.Tensor]]


class DLFResult(NamedTuple):
    """Outcome of one DLF candidate search (one decoding step, B sequences).

    logits:         (B, V) fused logits ``L + Σ_t alpha[:, t] Δ_t`` of the chosen candidate (fp32, or fp64 in the
                    reference on fp64 inputs).
    alpha:          (B, T) coefficients of the chosen candidate (in ``"single"`` mode at most one is non-zero).
    expert:         (B,) int64 active expert of the chosen candidate in ``"single"`` mode (0 when α = 0, by the
                    tie rule); ``None`` in ``"full"`` mode.
    candidate:      (B,) int64 index of the chosen candidate (row of ``candidates``).
    objective:      (B, C) objective of every candidate.
    kl_forward:     (B, C) ``KL(P̃_c‖P)``.
    kl_reverse:     (B, C) ``KL(P‖P̃_c)``.
    target_forward: (B, T) ``KL(Q_t‖Q)``.
    target_reverse: (B, T) ``KL(Q‖Q_t)``.
    candidates:     (C, T) coefficient vectors of the candidates.
    """

    logits: torch.Tensor
    alpha: torch.Tensor
    expert: Optional[torch.Tensor]
    candidate: torch.Tensor
    objective: torch.Tensor
    kl_forward: torch.Tensor
    kl_reverse: torch.Tensor
    target_forward: torch.Tensor
    target_reverse: torch.Tensor
    candidates: torch.Tensor


def _check_logits(name: str, x: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (one of {FLOAT_DTYPES}), got {x.dtype}")


def validate_inputs(
    large_logits: torch.Tensor, small_logits: torch.Tensor, expert_logits: ExpertLogits
) -> torch.Tensor:
    """Check shapes, dtypes and devices; return the expert logits as one (B, T, V) tensor."""
    _check_logits("large_logits", large_logits, 2, "(batch, vocab)")
    _check_logits("small_logits", small_logits, 2, "(batch, vocab)")
    if not isinstance(expert_logits, torch.Tensor):
        experts = list(expert_logits)
        if not experts:
            raise ValueError("expert_logits is empty: DLF needs at least one expert (T >= 1)")
        for t, e in enumerate(experts):
            _check_logits(f"expert_logits[{t}]", e, 2, "(batch, vocab)")
            if e.shape != experts[0].shape or e.dtype != experts[0].dtype or e.device != experts[0].device:
                raise ValueError(
                    f"expert_logits[{t}] has shape {tuple(e.shape)}, {e.dtype} on {e.device}; expected "
                    f"{tuple(experts[0].shape)}, {experts[0].dtype} on {experts[0].device} like expert_logits[0]"
                )
        expert_logits = torch.stack(experts, dim=1)
    _check_logits("expert_logits", expert_logits, 3, "(batch, num_experts, vocab)")
    batch, vocab = large_logits.shape
    if expert_logits.shape[1] == 0:
        raise ValueError("expert_logits has num_experts = 0: DLF needs at least one expert (T >= 1)")
    if vocab == 0:
        raise ValueError("large_logits has an empty vocabulary (V = 0)")
    for name, x, v in (
        ("small_logits", small_logits, small_logits.shape[-1]),
        ("expert_logits", expert_logits, expert_logits.shape[-1]),
    ):
        if v != vocab:
            raise ValueError(
                f"vocabulary mismatch: {name} has V = {v} but large_logits has V = {vocab}; DLF needs models "
                "sharing one tokenizer and one logit layout (slice padded vocabularies to the shared size first)"
            )
        if x.shape[0] != batch:
            raise ValueError(f"batch mismatch: {name} has B = {x.shape[0]} but large_logits has B = {batch}")
        if x.device != large_logits.device:
            raise ValueError(f"{name} is on {x.device} but large_logits is on {large_logits.device}")
    return expert_logits


def candidate_alphas(
    num_experts: int,
    grid: Sequence[float] = DEFAULT_GRID,
    mode: str = "single",
    dtype: torch.dtype = torch.float32,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """(C, T) coefficient vectors of the candidates, in tie-breaking order (see module doc); read-only (cached)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    values = [float(g) for g in grid]
    if not values:
        raise ValueError("grid is empty: give at least one α value")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"grid values must be finite, got {values}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"grid must be strictly increasing (it defines the tie-breaking order), got {values}")
    if mode == "full" and len(values) ** num_experts > MAX_FULL_CANDIDATES:
        raise ValueError(
            f"mode='full' with {len(values)} grid values and T = {num_experts} experts gives "
            f"{len(values) ** num_experts} candidates (> {MAX_FULL_CANDIDATES}); use mode='single' or a coarser grid"
        )
    return _candidates(num_experts, tuple(values), mode, dtype, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=64)
def _candidates(num_experts, values, mode, dtype, device) -> torch.Tensor:
    """Cached per (T, grid, mode, dtype, device): decoding asks every step, and a host-to-device copy per step
    would stall the GPU queue. Callers must not modify the result."""
    if mode == "single":
        rows = [[g if j == t else 0.0 for j in range(num_experts)] for g in values for t in range(num_experts)]
    else:
        rows = [list(r) for r in itertools.product(values, repeat=num_experts)]
    return torch.tensor(rows, dtype=dtype, device=device)


def select(
    objective: torch.Tensor,
    candidates: torch.Tensor,
    mode: str,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """First-minimum argmin over candidates -> (candidate (B,), alpha (B, T), expert (B,) or None)."""
    candidate = objective.argmin(dim=1)  # torch returns the first minimal index: our tie rule
    alpha = candidates.index_select(0, candidate)
    expert = candidate % candidates.shape[1] if mode == "single" else None
    return candidate, alpha, expert


def raise_if_nonfinite(bad: torch.Tensor) -> None:
    """``bad`` (B, 3) bool: row b of (large, small, expert) logits holds NaN/±inf. One host sync."""
    if bool(bad.any()):
        for j, name in enumerate(("large_logits", "small_logits", "expert_logits")):
            rows = bad[:, j].nonzero().flatten().tolist()
            if rows:
                raise ValueError(
                    f"{name} contains non-finite values (NaN or ±inf) in batch rows {rows[:8]}"
                    f"{' ...' if len(rows) > 8 else ''}; DLF needs finite logits"
                )


def nonfinite_rows(large: torch.Tensor, small: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """(B, 3) bool: which rows of each input hold a non-finite value."""
    return torch.stack(
        [
            ~torch.isfinite(large).all(dim=-1),
            ~torch.isfinite(small).all(dim=-1),
            ~torch.isfinite(experts).all(dim=-1).all(dim=-1),
        ],
        dim=1,
    )
