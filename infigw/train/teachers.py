"""The teachers of a fusion run: frozen models with their own tokenizers, run online on the batch's raw text
(:class:`OnlineTeacher`), or their top-k records read offline from a store (:class:`StoreTeacher`).

A teacher never trains: :meth:`OnlineTeacher.prepare` puts it in eval mode without gradients, on the training
device or, with ``offload=True``, kept in CPU memory and streamed to the device layer by layer
(``accelerate.cpu_offload``). Either kind gives, per batch, a :class:`TeacherOutput`: its logits (or a
:class:`~infigw.TopKRecord`) aligned with its own shifted targets and their character spans, the form the losses
take (``teacher_logits``, ``teacher_labels``, ``teacher_offsets``).
"""
from typing import NamedTuple, Optional

import torch

from .batch import shifted_targets


class TeacherOutput(NamedTuple):
    """One teacher's side of a batch, aligned with its own shifted targets: what the losses take."""
    logits: object  # (B, T' - 1, V_t) dense logits or a TopKRecord
    targets: torch.Tensor  # (B, T' - 1) the token each position predicts, -100 to ignore
    offsets: Optional[torch.Tensor] = None  # (B, T' - 1, 2) character spans of the target tokens (-1: none)

    @property
    def chars(self) -> Optional[torch.Tensor]:
        """(B, T' - 1) characters of each target token (per-character teacher weights), or None."""
        return None if self.offsets is None else target_chars(self.offsets)


def target_chars(spans: torch.Tensor) -> torch.Tensor:
    """(B, T, 2) character spans of target tokens -> (B, T) characters each covers (0 for none)."""
    return (spans[..., 1] - spans[..., 0]).clamp_min(0)


class OnlineTeacher:
    """A teacher model run on every batch.

    Args:
        model: a ``transformers`` causal LM (any ``nn.Module`` returning ``.logits`` (B, T, V_t)).
        tokenizer: its fast tokenizer (the collator tokenizes the raw text with it).
        name: how logs and reports call it (default ``teacher{i}``).
        offload: keep the weights on the CPU and stream them to the training device for each forward.
    """

    def __init__(self, model, tokenizer, *, name: Optional[str] = None, offload: bool = False):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"the tokenizer of teacher {name or model.__class__.__name__} must be a fast tokenizer "
                            "(fusion aligns models through character offsets)")
        self.model, self.tokenizer, self.name, self.offload = model, tokenizer, name, offload
        self._device = None

    def prepare(self, device) -> None:
        """Freeze the teacher and place it for training on ``device`` (once)."""
        device = torch.device(device)
        if self._device == device:
            return
        self.model.eval()
        self.model.requires_grad_(False)
        if self.offload and device.type != "cpu":
            from accelerate import cpu_offload
            cpu_offload(self.model, execution_device=device)
        else:
            self.model.to(device)
        self._device = device

    @torch.no_grad()
    def outputs(self, inputs: dict) -> TeacherOutput:
        """The teacher's :class:`TeacherOutput` for its part of a batch (see :class:`~infigw.train.FusionCollator`):
        logit t predicts target t; ``-100`` marks positions to ignore."""
        device = self._device if self._device is not None and not self.offload else inputs["input_ids"].device
        ids = inputs["input_ids"].to(device)
        mask = inputs["attention_mask"].to(device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        home = inputs["input_ids"].device
        return TeacherOutput(logits.to(home), shifted_targets(inputs["labels"]), inputs["offsets"][:, 1:])


class StoreTeacher:
    """A teacher captured offline (``python -m infigw.records capture``): its records are read by the batch's
    example ``index`` (the row numbers of the data the store was captured from).

    Args:
        store: an opened :class:`~infigw.records.RecordStore` or its path.
        name: how logs and reports call it (default ``teacher{i}``).
        tokenizer: optional, the teacher's tokenizer: a store written with another one is refused.
    """

    tokenizer = None  # nothing to tokenize: the records hold the teacher's positions

    def __init__(self, store, *, name: Optional[str] = None, tokenizer=None):
        from ..records import RecordStore, open_store

        self.store = store if isinstance(store, RecordStore) else open_store(store, tokenizer=tokenizer)
        self.name = name
        self._device = None

    def prepare(self, device) -> None:
        self._device = torch.device(device)

    def outputs(self, indices: torch.Tensor) -> TeacherOutput:
        """The records of the examples ``indices`` (B,), padded, on the training device; targets outside each
        example's response are ignored."""
        records = self.store.collate(indices.tolist())
        if self._device is not None:
            records = records.to(self._device)
        targets = records.labels.masked_fill(~records.response_mask(), -100)
        return TeacherOutput(records.record, targets, records.offsets)
