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
    """sum_i |f_i - g_i| per row of two (G, L) descending zero-padded lists; d|u|/du = sign(u), 0 at 0."""
    dtype = compute_dtype(f.dtype)
    return (f.to(dtype) - g.to(dtype)).abs().sum(-1)


def _cross(a, b, n):
    """sum_{i,j} (a_i - a_j)^2 (b_i - b_j)^2 for paired points a_i, b_i, from power sums (docs/math.md §4)."""
    a2, b2 = a * a, b * b
    sa1, sa2, sb1, sb2 = a.sum(-1), a2.sum(-1), b.sum(-1), b2.sum(-1)
    return 2 * sa2 * sb2 + 2 * (n * (a2 * b2).sum(-1) - 2 * sb1 * (a2 * b).sum(-1)
                                - 2 * sa1 * (a * b2).sum(-1) + 2 * (a * b).sum(-1).pow(2))


def _matching_cost(x, y, n):
    """cost(x, y) = sum_{i,j} ((x_i - x_j)^2 - (y_i - y_j)^2)^2 for the pairing x_i <-> y_i.

    Each term factors as (d_i - d_j)^2 (s_i - s_j)^2 with d = x - y, s = x + y, so the cost is the cross sum of
    (d, s): algebraically the contract's S4(x) + S4(y) - 2 X(x, y), but exactly 0 when x = y and free of that
    form's cancellation between two large quartic terms.
    """
    return _cross(x - y, x + y, n)


def sorted_gw1d(x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """1-D GW closed form between descending lists whose first ``lengths[g]`` entries are the points.

    (1/n^2) * min(cost(x, y), cost(x, reversed y)) with cost(x, y) = sum_{i,j} ((x_i-x_j)^2 - (y_i-y_j)^2)^2,
    from fp64 power sums of the centred points (see :func:`_matching_cost`); 0 where n = 0. The gradient follows the chosen
    matching (identity on a tie).

    Args:
        x, y: (G, L) f32, descending within the first n entries. lengths: (G,) int64, 0 <= n <= L.
    Returns:
        (G,) f32.
    """
    width = x.shape[-1]
    n = lengths.to(torch.float64).unsqueeze(-1)
    position = torch.arange(width, device=x.device)
    inside = position < lengths.unsqueeze(-1)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)

    def centred(a):
        a = torch.where(inside, a.double(), zero)
        mean = a.sum(-1, keepdim=True) / n.clamp_min(1)
        return torch.where(inside, a - mean, zero)

    xc, yc = centred(x), centred(y)
    # anti-identity: y reversed within its first n entries
    reversed_index = torch.where(inside, lengths.unsqueeze(-1) - 1 - position, position)
    yc_rev = yc.gather(-1, reversed_index)
    n = n.squeeze(-1)
    identity = _matching_cost(xc, yc, n)
    anti = _matching_cost(xc, yc_rev, n)
    best = torch.where(identity <= anti, identity, anti)
    return torch.where(n > 0, best / n.clamp_min(1).pow(2), zero).to(compute_dtype(x.dtype))
