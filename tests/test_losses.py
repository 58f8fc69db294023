"""The public losses: gradients, invariances, masking, reductions, teachers, dtypes, a training step."""
import itertools

import pytest
import torch

import infigw
import infigw.functional as F
from infigw.reference import sorted_gw1d, sorted_degrees, sorted_l1, topk_degrees

from .helpers import DTYPES, NODE_MODES, NORM_MODES, VALUE_MODES, assert_close, random_mask


def logits(*shape, seed=0, dtype=torch.float32, scale=2.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


GLD_MODES = list(itertools.product(VALUE_MODES, NODE_MODES, NORM_MODES, ("l1", "gw1d")))


@pytest.mark.parametrize("values,nodes,norm,distance", GLD_MODES)
def test_gld_gradcheck_every_mode(values, nodes, norm, distance):
    student = logits(2, 4, 9, seed=1, dtype=torch.float64).requires_grad_()
    teacher = logits(2, 5, 11, seed=2, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=torch.bool)
    teacher_mask = torch.ones(2, 5, dtype=torch.bool)
    torch.autograd.gradcheck(
        lambda x: F.gld_loss(x, teacher, mask=mask, teacher_mask=teacher_mask, k=3, values=values, nodes=nodes,
                             graph_norm=norm, distance=distance, temperature=0.8, backend="torch"),
        (student,), fast_mode=True)


def test_gld_equals_the_stagewise_composition():
    student, teacher = logits(3, 6, 20, seed=3), logits(3, 6, 25, seed=4)
    loss = F.gld_loss(student, teacher, k=4, values="logits", nodes="vocab", distance="l1", reduction="none",
                      backend="torch")
    rows = torch.arange(3).repeat_interleave(6)
    s = topk_degrees(student.reshape(-1, 20), rows, 3, 4)
    t = topk_degrees(teacher.reshape(-1, 25), rows, 3, 4)
    f, _ = sorted_degrees(s.degrees, s.touched)
    g, _ = sorted_degrees(t.degrees, t.touched)
    expected = sorted_l1(torch.nn.functional.pad(f, (0, 5)), g)
    assert_close(loss, expected, name="composition")


@pytest.mark.parametrize("values", VALUE_MODES)
@pytest.mark.parametrize("distance", ["l1", "gw1d"])
def test_gld_invariant_to_vocabulary_relabelling(values, distance):
    student, teacher = logits(2, 8, 30, seed=5), logits(2, 8, 30, seed=6)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    base = F.gld_loss(student, teacher, k=5, values=values, distance=distance, reduction="none")
    relabelled = F.gld_loss(student[..., perm], teacher, k=5, values=values, distance=distance, reduction="none")
    assert_close(relabelled, base, atol=1e-4, rtol=1e-5, name="relabelled student")


@pytest.mark.parametrize("values", ["probs", "topk_probs"])
def test_probability_values_are_shift_invariant(values):
    student, teacher = logits(2, 7, 40, seed=7), logits(2, 7, 40, seed=8)
    base = F.gld_loss(student, teacher, k=6, values=values, reduction="none")
    shift = torch.randn(2, 7, 1, generator=torch.Generator().manual_seed(1)) * 5
    assert_close(F.gld_loss(student + shift, teacher, k=6, values=values, reduction="none"), base, atol=1e-5,
                 name="shifted logits")


def test_identical_student_and_teacher_give_zero():
    student = logits(2, 5, 16, seed=9)
    for distance in ("l1", "gw1d"):
        assert float(F.gld_loss(student, student.clone(), distance=distance, k=4)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss_fn", ["gld", "uld", "infigfusion"])
def test_all_positions_masked_gives_zero_loss_and_zero_gradient(loss_fn):
    student = logits(2, 5, 16, seed=10).requires_grad_()
    teacher = logits(2, 5, 16, seed=11)
    labels = torch.full((2, 5), -100)
    call = {"gld": lambda: F.gld_loss(student, teacher, labels, k=3),
            "uld": lambda: F.uld_loss(student, teacher, labels),
            "infigfusion": lambda: F.infigfusion_loss(student, teacher, labels, k=3)}[loss_fn]
    loss = call()
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student.grad))


def test_masked_positions_get_no_gradient_and_excluded_sequences_count_zero():
    student = logits(3, 6, 20, seed=12).requires_grad_()
    teacher = logits(3, 6, 20, seed=13)
    mask = random_mask(3, 6, generator=torch.Generator().manual_seed(2), empty_rows=(1,))
    per_sequence = F.gld_loss(student, teacher, mask=mask, k=4, reduction="none")
    assert per_sequence[1] == 0
    mean = F.gld_loss(student, teacher, mask=mask, k=4)
    assert_close(mean, per_sequence.sum() / 2, name="mean over the included sequences")
    mean.backward()
    assert (student.grad[~mask] == 0).all()
    assert (student.grad[mask].abs().sum(-1) > 0).all()
    assert_close(F.gld_loss(student, teacher, mask=mask, k=4, reduction="sum"), per_sequence.sum(), name="sum")


def test_teacher_mask_excludes_and_different_lengths_need_a_mask_only_when_ambiguous():
    student, teacher = logits(2, 6, 20, seed=14), logits(2, 9, 24, seed=15)
    teacher_mask = torch.ones(2, 9, dtype=torch.bool)
    teacher_mask[0] = False
    out = F.gld_loss(student, teacher, teacher_mask=teacher_mask, k=3, reduction="none")
    assert out[0] == 0 and out[1] > 0
    student_mask = torch.ones(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="teacher_labels or teacher_mask"):  # which teacher positions? ambiguous
        F.gld_loss(student, teacher, mask=student_mask, k=3)
    # no labels and no masks on either side: every position is valid on both, nothing is ambiguous
    all_valid = torch.ones(2, 9, dtype=torch.bool)
    for loss_fn, options in ((F.gld_loss, dict(k=3)), (F.uld_loss, {})):
        assert_close(loss_fn(student, teacher, reduction="none", **options),
                     loss_fn(student, teacher, teacher_mask=all_valid, reduction="none", **options),
                     name=f"{loss_fn.__name__} of another length without masks")


def test_batch_scope_is_one_graph():
    student, teacher = logits(3, 6, 20, seed=16), logits(3, 6, 20, seed=17)
    assert F.gld_loss(student, teacher, k=3, scope="batch", reduction="none").shape == (1,)


@pytest.mark.parametrize("values", VALUE_MODES)
def test_record_teacher_matches_dense_teacher(values):
    student, teacher = logits(2, 6, 30, seed=18), logits(2, 6, 30, seed=19)
    record = infigw.TopKRecord.from_logits(teacher, 8, temperature=0.7)
    dense = F.gld_loss(student, teacher, k=5, values=values, temperature=0.7, reduction="none")
    sparse = F.gld_loss(student, record, k=5, values=values, temperature=0.7, reduction="none")
    if values == "probs":  # exact only with the logsumexp; without it the kept entries are renormalised
        assert_close(sparse, dense, atol=1e-5, name="record with logsumexp")
        # without it, a record acts like a teacher whose only finite logits are the k_t = 8 it stores
        no_lse = infigw.TopKRecord(record.values, record.indices, 30)
        only_kept = torch.full_like(teacher, float("-inf")).scatter(-1, record.indices, record.values)
        assert_close(F.gld_loss(student, no_lse, k=5, values="probs", temperature=0.7, reduction="none"),
                     F.gld_loss(student, only_kept, k=5, values="probs", temperature=0.7, reduction="none"),
                     atol=1e-5, name="record without logsumexp")
    else:
        assert_close(sparse, dense, atol=1e-5, name="record")


def test_record_ties_break_by_vocabulary_id():
    values = torch.tensor([[[1.0, 1.0, 1.0]]])
    record = infigw.TopKRecord(values, torch.tensor([[[7, 2, 5]]]), 10)
    dense = torch.full((1, 1, 10), -5.0)
    dense[0, 0, [2, 5, 7]] = 1.0
    student = logits(1, 1, 10, seed=20)
    assert_close(F.gld_loss(student, record, k=2, reduction="none"),
                 F.gld_loss(student, dense, k=2, reduction="none"), name="tie rule on records")


def test_several_teachers_weights():
    student = logits(2, 5, 20, seed=21)
    sharp, flat = logits(2, 5, 20, seed=22, scale=8.0), logits(2, 5, 20, seed=23, scale=0.1)
    loss, parts = F.gld_loss(student, [sharp, flat], k=4, teacher_weights="uncertainty", return_components=True)
    weights = parts["weights"]
    assert_close(weights.sum(0), torch.ones(2), name="weights sum to 1")
    assert (weights[0] > weights[1]).all(), "the confident (low-entropy) teacher gets more weight"
    assert_close(loss, (weights * parts["gld"]).sum(0).mean(), name="weighted loss")
    uniform = F.gld_loss(student, [sharp, flat], k=4, reduction="none")
    assert_close(uniform, parts["gld"].mean(0), name="uniform weights")
    fixed = F.gld_loss(student, [sharp, flat], k=4, teacher_weights=[0.25, 2.0], reduction="none")
    assert_close(fixed, 0.25 * parts["gld"][0] + 2.0 * parts["gld"][1], name="fixed weights")


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_precision_inputs_compute_in_fp32(dtype):
    student = logits(3, 37, 1271, seed=24).to(dtype).requires_grad_()
    teacher = logits(3, 37, 1271, seed=25).to(dtype)
    loss = F.gld_loss(student, teacher, k=7)
    reference = F.gld_loss(student.detach().float(), teacher.float(), k=7)
    assert loss.dtype == torch.float32
    assert_close(loss, reference, atol=1e-4, rtol=1e-5, name=f"{dtype} loss")  # same values after upcast
    loss.backward()
    assert student.grad.dtype == dtype and torch.isfinite(student.grad.float()).all()


def test_teacher_is_never_differentiated():
    student = logits(2, 4, 12, seed=26).requires_grad_()
    teacher = logits(2, 4, 12, seed=27).requires_grad_()
    F.infigfusion_loss(student, teacher, torch.randint(0, 12, (2, 4)), k=3).backward()
    assert teacher.grad is None


def test_nan_logits_give_a_nan_loss_not_a_silent_value():
    student = logits(2, 4, 12, seed=28)
    student[0, 1, 3] = float("nan")
    assert torch.isnan(F.gld_loss(student, logits(2, 4, 12, seed=29), k=3))


# ------------------------------------------------------------------------------------------------ ULD
def uld_direct(student, teacher, temperature=1.0):
    """ULD by a loop over aligned pairs of one sequence each (both fully valid)."""
    total = 0.0
    for t in range(min(student.shape[0], teacher.shape[0])):
        p = torch.softmax(student[t].double() / temperature, -1).sort(descending=True).values
        q = torch.softmax(teacher[t].double() / temperature, -1).sort(descending=True).values
        width = max(p.numel(), q.numel())
        p, q = torch.nn.functional.pad(p, (0, width - p.numel())), torch.nn.functional.pad(q, (0, width - q.numel()))
        total += float((p - q).abs().sum())
    return total / min(student.shape[0], teacher.shape[0])


def test_uld_matches_direct_loop_with_alignment():
    student, teacher = logits(2, 6, 20, seed=30), logits(2, 8, 27, seed=31)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    teacher_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = F.uld_loss(student, teacher, mask=mask, teacher_mask=teacher_mask, temperature=1.5, reduction="none")
    expected = [uld_direct(student[0, 1:], teacher[0, 2:], 1.5), uld_direct(student[1, :3], teacher[1], 1.5)]
    assert_close(out, torch.tensor(expected), atol=1e-5, name="ULD")


def test_uld_top_k_standardized_and_records():
    student, teacher = logits(2, 5, 30, seed=32), logits(2, 5, 30, seed=33)
    out = F.uld_loss(student, teacher, top_k=4, standardize=True, reduction="none")
    top = lambda x: torch.topk(x, 4).values
    z = lambda v: (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True, unbiased=False) + 1e-6)
    expected = (torch.softmax(z(top(student)), -1) - torch.softmax(z(top(teacher)), -1)).abs().sum(-1).mean(-1)
    assert_close(out, expected, atol=1e-5, name="top-k ULD")
    record = infigw.TopKRecord.from_logits(teacher, 6)
    assert_close(F.uld_loss(student, record, top_k=4, standardize=True, reduction="none"), out, atol=1e-5,
                 name="record teacher")


def test_uld_gradcheck():
    student = logits(2, 3, 7, seed=34, dtype=torch.float64).requires_grad_()
    teacher = logits(2, 4, 9, seed=35, dtype=torch.float64)
    tmask = torch.ones(2, 4, dtype=torch.bool)
    torch.autograd.gradcheck(lambda x: F.uld_loss(x, teacher, teacher_mask=tmask, temperature=2.0), (student,))
    torch.autograd.gradcheck(lambda x: F.uld_loss(x, teacher, teacher_mask=tmask, top_k=3, standardize=True),
                             (student,))


# ------------------------------------------------------------------------------------------------ InfiGFusion
def test_infigfusion_is_the_documented_combination():
    student, teacher = logits(2, 5, 20, seed=36), logits(2, 5, 20, seed=37)
    labels = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(3))
    labels[1, :2] = -100
    loss, parts = F.infigfusion_loss(student, teacher, labels, lam=0.3, gamma=2.0, k=4, return_components=True)
    ce = torch.nn.functional.cross_entropy(student.reshape(-1, 20), labels.reshape(-1), ignore_index=-100)
    uld = F.uld_loss(student, teacher, labels, reduction="none")
    gld = F.gld_loss(student, teacher, labels, k=4, reduction="none")
    assert_close(loss, 0.7 * ce + 0.3 * (uld + 2.0 * gld).mean(), atol=1e-5, name="objective")
    assert_close(parts["ce"], ce, name="ce component")


def test_infigfusion_gradcheck():
    student = logits(2, 3, 6, seed=38, dtype=torch.float64).requires_grad_()
    teacher = logits(2, 3, 8, seed=39, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100], [0, 5, 4]])
    torch.autograd.gradcheck(lambda x: F.infigfusion_loss(x, teacher, labels, k=2, distance="gw1d"), (student,),
                             fast_mode=True)


def test_modules_in_a_training_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    tokens = torch.randint(0, 50, (4, 12))
    teacher = torch.randn(4, 12, 50) * 3
    loss_fn = infigw.InfiGFusionLoss(k=5, values="probs")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(15):
        loss = loss_fn(model(tokens), teacher, tokens)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], f"loss did not go down: {losses}"
    assert "k=5" in repr(loss_fn)
    gld = infigw.GLDLoss(k=5, return_components=True)
    value, parts = gld(model(tokens), teacher)
    assert value.shape == () and set(parts) == {"gld", "weights", "included"}
    assert infigw.ULDLoss(top_k=5)(model(tokens), teacher).shape == ()


def test_masked_rows_with_infinite_logits_get_zero_gradient():
    """Padding rows may hold -inf/NaN: masked, they must not poison the gradient (0 * NaN)."""
    student = logits(2, 5, 16, seed=40)
    student[1, 3] = float("-inf")
    student[0, 4, 2] = float("nan")
    labels = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(4))
    labels[1, 3] = labels[0, 4] = -100
    teacher = logits(2, 5, 16, seed=41)
    for backend in ("torch", "cpp") if infigw.backends()["cpp"] == "available" else ("torch",):
        for values in ("logits", "probs", "topk_probs"):
            x = student.clone().requires_grad_()
            F.gld_loss(x, teacher, labels, k=4, values=values, backend=backend).backward()
            assert torch.isfinite(x.grad).all(), (backend, values)
    x = student.clone().requires_grad_()
    F.infigfusion_loss(x, teacher, labels, k=4, values="probs").backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1, 3] == 0).all()


def test_fp64_student_with_fp32_teacher_on_every_cpu_backend():
    student = logits(2, 5, 16, seed=42, dtype=torch.float64)
    teacher = logits(2, 5, 16, seed=43)
    for distance in ("l1", "gw1d"):
        auto = F.gld_loss(student, teacher, k=4, distance=distance)
        assert_close(auto, F.gld_loss(student, teacher, k=4, distance=distance, backend="torch"), name=distance)


def test_record_from_logits_follows_the_tie_rule_and_its_temperature():
    student = logits(2, 8, 64, seed=44)
    tied = torch.randint(0, 4, (2, 8, 64), generator=torch.Generator().manual_seed(5)).float()
    record = infigw.TopKRecord.from_logits(tied, 5)
    assert_close(F.gld_loss(student, record, k=5), F.gld_loss(student, tied, k=5), name="tied record")
    warm = infigw.TopKRecord.from_logits(tied, 5, temperature=2.0)
    assert_close(F.gld_loss(student, warm, k=5, values="probs", temperature=2.0),
                 F.gld_loss(student, tied, k=5, values="probs", temperature=2.0), atol=1e-5, name="record at T=2")
    with pytest.raises(ValueError, match="temperature 2.0 but the loss uses temperature 1.0"):
        F.gld_loss(student, warm, k=5, values="probs")


def test_uncertainty_weights_with_padded_vocabulary_stay_finite():
    student = logits(2, 5, 16, seed=45)
    padded = logits(2, 5, 16, seed=46)
    padded[..., 5:] = float("-inf")  # fewer finite entries than k
    loss, parts = F.gld_loss(student, [padded, padded * 2], k=8, values="probs", teacher_weights="uncertainty",
                             return_components=True)
    assert torch.isfinite(loss) and torch.isfinite(parts["weights"]).all()
    assert torch.isfinite(F.uld_loss(student, [padded, padded * 2], teacher_weights="uncertainty", weight_k=12))


def test_uld_offsets_pairing_pairs_tokens_that_start_at_the_same_character():
    student, teacher = logits(1, 3, 20, seed=47), logits(1, 4, 25, seed=48)
    student_offsets = torch.tensor([[[0, 2], [2, 5], [5, 7]]])
    teacher_offsets = torch.tensor([[[0, 2], [2, 3], [3, 5], [5, 7]]])  # the student's second token split in two
    out = F.uld_loss(student, teacher, pairing="offsets", student_offsets=student_offsets,
                     teacher_offsets=teacher_offsets, teacher_mask=torch.ones(1, 4, dtype=torch.bool))
    pairs = [(0, 0), (1, 1), (2, 3)]
    expected = sum(uld_direct(student[0, s:s + 1], teacher[0, t:t + 1]) for s, t in pairs) / len(pairs)
    assert_close(out, torch.tensor(expected), atol=1e-5, name="offsets pairing")
    same = F.uld_loss(student, teacher[:, :3], pairing="offsets", student_offsets=student_offsets,
                      teacher_offsets=student_offsets)
    assert_close(same, F.uld_loss(student, teacher[:, :3]), name="one tokenization: offsets = index")
    with pytest.raises(ValueError, match="pairing='offsets' needs student_offsets"):
        F.uld_loss(student, teacher[:, :3], pairing="offsets")
    with pytest.raises(ValueError, match="teacher_offsets must be a tensor"):
        F.uld_loss(student, teacher[:, :3], pairing="offsets", student_offsets=student_offsets,
                   teacher_offsets=torch.zeros(1, 3))
