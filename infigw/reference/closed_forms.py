"""Stages 3-4 of GLD: sort/compress the degrees, then the closed-form distances between sorted lists.

Honesty notes (docs/math.md §4):
- ``sorted_gw1d`` is min(identity, anti-identity) of the 1-D GW problem with squared-distance costs. It is the
  cost of a feasible matching, hence an *upper bound* on 1-D GW; it is exact for n <= 6 but not in general
  (Beinert, Heiss and Steidl give counterexamples for n > 6).
- ``sorted_l1`` on degrees is a surrogate: GW_1(C, D) >= (1/n^2) * sorted_l1(f, g) for uniform node weights.
"""
import torch

from ..contract import compute_dtype


def sorted_degrees(degrees: torch.Tensor, touched: torch.Tensor, num_nodes=None):
    """Descending degrees of the touched nodes, truncated to ``num_nodes`` and zero beyond the touched count.

    Args:
        degrees: (G, M) f32; touched: (G, M) bool; num_nodes: keep at most this many (None = all).
    Returns:
        sorted (G, L) f32 with L = min(M, num_nodes), and counts (G,) int64 = min(#touched, L).
    """
    width = degrees.shape[-1] if num_nodes is None else min(int(num_nodes), degrees.shape[-1])
    key = torch.where(touched, degrees.detach(), torch.tensor(float("-inf"), device=degrees.device))
    # stable: equal degrees keep ascending node order, so every backend pairs gradients the same way
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :width]
    counts = touched.sum(-1).clamp_max(width)
    in_list = torch.arange(width, device=degrees.device) < counts.unsqueeze(-1)
    ordered = degrees.gather(-1, order)
    return torch.where(in_list, ordered, torch.zeros_like(ordered)), counts


def pad_to(lists: torch.Tensor, width: int) -> torch.Tensor:
    """Append zero columns to (G, L) up to (G, width)."""
    return torch.nn.functional.pad(lists, (0, width - lists.shape[-1]))


def sorted_l1(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_i |f_i - g_i| per row of two (G, L) descending zero-padded lists; d|u|/du = sign(u), 0 at 0.

    Equal entries count 0, equal infinities included: degrees that overflowed fp32 give an infinite distance
    against a finite one, never inf - inf = NaN.
    """
    dtype = compute_dtype(f.dtype)
    f, g = f.to(dtype), g.to(dtype)
    return torch.where(f == g, torch.zeros((), dtype=dtype, device=f.device), f - g).abs().sum(-1)


def _matching_cost(d, s, n):
    """sum_{i,j} (d_i - d_j)^2 (s_i - s_j)^2 of centred d, s (zero beyond the n points), from power sums.

    With sum d = sum s = 0 only non-negative terms remain (csrc/formulas.h, docs/math.md §4).
    """
    dd, ss = d * d, s * s
    return 2 * dd.sum(-1) * ss.sum(-1) + 2 * n * (dd * ss).sum(-1) + 4 * (d * s).sum(-1).pow(2)


def sorted_gw1d(x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """1-D GW closed form between descending lists whose first ``lengths[g]`` entries are the points.

    (1/n^2) * min(cost(x, y), cost(x, reversed y)) with cost(x, y) = sum_{i,j} ((x_i-x_j)^2 - (y_i-y_j)^2)^2.
    Each term factors into (d_i - d_j)^2 (s_i - s_j)^2 with d = x - y, s = x + y of the matched pairs, and the
    cost is translation invariant in d and in s: both are centred in fp64, after which the power-sum expansion
    has only non-negative terms (:func:`_matching_cost`): exactly 0 when x = y, never negative, and free of the
    cancellation of the S4(x) + S4(y) - 2 X(x, y) form. 0 where n = 0; +inf where a list holds an infinite point
    (NaN where it holds a NaN), with no gradient through such a list. The gradient follows the chosen matching
    (identity on a tie).

    Args:
        x, y: (G, L) f32, descending within the first n entries. lengths: (G,) int64, 0 <= n <= L.
    Returns:
        (G,) f32.
    """
    width = x.shape[-1]
    position = torch.arange(width, device=x.device)
    inside = position < lengths.unsqueeze(-1)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    n = lengths.to(torch.float64)
    xd = torch.where(inside, x.double(), zero)
    yd = torch.where(inside, y.double(), zero)
    finite = torch.isfinite(xd).all(-1) & torch.isfinite(yd).all(-1)
    xd = torch.where(finite.unsqueeze(-1), xd, zero)  # no NaN into the sums (and their gradient) of such lists
    yd = torch.where(finite.unsqueeze(-1), yd, zero)

    def centred(a):
        mean = a.sum(-1, keepdim=True) / n.clamp_min(1).unsqueeze(-1)
        return torch.where(inside, a - mean, zero)

    def cost(partner):
        return _matching_cost(centred(xd - partner), centred(xd + partner), n)

    # anti-identity: y reversed within its first n entries
    reversed_index = torch.where(inside, lengths.unsqueeze(-1) - 1 - position, position)
    identity, anti = cost(yd), cost(yd.gather(-1, reversed_index))
    best = torch.where(identity <= anti, identity, anti) / n.clamp_min(1).pow(2)
    has_nan = (torch.isnan(x) & inside).any(-1) | (torch.isnan(y) & inside).any(-1)
    best = torch.where(finite, best, torch.where(has_nan, float("nan"), float("inf")))
    return torch.where(n > 0, best, zero).to(compute_dtype(x.dtype))
