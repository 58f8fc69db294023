"""Regression tests of the defects a hostile-input trial found (issue 14) in the loss API, one test per defect.

The kernel-side defects (cosine gradients, the compiled 1-D GW precision, op bounds checks, huge logits) have
their regression tests beside the kernels; the merge and DLF ones beside those packages.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import infigw
import infigw.functional as F
from infigw import dispatch

from .helpers import assert_close


def logits(*shape, seed=0, scale=2.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


# ---------------------------------------------------------------------------------- 4: small integer labels
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_labels_do_not_wrap_ignore_index(dtype):
    vocab = 120 if dtype == torch.int8 else 300 if dtype != torch.uint8 else 250
    student, teacher = logits(2, 6, vocab, seed=1), logits(2, 6, vocab, seed=2)
    labels = torch.randint(0, min(vocab, 127), (2, 6), generator=torch.Generator().manual_seed(3))
    labels[0, :2] = 156 % min(vocab, 127)  # a real token that -100 must not alias in uint8
    expected = F.infigfusion_loss(student, teacher, labels.long(), k=3)
    assert_close(F.infigfusion_loss(student, teacher, labels.to(dtype), k=3), expected, name=f"{dtype} labels")
    assert_close(F.gld_loss(student, teacher, labels.to(dtype), k=3), F.gld_loss(student, teacher, labels, k=3),
                 name=f"{dtype} GLD labels")


def test_uint8_labels_with_a_large_vocabulary_are_accepted():
    """The false "labels must be in [0, 300)" of the trial: 156 is a real token, not ignore_index."""
    student, teacher = logits(1, 4, 300, seed=4), logits(1, 4, 300, seed=5)
    labels = torch.tensor([[156, 3, 255, 7]], dtype=torch.uint8)
    assert torch.isfinite(F.infigfusion_loss(student, teacher, labels, k=3))


# ---------------------------------------------------------------------------------- 7: underflowing temperature
@pytest.mark.parametrize("call", [
    lambda T: F.gld_loss(logits(1, 3, 9), logits(1, 3, 9), k=2, values="probs", temperature=T),
    lambda T: F.uld_loss(logits(1, 3, 9), logits(1, 3, 9), temperature=T),
    lambda T: F.infigfusion_loss(logits(1, 3, 9), logits(1, 3, 9), torch.zeros(1, 3, dtype=torch.long), k=2,
                                 temperature=T),
    lambda T: infigw.TopKRecord.from_logits(logits(1, 3, 9), 2, temperature=T),
    lambda T: F.uld_loss(logits(1, 3, 9), [logits(1, 3, 9)] * 2, teacher_weights="uncertainty",
                         weight_temperature=1.0, temperature=T),
], ids=["gld", "uld", "infigfusion", "from_logits", "weights"])
@pytest.mark.parametrize("temperature", [1e-300, 1e-7, 0.0, -1.0, float("nan")])
def test_temperatures_that_cannot_be_computed_are_rejected(call, temperature):
    with pytest.raises(ValueError, match="temperature must be"):
        call(temperature)


# ---------------------------------------------------------------------------------- 11: TopKRecord
def test_record_with_duplicate_ids_is_refused():
    values, ids = torch.randn(1, 2, 3), torch.tensor([[[4, 1, 4], [0, 1, 2]]])
    with pytest.raises(ValueError, match="distinct at each position"):
        F.gld_loss(logits(1, 2, 10), infigw.TopKRecord(values, ids, 10), k=2)


def test_record_whose_logsumexp_is_below_its_values_is_refused():
    teacher = logits(2, 3, 20, seed=6)
    good = infigw.TopKRecord.from_logits(teacher, 5)
    bad = infigw.TopKRecord(good.values, good.indices, 20, good.logsumexp - 3.0)
    for call in (lambda r: F.gld_loss(logits(2, 3, 20), r, k=3, values="probs"),
                 lambda r: F.uld_loss(logits(2, 3, 20), r)):
        assert torch.isfinite(call(good))
        with pytest.raises(ValueError, match="sum to more than 1"):
            call(bad)


def test_record_of_rounded_values_passes_the_normaliser_check():
    """bf16 rounding of large logits may push the kept probabilities slightly above 1: that is not an error."""
    teacher = logits(2, 8, 50, seed=7, scale=12.0)
    teacher[..., 0] = 40.0  # one dominant entry
    record = infigw.TopKRecord.from_logits(teacher, 6)
    rounded = infigw.TopKRecord(record.values.bfloat16(), record.indices, 50, record.logsumexp)
    assert torch.isfinite(F.uld_loss(logits(2, 8, 50), rounded))


@pytest.mark.parametrize("temperature", [0, -1, float("nan"), float("inf"), True])
def test_record_constructors_check_their_temperature(temperature):
    with pytest.raises((ValueError, TypeError), match="temperature"):
        infigw.TopKRecord.from_logits(logits(1, 2, 8), 3, temperature=temperature)
    with pytest.raises((ValueError, TypeError), match="temperature"):
        infigw.TopKRecord(torch.randn(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long), 8, temperature=temperature)


def test_record_with_a_huge_vocabulary_gets_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size must be an int in"):
        infigw.TopKRecord(torch.randn(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long), 2**45)


def test_record_padding_positions_may_hold_anything():
    """Collated records pad with repeated ids and junk values; masked positions are never checked or read."""
    teacher = logits(2, 4, 16, seed=8)
    record = infigw.TopKRecord.from_logits(teacher, 4)
    values, ids, lse = record.values.clone(), record.indices.clone(), record.logsumexp.clone()
    values[1, 3], ids[1, 3], lse[1, 3] = float("nan"), 0, -1e9
    padded = infigw.TopKRecord(values, ids, 16, lse)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    for values_mode in ("logits", "probs"):
        assert_close(F.gld_loss(logits(2, 4, 16), padded, teacher_mask=mask, k=3, values=values_mode),
                     F.gld_loss(logits(2, 4, 16), record, teacher_mask=mask, k=3, values=values_mode),
                     name=f"padded record, {values_mode}")


# ---------------------------------------------------------------------------------- record kinds and temperatures
def _logprob_record(teacher, k, temperature):
    record = infigw.TopKRecord.from_logits(teacher, k, temperature=temperature)
    return infigw.TopKRecord(record.values / temperature - record.logsumexp.unsqueeze(-1), record.indices,
                             teacher.shape[-1], temperature=temperature, kind="logprobs")


def test_logprob_records_serve_probabilities_exactly_and_refuse_raw_logit_nodes():
    student, teacher = logits(2, 5, 30, seed=9), logits(2, 5, 30, seed=10)
    as_logprobs = _logprob_record(teacher, 8, 0.7)
    common = dict(k=4, temperature=0.7, reduction="none")
    for values_mode in ("probs", "topk_probs"):
        assert_close(F.gld_loss(student, as_logprobs, values=values_mode, **common),
                     F.gld_loss(student, teacher, values=values_mode, **common), atol=1e-5,
                     name=f"logprobs record, {values_mode}")
    with pytest.raises(ValueError, match="cannot serve values='logits'"):
        F.gld_loss(student, as_logprobs, values="logits", k=4, temperature=0.7)


def test_records_at_another_temperature_are_converted_where_exact_and_refused_where_not():
    student, teacher = logits(2, 5, 30, seed=11), logits(2, 5, 30, seed=12)
    for record in (infigw.TopKRecord.from_logits(teacher, 8, temperature=2.0), _logprob_record(teacher, 8, 2.0)):
        # shift-invariant uses are exact at any loss temperature
        assert_close(F.gld_loss(student, record, k=4, values="topk_probs", temperature=0.5),
                     F.gld_loss(student, teacher, k=4, values="topk_probs", temperature=0.5), atol=1e-5,
                     name=f"{record.kind} topk_probs at T=0.5")
        assert_close(F.uld_loss(student, record, top_k=5, standardize=True, temperature=0.5),
                     F.uld_loss(student, teacher, top_k=5, standardize=True, temperature=0.5), atol=1e-5,
                     name=f"{record.kind} top-k ULD at T=0.5")
        # exact probabilities need the normaliser at the loss temperature
        with pytest.raises(ValueError, match="normalised at temperature 2.0"):
            F.uld_loss(student, record, temperature=0.5)
        with pytest.raises(ValueError, match="normalised at temperature 2.0"):
            F.gld_loss(student, record, k=4, values="probs", temperature=0.5)


def test_tail_bucket_holds_the_mass_outside_the_kept_entries():
    student, teacher = logits(1, 3, 40, seed=13), logits(1, 3, 40, seed=14)
    record = infigw.TopKRecord.from_logits(teacher, 6)
    kept = (record.values - record.logsumexp.unsqueeze(-1)).exp()
    tail = 1 - kept.sum(-1, keepdim=True)
    p = torch.softmax(student.double(), -1).sort(-1, descending=True).values
    q = torch.cat([kept, tail], -1).double().sort(-1, descending=True).values
    q = torch.nn.functional.pad(q, (0, 40 - q.shape[-1]))
    expected = (p - q).abs().sum(-1).mean()
    assert_close(F.uld_loss(student, record, record_tail="bucket"), expected, atol=1e-5, name="tail bucket ULD")
    with pytest.raises(ValueError, match="record_tail must be one of"):
        F.uld_loss(student, record, record_tail="spread")


# ---------------------------------------------------------------------------------- 12: sorted_gw1d lengths
@pytest.mark.parametrize("lengths,error,message", [
    (torch.tensor([-1, 2]), ValueError, r"lengths must lie in \[0, 4\]"),
    (torch.tensor([2, 5]), ValueError, r"lengths must lie in \[0, 4\]"),
    (torch.tensor([True, False]), TypeError, "lengths must be an integer tensor"),
    (torch.tensor([1.0, 2.0]), TypeError, "lengths must be an integer tensor"),
    ([1, 2], ValueError, "lengths must be a tensor"),
])
def test_sorted_gw1d_rejects_lengths_it_would_clamp(lengths, error, message):
    with pytest.raises(error, match=message):
        F.sorted_gw1d(torch.randn(2, 4), torch.randn(2, 4), lengths)


# ---------------------------------------------------------------------------------- 13: teacher weights rule
@pytest.mark.parametrize("weights", [[-1.0, 2.0], [0.0, 0.0], [float("inf"), 1.0]])
@pytest.mark.parametrize("loss_fn", [F.gld_loss, F.uld_loss])
def test_fixed_teacher_weights_must_be_nonnegative_and_not_all_zero(loss_fn, weights):
    teachers = [logits(2, 4, 12, seed=15), logits(2, 4, 12, seed=16)]
    with pytest.raises(ValueError, match="teacher_weights must be finite numbers >= 0, not all 0"):
        loss_fn(logits(2, 4, 12), teachers, teacher_weights=weights)


def test_zero_weight_for_one_teacher_is_allowed():
    teachers = [logits(2, 4, 12, seed=17), logits(2, 4, 12, seed=18)]
    assert_close(F.uld_loss(logits(2, 4, 12), teachers, teacher_weights=[0.0, 1.0]),
                 F.uld_loss(logits(2, 4, 12), teachers[1]), name="zero weight")


# ---------------------------------------------------------------------------------- 15: environment, tracing
def test_a_bogus_backend_variable_is_named(monkeypatch):
    monkeypatch.setenv("INFIGW_BACKEND", "bogus")
    with pytest.raises(ValueError, match="environment variable INFIGW_BACKEND must be"):
        F.gld_loss(logits(1, 3, 9), logits(1, 3, 9), k=2)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_losses_trace_under_fake_tensors(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        student = torch.randn(2, 5, 20, requires_grad=True)
        teacher, labels = torch.randn(2, 7, 24), torch.randint(0, 20, (2, 5))
        mask = torch.ones(2, 7, dtype=torch.bool)
        for loss in (F.gld_loss(student, teacher, labels, teacher_mask=mask, k=3, backend=backend),
                     F.uld_loss(student, teacher, labels, teacher_mask=mask),
                     F.infigfusion_loss(student, teacher, labels, teacher_mask=mask, k=3, backend=backend)):
            assert loss.shape == ()
            loss.backward()


def test_losses_run_on_meta_tensors():
    student, teacher = torch.randn(2, 5, 20, device="meta"), torch.randn(2, 5, 20, device="meta")
    labels = torch.zeros(2, 5, dtype=torch.long, device="meta")
    assert F.infigfusion_loss(student, teacher, labels, k=3, backend="torch").device.type == "meta"


def test_compile_fullgraph_with_the_first_call_inside_and_data_checks_on():
    """A fresh process: infigw's first loss call happens inside torch.compile(fullgraph=True), data checks on."""
    script = textwrap.dedent("""
        import torch, infigw
        student = torch.randn(2, 5, 20, requires_grad=True)
        teacher, labels = torch.randn(2, 5, 24), torch.randint(0, 20, (2, 5))
        loss_fn = infigw.InfiGFusionLoss(k=3)
        compiled = torch.compile(lambda x: loss_fn(x, teacher, labels), fullgraph=True, backend="aot_eager")
        value = compiled(student)
        value.backward()
        assert torch.allclose(value, loss_fn(student, teacher, labels), atol=1e-5), value
        print("compiled ok")
    """)
    env = {**os.environ, "INFIGW_DATA_CHECKS": "1"}
    env.pop("INFIGW_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "compiled ok" in result.stdout, result.stderr[-3000:]


def test_providers_are_registered_at_import():
    script = "import infigw, infigw.dispatch as d; print(sorted({b for b, _ in d._IMPLS}))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "'torch'" in result.stdout, result.stderr[-2000:]
    assert dispatch.resolve("topk_degrees", "torch", torch.device("cpu"))[0] == "torch"


# ---------------------------------------------------------------------------------- objective factors
def test_zero_factors_skip_their_terms(monkeypatch):
    """gamma = 0 computes no GLD; lam = 0 no distillation at all (the trial saw GLD computed at gamma = 0)."""
    student, teacher = logits(2, 4, 12, seed=19), logits(2, 4, 12, seed=20)
    labels = torch.randint(0, 12, (2, 4), generator=torch.Generator().manual_seed(6))

    def forbidden(*args, **kwargs):
        raise AssertionError("a term with a zero factor was computed")

    expected = F.infigfusion_loss(student, teacher, labels, k=3, gamma=0.0)
    monkeypatch.setattr(F, "gld_terms", forbidden)
    assert_close(F.infigfusion_loss(student, teacher, labels, k=3, gamma=0.0), expected, name="gamma = 0")
    monkeypatch.setattr(F.uld, "terms", forbidden)
    ce = torch.nn.functional.cross_entropy(student.reshape(-1, 12), labels.reshape(-1))
    assert_close(F.infigfusion_loss(student, teacher, labels, k=3, lam=0.0), ce, name="lam = 0 is the CE")
