"""The losses on the kernels: ``uld_loss`` and ``infigfusion_loss`` with each kernel backend against the same calls
on the plain-torch backend -- values and student gradients -- across the options that change what the kernels do
(full vocabulary or top-k ULD, temperature, several teachers of other vocabularies and lengths, stored records
with and without the tail bucket, masks, token weights), and how the objective reads the student: one summary
that also computes the full-vocabulary ULD."""
import pytest
import torch

import infigw
from infigw import dispatch
from infigw import functional as F

from .helpers import assert_close, random_mask

_STATUS = dispatch.backends()
# (backend, device): the C++ kernels on CPU, and on a GPU whatever "auto" picks there (the CUDA kernels where built)
BACKENDS = ([("cpp", "cpu")] if _STATUS["cpp"] == "available" else []) + \
    ([("auto", "cuda")] if torch.cuda.is_available() and _STATUS["cuda"] == "available" else [])
pytestmark = pytest.mark.skipif(not BACKENDS, reason=f"no kernel backend here: {_STATUS}")


def problem(device, seed=0, batch=2, length=9, vocab=57, teacher_length=11, teacher_vocab=63, dtype=torch.float32):
    """Student logits, labels with ignored positions, and a dense teacher of another length and vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch, length, vocab, generator=gen) * 2).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[~random_mask(batch, length, generator=gen)] = -100
    teacher = (torch.randn(batch, teacher_length, teacher_vocab, generator=gen) * 2).to(dtype)
    teacher_mask = random_mask(batch, teacher_length, generator=gen)
    return student.to(device), labels.to(device), teacher.to(device), teacher_mask.to(device), gen


def record_of(teacher, k, temperature=1.0):
    """A stored top-k record of a dense teacher, with the full-vocabulary logsumexp at ``temperature``."""
    values, indices = torch.topk(teacher.float(), k, dim=-1)
    return infigw.TopKRecord(values, indices, teacher.shape[-1], torch.logsumexp(teacher.float() / temperature, -1),
                             temperature)


def compare(loss_fn, student, *args, backend, name, atol=1e-5, **kwargs):
    """loss_fn on ``backend`` and on "torch": equal values and student gradients (also of the components)."""
    results = []
    for chosen in (backend, "torch"):
        x = student.detach().clone().requires_grad_(True)
        loss, parts = loss_fn(x, *args, backend=chosen, return_components=True, **kwargs)
        weights = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape)
        (grad,) = torch.autograd.grad((loss * weights).sum(), x)
        results.append((loss.detach(), parts, grad))
    (ours, ours_parts, ours_grad), (ref, ref_parts, ref_grad) = results
    assert_close(ours, ref, atol=atol, rtol=1e-4, name=f"{name} loss")
    for key in ("uld", "gld", "ce", "weights"):
        if key in ref_parts:
            assert_close(ours_parts[key], ref_parts[key], atol=atol, rtol=1e-4, name=f"{name} {key}")
    scale = ref_grad.abs().max().clamp_min(1e-30)
    assert_close(ours_grad / scale, ref_grad / scale, atol=1e-5, rtol=1e-4, name=f"{name} gradient")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("top_k,standardize", [(None, False), (5, False), (5, True)])
@pytest.mark.parametrize("temperature", [1.0, 1.6])
def test_uld_loss_on_kernels(backend, device, top_k, standardize, temperature):
    student, labels, teacher, teacher_mask, _ = problem(device, top_k or 1)
    compare(F.uld_loss, student, teacher, labels, teacher_mask=teacher_mask, top_k=top_k, standardize=standardize,
            temperature=temperature, reduction="none", backend=backend, name=f"uld top_k={top_k} T={temperature}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("record_tail", ["zeros", "bucket"])
def test_uld_loss_with_records_and_several_teachers(backend, device, record_tail):
    student, labels, teacher, teacher_mask, gen = problem(device, 2)
    second = torch.randn(2, 9, 40, generator=gen).to(device)
    compare(F.uld_loss, student, [teacher, record_of(second, 6)], labels,
            teacher_mask=[teacher_mask, None], record_tail=record_tail, teacher_weights="uncertainty",
            weight_granularity="token", weight_k=4, backend=backend, name=f"uld records {record_tail}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("options", [
    {},
    {"uld_top_k": 4},
    {"temperature": 1.5, "values": "probs"},
    {"temperature": 0.8, "uld_top_k": 3, "standardize": True, "lam": 0.3, "gamma": 2.0},
    {"teacher_weights": "uncertainty", "weight_granularity": "token"},
    {"gamma": 0.0},
    {"lam": 0.0},
], ids=["defaults", "top-k ULD", "probs T=1.5", "top-k standardized", "token weights", "no GLD", "CE only"])
def test_infigfusion_on_kernels(backend, device, options):
    student, labels, teacher, teacher_mask, gen = problem(device, 3)
    second = (torch.randn(2, 9, 57, generator=gen) * 3).to(device)
    teachers, masks = [teacher, second], [teacher_mask, None]
    compare(F.infigfusion_loss, student, teachers, labels, teacher_mask=masks, k=5, backend=backend,
            name=f"infigfusion {options}", **options)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_infigfusion_with_a_record_teacher(backend, device):
    student, labels, teacher, teacher_mask, _ = problem(device, 4)
    compare(F.infigfusion_loss, student, record_of(teacher, 8), labels, teacher_mask=teacher_mask, k=5,
            record_tail="bucket", backend=backend, name="infigfusion record", reduction="none")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_infigfusion_bf16(backend, device):
    student, labels, teacher, teacher_mask, _ = problem(device, 5, dtype=torch.bfloat16)
    results = []
    for chosen in (backend, "torch"):
        x = student.detach().clone().requires_grad_(True)
        loss = F.infigfusion_loss(x, teacher, labels, teacher_mask=teacher_mask, k=5, backend=chosen)
        loss.backward()
        results.append((loss.detach(), x.grad))
    assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4, name="bf16 loss")
    scale = results[1][1].float().abs().max()
    assert_close(results[0][1].float() / scale, results[1][1].float() / scale, atol=2 ** -5, rtol=2 ** -5,
                 name="bf16 gradient")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_objective_reads_the_student_once(backend, device, monkeypatch):
    """Full-vocabulary ULD inside the objective comes from the student's summary (one read forward, one gradient
    write backward), never from a separate uld_full pass; with top-k ULD the plain summary serves the student's
    terms (and selects the teacher's top-k)."""
    if device != "cpu":
        pytest.skip("the GPU has no kernel of the fused summary yet")
    student, labels, teacher, teacher_mask, _ = problem(device, 6)
    calls = []
    for op in ("topk_summary", "topk_summary_uld", "uld_full"):
        implementation = dispatch._IMPLS[(backend, op)]
        monkeypatch.setitem(dispatch._IMPLS, (backend, op),
                            lambda *args, op=op, implementation=implementation: calls.append(op) or implementation(*args))
    x = student.detach().clone().requires_grad_(True)
    F.infigfusion_loss(x, teacher, labels, teacher_mask=teacher_mask, k=5, backend=backend).backward()
    assert calls == ["topk_summary_uld"], calls
    calls.clear()
    F.infigfusion_loss(x, teacher, labels, teacher_mask=teacher_mask, k=5, uld_top_k=3, backend=backend)
    assert calls == ["topk_summary", "topk_summary"], calls  # the student's selection, then the teacher's
