"""pytest-benchmark: GLD's closed forms against POT's GW solvers on the same co-activation graphs.

Run: ``pytest benchmarks/test_bench_gw.py --benchmark-group-by=param:n`` (not part of the CI test run; the
CLI ``python -m benchmarks.gw_compare`` gives the full time-vs-n curves and the agreement report).
GLD rows time the per-graph closed form on the graphs' degree vectors (sort both sides + the distance op,
as ``gld_loss`` does after its degree pass); solver rows time one solve on the dense (n, n) graphs.
"""
import pytest
import torch

from benchmarks.gw_compare.harness import gld_closed_form, timing_graphs
from infigw import exact_gw as gw

pytest.importorskip("pytest_benchmark")
pytest.importorskip("ot")

SIZES = (64, 256, 1000)
ENTROPIC_MAX_N = 256  # POT's entropic solver takes minutes beyond this on 2 CPU cores


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"n={n}")
def graphs(request):
    n = request.param
    C, D = timing_graphs(n, seed=n)
    return n, C, D


@pytest.mark.parametrize("distance", ["l1", "gw1d"])
def test_gld_closed_form(benchmark, graphs, distance):
    n, C, D = graphs
    student, teacher = C.sum(dim=1).float()[None], D.sum(dim=1).float()[None]
    touched = torch.ones(1, n, dtype=torch.bool)
    value = benchmark(gld_closed_form(distance, torch.device("cpu")), student, teacher, touched)
    if distance == "l1":  # GLD's l1 / n² is the contract's lower bound computed from the graphs
        assert abs(float(value[0]) / n**2 - gw.degree_lower_bound(C, D)) <= 1e-5 * gw.degree_lower_bound(C, D)


def test_pot_conditional_gradient(benchmark, graphs):
    n, C, D = graphs
    result = benchmark.pedantic(gw.pot_gw, args=(C, D), rounds=1 if n >= 1000 else 3, iterations=1)
    assert gw.gw_cost(C, D, result.coupling, loss="abs") >= gw.degree_lower_bound(C, D) * (1 - 1e-9)


def test_pot_entropic(benchmark, graphs):
    n, C, D = graphs
    if n > ENTROPIC_MAX_N:
        pytest.skip(f"entropic GW beyond n={ENTROPIC_MAX_N} is too slow for this benchmark")
    result = benchmark.pedantic(gw.pot_entropic_gw, args=(C, D), kwargs=dict(tol=1e-6, sinkhorn_tol=1e-6),
                                rounds=1, iterations=1)
    assert result.value >= 0
