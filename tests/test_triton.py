"""What only the Triton backend (infigw.triton) needs checked; its numerics against the reference are in
test_topk_degrees.py and test_sorted_gw1d.py (interpreted on CPU under TRITON_INTERPRET=1, on CUDA with a GPU).

``test_kernels_compile_for_sm90`` needs neither a GPU nor the interpreter: it lowers every kernel to sm_90
machine code with Triton's bundled ptxas (catching typing errors the interpreter lets through). ``gpu`` cases use
realistic sizes (hundreds of tiles per row, more than 2^31 logits, torch.compile) and skip without CUDA.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from infigw import reference  # noqa: E402
from infigw.triton import _common, closed_forms, topk_degrees  # noqa: E402

from .helpers import VALUE_MODES, assert_close, compare_topk_degrees, random_mask, rows_of  # noqa: E402

INTERPRET = _common.INTERPRETED  # TRITON_INTERPRET=1 was set when the kernels were defined
HAS_CUDA = torch.cuda.is_available()


def gpu(test):
    """A case at realistic sizes: CUDA only."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA device")(test))


@pytest.mark.skipif(INTERPRET, reason="the interpreter runs the kernels on CPU tensors")
def test_cpu_tensors_need_the_interpreter():
    with pytest.raises(ValueError, match="CUDA tensor"):
        topk_degrees.topk_degrees(torch.randn(2, 8), torch.zeros(2, dtype=torch.int64), 1, 2)
    with pytest.raises(ValueError, match="CUDA tensor"):
        closed_forms.sorted_gw1d(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))


@pytest.mark.skipif(INTERPRET, reason="the interpreter replaces the kernels by Python functions")
def test_kernels_compile_for_sm90():
    """Every kernel lowers to sm_90 machine code (catches typing errors the interpreter lets through)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kept = {"kept_val_ptr": "*fp32", "kept_id_ptr": "*i64", "row_graph_ptr": "*i64", "log_ptr": "*fp32",
            "num_graphs": "i32", "num_nodes": "i32", "vocab": "i32"}
    cosine = {"node_max_ptr": "*fp32", "inv_sqrt_q_ptr": "*fp32"}
    k = {"K": 10, "K_PAD": 16}
    cases = [
        (topk_degrees._topk_rows_kernel,
         dict(x_ptr="*bf16", x_row_stride="i64", vocab="i32", row_graph_ptr="*i64", num_graphs="i32",
              kept_val_ptr="*fp32", kept_id_ptr="*i64", lse_ptr="*fp32", log_ptr="*fp32", deg_ptr="*fp64",
              touched_ptr="*i1", num_nodes="i32", inv_temp="fp32"),
         [dict(k, BLOCK_V=2048, VALUES_MODE=mode, RANK_NODES=False, SCATTER=True, WRITE_LOGS=mode != 0)
          for mode in (0, 1, 2)]),
        (topk_degrees._aggregate_kernel,
         dict(kept, **cosine, grad_deg_ptr="*fp32", out_ptr="*fp64", touched_ptr="*i1", contrib_ptr="*fp64",
              key_ptr="*i64"),
         [dict(k, RANK_NODES=False, LOG_DOMAIN=log, COSINE=True, MODE=mode.value, DETERMINISTIC=det,
               WRITE_TOUCHED=True)
          for log in (False, True) for det in (False, True)
          for mode in (topk_degrees._SQUARES, topk_degrees._DEGREES, topk_degrees._COSINE_Z)]),
        (topk_degrees._aggregate_kernel,
         dict(kept, **cosine, grad_deg_ptr="*fp32", out_ptr="*fp32", touched_ptr="*i1", contrib_ptr="*fp32",
              key_ptr="*i64"),
         [dict(k, RANK_NODES=False, LOG_DOMAIN=log, COSINE=True, MODE=topk_degrees._NODE_MAX.value,
               DETERMINISTIC=False, WRITE_TOUCHED=False) for log in (False, True)]),
        (topk_degrees._segment_sum_kernel,
         dict(sorted_key_ptr="*i64", perm_ptr="*i64", end_ptr="*i64", contrib_ptr="*fp64", out_ptr="*fp64",
              total="i32", sentinel="i64"),
         [dict(BLOCK=128)]),
        (topk_degrees._grad_rows_kernel,
         dict(kept, **cosine, scale_ptr="*fp32", z_ptr="*fp32", grad_deg_ptr="*fp32", grad_kept_ptr="*fp32",
              coef_ptr="*fp32", inv_temp="fp32"),
         [dict(k, VALUES_MODE=mode, RANK_NODES=False, LOG_DOMAIN=mode != 0, COSINE=cos)
          for mode in (0, 1, 2) for cos in (False, True)]),
        (topk_degrees._probs_dense_grad_kernel,
         dict(x_ptr="*bf16", x_row_stride="i64", grad_ptr="*bf16", lse_ptr="*fp32", coef_ptr="*fp32",
              row_graph_ptr="*i64", num_graphs="i32", vocab="i32", inv_temp="fp32"),
         [dict(BLOCK_V=2048)]),
        (topk_degrees._scatter_grad_kernel,
         dict(grad_ptr="*bf16", vocab="i32", kept_id_ptr="*i64", grad_kept_ptr="*fp32", row_graph_ptr="*i64",
              num_graphs="i32"),
         [dict(k, ACCUMULATE=True)]),
        (closed_forms._gw1d_kernel,
         dict(x_ptr="*fp32", y_ptr="*fp32", len_ptr="*i64", out_ptr="*fp32", width="i32"), [dict(BLOCK=1024)]),
        (closed_forms._gw1d_backward_kernel,
         dict(grad_ptr="*fp32", x_ptr="*fp32", y_ptr="*fp32", len_ptr="*i64", grad_x_ptr="*fp32",
              grad_y_ptr="*fp32", width="i32"), [dict(BLOCK=1024)]),
    ]
    for kernel, signature, variants in cases:
        for constants in variants:
            full = dict(signature, **{name: "constexpr" for name in constants})
            compiled = triton.compile(ASTSource(fn=kernel, signature=full, constexprs=constants),
                                      target=GPUTarget("cuda", 90, 32))
            assert compiled.asm.get("cubin"), f"{kernel.fn.__name__} {constants}: no sm_90 binary"


# ------------------------------------------------------------------------------------------ GPU, real sizes


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("values", VALUE_MODES)
def test_gpu_large_vocabulary(dtype, values):
    """V = 262144 (several hundred tiles per row), an odd row count, k = 64 (multi-word running top-k)."""
    from infigw.testing import llm_like_logits

    logits = llm_like_logits(3, 37, 262144, seed=2, dtype=dtype, device="cuda").view(-1, 262144)
    row_graph = rows_of(random_mask(3, 37, generator=torch.Generator().manual_seed(2))).cuda()
    for nodes, norm, det in (("vocab", "mean", False), ("rank", "cosine", True)):
        compare_topk_degrees(topk_degrees.topk_degrees, logits, row_graph, 3, 64, values, nodes, norm, det)


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
        out = torch.ops.infigw_triton.topk_degrees(x, row_graph, 2, 8, "probs", 1.0, "vocab", "cosine", False, False)
        f = out[0].sort(-1, descending=True).values
        lengths = torch.full((1,), f.shape[-1], dtype=torch.int64, device=f.device)
        return torch.ops.infigw_triton.sorted_gw1d(f[:1], f[1:], lengths, False).sum()

    compiled = torch.compile(loss, fullgraph=True)
    expected = loss(logits)
    assert_close(compiled(logits), expected, atol=1e-5, rtol=1e-5, name="compiled loss")
