"""Reference DLF candidate search: plain PyTorch, candidates materialised, KLs from their definitions.

Used by the tests and the benchmark as ground truth; computes in ``promote(input dtype, float32)`` so fp64
inputs give an fp64 ground truth. Memory is O(B · C_chunk · V): ``candidate_chunk`` bounds it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..checks import check_optional_count
from .common import (
    DEFAULT_GRID,
    DLFResult,
    ExpertLogits,
    FusedSearch,
    best_candidate,
    candidate_alphas,
    finish,
    raise_if_failed,
    validate_inputs,
)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A‖B) over the last dimension from log-probabilities; tokens with A = 0 add 0 (masked tokens have
    log A = log B = -inf, whose difference is NaN)."""
    return torch.where(log_a == -math.inf, 0.0, log_a.exp() * (log_a - log_b)).sum(dim=-1)


def dlf_reference(
    large_logits: torch.Tensor,
    small_logits: torch.Tensor,
    expert_logits: ExpertLogits,
    grid: Sequence[float] = DEFAULT_GRID,
    mode: str = "single",
    candidate_chunk: Optional[int] = None,
) -> DLFResult:
    """DLF search by brute force. Same arguments, result and errors as :func:`infigw.dlf.dlf_search`.

    candidate_chunk: evaluate at most this many candidates at a time (default: all at once, the
    (B, C, V) tensor the fused search avoids).
    """
    experts = validate_inputs(large_logits, small_logits, expert_logits)
    check_optional_count(candidate_chunk, "candidate_chunk")
    dtype = torch.promote_types(
        torch.promote_types(large_logits.dtype, small_logits.dtype),
        torch.promote_types(experts.dtype, torch.float32),
    )
    L, S, E = large_logits.to(dtype), small_logits.to(dtype), experts.to(dtype)
    candidates = candidate_alphas(E.shape[1], grid, mode, dtype=dtype, device=L.device)

    log_p, log_q, log_qt = L.log_softmax(-1), S.log_softmax(-1), E.log_softmax(-1)
    target_forward = _kl(log_qt, log_q.unsqueeze(1))  # KL(Q_t‖Q)
    target_reverse = _kl(log_q.unsqueeze(1), log_qt)  # KL(Q‖Q_t)
    delta = E - S.unsqueeze(1)  # (B, T, V)

    chunk = candidate_chunk or candidates.shape[0]
    kl_forward, kl_reverse = [], []
    for a in candidates.split(chunk):
        log_pc = (L.unsqueeze(1) + torch.matmul(a, delta)).log_softmax(-1)  # (B, c, V) materialised
        kl_forward.append(_kl(log_pc, log_p.unsqueeze(1)))
        kl_reverse.append(_kl(log_p.unsqueeze(1), log_pc))
    kl_forward, kl_reverse = torch.cat(kl_forward, 1), torch.cat(kl_reverse, 1)
    objective = (
        (kl_forward.unsqueeze(2) - target_forward.unsqueeze(1)).square()
        + (kl_reverse.unsqueeze(2) - target_reverse.unsqueeze(1)).square()
    ).sum(dim=2)

    candidate = best_candidate(objective)
    logits = L + torch.bmm(candidates.index_select(0, candidate).unsqueeze(1), delta).squeeze(1)
    result = finish(
        FusedSearch(objective, kl_forward, kl_reverse, target_forward, target_reverse, candidate, logits),
        candidates, mode,
    )
    raise_if_failed(result, large_logits, small_logits, experts)
    return result
