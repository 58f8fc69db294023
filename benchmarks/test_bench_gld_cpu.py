"""pytest-benchmark baseline: GLD forward+backward on CPU at (B=4, T=512, V=32000, k=10), per backend.

Run: python -m pytest benchmarks/test_bench_gld_cpu.py --benchmark-only --benchmark-columns=median,iqr,rounds
(not part of the CI test run: testpaths is tests/). Later backends add themselves through infigw.dispatch.
"""
import pytest
import torch

import infigw
import infigw.functional as F
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
    torch.set_num_threads(torch.get_num_threads())

    def step():
        x = student.detach().requires_grad_()
        F.gld_loss(x, teacher, k=10, distance=distance, backend=backend).backward()
        return x.grad

    grad = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    assert torch.isfinite(grad).all()
