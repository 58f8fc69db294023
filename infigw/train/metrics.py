"""Held-out measures that compare models with different tokenizers."""
import math
from typing import Sequence

import torch

from .batch import FusionCollator, shifted_targets


@torch.no_grad()
def bits_per_character(model, tokenizer, texts: Sequence[str], max_length=None, batch_size: int = 32) -> float:
    """Cross-entropy of ``model`` on ``texts`` in bits per character of the raw text: the sum of its next-token
    losses over all characters, comparable across tokenizers when each tokenizer covers every character (lossless,
    with a BOS so that the first token is predicted too, as :mod:`infigw.train.toy` builds them)."""
    was_training = model.training
    model.eval()
    collator = FusionCollator(tokenizer, max_length=max_length)
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(texts), batch_size):
        inputs = collator([{"text": text} for text in texts[start:start + batch_size]])
        logits = model(input_ids=inputs["input_ids"].to(device),
                       attention_mask=inputs["attention_mask"].to(device)).logits[:, :-1]
        targets = shifted_targets(inputs["labels"]).to(device)
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                         reduction="sum"))
    model.train(was_training)
    return total / max(sum(len(text) for text in texts), 1) / math.log(2)
