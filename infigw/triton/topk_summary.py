"""The student's top-k summary (op ``topk_summary``, docs/math.md §2 and §7) in Triton, forward and backward.

Forward, one program per valid row, one read of the row: the threshold-gated top-k selection of
:mod:`infigw.triton.topk_degrees` (the contract's tie rule), the online logsumexp at the loss temperature and,
for the cross-entropy, at temperature 1, and the gold logit. Invalid rows are never read (zeros out).
Backward writes the logits gradient once per entry: one dense pass
``grad_lse * softmax(x / T) / T + grad_unit * softmax(x)``, then the k kept entries and the gold entry are added
(the scatter kernel of :mod:`infigw.triton.topk_degrees`). The full-vocabulary ULD of the fused op
``topk_summary_uld`` has no Triton kernel: on the GPU it runs as ``uld_full`` (CUDA).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import check_device, padded
from .topk_degrees import (_I64_MAX, _I64_MIN, _LOW32, MAX_K, _from_order_key, _insert_tile, _logsumexp_step,
                           _max_with_nan, _order_key, _scatter_grad_kernel, _vocab_block)


@triton.jit
def _summary_rows_kernel(
    x_ptr, x_row_stride, vocab, valid_ptr, gold_ptr, kept_ptr, ids_ptr, lse_ptr, unit_ptr, gold_logit_ptr, inv_temp,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr, UNIT: tl.constexpr, GOLD: tl.constexpr,
):
    inv_temp = tl.cast(inv_temp, tl.float32)  # torch.compile passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, K_PAD)
    in_k = slot < K
    valid = tl.load(valid_ptr + row).to(tl.int1)
    kept_x = tl.zeros([K_PAD], tl.float32)
    kept_id = tl.zeros([K_PAD], tl.int64)
    lse = 0.0
    unit = 0.0
    gold_logit = 0.0
    if valid:
        x_row = x_ptr + row * x_row_stride
        best = tl.full([K_PAD], _I64_MIN, tl.int64) + slot  # distinct sentinels below every real key
        lowest = tl.min(tl.where(in_k, best, _I64_MAX))
        threshold = (lowest >> 32).to(tl.int32)
        run_max = float("-inf")
        run_sum = 0.0
        unit_max = float("-inf")
        unit_sum = 0.0
        for start in range(0, vocab, BLOCK_V):
            ids = start + tl.arange(0, BLOCK_V)
            inside = ids < vocab
            x = tl.load(x_row + ids, mask=inside, other=float("-inf")).to(tl.float32)
            x_max = tl.reduce(x, 0, _max_with_nan)
            run_max, run_sum = _logsumexp_step(run_max, run_sum, x, x_max, inv_temp)
            if UNIT:
                unit_max, unit_sum = _logsumexp_step(unit_max, unit_sum, x, x_max, 1.0)
            if _order_key(x_max) > threshold:  # later tiles have larger ids: an equal value loses the tie
                best, lowest = _insert_tile(x, ids, inside, best, lowest, in_k)
                threshold = (lowest >> 32).to(tl.int32)
        best = tl.sort(best, descending=True)  # k <= V: the first K slots are real keys, in rank order
        kept_x = _from_order_key((best >> 32).to(tl.int32))
        kept_id = _LOW32 - (best & _LOW32)
        lse = run_max + tl.log(run_sum)
        if UNIT:
            unit = unit_max + tl.log(unit_sum)
        if GOLD:
            gold_logit = tl.load(x_row + tl.load(gold_ptr + row)).to(tl.float32)
    tl.store(kept_ptr + row * K + slot, kept_x, mask=in_k)
    tl.store(ids_ptr + row * K + slot, kept_id, mask=in_k)
    tl.store(lse_ptr + row, lse)
    if UNIT:
        tl.store(unit_ptr + row, unit)
    if GOLD:
        tl.store(gold_logit_ptr + row, gold_logit)


@triton.jit
def _summary_dense_grad_kernel(x_ptr, x_row_stride, grad_ptr, vocab, valid_ptr, lse_ptr, grad_lse_ptr, unit_ptr,
                               grad_unit_ptr, inv_temp, BLOCK_V: tl.constexpr, UNIT: tl.constexpr):
    """grad_lse * softmax(x / T) / T (+ grad_unit * softmax(x)) over the row; 0 on invalid rows."""
    inv_temp = tl.cast(inv_temp, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    valid = tl.load(valid_ptr + row).to(tl.int1)
    lse = tl.load(lse_ptr + row)
    coef = tl.where(valid, tl.load(grad_lse_ptr + row) * inv_temp, 0.0)
    unit = 0.0
    unit_coef = 0.0
    if UNIT:
        unit = tl.load(unit_ptr + row)
        unit_coef = tl.where(valid, tl.load(grad_unit_ptr + row), 0.0)
    for start in range(0, vocab, BLOCK_V):
        ids = start + tl.arange(0, BLOCK_V)
        inside = ids < vocab
        x = tl.load(x_ptr + row * x_row_stride + ids, mask=inside & valid, other=0.0).to(tl.float32)
        g = tl.where(valid, coef * tl.exp(x * inv_temp - lse), 0.0)
        if UNIT:
            g += tl.where(valid, unit_coef * tl.exp(x - unit), 0.0)
        tl.store(grad_ptr + row * vocab + ids, g.to(grad_ptr.dtype.element_ty), mask=inside)


@triton_op("infigw_triton::topk_summary", mutates_args=())
def _topk_summary_op(logits: torch.Tensor, row_valid: torch.Tensor, k: int, temperature: float,
                     gold: Optional[torch.Tensor], unit_lse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                             torch.Tensor, torch.Tensor]:
    rows, vocab = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    kept = torch.empty(rows, k, **f32)
    ids = torch.empty(rows, k, dtype=torch.int64, device=logits.device)
    lse = torch.empty(rows, **f32)
    unit = torch.empty(rows if unit_lse else 0, **f32)
    gold_logit = torch.empty(rows if gold is not None else 0, **f32)
    if rows:
        block, warps = _vocab_block(vocab, logits.dtype)
        wrap_triton(_summary_rows_kernel)[(rows,)](
            logits, logits.stride(0), vocab, row_valid, gold if gold is not None else ids, kept, ids, lse,
            unit if unit_lse else lse, gold_logit if gold is not None else lse, 1.0 / temperature,
            K=k, K_PAD=padded(k), BLOCK_V=block, UNIT=unit_lse, GOLD=gold is not None, num_warps=warps)
    return kept, ids, lse, unit, gold_logit


@triton_op("infigw_triton::topk_summary_backward", mutates_args=())
def _topk_summary_backward_op(grad_kept: torch.Tensor, grad_lse: torch.Tensor, grad_unit: torch.Tensor,
                              grad_gold: torch.Tensor, logits: torch.Tensor, row_valid: torch.Tensor,
                              ids: torch.Tensor, lse: torch.Tensor, unit: torch.Tensor, gold: Optional[torch.Tensor],
                              temperature: float) -> torch.Tensor:
    rows, vocab = logits.shape
    grad = torch.empty_like(logits)
    if rows == 0:
        return grad
    unit_lse = unit.numel() > 0
    block, warps = _vocab_block(vocab, logits.dtype)
    wrap_triton(_summary_dense_grad_kernel)[(rows,)](
        logits, logits.stride(0), grad, vocab, row_valid, lse, grad_lse, unit if unit_lse else lse,
        grad_unit if unit_lse else grad_lse, 1.0 / temperature, BLOCK_V=block, UNIT=unit_lse, num_warps=warps)
    row_graph = torch.where(row_valid, 0, -1)  # the scatter kernel skips rows with a negative graph
    k = ids.shape[1]
    wrap_triton(_scatter_grad_kernel)[(rows,)](grad, vocab, ids, grad_kept, row_graph, 1, K=k, K_PAD=padded(k),
                                               ACCUMULATE=True)
    if gold is not None:
        wrap_triton(_scatter_grad_kernel)[(rows,)](grad, vocab, gold, grad_gold, row_graph, 1, K=1, K_PAD=1,
                                                   ACCUMULATE=True)
    return grad


def _setup_context(ctx, inputs, output):
    logits, row_valid, _, temperature, gold, _ = inputs
    _, ids, lse, unit, _ = output
    ctx.save_for_backward(logits, row_valid, ids, lse, unit, gold)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(ids)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_kept, _ids, grad_lse, grad_unit, grad_gold):
    logits, row_valid, ids, lse, unit, gold = ctx.saved_tensors

    def given(grad, like):  # an output that did not reach the loss has no gradient
        return torch.zeros_like(like, dtype=torch.float32) if grad is None else grad.float().contiguous()

    grad_logits = torch.ops.infigw_triton.topk_summary_backward(
        given(grad_kept, ids), given(grad_lse, lse), given(grad_unit, unit),
        given(grad_gold, gold if gold is not None else unit.new_empty(0)), logits, row_valid, ids, lse, unit, gold,
        ctx.temperature)
    return grad_logits, None, None, None, None, None


torch.library.register_autograd("infigw_triton::topk_summary", _backward, setup_context=_setup_context)


def topk_summary(logits, row_valid, k: int, temperature: float, gold=None, unit_lse: bool = False):
    """The op-level callable of :mod:`infigw.dispatch` (signature of :func:`infigw.reference.topk_summary`).

    ``gold`` ids must lie in [0, V) on valid rows: the losses check the labels once per call; checking them here
    would cost a host synchronisation."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be a 2-D (N, V) tensor with V >= 1, got {getattr(logits, 'shape', logits)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits must be float32, float16 or bfloat16 for the triton backend, got {logits.dtype}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= min(logits.shape[1], MAX_K):
        raise ValueError(f"k must be an int in [1, min(V={logits.shape[1]}, {MAX_K})], got {k!r}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    rows = logits.shape[0]
    if row_valid.dtype != torch.bool or row_valid.shape != (rows,) or row_valid.device != logits.device:
        raise ValueError(f"row_valid must be a bool tensor of shape ({rows},) on {logits.device}")
    if gold is not None and (gold.dtype != torch.int64 or gold.shape != (rows,) or gold.device != logits.device):
        raise ValueError(f"gold must be an int64 tensor of shape ({rows},) on {logits.device}")
    check_device(logits, "logits")
    return torch.ops.infigw_triton.topk_summary(logits.contiguous(), row_valid.contiguous(), k, float(temperature),
                                                None if gold is None else gold.contiguous(), bool(unit_lse))
