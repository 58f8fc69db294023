"""topk_degrees on every backend here against the reference (tests/conftest.py picks the backends): every
option, dtype and shape (odd ones, k = 1, k = V, k above the CPU buffer path, no rows), ties, special values,
masks, determinism, and the numerics every backend owes: the cosine norm's gradient finite and equal to an fp64
evaluation however small the kept probabilities, and never NaN from finite logits however large."""
import pytest
import torch

from infigw import reference
from infigw.testing import logit_pair

from .conftest import op_backends, op_cases
from .helpers import (DTYPES, MODES, NODE_MODES, NORM_MODES, VALUE_MODES, assert_close, compare_topk_degrees,
                      forward_backward, random_mask, rows_of, tied_logits)

OP = "topk_degrees"
# (rows per graph, graphs, vocab, k)
SHAPES = [(2, 3, 37, 3), (37, 3, 1271, 7), (37, 3, 1271, 1), (4, 2, 37, 37), (11, 3, 1271, 200), (0, 2, 9, 2)]


def tiny(shape):
    rows, graphs, vocab, k = shape
    return vocab <= 40


def sequences(batch, length, generator):
    """row_graph of (batch, length) sequences with random masked rows; the last sequence has none."""
    return rows_of(random_mask(batch, length, generator=generator, empty_rows=(batch - 1,)))


@pytest.mark.parametrize("values,nodes,norm", MODES)
@pytest.mark.parametrize("backend,shape", op_cases(OP, SHAPES, tiny))
def test_matches_reference(backend, shape, values, nodes, norm):
    length, batch, vocab, k = shape
    gen = torch.Generator().manual_seed(vocab + k)
    logits = (torch.randn(batch * length, vocab, generator=gen) * 3).to(backend.device)
    row_graph = sequences(batch, length, gen).to(backend.device) if length else torch.zeros(0, dtype=torch.long,
                                                                                             device=backend.device)
    compare_topk_degrees(backend.op(OP), logits, row_graph, batch, k, values, nodes, norm, name=str(backend))


@pytest.mark.parametrize("values,nodes,norm", MODES)
@pytest.mark.parametrize("backend,dtype", op_cases(OP, DTYPES, lambda dtype: True))
def test_dtypes_and_ties(backend, dtype, values, nodes, norm):
    """Integer-valued logits: many ties at the k-th value, which the contract's tie rule must break; rows of a
    graph interleaved, some masked, and a graph without rows."""
    gen = torch.Generator().manual_seed(7)
    rows, vocab = (12, 37) if backend.interpreted else (3 * 37, 1271)
    logits = tied_logits(rows, vocab, levels=6, generator=gen, dtype=dtype).to(backend.device)
    row_graph = torch.arange(rows) % 3
    row_graph[torch.rand(rows, generator=gen) < 0.25] = -1
    compare_topk_degrees(backend.op(OP), logits, row_graph.to(backend.device), 4, 7, values, nodes, norm,
                         name=str(backend))


@pytest.mark.parametrize("nodes", NODE_MODES)
@pytest.mark.parametrize("norm", NORM_MODES)
@pytest.mark.parametrize("backend", op_backends(OP))
def test_deterministic_variant(backend, norm, nodes):
    """deterministic=True matches the reference and gives the same bits on every run (and, on CPU, for any
    number of threads)."""
    gen = torch.Generator().manual_seed(5)
    rows, vocab = (12, 30) if backend.interpreted else (4 * 64, 3001)
    logits = torch.randn(rows, vocab, generator=gen).to(backend.device)
    row_graph = (torch.arange(rows) % 4).to(backend.device)  # the rows of a graph spread over every thread
    op = backend.op(OP)
    compare_topk_degrees(op, logits, row_graph, 4, 16 if vocab > 16 else 4, "probs", nodes, norm, deterministic=True)
    threads = torch.get_num_threads()
    runs = []
    try:
        for num_threads in (threads, 1, threads):
            torch.set_num_threads(num_threads)
            runs.append(op(logits, row_graph, 4, 4, "probs", 1.0, nodes, norm, True))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert torch.equal(other.degrees, runs[0].degrees), f"{norm}: deterministic degrees changed between runs"
        assert torch.equal(other.kept_values, runs[0].kept_values)


@pytest.mark.parametrize("backend", op_backends(OP))
def test_nan_is_kept_first_and_propagates(backend):
    logits = torch.randn(4, 33, generator=torch.Generator().manual_seed(3))
    logits[1, 17] = float("nan")
    row_graph = torch.tensor([0, 0, 1, 1], device=backend.device)
    ours = backend.op(OP)(logits.to(backend.device), row_graph, 2, 4, "logits", 1.0, "vocab", "mean", False)
    ref = reference.topk_degrees(logits.to(backend.device), row_graph, 2, 4, "logits", 1.0, "vocab", "mean", False)
    assert ours.kept_ids[1, 0] == 17
    assert torch.equal(ours.kept_ids, ref.kept_ids) and torch.equal(ours.touched, ref.touched)
    for name in ("kept_values", "degrees"):
        actual, expected = getattr(ours, name), getattr(ref, name)
        assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN positions differ"
        assert actual.isnan().any()
        assert_close(actual.nan_to_num(), expected.nan_to_num(), atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("values", VALUE_MODES)
@pytest.mark.parametrize("backend", op_backends(OP))
def test_minus_infinity_logits(backend, values):
    """Vocabulary entries masked with -inf (padded vocabularies): probabilities and gradients exactly 0 there."""
    gen = torch.Generator().manual_seed(29)
    rows, vocab, live = (6, 37, 30) if backend.interpreted else (18, 300, 250)
    logits = torch.randn(rows, vocab, generator=gen)
    logits[:, live:] = float("-inf")
    row_graph = rows_of(random_mask(2, rows // 2, generator=gen)).to(backend.device)
    ours = compare_topk_degrees(backend.op(OP), logits.to(backend.device), row_graph, 2, 5, values, "vocab", "mean",
                                temperature=1.3)
    assert torch.isfinite(ours.degrees).all()
    _, grad = forward_backward(backend.op(OP), logits.to(backend.device), row_graph, 2, 5, values, "vocab", "mean")
    assert not grad[:, live:].any()


@pytest.mark.parametrize("backend", op_backends(OP))
def test_signed_zeros_tie(backend):
    """-0.0 and +0.0 are equal values: the smaller id ranks first, whatever the sign bit."""
    logits = torch.zeros(2, 36)
    logits[:, ::2] = -0.0
    ids = backend.op(OP)(logits.to(backend.device), torch.zeros(2, dtype=torch.long, device=backend.device), 1, 8,
                         "logits", 1.0, "vocab", "sum", False).kept_ids
    assert torch.equal(ids.cpu(), torch.arange(8).expand(2, 8))


@pytest.mark.parametrize("backend", op_backends(OP))
def test_all_rows_masked(backend):
    logits = torch.randn(6, 20, device=backend.device, requires_grad=True)
    out = backend.op(OP)(logits, torch.full((6,), -1, device=backend.device), 2, 3, "probs", 1.0, "vocab", "cosine",
                         False)
    assert not out.degrees.any() and not out.touched.any() and not out.kept_values.any()
    (grad,) = torch.autograd.grad(out.degrees.sum(), logits)
    assert not grad.any()


# ---- numerics ------------------------------------------------------------------------------------------------

def _fp64_reference(logits, row_graph, num_graphs, k, values, temperature, nodes, norm):
    """Degrees and the gradient of sum(w * degrees) evaluated in fp64 (the reference on fp64 logits)."""
    out, grad = forward_backward(reference.topk_degrees, logits.double(), row_graph, num_graphs, k, values, nodes,
                                 norm, temperature=temperature)
    return out.degrees, grad


def _check_against_fp64(backend, logits, row_graph, num_graphs, k, values, temperature, nodes="vocab"):
    out, grad = forward_backward(backend.op(OP), logits, row_graph, num_graphs, k, values, nodes, "cosine",
                                 temperature=temperature)
    degrees64, grad64 = _fp64_reference(logits, row_graph, num_graphs, k, values, temperature, nodes, "cosine")
    assert torch.isfinite(grad).all(), f"{backend}: non-finite gradient"
    assert_close(out.degrees, degrees64, atol=1e-4, rtol=1e-4, name=f"{backend} degrees vs fp64")
    # An fp32 evaluation errs by ~eps * |dL/db| = O(1e-7) per entry (b <= 1, unit weights): that floor, or 1e-5 of
    # the largest entry.
    atol = 1e-5 * max(float(grad64.abs().max()), 1.0)
    assert_close(grad, grad64, atol=atol, rtol=1e-4, name=f"{backend} grad vs fp64")


@pytest.mark.parametrize("values", ["probs", "topk_probs"])
@pytest.mark.parametrize("backend", op_backends(OP, with_reference=True))
def test_cosine_gradient_with_tiny_probabilities(backend, values):
    """Issue 14, defect 1: kept probabilities of 1e-13 (and far below) made D^-1/2 overflow in the backward,
    giving -inf/NaN gradients from a finite loss. The repro of the issue, then rows whose kept probabilities reach
    1e-40 and 1e-69 (below float32's range: the scale is log a) at nodes shared across positions."""
    logits = torch.tensor([[30.0, 0.0, -1.0], [1.0, 0.0, -1.0], [29.0, 2.0, -3.0]], device=backend.device)
    _check_against_fp64(backend, logits, torch.tensor([0, 1, 0], device=backend.device), 2, 2, values, 1.0)
    row_graph = torch.tensor([0, 0, 1, 1, 0, 1, -1, 0], device=backend.device)
    for seed, boost in ((0, 0.0), (2, 60.0)):
        gen = torch.Generator().manual_seed(seed)
        spread = torch.randn(8, 37, generator=gen) * 12
        spread[::2, :4] += boost * torch.rand(4, 4, generator=gen)
        _check_against_fp64(backend, spread.to(backend.device), row_graph, 2, 5, values, 0.25)


@pytest.mark.parametrize("temperature", [0.5, 0.25])
@pytest.mark.parametrize("backend", [p for p in op_backends(OP, with_reference=True)
                                     if not p.values[0].interpreted])
def test_cosine_gradient_of_llm_like_logits(backend, temperature):
    """The issue's second repro: logit_pair(2, 64, 32000, "independent") at T = 0.5 and 0.25 gave NaN gradients
    (13 entries, then ~1e5); both values modes, against fp64."""
    student, _ = logit_pair(2, 64, 32000, similarity="independent")
    logits = student.reshape(-1, 32000).to(backend.device)
    row_graph = torch.arange(128, device=backend.device) // 64
    for values in ("probs", "topk_probs"):
        _check_against_fp64(backend, logits, row_graph, 2, 10, values, temperature)


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # numpy under the Triton interpreter
@pytest.mark.parametrize("norm", NORM_MODES)
@pytest.mark.parametrize("backend", op_backends(OP, with_reference=True))
def test_huge_logits_never_give_nan(backend, norm):
    """Issue 14, defect 14: |logits| >= 1e19 made a degree inf - inf. Finite logits up to the largest float32 give
    degrees of at most +-inf (fp64 accumulation) and no NaN gradient."""
    gen = torch.Generator().manual_seed(14)
    for scale in (1e19, 1e30, 3.4e38):
        logits = ((torch.rand(12, 37, generator=gen) * 2 - 1) * scale).to(backend.device)
        row_graph = torch.tensor([0, 1] * 6, device=backend.device)
        out, grad = forward_backward(backend.op(OP), logits, row_graph, 2, 4, "logits", "vocab", norm)
        assert torch.isfinite(logits).all()
        assert not out.degrees.isnan().any(), f"{scale:g} {norm}: NaN degrees"
        assert not grad.isnan().any(), f"{scale:g} {norm}: NaN gradient"
