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
  * the probability values take a_p = exp(x / T - lse), lse the row's logsumexp computed online in the same
    pass (``probs``) or that of the k kept entries (``topk_probs``);
  * for ``mean``/``sum`` without ``deterministic`` the kernel ends by atomically adding ``a_p[i] * s_p`` (fp64:
    never inf - inf, see csrc/cpu/topk_degrees.cpp) into the degrees. ``cosine`` (per-node scales first, see
    csrc/formulas.h) and ``deterministic=True`` run the O(N k) aggregation kernel instead, which, when
    deterministic, writes per-slot contributions that a stable sort by (graph, node) and a sequential segment
    sum reduce in row order (bitwise reproducible).
Backward: per-row gradient of the kept values (O(N k); dL/d(log a) for the probability values), then the logits
gradient: zero-fill + scatter of the k entries (``logits``/``topk_probs``; the only full-size write is the
memset), or one dense streaming pass ``-p_j * C_p / T`` plus the scatter-add of the k-sparse part (``probs``).
No in-place reuse of the logits buffer: callers such as a cross-entropy term usually still need the logits.
Index arguments out of range (a direct call with check_data=False) are skipped, never followed.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..contract import NODES, VALUES, TopKDegrees
from ._common import (LOGITS, PROBS, check_device, check_index_range, check_tensor, option_code,
                      padded)

#: Largest k the Triton backend accepts (the running top-k lives in registers).
MAX_K = 1024
#: Launch shape of the streaming kernels: logits bytes per vocabulary tile and warps per program. Chosen by
#: measurement (benchmarks/RESULTS.md, H100, B*T=16384, V=151936, k=10, bf16): 4 KiB / 4 warps ran forward +
#: backward in 4.95 ms against 6.62 ms for 8 KiB / 8 warps; ``benchmarks/bench_topk_degrees.py`` re-times the sweep.
TILE_BYTES = 4096
NUM_WARPS = 4
# Upper bound of the tile width; a module global so the interpreter tests can force several tiles per row.
_MAX_BLOCK_V = 16384
_SEGMENT_BLOCK = 128

_I64_MIN = tl.constexpr(-9223372036854775808)
_I64_MAX = tl.constexpr(9223372036854775807)
_NAN_KEY = tl.constexpr(0x7FC00000)  # order key of the canonical NaN: above +inf (0x7F800000)
_LOW32 = tl.constexpr(0xFFFFFFFF)

# What one pass of _aggregate_kernel adds up per (graph, node): the cosine scale key maximum M, the cosine
# Q = sum u^2, the degrees sum b s (fp64), and the backward's z = sum gb b of the cosine norm.
_NODE_MAX = tl.constexpr(0)
_SQUARES = tl.constexpr(1)
_DEGREES = tl.constexpr(2)
_COSINE_Z = tl.constexpr(3)


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
    x_ptr, x_row_stride, vocab, row_graph_ptr, num_graphs,
    kept_val_ptr, kept_id_ptr, lse_ptr, log_ptr, deg_ptr, touched_ptr, num_nodes, inv_temp,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
    VALUES_MODE: tl.constexpr, RANK_NODES: tl.constexpr, SCATTER: tl.constexpr, WRITE_LOGS: tl.constexpr,
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

    valid = (graph >= 0) & (graph < num_graphs)
    if VALUES_MODE == LOGITS:
        a = kept_x
    else:
        if VALUES_MODE == PROBS:
            lse = run_max + tl.log(run_sum)
        else:  # topk_probs: the logsumexp of the kept entries
            t = tl.where(in_k, kept_x * inv_temp, float("-inf"))
            t_max = tl.max(t)
            lse = t_max + tl.log(tl.sum(tl.where(in_k, tl.exp(t - t_max), 0.0)))
        tl.store(lse_ptr + row, lse)
        logs = kept_x * inv_temp - lse
        a = tl.exp(logs)
        if WRITE_LOGS:
            tl.store(log_ptr + row * K + slot, logs, mask=in_k)
    a = tl.where(in_k & valid, a, 0.0)
    tl.store(kept_val_ptr + row * K + slot, a, mask=in_k)
    tl.store(kept_id_ptr + row * K + slot, kept_id, mask=in_k)
    if SCATTER:
        live = in_k & valid
        if RANK_NODES:
            dst = graph * num_nodes + slot
        else:
            dst = graph * num_nodes + kept_id
        wide = a.to(tl.float64)
        tl.atomic_add(deg_ptr + dst, wide * tl.sum(wide), mask=live, sem="relaxed")
        tl.store(touched_ptr + dst, 1, mask=live)


@triton.jit
def _load_kept_row(kept_val_ptr, kept_id_ptr, row_graph_ptr, log_ptr, row, num_graphs, num_nodes, vocab,
                   K: tl.constexpr, K_PAD: tl.constexpr, RANK_NODES: tl.constexpr, LOG_DOMAIN: tl.constexpr):
    """One row's kept values (and, for LOG_DOMAIN, their logs) with their flat (graph, node) destinations.
    Padding slots, masked rows and indices out of range (graph outside [0, num_graphs), id outside [0, vocab))
    are not ``live`` and load 0 (logs -inf)."""
    slot = tl.arange(0, K_PAD)
    in_k = slot < K
    graph = tl.load(row_graph_ptr + row)
    valid = (graph >= 0) & (graph < num_graphs)
    ids = tl.load(kept_id_ptr + row * K + slot, mask=in_k & valid, other=0)
    live = in_k & valid & (ids >= 0) & (ids < vocab)
    a = tl.load(kept_val_ptr + row * K + slot, mask=live, other=0.0)
    if LOG_DOMAIN:
        logs = tl.load(log_ptr + row * K + slot, mask=live, other=float("-inf"))
    else:
        logs = a
    if RANK_NODES:
        node = slot.to(tl.int64)
    else:
        node = ids
    return slot, in_k, graph, valid, live, a, logs, graph * num_nodes + node


# The cosine normalisation of csrc/formulas.h, element for element.
@triton.jit
def _cosine_unit(a, logs, node_max, LOG_DOMAIN: tl.constexpr):
    """u = a / M (values="logits") or exp(log a - M) (the probability values); 0 for a node without scale."""
    if LOG_DOMAIN:
        u = tl.where(node_max == float("-inf"), 0.0, tl.exp(logs - node_max))
    else:
        u = tl.where(node_max == 0.0, 0.0, a / tl.where(node_max == 0.0, 1.0, node_max))
    return u


@triton.jit
def _cosine_normalised(a, logs, dst, live, node_max_ptr, inv_sqrt_q_ptr, LOG_DOMAIN: tl.constexpr):
    """b = u Q^-1/2 of the slots, with their node's M and Q^-1/2."""
    node_max = tl.load(node_max_ptr + dst, mask=live, other=0.0)
    inv_sqrt_q = tl.load(inv_sqrt_q_ptr + dst, mask=live, other=0.0)
    return _cosine_unit(a, logs, node_max, LOG_DOMAIN) * inv_sqrt_q, node_max, inv_sqrt_q


@triton.jit
def _cosine_input_grad(gb, b, z, inv_sqrt_q, node_max, LOG_DOMAIN: tl.constexpr):
    """dL/da (values="logits") or dL/d(log a) = b (gb - b z) (the probability values) through b = u Q^-1/2."""
    g = gb - b * z
    if LOG_DOMAIN:
        g = b * g
    else:
        g = tl.where(node_max == 0.0, 0.0, g * inv_sqrt_q / tl.where(node_max == 0.0, 1.0, node_max))
    return g


@triton.jit
def _aggregate_kernel(
    kept_val_ptr, kept_id_ptr, row_graph_ptr, log_ptr, node_max_ptr, inv_sqrt_q_ptr, grad_deg_ptr,
    out_ptr, touched_ptr, contrib_ptr, key_ptr, num_graphs, num_nodes, vocab,
    K: tl.constexpr, K_PAD: tl.constexpr, RANK_NODES: tl.constexpr, LOG_DOMAIN: tl.constexpr,
    COSINE: tl.constexpr, MODE: tl.constexpr, DETERMINISTIC: tl.constexpr, WRITE_TOUCHED: tl.constexpr,
):
    """Per-slot terms of one row, added into ``out`` (G, num_nodes) or written for a segment sum.

    MODE _NODE_MAX: the scale key |a| or log a (atomic max: order-free, so deterministic as is); _SQUARES: u^2;
    _DEGREES: b * sum(b) in fp64 (b = a, or the cosine-normalised value); _COSINE_Z: gb * b with
    gb = dL/db = gd[node] * sum(b) + sum(gd * b).
    """
    row = tl.program_id(0).to(tl.int64)
    slot, in_k, graph, valid, live, a, logs, dst = _load_kept_row(
        kept_val_ptr, kept_id_ptr, row_graph_ptr, log_ptr, row, num_graphs, num_nodes, vocab, K, K_PAD,
        RANK_NODES, LOG_DOMAIN)
    if MODE == _NODE_MAX:
        if LOG_DOMAIN:
            key = logs
        else:
            key = tl.abs(a)
        tl.atomic_max(out_ptr + dst, key, mask=live, sem="relaxed")
    else:
        if MODE == _SQUARES:
            node_max = tl.load(node_max_ptr + dst, mask=live, other=0.0)
            u = _cosine_unit(a, logs, node_max, LOG_DOMAIN)
            contrib = u * u
        else:
            if COSINE:
                b, _, _ = _cosine_normalised(a, logs, dst, live, node_max_ptr, inv_sqrt_q_ptr, LOG_DOMAIN)
            else:
                b = a
            if MODE == _DEGREES:
                wide = b.to(tl.float64)
                contrib = wide * tl.sum(wide)
            else:
                gd = tl.load(grad_deg_ptr + dst, mask=live, other=0.0)
                contrib = (gd * tl.sum(b) + tl.sum(gd * b)) * b
        if DETERMINISTIC:
            tl.store(contrib_ptr + row * K + slot, contrib, mask=in_k)
            tl.store(key_ptr + row * K + slot, tl.where(live, dst, num_graphs * num_nodes), mask=in_k)
        else:
            tl.atomic_add(out_ptr + dst, contrib, mask=live, sem="relaxed")
    if WRITE_TOUCHED:
        tl.store(touched_ptr + dst, 1, mask=live)


@triton.jit
def _segment_sum_kernel(sorted_key_ptr, perm_ptr, end_ptr, contrib_ptr, out_ptr, total, sentinel,
                        BLOCK: tl.constexpr):
    """Sum (fp64) of the contributions of each run of equal sorted keys, added in sorted (= row) order, stored at
    ``out[key]``."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pos < total
    key = tl.load(sorted_key_ptr + pos, mask=inside, other=sentinel)
    prev = tl.load(sorted_key_ptr + pos - 1, mask=inside & (pos > 0), other=-1)
    head = inside & (key != prev) & (key < sentinel)
    length = tl.where(head, tl.load(end_ptr + pos, mask=head, other=0) - pos, 0)
    acc = tl.zeros([BLOCK], tl.float64)
    for j in range(0, tl.max(length)):
        take = j < length
        src = tl.load(perm_ptr + pos + j, mask=take, other=0)
        acc += tl.load(contrib_ptr + src, mask=take, other=0.0).to(tl.float64)
    tl.store(out_ptr + key, acc, mask=head)


@triton.jit
def _grad_rows_kernel(
    kept_val_ptr, kept_id_ptr, row_graph_ptr, log_ptr, scale_ptr, node_max_ptr, inv_sqrt_q_ptr, z_ptr,
    grad_deg_ptr, grad_kept_ptr, coef_ptr, num_graphs, num_nodes, vocab, inv_temp,
    K: tl.constexpr, K_PAD: tl.constexpr, VALUES_MODE: tl.constexpr, RANK_NODES: tl.constexpr,
    LOG_DOMAIN: tl.constexpr, COSINE: tl.constexpr,
):
    """dL/dx at the k kept entries of one row (and, for probs, the dense coefficient C_p / T).

    g is dL/da for values="logits" and dL/d(log a) for the probability values: bounded however small a is.
    """
    inv_temp = tl.cast(inv_temp, tl.float32)  # torch.compile passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    slot, in_k, graph, valid, live, a, logs, dst = _load_kept_row(
        kept_val_ptr, kept_id_ptr, row_graph_ptr, log_ptr, row, num_graphs, num_nodes, vocab, K, K_PAD,
        RANK_NODES, LOG_DOMAIN)
    gd = tl.load(grad_deg_ptr + dst, mask=live, other=0.0)
    if COSINE:
        b, node_max, inv_sqrt_q = _cosine_normalised(a, logs, dst, live, node_max_ptr, inv_sqrt_q_ptr, LOG_DOMAIN)
        gb = gd * tl.sum(b) + tl.sum(gd * b)
        z = tl.load(z_ptr + dst, mask=live, other=0.0)
        g = _cosine_input_grad(gb, b, z, inv_sqrt_q, node_max, LOG_DOMAIN)
    else:
        # fp64 like the forward's terms: the sum of huge logits may exceed fp32
        wide, gd_wide = a.to(tl.float64), gd.to(tl.float64)
        scale = tl.load(scale_ptr + graph, mask=valid, other=0.0)
        gb = (scale * (gd_wide * tl.sum(wide) + tl.sum(gd_wide * wide))).to(tl.float32)
        if VALUES_MODE == LOGITS:
            g = gb
        else:
            g = a * gb
    g = tl.where(live, g, 0.0)
    if VALUES_MODE == LOGITS:
        grad_x = g
    elif VALUES_MODE == PROBS:
        grad_x = inv_temp * g
        tl.store(coef_ptr + row, inv_temp * tl.sum(g))
    else:
        grad_x = inv_temp * (g - a * tl.sum(g))
    tl.store(grad_kept_ptr + row * K + slot, grad_x, mask=in_k)


@triton.jit
def _probs_dense_grad_kernel(x_ptr, x_row_stride, grad_ptr, lse_ptr, coef_ptr, row_graph_ptr, num_graphs, vocab,
                             inv_temp, BLOCK_V: tl.constexpr):
    """grad[j] = -p_j * C_p / T over the whole row (the k-sparse part is added by the scatter kernel)."""
    inv_temp = tl.cast(inv_temp, tl.float32)  # torch.compile passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    graph = tl.load(row_graph_ptr + row)
    valid = (graph >= 0) & (graph < num_graphs)
    lse = tl.load(lse_ptr + row)
    coef = tl.where(valid, tl.load(coef_ptr + row), 0.0)
    for start in range(0, vocab, BLOCK_V):
        ids = start + tl.arange(0, BLOCK_V)
        inside = ids < vocab
        x = tl.load(x_ptr + row * x_row_stride + ids, mask=inside, other=0.0).to(tl.float32)
        g = tl.where(valid, -coef * tl.exp(x * inv_temp - lse), 0.0)
        tl.store(grad_ptr + row * vocab + ids, g.to(grad_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _scatter_grad_kernel(grad_ptr, vocab, kept_id_ptr, grad_kept_ptr, row_graph_ptr, num_graphs,
                         K: tl.constexpr, K_PAD: tl.constexpr, ACCUMULATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, K_PAD)
    graph = tl.load(row_graph_ptr + row)
    in_row = (slot < K) & (graph >= 0) & (graph < num_graphs)
    ids = tl.load(kept_id_ptr + row * K + slot, mask=in_row, other=0)
    live = in_row & (ids >= 0) & (ids < vocab)
    g = tl.load(grad_kept_ptr + row * K + slot, mask=live, other=0.0)
    dst = grad_ptr + row * vocab + ids
    if ACCUMULATE:
        g += tl.load(dst, mask=live, other=0.0).to(tl.float32)
    tl.store(dst, g.to(grad_ptr.dtype.element_ty), mask=live)


# ----------------------------------------------------------------------------------------------- launchers


def _vocab_block(vocab: int, dtype: torch.dtype) -> Tuple[int, int]:
    """(tile width, warps): TILE_BYTES of logits per tile, fewer warps for short rows."""
    block = min(_MAX_BLOCK_V, TILE_BYTES // dtype.itemsize, max(16, triton.next_power_of_2(vocab)))
    return block, NUM_WARPS if block >= 1024 else 4


def _rows_per_graph(row_graph: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """Valid rows of every graph (int64); rows whose graph lies outside [0, num_graphs) count nowhere."""
    valid = (row_graph >= 0) & (row_graph < num_graphs)
    slot = torch.where(valid, row_graph, num_graphs)
    rows = torch.zeros(num_graphs + 1, dtype=torch.int64, device=row_graph.device)
    return rows.scatter_add_(0, slot, torch.ones_like(slot))[:num_graphs]


def segment_sum(contrib: torch.Tensor, keys: torch.Tensor, out: torch.Tensor) -> None:
    """Deterministic sums of ``contrib`` over equal ``keys`` into ``out.view(-1)[key]`` (keys >= out.numel()
    are dropped). The stable sort fixes the order of every sum (the order of the entries), so the result is
    bitwise reproducible; no host sync."""
    total = keys.numel()
    if total == 0:
        return
    sorted_keys, perm = torch.sort(keys, stable=True)
    ends = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    wrap_triton(_segment_sum_kernel)[(triton.cdiv(total, _SEGMENT_BLOCK),)](
        sorted_keys, perm, ends, contrib, out, total, out.numel(), BLOCK=_SEGMENT_BLOCK)


@dataclass
class _KeptRows:
    """The kept slots of a forward pass as the O(N k) kernels read them (the host mirror of the CUDA KeptRows)."""

    values: torch.Tensor  # (N, k) f32
    ids: torch.Tensor  # (N, k) int64
    row_graph: torch.Tensor  # (N,) int64
    logs: Optional[torch.Tensor]  # (N, k) f32 log a of the probability values under the cosine norm, else None
    num_graphs: int
    num_nodes: int
    vocab: int
    rank_nodes: bool

    def aggregate(self, mode, deterministic: bool, out_dtype=torch.float32, out=None, node_max=None,
                  inv_sqrt_q=None, grad_degrees=None, touched=None) -> torch.Tensor:
        """One pass of :func:`_aggregate_kernel`; returns the (G, num_nodes) sums (or ``out``, updated)."""
        rows, k = self.values.shape
        if out is None:
            out = torch.zeros(self.num_graphs, self.num_nodes, dtype=out_dtype, device=self.values.device)
        if rows == 0:
            return out
        deterministic = deterministic and mode != _NODE_MAX  # a maximum does not depend on the order
        contrib = keys = out  # placeholders, unused unless deterministic
        if deterministic:
            contrib = torch.empty(rows * k, dtype=out.dtype, device=out.device)
            keys = torch.empty(rows * k, dtype=torch.int64, device=out.device)
        placeholder = self.values
        wrap_triton(_aggregate_kernel)[(rows,)](
            self.values, self.ids, self.row_graph, self.logs if self.logs is not None else placeholder,
            node_max if node_max is not None else placeholder, inv_sqrt_q if inv_sqrt_q is not None else placeholder,
            grad_degrees if grad_degrees is not None else placeholder, out,
            touched if touched is not None else placeholder, contrib, keys, self.num_graphs, self.num_nodes,
            self.vocab, K=k, K_PAD=padded(k), RANK_NODES=self.rank_nodes, LOG_DOMAIN=self.logs is not None,
            COSINE=node_max is not None, MODE=mode.value, DETERMINISTIC=deterministic,
            WRITE_TOUCHED=touched is not None)
        if deterministic:
            segment_sum(contrib, keys, out)
        return out

    def cosine_scale(self, deterministic: bool):
        """Per node of every graph: M (the largest scale key) and Q^-1/2 of the cosine norm (csrc/formulas.h)."""
        empty = float("-inf") if self.logs is not None else 0.0
        node_max = torch.full((self.num_graphs, self.num_nodes), empty, dtype=torch.float32,
                              device=self.values.device)
        self.aggregate(_NODE_MAX, deterministic, out=node_max)
        q = self.aggregate(_SQUARES, deterministic, node_max=node_max)
        return node_max, torch.where(q > 0, 1.0 / q.sqrt(), torch.zeros_like(q))


def _check_options(num_graphs, k, vocab, values, temperature, nodes, graph_norm):
    """The non-tensor arguments of both ops; returns the values code and whether nodes are rank slots."""
    if isinstance(num_graphs, bool) or not isinstance(num_graphs, int) or num_graphs < 0:
        raise ValueError(f"num_graphs must be an int >= 0, got {num_graphs!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(vocab, MAX_K):
        raise ValueError(f"k must lie in [1, min(V={vocab}, {MAX_K})], got {k!r}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    option_code(graph_norm, "graph_norm")
    return option_code(values, "values"), option_code(nodes, "nodes") == NODES["rank"]


def _check_logits(logits, rows=None, vocab=None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D (N, V) tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits must be float32, float16 or bfloat16 for the triton backend, got {logits.dtype}")
    if logits.shape[1] == 0 or logits.stride(1) != 1:
        raise ValueError(f"logits must have a non-empty, contiguous last dimension, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if logits.shape[1] >= 2**31:
        raise ValueError(f"vocabulary size must be < 2^31, got {logits.shape[1]}")
    if rows is not None and tuple(logits.shape) != (rows, vocab):
        raise ValueError(f"logits must have shape ({rows}, {vocab}), got {tuple(logits.shape)}")
    check_device(logits, "logits")


@triton_op("infigw_triton::topk_degrees", mutates_args=())
def _topk_degrees_op(
    logits: torch.Tensor, row_graph: torch.Tensor, num_graphs: int, k: int, values: str, temperature: float,
    nodes: str, graph_norm: str, deterministic: bool, check_data: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_logits(logits)
    check_tensor(row_graph, "row_graph", torch.int64, logits.shape[:1], logits.device)
    values_code, rank_nodes = _check_options(num_graphs, k, logits.shape[1], values, temperature, nodes, graph_norm)
    if check_data:
        check_index_range(row_graph, "row_graph", -1, num_graphs)
    rows, vocab = logits.shape
    device = logits.device
    num_nodes = k if rank_nodes else vocab
    probability = values_code != VALUES["logits"]
    cosine = graph_norm == "cosine"
    fused = not (cosine or deterministic)  # the rows kernel scatters the degrees, else the aggregation sums them
    degrees = torch.zeros(num_graphs, num_nodes, dtype=torch.float64, device=device) if fused or not rows else None
    touched = torch.zeros(num_graphs, num_nodes, dtype=torch.bool, device=device)
    kept_values = torch.empty(rows, k, dtype=torch.float32, device=device)
    kept_ids = torch.empty(rows, k, dtype=torch.int64, device=device)
    row_lse = torch.empty(rows if probability else 0, dtype=torch.float32, device=device)
    logs = torch.empty(rows, k, dtype=torch.float32, device=device) if probability and cosine else None
    if rows:
        block, warps = _vocab_block(vocab, logits.dtype)
        wrap_triton(_topk_rows_kernel)[(rows,)](
            logits, logits.stride(0), vocab, row_graph, num_graphs, kept_values, kept_ids,
            row_lse if probability else kept_values, logs if logs is not None else kept_values,
            degrees if fused else kept_values, touched,
            num_nodes, 1.0 / temperature, K=k, K_PAD=padded(k), BLOCK_V=block, VALUES_MODE=values_code,
            RANK_NODES=rank_nodes, SCATTER=fused, WRITE_LOGS=logs is not None, num_warps=warps)
        if not fused:
            kept = _KeptRows(kept_values, kept_ids, row_graph, logs, num_graphs, num_nodes, vocab, rank_nodes)
            node_max, inv_sqrt_q = kept.cosine_scale(deterministic) if cosine else (None, None)
            degrees = kept.aggregate(_DEGREES, deterministic, torch.float64, node_max=node_max, inv_sqrt_q=inv_sqrt_q,
                                     touched=touched)
    if graph_norm == "mean":
        degrees = degrees / _rows_per_graph(row_graph, num_graphs).clamp_min(1).unsqueeze(-1)
    return degrees.to(torch.float32), touched, kept_values, kept_ids, row_lse


@triton_op("infigw_triton::topk_degrees_backward", mutates_args=())
def _topk_degrees_backward_op(
    grad_degrees: torch.Tensor, logits: torch.Tensor, row_graph: torch.Tensor, kept_values: torch.Tensor,
    kept_ids: torch.Tensor, row_lse: torch.Tensor, vocab: int, grad_dtype: torch.dtype, num_graphs: int,
    values: str, temperature: float, nodes: str, graph_norm: str, deterministic: bool, check_data: bool = True,
) -> torch.Tensor:
    """dL/dlogits (N, vocab) in ``grad_dtype``; ``logits`` is read for probs, and for the probability values
    under the cosine norm (else it may be empty)."""
    check_tensor(row_graph, "row_graph", torch.int64, row_graph.shape[:1], kept_values.device)
    check_device(row_graph, "row_graph")
    rows = row_graph.shape[0]
    k = kept_ids.shape[-1] if kept_ids.dim() == 2 else -1
    check_tensor(kept_ids, "kept_ids", torch.int64, (rows, k), row_graph.device)
    check_tensor(kept_values, "kept_values", torch.float32, (rows, k), row_graph.device)
    values_code, rank_nodes = _check_options(num_graphs, k, vocab, values, temperature, nodes, graph_norm)
    probs = values_code == VALUES["probs"]
    probability = values_code != VALUES["logits"]
    cosine = graph_norm == "cosine"
    num_nodes = k if rank_nodes else vocab
    check_tensor(grad_degrees, "grad_degrees", grad_degrees.dtype, (num_graphs, num_nodes), row_graph.device)
    if probability:
        check_tensor(row_lse, "row_lse", torch.float32, (rows,), row_graph.device)
    if probs or (probability and cosine):
        _check_logits(logits, rows, vocab)
    if check_data:
        check_index_range(row_graph, "row_graph", -1, num_graphs)
        check_index_range(kept_ids, "kept_ids", 0, vocab)
    device = kept_values.device
    grad = (torch.empty if probs else torch.zeros)(rows, vocab, dtype=grad_dtype, device=device)
    if rows == 0:
        return grad
    grad_degrees = grad_degrees.to(torch.float32).contiguous()
    inv_temp = 1.0 / temperature
    logs = None
    if probability and cosine:  # log a of every slot, as the forward computed it (ids clamped: never followed)
        kept_logits = logits.gather(1, kept_ids.clamp(0, vocab - 1)).to(torch.float32)
        logs = kept_logits * inv_temp - row_lse.unsqueeze(-1)
    kept = _KeptRows(kept_values, kept_ids, row_graph, logs, num_graphs, num_nodes, vocab, rank_nodes)
    placeholder = grad_degrees
    node_max = inv_sqrt_q = z = placeholder
    if cosine:
        node_max, inv_sqrt_q = kept.cosine_scale(deterministic)
        z = kept.aggregate(_COSINE_Z, deterministic, node_max=node_max, inv_sqrt_q=inv_sqrt_q,
                           grad_degrees=grad_degrees)
    scale = (1.0 / _rows_per_graph(row_graph, num_graphs).clamp_min(1).to(torch.float32) if graph_norm == "mean"
             else torch.ones(num_graphs, dtype=torch.float32, device=device))
    grad_kept = torch.empty(rows, k, dtype=torch.float32, device=device)
    coef = torch.empty(rows if probs else 0, dtype=torch.float32, device=device)
    wrap_triton(_grad_rows_kernel)[(rows,)](
        kept_values, kept_ids, row_graph, logs if logs is not None else placeholder, scale, node_max, inv_sqrt_q,
        z, grad_degrees, grad_kept, coef if probs else grad_kept, num_graphs, num_nodes, vocab, inv_temp,
        K=k, K_PAD=padded(k), VALUES_MODE=values_code, RANK_NODES=rank_nodes, LOG_DOMAIN=logs is not None,
        COSINE=cosine)
    if probs:
        block, warps = _vocab_block(vocab, logits.dtype)
        wrap_triton(_probs_dense_grad_kernel)[(rows,)](
            logits, logits.stride(0), grad, row_lse, coef, row_graph, num_graphs, vocab, inv_temp, BLOCK_V=block,
            num_warps=warps)
    wrap_triton(_scatter_grad_kernel)[(rows,)](
        grad, vocab, kept_ids, grad_kept, row_graph, num_graphs, K=k, K_PAD=padded(k), ACCUMULATE=probs)
    return grad


def _setup_context(ctx, inputs, output):
    logits, row_graph, num_graphs, k, values, temperature, nodes, graph_norm, deterministic = inputs[:9]
    _, _, kept_values, kept_ids, row_lse = output
    # Only probs, and the probability values under the cosine norm, read the logits again; the other modes do
    # not keep them alive.
    keep = values == "probs" or (values != "logits" and graph_norm == "cosine")
    ctx.save_for_backward(logits if keep else logits.new_empty(0), row_graph, kept_values, kept_ids, row_lse)
    ctx.vocab, ctx.grad_dtype = logits.shape[1], logits.dtype
    ctx.args = (num_graphs, values, temperature, nodes, graph_norm, deterministic)


def _backward(ctx, grad_degrees, *_):
    logits, row_graph, kept_values, kept_ids, row_lse = ctx.saved_tensors
    # the forward's own indices: no data scan
    grad = torch.ops.infigw_triton.topk_degrees_backward(
        grad_degrees, logits, row_graph, kept_values, kept_ids, row_lse, ctx.vocab, ctx.grad_dtype, *ctx.args, False)
    return (grad,) + (None,) * 9


torch.library.register_autograd("infigw_triton::topk_degrees", _backward, setup_context=_setup_context)


def topk_degrees(logits, row_graph, num_graphs: int, k: int, values: str = "logits", temperature: float = 1.0,
                 nodes: str = "vocab", norm: str = "mean", deterministic: bool = False) -> TopKDegrees:
    """The op-level callable of :mod:`infigw.dispatch` (see :mod:`infigw.contract`); infigw built ``row_graph``,
    so its data is not scanned."""
    degrees, touched, kept_values, kept_ids, _ = torch.ops.infigw_triton.topk_degrees(
        logits, row_graph.contiguous(), num_graphs, k, values, float(temperature), nodes, norm, bool(deterministic),
        False)
    return TopKDegrees(degrees, touched, kept_values.detach(), kept_ids)
