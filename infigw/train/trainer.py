"""``transformers`` Trainer integration: a student learns from teachers with other tokenizers.

:class:`FusionMixin` holds every override; :class:`FusionTrainer` is it on ``transformers.Trainer`` and
:func:`fusion_trainer_class` puts it on any Trainer subclass (TRL's ``SFTTrainer``, for instance). What it does:

- keeps the raw-text columns that ``remove_unused_columns`` would drop (the teachers tokenize the text);
- runs the online teachers frozen, each on its own tokens (:class:`~infigw.train.OnlineTeacher`);
- splits packed rows (``position_ids`` restarting at 0) into sequences for the graphs and pairs;
- counts, per optimizer step, the target tokens and sequences over all micro-batches and ranks
  (:func:`~infigw.train.loss.count_items`), and passes them as ``num_items_in_batch`` so that every micro-batch
  adds its share of the one-big-batch loss (gradient accumulation and DDP equal one big batch);
- logs the components (``ce``, ``uld/<teacher>``, ``gld/<teacher>``, ``weights/<teacher>``) to the Trainer's
  loggers, averaged over the logging interval.
"""
from collections import defaultdict
from typing import Optional, Sequence

import torch

from ..losses import InfiGFusionLoss
from .batch import FusionCollator
from .loss import FusionObjective, count_items
from .teachers import OnlineTeacher

# Columns of a fusion dataset that the model's forward does not take but the collator needs.
TEXT_COLUMNS = ("text", "prompt", "completion", "response_start", "index")
# Batch entries that are not model inputs.
_NOT_MODEL_INPUTS = ("labels", "offsets", "teachers", "text", "index")


class FusionMixin:
    """The fusion overrides of a Trainer (see the module docstring).

    Keyword arguments (besides the base Trainer's):
        teachers: the :class:`~infigw.train.OnlineTeacher` s.
        objective: an :class:`~infigw.InfiGFusionLoss` holding the objective's options (default: its defaults).
        max_length: truncation of the default collator.
    The default ``data_collator`` is a :class:`~infigw.train.FusionCollator` over ``processing_class`` (the
    student's tokenizer) and the teachers' tokenizers.
    """

    def __init__(self, *args, teachers: Sequence[OnlineTeacher] = (), objective: Optional[InfiGFusionLoss] = None,
                 max_length: Optional[int] = None, **kwargs):
        teachers = list(teachers)
        for i, teacher in enumerate(teachers):
            if not isinstance(teacher, OnlineTeacher):
                raise TypeError(f"teachers[{i}] must be an infigw.train.OnlineTeacher, got {type(teacher).__name__}")
            teacher.name = teacher.name or f"teacher{i}"
        if kwargs.get("data_collator") is None:
            tokenizer = kwargs.get("processing_class")
            if tokenizer is None:
                raise ValueError("pass processing_class (the student's tokenizer) or a data_collator")
            kwargs["data_collator"] = FusionCollator(tokenizer, [t.tokenizer for t in teachers], max_length)
        super().__init__(*args, **kwargs)
        self.teachers = teachers
        self.objective = FusionObjective(objective, [t.name for t in teachers])
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the step's global counts itself
        self.model_accepts_loss_kwargs = True  # ... so the Trainer must not rescale it (older transformers)
        self._component_sums = defaultdict(float)
        self._component_steps = 0
        for teacher in teachers:
            teacher.prepare(self.args.device)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys(list(self._signature_columns) + list(TEXT_COLUMNS)))

    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        """The step's micro-batches and its global (2,) [tokens, sequences] counts (summed over ranks)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        device = device if device is not None else self.args.device
        counts = sum(count_items(batch) for batch in batches).to(device)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return batches, counts

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        model_inputs = {key: value for key, value in inputs.items() if key not in _NOT_MODEL_INPUTS}
        outputs = model(**model_inputs)
        counts = num_items_in_batch if _is_counts(num_items_in_batch) else None
        terms = self.objective(outputs.logits, inputs, self._teacher_outputs(inputs), counts)
        loss = terms.loss
        if counts is not None and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages gradients over ranks; the counts are global
        if model.training:
            for key, value in terms.logs.items():
                self._component_sums[key] += value
            self._component_steps += 1
        return (loss, outputs) if return_outputs else loss

    def _teacher_outputs(self, inputs):
        """Each online teacher's (logits, targets), one row per sequence of the student batch."""
        if not self.teachers:
            return []
        parts = inputs.get("teachers")
        if parts is None or len(parts) != len(self.teachers):
            raise ValueError(f"the batch must carry one tokenized part per online teacher ({len(self.teachers)}) "
                             "under 'teachers': use infigw.train.FusionCollator with the teachers' tokenizers")
        return [teacher.outputs(part) for teacher, part in zip(self.teachers, parts)]

    def log(self, logs, *args, **kwargs):
        if self._component_steps and "loss" in logs:
            logs = {**logs, **{key: value / self._component_steps for key, value in self._component_sums.items()}}
            self._component_sums.clear()
            self._component_steps = 0
        return super().log(logs, *args, **kwargs)


def _is_counts(value) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == (2,)


def fusion_trainer_class(base):
    """``base`` (a ``transformers.Trainer`` subclass, e.g. ``trl.SFTTrainer``) with the fusion overrides."""
    return type(f"Fusion{base.__name__}", (FusionMixin, base), {"__doc__": FusionMixin.__doc__})


def _trainer():
    from transformers import Trainer
    return Trainer


FusionTrainer = fusion_trainer_class(_trainer())
FusionTrainer.__module__ = __name__
