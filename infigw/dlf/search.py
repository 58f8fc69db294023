"""Fused DLF candidate search: every candidate's two KLs from one online pass over the vocabulary.

Why one pass suffices. For a candidate with logits ``x_c = L + D_c`` (``D_c = Σ_t a_c[t] Δ_t``) and
``lse_c = logsumexp(x_c)``, ``lse_L = logsumexp(L)``:

    log P̃_c − log P = D_c − lse_c + lse_L
    KL(P̃_c‖P) = E_{P̃_c}[D_c] − lse_c + lse_L
    KL(P‖P̃_c) = lse_c − lse_L − E_P[D_c] = lse_c − lse_L − Σ_t a_c[t] E_P[Δ_t]

and likewise for the targets, with ``lse_S``, ``lse_t = logsumexp(S_t)``:

    KL(Q_t‖Q) = E_{Q_t}[Δ_t] − lse_t + lse_S,     KL(Q‖Q_t) = lse_t − lse_S − E_Q[Δ_t].

So per candidate only ``lse_c`` and the softmax-weighted mean ``E_{P̃_c}[D_c]`` are needed, plus per row
``lse_L, lse_S, lse_t`` and the means ``E_P[Δ_t], E_Q[Δ_t], E_{Q_t}[Δ_t]``. Each is an online
(max, Σ e^{x−max}, Σ e^{x−max}·d) accumulation over vocabulary tiles, in fp32, merged across tiles/splits by
rescaling to the common max. Nothing of size (B, C, V) is ever stored.

Backends (op ``"dlf_search"`` of :mod:`infigw.dispatch`): ``"torch"`` here, vectorised over (rows × candidates ×
vocabulary-chunk) tiles of bounded size, any device; ``"triton"`` in :mod:`infigw.triton.dlf_search`. ``"auto"``
takes Triton on CUDA and torch on CPU; ``INFIGW_BACKEND`` overrides it as for every op.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from .. import dispatch
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

# Elements of one (rows, C, vocabulary-chunk) tile of the torch path: TORCH_TILE_FACTOR · B · V (at least
# TORCH_MIN_TILE), so its extra memory stays O(B·V) while the number of tiles (≈ C / factor) and thus of
# op launches stays small — on a loaded CPU each op launch costs milliseconds of thread wake-up.
TORCH_TILE_FACTOR = 8
TORCH_MIN_TILE = 1 << 22
# Smallest vocabulary chunk of the torch path (keeps its inner loops vectorised).
TORCH_MIN_VOCAB_CHUNK = 256


def finite_shift(m: torch.Tensor) -> torch.Tensor:
    """A running max to subtract before ``exp``: -inf (every token so far masked) becomes 0, so the masked
    entries give exp(-inf) = 0 instead of exp(-inf - (-inf)) = NaN."""
    return m.masked_fill(m == -math.inf, 0.0)


def merge_online(m, s, w, m_part, s_part, w_part):
    """Merge two online-softmax accumulators (max, Σe^{x−max}, Σe^{x−max}·d) elementwise."""
    m_new = torch.maximum(m, m_part)
    shift = finite_shift(m_new)
    old, new = (m - shift).exp(), (m_part - shift).exp()
    return m_new, s * old + s_part * new, w * old + w_part * new


def objective_from_stats(
    lse_c, mean_c, lse_l, mean_p, lse_s, mean_q, lse_t, mean_qt, candidates
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The identities in the module doc. Shapes: lse_c, mean_c (B, C); lse_l, lse_s (B,); mean_p, mean_q,
    lse_t, mean_qt (B, T); candidates (C, T). Returns (objective, kl_forward, kl_reverse, target_f, target_r)."""
    target_forward = mean_qt - lse_t + lse_s.unsqueeze(1)
    target_reverse = lse_t - lse_s.unsqueeze(1) - mean_q
    kl_forward = mean_c - lse_c + lse_l.unsqueeze(1)
    kl_reverse = lse_c - lse_l.unsqueeze(1) - mean_p @ candidates.T
    objective = (
        (kl_forward.unsqueeze(2) - target_forward.unsqueeze(1)).square()
        + (kl_reverse.unsqueeze(2) - target_reverse.unsqueeze(1)).square()
    ).sum(dim=2)
    return objective, kl_forward, kl_reverse, target_forward, target_reverse


def _softmax_stats(x: torch.Tensor, d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp(x), E_softmax(x)[d]) over the last dim; ``d`` broadcasts against ``x``."""
    lse = x.logsumexp(-1)
    return lse, ((x - lse.unsqueeze(-1)).exp() * d).sum(-1)


def search_torch(L: torch.Tensor, S: torch.Tensor, E: torch.Tensor, candidates: torch.Tensor) -> FusedSearch:
    """The ``torch`` backend of ``dlf_search``; inputs already validated."""
    batch, vocab = L.shape
    num_c, num_t = candidates.shape
    L, S, E = L.float(), S.float(), E.float()
    delta = E - S.unsqueeze(1)  # (B, T, V): O(B·T·V), never (B, C, V)
    lse_l, mean_p = _softmax_stats(L.unsqueeze(1), delta)
    lse_s, mean_q = _softmax_stats(S.unsqueeze(1), delta)
    lse_t, mean_qt = _softmax_stats(E, delta)

    tile = max(TORCH_MIN_TILE, TORCH_TILE_FACTOR * batch * vocab)
    chunk_v = min(vocab, max(TORCH_MIN_VOCAB_CHUNK, tile // (batch * num_c)))
    rows = max(1, tile // (num_c * chunk_v))
    lse_c = torch.empty(batch, num_c, device=L.device)
    mean_c = torch.empty_like(lse_c)
    for r0 in range(0, batch, rows):
        r1 = min(batch, r0 + rows)
        coef = candidates.expand(r1 - r0, num_c, num_t)
        m = torch.full((r1 - r0, num_c), float("-inf"), device=L.device)
        s = torch.zeros_like(m)
        w = torch.zeros_like(m)
        for v0 in range(0, vocab, chunk_v):
            d_tile = delta[r0:r1, :, v0 : v0 + chunk_v]
            x = torch.baddbmm(L[r0:r1, None, v0 : v0 + chunk_v], coef, d_tile)  # L + D_c, (rows, C, chunk)
            m_part = x.amax(-1)
            e = x.sub_(finite_shift(m_part).unsqueeze(-1)).exp_()
            # Σ_v e·D_c = Σ_t a_c[t] Σ_v e·Δ_t: one batched GEMM instead of another pass over the tile
            w_part = (torch.bmm(e, d_tile.transpose(1, 2)) * coef).sum(-1)
            m, s, w = merge_online(m, s, w, m_part, e.sum(-1), w_part)
        lse_c[r0:r1] = m + s.log()
        mean_c[r0:r1] = w / s
    objective, kl_f, kl_r, tgt_f, tgt_r = objective_from_stats(
        lse_c, mean_c, lse_l.squeeze(1), mean_p, lse_s.squeeze(1), mean_q, lse_t, mean_qt, candidates
    )
    candidate = best_candidate(objective)
    alpha = candidates.index_select(0, candidate)
    logits = L + torch.bmm(alpha.unsqueeze(1), delta).squeeze(1)
    return FusedSearch(objective, kl_f, kl_r, tgt_f, tgt_r, candidate, logits)


dispatch.register("torch", "dlf_search", search_torch)


def dlf_search(
    large_logits: torch.Tensor,
    small_logits: torch.Tensor,
    expert_logits: ExpertLogits,
    grid: Sequence[float] = DEFAULT_GRID,
    mode: str = "single",
    backend: str = "auto",
    check_finite: bool = True,
) -> DLFResult:
    """Choose the DLF coefficients per row and return the fused logits (see :class:`DLFResult`).

    large_logits (B, V), small_logits (B, V), expert_logits (B, T, V) or a list of T (B, V) tensors; any float
    dtype, computed in fp32. ``-inf`` in large_logits marks a masked token (it stays masked).
    ``grid``: strictly increasing α values (default: the paper's 0.0, 0.1, …, 2.0).
    ``mode``: ``"single"`` (one active expert per step, C = G·T) or ``"full"`` (C = G**T, small T only).
    ``backend``: ``"auto"`` or a name of :data:`infigw.dispatch.BACKENDS` (``"torch"``, ``"triton"`` implement it);
    one that cannot run raises :class:`infigw.dispatch.BackendUnavailableError`. ``check_finite``: raise
    ``ValueError`` when a row has no finite result (NaN/inf inputs, every candidate overflowing float32); costs one
    host sync. With False such rows come back with non-finite objectives and logits.
    """
    experts = validate_inputs(large_logits, small_logits, expert_logits)
    candidates = candidate_alphas(experts.shape[1], grid, mode, device=large_logits.device)
    _, implementation = dispatch.resolve("dlf_search", backend, large_logits.device)
    result = finish(implementation(large_logits, small_logits, experts, candidates), candidates, mode)
    if check_finite:
        raise_if_failed(result, large_logits, small_logits, experts)
    return result
