"""pytest-benchmark baselines on CPU, per backend: GLD forward+backward at (B=4, T=512, V=32000, k=10) and its
dominant op, topk_degrees, on the same logits.

Run: python -m pytest benchmarks/test_bench_gld_cpu.py --benchmark-only --benchmark-columns=median,iqr,rounds
(not part of the CI test run: testpaths is tests/). Backends come from infigw.dispatch; the full sweep with the
common CSV schema is ``python -m benchmarks.bench_topk_degrees``.
"""
import pytest
import torch

import infigw
import infigw.functional as F
from infigw import dispatch
from infigw.testing import llm_like_logits

SHAPE = dict(batch=4, seq_len=512, vocab=32000)
CPU_BACKENDS = [b for b in ("torch", "cpp") if infigw.backends()[b] == "available"]


@pytest.fixture(scope="module")
def inputs():
    student = llm_like_logits(**SHAPE, seed=0)
    teacher = llm_like_logits(**SHAPE, seed=1)
    return student, teacher


@pytest.mark.parametrize("distance", ["l1", "gw1d"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gld_forward_backward(benchmark, inputs, backend, distance):
    student, teacher = inputs

    def step():
        x = student.detach().requires_grad_()
        F.gld_loss(x, teacher, k=10, distance=distance, backend=backend).backward()
        return x.grad

    grad = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("values", ["logits", "probs"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_degrees_forward_backward(benchmark, inputs, backend, values):
    logits = inputs[0].reshape(-1, SHAPE["vocab"])
    row_graph = torch.arange(logits.shape[0]) // SHAPE["seq_len"]
    op = dispatch.resolve("topk_degrees", backend, logits.device)[1]

    def step():
        x = logits.detach().requires_grad_()
        degrees = op(x, row_graph, SHAPE["batch"], 10, values, 1.0, "vocab", "mean", False).degrees
        return torch.autograd.grad(degrees.sum(), x)[0]

    grad = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    assert torch.isfinite(grad).all()
