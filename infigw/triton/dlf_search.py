"""Triton kernels of the fused DLF search: the ``triton`` backend of the ``dlf_search`` op (math in
:mod:`infigw.dlf.search`, checks and result type in :mod:`infigw.dlf.common`).

Three launches per call:
  1. ``_partial_kernel``  grid (B, splits, candidate blocks): reads one vocabulary range of L, S and every S_t
     once, in tiles, and keeps fp32 online accumulators (max, Σe^{x−max}, Σe^{x−max}·d) for every candidate of
     its block and for P, Q, Q_t. -inf entries of L (masked tokens) add nothing. The vocabulary is split across
     programs so small batches (decoding) still fill the GPU.
  2. ``_combine_kernel``  grid (B, candidate blocks): merges the splits, applies the KL identities, writes the
     objective, both KLs and the targets.
  3. ``_apply_kernel``    grid (B, vocabulary blocks): fused logits ``L + Σ_t alpha_t Δ_t`` of the chosen
     candidate (the argmin between 2 and 3 is one ``torch.argmin``).
Extra memory: O(B · splits · C) partials plus the (B, V) output; never (B, C, V).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dlf.common import FusedSearch, best_candidate

# Candidates handled by one program (the default single-expert search has C = 21·T ≤ 128 for T ≤ 6).
MAX_CANDIDATE_BLOCK = 128
# Partial kernel tile: (candidate block × vocabulary tile) fp32 values held in registers; 4096 per 8 warps keeps
# the sm_90 build at ~220 registers without spills (checked with cuobjdump on an AOT build for C_BLOCK 32..128).
PARTIAL_TILE_ELEMENTS = 4096
PARTIAL_NUM_WARPS = 8
# The combine kernel holds (splits × candidate block) tiles: 8 warps keep 64 × 128 at 128 registers.
COMBINE_NUM_WARPS = 8
APPLY_BLOCK_V = 1024
# Vocabulary splits: enough programs to fill the GPU, at most this many (the combine loads them all at once).
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4
# Under the interpreter (CPU tests) use several splits so the merge is exercised even at tiny V.
INTERPRET_SPLITS = 3


@triton.jit
def _online_tile(m, s, w, x, weights):
    """Add one vocabulary tile to online softmax accumulators, row-wise: running max ``m`` (R,), ``s`` = Σe^{x−m}
    (R,) and ``w`` (W,) = Σ e^{x−m}·weights, for x (R, BLOCK_V) and weights (W, BLOCK_V), W = R or R = 1. A row
    that has seen only -inf (masked tokens) is shifted by 0, not -inf, so its entries give exp(-inf) = 0, not NaN."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m - shift)
    e = tl.exp(x - shift[:, None])
    return m_new, s * scale + tl.sum(e, axis=1), w * scale + tl.sum(e * weights, axis=1)


@triton.jit
def _partial_kernel(
    L, S, E, A,
    stride_l, stride_s, stride_eb, stride_et,
    cand_part, p_part, q_part, qt_part,
    V, C, n_split,
    T: tl.constexpr, T_PAD: tl.constexpr, C_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr, TILES: tl.constexpr,
):
    # TILES (vocabulary tiles per split) is constexpr: with numpy >= 2 the interpreter cannot loop over a bound
    # derived from program ids
    row = tl.program_id(0)
    split = tl.program_id(1)
    cblk = tl.program_id(2)
    c_ids = cblk * C_BLOCK + tl.arange(0, C_BLOCK)
    c_mask = c_ids < C
    t_ids = tl.arange(0, T_PAD)
    t_mask = t_ids < T
    v_begin = split * (TILES * BLOCK_V)  # < V: no split is empty
    l_row = L + row.to(tl.int64) * stride_l
    s_row = S + row.to(tl.int64) * stride_s
    e_row = E + row.to(tl.int64) * stride_eb
    neg_inf = float("-inf")

    # candidates: online max / Σ e^{x−max} / Σ e^{x−max}·D_c
    cm = tl.full([C_BLOCK], neg_inf, tl.float32)
    cs = tl.zeros([C_BLOCK], tl.float32)
    cw = tl.zeros([C_BLOCK], tl.float32)
    # P = softmax(L) and Q = softmax(S): one row each (shared max and sum), weighted sums of every Δ_t
    pm = tl.full([1], neg_inf, tl.float32)
    ps = tl.zeros([1], tl.float32)
    pw = tl.zeros([T_PAD], tl.float32)
    qm = tl.full([1], neg_inf, tl.float32)
    qs = tl.zeros([1], tl.float32)
    qw = tl.zeros([T_PAD], tl.float32)
    # Q_t = softmax(S_t): one accumulator per expert (padded experts start at max 0 so they stay NaN-free)
    tm = tl.where(t_mask, neg_inf, 0.0)
    ts = tl.zeros([T_PAD], tl.float32)
    tw = tl.zeros([T_PAD], tl.float32)

    for tile in range(TILES):
        offs = v_begin + tile * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = offs < V
        tv_mask = t_mask[:, None] & v_mask[None, :]
        l = tl.load(l_row + offs, mask=v_mask, other=0.0).to(tl.float32)
        s = tl.load(s_row + offs, mask=v_mask, other=0.0).to(tl.float32)
        e = tl.load(e_row + t_ids[:, None] * stride_et + offs[None, :], mask=tv_mask, other=0.0).to(tl.float32)
        delta = e - s[None, :]  # (T_PAD, BLOCK_V), 0 on masked lanes
        l_m = tl.where(v_mask, l, neg_inf)
        s_m = tl.where(v_mask, s, neg_inf)
        e_m = tl.where(tv_mask, e, neg_inf)

        pm, ps, pw = _online_tile(pm, ps, pw, l_m[None, :], delta)
        qm, qs, qw = _online_tile(qm, qs, qw, s_m[None, :], delta)
        tm, ts, tw = _online_tile(tm, ts, tw, e_m, delta)

        # D_c = Σ_t a_c[t] Δ_t, one expert row at a time (re-read from L1, not extracted from `delta`)
        d = tl.zeros([C_BLOCK, BLOCK_V], tl.float32)
        for t in tl.static_range(T):
            a_t = tl.load(A + c_ids * T + t, mask=c_mask, other=0.0)
            e_t = tl.load(e_row + t * stride_et + offs, mask=v_mask, other=0.0).to(tl.float32)
            d += a_t[:, None] * (e_t - s)[None, :]
        cm, cs, cw = _online_tile(cm, cs, cw, l_m[None, :] + d, d)

    part = row.to(tl.int64) * n_split + split
    c_out = cand_part + part * 3 * C + c_ids
    tl.store(c_out, cm, mask=c_mask)
    tl.store(c_out + C, cs, mask=c_mask)
    tl.store(c_out + 2 * C, cw, mask=c_mask)
    first = cblk == 0  # row statistics: written once per (row, split)
    pq_out = part * (2 + T)
    one = tl.arange(0, 1)
    tl.store(p_part + pq_out + one, pm, mask=first)
    tl.store(p_part + pq_out + 1 + one, ps, mask=first)
    tl.store(p_part + pq_out + 2 + t_ids, pw, mask=t_mask & first)
    tl.store(q_part + pq_out + one, qm, mask=first)
    tl.store(q_part + pq_out + 1 + one, qs, mask=first)
    tl.store(q_part + pq_out + 2 + t_ids, qw, mask=t_mask & first)
    qt_out = qt_part + part * 3 * T + t_ids
    tl.store(qt_out, tm, mask=t_mask & first)
    tl.store(qt_out + T, ts, mask=t_mask & first)
    tl.store(qt_out + 2 * T, tw, mask=t_mask & first)


@triton.jit
def _merge(m, s, w, axis: tl.constexpr):
    """Merge online accumulators along ``axis`` (the splits) -> (logsumexp, weighted mean)."""
    m_all = tl.max(m, axis=axis)
    f = tl.exp(m - tl.expand_dims(m_all, axis))
    total = tl.sum(s * f, axis=axis)
    return m_all + tl.log(total), tl.sum(w * f, axis=axis) / total


@triton.jit
def _combine_kernel(
    A, cand_part, p_part, q_part, qt_part,
    objective, kl_forward, kl_reverse, target_forward, target_reverse,
    C, n_split,
    T: tl.constexpr, T_PAD: tl.constexpr, C_BLOCK: tl.constexpr, S_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    cblk = tl.program_id(1)
    c_ids = cblk * C_BLOCK + tl.arange(0, C_BLOCK)
    c_mask = c_ids < C
    t_ids = tl.arange(0, T_PAD)
    t_mask = t_ids < T
    sp = tl.arange(0, S_PAD)
    sp_mask = sp < n_split
    part = row.to(tl.int64) * n_split + sp  # (S_PAD,)
    neg_inf = float("-inf")

    # P and Q share one max/sum per split across the T weighted sums: broadcast them to (S_PAD, T_PAD)
    st_mask = sp_mask[:, None] & t_mask[None, :]
    st_zero = tl.zeros([S_PAD, T_PAD], tl.float32)
    pq = part * (2 + T)
    pm = tl.load(p_part + pq, mask=sp_mask, other=neg_inf)[:, None] + st_zero
    ps = tl.load(p_part + pq + 1, mask=sp_mask, other=0.0)[:, None] + st_zero
    pw = tl.load(p_part + pq[:, None] + 2 + t_ids[None, :], mask=st_mask, other=0.0)
    lse_l, mean_p = _merge(pm, ps, pw, 0)  # lse_l equal in every lane; mean_p = E_P[Δ_t]
    lse_l = tl.max(lse_l, axis=0)
    qm = tl.load(q_part + pq, mask=sp_mask, other=neg_inf)[:, None] + st_zero
    qs = tl.load(q_part + pq + 1, mask=sp_mask, other=0.0)[:, None] + st_zero
    qw = tl.load(q_part + pq[:, None] + 2 + t_ids[None, :], mask=st_mask, other=0.0)
    lse_s, mean_q = _merge(qm, qs, qw, 0)
    lse_s = tl.max(lse_s, axis=0)
    qt = qt_part + part[:, None] * 3 * T + t_ids[None, :]
    tm = tl.load(qt, mask=st_mask, other=neg_inf)
    ts = tl.load(qt + T, mask=st_mask, other=0.0)
    tw = tl.load(qt + 2 * T, mask=st_mask, other=0.0)
    # padded experts: max 0 / sum 1 so their (unused) lanes stay finite
    tm = tl.where(t_mask[None, :], tm, 0.0)
    ts = tl.where(t_mask[None, :], ts, 1.0)
    lse_t, mean_qt = _merge(tm, ts, tw, 0)

    target_f = mean_qt - lse_t + lse_s  # KL(Q_t‖Q)
    target_r = lse_t - lse_s - mean_q  # KL(Q‖Q_t)

    sc_mask = sp_mask[:, None] & c_mask[None, :]
    cp = cand_part + part[:, None] * 3 * C + c_ids[None, :]
    cm = tl.load(cp, mask=sc_mask, other=neg_inf)
    cs = tl.load(cp + C, mask=sc_mask, other=0.0)
    cw = tl.load(cp + 2 * C, mask=sc_mask, other=0.0)
    cm = tl.where(c_mask[None, :], cm, 0.0)  # padded candidates: finite garbage, never stored
    cs = tl.where(c_mask[None, :], cs, 1.0)
    lse_c, mean_c = _merge(cm, cs, cw, 0)

    a = tl.load(A + c_ids[:, None] * T + t_ids[None, :], mask=c_mask[:, None] & t_mask[None, :], other=0.0)
    kl_f = mean_c - lse_c + lse_l  # KL(P̃_c‖P)
    kl_r = lse_c - lse_l - tl.sum(a * mean_p[None, :], axis=1)  # KL(P‖P̃_c)
    err = (kl_f[:, None] - target_f[None, :]) * (kl_f[:, None] - target_f[None, :]) + (
        kl_r[:, None] - target_r[None, :]
    ) * (kl_r[:, None] - target_r[None, :])
    obj = tl.sum(tl.where(t_mask[None, :], err, 0.0), axis=1)

    out = row.to(tl.int64) * C + c_ids
    tl.store(objective + out, obj, mask=c_mask)
    tl.store(kl_forward + out, kl_f, mask=c_mask)
    tl.store(kl_reverse + out, kl_r, mask=c_mask)
    t_out = row.to(tl.int64) * T + t_ids
    tl.store(target_forward + t_out, target_f, mask=t_mask & (cblk == 0))
    tl.store(target_reverse + t_out, target_r, mask=t_mask & (cblk == 0))


@triton.jit
def _apply_kernel(
    L, S, E, alpha, out,
    stride_l, stride_s, stride_eb, stride_et,
    V,
    T: tl.constexpr, T_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs < V
    t_ids = tl.arange(0, T_PAD)
    t_mask = t_ids < T
    a = tl.load(alpha + row.to(tl.int64) * T + t_ids, mask=t_mask, other=0.0)
    l = tl.load(L + row.to(tl.int64) * stride_l + offs, mask=v_mask, other=0.0).to(tl.float32)
    s = tl.load(S + row.to(tl.int64) * stride_s + offs, mask=v_mask, other=0.0).to(tl.float32)
    e = tl.load(
        E + row.to(tl.int64) * stride_eb + t_ids[:, None] * stride_et + offs[None, :],
        mask=t_mask[:, None] & v_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    x = l + tl.sum(a[:, None] * (e - s[None, :]), axis=0)
    tl.store(out + row.to(tl.int64) * V + offs, x, mask=v_mask)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _num_splits(batch: int, num_cblocks: int, vocab: int, block_v: int, device: torch.device) -> int:
    tiles = triton.cdiv(vocab, block_v)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(PROGRAMS_PER_SM * sms, batch * num_cblocks)
    else:
        wanted = INTERPRET_SPLITS
    return max(1, min(wanted, MAX_SPLITS, tiles))


def candidate_stats(L: torch.Tensor, S: torch.Tensor, E: torch.Tensor, candidates: torch.Tensor, num_splits=None):
    """Objective, KLs and targets of every candidate. Inputs already validated.

    num_splits: vocabulary splits per row (default: enough programs for the device); tests vary it.
    """
    L, S, E = _last_dim_contiguous(L), _last_dim_contiguous(S), _last_dim_contiguous(E)
    batch, vocab = L.shape
    num_t = E.shape[1]
    num_c = candidates.shape[0]
    c_block = min(MAX_CANDIDATE_BLOCK, triton.next_power_of_2(num_c))
    num_cblocks = triton.cdiv(num_c, c_block)
    t_pad = triton.next_power_of_2(num_t)
    block_v = PARTIAL_TILE_ELEMENTS // max(c_block, t_pad)
    n_split = num_splits or _num_splits(batch, num_cblocks, vocab, block_v, L.device)
    # equal vocabulary ranges, whole tiles each, none empty
    tiles = triton.cdiv(triton.cdiv(vocab, n_split), block_v)
    n_split = triton.cdiv(vocab, tiles * block_v)
    dev = L.device
    a = candidates.to(device=dev, dtype=torch.float32).contiguous()
    cand_part = torch.empty(batch, n_split, 3, num_c, device=dev, dtype=torch.float32)
    p_part = torch.empty(batch, n_split, 2 + num_t, device=dev, dtype=torch.float32)
    q_part = torch.empty_like(p_part)
    qt_part = torch.empty(batch, n_split, 3, num_t, device=dev, dtype=torch.float32)
    _partial_kernel[(batch, n_split, num_cblocks)](
        L, S, E, a,
        L.stride(0), S.stride(0), E.stride(0), E.stride(1),
        cand_part, p_part, q_part, qt_part,
        vocab, num_c, n_split,
        T=num_t, T_PAD=t_pad, C_BLOCK=c_block, BLOCK_V=block_v, TILES=tiles,
        num_warps=PARTIAL_NUM_WARPS,
    )
    objective = torch.empty(batch, num_c, device=dev, dtype=torch.float32)
    kl_forward = torch.empty_like(objective)
    kl_reverse = torch.empty_like(objective)
    target_forward = torch.empty(batch, num_t, device=dev, dtype=torch.float32)
    target_reverse = torch.empty_like(target_forward)
    _combine_kernel[(batch, num_cblocks)](
        a, cand_part, p_part, q_part, qt_part,
        objective, kl_forward, kl_reverse, target_forward, target_reverse,
        num_c, n_split,
        T=num_t, T_PAD=t_pad, C_BLOCK=c_block, S_PAD=triton.next_power_of_2(n_split),
        num_warps=COMBINE_NUM_WARPS,
    )
    return objective, kl_forward, kl_reverse, target_forward, target_reverse


def fused_logits(L: torch.Tensor, S: torch.Tensor, E: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(B, V) fp32 fused logits ``L + Σ_t alpha[:, t] (E[:, t] − S)``."""
    L, S, E = _last_dim_contiguous(L), _last_dim_contiguous(S), _last_dim_contiguous(E)
    batch, vocab = L.shape
    num_t = E.shape[1]
    out = torch.empty(batch, vocab, device=L.device, dtype=torch.float32)
    _apply_kernel[(batch, triton.cdiv(vocab, APPLY_BLOCK_V))](
        L, S, E, alpha.float().contiguous(), out,
        L.stride(0), S.stride(0), E.stride(0), E.stride(1),
        vocab,
        T=num_t, T_PAD=triton.next_power_of_2(num_t), BLOCK_V=APPLY_BLOCK_V,
    )
    return out


def dlf_search(L: torch.Tensor, S: torch.Tensor, E: torch.Tensor, candidates: torch.Tensor) -> FusedSearch:
    """The ``triton`` backend of ``dlf_search``; inputs already validated (see :func:`infigw.dlf.dlf_search`)."""
    objective, kl_forward, kl_reverse, target_forward, target_reverse = candidate_stats(L, S, E, candidates)
    candidate = best_candidate(objective)
    logits = fused_logits(L, S, E, candidates.index_select(0, candidate))
    return FusedSearch(objective, kl_forward, kl_reverse, target_forward, target_reverse, candidate, logits)
