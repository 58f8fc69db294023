"""Shared test helpers: verbose closeness checks, logits with controlled ties, backend/device lists."""
import os

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VALUE_MODES = ("logits", "probs", "topk_probs")
NODE_MODES = ("vocab", "rank")
NORM_MODES = ("mean", "sum", "cosine")


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
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    bad = ~(diff <= atol + rtol * e.abs()) & ~both_nan
    if bad.any():
        worst = int(torch.argmax(torch.where(bad, diff, torch.zeros_like(diff)).reshape(-1)))
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements differ (atol={atol}, rtol={rtol}); worst at "
            f"{index}: actual={a.reshape(-1)[worst].item():.8g} expected={e.reshape(-1)[worst].item():.8g} "
            f"(max abs diff {diff.max().item():.3g})"
        )


def tolerances(dtype):
    """(atol, rtol) for comparing a computation on ``dtype`` inputs with the fp32 reference."""
    return (1e-4, 1e-4) if dtype in (torch.float32, torch.float64) else (2e-3, 2e-3)


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


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
