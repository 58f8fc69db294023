"""The objective's kernels -- ops ``uld_full``, ``topk_summary`` and ``topk_summary_uld`` -- against their
plain-torch reference (:mod:`infigw.reference.uld`, :mod:`infigw.reference.summary`).

One comparison harness per op runs every kernel backend available here (``cpp`` on CPU, ``cuda`` on a GPU) on
the same inputs as the reference: values, gradients of a random combination of the outputs, ties (the tie rule of
docs/math.md §7), odd shapes, teachers of other vocabularies and lengths, probability teachers, unpaired and
invalid rows holding -inf/NaN, NaN rows, fp64 gradcheck, ``torch.library.opcheck`` and argument errors.
"""
import pytest
import torch

from infigw import dispatch, reference

from .helpers import DTYPES, assert_close, tied_logits, tolerances

_STATUS = dispatch.backends()
ON_GPU = torch.cuda.is_available()


def kernels(op):
    """(backend, device) of every kernel backend of ``op`` that can run here."""
    found = []
    for backend, device in (("cpp", "cpu"), ("cuda", "cuda")):
        if device == "cuda" and not ON_GPU:
            continue
        try:
            dispatch.resolve(op, backend, torch.device(device))
        except dispatch.BackendUnavailableError:
            continue
        found.append((backend, device))
    return found


def kernel_params(op):
    return pytest.mark.parametrize("backend,device", kernels(op) or [pytest.param(None, None, marks=pytest.mark.skip(
        reason=f"no kernel backend of {op} here: {_STATUS}"))])


# (name, student rows N, student vocabulary V, teacher rows M, teacher vocabulary V_t)
SHAPES = [
    ("odd, wider teacher", 37, 1271, 41, 1300),
    ("narrower teacher", 29, 300, 23, 257),
    ("vocabulary 1", 5, 1, 7, 3),
    ("one teacher row", 6, 17, 1, 17),
]


def grad_tolerance(dtype):
    """(atol, rtol) for gradients scaled to a largest entry of 1 (a few units in the last place of fp16/bf16)."""
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}.get(dtype)
    return (1e-5, 1e-4) if ulp is None else (4 * ulp, 4 * ulp)


def assert_grad_close(ours, ref, dtype, name):
    scale = ref.detach().double().abs().max().clamp_min(1e-30)
    atol, rtol = grad_tolerance(dtype)
    assert_close(ours.detach().cpu().double() / scale, ref.detach().double() / scale, atol=atol, rtol=rtol, name=name)


def random_partner(rows, teacher_rows, gen, unpaired=0.3):
    partner = torch.randint(0, teacher_rows, (rows,), generator=gen)
    return torch.where(torch.rand(rows, generator=gen) < unpaired, -1, partner)


def run_uld(backend, device, student, teacher, partner, temperature, probs=False, weights=None):
    """(ours, reference) values and student gradients of uld_full under the loss sum(weights * uld)."""
    _, implementation = dispatch.resolve("uld_full", backend, torch.device(device))
    weights = torch.randn(student.shape[0], generator=torch.Generator().manual_seed(5)) if weights is None else weights
    ours_x = student.detach().to(device).requires_grad_(True)
    ours = implementation(ours_x, teacher.to(device), partner.to(device), temperature, probs)
    (ours_grad,) = torch.autograd.grad((ours * weights.to(device, ours.dtype)).sum(), ours_x)
    ref_x = student.detach().clone().requires_grad_(True)
    ref = reference.uld_full(ref_x, teacher, partner, temperature, probs)
    (ref_grad,) = torch.autograd.grad((ref * weights.to(ref.dtype)).sum(), ref_x)
    return (ours.cpu(), ours_grad.cpu()), (ref, ref_grad)


def check_uld(backend, device, student, teacher, partner, temperature, probs=False, name=""):
    (ours, ours_grad), (ref, ref_grad) = run_uld(backend, device, student, teacher, partner, temperature, probs)
    atol, rtol = tolerances(student.dtype)
    assert_close(ours, ref, atol=atol, rtol=rtol, name=f"{name} uld")
    assert_grad_close(ours_grad, ref_grad, student.dtype, f"{name} student gradient")
    unpaired = partner < 0
    assert not ours[unpaired].any() and not ours_grad[unpaired].any(), f"{name}: unpaired rows must give 0"


# ---------------------------------------------------------------------------------------------- uld_full
@kernel_params("uld_full")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_uld_full_matches_reference(backend, device, dtype, shape):
    name, rows, vocab, teacher_rows, teacher_vocab = shape
    gen = torch.Generator().manual_seed(vocab + rows)
    student = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    teacher = (torch.randn(teacher_rows, teacher_vocab, generator=gen) * 2).to(dtype)
    partner = random_partner(rows, teacher_rows, gen)
    check_uld(backend, device, student, teacher, partner, 0.8, name=f"{backend} {name} {dtype}")


@kernel_params("uld_full")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_uld_full_ties_follow_the_tie_rule(backend, device, dtype):
    """Integer logits: equal probabilities within each list and across them (sign 0 where they meet)."""
    gen = torch.Generator().manual_seed(3)
    student = tied_logits(23, 301, levels=4, generator=gen, dtype=dtype)
    teacher = tied_logits(19, 280, levels=4, generator=gen, dtype=dtype)
    partner = random_partner(23, 19, gen)
    check_uld(backend, device, student, teacher, partner, 1.0, name=f"{backend} ties {dtype}")
    # a teacher equal to the student on some rows: ULD 0 there, and a gradient of exactly 0
    same = torch.cat([student[:10], tied_logits(13, 301, levels=4, generator=gen, dtype=dtype)])
    (ours, grad), _ = run_uld(backend, device, student, same, torch.arange(23), 1.0)
    assert not ours[:10].any() and not grad[:10].any(), "a teacher row equal to its student row must give exactly 0"


@kernel_params("uld_full")
@pytest.mark.parametrize("similar", [True, False], ids=["close", "far"])
def test_uld_full_long_rows(backend, device, similar):
    """Rows long enough for many entries per bin and the radix sort of the undecided ones (close distributions
    leave most entries undecided by their bins; distant ones almost none). Close ones in fp64: there the signs
    of p_r - q_r hinge on differences near fp32 rounding, so fp32 gradients of two exact implementations differ."""
    gen = torch.Generator().manual_seed(11)
    dtype = torch.float64 if similar else torch.float32
    student = torch.randn(6, 5000, generator=gen, dtype=dtype) * 2
    noise = torch.randn(6, 5000, generator=gen, dtype=dtype)
    teacher = student + 1e-3 * noise if similar else noise * 4
    check_uld(backend, device, student, teacher, torch.tensor([0, 1, 2, 3, 4, -1]), 1.0, name=f"{backend} long")


@kernel_params("uld_full")
@pytest.mark.parametrize("tail", [False, True], ids=["kept", "tail bucket"])
def test_uld_full_probability_teachers(backend, device, tail):
    """Teacher rows of probabilities taken as given (a stored record's kept probabilities, optional tail)."""
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(13, 211, generator=gen)
    probs = torch.softmax(torch.randn(9, 7, generator=gen), -1) * 0.9
    if tail:
        probs = torch.cat([probs, 1 - probs.sum(-1, keepdim=True)], -1)
    check_uld(backend, device, student, probs, random_partner(13, 9, gen), 1.3, probs=True, name=f"{backend} probs")


@kernel_params("uld_full")
def test_uld_full_unpaired_padding_and_nan_rows(backend, device):
    """-inf/NaN padding on unpaired rows stays out of the result; a NaN in a paired row gives NaN, as the
    reference does, in that row only."""
    gen = torch.Generator().manual_seed(8)
    student = torch.randn(6, 40, generator=gen)
    student[1] = float("-inf")
    student[2, 3] = float("nan")
    student[4, :30] = float("-inf")  # a paired row with -inf entries (a masked vocabulary): finite
    teacher = torch.randn(5, 45, generator=gen)
    teacher[3] = float("nan")  # never read: no student row pairs with it
    partner = torch.tensor([0, -1, -1, 1, 2, 4])
    check_uld(backend, device, student, teacher, partner, 1.0, name=f"{backend} padding")
    student[5, 7] = float("nan")
    (ours, grad), (ref, _) = run_uld(backend, device, student, teacher, partner, 1.0)
    assert torch.isnan(ours[5]) and torch.isnan(ref[5]), "a NaN logit in a paired row makes its ULD NaN"
    assert torch.isfinite(ours[:5]).all() and torch.isfinite(grad[:5]).all(), "NaN must stay in its row"


@kernel_params("uld_full")
def test_uld_full_no_teacher_rows(backend, device):
    student = torch.randn(4, 9)
    (ours, grad), (ref, _) = run_uld(backend, device, student, torch.randn(0, 9), torch.full((4,), -1), 1.0)
    assert not ours.any() and not grad.any() and not ref.any()


@kernel_params("uld_full")
def test_uld_full_gradcheck_fp64(backend, device):
    if device != "cpu":
        pytest.skip("the GPU kernels take fp32/fp16/bf16 logits only")
    gen = torch.Generator().manual_seed(12)
    student = torch.randn(7, 33, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    teacher = torch.randn(5, 41, generator=gen, dtype=torch.float64).to(device)
    partner = torch.tensor([0, 4, -1, 2, 2, 1, 3], device=device)
    _, implementation = dispatch.resolve("uld_full", backend, torch.device(device))
    torch.autograd.gradcheck(lambda x: implementation(x, teacher, partner, 1.7, False), (student,))


@kernel_params("uld_full")
def test_uld_full_is_deterministic_with_or_without_kept_signs(backend, device):
    """Two runs give the same bits; so does a forward that keeps no signs (backward then recomputes them)."""
    gen = torch.Generator().manual_seed(13)
    student = torch.randn(64, 700, generator=gen).to(device)
    teacher = torch.randn(70, 650, generator=gen).to(device)
    partner = random_partner(64, 70, gen).to(device)
    runs = []
    for keep_signs in (True, True, False):
        x = student.clone().requires_grad_(True)
        loss = torch.ops.infigw.uld_full(x, teacher, partner, 0.9, False, keep_signs)[0]
        (grad,) = torch.autograd.grad((loss * torch.arange(64, device=device)).sum(), x)
        runs.append((loss, grad))
    for loss, grad in runs[1:]:
        assert torch.equal(runs[0][0], loss) and torch.equal(runs[0][1], grad)


# ---------------------------------------------------------------------------------------------- topk_summary
def summary_inputs(gen, rows, vocab, dtype, labels=True):
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    valid = torch.rand(rows, generator=gen) < 0.75
    valid[0] = True
    logits[~valid] = float("nan")  # padding rows are never read
    gold = torch.randint(0, vocab, (rows,), generator=gen) if labels else None
    return logits, valid, gold


def run_summary(op, backend, device, logits, valid, args, seed=0):
    """(ours, reference) outputs and logits gradients of a summary op under a random combination of its
    floating outputs."""
    _, implementation = dispatch.resolve(op, backend, torch.device(device))
    def to(arg):  # tensors and lists of tensors to the device
        if isinstance(arg, list):
            return [to(a) for a in arg]
        return arg.to(device) if isinstance(arg, torch.Tensor) else arg

    ours_x = logits.detach().to(device).requires_grad_(True)
    ours_out = implementation(ours_x, valid.to(device), *to(list(args)))
    ours = [o.detach().cpu() for o in ours_out]
    ref_x = logits.detach().clone().requires_grad_(True)
    ref = getattr(reference, op)(ref_x, valid, *args)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) if o.is_floating_point() else None for o in ref]

    def combined(outputs):
        return sum((o.double() * w.to(o.device)).sum() for o, w in zip(outputs, weights) if w is not None and o.numel())

    (ours_grad,) = torch.autograd.grad(combined(ours_out), ours_x)
    (ref_grad,) = torch.autograd.grad(combined(ref), ref_x)
    return ours, ours_grad.cpu(), ref, ref_grad


def check_summary(op, backend, device, logits, valid, args, name):
    ours, ours_grad, ref, ref_grad = run_summary(op, backend, device, logits, valid, args)
    atol, rtol = tolerances(logits.dtype)
    labels = ["kept", "ids", "lse", "unit", "gold_logit", "uld"]
    for label, a, b in zip(labels, ours, ref):
        if label == "ids":
            assert torch.equal(a[valid], b[valid]), f"{name}: kept ids differ from the reference on valid rows"
        else:
            assert_close(a, b, atol=atol, rtol=rtol, name=f"{name} {label}")
    assert_grad_close(ours_grad, ref_grad, logits.dtype, f"{name} logits gradient")
    assert not ours_grad[~valid].any(), f"{name}: invalid rows must get a zero gradient"


@kernel_params("topk_summary")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,temperature,labels", [(7, 1.0, True), (1, 0.6, True), (3, 1.5, False)])
def test_topk_summary_matches_reference(backend, device, dtype, k, temperature, labels):
    gen = torch.Generator().manual_seed(k)
    logits, valid, gold = summary_inputs(gen, 37, 1271, dtype, labels)
    check_summary("topk_summary", backend, device, logits, valid, (k, temperature, gold, temperature != 1),
                  f"{backend} k={k} T={temperature} {dtype}")


@kernel_params("topk_summary")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_summary_ties_and_whole_vocabulary(backend, device, dtype):
    gen = torch.Generator().manual_seed(9)
    logits = tied_logits(21, 37, levels=5, generator=gen, dtype=dtype)
    valid = torch.rand(21, generator=gen) < 0.8
    gold = torch.randint(0, 37, (21,), generator=gen)
    for k in (5, 37):
        check_summary("topk_summary", backend, device, logits, valid, (k, 1.2, gold, True), f"{backend} ties k={k}")


@kernel_params("topk_summary_uld")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_topk_summary_uld_matches_reference(backend, device, dtype, temperature):
    """The fused summary + full-vocabulary ULD of two teachers (logits of another vocabulary and length, and
    probabilities), one backward for every output."""
    gen = torch.Generator().manual_seed(21)
    logits, valid, gold = summary_inputs(gen, 37, 1271, dtype)
    dense = (torch.randn(41, 1300, generator=gen) * 2).to(dtype)
    probs = torch.softmax(torch.randn(30, 9, generator=gen), -1)
    partners = torch.stack([torch.where(valid, random_partner(37, 41, gen), -1),
                            torch.where(valid, random_partner(37, 30, gen), -1)])
    args = (5, temperature, gold, temperature != 1, [dense, probs], partners, [False, True])
    check_summary("topk_summary_uld", backend, device, logits, valid, args, f"{backend} fused T={temperature} {dtype}")


@kernel_params("topk_summary_uld")
def test_topk_summary_uld_gradcheck_fp64(backend, device):
    if device != "cpu":
        pytest.skip("the GPU kernels take fp32/fp16/bf16 logits only")
    gen = torch.Generator().manual_seed(22)
    logits = torch.randn(6, 30, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    valid = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool, device=device)
    teacher = torch.randn(5, 33, generator=gen, dtype=torch.float64).to(device)
    partners = torch.tensor([[0, 2, -1, 4, -1, 1]], device=device)
    gold = torch.randint(0, 30, (6,), generator=gen).to(device)
    _, implementation = dispatch.resolve("topk_summary_uld", backend, torch.device(device))

    def floating(x):
        outputs = implementation(x, valid, 3, 1.4, gold, True, [teacher], partners, [False])
        return [o for o in outputs if o.is_floating_point()]

    torch.autograd.gradcheck(floating, (logits,))


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,temperature,labels", [(3, 1.0, True), (5, 0.6, True), (1, 1.3, False)])
def test_triton_topk_summary_matches_reference(dtype, k, temperature, labels, monkeypatch):
    """The Triton summary on CUDA, or in Triton's interpreter on CPU (TRITON_INTERPRET=1); tiny rows in tiles of
    16 entries, so that every row spans several tiles with a ragged tail."""
    pytest.importorskip("triton")
    device = "cuda" if ON_GPU else "cpu"
    try:
        dispatch.resolve("topk_summary", "triton", torch.device(device))
    except dispatch.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    from infigw.triton import topk_degrees

    monkeypatch.setattr(topk_degrees, "_MAX_BLOCK_V", 16)
    gen = torch.Generator().manual_seed(40 + k)
    logits, valid, gold = summary_inputs(gen, 9, 53, dtype, labels)
    check_summary("topk_summary", "triton", device, logits, valid, (k, temperature, gold, temperature != 1),
                  f"triton k={k} T={temperature} {dtype}")
    ties = tied_logits(7, 37, levels=4, generator=gen, dtype=dtype)
    tie_gold = torch.randint(0, 37, (7,), generator=gen) if labels else None
    check_summary("topk_summary", "triton", device, ties, torch.ones(7, dtype=torch.bool),
                  (k, temperature, tie_gold, temperature != 1), f"triton ties k={k}")


def test_triton_summary_kernels_compile_for_sm90():
    """The Triton summary kernels lower to sm_90 machine code (no GPU needed; catches typing errors the
    interpreter lets through)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from infigw.triton import topk_summary

    cases = [
        (topk_summary._summary_rows_kernel,
         dict(x_ptr="*bf16", x_row_stride="i64", vocab="i32", valid_ptr="*i1", gold_ptr="*i64", kept_ptr="*fp32",
              ids_ptr="*i64", lse_ptr="*fp32", unit_ptr="*fp32", gold_logit_ptr="*fp32", inv_temp="fp32"),
         dict(K=10, K_PAD=16, BLOCK_V=2048, UNIT=True, GOLD=True)),
        (topk_summary._summary_dense_grad_kernel,
         dict(x_ptr="*bf16", x_row_stride="i64", grad_ptr="*bf16", vocab="i32", valid_ptr="*i1", lse_ptr="*fp32",
              grad_lse_ptr="*fp32", unit_ptr="*fp32", grad_unit_ptr="*fp32", inv_temp="fp32"),
         dict(BLOCK_V=2048, UNIT=True)),
    ]
    for kernel, signature, constants in cases:
        signature = dict(signature, **{name: "constexpr" for name in constants})
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm.get("cubin"), f"{kernel.fn.__name__}: no sm_90 machine code"


# ---------------------------------------------------------------------------------------------- registration
@pytest.mark.skipif(_STATUS["cpp"] != "available", reason=f"C++ extension not usable: {_STATUS['cpp']}")
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if ON_GPU and _STATUS["cuda"] == "available" else []))
def test_opcheck_objective_ops(device):
    gen = torch.Generator().manual_seed(31)
    ops = torch.ops.infigw
    student = torch.randn(9, 40, generator=gen).to(device).requires_grad_(True)
    teacher = torch.randn(7, 45, generator=gen).to(device)
    partner = torch.tensor([0, 6, -1, 2, 2, 1, -1, 3, 5], device=device)
    for keep_signs in (False, True):
        torch.library.opcheck(ops.uld_full.default, (student, teacher, partner, 1.3, False, keep_signs))
        loss, student_lse, teacher_lse, signs, dot = ops.uld_full(student.detach(), teacher, partner, 1.3, False,
                                                                  keep_signs)
        torch.library.opcheck(ops.uld_full_backward.default, (torch.randn_like(loss), student.detach(), teacher,
                                                              partner, student_lse, teacher_lse, signs, dot, 1.3,
                                                              False))
    valid = (partner >= 0) | (torch.arange(9, device=device) == 2)
    gold = torch.randint(0, 40, (9,), generator=gen).to(device)
    no_partners = torch.empty((0, 9), dtype=torch.long, device=device)
    for args in ((4, 0.7, gold, True, [], no_partners, [], False),
                 (4, 1.0, None, False, [teacher], partner[None], [False], True),
                 (4, 1.0, gold, False, [teacher, teacher], torch.stack([partner, partner]), [False, False], True)):
        torch.library.opcheck(ops.topk_summary.default, (student, valid) + args)
    for keep_signs in (False, True):
        outputs = ops.topk_summary(student.detach(), valid, 4, 0.7, gold, True, [teacher], partner[None], [False],
                                   keep_signs)
        kept, ids, lse, unit, gold_logit, uld, teacher_lse, signs, uld_dot = outputs
        grads = [torch.randn_like(t) for t in (kept, lse, unit, gold_logit, uld)]
        torch.library.opcheck(ops.topk_summary_backward.default,
                              (*grads, student.detach(), valid, ids, lse, unit, gold, 0.7, [teacher], partner[None],
                               [False], teacher_lse, signs, uld_dot))


@pytest.mark.skipif(_STATUS["cpp"] != "available", reason=f"C++ extension not usable: {_STATUS['cpp']}")
@pytest.mark.parametrize("call,error,match", [
    (lambda o: o.uld_full(torch.randn(3, 5), torch.randn(2, 5), torch.tensor([0, 2, -1]), 1.0, False, False),
     ValueError, r"partner entries must lie in \[-1, 2\)"),
    (lambda o: o.uld_full(torch.randn(3, 5), torch.randn(2, 5), torch.tensor([0, 1]), 1.0, False, False),
     ValueError, r"partner must have shape \(3,\)"),
    (lambda o: o.uld_full(torch.randn(3, 5), torch.randn(2, 5), torch.tensor([0, 1, 1], dtype=torch.int32), 1.0,
                          False, False), TypeError, "partner must be int64"),
    (lambda o: o.uld_full(torch.randn(3, 5), torch.randn(5), torch.tensor([0, 1, 1]), 1.0, False, False),
     ValueError, r"teacher must have shape \(M, V_t\)"),
    (lambda o: o.uld_full(torch.randn(3, 5), torch.randn(2, 5), torch.tensor([0, 1, 1]), 0.0, False, False),
     ValueError, "temperature must be a positive finite number"),
    (lambda o: o.uld_full(torch.zeros(3, 5, dtype=torch.long), torch.randn(2, 5), torch.tensor([0, 1, 1]), 1.0,
                          False, False), TypeError, "student must be float32, float16 or bfloat16"),
    (lambda o: o.topk_summary(torch.randn(3, 5), torch.tensor([True, False, True]), 2, 1.0, None, False,
                              [torch.randn(2, 5)], torch.tensor([[0, 1, -1]]), [False], False),
     ValueError, r"partners\[0\] must be -1 on invalid rows"),
    (lambda o: o.topk_summary(torch.randn(3, 5), torch.ones(3, dtype=torch.bool), 2, 1.0, torch.tensor([0, 5, 1]),
                              False, [], torch.empty(0, 3, dtype=torch.long), [], False),
     ValueError, r"gold ids must lie in \[0, 5\)"),
    (lambda o: o.topk_summary(torch.randn(3, 5), torch.ones(3, dtype=torch.bool), 6, 1.0, None, False, [],
                              torch.empty(0, 3, dtype=torch.long), [], False), ValueError, r"k must lie in \[1, V=5\]"),
    (lambda o: o.topk_summary(torch.randn(3, 5), torch.ones(3, dtype=torch.bool), 2, 1.0, None, False,
                              [torch.randn(2, 5)], torch.tensor([[0, 1, 1]]), [], False),
     ValueError, "teacher_probs must have one entry per teacher"),
], ids=["partner range", "partner shape", "partner dtype", "teacher shape", "temperature", "student dtype",
        "partner on invalid row", "gold range", "k", "teacher_probs"])
def test_bad_arguments_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.ops.infigw)


# ---------------------------------------------------------------------------------------------- the reference
def test_reference_tie_rule_shares_the_gradient_of_tied_ranks():
    """p = (0.4, 0.3, 0.3) against q = (0.5, 0.35, 0.15): the ranks 1 and 2 of the tie have signs -1 and +1, so
    each tied entry gets their mean 0 (torch.sort alone would hand -1 to one and +1 to the other)."""
    p = torch.tensor([[0.3, 0.4, 0.3]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.15, 0.5, 0.35]], dtype=torch.float64)
    loss = reference.sorted_prob_l1(p, q)
    assert_close(loss, torch.tensor([0.1 + 0.05 + 0.15], dtype=torch.float64), atol=1e-12, name="ULD")
    (grad,) = torch.autograd.grad(loss.sum(), p)
    assert_close(grad, torch.tensor([[0.0, -1.0, 0.0]], dtype=torch.float64), atol=1e-12, name="tie gradient")


def test_reference_uld_full_pads_the_shorter_list_and_skips_unpaired_rows():
    student = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], dtype=torch.float64))
    teacher = torch.log(torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64))
    out = reference.uld_full(student, teacher, torch.tensor([0, -1]), 1.0)
    expected = abs(0.5 - 0.6) + abs(0.3 - 0.1) + abs(0.2 - 0.1) + 0.1 + 0.1
    assert_close(out, torch.tensor([expected, 0.0], dtype=torch.float64), atol=1e-12, name="padded ULD")
