"""The compiled kernels of infigw._C (backends "cpp" on CPU, "cuda" on GPU) against the reference.

Forward against ``infigw.reference``, backward against the reference's autograd, fp64 gradcheck through the
registered autograd formulas, ``torch.library.opcheck`` on every op, determinism, and argument errors.
The same file tests the CUDA kernels when a GPU is visible and the extension was built with them.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch

import infigw
from infigw import dispatch, reference
from infigw import extension

from .helpers import (DTYPES, NODE_MODES, NORM_MODES, VALUE_MODES, assert_close, random_mask, rows_of,
                      tied_logits, tolerances)

_STATUS = dispatch.backends()
pytestmark = pytest.mark.skipif(_STATUS["cpp"] != "available",
                                reason=f"C++ extension not usable: {_STATUS['cpp']}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _STATUS["cuda"] == "available" else [])
MODES = list(itertools.product(VALUE_MODES, NODE_MODES, NORM_MODES))
# (rows per graph, graphs, vocab, k): the odd shape of the issue, k = 1, k = V, and k above the buffer path.
SHAPES = [(37, 3, 1271, 7), (37, 3, 1271, 1), (9, 2, 37, 37), (11, 3, 1271, 200)]


def sequences(batch, length, generator, empty_rows=(1,)):
    """row_graph of (batch, length) sequences with random masked rows; the sequences in empty_rows have none."""
    return rows_of(random_mask(batch, length, generator=generator, empty_rows=empty_rows))


def grad_tolerance(dtype):
    """(atol, rtol) for logits gradients scaled to a largest entry of 1. Ours are fp32 values rounded once to
    fp16/bf16; the reference's autograd rounds each path (gather, logsumexp) to the input dtype and adds them
    there, so a few units in the last place apart."""
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}.get(dtype)
    return (1e-5, 1e-4) if ulp is None else (4 * ulp, 4 * ulp)


def run_both(logits, row_graph, num_graphs, k, values, nodes, norm, temperature=0.7):
    """(extension result, reference result) of topk_degrees on the same inputs."""
    args = (row_graph, num_graphs, k, values, temperature, nodes, norm, True)
    return extension.topk_degrees(logits, *args), reference.topk_degrees(logits, *args)


def check_forward(ours, ref, row_graph, dtype, name):
    atol, rtol = tolerances(dtype)
    valid = (row_graph >= 0).to(ours.kept_ids.device)
    assert torch.equal(ours.kept_ids[valid], ref.kept_ids[valid]), f"{name}: kept ids differ from the reference"
    assert torch.equal(ours.touched, ref.touched), f"{name}: touched differs from the reference"
    assert_close(ours.kept_values, ref.kept_values, atol=atol, rtol=rtol, name=f"{name} kept_values")
    assert not ours.kept_values[~valid].any(), f"{name}: masked rows must have zero kept values"
    assert_close(ours.degrees, ref.degrees, atol=atol, rtol=rtol, name=f"{name} degrees")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("values,nodes,norm", MODES)
def test_topk_degrees_forward_matches_reference(device, shape, values, nodes, norm):
    length, batch, vocab, k = shape
    gen = torch.Generator().manual_seed(vocab + k)
    logits = (torch.randn(batch * length, vocab, generator=gen) * 3).to(device)
    row_graph = sequences(batch, length, gen).to(device)
    ours, ref = run_both(logits, row_graph, batch, k, values, nodes, norm)
    check_forward(ours, ref, row_graph, torch.float32, f"{values}/{nodes}/{norm} {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("values,nodes,norm", MODES)
def test_topk_degrees_dtypes_and_ties(device, dtype, values, nodes, norm):
    """Integer-valued logits: many ties at the k-th value, which the contract's tie rule must break."""
    gen = torch.Generator().manual_seed(7)
    logits = tied_logits(3 * 37, 1271, levels=6, generator=gen, dtype=dtype).to(device)
    # rows interleaved across graphs (not contiguous), and graph 3 without any valid row
    row_graph = torch.arange(3 * 37) % 3
    row_graph[torch.rand(3 * 37, generator=gen) < 0.25] = -1
    row_graph = row_graph.to(device)
    ours, ref = run_both(logits, row_graph, 4, 7, values, nodes, norm)
    check_forward(ours, ref, row_graph, dtype, f"{dtype} {values}/{nodes}/{norm}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("values,nodes,norm", MODES)
def test_topk_degrees_backward_matches_reference_autograd(device, dtype, values, nodes, norm):
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(3 * 37, 1271, generator=gen) * 2).to(dtype).to(device)
    row_graph = sequences(3, 37, gen).to(device)
    num_nodes = 1271 if nodes == "vocab" else 7
    weights = torch.randn(3, num_nodes, generator=gen).to(device)
    grads = []
    for implementation in (extension.topk_degrees, reference.topk_degrees):
        leaf = logits.clone().requires_grad_(True)
        out = implementation(leaf, row_graph, 3, 7, values, 0.7, nodes, norm, False)
        grads.append(torch.autograd.grad((out.degrees * weights).sum(), leaf)[0])
    ours, ref = grads
    assert ours.dtype == dtype and ours.shape == logits.shape
    assert not ours[(row_graph < 0)].any(), "masked rows must get zero gradient"
    atol, rtol = grad_tolerance(dtype)
    scale = ref.abs().max().item()  # gradients are compared relative to their largest entry
    assert_close(ours.float() / scale, ref.float() / scale, atol=atol, rtol=rtol, name="grad_logits")


@pytest.mark.parametrize("values,nodes,norm", MODES)
def test_topk_degrees_gradcheck_fp64(values, nodes, norm):
    """The analytic backward (CPU kernels compute in fp64 for fp64 logits) against finite differences."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 19, generator=gen, dtype=torch.float64).requires_grad_(True)
    row_graph = torch.tensor([0, 0, 1, -1, 1, 1, 0])

    def degrees(x):
        return extension.topk_degrees(x, row_graph, 3, 4, values, 0.8, nodes, norm, False).degrees

    assert torch.autograd.gradcheck(degrees, (logits,))


def test_nan_is_kept_first_and_propagates():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[1, 17] = float("nan")
    row_graph = torch.tensor([0, 0, 1, 1])
    ours, ref = run_both(logits, row_graph, 2, 5, "logits", "vocab", "mean")
    assert ours.kept_ids[1, 0] == 17
    assert torch.equal(ours.kept_ids, ref.kept_ids) and torch.equal(ours.touched, ref.touched)
    for name in ("kept_values", "degrees"):
        actual, expected = getattr(ours, name), getattr(ref, name)
        assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN positions differ"
        assert actual.isnan().any()
        assert_close(actual.nan_to_num(), expected.nan_to_num(), atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("values", VALUE_MODES)
def test_minus_infinity_logits(device, values):
    """Vocabulary entries masked with -inf (padded vocabularies): probabilities and gradients exactly 0 there."""
    gen = torch.Generator().manual_seed(29)
    logits = torch.randn(2 * 9, 300, generator=gen)
    logits[:, 250:] = float("-inf")
    logits = logits.to(device)
    row_graph = sequences(2, 9, gen, empty_rows=()).to(device)
    weights = torch.randn(2, 300, generator=gen).to(device)
    grads = []
    for implementation in (extension.topk_degrees, reference.topk_degrees):
        leaf = logits.clone().requires_grad_(True)
        out = implementation(leaf, row_graph, 2, 5, values, 1.3, "vocab", "mean", False)
        grads.append(torch.autograd.grad((out.degrees * weights).sum(), leaf)[0])
        assert torch.isfinite(out.degrees).all()
    assert not grads[0][:, 250:].any()
    assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4, name="grad_logits")


@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_masked(device):
    logits = torch.randn(6, 40, device=device, requires_grad=True)
    row_graph = torch.full((6,), -1, device=device)
    out = extension.topk_degrees(logits, row_graph, 2, 3, "probs", 1.0, "vocab", "cosine", False)
    assert not out.degrees.any() and not out.touched.any()
    (grad,) = torch.autograd.grad(out.degrees.sum(), logits)
    assert not grad.any()


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_across_runs_and_thread_counts(device):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4 * 64, 3001, generator=gen).to(device)
    row_graph = (torch.arange(4 * 64) % 4).to(device)  # rows of a graph spread over every thread
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (threads, 1, threads):
            torch.set_num_threads(num_threads)
            results.append(extension.topk_degrees(logits, row_graph, 4, 16, "probs", 1.0, "vocab", "cosine", True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(other.degrees, results[0].degrees)
        assert torch.equal(other.kept_values, results[0].kept_values)


def sorted_lists(gen, device, lists=6, width=40):
    f = torch.randn(lists, width, generator=gen).sort(-1, descending=True).values
    g = torch.randn(lists, width, generator=gen).sort(-1, descending=True).values * 2
    lengths = torch.tensor([width, 0, 1, 2, 7, width - 3])[:lists]
    return f.to(device), g.to(device), lengths.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["sorted_gw1d"])
def test_closed_forms_match_reference(device, op):
    f, g, lengths = sorted_lists(torch.Generator().manual_seed(17), device)
    extra = (lengths,) if op == "sorted_gw1d" else ()
    weights = torch.randn(f.shape[0], generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for module in (extension, reference):
        leaves = (f.clone().requires_grad_(True), g.clone().requires_grad_(True))
        value = getattr(module, op)(*leaves, *extra)
        results.append((value,) + torch.autograd.grad((value * weights).sum(), leaves))
    for name, ours, ref in zip(("value", "grad f", "grad g"), *results):
        assert_close(ours, ref, atol=1e-5, rtol=1e-5, name=f"{op} {name}")


@pytest.mark.parametrize("op", ["sorted_gw1d"])
def test_closed_forms_gradcheck_fp64(op):
    f, g, lengths = sorted_lists(torch.Generator().manual_seed(19), "cpu", width=12)
    extra = (lengths.clamp_max(12),) if op == "sorted_gw1d" else ()
    leaves = (f.double().requires_grad_(True), g.double().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b: getattr(extension, op)(a, b, *extra), leaves)


def test_gw1d_follows_the_anti_identity_branch():
    """y close to the mirror image of x: the anti-identity matching is the cheaper one, and the gradient
    must follow it."""
    x = torch.tensor([[3.0, 1.0, 0.5, -2.0, -2.5]])
    y = (-x + torch.tensor([[0.3, -0.2, 0.1, 0.0, 0.2]])).sort(-1, descending=True).values
    lengths = torch.tensor([5])

    def cost(a, b):  # the definition, O(n^2)
        return (((a[:, None] - a[None]) ** 2 - (b[:, None] - b[None]) ** 2) ** 2).sum()

    assert cost(x[0], y[0].flip(0)) < cost(x[0], y[0])
    results = []
    for module in (extension, reference):
        leaves = (x.clone().requires_grad_(True), y.clone().requires_grad_(True))
        value = module.sorted_gw1d(*leaves, lengths)
        results.append((value,) + torch.autograd.grad(value.sum(), leaves))
    assert_close(results[0][0], cost(x[0], y[0].flip(0)).view(1) / 25, atol=1e-5, rtol=1e-5, name="gw1d anti")
    for name, ours, ref in zip(("value", "grad x", "grad y"), *results):
        assert_close(ours, ref, atol=1e-5, rtol=1e-5, name=f"gw1d anti {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    gen = torch.Generator().manual_seed(23)
    logits = torch.randn(12, 50, generator=gen).to(device).requires_grad_(True)
    row_graph = torch.tensor([0, 0, 0, 1, 1, -1, 1, 2, 2, 2, 2, 0], device=device)
    ops = torch.ops.infigw
    # every values mode, both node kinds and every norm appear (opcheck is slow; the full product adds nothing
    # to the shape/registration checks)
    for values, nodes, norm in [(0, 0, 0), (1, 1, 1), (2, 0, 2), (1, 0, 2), (2, 1, 0)]:
        torch.library.opcheck(ops.topk_degrees.default, (logits, row_graph, 3, 5, values, 0.7, nodes, norm, False))
    for values in range(3):
        degrees, _, kept_values, kept_ids, row_lse = ops.topk_degrees(logits.detach(), row_graph, 3, 5, values, 0.7,
                                                                       0, 2, False)
        torch.library.opcheck(ops.topk_degrees_backward.default,
                              (torch.randn_like(degrees), logits.detach(), row_graph, kept_values, kept_ids, row_lse,
                               3, values, 0.7, 0, 2))
    f, g, lengths = sorted_lists(gen, device)
    f.requires_grad_(True)
    g.requires_grad_(True)
    torch.library.opcheck(ops.sorted_gw1d.default, (f, g, lengths))
    grad = torch.randn(f.shape[0], device=device)
    torch.library.opcheck(ops.sorted_gw1d_backward.default, (grad, f.detach(), g.detach(), lengths))


def test_bad_arguments_raise_clear_errors():
    logits = torch.randn(4, 10)
    rows = torch.tensor([0, 0, 1, -1])
    with pytest.raises(ValueError, match="k must lie in"):
        extension.topk_degrees(logits, rows, 2, 11, "logits", 1.0, "vocab", "mean", False)
    with pytest.raises(ValueError, match="row_graph entries must lie in"):
        extension.topk_degrees(logits, torch.tensor([0, 0, 2, -1]), 2, 3, "logits", 1.0, "vocab", "mean", False)
    with pytest.raises(ValueError, match="row_graph must have shape"):
        extension.topk_degrees(logits, rows[:3], 2, 3, "logits", 1.0, "vocab", "mean", False)
    with pytest.raises(ValueError, match="values must be one of"):
        extension.topk_degrees(logits, rows, 2, 3, "softmax", 1.0, "vocab", "mean", False)
    with pytest.raises(ValueError, match="temperature must be"):
        extension.topk_degrees(logits, rows, 2, 3, "probs", 0.0, "vocab", "mean", False)
    with pytest.raises(TypeError, match="logits must be"):
        extension.topk_degrees(logits.long(), rows, 2, 3, "logits", 1.0, "vocab", "mean", False)
    with pytest.raises(TypeError, match="row_graph must be int64"):
        extension.topk_degrees(logits, rows.int(), 2, 3, "logits", 1.0, "vocab", "mean", False)
    with pytest.raises(ValueError, match="lengths must lie in"):
        extension.sorted_gw1d(logits, logits, torch.tensor([1, 2, 3, 11]))
    with pytest.raises(ValueError, match="must both have shape"):
        extension.sorted_gw1d(logits, logits[:, :5], torch.tensor([1, 2, 3, 4]))


def test_disable_switch_falls_back_to_reference(tmp_path):
    """INFIGW_DISABLE_EXTENSION=1 marks cpp unavailable with the reason, and auto resolves to torch."""
    code = ("from infigw import dispatch; import torch; r = dispatch.backends(); "
            "assert 'INFIGW_DISABLE_EXTENSION' in r['cpp'], r; "
            "assert dispatch.resolve('topk_degrees', 'auto', torch.device('cpu'))[0] == 'torch'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(infigw.__file__)))
    env = dict(os.environ, INFIGW_DISABLE_EXTENSION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
