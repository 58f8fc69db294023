"""The sorted closed forms in Triton, batched over rows: sorted L1 and the 1-D GW closed form (fwd + bwd).

``sorted_gw1d`` accumulates its centred power sums in fp64. Triton emits native fp64 arithmetic on every
NVIDIA architecture, so no compensated-fp32 variant is needed: on GPUs with slow fp64 (consumer parts) the
cost stays O(L) per row and is tiny next to the top-k pass. The backward recomputes the sums (two streaming
passes) rather than saving them, and follows the branch the forward chose (identity on a tie).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .topk_degrees import check_device

_BLOCK = 1024


@triton.jit
def _gw_sums(x_row, y_row, n, BLOCK: tl.constexpr):
    """fp64 power sums of the centred first n points of x and y, paired by identity and by anti-identity."""
    acc_x = tl.zeros([BLOCK], tl.float64)
    acc_y = tl.zeros([BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        inside = i < n
        acc_x += tl.load(x_row + i, mask=inside, other=0.0).to(tl.float64)
        acc_y += tl.load(y_row + i, mask=inside, other=0.0).to(tl.float64)
    count = tl.maximum(n, 1).to(tl.float64)
    mean_x = tl.sum(acc_x) / count
    mean_y = tl.sum(acc_y) / count
    zero = tl.zeros([BLOCK], tl.float64)
    x1, x2, x3, x4, y1, y2, y3, y4 = zero, zero, zero, zero, zero, zero, zero, zero
    xy, x2y2, x2y, xy2 = zero, zero, zero, zero  # identity pairing (x_i, y_i)
    xr, x2r2, x2r, xr2 = zero, zero, zero, zero  # anti-identity pairing (x_i, y_{n-1-i})
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        inside = i < n
        x = tl.where(inside, tl.load(x_row + i, mask=inside, other=0.0).to(tl.float64) - mean_x, 0.0)
        y = tl.where(inside, tl.load(y_row + i, mask=inside, other=0.0).to(tl.float64) - mean_y, 0.0)
        r = tl.where(inside, tl.load(y_row + (n - 1 - i), mask=inside, other=0.0).to(tl.float64) - mean_y, 0.0)
        xx = x * x
        yy = y * y
        rr = r * r
        x1 += x
        x2 += xx
        x3 += xx * x
        x4 += xx * xx
        y1 += y
        y2 += yy
        y3 += yy * y
        y4 += yy * yy
        xy += x * y
        x2y2 += xx * yy
        x2y += xx * y
        xy2 += x * yy
        xr += x * r
        x2r2 += xx * rr
        x2r += xx * r
        xr2 += x * rr
    return (mean_x, mean_y, tl.sum(x1), tl.sum(x2), tl.sum(x3), tl.sum(x4), tl.sum(y1), tl.sum(y2), tl.sum(y3),
            tl.sum(y4), tl.sum(xy), tl.sum(x2y2), tl.sum(x2y), tl.sum(xy2), tl.sum(xr), tl.sum(x2r2),
            tl.sum(x2r), tl.sum(xr2))


@triton.jit
def _gw_costs(n, x1, x2, x3, x4, y1, y2, y3, y4, xy, x2y2, x2y, xy2, xr, x2r2, x2r, xr2):
    """cost(identity), cost(anti-identity) = S4(x) + S4(y) - 2 X(x, y) (docs/math.md §4)."""
    quartic = 2 * n * x4 - 8 * x3 * x1 + 6 * x2 * x2 + 2 * n * y4 - 8 * y3 * y1 + 6 * y2 * y2
    identity = quartic - 2 * (2 * x2 * y2 + 2 * (n * x2y2 - 2 * y1 * x2y - 2 * x1 * xy2 + 2 * xy * xy))
    anti = quartic - 2 * (2 * x2 * y2 + 2 * (n * x2r2 - 2 * y1 * x2r - 2 * x1 * xr2 + 2 * xr * xr))
    return identity, anti


@triton.jit
def _gw1d_kernel(x_ptr, y_ptr, len_ptr, out_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + row), 0), width)
    (_, _, x1, x2, x3, x4, y1, y2, y3, y4, xy, x2y2, x2y, xy2, xr, x2r2, x2r, xr2) = _gw_sums(
        x_ptr + row * width, y_ptr + row * width, n, BLOCK)
    nf = n.to(tl.float64)
    identity, anti = _gw_costs(nf, x1, x2, x3, x4, y1, y2, y3, y4, xy, x2y2, x2y, xy2, xr, x2r2, x2r, xr2)
    best = tl.minimum(identity, anti)
    tl.store(out_ptr + row, tl.where(n > 0, best / tl.maximum(nf * nf, 1.0), 0.0).to(tl.float32))


@triton.jit
def _gw1d_backward_kernel(grad_ptr, x_ptr, y_ptr, len_ptr, grad_x_ptr, grad_y_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + row), 0), width)
    x_row = x_ptr + row * width
    y_row = y_ptr + row * width
    (mean_x, mean_y, x1, x2, x3, x4, y1, y2, y3, y4, xy, x2y2, x2y, xy2, xr, x2r2, x2r, xr2) = _gw_sums(
        x_row, y_row, n, BLOCK)
    nf = n.to(tl.float64)
    identity, anti = _gw_costs(nf, x1, x2, x3, x4, y1, y2, y3, y4, xy, x2y2, x2y, xy2, xr, x2r2, x2r, xr2)
    use_anti = anti < identity
    # Sums of the chosen pairing (x_i, p_i), p = y or y reversed within the first n entries.
    s_xp = tl.where(use_anti, xr, xy)
    s_x2p = tl.where(use_anti, x2r, x2y)
    s_xp2 = tl.where(use_anti, xr2, xy2)
    scale = tl.load(grad_ptr + row).to(tl.float64) / tl.maximum(nf * nf, 1.0)
    # The cost is translation invariant, so its gradient at the centred points already sums to zero and
    # equals the gradient through the centring.
    for start in range(0, width, BLOCK):
        i = start + tl.arange(0, BLOCK)
        inside = i < n
        src = tl.where(use_anti, n - 1 - i, i)
        x = tl.where(inside, tl.load(x_row + i, mask=inside, other=0.0).to(tl.float64) - mean_x, 0.0)
        p = tl.where(inside, tl.load(y_row + src, mask=inside, other=0.0).to(tl.float64) - mean_y, 0.0)
        dquartic_x = 8 * nf * x * x * x - 8 * (3 * x * x * x1 + x3) + 24 * x2 * x
        dquartic_p = 8 * nf * p * p * p - 8 * (3 * p * p * y1 + y3) + 24 * y2 * p
        dcross_x = 4 * x * y2 + 2 * (2 * nf * x * p * p - 4 * y1 * x * p - 2 * s_xp2 - 2 * x1 * p * p + 4 * s_xp * p)
        dcross_p = 4 * p * x2 + 2 * (2 * nf * x * x * p - 2 * s_x2p - 2 * y1 * x * x - 4 * x1 * x * p + 4 * s_xp * x)
        grad_x = tl.where(inside, scale * (dquartic_x - 2 * dcross_x), 0.0)
        grad_p = tl.where(inside, scale * (dquartic_p - 2 * dcross_p), 0.0)
        on_row = i < width
        tl.store(grad_x_ptr + row * width + i, grad_x.to(tl.float32), mask=on_row)
        tl.store(grad_y_ptr + row * width + tl.where(inside, src, i), grad_p.to(tl.float32), mask=on_row)


# ----------------------------------------------------------------------------------------------- launchers


def _block(width: int) -> int:
    return min(_BLOCK, max(16, triton.next_power_of_2(width)))


@triton_op("infigw_triton::sorted_gw1d", mutates_args=())
def _gw1d_op(x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    rows, width = x.shape
    out = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        wrap_triton(_gw1d_kernel)[(rows,)](x, y, lengths, out, width, BLOCK=_block(width))
    return out


@triton_op("infigw_triton::sorted_gw1d_backward", mutates_args=())
def _gw1d_backward_op(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, width = x.shape
    grad_x, grad_y = torch.empty_like(x), torch.empty_like(y)
    if rows:
        wrap_triton(_gw1d_backward_kernel)[(rows,)](
            grad.contiguous(), x, y, lengths, grad_x, grad_y, width, BLOCK=_block(width))
    return grad_x, grad_y


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gw1d_backward(ctx, grad):
    grad_x, grad_y = torch.ops.infigw_triton.sorted_gw1d_backward(grad, *ctx.saved_tensors)
    return grad_x, grad_y, None


torch.library.register_autograd("infigw_triton::sorted_gw1d", _gw1d_backward, setup_context=_save_inputs)


# --------------------------------------------------------------------------------------------- op-level API


def _check_pair(name_a, a, name_b, b) -> None:
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (G, L) tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 for the triton backend, got {t.dtype}")
    if a.shape != b.shape or a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must share shape and device, got {tuple(a.shape)} on {a.device} "
                         f"and {tuple(b.shape)} on {b.device}")


def sorted_gw1d(x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """1-D GW closed form between descending (G, L) f32 lists of lengths[g] points -> (G,) f32.

    ``lengths`` must lie in [0, L] (the kernels clamp to that range rather than read out of bounds).
    """
    _check_pair("x", x, "y", y)
    if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int64 or lengths.shape != x.shape[:1]:
        raise ValueError(f"lengths must be an int64 tensor of shape ({x.shape[0]},), got "
                         f"{getattr(lengths, 'dtype', type(lengths))} {tuple(getattr(lengths, 'shape', ()))}")
    if lengths.device != x.device:
        raise ValueError(f"lengths is on {lengths.device} but x on {x.device}")
    check_device(x, "x")
    return torch.ops.infigw_triton.sorted_gw1d(x.contiguous(), y.contiguous(), lengths.contiguous())
