"""Stages 3-4 of the reference: sort/compress and the closed forms, against loops, double sums and brute force.
The properties every backend of sorted_gw1d owes (exact zero, never negative, precision) are in
test_sorted_gw1d.py."""
import itertools

import pytest
import torch

import infigw.functional as F
from infigw.exact_gw import brute_force_gw, line_distance_matrix
from infigw.reference import sorted_gw1d, sorted_degrees, sorted_l1

from .helpers import assert_close


def gw_cost_double_sum(x, y):
    """sum_{i,j} ((x_i - x_j)^2 - (y_i - y_j)^2)^2 in fp64, O(n^2)."""
    return ((line_distance_matrix(x) - line_distance_matrix(y)) ** 2).sum()


def gw1d_brute_force(x, y):
    """Exact 1-D GW (equal n, uniform weights): the best permutation of the squared-distance matrices."""
    return torch.tensor(brute_force_gw(line_distance_matrix(x), line_distance_matrix(y)).value)


def test_sorted_degrees_orders_truncates_and_zero_pads():
    degrees = torch.tensor([[-3.0, 5.0, 0.0, -1.0, 7.0], [2.0, 2.0, 9.0, 1.0, 4.0]])
    touched = torch.tensor([[True, True, False, True, False], [True, True, True, True, True]])
    lists, counts = sorted_degrees(degrees, touched)
    # untouched entries never enter the list, even when larger than a touched negative degree
    assert lists.tolist() == [[5.0, -1.0, -3.0, 0.0, 0.0], [9.0, 4.0, 2.0, 2.0, 1.0]]
    assert counts.tolist() == [3, 5]
    lists, counts = sorted_degrees(degrees, touched, num_nodes=2)
    assert lists.tolist() == [[5.0, -1.0], [9.0, 4.0]] and counts.tolist() == [2, 2]


def test_sorted_l1_matches_loop():
    g = torch.Generator().manual_seed(0)
    f, h = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    expected = torch.tensor([sum(abs(float(a) - float(b)) for a, b in zip(f[i], h[i])) for i in range(4)])
    assert_close(sorted_l1(f, h), expected, name="sorted L1")


def test_sorted_l1_of_overflowed_degrees_is_never_nan():
    """Degrees that overflowed fp32 (issue 14, defect 14): equal infinities count 0, an infinity against a finite
    entry is infinite; no NaN in the value or the gradient."""
    inf = float("inf")
    f = torch.tensor([[inf, 2.0, 1.0], [inf, 1.0, 0.0], [3.0, 2.0, -inf]], requires_grad=True)
    g = torch.tensor([[inf, 1.0, 1.0], [5.0, 1.0, 0.0], [3.0, 2.0, -inf]], requires_grad=True)
    value = sorted_l1(f, g)
    assert value.tolist() == [1.0, inf, 0.0]
    grad_f, grad_g = torch.autograd.grad(value.sum(), (f, g))
    assert grad_f.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert torch.equal(grad_g, -grad_f)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 31])
def test_gw1d_matches_double_sum_of_best_matching(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=g).sort(-1, descending=True).values * 4 + 10  # un-centred on purpose
    y = torch.randn(6, n, generator=g).sort(-1, descending=True).values
    lengths = torch.full((6,), n)
    for i in range(6):
        identity = gw_cost_double_sum(x[i], y[i])
        anti = gw_cost_double_sum(x[i], y[i].flip(0))
        expected = min(identity, anti) / n**2
        assert_close(sorted_gw1d(x[i:i + 1], y[i:i + 1], lengths[i:i + 1]), expected.float().view(1), rtol=1e-5,
                     atol=1e-5, name=f"gw1d row {i}")


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_gw1d_is_exact_for_small_n(n):
    g = torch.Generator().manual_seed(10 + n)
    for _ in range(4):
        x = torch.randn(n, generator=g).sort(descending=True).values
        y = torch.randn(n, generator=g).sort(descending=True).values
        closed = sorted_gw1d(x.unsqueeze(0), y.unsqueeze(0), torch.tensor([n]))
        assert_close(closed, gw1d_brute_force(x, y).float().view(1), rtol=1e-5, atol=1e-6, name=f"n={n}")


def test_gw1d_is_an_upper_bound_at_n7():
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = torch.randn(7, generator=g).sort(descending=True).values
        y = torch.randn(7, generator=g).sort(descending=True).values
        closed = float(sorted_gw1d(x.unsqueeze(0), y.unsqueeze(0), torch.tensor([7])))
        assert closed >= float(gw1d_brute_force(x, y)) * (1 - 1e-6)


def test_gw1d_lengths_and_empty_sets():
    x = torch.tensor([[3.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([[5.0, 2.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    out = sorted_gw1d(x, y, torch.tensor([3, 0]))
    expected = min(gw_cost_double_sum(x[0, :3], y[0, :3]), gw_cost_double_sum(x[0, :3], y[0, :3].flip(0))) / 9
    assert_close(out, torch.stack([expected.float(), torch.tensor(0.0)]), atol=1e-5, name="lengths")


def test_gw1d_is_translation_invariant_and_stable_for_large_offsets():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, generator=g).sort(-1, descending=True).values
    y = torch.randn(2, 50, generator=g).sort(-1, descending=True).values
    lengths = torch.full((2,), 50)
    base = sorted_gw1d(x, y, lengths)
    assert_close(sorted_gw1d(x + 1e4, y - 3e3, lengths), base, rtol=1e-3, atol=1e-4, name="shifted")


def test_public_sorted_gw1d_sorts_point_sets():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 2, 6, generator=g), torch.randn(3, 2, 6, generator=g)
    out = F.sorted_gw1d(x, y)
    assert out.shape == (3, 2)
    for i, j in itertools.product(range(3), range(2)):
        expected = gw1d_brute_force(x[i, j], y[i, j])  # n = 6: the closed form is exact
        assert_close(out[i, j], expected.float(), rtol=1e-5, atol=1e-6, name=f"set {i},{j}")


def test_closed_forms_gradcheck():
    g = torch.Generator().manual_seed(6)
    f = torch.randn(3, 7, generator=g, dtype=torch.float64).sort(-1, descending=True).values.requires_grad_()
    h = torch.randn(3, 7, generator=g, dtype=torch.float64).sort(-1, descending=True).values.requires_grad_()
    torch.autograd.gradcheck(sorted_l1, (f, h))
    torch.autograd.gradcheck(lambda a, b: sorted_gw1d(a, b, torch.tensor([7, 5, 3])), (f, h))
    torch.autograd.gradcheck(lambda a, b: F.sorted_gw1d(a, b), (f, h))
