"""The objective's kernels of ``infigw._C`` as the ``cpp`` (CPU) and ``cuda`` backends: the student's top-k
summary (``topk_summary``, optionally with the full-vocabulary ULD of the same read, ``topk_summary_uld``) and
the full-vocabulary ULD on its own (``uld_full``).

Imported by :mod:`infigw.extension` once the extension is loaded; like it, this module adds the fake kernels and
the autograd formulas of the ops (schemas in ``csrc/ops.cpp``); its ``CALLABLES`` (the signatures of
:mod:`infigw.reference`'s, same results) are registered with :mod:`infigw.dispatch` by :mod:`infigw.extension`.
"""
import torch

from .contract import compute_dtype


# ---- op-level callables (signatures of infigw.reference.topk_summary, topk_summary_uld and uld_full) ----------

def _no_partners(logits):
    return torch.empty((0, logits.shape[0]), dtype=torch.long, device=logits.device)


def _differentiated(tensor) -> bool:
    """Whether backward will run through this call: then the ULD kernels keep their signs for it."""
    return torch.is_grad_enabled() and tensor.requires_grad


def topk_summary(logits, row_valid, k, temperature, gold, unit_lse):
    outputs = torch.ops.infigw.topk_summary(logits, row_valid, int(k), float(temperature), gold, bool(unit_lse), [],
                                            _no_partners(logits), [], False)
    return outputs[:5]


def topk_summary_uld(logits, row_valid, k, temperature, gold, unit_lse, teachers, partners, teacher_probs):
    outputs = torch.ops.infigw.topk_summary(logits, row_valid, int(k), float(temperature), gold, bool(unit_lse),
                                            list(teachers), partners, [bool(p) for p in teacher_probs],
                                            _differentiated(logits))
    return outputs[:6]


def uld_full(student, teacher, partner, temperature, teacher_probs=False):
    return torch.ops.infigw.uld_full(student, teacher, partner, float(temperature), bool(teacher_probs),
                                     _differentiated(student))[0]


CALLABLES = {  # dispatch op -> (callable, the torch.ops op whose kernels it runs)
    "topk_summary": (topk_summary, "topk_summary"),
    "topk_summary_uld": (topk_summary_uld, "topk_summary"),
    "uld_full": (uld_full, "uld_full"),
}


# ---- fake kernels ---------------------------------------------------------------------------------------------

def _register_fakes():
    # Kept signs: the CPU kernels keep them where asked (topk_summary: with one teacher); the fakes describe that
    # kernel (a kernel that ignores keep_signs returns empty signs, which backward also accepts).
    @torch.library.register_fake("infigw::topk_summary")
    def _(logits, row_valid, k, temperature, gold, unit_lse, teachers, partners, teacher_probs, keep_signs):
        (rows, vocab), acc = logits.shape, compute_dtype(logits.dtype)
        kept = keep_signs and len(teachers) == 1
        return (logits.new_empty((rows, k), dtype=acc), logits.new_empty((rows, k), dtype=torch.int64),
                logits.new_empty((rows,), dtype=acc), logits.new_empty((rows if unit_lse else 0,), dtype=acc),
                logits.new_empty((rows if gold is not None else 0,), dtype=acc),
                logits.new_empty((len(teachers), rows), dtype=acc), logits.new_empty((len(teachers), rows), dtype=acc),
                logits.new_empty((rows if kept else 0, vocab), dtype=acc),
                logits.new_empty((1 if kept else 0, rows), dtype=acc))

    @torch.library.register_fake("infigw::topk_summary_backward")
    def _(grad_kept, grad_lse, grad_unit, grad_gold, grad_uld, logits, row_valid, ids, lse, unit, gold, temperature,
          teachers, partners, teacher_probs, teacher_lse, signs, uld_dot):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("infigw::uld_full")
    def _(student, teacher, partner, temperature, teacher_probs, keep_signs):
        (rows, vocab), acc = student.shape, compute_dtype(student.dtype)
        kept = rows if keep_signs and student.device.type == "cpu" else 0  # the CUDA kernels keep no signs
        return (*(student.new_empty((rows,), dtype=acc) for _ in range(3)),
                student.new_empty((kept, vocab), dtype=acc), student.new_empty((kept,), dtype=acc))

    @torch.library.register_fake("infigw::uld_full_backward")
    def _(grad, student, teacher, partner, student_lse, teacher_lse, signs, dot, temperature, teacher_probs):
        return student.new_empty(student.shape)


# ---- autograd -------------------------------------------------------------------------------------------------

def _summary_setup(ctx, inputs, output):
    logits, row_valid, _, temperature, gold, _, teachers, partners, teacher_probs, _ = inputs
    kept, ids, lse, unit, gold_logit, uld, teacher_lse, signs, uld_dot = output
    ctx.save_for_backward(logits, row_valid, ids, lse, unit, gold, partners, teacher_lse, signs, uld_dot, *teachers)
    ctx.temperature, ctx.teacher_probs = temperature, list(teacher_probs)
    ctx.mark_non_differentiable(ids, teacher_lse, signs, uld_dot)
    ctx.set_materialize_grads(False)  # else autograd fills an (N, V) zero "gradient" of the signs


def _summary_backward(ctx, grad_kept, _ids, grad_lse, grad_unit, grad_gold, grad_uld, *_kept_for_backward):
    logits, row_valid, ids, lse, unit, gold, partners, teacher_lse, signs, uld_dot, *teachers = ctx.saved_tensors
    acc = compute_dtype(logits.dtype)
    rows, k = ids.shape

    def given(grad, shape):  # an output that did not reach the loss has no gradient
        return torch.zeros(shape, dtype=acc, device=logits.device) if grad is None else grad

    grad_logits = torch.ops.infigw.topk_summary_backward(
        given(grad_kept, (rows, k)), given(grad_lse, (rows,)), given(grad_unit, unit.shape),
        given(grad_gold, (rows if gold is not None else 0,)), given(grad_uld, teacher_lse.shape), logits, row_valid,
        ids, lse, unit, gold, ctx.temperature, teachers, partners, ctx.teacher_probs, teacher_lse, signs, uld_dot)
    # autograd matches the structure of the inputs: a list of tensors gets a list, a list of bools None (an empty
    # list of either counts as a list)
    flags = None if ctx.teacher_probs else []
    return grad_logits, None, None, None, None, None, [None] * len(teachers), None, flags, None


def _uld_setup(ctx, inputs, output):
    student, teacher, partner, temperature, teacher_probs, _ = inputs
    _, student_lse, teacher_lse, signs, dot = output
    ctx.save_for_backward(student, teacher, partner, student_lse, teacher_lse, signs, dot)
    ctx.temperature, ctx.teacher_probs = temperature, teacher_probs
    ctx.mark_non_differentiable(student_lse, teacher_lse, signs, dot)
    ctx.set_materialize_grads(False)  # else autograd fills an (N, V) zero "gradient" of the signs


def _uld_backward(ctx, grad, *_kept_for_backward):
    if grad is None:
        return None, None, None, None, None, None
    student, teacher, partner, student_lse, teacher_lse, signs, dot = ctx.saved_tensors
    grad_student = torch.ops.infigw.uld_full_backward(grad, student, teacher, partner, student_lse, teacher_lse,
                                                      signs, dot, ctx.temperature, ctx.teacher_probs)
    return grad_student, None, None, None, None, None


def _register_autograd():
    torch.library.register_autograd("infigw::topk_summary", _summary_backward, setup_context=_summary_setup)
    torch.library.register_autograd("infigw::uld_full", _uld_backward, setup_context=_uld_setup)


_register_fakes()
_register_autograd()
