"""nn.Module wrappers: they hold the configuration; all argument handling lives in :mod:`infigw.functional`.

A module's options are the keyword options of its functional, with the same defaults (derived from the
functional's signature, so the two cannot drift); ``forward`` takes the per-batch inputs only.
"""
import inspect

import torch

from . import functional as F

# Keyword arguments that describe one batch rather than the loss: given to forward, never stored.
PER_BATCH = ("mask", "teacher_labels", "teacher_mask")


class _ConfiguredLoss(torch.nn.Module):
    """Stores the keyword options of ``loss_fn`` and shows them in ``repr``."""

    loss_fn = None
    per_batch = PER_BATCH

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        parameters = inspect.signature(cls.loss_fn).parameters.values()
        options = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in cls.per_batch]
        cls.defaults = {p.name: p.default for p in options}
        cls.inputs = tuple(p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)

        def __init__(self, **given):  # its own function, so each class shows its own signature
            _ConfiguredLoss.__init__(self, **given)

        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        __init__.__signature__ = inspect.Signature([self_parameter] + options)
        cls.__init__ = __init__

    def __init__(self, **options):
        super().__init__()
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown options {unknown}; its options are "
                            f"{sorted(self.defaults)} (per-batch inputs {self.per_batch} go to forward)")
        self.options = {**self.defaults, **options}

    def forward(self, *inputs, **per_batch):
        stored = sorted(set(per_batch) - set(self.per_batch) - set(self.inputs))
        if stored:
            raise TypeError(f"{type(self).__name__}.forward takes {self.inputs} and the per-batch inputs "
                            f"{self.per_batch}, got {stored}: options belong to the constructor")
        return type(self).loss_fn(*inputs, **self.options, **per_batch)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items() if value != self.defaults[name])


class GLDLoss(_ConfiguredLoss):
    """Graph-on-Logits Distillation loss; see :func:`infigw.functional.gld_loss` for every option.

    ``forward(student_logits, teacher_logits, labels=None, *, mask=None, teacher_labels=None, teacher_mask=None)``.
    """

    loss_fn = staticmethod(F.gld_loss)


class ULDLoss(_ConfiguredLoss):
    """Universal Logit Distillation loss; see :func:`infigw.functional.uld_loss` for every option."""

    loss_fn = staticmethod(F.uld_loss)


class InfiGFusionLoss(_ConfiguredLoss):
    """``(1 - lam) * CE + lam * sum_s w_s (ULD_s + gamma * GLD_s)``; see :func:`infigw.functional.infigfusion_loss`.

    ``forward(student_logits, teacher_logits, labels, *, teacher_labels=None, teacher_mask=None)``.
    """

    loss_fn = staticmethod(F.infigfusion_loss)


class FusedLinearGLDLoss(_ConfiguredLoss):
    """GLD from the student's hidden states and LM head; see :func:`infigw.functional.fused_linear_gld_loss`.

    ``forward(student_hidden, lm_head_weight, teacher_logits, labels=None, *, lm_head_bias=None, mask=None,
    teacher_labels=None, teacher_mask=None)``; ``teacher_logits`` may be a :class:`~infigw.TeacherHead`.
    """

    loss_fn = staticmethod(F.fused_linear_gld_loss)
    per_batch = PER_BATCH + ("lm_head_bias",)


class FusedLinearULDLoss(_ConfiguredLoss):
    """ULD from the student's hidden states and LM head; see :func:`infigw.functional.fused_linear_uld_loss`."""

    loss_fn = staticmethod(F.fused_linear_uld_loss)
    per_batch = PER_BATCH + ("lm_head_bias",)


class FusedLinearInfiGFusionLoss(_ConfiguredLoss):
    """The InfiGFusion objective from the student's hidden states and LM head; see
    :func:`infigw.functional.fused_linear_infigfusion_loss`.

    ``forward(student_hidden, lm_head_weight, teacher_logits, labels, *, lm_head_bias=None, teacher_labels=None,
    teacher_mask=None)``.
    """

    loss_fn = staticmethod(F.fused_linear_infigfusion_loss)
    per_batch = PER_BATCH + ("lm_head_bias",)
