"""The CUDA kernels of infigw._C at the shapes the generic extension tests do not reach.

Large vocabularies (262144), more than 2^31 logits in one call, odd vocabularies (rows not 16-byte aligned),
k = 256, rows that defeat the selection's threshold filter (ascending rows, all-equal rows, NaN, -inf),
masks, determinism of ``deterministic=True``, the explicit graph and the closed forms. Everything is compared
with ``infigw.reference`` run on the same GPU tensors. Skipped without a GPU or without the CUDA kernels.
"""
import itertools

import pytest
import torch

from infigw import dispatch, reference

from .helpers import DTYPES, NODE_MODES, NORM_MODES, VALUE_MODES, assert_close, tied_logits, tolerances

_STATUS = dispatch.backends()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(_STATUS["cuda"] != "available", reason=f"CUDA kernels not usable: {_STATUS['cuda']}"),
]
DEVICE = "cuda"
MODES = list(itertools.product(VALUE_MODES, NODE_MODES, NORM_MODES))


def op(name):
    return dispatch.resolve(name, "cuda", torch.device(DEVICE))[1]


def graphs_of(rows, num_graphs, generator, masked=0.25):
    """row_graph (rows,) on the GPU: contiguous blocks of rows per graph, a fraction masked (-1)."""
    graph = torch.arange(rows) * num_graphs // rows
    drop = torch.rand(rows, generator=generator) < masked
    return torch.where(drop, torch.full_like(graph, -1), graph).to(DEVICE)


def compare_forward(ours, ref, row_graph, dtype, name):
    atol, rtol = tolerances(dtype)
    valid = row_graph >= 0
    assert torch.equal(ours.kept_ids[valid], ref.kept_ids[valid]), f"{name}: kept ids differ from the reference"
    assert torch.equal(ours.touched, ref.touched), f"{name}: touched differs from the reference"
    assert_close(ours.kept_values, ref.kept_values, atol=atol, rtol=rtol, name=f"{name} kept_values")
    assert_close(ours.degrees, ref.degrees, atol=atol, rtol=rtol, name=f"{name} degrees")


def forward_both(logits, row_graph, num_graphs, k, values, nodes, norm, deterministic=False, temperature=0.7):
    args = (row_graph, num_graphs, k, values, temperature, nodes, norm, deterministic)
    return op("topk_degrees")(logits, *args), reference.topk_degrees(logits, *args)


def backward_both(logits, row_graph, num_graphs, k, values, nodes, norm, generator, temperature=0.7):
    """Gradients of sum(w * degrees) w.r.t. the logits: (ours, reference autograd)."""
    grads = []
    weights = None
    for impl in (op("topk_degrees"), reference.topk_degrees):
        x = logits.detach().clone().requires_grad_(True)
        degrees = impl(x, row_graph, num_graphs, k, values, temperature, nodes, norm, False).degrees
        if weights is None:
            weights = torch.randn(degrees.shape, generator=generator).to(DEVICE)
        (degrees * weights).sum().backward()
        grads.append(x.grad)
    return grads


def grad_tolerance(dtype, reference_grad):
    """Absolute tolerance for logits gradients: a few units in the last place of the largest entry."""
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}.get(dtype, 2.0 ** -20)
    return 4 * ulp * max(1.0, reference_grad.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("values,nodes,norm", MODES)
def test_odd_vocabulary_forward_and_backward(dtype, values, nodes, norm):
    """V = 4099: every row starts at a different 16-byte misalignment (scalar head, vector body, tail)."""
    gen = torch.Generator().manual_seed(0)
    rows, vocab, k, num_graphs = 37, 4099, 17, 3
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(dtype).to(DEVICE)
    row_graph = graphs_of(rows, num_graphs, gen)
    ours, ref = forward_both(logits, row_graph, num_graphs, k, values, nodes, norm)
    compare_forward(ours, ref, row_graph, dtype, f"{dtype} {values}/{nodes}/{norm}")
    grad, grad_ref = backward_both(logits, row_graph, num_graphs, k, values, nodes, norm, gen)
    assert grad.dtype == dtype
    tol = grad_tolerance(dtype, grad_ref)
    assert_close(grad, grad_ref, atol=tol, rtol=4e-3, name=f"{dtype} {values}/{nodes}/{norm} grad")
    assert not grad[row_graph < 0].any(), "masked rows must get a zero gradient"


@pytest.mark.parametrize("vocab,k", [(1, 1), (7, 7), (31, 5), (1000, 256), (8192 + 3, 1), (20000, 256)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes_and_k_extremes(vocab, k, dtype):
    gen = torch.Generator().manual_seed(1)
    rows, num_graphs = 19, 4
    logits = torch.randn(rows, vocab, generator=gen).to(dtype).to(DEVICE)
    row_graph = graphs_of(rows, num_graphs, gen)
    for values, norm in (("logits", "mean"), ("probs", "cosine"), ("topk_probs", "sum")):
        ours, ref = forward_both(logits, row_graph, num_graphs, k, values, "vocab", norm)
        compare_forward(ours, ref, row_graph, dtype, f"V={vocab} k={k} {values}/{norm}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vocab_262144(dtype):
    gen = torch.Generator().manual_seed(2)
    rows, vocab, num_graphs = 24, 262144, 3
    logits = (4 * torch.randn(rows, vocab, generator=gen)).to(dtype).to(DEVICE)
    row_graph = graphs_of(rows, num_graphs, gen)
    for k, values, norm in ((10, "logits", "mean"), (256, "probs", "sum"), (64, "topk_probs", "cosine")):
        ours, ref = forward_both(logits, row_graph, num_graphs, k, values, "vocab", norm)
        compare_forward(ours, ref, row_graph, dtype, f"V=262144 k={k} {values}/{norm}")
    grad, grad_ref = backward_both(logits, row_graph, num_graphs, 10, "probs", "vocab", "mean", gen)
    assert_close(grad, grad_ref, atol=grad_tolerance(dtype, grad_ref), rtol=4e-3, name="V=262144 probs grad")


@pytest.mark.parametrize("kind", ["ascending", "descending", "constant", "few_levels", "nan", "neg_inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_that_defeat_the_threshold_filter(kind, dtype):
    """Ascending rows admit a candidate at every element; ties must go to the smaller id; NaN ranks first."""
    gen = torch.Generator().manual_seed(3)
    rows, vocab, k, num_graphs = 12, 30011, 50, 2
    ramp = torch.arange(vocab, dtype=torch.float32).expand(rows, vocab) / vocab * 8
    logits = {
        "ascending": ramp,
        "descending": ramp.flip(-1),
        "constant": torch.full((rows, vocab), 1.5),
        "few_levels": tied_logits(rows, vocab, levels=3, generator=gen),
        "nan": torch.randn(rows, vocab, generator=gen).index_fill(1, torch.tensor([5, 29000, 17]), float("nan")),
        "neg_inf": torch.randn(rows, vocab, generator=gen).masked_fill(
            torch.rand(rows, vocab, generator=gen) < 0.5, float("-inf")),
    }[kind].contiguous().to(dtype).to(DEVICE)
    row_graph = graphs_of(rows, num_graphs, gen, masked=0.0)
    for values in VALUE_MODES:
        ours, ref = forward_both(logits, row_graph, num_graphs, k, values, "vocab", "sum")
        assert torch.equal(ours.kept_ids, ref.kept_ids), f"{kind} {values}: kept ids differ from the reference"
        if kind == "nan":
            assert torch.isnan(ours.degrees).any() == torch.isnan(ref.degrees).any()
            continue
        compare_forward(ours, ref, row_graph, dtype, f"{kind} {values}")


def test_signed_zeros_tie():
    """-0.0 and +0.0 are equal values: the smaller id ranks first, whatever the sign bit."""
    logits = torch.zeros(2, 64, device=DEVICE)
    logits[:, ::2] = -0.0
    ids = op("topk_degrees")(logits, torch.zeros(2, dtype=torch.long, device=DEVICE), 1, 8, "logits", 1.0,
                             "vocab", "sum", False).kept_ids
    assert torch.equal(ids, torch.arange(8, device=DEVICE).expand(2, 8))


def test_k_256_ties_match_reference():
    gen = torch.Generator().manual_seed(4)
    logits = tied_logits(40, 151936, levels=4, generator=gen, dtype=torch.bfloat16).to(DEVICE)
    row_graph = graphs_of(40, 5, gen)
    ours, ref = forward_both(logits, row_graph, 5, 256, "logits", "vocab", "mean")
    compare_forward(ours, ref, row_graph, torch.bfloat16, "k=256 ties")


def test_masks_and_empty_graphs():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(30, 999, generator=gen).to(DEVICE)
    row_graph = graphs_of(30, 3, gen, masked=0.5)
    row_graph[row_graph == 1] = -1  # graph 1 has no valid row
    for values, nodes, norm in MODES:
        ours, ref = forward_both(logits, row_graph, 3, 9, values, nodes, norm)
        compare_forward(ours, ref, row_graph, torch.float32, f"masked {values}/{nodes}/{norm}")
        assert not ours.degrees[1].any() and not ours.touched[1].any()
    all_masked = torch.full_like(row_graph, -1)
    ours, _ = forward_both(logits, all_masked, 3, 9, "probs", "vocab", "mean")
    assert not ours.degrees.any() and not ours.kept_values.any()


def test_non_contiguous_logits():
    gen = torch.Generator().manual_seed(6)
    wide = torch.randn(16, 2 * 1500, generator=gen).to(DEVICE)
    logits = wide[:, ::2]
    row_graph = graphs_of(16, 2, gen)
    ours, ref = forward_both(logits, row_graph, 2, 12, "probs", "vocab", "mean")
    compare_forward(ours, ref, row_graph, torch.float32, "strided logits")


@pytest.mark.parametrize("nodes,norm", list(itertools.product(NODE_MODES, NORM_MODES)))
def test_deterministic_variant_is_bitwise_reproducible(nodes, norm):
    gen = torch.Generator().manual_seed(7)
    # Few graphs and a small vocabulary: many rows add into the same degree slots.
    logits = tied_logits(4096, 64, levels=6, generator=gen).add_(torch.rand(4096, 64, generator=gen)).to(DEVICE)
    row_graph = graphs_of(4096, 2, gen)
    runs = [forward_both(logits, row_graph, 2, 16, "probs", nodes, norm, deterministic=True)[0] for _ in range(3)]
    for other in runs[1:]:
        assert torch.equal(runs[0].degrees, other.degrees), f"{nodes}/{norm}: deterministic degrees differ"
    _, ref = forward_both(logits, row_graph, 2, 16, "probs", nodes, norm)
    compare_forward(runs[0], ref, row_graph, torch.float32, f"deterministic {nodes}/{norm}")


def test_more_than_2_31_logits():
    """rows * vocab > 2^31 in one call (int64 offsets); compared with the reference chunk by chunk."""
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    vocab, k, num_graphs = 151936, 10, 8
    rows = (2 ** 31) // vocab + 200
    logits = torch.randn(rows, vocab, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    row_graph = graphs_of(rows, num_graphs, torch.Generator().manual_seed(8))
    ours = op("topk_degrees")(logits, row_graph, num_graphs, k, "logits", 1.0, "vocab", "mean", False)
    chunk = 1024
    ref_ids = torch.cat([reference.select_topk(logits[i:i + chunk], k)[1] for i in range(0, rows, chunk)])
    valid = row_graph >= 0
    assert torch.equal(ours.kept_ids[valid], ref_ids[valid]), "kept ids differ beyond 2^31 logits"
    ref_values = torch.where(valid.unsqueeze(-1), logits.gather(-1, ref_ids).float(), torch.zeros(()).to(DEVICE))
    degrees, touched = reference.degrees_from_kept(ref_values, ref_ids, row_graph, num_graphs, vocab, "vocab", "mean")
    assert torch.equal(ours.touched, touched)
    assert_close(ours.degrees, degrees, atol=1e-3, rtol=1e-3, name=">2^31 degrees")
    # Backward with the sum norm: each row's gradient depends on its own row only, so chunks are exact.
    x = logits.detach().requires_grad_(True)
    weights = torch.randn(num_graphs, vocab, generator=gen, device=DEVICE)
    degrees = op("topk_degrees")(x, row_graph, num_graphs, k, "logits", 1.0, "vocab", "sum", False).degrees
    (degrees * weights).sum().backward()
    for i in (0, rows - chunk):  # the first chunk and the last, past the 2^31 boundary
        part = logits[i:i + chunk].detach().requires_grad_(True)
        ref = reference.topk_degrees(part, row_graph[i:i + chunk], num_graphs, k, "logits", 1.0, "vocab", "sum")
        (ref.degrees * weights).sum().backward()
        assert_close(x.grad[i:i + chunk], part.grad, atol=grad_tolerance(torch.bfloat16, part.grad), rtol=4e-3,
                     name=f">2^31 grad rows {i}..{i + chunk}")


@pytest.mark.parametrize("width", [1, 5, 1000, 151936])
def test_closed_forms_forward_and_backward(width):
    gen = torch.Generator().manual_seed(10)
    graphs = 6
    x = torch.randn(graphs, width, generator=gen).sort(-1, descending=True).values.to(DEVICE)
    y = torch.randn(graphs, width, generator=gen).sort(-1, descending=True).values.to(DEVICE)
    lengths = torch.randint(0, width + 1, (graphs,), generator=gen)
    lengths[0], lengths[-1] = 0, width
    lengths = lengths.to(DEVICE)
    for name, args in (("sorted_gw1d", (lengths,)),):
        xs, ys = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        ours = op(name)(xs, ys, *args)
        ref = getattr(reference, name)(xr, yr, *args)
        assert_close(ours, ref, atol=1e-4, rtol=1e-4, name=f"{name} width={width}")
        weights = torch.randn(graphs, generator=gen).to(DEVICE)
        (ours * weights).sum().backward()
        (ref * weights).sum().backward()
        scale = max(1.0, xr.grad.abs().max().item(), yr.grad.abs().max().item())
        assert_close(xs.grad, xr.grad, atol=1e-4 * scale, rtol=1e-4, name=f"{name} grad x width={width}")
        assert_close(ys.grad, yr.grad, atol=1e-4 * scale, rtol=1e-4, name=f"{name} grad y width={width}")
