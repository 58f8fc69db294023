"""The Triton backend (infigw.triton) against the reference: forward and backward, every mode, ties, odd shapes.

Kernels run on CUDA tensors when a GPU is visible, else on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` is exported before pytest starts (Triton reads it when the kernels are defined, i.e.
when :mod:`infigw.triton` is first imported); otherwise these cases skip. CI runs them with
``TRITON_INTERPRET=1 python -m pytest tests -m triton_interpret``. Shapes are tiny (the interpreter is slow)
and the vocabulary tile is shrunk so that every row spans several tiles and a ragged tail.
``test_kernels_compile_for_sm90`` needs neither a GPU nor the interpreter: it lowers the kernels to sm_90
machine code with Triton's bundled ptxas. ``gpu`` cases use realistic sizes and skip without CUDA.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from infigw import dispatch, reference  # noqa: E402
from infigw.triton import closed_forms, topk_degrees  # noqa: E402

from .helpers import (  # noqa: E402
    NODE_MODES, NORM_MODES, VALUE_MODES, assert_close, random_mask, rows_of, tied_logits, tolerances,
)

INTERPRET = topk_degrees.INTERPRETED  # TRITON_INTERPRET=1 was set when the kernels were defined
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"


def runs_kernels(test):
    """A case that launches kernels: on CUDA, or on CPU in the interpreter."""
    reason = "needs CUDA or TRITON_INTERPRET=1 set before pytest"
    return pytest.mark.triton_interpret(pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason=reason)(test))


def gpu(test):
    """A case at realistic sizes: CUDA only."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA device")(test))




@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide vocabulary tiles: tiny rows still cross several tiles and end in a ragged tail."""
    monkeypatch.setattr(topk_degrees, "_MAX_BLOCK_V", 16)


def grad_tolerances(dtype):
    # a gradient rounded to a 16-bit dtype may differ from the reference's by one unit in the last place
    return {torch.float32: (1e-5, 1e-4), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-3, 1e-2)}[dtype]


def run_both(logits, row_graph, num_graphs, k, values, nodes, norm, deterministic, temperature=0.7, seed=0):
    """Forward and backward (random upstream gradient) of the Triton op and the reference."""
    results = []
    for op in (topk_degrees.topk_degrees, reference.topk_degrees):
        x = logits.detach().clone().requires_grad_(True)
        out = op(x, row_graph, num_graphs, k, values, temperature, nodes, norm, deterministic)
        weight = torch.randn(out.degrees.shape, generator=torch.Generator().manual_seed(seed)).to(out.degrees.device)
        (out.degrees * weight).sum().backward()
        results.append((out, x.grad))
    return results


def check_against_reference(logits, row_graph, num_graphs, k, values, nodes, norm, deterministic, backward=True):
    (got, got_grad), (ref, ref_grad) = run_both(logits, row_graph, num_graphs, k, values, nodes, norm, deterministic)
    atol, rtol = tolerances(logits.dtype)
    case = f"{values}/{nodes}/{norm}/det={deterministic}/{logits.dtype}/k={k}"
    valid = (row_graph >= 0).cpu()  # ids of masked rows are unspecified by the contract
    assert torch.equal(got.kept_ids.cpu()[valid], ref.kept_ids.cpu()[valid]), f"{case}: kept ids differ (tie rule)"
    assert torch.equal(got.touched.cpu(), ref.touched.cpu()), f"{case}: touched differs"
    assert_close(got.kept_values, ref.kept_values, atol=1e-6, rtol=1e-5, name=f"{case} kept_values")
    assert_close(got.degrees, ref.degrees, atol=atol, rtol=rtol, name=f"{case} degrees")
    assert not got.kept_values.requires_grad, f"{case}: kept_values must be detached"
    if backward:
        assert got_grad.dtype == logits.dtype and got_grad.shape == logits.shape
        # cosine gradients can vanish analytically (w * a is scale free): then both sides are rounding noise
        scale = max(float(ref_grad.float().abs().amax()) if ref_grad.numel() else 0.0, 1.0)
        g_atol, g_rtol = grad_tolerances(logits.dtype)
        assert_close(got_grad.float(), ref_grad.float(), atol=g_atol * scale, rtol=g_rtol, name=f"{case} grad")


def masked_rows(batch, length, seed):
    mask = random_mask(batch, length, generator=torch.Generator().manual_seed(seed), empty_rows=(batch - 1,))
    return rows_of(mask).to(DEVICE)


# --------------------------------------------------------------------------------------------- topk_degrees


@runs_kernels
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("norm", NORM_MODES)
@pytest.mark.parametrize("nodes", NODE_MODES)
@pytest.mark.parametrize("values", VALUE_MODES)
def test_topk_degrees_all_modes(values, nodes, norm, deterministic):
    batch, length, vocab, k = 3, 2, 37, 3
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(batch * length, vocab, generator=gen) * 2).to(DEVICE)
    check_against_reference(logits, masked_rows(batch, length, 1), batch, k, values, nodes, norm, deterministic)


@runs_kernels
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("values", VALUE_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_topk_degrees_half_precision(dtype, values):
    """16-bit logits: exact selection and fp32 values; the gradient is rounded once to the logits' dtype."""
    batch, length, vocab, k = 2, 2, 37, 4
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(batch * length, vocab, generator=gen) * 3).to(dtype).to(DEVICE)
    check_against_reference(logits, masked_rows(batch, length, 2), batch, k, values, "vocab", "mean", False)



@runs_kernels
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("deterministic", [False, True])
def test_ties_follow_the_contract(k, deterministic):
    """Integer logits: many exact ties at the k-th value, across tiles; the smaller id must win."""
    logits = tied_logits(8, 40, levels=3, generator=torch.Generator().manual_seed(k)).to(DEVICE)
    logits[0] = 1.0  # one value everywhere: ids 0..k-1
    logits[1, ::2] = -0.0  # -0 ties with +0
    logits[1, 1::2] = 0.0
    logits[2] = torch.arange(40, dtype=torch.float32)  # increasing: every tile inserts k entries
    row_graph = torch.tensor([0, 0, 1, 1, 2, 2, -1, 0], device=DEVICE)
    check_against_reference(logits, row_graph, 3, k, "logits", "vocab", "sum", deterministic)
    check_against_reference(logits, row_graph, 3, k, "probs", "rank", "mean", deterministic)


@runs_kernels
@pytest.mark.usefixtures("small_tiles")
def test_special_values():
    """NaN ranks above every number (the row's degrees become NaN, as in the reference); -inf is a value."""
    logits = torch.randn(4, 33, generator=torch.Generator().manual_seed(3))
    logits[0, 20] = float("nan")
    logits[1, :30] = float("-inf")
    row_graph = torch.tensor([0, 1, 1, 1])
    for values in ("probs", "topk_probs"):
        check_against_reference(logits.to(DEVICE), row_graph.to(DEVICE), 2, 4, values, "vocab", "sum", False,
                                backward=False)
    got = topk_degrees.topk_degrees(logits.to(DEVICE), row_graph.to(DEVICE), 2, 4)
    assert int(got.kept_ids[0, 0]) == 20 and torch.isnan(got.degrees[0]).any()


@runs_kernels
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("rows,vocab,k,num_graphs", [(1, 5, 5, 1), (5, 17, 4, 4), (3, 16, 1, 2), (0, 9, 2, 2)])
def test_odd_shapes(rows, vocab, k, num_graphs):
    """k == V, a vocabulary of exactly one tile, k = 1, no rows at all, graphs without rows."""
    gen = torch.Generator().manual_seed(rows * 31 + vocab)
    logits = torch.randn(rows, vocab, generator=gen).to(DEVICE)
    row_graph = torch.randint(-1, max(num_graphs - 1, 1), (rows,), generator=gen).to(DEVICE)
    for values, norm in (("logits", "mean"), ("probs", "cosine"), ("topk_probs", "sum")):
        check_against_reference(logits, row_graph, num_graphs, k, values, "vocab", norm, True)


@runs_kernels
@pytest.mark.usefixtures("small_tiles")
def test_all_rows_masked_gives_zero_gradient():
    logits = torch.randn(4, 20, device=DEVICE, requires_grad=True)
    out = topk_degrees.topk_degrees(logits, torch.full((4,), -1, device=DEVICE), 2, 3, "probs")
    assert not out.touched.any() and not out.degrees.any() and not out.kept_values.any()
    out.degrees.sum().backward()
    assert not logits.grad.any()


@runs_kernels
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("norm", NORM_MODES)
def test_deterministic_mode_is_reproducible(norm):
    logits = torch.randn(12, 30, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    row_graph = torch.tensor([0, 1] * 6, device=DEVICE)
    runs = [topk_degrees.topk_degrees(logits, row_graph, 2, 4, "probs", 1.0, "vocab", norm, True).degrees
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]), f"{norm}: deterministic degrees changed between runs"



def test_bad_inputs_are_rejected():
    logits = torch.randn(4, 10)
    rows = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match="logits"):
        topk_degrees.topk_degrees(logits.double(), rows, 1, 3)
    with pytest.raises(ValueError, match="k must"):
        topk_degrees.topk_degrees(logits, rows, 1, 11)
    with pytest.raises(ValueError, match="row_graph"):
        topk_degrees.topk_degrees(logits, rows[:3], 1, 3)
    with pytest.raises(ValueError, match="values"):
        topk_degrees.topk_degrees(logits, rows, 1, 3, values="prob")
    with pytest.raises(ValueError, match="temperature"):
        topk_degrees.topk_degrees(logits, rows, 1, 3, temperature=0.0)
    with pytest.raises(ValueError, match="contiguous"):
        topk_degrees.topk_degrees(logits.t(), rows.repeat(3)[:10], 1, 3)
    with pytest.raises(TypeError, match="float32"):
        closed_forms.sorted_gw1d(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3), torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        closed_forms.sorted_gw1d(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="lengths"):
        closed_forms.sorted_gw1d(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.int32))


@pytest.mark.skipif(INTERPRET, reason="the interpreter runs the kernels on CPU tensors")
def test_cpu_tensors_need_the_interpreter():
    with pytest.raises(ValueError, match="CUDA tensor"):
        topk_degrees.topk_degrees(torch.randn(2, 8), torch.zeros(2, dtype=torch.int64), 1, 2)
    with pytest.raises(ValueError, match="CUDA tensor"):
        closed_forms.sorted_gw1d(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))


# ------------------------------------------------------------------------------------------ graph, distances


def _distance_inputs(rows, width, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=gen) * 3 + 1).sort(-1, descending=True).values
    y = torch.randn(rows, width, generator=gen).sort(-1, descending=True).values
    return x.to(DEVICE), y.to(DEVICE)


def _forward_backward(op, *args):
    leaves = [a.detach().clone().requires_grad_(True) for a in args[:2]]
    out = op(*leaves, *args[2:])
    (out * torch.linspace(-1, 2, out.numel(), device=out.device)).sum().backward()
    return out, leaves[0].grad, leaves[1].grad


@runs_kernels
@pytest.mark.parametrize("rows,width", [(6, 37), (2, 1100)])
def test_sorted_gw1d(rows, width):
    x, y = _distance_inputs(rows, width, rows)
    lengths = torch.tensor([width, 0, 1, 2, 7, width // 2][:rows], device=DEVICE)
    # Mirror-image clouds: the anti-identity matching wins, so both branches are exercised.
    x[-1] = torch.tensor([10.0, 9.0, 0.0] + [0.0] * (width - 3))
    y[-1] = torch.tensor([10.0, 1.0, 0.0] + [0.0] * (width - 3))
    lengths[-1] = 3
    for got, ref, name in zip(_forward_backward(closed_forms.sorted_gw1d, x, y, lengths),
                              _forward_backward(reference.sorted_gw1d, x, y, lengths), ("value", "grad x", "grad y")):
        assert_close(got, ref, atol=1e-5, rtol=1e-5, name=f"gw1d {name}")



# ------------------------------------------------------------------------------------ compiled without a GPU


@pytest.mark.skipif(INTERPRET, reason="the interpreter replaces the kernels by Python functions")
def test_kernels_compile_for_sm90():
    """Every kernel lowers to sm_90 machine code (catches typing errors the interpreter lets through)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    common = {"row_graph_ptr": "*i64", "kept_val_ptr": "*fp32", "kept_id_ptr": "*i64"}
    k = {"K": 10, "K_PAD": 16}
    cases = [
        (topk_degrees._topk_rows_kernel,
         dict(common, x_ptr="*bf16", x_row_stride="i64", vocab="i32", scale_ptr="*fp32", lse_ptr="*fp32",
              deg_ptr="*fp32", touched_ptr="*i1", num_nodes="i32", inv_temp="fp32"),
         dict(k, BLOCK_V=2048, VALUES_MODE=1, RANK_NODES=False, SCATTER=True)),
        (topk_degrees._aggregate_kernel,
         dict(common, scale_ptr="*fp32", diag_ptr="*fp32", grad_deg_ptr="*fp32", out_ptr="*fp32",
              touched_ptr="*i1", contrib_ptr="*fp32", key_ptr="*i64", num_nodes="i32", num_graphs="i32"),
         dict(k, RANK_NODES=False, MODE=3, DETERMINISTIC=True, WRITE_TOUCHED=True)),
        (topk_degrees._segment_sum_kernel,
         dict(sorted_key_ptr="*i64", perm_ptr="*i64", end_ptr="*i64", contrib_ptr="*fp32", out_ptr="*fp32",
              segment_ptr="*i64", total="i32", sentinel="i64"),
         dict(BLOCK=128, COMPACT=True)),
        (topk_degrees._grad_rows_kernel,
         dict(common, scale_ptr="*fp32", diag_ptr="*fp32", z_ptr="*fp32", grad_deg_ptr="*fp32",
              grad_kept_ptr="*fp32", coef_ptr="*fp32", num_nodes="i32", inv_temp="fp32"),
         dict(k, VALUES_MODE=1, RANK_NODES=False, COSINE=True)),
        (topk_degrees._probs_dense_grad_kernel,
         dict(x_ptr="*bf16", x_row_stride="i64", grad_ptr="*bf16", lse_ptr="*fp32", coef_ptr="*fp32",
              row_graph_ptr="*i64", vocab="i32", inv_temp="fp32"),
         dict(BLOCK_V=2048)),
        (topk_degrees._scatter_grad_kernel,
         dict(grad_ptr="*bf16", vocab="i32", kept_id_ptr="*i64", grad_kept_ptr="*fp32", row_graph_ptr="*i64"),
         dict(k, ACCUMULATE=True)),
        (closed_forms._gw1d_kernel,
         dict(x_ptr="*fp32", y_ptr="*fp32", len_ptr="*i64", out_ptr="*fp32", width="i32"), dict(BLOCK=1024)),
        (closed_forms._gw1d_backward_kernel,
         dict(grad_ptr="*fp32", x_ptr="*fp32", y_ptr="*fp32", len_ptr="*i64", grad_x_ptr="*fp32",
              grad_y_ptr="*fp32", width="i32"), dict(BLOCK=1024)),
    ]
    for kernel, signature, constants in cases:
        signature = dict(signature, **{name: "constexpr" for name in constants})
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm.get("cubin"), f"{kernel.fn.__name__}: no sm_90 binary"


# ------------------------------------------------------------------------------------------ GPU, real sizes


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("values", VALUE_MODES)
def test_gpu_large_vocabulary(dtype, values):
    """V = 262144 (several hundred tiles per row), an odd row count, k = 64 (multi-word running top-k)."""
    from infigw.testing import llm_like_logits

    logits = llm_like_logits(3, 37, 262144, seed=2, dtype=dtype, device="cuda").view(-1, 262144)
    mask = random_mask(3, 37, generator=torch.Generator().manual_seed(2))
    row_graph = rows_of(mask).cuda()
    for nodes, norm, det in (("vocab", "mean", False), ("rank", "cosine", True)):
        check_against_reference(logits, row_graph, 3, 64, values, nodes, norm, det)


@gpu
@pytest.mark.parametrize("vocab", [151936, 32001])
def test_gpu_random_logits_and_int64_offsets(vocab):
    """Gaussian logits (the insertion-heavy case) and more than 2^31 logits in total (int64 row offsets)."""
    rows = 2**31 // vocab + 3
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    row_graph = torch.arange(rows, device="cuda") % 4
    got = topk_degrees.topk_degrees(logits, row_graph, 4, 10)
    tail = slice(rows - 40, rows)  # rows beyond element 2^31
    _, ref_ids = reference.select_topk(logits[tail], 10)
    assert torch.equal(got.kept_ids[tail], ref_ids), "kept ids past 2^31 elements differ"
    del logits, got
    torch.cuda.empty_cache()


@gpu
def test_gpu_torch_compile_without_graph_breaks():
    logits = torch.randn(64, 1000, device="cuda", requires_grad=True)
    row_graph = torch.arange(64, device="cuda") % 2

    def loss(x):
        out = torch.ops.infigw_triton.topk_degrees(x, row_graph, 2, 8, 1, 1.0, 0, 0, False)
        f = out[0].sort(-1, descending=True).values
        lengths = torch.full((1,), f.shape[-1], dtype=torch.int64, device=f.device)
        return torch.ops.infigw_triton.sorted_gw1d(f[:1], f[1:], lengths).sum()

    compiled = torch.compile(loss, fullgraph=True)
    expected = loss(logits)
    assert_close(compiled(logits), expected, atol=1e-5, rtol=1e-5, name="compiled loss")

