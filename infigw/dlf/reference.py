"""Reference DLF candidate search: plain PyTorch, candidates materialised, KLs from their definitions.

Used by the tests and the benchmark as ground truth; computes in ``promote(input dtype, float32)`` so fp64
inputs give an fp64 ground truth. Memory is O(B · C_chunk · V): ``candidate_chunk`` bounds it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .common import (
    DEFAULT_GRID,
    DLFResult,
    ExpertLogits,
    candidate_alphas,
    nonfinite_rows,
    raise_if_nonfinite,
    select,
    validate_inputs,
)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A‖B) over the last dimension from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def dlf_reference(
    large_logits: torch.Tensor,
    small_logits: torch.Tensor,
    expert_logits: ExpertLogits,
    grid: Sequence[float] = DEFAULT_GRID,
    mode: str = "single",
    candidate_chunk: Optional[int] = None,
) -> DLFResult:
    """DLF search by brute force. Same arguments and result as :func:`infigw.dlf.dlf_search`.

    candidate_chunk: evaluate at most this many candidates at a time (default: all at once, the
    (B, C, V) tensor the fused search avoids).
    """
    experts = validate_inputs(large_logits, small_logits, expert_logits)
    if candidate_chunk is not None and candidate_chunk < 1:
        raise ValueError(f"candidate_chunk must be a positive int or None, got {candidate_chunk}")
    raise_if_nonfinite(nonfinite_rows(large_logits, small_logits, experts))
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

    candidate, alpha, expert = select(objective, candidates, mode)
    logits = L + torch.bmm(alpha.unsqueeze(1), delta).squeeze(1)
    return DLFResult(
        logits, alpha, expert, candidate, objective, kl_forward, kl_reverse, target_forward, target_reverse, candidates
    )
