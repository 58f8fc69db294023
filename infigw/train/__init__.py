"""Fusion training: a student (pivot) learns from teachers with other tokenizers (docs/training.md).

- :class:`FusionTrainer` (``transformers.Trainer``) and :func:`fusion_trainer_class` (any Trainer subclass,
  e.g. TRL's ``SFTTrainer``);
- :class:`FusionCollator`: tokenizes the raw text for the student and every teacher and keeps it;
- :class:`OnlineTeacher`: a frozen teacher model with its own tokenizer; :class:`StoreTeacher`: a teacher's
  top-k records captured offline (:mod:`infigw.records`);
- :class:`FusionObjective` and :func:`count_targets`: the step objective normalised by global counts, so that
  gradient accumulation and DDP give the gradients of one big batch.
Needs ``pip install infigw[hf]``.
"""
from .batch import FusionCollator, sequence_view, shifted_targets
from .loss import FusionObjective, count_targets
from .teachers import OnlineTeacher, StoreTeacher, TeacherOutput
from .trainer import FusionMixin, FusionTrainer, fusion_trainer_class

__all__ = ["FusionTrainer", "FusionMixin", "fusion_trainer_class", "FusionCollator", "OnlineTeacher", "StoreTeacher",
           "TeacherOutput", "FusionObjective", "count_targets", "sequence_view", "shifted_targets"]
