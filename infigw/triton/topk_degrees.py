"""Fused top-k selection -> value transform -> per-graph degrees, in Triton (forward and backward).

Forward, one program per row (``_topk_rows_kernel``):
  * streams the row in ``BLOCK_V`` vocabulary tiles (int64 row offsets) and keeps a running top-k as packed
    int64 keys ``(order-preserving int32 of the fp32 value) << 32 | (2^32 - 1 - id)``: comparing keys is
    exactly the contract's rank order (value descending, then smaller id; NaN above every number, -0 == +0);
  * selection is threshold-gated: a tile costs one (NaN-propagating) max-reduction of its values unless
    one of its entries beats the current k-th key; then its candidates are inserted one at a time, largest
    first (one max-reduction over the tile and one min over the k kept keys each, at most k per tile). On
    a row in random order about ``k * (1 + ln(V / BLOCK_V))`` insertions happen in all, so the pass stays
    close to a streaming read; the worst case (an increasing row) costs k insertions per tile. We chose
    this (ours) over a per-tile bitonic top-k (``tl.topk``) merged into the running set, whose
    O(B log^2 B) sorting network would run on every tile and make the pass compute-bound, and over radix
    selection, which reads the row twice;
  * ``values="probs"`` computes the row's logsumexp online in the same pass;
  * for ``mean``/``sum`` without ``deterministic`` the kernel ends by atomically adding ``a_p[i] * s_p / c_g``
    into the degrees. ``cosine`` (a cross-row diagonal first) and ``deterministic=True`` run the O(N k)
    aggregation kernel instead, which, when deterministic, writes per-slot contributions that a stable sort
    by (graph, node) and a sequential segment sum reduce in row order (bitwise reproducible).
Backward: per-row gradient of the kept values (O(N k)), then the logits gradient: zero-fill + scatter of the
k entries (``logits``/``topk_probs``; the only full-size write is the memset), or one dense streaming pass
``-p_j * C_p / T`` plus the scatter-add of the k-sparse part (``probs``). No in-place reuse of the logits
buffer: callers such as a cross-entropy term usually still need the logits.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..contract import NODES, NORMS, VALUES, TopKDegrees

#: Largest k the Triton backend accepts (the running top-k lives in registers).
MAX_K = 1024
#: Launch shape of the streaming kernels: logits bytes per vocabulary tile and warps per program. Chosen by
#: measurement (benchmarks/RESULTS.md, H100, B*T=16384, V=151936, k=10, bf16): 4 KiB / 4 warps ran forward +
#: backward in 4.95 ms against 6.62 ms for 8 KiB / 8 warps; ``benchmarks/bench_gld_gpu.py`` re-times the sweep.
TILE_BYTES = 4096
NUM_WARPS = 4
# Upper bound of the tile width; a module global so the interpreter tests can force several tiles per row.
_MAX_BLOCK_V = 16384
_SEGMENT_BLOCK = 128

_I32_MIN = tl.constexpr(-2147483648)
_I64_MIN = tl.constexpr(-9223372036854775808)
_I64_MAX = tl.constexpr(9223372036854775807)
_NAN_KEY = tl.constexpr(0x7FC00000)  # order key of the canonical NaN: above +inf (0x7F800000)
_LOW32 = tl.constexpr(0xFFFFFFFF)

_MODE_DEGREES, _MODE_DIAG, _MODE_COSINE, _MODE_COSINE_GRAD = 0, 1, 2, 3


@triton.jit
def _order_key(x):
    """int32 that orders like the fp32 ``x``: NaN largest (one canonical NaN), -0 == +0."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(x == 0.0, 0, key)
    return tl.where(x != x, _NAN_KEY, key)


@triton.jit
def _from_order_key(key):
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _max_with_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _logsumexp_step(run_max, run_sum, x, x_max, scale):
    """One tile of an online logsumexp of x * scale (x_max: the tile's maximum); returns the new (max, sum)."""
    new_max = tl.maximum(run_max, x_max * scale)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    return new_max, run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x * scale - shift))


@triton.jit
def _insert_tile(x, ids, inside, best, lowest, in_k):
    """Inserts a tile's entries that beat the k-th kept key into the kept keys ``best``, largest first: the tile
    packs its keys with its ids, then one max-reduction over the tile and one min over the kept keys per
    insertion. Returns the kept keys and the new k-th one."""
    packed = tl.where(inside, (_order_key(x).to(tl.int64) << 32) | (_LOW32 - ids.to(tl.int64)), _I64_MIN)
    pick = tl.max(packed)
    while pick > lowest:
        best = tl.where(best == lowest, pick, best)
        lowest = tl.min(tl.where(in_k, best, _I64_MAX))
        pick = tl.max(tl.where((packed > lowest) & (packed < pick), packed, _I64_MIN))
    return best, lowest


@triton.jit
def _topk_rows_kernel(
    x_ptr, x_row_stride, vocab, row_graph_ptr, scale_ptr,
    kept_val_ptr, kept_id_ptr, lse_ptr, deg_ptr, touched_ptr, num_nodes, inv_temp,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
    VALUES_MODE: tl.constexpr, RANK_NODES: tl.constexpr, SCATTER: tl.constexpr,
):
    inv_temp = tl.cast(inv_temp, tl.float32)  # torch.compile passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    graph = tl.load(row_graph_ptr + row)
    slot = tl.arange(0, K_PAD)
    in_k = slot < K
    # Distinct sentinels below every real key (no real value has order key INT32_MIN).
    best = tl.full([K_PAD], _I64_MIN, tl.int64) + slot
    lowest = tl.min(tl.where(in_k, best, _I64_MAX))  # the current k-th kept key
    threshold = (lowest >> 32).to(tl.int32)  # ... and its value's order key
    run_max = float("-inf")
    run_sum = 0.0
    # The next tile's load is issued before the current tile is processed (software prefetch).
    x_next = tl.load(x_row + tl.arange(0, BLOCK_V), mask=tl.arange(0, BLOCK_V) < vocab, other=0.0)
    for start in range(0, vocab, BLOCK_V):
        ids = start + tl.arange(0, BLOCK_V)
        inside = ids < vocab
        x = tl.where(inside, x_next.to(tl.float32), float("-inf"))
        x_next = tl.load(x_row + BLOCK_V + ids, mask=ids + BLOCK_V < vocab, other=0.0)
        # One reduction per tile (NaN-propagating max): it gates the insertions and, for probs, rescales
        # the online logsumexp. The integer keys are only formed in gated tiles.
        x_max = tl.reduce(x, 0, _max_with_nan)
        if VALUES_MODE == 1:  # online logsumexp of x / T
            run_max, run_sum = _logsumexp_step(run_max, run_sum, x, x_max, inv_temp)
        # Later tiles have larger ids, so an entry equal to the threshold value loses the tie: comparing
        # values is an exact gate.
        if _order_key(x_max) > threshold:
            best, lowest = _insert_tile(x, ids, inside, best, lowest, in_k)
            threshold = (lowest >> 32).to(tl.int32)
    best = tl.sort(best, descending=True)  # k <= V: the first K slots are real keys, in rank order
    kept_x = _from_order_key((best >> 32).to(tl.int32))
    kept_id = _LOW32 - (best & _LOW32)

    valid = graph >= 0
    if VALUES_MODE == 0:
        a = kept_x
    elif VALUES_MODE == 1:
        lse = run_max + tl.log(run_sum)
        tl.store(lse_ptr + row, lse)
        a = tl.exp(kept_x * inv_temp - lse)
    else:
        t = tl.where(in_k, kept_x * inv_temp, float("-inf"))
        e = tl.exp(t - tl.max(t))
        a = e / tl.sum(tl.where(in_k, e, 0.0))
    a = tl.where(in_k & valid, a, 0.0)
    tl.store(kept_val_ptr + row * K + slot, a, mask=in_k)
    tl.store(kept_id_ptr + row * K + slot, kept_id, mask=in_k)
    if SCATTER:
        live = in_k & valid
        scale = tl.load(scale_ptr + graph, mask=valid, other=0.0)
        if RANK_NODES:
            dst = graph * num_nodes + slot
        else:
            dst = graph * num_nodes + kept_id
        tl.atomic_add(deg_ptr + dst, a * (tl.sum(a) * scale), mask=live, sem="relaxed")
        tl.store(touched_ptr + dst, 1, mask=live)


@triton.jit
def _load_kept_row(kept_val_ptr, kept_id_ptr, row_graph_ptr, row, num_nodes,
                   K: tl.constexpr, K_PAD: tl.constexpr, RANK_NODES: tl.constexpr):
    """One row's kept values and their flat (graph, node) destinations; padding slots and masked rows
    (graph < 0) load 0 and are not ``live``."""
    slot = tl.arange(0, K_PAD)
    in_k = slot < K
    graph = tl.load(row_graph_ptr + row)
    valid = graph >= 0
    live = in_k & valid
    a = tl.load(kept_val_ptr + row * K + slot, mask=live, other=0.0)
    if RANK_NODES:
        node = slot.to(tl.int64)
    else:
        node = tl.load(kept_id_ptr + row * K + slot, mask=live, other=0)
    return slot, in_k, graph, valid, live, a, graph * num_nodes + node


@triton.jit
def _cosine_weight(diag):
    """D^-1/2 of the cosine normalisation, 0 for nodes never touched (D = 0)."""
    return tl.where(diag > 0.0, tl.rsqrt(tl.where(diag > 0.0, diag, 1.0)), 0.0)


@triton.jit
def _aggregate_kernel(
    kept_val_ptr, kept_id_ptr, row_graph_ptr, scale_ptr, diag_ptr, grad_deg_ptr,
    out_ptr, touched_ptr, contrib_ptr, key_ptr, num_nodes, num_graphs,
    K: tl.constexpr, K_PAD: tl.constexpr, RANK_NODES: tl.constexpr, MODE: tl.constexpr,
    DETERMINISTIC: tl.constexpr, WRITE_TOUCHED: tl.constexpr,
):
    """Per-slot contributions of one row, added into ``out`` (G, num_nodes) or written for a segment sum.

    MODE 0: a * s_p * scale_g (mean/sum degrees); 1: a^2 (cosine diagonal D); 2: ã * sum(ã) with
    ã = a * D^-1/2 (cosine degrees); 3: u * a with u = dL/dã (cosine backward, the sum Z over a node).
    """
    row = tl.program_id(0).to(tl.int64)
    slot, in_k, graph, valid, live, a, dst = _load_kept_row(
        kept_val_ptr, kept_id_ptr, row_graph_ptr, row, num_nodes, K, K_PAD, RANK_NODES)
    if MODE == 0:
        contrib = a * (tl.sum(a) * tl.load(scale_ptr + graph, mask=valid, other=0.0))
    elif MODE == 1:
        contrib = a * a
    else:
        diag = tl.load(diag_ptr + dst, mask=live, other=0.0)
        w = _cosine_weight(diag)
        aw = a * w
        if MODE == 2:
            contrib = aw * tl.sum(aw)
        else:
            gd = tl.load(grad_deg_ptr + dst, mask=live, other=0.0)
            contrib = (gd * tl.sum(aw) + tl.sum(gd * aw)) * a
    if DETERMINISTIC:
        tl.store(contrib_ptr + row * K + slot, contrib, mask=in_k)
        tl.store(key_ptr + row * K + slot, tl.where(live, dst, num_graphs * num_nodes), mask=in_k)
    else:
        tl.atomic_add(out_ptr + dst, contrib, mask=live, sem="relaxed")
    if WRITE_TOUCHED:
        tl.store(touched_ptr + dst, 1, mask=live)


@triton.jit
def _segment_sum_kernel(sorted_key_ptr, perm_ptr, end_ptr, contrib_ptr, out_ptr, segment_ptr, total, sentinel,
                        BLOCK: tl.constexpr, COMPACT: tl.constexpr):
    """Sum of the contributions of each run of equal sorted keys, added in sorted (= row) order; stored at
    ``out[key]``, or at ``out[segment_ptr[run start]]`` when COMPACT."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pos < total
    key = tl.load(sorted_key_ptr + pos, mask=inside, other=sentinel)
    prev = tl.load(sorted_key_ptr + pos - 1, mask=inside & (pos > 0), other=-1)
    head = inside & (key != prev) & (key < sentinel)
    length = tl.where(head, tl.load(end_ptr + pos, mask=head, other=0) - pos, 0)
    acc = tl.zeros([BLOCK], tl.float32)
    for j in range(0, tl.max(length)):
        take = j < length
        src = tl.load(perm_ptr + pos + j, mask=take, other=0)
        acc += tl.load(contrib_ptr + src, mask=take, other=0.0)
    if COMPACT:
        dst = tl.load(segment_ptr + pos, mask=head, other=0)
    else:
        dst = key
    tl.store(out_ptr + dst, acc, mask=head)


@triton.jit
def _grad_rows_kernel(
    kept_val_ptr, kept_id_ptr, row_graph_ptr, scale_ptr, diag_ptr, z_ptr, grad_deg_ptr,
    grad_kept_ptr, coef_ptr, num_nodes, inv_temp,
    K: tl.constexpr, K_PAD: tl.constexpr, VALUES_MODE: tl.constexpr, RANK_NODES: tl.constexpr,
    COSINE: tl.constexpr,
):
    """dL/dx at the k kept entries of one row (and, for probs, the dense coefficient C_p / T)."""
    inv_temp = tl.cast(inv_temp, tl.float32)  # torch.compile passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    slot, in_k, graph, valid, live, a, dst = _load_kept_row(
        kept_val_ptr, kept_id_ptr, row_graph_ptr, row, num_nodes, K, K_PAD, RANK_NODES)
    gd = tl.load(grad_deg_ptr + dst, mask=live, other=0.0)
    if COSINE:
        diag = tl.load(diag_ptr + dst, mask=live, other=0.0)
        w = _cosine_weight(diag)
        aw = a * w
        u = gd * tl.sum(aw) + tl.sum(gd * aw)
        z = tl.load(z_ptr + dst, mask=live, other=0.0)
        grad_a = w * u - w * w * w * a * z
    else:
        scale = tl.load(scale_ptr + graph, mask=valid, other=0.0)
        grad_a = scale * (gd * tl.sum(a) + tl.sum(gd * a))
    grad_a = tl.where(live, grad_a, 0.0)
    if VALUES_MODE == 0:
        grad_x = grad_a
    elif VALUES_MODE == 1:
        grad_x = inv_temp * grad_a * a
        tl.store(coef_ptr + row, inv_temp * tl.sum(grad_a * a))
    else:
        grad_x = inv_temp * a * (grad_a - tl.sum(a * grad_a))
    tl.store(grad_kept_ptr + row * K + slot, grad_x, mask=in_k)


@triton.jit
def _probs_dense_grad_kernel(x_ptr, x_row_stride, grad_ptr, lse_ptr, coef_ptr, row_graph_ptr, vocab, inv_temp,
                             BLOCK_V: tl.constexpr):
    """grad[j] = -p_j * C_p / T over the whole row (the k-sparse part is added by the scatter kernel)."""
    inv_temp = tl.cast(inv_temp, tl.float32)  # torch.compile passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    valid = tl.load(row_graph_ptr + row) >= 0
    lse = tl.load(lse_ptr + row)
    coef = tl.where(valid, tl.load(coef_ptr + row), 0.0)
    for start in range(0, vocab, BLOCK_V):
        ids = start + tl.arange(0, BLOCK_V)
        inside = ids < vocab
        x = tl.load(x_ptr + row * x_row_stride + ids, mask=inside, other=0.0).to(tl.float32)
        g = tl.where(valid, -coef * tl.exp(x * inv_temp - lse), 0.0)
        tl.store(grad_ptr + row * vocab + ids, g.to(grad_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _scatter_grad_kernel(grad_ptr, vocab, kept_id_ptr, grad_kept_ptr, row_graph_ptr,
                         K: tl.constexpr, K_PAD: tl.constexpr, ACCUMULATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, K_PAD)
    live = (slot < K) & (tl.load(row_graph_ptr + row) >= 0)
    ids = tl.load(kept_id_ptr + row * K + slot, mask=live, other=0)
    g = tl.load(grad_kept_ptr + row * K + slot, mask=live, other=0.0)
    dst = grad_ptr + row * vocab + ids
    if ACCUMULATE:
        g += tl.load(dst, mask=live, other=0.0).to(tl.float32)
    tl.store(dst, g.to(grad_ptr.dtype.element_ty), mask=live)


# ----------------------------------------------------------------------------------------------- launchers

#: True when TRITON_INTERPRET=1 was set at import: the kernels then run in Python, on CPU tensors.
INTERPRETED = not isinstance(_topk_rows_kernel, triton.runtime.JITFunction)


def _pad(k: int) -> int:
    return triton.next_power_of_2(k)


def _vocab_block(vocab: int, dtype: torch.dtype) -> Tuple[int, int]:
    """(tile width, warps): TILE_BYTES of logits per tile, fewer warps for short rows."""
    block = min(_MAX_BLOCK_V, TILE_BYTES // dtype.itemsize, max(16, triton.next_power_of_2(vocab)))
    return block, NUM_WARPS if block >= 1024 else 4


def _row_scale(row_graph: torch.Tensor, num_graphs: int, norm_mode: int) -> torch.Tensor:
    """1 / c_g per graph: c_g = number of valid rows for ``mean`` (at least 1), else 1."""
    if norm_mode != NORMS["mean"]:
        return torch.ones(num_graphs, dtype=torch.float32, device=row_graph.device)
    slot = torch.where(row_graph >= 0, row_graph, num_graphs)
    rows = torch.zeros(num_graphs + 1, dtype=torch.int64, device=row_graph.device)
    rows.scatter_add_(0, slot, torch.ones_like(slot))
    return 1.0 / rows[:num_graphs].clamp_min(1).to(torch.float32)


def segment_sum(contrib: torch.Tensor, keys: torch.Tensor, sentinel: int, out=None):
    """Deterministic sums of ``contrib`` over equal ``keys`` (entries with key >= ``sentinel`` are dropped).

    The stable sort fixes the order of every sum (the order of the entries), so the result is bitwise
    reproducible. With ``out`` (a zero f32 tensor of ``sentinel`` elements) ``out.view(-1)[key]`` receives the
    sums (no host sync); without, returns ``(distinct keys ascending, sums)`` (one host sync for their count).
    """
    total = keys.numel()
    sorted_keys, perm = torch.sort(keys, stable=True)
    ends = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    segments = None
    if out is None:
        distinct, segments = torch.unique_consecutive(sorted_keys, return_inverse=True)
        distinct = distinct[distinct < sentinel]
        out = torch.zeros(distinct.numel(), dtype=torch.float32, device=keys.device)
    if total:
        wrap_triton(_segment_sum_kernel)[(triton.cdiv(total, _SEGMENT_BLOCK),)](
            sorted_keys, perm, ends, contrib, out, segments if segments is not None else perm, total, sentinel,
            BLOCK=_SEGMENT_BLOCK, COMPACT=segments is not None)
    return out if segments is None else (distinct, out)


def _aggregate(mode, kept_values, kept_ids, row_graph, num_graphs, num_nodes, rank_nodes, deterministic,
               scale=None, diag=None, grad_degrees=None, touched=None) -> torch.Tensor:
    """One O(N k) pass of :func:`_aggregate_kernel`; returns the (G, num_nodes) f32 sums."""
    rows, k = kept_values.shape
    out = torch.zeros(num_graphs, num_nodes, dtype=torch.float32, device=kept_values.device)
    if rows == 0:
        return out
    contrib = keys = out  # placeholders, unused unless deterministic
    if deterministic:
        contrib = torch.empty(rows * k, dtype=torch.float32, device=out.device)
        keys = torch.empty(rows * k, dtype=torch.int64, device=out.device)
    wrap_triton(_aggregate_kernel)[(rows,)](
        kept_values, kept_ids, row_graph, scale if scale is not None else out, diag if diag is not None else out,
        grad_degrees if grad_degrees is not None else out, out, touched if touched is not None else out,
        contrib, keys, num_nodes, num_graphs,
        K=k, K_PAD=_pad(k), RANK_NODES=rank_nodes, MODE=mode, DETERMINISTIC=deterministic,
        WRITE_TOUCHED=touched is not None)
    if deterministic:
        segment_sum(contrib, keys, num_graphs * num_nodes, out)
    return out


@triton_op("infigw_triton::topk_degrees", mutates_args=())
def _topk_degrees_op(
    logits: torch.Tensor, row_graph: torch.Tensor, num_graphs: int, k: int, values_mode: int,
    temperature: float, nodes_mode: int, norm_mode: int, deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, vocab = logits.shape
    device = logits.device
    rank_nodes = nodes_mode == NODES["rank"]
    num_nodes = k if rank_nodes else vocab
    probs = values_mode == VALUES["probs"]
    degrees = torch.zeros(num_graphs, num_nodes, dtype=torch.float32, device=device)
    touched = torch.zeros(num_graphs, num_nodes, dtype=torch.bool, device=device)
    kept_values = torch.empty(rows, k, dtype=torch.float32, device=device)
    kept_ids = torch.empty(rows, k, dtype=torch.int64, device=device)
    row_lse = torch.empty(rows if probs else 0, dtype=torch.float32, device=device)
    if rows == 0:
        return degrees, touched, kept_values, kept_ids, row_lse
    scale = _row_scale(row_graph, num_graphs, norm_mode)
    cosine = norm_mode == NORMS["cosine"]
    fused = not (cosine or deterministic)
    block, warps = _vocab_block(vocab, logits.dtype)
    wrap_triton(_topk_rows_kernel)[(rows,)](
        logits, logits.stride(0), vocab, row_graph, scale,
        kept_values, kept_ids, row_lse if probs else kept_values, degrees, touched, num_nodes, 1.0 / temperature,
        K=k, K_PAD=_pad(k), BLOCK_V=block, VALUES_MODE=values_mode, RANK_NODES=rank_nodes, SCATTER=fused,
        num_warps=warps)
    if not fused:
        common = (kept_values, kept_ids, row_graph, num_graphs, num_nodes, rank_nodes, deterministic)
        if cosine:
            diag = _aggregate(_MODE_DIAG, *common)
            degrees = _aggregate(_MODE_COSINE, *common, diag=diag, touched=touched)
        else:
            degrees = _aggregate(_MODE_DEGREES, *common, scale=scale, touched=touched)
    return degrees, touched, kept_values, kept_ids, row_lse


@triton_op("infigw_triton::topk_degrees_backward", mutates_args=())
def _topk_degrees_backward_op(
    grad_degrees: torch.Tensor, logits: torch.Tensor, row_graph: torch.Tensor, kept_values: torch.Tensor,
    kept_ids: torch.Tensor, row_lse: torch.Tensor, vocab: int, grad_dtype: torch.dtype, num_graphs: int,
    values_mode: int, temperature: float, nodes_mode: int, norm_mode: int, deterministic: bool,
) -> torch.Tensor:
    """dL/dlogits (N, vocab) in ``grad_dtype``; ``logits`` is only read for ``probs`` (else may be empty)."""
    rows, k = kept_values.shape
    device = kept_values.device
    probs = values_mode == VALUES["probs"]
    grad = (torch.empty if probs else torch.zeros)(rows, vocab, dtype=grad_dtype, device=device)
    if rows == 0:
        return grad
    rank_nodes = nodes_mode == NODES["rank"]
    num_nodes = k if rank_nodes else vocab
    grad_degrees = grad_degrees.to(torch.float32).contiguous()
    cosine = norm_mode == NORMS["cosine"]
    scale = _row_scale(row_graph, num_graphs, norm_mode)
    diag = z = grad_degrees  # placeholders, unused unless cosine
    if cosine:
        common = (kept_values, kept_ids, row_graph, num_graphs, num_nodes, rank_nodes, deterministic)
        diag = _aggregate(_MODE_DIAG, *common)
        z = _aggregate(_MODE_COSINE_GRAD, *common, diag=diag, grad_degrees=grad_degrees)
    grad_kept = torch.empty(rows, k, dtype=torch.float32, device=device)
    coef = torch.empty(rows if probs else 0, dtype=torch.float32, device=device)
    inv_temp = 1.0 / temperature
    wrap_triton(_grad_rows_kernel)[(rows,)](
        kept_values, kept_ids, row_graph, scale, diag, z, grad_degrees, grad_kept, coef if probs else grad_kept,
        num_nodes, inv_temp, K=k, K_PAD=_pad(k), VALUES_MODE=values_mode, RANK_NODES=rank_nodes, COSINE=cosine)
    if probs:
        block, warps = _vocab_block(vocab, logits.dtype)
        wrap_triton(_probs_dense_grad_kernel)[(rows,)](
            logits, logits.stride(0), grad, row_lse, coef, row_graph, vocab, inv_temp, BLOCK_V=block,
            num_warps=warps)
    wrap_triton(_scatter_grad_kernel)[(rows,)](
        grad, vocab, kept_ids, grad_kept, row_graph, K=k, K_PAD=_pad(k), ACCUMULATE=probs)
    return grad


def _setup_context(ctx, inputs, output):
    logits, row_graph, num_graphs, k, values_mode, temperature, nodes_mode, norm_mode, deterministic = inputs
    _, _, kept_values, kept_ids, row_lse = output
    probs = values_mode == VALUES["probs"]
    # Only probs reads the logits again; the sparse modes do not keep them alive.
    ctx.save_for_backward(logits if probs else logits.new_empty(0), row_graph, kept_values, kept_ids, row_lse)
    ctx.vocab, ctx.grad_dtype = logits.shape[1], logits.dtype
    ctx.args = (num_graphs, values_mode, temperature, nodes_mode, norm_mode, deterministic)


def _backward(ctx, grad_degrees, _touched, _kept_values, _kept_ids, _row_lse):
    logits, row_graph, kept_values, kept_ids, row_lse = ctx.saved_tensors
    grad = torch.ops.infigw_triton.topk_degrees_backward(
        grad_degrees, logits, row_graph, kept_values, kept_ids, row_lse, ctx.vocab, ctx.grad_dtype, *ctx.args)
    return grad, None, None, None, None, None, None, None, None


torch.library.register_autograd("infigw_triton::topk_degrees", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- op-level API


def check_device(tensor: torch.Tensor, name: str) -> None:
    """The kernels take CUDA tensors, or CPU tensors when Triton interprets them (TRITON_INTERPRET=1 at import)."""
    if tensor.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{name} must be a CUDA tensor for the triton backend (CPU tensors only under "
                         f"TRITON_INTERPRET=1), got a {tensor.device.type} tensor")


def check_topk_inputs(logits, row_graph, num_graphs, k, values, temperature, nodes, norm) -> None:
    """ValueError/TypeError naming the argument for anything the kernels cannot take."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D (N, V) tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits must be float32, float16 or bfloat16 for the triton backend, got {logits.dtype}")
    if logits.shape[1] == 0 or logits.stride(1) != 1:
        raise ValueError(f"logits must have a non-empty, contiguous last dimension, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if logits.shape[1] >= 2**31:
        raise ValueError(f"vocabulary size must be < 2^31, got {logits.shape[1]}")
    if not isinstance(row_graph, torch.Tensor) or row_graph.dtype != torch.int64 or \
            row_graph.shape != (logits.shape[0],):
        raise ValueError(f"row_graph must be an int64 tensor of shape ({logits.shape[0]},), got "
                         f"{getattr(row_graph, 'dtype', type(row_graph))} {tuple(getattr(row_graph, 'shape', ()))}")
    if row_graph.device != logits.device:
        raise ValueError(f"row_graph is on {row_graph.device} but logits on {logits.device}")
    if isinstance(num_graphs, bool) or not isinstance(num_graphs, int) or num_graphs < 0:
        raise ValueError(f"num_graphs must be an int >= 0, got {num_graphs!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(logits.shape[1], MAX_K):
        raise ValueError(f"k must be an int in [1, min(V={logits.shape[1]}, {MAX_K})], got {k!r}")
    if values not in VALUES:
        raise ValueError(f"values must be one of {tuple(VALUES)}, got {values!r}")
    if nodes not in NODES:
        raise ValueError(f"nodes must be one of {tuple(NODES)}, got {nodes!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {tuple(NORMS)}, got {norm!r}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    check_device(logits, "logits")


def topk_degrees(logits, row_graph, num_graphs: int, k: int, values: str = "logits", temperature: float = 1.0,
                 nodes: str = "vocab", norm: str = "mean", deterministic: bool = False) -> TopKDegrees:
    """The op-level callable of :mod:`infigw.dispatch` (see :mod:`infigw.ops.common`)."""
    check_topk_inputs(logits, row_graph, num_graphs, k, values, temperature, nodes, norm)
    degrees, touched, kept_values, kept_ids, _ = torch.ops.infigw_triton.topk_degrees(
        logits, row_graph.contiguous(), num_graphs, k, VALUES[values], float(temperature), NODES[nodes],
        NORMS[norm], bool(deterministic))
    return TopKDegrees(degrees, touched, kept_values.detach(), kept_ids)
