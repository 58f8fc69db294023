"""The 1-D GW closed form in Triton, batched over rows (forward and backward).

The same formulation as every backend (csrc/formulas.h, docs/math.md §4): per matching of x_i with y_p(i), the
centred d = x - y_p and s = x + y_p, and cost = 2 (sum d^2)(sum s^2) + 2 n sum d^2 s^2 + 4 (sum d s)^2 from fp64
power sums: exactly 0 when x = y, never negative. Triton emits native fp64 arithmetic on every NVIDIA
architecture, so no compensated-fp32 variant is needed: on GPUs with slow fp64 (consumer parts) the cost stays
O(L) per row and is tiny next to the top-k pass. The backward recomputes the sums (two streaming passes) rather
than saving them, and follows the branch the forward chose (identity on a tie). A list with an infinite point
costs +inf (NaN with a NaN point) and gets no gradient.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import check_device, check_index_range, check_tensor

_BLOCK = 1024
# The two matchings of x_i: with y_i, or with y_{n-1-i} (the columns of the (BLOCK, 2) tiles below).
_IDENTITY = tl.constexpr(0)
_ANTI_IDENTITY = tl.constexpr(1)


@triton.jit
def _centred(x, y, mean_x, mean_y):
    """d and s of the pair (x_i, y_p(i)), centred over the n points."""
    return (x - y) - (mean_x - mean_y), (x + y) - (mean_x + mean_y)


@triton.jit
def _load_points(row_ptr, i, inside):
    return tl.load(row_ptr + i, mask=inside, other=0.0).to(tl.float64)


@triton.jit
def _gw_sums(x_row, y_row, n, BLOCK: tl.constexpr):
    """Means of the first n points of x and y, whether one is NaN, and the power sums sum d^2, sum s^2,
    sum d^2 s^2, sum d s, sum d s^2, sum d^2 s, each a pair (identity, anti-identity): the two matchings are the
    two columns of a (BLOCK, 2) tile, partner index i or n - 1 - i."""
    acc_x = tl.zeros([BLOCK], tl.float64)
    acc_y = tl.zeros([BLOCK], tl.float64)
    nans = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        inside = i < n
        x = _load_points(x_row, i, inside)
        y = _load_points(y_row, i, inside)
        acc_x += x
        acc_y += y
        nans += ((x != x) | (y != y)).to(tl.int32)
    count = tl.maximum(n, 1).to(tl.float64)
    mean_x = tl.sum(acc_x) / count
    mean_y = tl.sum(acc_y) / count
    zero = tl.zeros([BLOCK, 2], tl.float64)
    dd, ss, ddss, ds, dss, dds = zero, zero, zero, zero, zero, zero
    for start in range(0, n, BLOCK):
        i = (start + tl.arange(0, BLOCK))[:, None]
        inside = i < n
        d, s = _centred(_load_points(x_row, i, inside), _load_points(y_row, _partner(i, n), inside), mean_x, mean_y)
        d, s = tl.where(inside, d, 0.0), tl.where(inside, s, 0.0)
        dd += d * d
        ss += s * s
        ddss += d * d * s * s
        ds += d * s
        dss += d * s * s
        dds += d * d * s
    return (mean_x, mean_y, tl.sum(nans) > 0,
            tl.sum(dd, 0), tl.sum(ss, 0), tl.sum(ddss, 0), tl.sum(ds, 0), tl.sum(dss, 0), tl.sum(dds, 0))


@triton.jit
def _partner(i, n):
    """(BLOCK, 2) partner indices of points i (BLOCK, 1): column 0 identity, column 1 anti-identity."""
    return tl.where(tl.arange(0, 2)[None, :] == _IDENTITY, i, n - 1 - i)


@triton.jit
def _pick(pair, matching):
    """The entry of a (2,) pair of one matching."""
    return tl.sum(tl.where(tl.arange(0, 2) == matching, pair, 0.0))


@triton.jit
def _finite(mean_x, mean_y):
    return (tl.abs(mean_x) < float("inf")) & (tl.abs(mean_y) < float("inf"))


@triton.jit
def _gw1d_kernel(x_ptr, y_ptr, len_ptr, out_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + row), 0), width)  # a bad length is clamped, never followed
    mean_x, mean_y, has_nan, dd, ss, ddss, ds, _, _ = _gw_sums(x_ptr + row * width, y_ptr + row * width, n, BLOCK)
    nf = n.to(tl.float64)
    best = tl.min(2 * dd * ss + 2 * nf * ddss + 4 * ds * ds) / tl.maximum(nf * nf, 1.0)
    best = tl.where(_finite(mean_x, mean_y), best, tl.where(has_nan, float("nan"), float("inf")))
    tl.store(out_ptr + row, tl.where(n > 0, best, 0.0).to(tl.float32))


@triton.jit
def _gw1d_backward_kernel(grad_ptr, x_ptr, y_ptr, len_ptr, grad_x_ptr, grad_y_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + row), 0), width)
    x_row = x_ptr + row * width
    y_row = y_ptr + row * width
    mean_x, mean_y, _, dd, ss, ddss, ds, dss, dds = _gw_sums(x_row, y_row, n, BLOCK)
    nf = n.to(tl.float64)
    cost = 2 * dd * ss + 2 * nf * ddss + 4 * ds * ds
    matching = tl.where(_pick(cost, _ANTI_IDENTITY) < _pick(cost, _IDENTITY), _ANTI_IDENTITY, _IDENTITY)
    dd, ss, ds, dss, dds = _pick(dd, matching), _pick(ss, matching), _pick(ds, matching), _pick(dss, matching), \
        _pick(dds, matching)
    scale = tl.load(grad_ptr + row).to(tl.float64) / tl.maximum(nf * nf, 1.0)
    finite = _finite(mean_x, mean_y)  # else no gradient flows
    for start in range(0, width, BLOCK):
        i = start + tl.arange(0, BLOCK)
        inside = i < n
        src = tl.where(matching == _ANTI_IDENTITY, n - 1 - i, i)
        d, s = _centred(_load_points(x_row, i, inside), _load_points(y_row, src, inside), mean_x, mean_y)
        # the derivatives of the cost in d_i and s_i (csrc/formulas.h: Gw1dSums::grad_d / grad_s)
        by_d = 4 * d * ss + 4 * nf * d * s * s + 8 * ds * s - 4 * dss
        by_s = 4 * s * dd + 4 * nf * d * d * s + 8 * ds * d - 4 * dds
        grad_x = tl.where(finite, tl.where(inside, scale * (by_d + by_s), 0.0), 0.0)
        grad_p = tl.where(finite, tl.where(inside, scale * (by_s - by_d), 0.0), 0.0)
        on_row = i < width
        tl.store(grad_x_ptr + row * width + i, grad_x.to(tl.float32), mask=on_row)
        tl.store(grad_y_ptr + row * width + tl.where(inside, src, i), grad_p.to(tl.float32), mask=on_row)


# ----------------------------------------------------------------------------------------------- launchers


def _block(width: int) -> int:
    return min(_BLOCK, max(16, triton.next_power_of_2(width)))


def _check_lists(x, y, lengths, check_data) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (G, L) tensor, got {getattr(t, 'shape', type(t))}")
    check_tensor(x, "x", torch.float32, x.shape, x.device)
    check_tensor(y, "y", torch.float32, x.shape, x.device)
    check_tensor(lengths, "lengths", torch.int64, x.shape[:1], x.device)
    check_device(x, "x")
    if check_data:
        check_index_range(lengths, "lengths", 0, x.shape[1] + 1)


@triton_op("infigw_triton::sorted_gw1d", mutates_args=())
def _gw1d_op(x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor, check_data: bool = True) -> torch.Tensor:
    _check_lists(x, y, lengths, check_data)
    x, y, lengths = x.contiguous(), y.contiguous(), lengths.contiguous()
    rows, width = x.shape
    out = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        wrap_triton(_gw1d_kernel)[(rows,)](x, y, lengths, out, width, BLOCK=_block(width))
    return out


@triton_op("infigw_triton::sorted_gw1d_backward", mutates_args=())
def _gw1d_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor,
                      check_data: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    _check_lists(x, y, lengths, check_data)
    check_tensor(grad, "grad", grad.dtype, x.shape[:1], x.device)
    x, y, lengths = x.contiguous(), y.contiguous(), lengths.contiguous()
    rows, width = x.shape
    grad_x, grad_y = torch.empty_like(x), torch.empty_like(y)
    if rows:
        wrap_triton(_gw1d_backward_kernel)[(rows,)](
            grad.contiguous(), x, y, lengths, grad_x, grad_y, width, BLOCK=_block(width))
    return grad_x, grad_y


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])


def _gw1d_backward(ctx, grad):
    grad_x, grad_y = torch.ops.infigw_triton.sorted_gw1d_backward(grad, *ctx.saved_tensors, False)
    return grad_x, grad_y, None, None


torch.library.register_autograd("infigw_triton::sorted_gw1d", _gw1d_backward, setup_context=_save_inputs)


def sorted_gw1d(x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The op-level callable of :mod:`infigw.dispatch`: 1-D GW closed form between descending (G, L) f32 lists of
    lengths[g] points -> (G,) f32. infigw built ``lengths``: not scanned (the kernels clamp to [0, L])."""
    return torch.ops.infigw_triton.sorted_gw1d(x, y, lengths, False)
