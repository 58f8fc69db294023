"""Shared test helpers: one comparison harness with one tolerance policy, and inputs with controlled ties."""
import itertools

import torch

from infigw import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VALUE_MODES = ("logits", "probs", "topk_probs")
NODE_MODES = ("vocab", "rank")
NORM_MODES = ("mean", "sum", "cosine")
MODES = list(itertools.product(VALUE_MODES, NODE_MODES, NORM_MODES))


def assert_close(actual, expected, *, atol=1e-5, rtol=1e-5, name="value"):
    """Closeness with the worst element and both values in the message; NaN must stand at the same places."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.double().cpu(), expected.double().cpu()
    if a.numel() == 0:
        return
    diff = (a - e).abs()
    both_nan = torch.isnan(a) & torch.isnan(e)
    diff = torch.where(both_nan | (a == e), torch.zeros_like(diff), diff)  # equal infinities match
    bad = ~(diff <= atol + rtol * e.abs()) & ~both_nan
    if bad.any():
        worst = int(torch.argmax(torch.where(bad, diff.nan_to_num(float("inf")), torch.zeros_like(diff)).reshape(-1)))
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements differ (atol={atol}, rtol={rtol}); worst at "
            f"{index}: actual={a.reshape(-1)[worst].item():.8g} expected={e.reshape(-1)[worst].item():.8g} "
            f"(max abs diff {diff.max().item():.3g})"
        )


# ---- the tolerance policy: values against the fp32 reference, gradients relative to their largest entry ----

def tolerances(dtype):
    """(atol, rtol) for comparing a computation on ``dtype`` inputs with the fp32 reference."""
    return (1e-4, 1e-4) if dtype in (torch.float32, torch.float64) else (2e-3, 2e-3)


def grad_tolerance(dtype) -> float:
    """atol = rtol of a gradient scaled to a largest entry of 1: a few units in the last place of ``dtype``. The
    backends round each entry once to the logits' dtype; the reference's autograd rounds each path (gather,
    logsumexp) to it and adds them there."""
    return {torch.float16: 4 * 2.0 ** -10, torch.bfloat16: 4 * 2.0 ** -7}.get(dtype, 1e-5)


def assert_grad_close(actual, expected, dtype, name="grad"):
    """Gradients compared relative to their largest entry, at least 0.1: where a gradient vanishes analytically
    (the cosine norm is scale free) both sides are rounding noise."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{name}: {actual.dtype} {tuple(actual.shape)} != {expected.dtype} {tuple(expected.shape)}"
    scale = max(float(expected.float().abs().amax()) if expected.numel() else 0.0, 0.1)
    tol = grad_tolerance(dtype)
    assert_close(actual.float() / scale, expected.float() / scale, atol=tol, rtol=tol, name=name)


# ---- the harness -------------------------------------------------------------------------------------------

def forward_backward(op, logits, row_graph, num_graphs, k, values, nodes, norm, deterministic=False,
                     temperature=0.7, seed=0):
    """(TopKDegrees, dL/dlogits) of ``op`` with L = sum(w * degrees), w fixed by ``seed``."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = op(leaf, row_graph, num_graphs, k, values, temperature, nodes, norm, deterministic)
    weights = torch.randn(out.degrees.shape, generator=torch.Generator().manual_seed(seed)).to(out.degrees.device)
    (grad,) = torch.autograd.grad((out.degrees * weights).sum(), leaf)
    return out, grad


def compare_topk_degrees(op, logits, row_graph, num_graphs, k, values, nodes, norm, deterministic=False,
                         temperature=0.7, backward=True, name=""):
    """``op`` (an op-level callable of infigw.dispatch) against the reference, forward and (optionally) backward."""
    args = (row_graph, num_graphs, k, values, nodes, norm, deterministic, temperature)
    case = f"{name} {values}/{nodes}/{norm}/det={deterministic}/{logits.dtype}/k={k}"
    if backward:
        (ours, grad), (ref, ref_grad) = (forward_backward(f, logits, *args) for f in (op, reference.topk_degrees))
    else:
        ours, ref = (f(logits, row_graph, num_graphs, k, values, temperature, nodes, norm, deterministic)
                     for f in (op, reference.topk_degrees))
    valid = (row_graph >= 0).cpu()  # ids of masked rows are unspecified by the contract
    assert torch.equal(ours.kept_ids.cpu()[valid], ref.kept_ids.cpu()[valid]), f"{case}: kept ids differ (tie rule)"
    assert torch.equal(ours.touched.cpu(), ref.touched.cpu()), f"{case}: touched differs"
    assert not ours.kept_values.requires_grad, f"{case}: kept_values must be detached"
    assert not ours.kept_values.cpu()[~valid].any(), f"{case}: masked rows must keep zero values"
    atol, rtol = tolerances(logits.dtype)
    assert_close(ours.kept_values, ref.kept_values, atol=atol, rtol=rtol, name=f"{case} kept_values")
    assert_close(ours.degrees, ref.degrees, atol=atol, rtol=rtol, name=f"{case} degrees")
    if backward:
        assert not grad.cpu()[~valid].any(), f"{case}: masked rows must get a zero gradient"
        assert_grad_close(grad, ref_grad, logits.dtype, name=f"{case} grad")
    return ours


def compare_sorted_gw1d(op, x, y, lengths, name=""):
    """``op`` against the reference: value and both gradients (L = sum(w * value), w fixed)."""
    weights = torch.linspace(-1, 2, x.shape[0], device=x.device)
    results = []
    for f in (op, reference.sorted_gw1d):
        leaves = (x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True))
        value = f(*leaves, lengths)
        results.append((value,) + torch.autograd.grad((value * weights).sum(), leaves))
    for part, ours, ref in zip(("value", "grad x", "grad y"), *results):
        scale = max(float(ref.detach().abs().amax()) if ref.numel() else 0.0, 1.0)
        assert_close(ours, ref, atol=1e-5 * scale, rtol=1e-5, name=f"{name} gw1d {part}")


# ---- inputs ------------------------------------------------------------------------------------------------

def tied_logits(*shape, levels=5, generator=None, dtype=torch.float32):
    """Integer-valued logits in [0, levels): many exact ties at every k."""
    return torch.randint(0, levels, shape, generator=generator).to(dtype)


def random_mask(batch, length, generator=None, empty_rows=(), p=0.7):
    """(batch, length) bool with roughly p valid; rows in ``empty_rows`` fully masked."""
    mask = torch.rand(batch, length, generator=generator) < p
    mask[:, 0] = True
    for row in empty_rows:
        mask[row] = False
    return mask


def rows_of(mask):
    """row_graph (B*T,) for sequence scope from a (B, T) mask."""
    graph = torch.arange(mask.shape[0]).unsqueeze(-1).expand_as(mask)
    return torch.where(mask, graph, -1).reshape(-1)


def sorted_lists(generator, rows, width, scale=1.0, offset=0.0, device="cpu"):
    """(rows, width) f32 lists sorted descending."""
    return (torch.randn(rows, width, generator=generator) * scale + offset).sort(-1, descending=True).values.to(device)

