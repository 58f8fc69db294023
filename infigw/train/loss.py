"""One fusion training step's objective, normalised so that gradient accumulation and data parallelism give the
gradients of one big batch.

The InfiGFusion objective ``(1 - lam) * CE + lam * sum_s w_s (ULD_s + gamma * GLD_s)`` (reduction "mean") is a
token mean for CE and a sequence mean for the distillation part. Split over micro-batches and ranks, each
micro-batch contributes its *sums* divided by the *global* counts::

    loss_micro = (1 - lam) * CE_sum(micro) / tokens(all) + lam * distill_sum(micro) / sequences(all)

and summing these over micro-batches and ranks gives exactly the big batch's loss (its gradient too: the
teacher weights are per sequence, detached). The loss itself is :func:`infigw.functional.infigfusion_loss` with
``num_items_in_batch=ItemCounts(tokens, sequences)`` (:mod:`infigw.distributed`), the counts taken from the
student's targets alone, so they are known before any forward pass: ``tokens`` counts the shifted targets
(labels[:, 1:] != -100, packed boundaries excluded), ``sequences`` the sequences (packed rows split) with at least
one target. A sequence with targets but no teacher position adds 0 to the distillation sum and still counts.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as torch_F

from .. import functional
from ..distributed import ItemCounts
from ..losses import InfiGFusionLoss
from .batch import IGNORE_INDEX, sequence_view, sequences_of, shifted_targets
from .teachers import TeacherOutput

# Options of infigfusion_loss this objective sets itself.
_OWN = ("lam", "reduction", "return_components", "num_items_in_batch")


def count_targets(batch: dict) -> ItemCounts:
    """One micro-batch's :class:`~infigw.distributed.ItemCounts`: its target tokens and its sequences with a
    target (see the module docstring), from the unshifted labels; ``sum()`` them over a step's micro-batches."""
    position_ids = batch.get("position_ids")
    valid = shifted_targets(batch["labels"], position_ids) != IGNORE_INDEX
    per_sequence = sequences_of(valid, sequence_view(position_ids), False)
    return ItemCounts(valid.sum(), per_sequence.any(-1).sum())


class StepTerms(NamedTuple):
    """A micro-batch's loss (already divided by the global counts) and what to log about it (0-dim tensors)."""
    loss: torch.Tensor
    logs: Dict[str, torch.Tensor]


class FusionObjective:
    """The training objective over a student, S teachers and the global counts of a step.

    Args:
        loss: an :class:`~infigw.InfiGFusionLoss` (its options: lam, gamma, k, values, ...), default
            ``InfiGFusionLoss()``; ``reduction`` is ignored (the normalisation is the step's, above).
        teacher_names: names for the logs (default ``teacher0``, ...).
    """

    def __init__(self, loss: Optional[InfiGFusionLoss] = None, teacher_names: Optional[Sequence[str]] = None):
        if loss is None:
            loss = InfiGFusionLoss()
        if not isinstance(loss, InfiGFusionLoss):
            raise TypeError(f"loss must be an infigw.InfiGFusionLoss, got {type(loss).__name__}")
        self.lam = float(loss.options["lam"])
        self.options = {name: value for name, value in loss.options.items() if name not in _OWN}
        self.teacher_names = list(teacher_names) if teacher_names else None

    def __call__(self, student_logits: torch.Tensor, batch: dict, teachers: List[tuple],
                 counts: Optional[ItemCounts] = None) -> StepTerms:
        """The micro-batch's share of the step's loss.

        Args:
            student_logits: (B, T, V) unshifted, as the model returns them (packed rows allowed).
            batch: the student's ``labels`` (B, T) unshifted and, for packed rows, ``position_ids``.
            teachers: one :class:`~infigw.train.teachers.TeacherOutput` (or ``(logits or TopKRecord, targets)``)
                per teacher, shifted, one row per sequence of the batch (packed rows in row-major order).
            counts: the step's :class:`~infigw.distributed.ItemCounts` (:func:`count_targets` summed over its
                micro-batches and ranks); None: this micro-batch's own counts (evaluation).
        """
        position_ids = batch.get("position_ids")
        logits = student_logits[:, :-1]
        targets = shifted_targets(batch["labels"], position_ids)
        view = sequence_view(position_ids)
        logits, targets = sequences_of(logits, view), sequences_of(targets, view, IGNORE_INDEX)
        pairing = {}
        if self.options.get("pairing") == "offsets":
            if "offsets" not in batch:
                raise ValueError("pairing='offsets' needs the student's character offsets in the batch (as "
                                 "infigw.train.FusionCollator gives them)")
            pairing["student_offsets"] = sequences_of(batch["offsets"][:, 1:], view, -1)
        if counts is None:
            counts = count_targets(batch)
        local_tokens = (targets != IGNORE_INDEX).sum().clamp_min(1)
        if not teachers:  # plain supervised fine-tuning: the CE share alone
            ce_sum = torch_F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                           reduction="sum")
            tokens = torch.as_tensor(counts.tokens, device=ce_sum.device).clamp_min(1)
            return StepTerms((1 - self.lam) * ce_sum / tokens, {"ce": ce_sum.detach() / local_tokens})
        teachers = [TeacherOutput(*teacher) for teacher in teachers]
        self._check_teachers(teachers, logits.shape[0])
        spans = [t.offsets for t in teachers]
        known = all(s is not None for s in spans)
        if pairing:
            if not known:
                raise ValueError("pairing='offsets' needs every teacher's target offsets (TeacherOutput.offsets)")
            pairing["teacher_offsets"] = spans
        # the step's share: CE summed / the step's tokens, distillation summed / the step's sequences
        loss, parts = functional.infigfusion_loss(
            logits, [t.logits for t in teachers], targets, teacher_labels=[t.targets for t in teachers],
            teacher_chars=[t.chars for t in teachers] if known else None, lam=self.lam, reduction="mean",
            num_items_in_batch=counts, return_components=True, **pairing, **self.options)
        tokens = torch.as_tensor(counts.tokens, device=parts["ce"].device).clamp_min(1)
        logs = {"ce": parts["ce"] * tokens / local_tokens}
        if self.lam != 0:
            logs.update(self._component_logs(parts))
        return StepTerms(loss, logs)

    @staticmethod
    def _check_teachers(teachers, sequences: int) -> None:
        for i, teacher in enumerate(teachers):
            if teacher.logits.shape[0] != sequences:
                raise ValueError(f"teacher {i} has {teacher.logits.shape[0]} sequences but the student batch has "
                                 f"{sequences} (packed rows are split into sequences: give the teachers one row per "
                                 "sequence)")

    def _component_logs(self, parts: dict) -> Dict[str, torch.Tensor]:
        """Per teacher, the mean ULD, GLD and weight over the sequences it is present in (device tensors: no host
        sync per step; the trainer reads them when it logs)."""
        included = parts["included"]
        names = self.teacher_names or [f"teacher{i}" for i in range(included.shape[0])]
        count = included.sum(-1).clamp_min(1)
        return {f"{key}/{name}": (torch.where(included[i], parts[key][i], 0).sum() / count[i]).detach()
                for key in ("uld", "gld", "weights")
                for i, name in enumerate(names)}
