"""nn.Module wrappers: they hold the configuration; all argument handling lives in :mod:`infigw.functional`.

A module's options are the keyword options of its functional, with the same defaults (derived from the
functional's signature, so the two cannot drift); ``forward`` takes the per-batch inputs only. ``preset=NAME``
starts from a named setting of :data:`PRESETS` instead of the defaults (options given beside it still win).
"""
import inspect

import torch

from . import functional as F

# Named settings. "paper": the paper-literal reading of InfiGFusion as far as its accessible parts fix it (docs/
# training.md, "What is the paper's"): top-k raw logits as node values, k rank-slot nodes (the figure's sorted sum
# runs to k), graphs summed over positions, and the token-wise term on the top-d' entries (d' = k here). k = 10,
# lam = 0.5 and gamma = 1 are not in the accessible text (ours). A functional call takes them as
# ``F.gld_loss(..., **PRESETS["paper"])`` (the options a function lacks dropped: :func:`preset_options`).
PRESETS = {
    "paper": dict(k=10, values="logits", nodes="rank", graph_norm="sum", num_nodes=None, distance="l1",
                  uld_top_k=10, top_k=10, standardize=False, lam=0.5, gamma=1.0),
}


def preset_options(name: str, loss_fn) -> dict:
    """The options of preset ``name`` that ``loss_fn`` (a functional loss) takes."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    taken = inspect.signature(loss_fn).parameters
    return {key: value for key, value in PRESETS[name].items() if key in taken}


# Keyword arguments that describe one batch rather than the loss: given to forward, never stored.
PER_BATCH = ("mask", "teacher_labels", "teacher_mask", "teacher_chars", "student_offsets", "teacher_offsets",
             "num_items_in_batch")


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

        def __init__(self, preset=None, **given):  # its own function, so each class shows its own signature
            _ConfiguredLoss.__init__(self, preset, **given)

        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        preset_parameter = inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, default=None)
        __init__.__signature__ = inspect.Signature([self_parameter, preset_parameter] + options)
        cls.__init__ = __init__

    def __init__(self, preset=None, **options):
        super().__init__()
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown options {unknown}; its options are "
                            f"{sorted(self.defaults)} (per-batch inputs {self.per_batch} go to forward)")
        start = {} if preset is None else preset_options(preset, type(self).loss_fn)
        self.preset = preset
        self.options = {**self.defaults, **start, **options}

    def forward(self, *inputs, **per_batch):
        stored = sorted(set(per_batch) - set(self.per_batch) - set(self.inputs))
        if stored:
            raise TypeError(f"{type(self).__name__}.forward takes {self.inputs} and the per-batch inputs "
                            f"{self.per_batch}, got {stored}: options belong to the constructor")
        return type(self).loss_fn(*inputs, **self.options, **per_batch)

    def extra_repr(self) -> str:
        changed = [f"{name}={value!r}" for name, value in self.options.items() if value != self.defaults[name]]
        return ", ".join(([f"preset={self.preset!r}"] if self.preset else []) + changed)


class GLDLoss(_ConfiguredLoss):
    """Graph-on-Logits Distillation loss; see :func:`infigw.functional.gld_loss` for every option.

    ``forward(student_logits, teacher_logits, labels=None, *, mask=None, teacher_labels=None, teacher_mask=None,
    num_items_in_batch=None)``.
    """

    loss_fn = staticmethod(F.gld_loss)


class ULDLoss(_ConfiguredLoss):
    """Universal Logit Distillation loss; see :func:`infigw.functional.uld_loss` for every option."""

    loss_fn = staticmethod(F.uld_loss)


class InfiGFusionLoss(_ConfiguredLoss):
    """``(1 - lam) * CE + lam * sum_s w_s (ULD_s + gamma * GLD_s)``; see :func:`infigw.functional.infigfusion_loss`.

    ``forward(student_logits, teacher_logits, labels, *, teacher_labels=None, teacher_mask=None,
    num_items_in_batch=None)``.
    """

    loss_fn = staticmethod(F.infigfusion_loss)


class FusedLinearGLDLoss(_ConfiguredLoss):
    """GLD from the student's hidden states and LM head; see :func:`infigw.functional.fused_linear_gld_loss`.

    ``forward(student_hidden, lm_head_weight, teacher_logits, labels=None, *, lm_head_bias=None, mask=None,
    teacher_labels=None, teacher_mask=None, teacher_chars=None, num_items_in_batch=None)``; ``teacher_logits`` may
    be a :class:`~infigw.TeacherHead`.
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
    teacher_mask=None, teacher_chars=None, student_offsets=None, teacher_offsets=None, num_items_in_batch=None)``.
    """

    loss_fn = staticmethod(F.fused_linear_infigfusion_loss)
    per_batch = PER_BATCH + ("lm_head_bias",)
