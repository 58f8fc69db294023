"""``transformers`` Trainer integration: a student learns from teachers with other tokenizers.

:class:`FusionMixin` holds every override; :class:`FusionTrainer` is it on ``transformers.Trainer`` and
:func:`fusion_trainer_class` puts it on any Trainer subclass (TRL's ``SFTTrainer``, for instance). What it does:

- keeps the raw-text columns that ``remove_unused_columns`` would drop (the teachers tokenize the text);
- runs the online teachers frozen, each on its own tokens (:class:`~infigw.train.OnlineTeacher`), or reads
  their records from a store (:class:`~infigw.train.StoreTeacher`);
- splits packed rows (``position_ids`` restarting at 0) into sequences for the graphs and pairs;
- counts, per optimizer step, the target tokens and sequences over all micro-batches and ranks
  (:func:`~infigw.train.loss.count_targets`), and passes them as ``num_items_in_batch`` so that every micro-batch
  adds its share of the one-big-batch loss (gradient accumulation and DDP equal one big batch);
- logs the components (``ce``, ``uld/<teacher>``, ``gld/<teacher>``, ``weights/<teacher>``) to the Trainer's
  loggers, averaged over the logging interval.
"""
from collections import defaultdict
from typing import Optional, Sequence

import torch
from transformers.utils import logging

from ..losses import InfiGFusionLoss
from .batch import FusionCollator, sequence_view, tokenize
from ..distributed import ItemCounts
from .loss import FusionObjective, count_targets
from .teachers import OnlineTeacher, StoreTeacher

logger = logging.get_logger(__name__)

# Columns of a fusion dataset that the model's forward does not take but the collator needs.
TEXT_COLUMNS = ("text", "prompt", "completion", "response_start", "index")
# Batch entries that are not model inputs.
_NOT_MODEL_INPUTS = ("labels", "offsets", "teachers", "text", "index")


class FusionMixin:
    """The fusion overrides of a Trainer (see the module docstring).

    Keyword arguments (besides the base Trainer's):
        teachers: :class:`~infigw.train.OnlineTeacher` s and :class:`~infigw.train.StoreTeacher` s (a store is read by
            the dataset's ``index`` column: the row numbers of the data it was captured from).
        objective: an :class:`~infigw.InfiGFusionLoss` holding the objective's options (default: its defaults).
        max_length: truncation of the default collator.
    The default ``data_collator`` is a :class:`~infigw.train.FusionCollator` over ``processing_class`` (the
    student's tokenizer) and the teachers' tokenizers.
    """

    def __init__(self, *args, teachers: Sequence[OnlineTeacher] = (), objective: Optional[InfiGFusionLoss] = None,
                 max_length: Optional[int] = None, **kwargs):
        teachers = list(teachers)
        for i, teacher in enumerate(teachers):
            if not isinstance(teacher, (OnlineTeacher, StoreTeacher)):
                raise TypeError(f"teachers[{i}] must be an infigw.train.OnlineTeacher or StoreTeacher, got "
                                f"{type(teacher).__name__}")
            teacher.name = teacher.name or f"teacher{i}"
        # TRL's SFTTrainer (its config has `packing`) tokenizes and packs itself: the teachers then read text
        # decoded from its batches; a plain Trainer gets the collator that keeps the raw text.
        trl_pipeline = hasattr(kwargs.get("args", args[1] if len(args) > 1 else None), "packing")
        if kwargs.get("data_collator") is None and not trl_pipeline:
            tokenizer = kwargs.get("processing_class")
            if tokenizer is None:
                raise ValueError("pass processing_class (the student's tokenizer) or a data_collator")
            online = [t.tokenizer for t in teachers if isinstance(t, OnlineTeacher)]
            kwargs["data_collator"] = FusionCollator(tokenizer, online, max_length)
        super().__init__(*args, **kwargs)
        self.teachers = teachers
        self.objective = FusionObjective(objective, [t.name for t in teachers])
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the step's global counts itself
        self.model_accepts_loss_kwargs = True  # ... so the Trainer must not rescale it (older transformers)
        self._component_sums = defaultdict(float)  # device tensors once added to: read when logging
        self._component_steps = 0
        self._warned_decoding = False
        for teacher in teachers:
            teacher.prepare(self.args.device)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys(list(self._signature_columns) + list(TEXT_COLUMNS)))

    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        """The step's micro-batches and its :class:`~infigw.distributed.ItemCounts` (summed over the ranks)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        device = device if device is not None else self.args.device
        total = sum(count_targets(batch) for batch in batches)
        counts = torch.stack([total.tokens, total.sequences]).to(device)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return batches, ItemCounts(counts[0], counts[1])

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        model_inputs = {key: value for key, value in inputs.items() if key not in _NOT_MODEL_INPUTS}
        outputs = model(**model_inputs)
        # the Trainer's own count (evaluation) is a token count: the objective then counts the batch itself
        counts = num_items_in_batch if isinstance(num_items_in_batch, ItemCounts) else None
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
        """Each teacher's :class:`~infigw.train.TeacherOutput`, one row per sequence of the batch: online teachers
        read their tokenized parts (in order), store teachers the batch's example indices."""
        online = [t for t in self.teachers if isinstance(t, OnlineTeacher)]
        parts = inputs.get("teachers")
        if online and parts is None:
            parts = self._parts_from_student_tokens(inputs, online)
        if online and len(parts) != len(online):
            raise ValueError(f"the batch carries {len(parts)} teacher parts for {len(online)} online teachers")
        if len(online) < len(self.teachers) and "index" not in inputs:
            raise ValueError("a record-store teacher needs the examples' indices: give the dataset an 'index' column "
                             "(the row numbers of the data the store was captured from)")
        parts = iter(parts or ())
        return [teacher.outputs(next(parts)) if isinstance(teacher, OnlineTeacher) else teacher.outputs(inputs["index"])
                for teacher in self.teachers]

    def _parts_from_student_tokens(self, inputs, teachers):
        """Teacher parts for a batch made without :class:`FusionCollator` (TRL's own pipeline, packed or not):
        each sequence's text is decoded from the student's tokens, exact for lossless tokenizers (byte-level BPE,
        SentencePiece-style) only, and every target of the teachers is learnt."""
        tokenizer = self.processing_class
        if tokenizer is None:
            raise ValueError("the batch has no teacher parts and the trainer no processing_class to decode the "
                             "student's tokens with: use infigw.train.FusionCollator")
        if not self._warned_decoding:
            logger.warning("fusion: the teachers read text decoded from the student's tokens (the batch has no raw "
                           "text); this is exact only for lossless student tokenizers")
            self._warned_decoding = True
        ids = inputs["input_ids"]
        position_ids = inputs.get("position_ids")
        view = sequence_view(position_ids)
        if view is None:
            mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
            sequences = [row[keep].tolist() for row, keep in zip(ids, mask)]
        else:
            sequences = [row[keep].tolist() for row, keep in zip(view.gather(ids), view.inside)]
        texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
        max_length = getattr(self.data_collator, "max_length", None)
        return [{key: value.to(ids.device) for key, value in
                 tokenize(teacher.tokenizer, texts, [0] * len(texts), max_length).items()}
                for teacher in teachers]

    def log(self, logs, *args, **kwargs):
        if self._component_steps and "loss" in logs:
            averages = {key: float(value) / self._component_steps for key, value in self._component_sums.items()}
            logs = {**logs, **averages}
            self._component_sums.clear()
            self._component_steps = 0
        return super().log(logs, *args, **kwargs)


def fusion_trainer_class(base):
    """``base`` (a ``transformers.Trainer`` subclass, e.g. ``trl.SFTTrainer``) with the fusion overrides."""
    return type(f"Fusion{base.__name__}", (FusionMixin, base), {"__doc__": FusionMixin.__doc__})


def _trainer():
    from transformers import Trainer
    return Trainer


FusionTrainer = fusion_trainer_class(_trainer())
FusionTrainer.__module__ = __name__
