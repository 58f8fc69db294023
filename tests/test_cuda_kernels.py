"""The CUDA kernels of infigw._C at the shapes the op tests (test_topk_degrees.py, test_sorted_gw1d.py, run on
CUDA too when a GPU is visible) do not reach: large vocabularies (262144), more than 2^31 logits in one call,
odd vocabularies (rows not 16-byte aligned), k = 256, rows that defeat the selection's threshold filter
(ascending rows, all-equal rows, NaN, -inf), strided logits, and the closed form on long lists. Everything is
compared with ``infigw.reference`` on the same GPU tensors through the harness of tests/helpers.py. Skipped without
a GPU or without the CUDA kernels.
"""
import pytest
import torch

from infigw import dispatch, reference

from .helpers import (DTYPES, MODES, VALUE_MODES, assert_close, assert_grad_close, compare_sorted_gw1d,
                      compare_topk_degrees, tied_logits)

_STATUS = dispatch.backends()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(_STATUS["cuda"] != "available", reason=f"CUDA kernels not usable: {_STATUS['cuda']}"),
]
DEVICE = "cuda"


def op(name):
    return dispatch.resolve(name, "cuda", torch.device(DEVICE))[1]


def graphs_of(rows, num_graphs, generator, masked=0.25):
    """row_graph (rows,) on the GPU: contiguous blocks of rows per graph, a fraction masked (-1)."""
    graph = torch.arange(rows) * num_graphs // rows
    drop = torch.rand(rows, generator=generator) < masked
    return torch.where(drop, torch.full_like(graph, -1), graph).to(DEVICE)


def check(logits, row_graph, num_graphs, k, values, nodes, norm, name):
    """Forward against the reference (the backward has its own cases)."""
    compare_topk_degrees(op("topk_degrees"), logits, row_graph, num_graphs, k, values, nodes, norm, backward=False,
                         name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("values,nodes,norm", MODES)
def test_odd_vocabulary_forward_and_backward(dtype, values, nodes, norm):
    """V = 4099: every row starts at a different 16-byte misalignment (scalar head, vector body, tail)."""
    gen = torch.Generator().manual_seed(0)
    rows, vocab, k, num_graphs = 37, 4099, 17, 3
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(dtype).to(DEVICE)
    row_graph = graphs_of(rows, num_graphs, gen)
    compare_topk_degrees(op("topk_degrees"), logits, row_graph, num_graphs, k, values, nodes, norm, name="V=4099")


@pytest.mark.parametrize("vocab,k", [(1, 1), (7, 7), (31, 5), (1000, 256), (8192 + 3, 1), (20000, 256)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes_and_k_extremes(vocab, k, dtype):
    gen = torch.Generator().manual_seed(1)
    rows, num_graphs = 19, 4
    logits = torch.randn(rows, vocab, generator=gen).to(dtype).to(DEVICE)
    row_graph = graphs_of(rows, num_graphs, gen)
    for values, norm in (("logits", "mean"), ("probs", "cosine"), ("topk_probs", "sum")):
        check(logits, row_graph, num_graphs, k, values, "vocab", norm, f"V={vocab} k={k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vocab_262144(dtype):
    gen = torch.Generator().manual_seed(2)
    rows, vocab, num_graphs = 24, 262144, 3
    logits = (4 * torch.randn(rows, vocab, generator=gen)).to(dtype).to(DEVICE)
    row_graph = graphs_of(rows, num_graphs, gen)
    for k, values, norm in ((10, "logits", "mean"), (256, "probs", "sum"), (64, "topk_probs", "cosine")):
        check(logits, row_graph, num_graphs, k, values, "vocab", norm, "V=262144")
    compare_topk_degrees(op("topk_degrees"), logits, row_graph, num_graphs, 10, "probs", "vocab", "mean",
                         name="V=262144")


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
        check(logits, row_graph, num_graphs, k, values, "vocab", "sum", kind)


def test_k_256_ties_match_reference():
    gen = torch.Generator().manual_seed(4)
    logits = tied_logits(40, 151936, levels=4, generator=gen, dtype=torch.bfloat16).to(DEVICE)
    row_graph = graphs_of(40, 5, gen)
    check(logits, row_graph, 5, 256, "logits", "vocab", "mean", "k=256 ties")


def test_non_contiguous_logits():
    gen = torch.Generator().manual_seed(6)
    wide = torch.randn(16, 2 * 1500, generator=gen).to(DEVICE)
    logits = wide[:, ::2]
    row_graph = graphs_of(16, 2, gen)
    check(logits, row_graph, 2, 12, "probs", "vocab", "mean", "strided logits")


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
        assert_grad_close(x.grad[i:i + chunk], part.grad, torch.bfloat16, name=f">2^31 grad rows {i}..{i + chunk}")


@pytest.mark.parametrize("width", [1000, 151936])
def test_closed_forms_on_long_lists(width):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(6, width, generator=gen).sort(-1, descending=True).values.to(DEVICE)
    y = torch.randn(6, width, generator=gen).sort(-1, descending=True).values.to(DEVICE)
    lengths = torch.randint(0, width + 1, (6,), generator=gen)
    lengths[0], lengths[-1] = 0, width
    compare_sorted_gw1d(op("sorted_gw1d"), x, y, lengths.to(DEVICE), name=f"width={width}")
