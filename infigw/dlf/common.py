"""What every DLF path shares: input checks, the candidate set, the result type, the choice and its final check.

Notation (Fan et al., NeurIPS 2024, "Dynamic Logits Fusion"): large-base logits ``L`` (B, V), small-base logits
``S`` (B, V), small-expert logits ``S_t`` (B, T, V); ``P = softmax(L)``, ``Q = softmax(S)``,
``Q_t = softmax(S_t)``, ``Δ_t = S_t - S``. A *candidate* ``c`` is a coefficient vector ``a_c`` (length T); its
fused logits are ``L + Σ_t a_c[t] Δ_t`` and its objective (main-text KL pairing of the paper, see
:mod:`infigw.dlf`) is

    Σ_t [ (KL(P̃_c‖P) − KL(Q_t‖Q))² + (KL(P‖P̃_c) − KL(Q‖Q_t))² ],   P̃_c = softmax(L + Σ_t a_c[t] Δ_t).

Candidate sets (``mode``):
  ``"single"``  one expert active per step (the paper's acceleration): ``a_c = g · e_t`` for every grid value
              ``g`` and expert ``t``; ``C = G·T``; ordered grid-value-major, ``c = i_g · T + t``.
  ``"full"``    every combination of grid values, ``C = G**T``, in lexicographic order of ``(a[0], …, a[T-1])``.

Tie-breaking (ours, identical in every path): the argmin takes the *first* minimal candidate in that order, i.e.
in ``"single"`` mode the smallest α, then the smallest expert index; in ``"full"`` mode the lexicographically
smallest coefficient vector. The grid must therefore be strictly increasing.

Non-finite values (ours):
  * ``-inf`` in ``L`` marks a token masked out, e.g. by a logits processor that ran before DLF inside
    ``generate`` (``min_new_tokens``, ``bad_words_ids``): it has probability 0 under P and every P̃_c and its
    fused logit stays ``-inf``. A row needs at least one finite entry.
  * NaN or ``+inf`` in ``L`` and any non-finite value in ``S`` or ``S_t`` are errors.
  * A candidate whose fused logits or objective overflow float32 (finite logits of magnitude ~1e38) is never
    chosen; a row where every candidate overflows is an error.
All three are detected after the search from the chosen candidate (:func:`raise_if_failed`, one host sync), since
each of them makes the objective or the fused logits non-finite; the inputs are only re-scanned to name the cause.
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..checks import check_choice, check_count, check_logits, check_same_device

# The paper's grid: α ∈ {0.0, 0.1, …, 2.0} (21 values) [DLF Algorithm + appendix].
GRID_STEPS = 20
GRID_MAX = 2.0
DEFAULT_GRID: Tuple[float, ...] = tuple(round(i * GRID_MAX / GRID_STEPS, 10) for i in range(GRID_STEPS + 1))
MODES = ("single", "full")
# "full" mode is G**T candidates; beyond this it stops being a "small T" option.
MAX_FULL_CANDIDATES = 1 << 14
# Batch rows listed in an error message.
ROWS_SHOWN = 8

ExpertLogits = Union[torch.Tensor, Sequence[torch.Tensor]]


class DLFResult(NamedTuple):
    """Outcome of one DLF candidate search (one decoding step, B sequences).

    logits:         (B, V) fused logits ``L + Σ_t alpha[:, t] Δ_t`` of the chosen candidate (fp32, or fp64 in the
                    reference on fp64 inputs).
    alpha:          (B, T) coefficients of the chosen candidate (in ``"single"`` mode at most one is non-zero).
    expert:         (B,) int64 active expert of the chosen candidate in ``"single"`` mode (0 when α = 0, by the
                    tie rule); ``None`` in ``"full"`` mode.
    candidate:      (B,) int64 index of the chosen candidate (row of ``candidates``).
    objective:      (B, C) objective of every candidate (non-finite where the candidate overflows float32).
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


class FusedSearch(NamedTuple):
    """What a backend of the ``dlf_search`` op returns: every candidate's statistics, the chosen candidate
    (:func:`best_candidate`) and its fused logits (B, V)."""

    objective: torch.Tensor
    kl_forward: torch.Tensor
    kl_reverse: torch.Tensor
    target_forward: torch.Tensor
    target_reverse: torch.Tensor
    candidate: torch.Tensor
    logits: torch.Tensor


def validate_inputs(
    large_logits: torch.Tensor, small_logits: torch.Tensor, expert_logits: ExpertLogits
) -> torch.Tensor:
    """Check shapes, dtypes and devices; return the expert logits as one (B, T, V) tensor."""
    row_layout = "(batch, vocab)"
    check_logits(large_logits, "large_logits", ndim=2, layout=row_layout)
    check_logits(small_logits, "small_logits", ndim=2, layout=row_layout)
    if not isinstance(expert_logits, torch.Tensor):
        if isinstance(expert_logits, (str, bytes)) or not isinstance(expert_logits, Sequence):
            raise TypeError(
                "expert_logits must be a (batch, num_experts, vocab) tensor or a sequence of (batch, vocab) "
                f"tensors, got {type(expert_logits).__name__}"
            )
        if not expert_logits:
            raise ValueError("expert_logits is empty: DLF needs at least one expert (T >= 1)")
        first = expert_logits[0]
        for t, e in enumerate(expert_logits):
            check_logits(e, f"expert_logits[{t}]", ndim=2, layout=row_layout)
            if e.shape != first.shape or e.dtype != first.dtype or e.device != first.device:
                raise ValueError(
                    f"expert_logits[{t}] has shape {tuple(e.shape)}, {e.dtype} on {e.device}; expected "
                    f"{tuple(first.shape)}, {first.dtype} on {first.device} like expert_logits[0]"
                )
        expert_logits = torch.stack(list(expert_logits), dim=1)
    check_logits(expert_logits, "expert_logits", ndim=3, layout="(batch, num_experts, vocab)")
    batch, vocab = large_logits.shape
    for name, x in (("small_logits", small_logits), ("expert_logits", expert_logits)):
        if x.shape[-1] != vocab:
            raise ValueError(
                f"vocabulary mismatch: {name} has V = {x.shape[-1]} but large_logits has V = {vocab}; DLF needs "
                "models sharing one tokenizer and one logit layout (slice padded vocabularies to the shared size)"
            )
        if x.shape[0] != batch:
            raise ValueError(f"batch mismatch: {name} has B = {x.shape[0]} but large_logits has B = {batch}")
        check_same_device(large_logits, x, name, "large_logits")
    return expert_logits


def check_grid(grid) -> Tuple[float, ...]:
    """The α values as floats: a non-empty, strictly increasing sequence (or 1-D tensor) of finite numbers."""
    values = grid.tolist() if isinstance(grid, torch.Tensor) else grid
    if not isinstance(values, (list, tuple, range)):
        raise TypeError(
            f"grid must be a sequence of α values such as (0.0, 0.5, 1.0), got {type(grid).__name__} {grid!r}"
        )
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"grid must hold finite numbers, got {value!r} in {grid!r}")
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("grid is empty: give at least one α value")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"grid must be strictly increasing (it defines the tie-breaking order), got {values}")
    return values


def candidate_alphas(
    num_experts: int,
    grid: Sequence[float] = DEFAULT_GRID,
    mode: str = "single",
    dtype: torch.dtype = torch.float32,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """(C, T) coefficient vectors of the candidates, in tie-breaking order (see module doc); read-only (cached)."""
    check_choice(mode, "mode", MODES)
    check_count(num_experts, "num_experts")
    values = check_grid(grid)
    if mode == "full" and len(values) ** num_experts > MAX_FULL_CANDIDATES:
        raise ValueError(
            f"mode='full' with {len(values)} grid values and T = {num_experts} experts gives "
            f"{len(values) ** num_experts} candidates (> {MAX_FULL_CANDIDATES}); use mode='single' or a coarser grid"
        )
    return _candidates(num_experts, values, mode, dtype, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=64)
def _candidates(num_experts, values, mode, dtype, device) -> torch.Tensor:
    """Cached per (T, grid, mode, dtype, device): decoding asks every step, and a host-to-device copy per step
    would stall the GPU queue. Callers must not modify the result."""
    if mode == "single":
        rows = [[g if j == t else 0.0 for j in range(num_experts)] for g in values for t in range(num_experts)]
    else:
        rows = [list(r) for r in itertools.product(values, repeat=num_experts)]
    return torch.tensor(rows, dtype=dtype, device=device)


def best_candidate(objective: torch.Tensor) -> torch.Tensor:
    """(B,) first minimal candidate per row (our tie rule: torch's argmin returns the first minimum) among the
    candidates with a finite objective; a row with none gets 0, which :func:`raise_if_failed` reports."""
    return torch.where(objective.isfinite(), objective, math.inf).argmin(dim=1)


def finish(search: FusedSearch, candidates: torch.Tensor, mode: str) -> DLFResult:
    """The :class:`DLFResult` of a backend's search: the chosen coefficient vectors and active experts."""
    alpha = candidates.index_select(0, search.candidate)
    expert = search.candidate % candidates.shape[1] if mode == "single" else None
    return DLFResult(
        search.logits, alpha, expert, search.candidate, search.objective, search.kl_forward, search.kl_reverse,
        search.target_forward, search.target_reverse, candidates,
    )


def raise_if_failed(result: DLFResult, large: torch.Tensor, small: torch.Tensor, experts: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the cause when a row's chosen objective is not finite or its fused logits hold
    NaN/+inf (see the module doc). One host sync when nothing failed."""
    chosen = result.objective.gather(1, result.candidate.unsqueeze(1)).squeeze(1)
    failed = ~chosen.isfinite() | ~(result.logits < math.inf).all(dim=-1)  # NaN fails `<`, like +inf
    if not bool(failed.any()):
        return
    causes = (
        ("large_logits contains NaN or +inf", (large.isnan() | large.isposinf()).any(-1)),
        ("large_logits masks every token (all -inf)", (large == -math.inf).all(-1)),
        ("small_logits contains non-finite values (NaN or ±inf)", ~small.isfinite().all(-1)),
        ("expert_logits contains non-finite values (NaN or ±inf)", ~experts.isfinite().flatten(1).all(-1)),
    )
    for text, rows in causes:
        if bool(rows.any()):
            raise ValueError(f"{text} in batch rows {_rows(rows)}; DLF needs finite logits (-inf in large_logits "
                             "marks a masked token)")
    largest = max(float(x.abs().nan_to_num(posinf=0.0).max()) for x in (large, small, experts))
    raise ValueError(
        f"every DLF candidate overflows float32 in batch rows {_rows(failed)} (largest |logit| {largest:.3g}): the "
        "fused logits L + Σ_t α_t (S_t − S) or the KL objective exceed the float32 range; scale the logits down "
        "or use a grid of smaller α"
    )


def _rows(flags: torch.Tensor) -> str:
    rows = flags.nonzero().flatten().tolist()
    return f"{rows[:ROWS_SHOWN]}{' ...' if len(rows) > ROWS_SHOWN else ''}"
