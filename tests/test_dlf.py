"""DLF candidate search: fused paths (torch, Triton) against the brute-force reference, ties, α = 0, masked
tokens, overflow, bad input, backend choice through infigw.dispatch.

Triton cases run on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (set before pytest starts); else they skip.
"""
import itertools
import os

import pytest
import torch

from infigw import dispatch
from infigw.dispatch import BackendUnavailableError
from infigw.dlf import DEFAULT_GRID, candidate_alphas, dlf_reference, dlf_search
from infigw.dlf.common import MAX_FULL_CANDIDATES

from .helpers import assert_close, tied_logits

HAS_TRITON_TARGET = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=[
            pytest.mark.triton_interpret,
            pytest.mark.skipif(not HAS_TRITON_TARGET, reason="needs CUDA or TRITON_INTERPRET=1 set before pytest"),
        ],
    ),
]
# fp32 accumulation vs an fp64 reference: relative error of the KLs (which come from differences of
# log-sum-exps of size ~ max|logit| + log V) and of the objective (squares of KL differences).
RTOL = 2e-5


def make_logits(batch, vocab, experts, scale=3.0, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    large = torch.randn(batch, vocab, generator=g) * scale
    small = torch.randn(batch, vocab, generator=g) * scale
    expert = small.unsqueeze(1) + torch.randn(batch, experts, vocab, generator=g) * (scale / 4)
    return tuple(x.to(device=device, dtype=dtype) for x in (large, small, expert))


def magnitude(*xs):
    return 1.0 + max(float(x.abs().max()) for x in xs)


def assert_matches_reference(res, ref, inputs, logits_at=None):
    """Objective/KLs within fp32 tolerance of the fp64 reference and the same choice up to near-ties; the fused
    logits where ``logits_at`` (bool, like the logits) holds, everywhere by default."""
    scale = magnitude(*inputs) + float(torch.log(torch.tensor(float(inputs[0].shape[-1]))))
    kl_tol = RTOL * scale
    for name in ("kl_forward", "kl_reverse", "target_forward", "target_reverse"):
        got, want = getattr(res, name).double().cpu(), getattr(ref, name).cpu()
        assert_close(got, want, rtol=RTOL, atol=kl_tol, name=name)
    # objective error ≈ 2·|KL − target|·kl_tol per term
    spread = float((ref.kl_forward.abs().max() + ref.target_forward.abs().max() + 1).cpu())
    obj_tol = 4 * ref.target_forward.shape[1] * spread * kl_tol
    got_obj, want_obj = res.objective.double().cpu(), ref.objective.cpu()
    assert_close(got_obj, want_obj, rtol=RTOL, atol=obj_tol, name="objective")
    best = want_obj.min(dim=1).values
    chosen = want_obj.gather(1, res.candidate.cpu().unsqueeze(1)).squeeze(1)
    assert bool((chosen <= best + 2 * obj_tol).all()), f"fused choice not optimal: {chosen} vs {best}"
    top2 = want_obj.topk(2, dim=1, largest=False).values if want_obj.shape[1] > 1 else None
    clear = torch.ones_like(best, dtype=torch.bool) if top2 is None else (top2[:, 1] - top2[:, 0]) > 2 * obj_tol
    assert torch.equal(res.candidate.cpu()[clear], ref.candidate.cpu()[clear]), (
        f"argmin differs on rows with a clear minimum: {res.candidate.cpu()} vs {ref.candidate.cpu()}"
    )
    picked = ref.candidates.to(res.alpha.dtype).cpu()[res.candidate.cpu()]
    assert_close(res.alpha, picked, atol=0, rtol=0, name="alpha (the chosen candidate's row)")
    fused = inputs[0].double() + torch.einsum("bt,btv->bv", res.alpha.double(), inputs[2].double() - inputs[1].double().unsqueeze(1))
    at = torch.ones_like(fused, dtype=torch.bool) if logits_at is None else logits_at
    assert_close(res.logits[at], fused[at], rtol=RTOL, atol=RTOL * magnitude(*inputs), name="fused logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "batch,vocab,experts,mode,scale",
    [
        (3, 100, 2, "single", 3.0),
        (2, 257, 1, "single", 1.0),
        (1, 1, 3, "single", 3.0),  # V = 1: every distribution is a point mass
        (2, 70, 2, "full", 3.0),
        (4, 33, 4, "single", 40.0),  # very peaked distributions
        (2, 129, 3, "single", 0.01),  # nearly uniform
    ],
)
def test_fused_matches_reference(backend, batch, vocab, experts, mode, scale):
    inputs = make_logits(batch, vocab, experts, scale=scale, seed=vocab)
    ref = dlf_reference(*(x.double() for x in inputs), mode=mode)
    res = dlf_search(*inputs, mode=mode, backend=backend)
    assert res.objective.shape == (batch, candidate_alphas(experts, mode=mode).shape[0])
    assert_matches_reference(res, ref, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_logits(backend):
    """Integer-valued logits: many exact ties inside every distribution, and between candidates' KLs."""
    g = torch.Generator().manual_seed(2)
    large, small = tied_logits(4, 96, generator=g), tied_logits(4, 96, generator=g)
    experts = torch.stack([small + tied_logits(4, 96, levels=2, generator=g), tied_logits(4, 96, generator=g)], 1)
    inputs = tuple(x.to(DEVICE) for x in (large, small, experts))
    ref = dlf_reference(*(x.double() for x in inputs))
    assert_matches_reference(dlf_search(*inputs, backend=backend), ref, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_fp32(backend, dtype):
    inputs = make_logits(3, 90, 2, dtype=dtype, seed=5)
    ref = dlf_reference(*(x.double() for x in inputs))
    res = dlf_search(*inputs, backend=backend)
    assert res.logits.dtype == torch.float32 and res.objective.dtype == torch.float32
    assert_matches_reference(res, ref, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_expert_list(backend):
    """Rows of a (B, seq, V) logits tensor (row stride != V) and experts given as a list."""
    seq = torch.randn(2, 3, 75, device=DEVICE) * 2
    large, small = seq[:, -1, :], seq[:, 0, :]
    experts = [seq[:, 1, :], small + 0.3 * torch.randn_like(small)]
    ref = dlf_reference(large.double(), small.double(), [e.double() for e in experts])
    res = dlf_search(large, small, experts, backend=backend)
    assert_matches_reference(res, ref, (large, small, torch.stack(experts, 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_follow_the_documented_order(backend):
    """Identical experts tie exactly: the smaller expert index wins; an expert equal to the base makes every
    α tie: α = 0 (candidate 0) wins."""
    large, small, expert = make_logits(3, 64, 1, seed=11)
    twins = torch.cat([expert, expert], dim=1)
    for exp_logits in (twins, small.unsqueeze(1).expand(3, 2, 64)):
        ref = dlf_reference(large, small, exp_logits)
        res = dlf_search(large, small, exp_logits, backend=backend)
        assert torch.equal(res.candidate.cpu(), ref.candidate.cpu()), f"{res.candidate} vs {ref.candidate}"
        assert bool((res.expert == 0).all()), f"tie not broken towards expert 0: {res.expert}"
    assert bool((res.candidate == 0).all()) and bool((res.alpha == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_zero_reproduces_large_model(backend):
    large, small, experts = make_logits(4, 50, 3, seed=3)
    res = dlf_search(large, small, experts, grid=(0.0,), backend=backend)
    assert torch.equal(res.logits, large.float()), "α = 0 must return the large model's logits exactly"
    assert bool((res.alpha == 0).all())
    # KL(P‖P) = 0, so the objective is Σ_t target_f² + target_r²
    assert float(res.kl_forward.abs().max()) < RTOL and float(res.kl_reverse.abs().max()) < RTOL
    want = (res.target_forward.square() + res.target_reverse.square()).sum(1)
    assert_close(res.objective[:, 0], want, rtol=RTOL, atol=RTOL, name="objective at α = 0")


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_target_picks_its_alpha(backend):
    """A single expert whose shift is exactly what α* moves P by: with P = Q the objective is 0 at α = 1."""
    small = torch.randn(2, 40, device=DEVICE)
    expert = small.unsqueeze(1) + torch.randn(2, 1, 40, device=DEVICE)
    res = dlf_search(small, small, expert, backend=backend)
    assert_close(res.alpha, torch.ones(2, 1), atol=0, rtol=0, name="α* (1 when L == S)")
    assert float(res.objective.min(dim=1).values.max()) < RTOL


@pytest.mark.triton_interpret
@pytest.mark.skipif(not HAS_TRITON_TARGET, reason="needs CUDA or TRITON_INTERPRET=1 set before pytest")
@pytest.mark.parametrize("num_splits", [1, 2, 7])
def test_triton_vocabulary_splits_agree(num_splits):
    from infigw.triton.dlf_search import candidate_stats

    large, small, experts = make_logits(2, 300, 2, seed=num_splits)
    cands = candidate_alphas(2, device=DEVICE)
    ref = dlf_reference(large.double(), small.double(), experts.double())
    got = candidate_stats(large, small, experts, cands, num_splits=num_splits)
    assert_close(got[0], ref.objective, rtol=RTOL, atol=1e-4, name=f"objective, {num_splits} splits")
    assert_close(got[1], ref.kl_forward, rtol=RTOL, atol=1e-5, name=f"KL(P~|P), {num_splits} splits")


@pytest.mark.parametrize("mode", ["single", "full"])
def test_torch_tiles_merge(monkeypatch, mode):
    """Force many (row, vocabulary) tiles in the torch path so the online merge across tiles is exercised."""
    from infigw.dlf import search

    monkeypatch.setattr(search, "TORCH_MIN_TILE", 1)
    monkeypatch.setattr(search, "TORCH_TILE_FACTOR", 1)
    monkeypatch.setattr(search, "TORCH_MIN_VOCAB_CHUNK", 16)
    inputs = make_logits(5, 100, 2, scale=6.0, seed=8)
    ref = dlf_reference(*(x.double() for x in inputs), mode=mode)
    assert_matches_reference(dlf_search(*inputs, mode=mode, backend="torch"), ref, inputs)


def test_candidate_order():
    grid = (0.0, 0.5, 1.5)
    single = candidate_alphas(2, grid, "single")
    assert single.tolist() == [[g if j == t else 0.0 for j in range(2)] for g in grid for t in range(2)]
    full = candidate_alphas(2, grid, "full")
    assert full.tolist() == [list(r) for r in itertools.product(grid, repeat=2)]
    assert len(DEFAULT_GRID) == 21 and DEFAULT_GRID[0] == 0.0 and DEFAULT_GRID[-1] == 2.0
    assert candidate_alphas(4).shape == (84, 4)


NONFINITE_WARNING = "ignore::RuntimeWarning"  # numpy on NaN/inf values, under the Triton interpreter


@pytest.mark.parametrize("search", [dlf_reference, dlf_search])
def test_bad_inputs_raise_clear_errors(search):
    large, small, experts = make_logits(2, 20, 2)
    cases = [
        ((large, small[:, :19], experts), ValueError, "vocabulary mismatch: small_logits"),
        ((large, small, experts[..., :19]), ValueError, "vocabulary mismatch: expert_logits"),
        ((large, small, experts[:, :0]), ValueError, "expert_logits must not be empty"),
        ((large, small, []), ValueError, "at least one expert"),
        ((large, small, "abc"), TypeError, "expert_logits must be a"),
        ((large, small[:1], experts), ValueError, "batch mismatch"),
        ((large[:0], small[:0], experts[:0]), ValueError, "large_logits must not be empty"),
        ((large[0], small, experts), ValueError, r"large_logits must have 2 dimensions \(batch, vocab\)"),
        ((large, small, experts[:, 0]), ValueError, r"expert_logits must have 3 dimensions \(batch, num_experts"),
        ((large.long(), small, experts), TypeError, "large_logits must be float32"),
    ]
    for args, exc, text in cases:
        with pytest.raises(exc, match=text):
            search(*args)
    for grid, exc, text in (
        (None, TypeError, "grid must be a sequence"),
        ("abc", TypeError, "grid must be a sequence"),
        (1.0, TypeError, "grid must be a sequence"),
        (torch.tensor(1.0), TypeError, "grid must be a sequence"),
        ((0.0, "a"), ValueError, "grid must hold finite numbers, got 'a'"),
        ((0.0, True), ValueError, "grid must hold finite numbers, got True"),
        ((0.0, float("nan")), ValueError, "grid must hold finite numbers"),
        ((), ValueError, "grid is empty"),
        ((0.0, 0.0), ValueError, "strictly increasing"),
    ):
        with pytest.raises(exc, match=text):
            search(large, small, experts, grid=grid)
    assert torch.equal(search(large, small, experts, grid=torch.tensor([0.0, 1.0])).candidates,
                       search(large, small, experts, grid=[0, 1]).candidates)
    with pytest.raises(ValueError, match="mode must be one of"):
        search(large, small, experts, mode="joint")
    many = torch.randn(2, 5, 20)
    with pytest.raises(ValueError, match=f"> {MAX_FULL_CANDIDATES}"):
        search(torch.randn(2, 20), torch.randn(2, 20), many, mode="full")


@pytest.mark.filterwarnings(NONFINITE_WARNING)
@pytest.mark.parametrize("search", [dlf_reference, dlf_search] + [
    pytest.param(lambda *args: dlf_search(*args, backend="triton"), id="triton", marks=BACKENDS[1].marks)
])
def test_non_finite_inputs_name_the_tensor(search):
    large, small, experts = make_logits(3, 20, 2, device="cpu")
    for pos, bad, text in (
        (0, float("nan"), r"large_logits contains NaN or \+inf in batch rows \[1\]"),
        (0, float("inf"), r"large_logits contains NaN or \+inf"),
        (1, float("nan"), "small_logits contains non-finite values"),
        (1, float("-inf"), "small_logits contains non-finite values"),
        (2, float("inf"), "expert_logits contains non-finite values"),
        (2, float("-inf"), "expert_logits contains non-finite values"),
    ):
        args = [large.clone(), small.clone(), experts.clone()]
        args[pos][1].view(-1)[7] = bad
        with pytest.raises(ValueError, match=text):
            search(*[x.to(DEVICE) for x in args])
    masked = large.clone()
    masked[2] = float("-inf")
    with pytest.raises(ValueError, match=r"large_logits masks every token \(all -inf\) in batch rows \[2\]"):
        search(masked.to(DEVICE), small.to(DEVICE), experts.to(DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_tokens_stay_masked(backend, monkeypatch):
    """-inf in the large logits (a token masked by an earlier logits processor) has probability 0 under P and
    every P̃_c. Oracle: the reference with the masked logits replaced by -1e4, whose exp is exactly 0 in fp64.
    Row 0 has its whole first part masked, so a first vocabulary tile/split sees only -inf."""
    from infigw.dlf import search

    monkeypatch.setattr(search, "TORCH_MIN_TILE", 1)  # many torch tiles: the first ones fully masked
    monkeypatch.setattr(search, "TORCH_TILE_FACTOR", 1)
    monkeypatch.setattr(search, "TORCH_MIN_VOCAB_CHUNK", 16)
    large, small, experts = make_logits(3, 200, 2, seed=12)
    masked = torch.zeros_like(large, dtype=torch.bool)
    masked[0, :150] = True
    masked[1, torch.randperm(200, generator=torch.Generator().manual_seed(0))[:60]] = True
    large = large.masked_fill(masked, float("-inf"))
    oracle = dlf_reference(large.double().masked_fill(masked, -1e4), small.double(), experts.double())
    res = dlf_search(large, small, experts, backend=backend)
    assert bool(res.logits[masked].eq(float("-inf")).all()), "a masked token got a finite fused logit"
    assert bool(res.logits[~masked].isfinite().all())
    assert_matches_reference(res, oracle, (large.masked_fill(masked, -1e4), small, experts), logits_at=~masked)
    ref = dlf_reference(large.double(), small.double(), experts.double())
    assert_close(ref.objective, oracle.objective, rtol=1e-12, atol=1e-12, name="reference with -inf vs -1e4")


@pytest.mark.filterwarnings(NONFINITE_WARNING)
def test_overflowing_candidates_are_never_chosen():
    """Finite logits near the float32 limit: at token 0, L = 2e38 and Δ = 1e38 with Q = Q_t = 0 there. Every α > 0
    overflows (L + αΔ or the cancellation in its KLs); exactly, every α has the same objective (P = P̃ = a point
    mass), so α = 0 is right, as the fp64 reference finds."""
    large, small, experts = make_logits(2, 30, 1, device="cpu")
    large[:, 0], small[:, 0], experts[:, 0, 0] = 2e38, -1.3e38, -3e37
    for backend in ("torch",) + (("triton",) if HAS_TRITON_TARGET else ()):
        res = dlf_search(*(x.to(DEVICE) for x in (large, small, experts)), backend=backend)
        assert bool((res.alpha == 0).all()) and torch.equal(res.logits.cpu(), large)
        assert not bool(res.objective.isfinite().all()), "the test should make some candidates overflow"
    ref = dlf_reference(large.double(), small.double(), experts.double())
    assert bool((ref.candidate == 0).all())


@pytest.mark.filterwarnings(NONFINITE_WARNING)
@pytest.mark.parametrize("search", [dlf_reference, dlf_search])
def test_logits_near_float32_max_raise_when_every_candidate_overflows(search):
    """Logits of magnitude ~2e38: Δ = S_t − S overflows, so every candidate's objective does."""
    g = torch.Generator().manual_seed(1)
    large, small = (torch.rand(2, 16, generator=g) * 2 - 1) * 2e38, (torch.rand(2, 16, generator=g) * 2 - 1) * 2e38
    experts = ((torch.rand(2, 1, 16, generator=g) * 2 - 1) * 2e38)
    assert all(bool(x.isfinite().all()) for x in (large, small, experts))
    with pytest.raises(ValueError, match=r"every DLF candidate overflows float32 in batch rows \[0, 1\]"):
        search(large, small, experts)


@pytest.mark.filterwarnings(NONFINITE_WARNING)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_passes_through_without_check(backend):
    large, small, experts = make_logits(2, 20, 1)
    large[1, 3] = float("nan")
    res = dlf_search(large, small, experts, backend=backend, check_finite=False)
    assert bool(res.objective[1].isnan().all()) and bool(res.objective[0].isfinite().all())


def test_backend_is_chosen_by_dispatch(monkeypatch):
    """The op "dlf_search" of infigw.dispatch: auto order by device, INFIGW_BACKEND, unavailable backends."""
    large, small, experts = make_logits(1, 8, 1, device="cpu")
    want = dlf_search(large, small, experts, backend="torch")
    assert torch.equal(dlf_search(large, small, experts).objective, want.objective)
    assert dispatch.resolve("dlf_search", "auto", torch.device("cpu"))[0] == "torch"
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        dlf_search(large, small, experts, backend="bogus")
    with pytest.raises(BackendUnavailableError, match="backend 'cpp' cannot run 'dlf_search'"):
        dlf_search(large, small, experts, backend="cpp")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="'triton' needs CUDA tensors"):
        dlf_search(large, small, experts, backend="triton")
    monkeypatch.setenv("INFIGW_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="'triton' needs CUDA tensors"):
        dlf_search(large, small, experts)
    monkeypatch.setenv("INFIGW_BACKEND", "torch")
    assert torch.equal(dlf_search(large, small, experts).objective, want.objective)


def test_auto_prefers_triton_for_cuda_tensors():
    """Resolution only (nothing runs): on CUDA tensors auto takes the Triton kernel where Triton imports."""
    pytest.importorskip("triton")
    assert dispatch.resolve("dlf_search", "auto", torch.device("cuda"))[0] == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("vocab,experts", [(32000, 4), (128256, 1)])
def test_triton_cuda_realistic_vocab(vocab, experts):
    inputs = make_logits(8, vocab, experts, scale=4.0, dtype=torch.bfloat16, seed=1, device="cuda")
    ref = dlf_reference(*(x.double() for x in inputs), candidate_chunk=16)
    res = dlf_search(*inputs, backend="triton")
    assert_matches_reference(res, ref, inputs)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted functions here")
def test_triton_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: build every kernel ahead of time for an H100 (needs
    only the ptxas bundled with triton, no GPU)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from infigw.triton import dlf_search as ts

    f32, i32 = "*fp32", "i32"
    strides = {"stride_l": i32, "stride_s": i32, "stride_eb": i32, "stride_et": i32}
    kernels = [
        (ts._partial_kernel,
         {"L": "*bf16", "S": "*bf16", "E": "*bf16", "A": f32, **strides, "cand_part": f32, "p_part": f32,
          "q_part": f32, "qt_part": f32, "V": i32, "C": i32, "n_split": i32},
         {"T": 4, "T_PAD": 4, "C_BLOCK": 128, "BLOCK_V": 32, "TILES": 10}, ts.PARTIAL_NUM_WARPS),
        (ts._combine_kernel,
         {"A": f32, "cand_part": f32, "p_part": f32, "q_part": f32, "qt_part": f32, "objective": f32,
          "kl_forward": f32, "kl_reverse": f32, "target_forward": f32, "target_reverse": f32, "C": i32, "n_split": i32},
         {"T": 3, "T_PAD": 4, "C_BLOCK": 64, "S_PAD": 64}, ts.COMBINE_NUM_WARPS),
        (ts._apply_kernel,
         {"L": f32, "S": f32, "E": f32, "alpha": f32, "out": f32, **strides, "V": i32},
         {"T": 4, "T_PAD": 4, "BLOCK_V": ts.APPLY_BLOCK_V}, 4),
    ]
    for fn, signature, constexprs, num_warps in kernels:
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": num_warps})
        except RuntimeError as exc:
            if "ptxas" in str(exc).lower():
                pytest.skip(f"no usable ptxas: {exc}")
            raise
        assert compiled.asm["cubin"], f"{fn.__name__}: empty cubin"
