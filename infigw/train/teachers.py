"""The teachers of a fusion run: frozen models with their own tokenizers, run online on the batch's raw text.

A teacher never trains: :meth:`OnlineTeacher.prepare` puts it in eval mode without gradients, on the training
device or, with ``offload=True``, kept in CPU memory and streamed to the device layer by layer
(``accelerate.cpu_offload``). Its outputs for a batch are its logits aligned with its own shifted targets, in the
form the losses take (``teacher_logits`` + ``teacher_labels``).
"""
from typing import Optional

import torch

from .batch import shifted_targets


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
    def outputs(self, inputs: dict):
        """(logits (B, T' - 1, V_t), targets (B, T' - 1)) for the teacher's part of a batch (see
        :class:`~infigw.train.FusionCollator`): logit t predicts target t; ``-100`` marks positions to ignore."""
        device = self._device if self._device is not None and not self.offload else inputs["input_ids"].device
        ids = inputs["input_ids"].to(device)
        mask = inputs["attention_mask"].to(device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target_device = inputs["input_ids"].device
        return logits.to(target_device), shifted_targets(inputs["labels"]).to(target_device)
