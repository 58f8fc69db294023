"""Property-based tests (hypothesis) over the public entry points and the CPU backends (issue 14).

Three categories, each a family of generated cases:
- clear error: a bad argument raises ValueError/TypeError naming it, never another exception or a result;
- handled edge: empty masks, k = V, ties, -inf padding, huge or tiny logits, teachers of other shapes;
- property: finite in -> finite out and finite gradients, backends agree, invariances, bounds, reductions.
The examples are derandomized (the same cases on every run) so that CI stays reproducible.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import infigw
import infigw.functional as F

from .helpers import assert_close

CPU_BACKENDS = ("torch", "cpp") if infigw.backends()["cpp"] == "available" else ("torch",)
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FEW, SOME, MANY = 40, 80, 150  # examples per test: see the module docstring for the categories

VALUES, NODES, NORMS = ("logits", "probs", "topk_probs"), ("vocab", "rank"), ("mean", "sum", "cosine")


@st.composite
def logit_tensors(draw, batch, length, vocab, scales=(1e-3, 1.0, 8.0, 30.0)):
    """(batch, length, vocab) finite logits of one magnitude, optionally tied (rounded) or -inf padded."""
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from(scales))
    x = torch.randn(batch, length, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):
        x = x.round()  # many exact ties
    return x


@st.composite
def gld_cases(draw, max_vocab=24):
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    vocab = draw(st.integers(2, max_vocab))
    k = draw(st.integers(1, min(vocab, 6)))
    teacher_length = draw(st.sampled_from([length, length + 2]))
    teacher_vocab = draw(st.integers(k, max_vocab + 6))
    student = draw(logit_tensors(batch, length, vocab))
    teacher = draw(logit_tensors(batch, teacher_length, teacher_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=gen) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    teacher_mask = torch.rand(batch, teacher_length, generator=gen) < 0.8
    options = dict(k=k, values=draw(st.sampled_from(VALUES)), nodes=draw(st.sampled_from(NODES)),
                   graph_norm=draw(st.sampled_from(NORMS)), scope=draw(st.sampled_from(["sequence", "batch"])),
                   distance=draw(st.sampled_from(["l1", "gw1d"])), temperature=draw(st.sampled_from([0.5, 1.0, 2.0])),
                   num_nodes=draw(st.sampled_from([None, 1, k])))
    return student, teacher, mask, teacher_mask, options


def _grad(loss_fn, student, *args, **kwargs):
    x = student.clone().requires_grad_(True)
    loss = loss_fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    return loss.detach(), torch.zeros_like(x) if grad is None else grad


# ================================================================================= property
@settings(max_examples=MANY, **SETTINGS)
@given(gld_cases())
def test_gld_is_finite_with_finite_gradients_and_the_cpu_backends_agree(case):
    student, teacher, mask, teacher_mask, options = case
    results = [_grad(F.gld_loss, student, teacher, mask=mask, teacher_mask=teacher_mask, reduction="none",
                     backend=backend, **options) for backend in CPU_BACKENDS]
    for loss, grad in results:
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), options
        assert (grad[~mask] == 0).all(), "masked positions got a gradient"
    scale = max(1.0, float(results[0][0].abs().max()))
    for loss, grad in results[1:]:
        assert_close(loss, results[0][0], atol=1e-4 * scale, rtol=1e-4, name=f"loss {options}")
        gscale = max(1.0, float(results[0][1].abs().max()))
        assert_close(grad, results[0][1], atol=1e-4 * gscale, rtol=1e-3, name=f"grad {options}")


@settings(max_examples=SOME, **SETTINGS)
@given(gld_cases(), st.sampled_from(["mean", "sum"]))
def test_reductions_are_consistent(case, reduction):
    student, teacher, mask, teacher_mask, options = case
    per_graph, parts = F.gld_loss(student, teacher, mask=mask, teacher_mask=teacher_mask, reduction="none",
                                  return_components=True, **options)
    reduced = F.gld_loss(student, teacher, mask=mask, teacher_mask=teacher_mask, reduction=reduction, **options)
    expected = per_graph.sum() / (parts["included"].any(0).sum().clamp_min(1) if reduction == "mean" else 1)
    assert_close(reduced, expected, atol=1e-5, rtol=1e-5, name=reduction)
    assert (per_graph[~parts["included"].any(0)] == 0).all(), "an excluded graph contributes"


@settings(max_examples=SOME, **SETTINGS)
@given(gld_cases())
def test_identical_student_and_teacher_give_zero(case):
    student, _, mask, _, options = case
    gld = F.gld_loss(student, student.clone(), mask=mask, reduction="none", **options)
    assert (gld.abs() <= 1e-5 * max(1.0, float(student.abs().max()) ** 2)).all(), gld
    assert (F.uld_loss(student, student.clone(), mask=mask, reduction="none").abs() <= 1e-6).all()


@settings(max_examples=SOME, **SETTINGS)
@given(gld_cases())
def test_vocabulary_relabelling_and_probability_shifts_change_nothing(case):
    student, teacher, mask, teacher_mask, options = case
    options = dict(options, nodes="vocab")
    base = F.gld_loss(student, teacher, mask=mask, teacher_mask=teacher_mask, reduction="none", **options)
    if student.round().equal(student):  # relabelling moves ties between ids: the kept set may change
        return
    perm = torch.randperm(student.shape[-1], generator=torch.Generator().manual_seed(0))
    scale = max(1.0, float(base.abs().max()))
    assert_close(F.gld_loss(student[..., perm], teacher, mask=mask, teacher_mask=teacher_mask, reduction="none",
                            **options), base, atol=1e-4 * scale, rtol=1e-4, name="relabelled")
    if options["values"] != "logits":
        shifted = student + torch.randn(*student.shape[:2], 1, generator=torch.Generator().manual_seed(1)) * 3
        assert_close(F.gld_loss(shifted, teacher, mask=mask, teacher_mask=teacher_mask, reduction="none",
                                **options), base, atol=1e-4 * scale, rtol=1e-3, name="shifted")


@settings(max_examples=SOME, **SETTINGS)
@given(gld_cases(), st.sampled_from([None, 1, 3]), st.booleans(), st.sampled_from(["zeros", "bucket"]))
def test_uld_is_bounded_finite_and_records_match_dense_teachers(case, top_k, standardize, tail):
    student, teacher, mask, teacher_mask, options = case
    top_k = None if top_k is None else min(top_k, student.shape[-1], teacher.shape[-1])
    standardize = standardize and top_k is not None
    common = dict(mask=mask, teacher_mask=teacher_mask, temperature=options["temperature"], top_k=top_k,
                  standardize=standardize, reduction="none")
    loss, grad = _grad(F.uld_loss, student, teacher, **common)
    assert torch.isfinite(grad).all() and ((loss >= 0) & (loss <= 2 + 1e-5)).all(), loss
    record = infigw.TopKRecord.from_logits(teacher, teacher.shape[-1], temperature=options["temperature"])
    assert_close(F.uld_loss(student, record, record_tail=tail, **common), loss, atol=1e-5, name="full record")


@settings(max_examples=SOME, **SETTINGS)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(0, 2**31 - 1), st.sampled_from([1e-3, 1.0, 1e4]))
def test_sorted_gw1d_is_a_nonnegative_symmetric_translation_invariant_cost(rows, n, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(rows, n, generator=gen) * scale, torch.randn(rows, n, generator=gen) * scale
    for backend in CPU_BACKENDS:
        value = F.sorted_gw1d(x, y, backend=backend)
        assert (value >= 0).all() and torch.isfinite(value).all(), value
        assert (F.sorted_gw1d(x, x.clone(), backend=backend) == 0).all(), "identical sets"
        assert_close(F.sorted_gw1d(y, x, backend=backend), value, atol=1e-6 * scale**4, rtol=1e-4, name="symmetric")
        moved = F.sorted_gw1d(x + 3 * scale, y - scale, backend=backend)
        assert_close(moved, value, atol=1e-5 * scale**4, rtol=1e-3, name="translation")


@settings(max_examples=SOME, **SETTINGS)
@given(gld_cases(), st.sampled_from(["sequence", "token"]), st.sampled_from([None, "uncertainty", "nll"]))
def test_the_objective_is_finite_and_equals_its_components(case, granularity, weights):
    student, teacher, mask, teacher_mask, options = case
    labels = torch.randint(0, student.shape[-1], mask.shape, generator=torch.Generator().manual_seed(2))
    labels = labels.masked_fill(~mask, -100)
    teacher_labels = torch.randint(0, teacher.shape[-1], teacher_mask.shape, generator=torch.Generator().manual_seed(3))
    teachers = [teacher, teacher.flip(-1)]
    common = dict(teacher_labels=[teacher_labels.masked_fill(~teacher_mask, -100)] * 2, teacher_weights=weights,
                  weight_granularity=granularity, k=options["k"], values=options["values"],
                  graph_norm=options["graph_norm"], temperature=options["temperature"])
    loss, grad = _grad(F.infigfusion_loss, student, teachers, labels, lam=0.4, gamma=0.7, **common)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss, grad = _grad(F.infigfusion_loss, student * 40, teachers, labels, lam=0.4, gamma=0.7, **common)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    _, parts = F.infigfusion_loss(student, teachers, labels, lam=0.4, gamma=0.7, return_components=True, **common)
    totals = parts["weights"].sum(0)[parts["included"].any(0)]
    assert_close(totals, torch.ones_like(totals), atol=1e-5, name="weights sum to 1")


# ================================================================================= handled edge
@settings(max_examples=SOME, **SETTINGS)
@given(gld_cases(), st.sampled_from([1e19, -1e19, 1e30]))
def test_huge_logits_never_give_nan(case, magnitude):
    student, teacher, mask, teacher_mask, options = case
    student = student.clone()
    student[..., 0] = magnitude
    for backend in CPU_BACKENDS:
        loss, grad = _grad(F.gld_loss, student, teacher, mask=mask, teacher_mask=teacher_mask, reduction="none",
                           backend=backend, **options)
        assert not torch.isnan(loss).any() and not torch.isnan(grad).any(), (backend, options)


@settings(max_examples=SOME, **SETTINGS)
@given(gld_cases(), st.sampled_from([0.05, 0.25, 0.5]))
def test_tiny_probabilities_give_finite_gradients(case, temperature):
    """Kept probabilities far below 1e-13 (the trial's NaN gradients with graph_norm="cosine")."""
    student, teacher, mask, teacher_mask, options = case
    student = student * 40
    options = dict(options, temperature=temperature)
    for backend in CPU_BACKENDS:
        loss, grad = _grad(F.gld_loss, student, teacher, mask=mask, teacher_mask=teacher_mask, backend=backend,
                           **options)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), (backend, options)


@settings(max_examples=SOME, **SETTINGS)
@given(gld_cases())
def test_padding_masked_positions_and_k_equal_to_the_vocabulary(case):
    student, teacher, mask, teacher_mask, options = case
    poisoned = student.clone()
    poisoned[~mask] = float("nan")
    poisoned[..., -1:][~mask] = float("-inf")
    common = dict(mask=mask, teacher_mask=teacher_mask, reduction="none")
    for loss_fn, extra in ((F.gld_loss, options), (F.uld_loss, dict(temperature=options["temperature"]))):
        clean, clean_grad = _grad(loss_fn, student, teacher, **common, **extra)
        dirty, dirty_grad = _grad(loss_fn, poisoned, teacher, **common, **extra)
        assert_close(dirty, clean, atol=1e-6, name=f"{loss_fn.__name__}: masked rows read")
        assert torch.isfinite(dirty_grad).all() and (dirty_grad[~mask] == 0).all()
    full_k = dict(options, k=min(student.shape[-1], teacher.shape[-1]), num_nodes=None)
    assert torch.isfinite(F.gld_loss(student, teacher, **common, **full_k)).all()


@settings(max_examples=FEW, **SETTINGS)
@given(gld_cases())
def test_padded_teacher_vocabularies_and_batch_scope_weights_stay_finite(case):
    student, teacher, mask, teacher_mask, options = case
    padded = teacher.clone()
    padded[..., options["k"]:] = float("-inf")  # only k finite entries: a padded vocabulary
    loss, parts = F.gld_loss(student, [teacher, padded], mask=mask, teacher_mask=[teacher_mask] * 2,
                             teacher_weights="uncertainty", return_components=True,
                             **dict(options, values="probs"))
    assert torch.isfinite(loss) and torch.isfinite(parts["weights"]).all()


# ================================================================================= clear error
def _valid_call():
    return dict(student_logits=torch.randn(2, 4, 12), teacher_logits=torch.randn(2, 4, 14),
                labels=torch.randint(0, 12, (2, 4)))


BAD_ARGUMENTS = {
    "k": [0, -3, 2.5, "3", None, True, 13],
    "values": ["prob", 3, None, ["logits"]],
    "nodes": ["token", 0, None],
    "graph_norm": ["max", None, 1],
    "scope": ["token", None],
    "distance": ["gw", 2, None],
    "reduction": ["batchmean", None],
    "temperature": [0.0, -1.0, float("nan"), float("inf"), 1e-300, "1", None, True],
    "num_nodes": [0, -1, 1.5, "2"],
    "teacher_weights": ["entropy", [1.0, 2.0], [-1.0], [[1.0]], "", {}, [0.0]],
    "weight_temperature": [0.0, float("nan"), None],
    "weight_granularity": ["position", None],
    "ignore_index": [None, 1.5, "x"],
    "backend": ["numpy", 3, None],
    "labels": [torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), [[1, 2, 3, 4]] * 2],
    "ce_labels": [torch.full((2, 4), 12), torch.full((2, 4), -5)],  # cross-entropy targets outside the vocabulary
    "mask": [torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 4), "all"],
    "teacher_mask": [torch.ones(2, 3, dtype=torch.bool), [None, None], 3],
    "teacher_labels": [torch.zeros(2, 3, dtype=torch.long), 5],
    "student_logits": [torch.randn(2, 4), torch.ones(2, 4, 12, dtype=torch.long), [[[1.0]]], torch.randn(2, 0, 12)],
    "teacher_logits": [torch.randn(3, 4, 14), "teacher", [], torch.randn(2, 4), [torch.randn(2, 4, 14), 3]],
    "lam": [1.5, -0.1, float("nan"), "a"],
    "gamma": [-1.0, float("inf"), None],
    "uld_top_k": [0, 13, 2.5],
    "record_tail": ["spread", None],
}
ENTRY_POINTS = {
    "gld_loss": (F.gld_loss, {"k", "values", "nodes", "graph_norm", "scope", "distance", "reduction", "temperature",
                              "num_nodes", "teacher_weights", "weight_temperature", "weight_granularity",
                              "ignore_index", "backend", "labels", "mask", "teacher_mask", "teacher_labels",
                              "student_logits", "teacher_logits"}),
    "uld_loss": (F.uld_loss, {"reduction", "temperature", "teacher_weights", "weight_temperature",
                              "weight_granularity", "ignore_index", "labels", "mask", "teacher_mask",
                              "teacher_labels", "student_logits", "teacher_logits", "record_tail"}),
    "infigfusion_loss": (F.infigfusion_loss, {"k", "values", "nodes", "graph_norm", "distance", "reduction",
                                              "temperature", "num_nodes", "teacher_weights", "lam", "gamma",
                                              "uld_top_k", "backend", "labels", "ce_labels", "teacher_mask",
                                              "teacher_labels",
                                              "student_logits", "teacher_logits", "record_tail",
                                              "weight_granularity"}),
}
ALIASES = {"student_logits": ("student_logits",), "teacher_logits": ("teacher_logits",),
           "labels": ("labels", "ignore_index"), "ce_labels": ("labels",), "mask": ("mask", "either"),
           "teacher_mask": ("teacher_mask", "teacher_logits"), "teacher_labels": ("teacher_labels", "teacher_logits"),
           "backend": ("backend",), "uld_top_k": ("top_k",), "k": ("k",)}


@st.composite
def bad_calls(draw):
    entry = draw(st.sampled_from(sorted(ENTRY_POINTS)))
    loss_fn, accepted = ENTRY_POINTS[entry]
    argument = draw(st.sampled_from(sorted(accepted)))
    value = draw(st.sampled_from(BAD_ARGUMENTS[argument]))
    return entry, loss_fn, argument, value


@settings(max_examples=MANY, **SETTINGS)
@given(bad_calls())
def test_a_bad_argument_raises_a_clear_error_naming_it(call):
    entry, loss_fn, argument, value = call
    kwargs = _valid_call()
    kwargs["teacher_mask"] = torch.ones(2, 4, dtype=torch.bool)
    if argument in ("teacher_mask", "teacher_labels"):
        del kwargs["teacher_mask"]
    if argument == "mask":
        kwargs.pop("labels")
    kwargs["labels" if argument == "ce_labels" else argument] = value
    if "k" not in kwargs and loss_fn is not F.uld_loss:
        kwargs["k"] = 3
    student, teacher, labels = kwargs.pop("student_logits"), kwargs.pop("teacher_logits"), kwargs.pop("labels", None)
    with pytest.raises((ValueError, TypeError, infigw.BackendUnavailableError)) as error:
        loss_fn(student, teacher, labels, **kwargs)
    names = ALIASES.get(argument, (argument,))
    assert any(name in str(error.value) for name in names), f"{entry}({argument}={value!r}): {error.value}"


@settings(max_examples=SOME, **SETTINGS)
@given(st.sampled_from(["values", "indices", "vocab_size", "logsumexp", "temperature", "kind"]), st.integers(0, 5))
def test_a_bad_record_field_raises_a_clear_error_naming_it(field, choice):
    good = dict(values=torch.randn(2, 4, 3), indices=torch.tensor([0, 1, 2]).repeat(2, 4, 1), vocab_size=14,
                logsumexp=None, temperature=1.0, kind="logits")
    bad = {"values": [torch.zeros(2, 4, 3, dtype=torch.long), torch.randn(2, 4), torch.randn(2, 4, 2), [1.0]],
           "indices": [torch.zeros(2, 4, 3), torch.zeros(2, 4, 2, dtype=torch.long), [[0]], torch.zeros(2, 4, 3, dtype=torch.bool)],
           "vocab_size": [2, 2**40, 14.0, None, True],
           "logsumexp": [torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long), [0.0]],
           "temperature": [0, -1.0, float("nan"), "1"],
           "kind": ["probs", None, 1]}[field]
    value = bad[choice % len(bad)]
    with pytest.raises((ValueError, TypeError)) as error:
        record = infigw.TopKRecord(**{**good, field: value})
        F.gld_loss(torch.randn(2, 4, 12), record, k=3)
    assert field in str(error.value), f"{field}={value!r}: {error.value}"


@settings(max_examples=FEW, **SETTINGS)
@given(st.sampled_from(["ids", "duplicate", "normaliser"]))
def test_bad_record_data_raises_a_clear_error(defect):
    teacher = torch.randn(2, 4, 14)
    record = infigw.TopKRecord.from_logits(teacher, 3)
    values, ids, lse = record.values, record.indices.clone(), record.logsumexp
    if defect == "ids":
        ids[0, 1, 0] = 14
    elif defect == "duplicate":
        ids[1, 2, 1] = ids[1, 2, 0]
    else:
        lse = lse - 5
    with pytest.raises(ValueError, match="teacher_logits"):
        F.gld_loss(torch.randn(2, 4, 12), infigw.TopKRecord(values, ids, 14, lse), k=3, values="probs")

