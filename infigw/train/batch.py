"""Batches for fusion training: the collator that keeps the raw text, and the sequence view of packed rows.

Every model of a fusion run reads the same characters through its own tokenizer, so a batch carries the raw
text beside the student's tokens: :class:`FusionCollator` tokenizes it for the student and for every online
teacher (each with its own tokenizer, padding and masks) and keeps it under ``"text"``. Labels follow the
``transformers`` convention (unshifted, ``-100`` where nothing is learnt); the losses take them shifted
(:func:`shifted_targets`). A row may be *packed* (several sequences one after another, ``position_ids`` restarting
at 0, as TRL's padding-free collators make): :func:`sequence_view` splits such rows back into sequences, because
GLD's graphs and ULD's pairs are per sequence.
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..records.text import trim_leading_whitespace

IGNORE_INDEX = -100


def texts_and_starts(features, text_field: str):
    """Each example's raw text and the character where learning starts: ``text_field`` (from its
    ``response_start``, default 0), or ``prompt`` + ``completion`` (from the completion)."""
    texts, starts = [], []
    for i, feature in enumerate(features):
        if isinstance(feature.get(text_field), str):
            texts.append(feature[text_field])
            starts.append(int(feature.get("response_start", 0)))
        elif "prompt" in feature and "completion" in feature:
            texts.append(str(feature["prompt"]) + str(feature["completion"]))
            starts.append(len(str(feature["prompt"])))
        else:
            raise ValueError(f"example {i} has no raw text: fusion needs a string column {text_field!r} (or "
                             f"'prompt' + 'completion'); its keys are {sorted(feature)}. With the Trainer, keep "
                             "remove_unused_columns=False or use infigw.train.FusionTrainer, which keeps the column")
    return texts, starts


def tokenize(tokenizer, texts: Sequence[str], response_starts: Sequence[int], max_length: Optional[int],
             pad_to_multiple_of: Optional[int] = None) -> dict:
    """One model's padded batch of ``texts``: input_ids, attention_mask, labels (unshifted, -100 on padding and
    on tokens that end at or before the response start) and offsets (B, T, 2) character spans (-1 on padding),
    trimmed of leading whitespace as :mod:`infigw.alignment` expects (a word's token starts at its first letter
    whether the tokenizer attaches the space before it or not).

    Needs a fast tokenizer (character offsets); a tokenizer without a pad token pads with id 0 (masked anyway).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: fusion needs character offsets "
                        "(return_offsets_mapping), which only fast tokenizers give")
    encoded = tokenizer(list(texts), truncation=max_length is not None, max_length=max_length,
                        return_offsets_mapping=True, add_special_tokens=True)
    width = max(len(ids) for ids in encoded["input_ids"])
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(texts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    offsets = torch.full((batch, width, 2), -1, dtype=torch.long)
    for row, (ids, spans, text) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"], texts)):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, :len(ids)] = 1
        offsets[row, :len(ids)] = torch.from_numpy(trim_leading_whitespace(spans, text))
    starts = torch.tensor(list(response_starts), dtype=torch.long).unsqueeze(-1)
    present = attention.bool()
    special = present & (offsets[..., 1] <= offsets[..., 0])  # BOS/EOS and other tokens that cover no text
    text = present & ~special & (offsets[..., 1] > starts)  # text tokens that reach into the response
    # a special token is learnt after the response has begun (an EOS), never before it (a BOS before a prompt)
    begun = (text.long().cumsum(-1) > 0) | (starts == 0)
    labels = torch.where(text | (special & begun), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "offsets": offsets}


@dataclass
class FusionCollator:
    """Collate raw-text examples for a fusion run.

    Args:
        tokenizer: the student's fast tokenizer.
        teacher_tokenizers: one fast tokenizer per *online* teacher (in the trainer's teacher order); offline
            teachers (record stores) need none.
        max_length: truncate every model's tokens to this many (None: no truncation).
        text_field: the column holding the raw text (``prompt`` + ``completion`` columns also work: only the
            completion is learnt, on every side).
        pad_to_multiple_of: pad the student's length to a multiple of this.
        packing: put the student's sequences one after another in a single row with ``position_ids`` restarting
            at 0 (padding-free, as TRL packs); the teachers keep one row per sequence.

    Returns dicts with the student's ``input_ids``, ``attention_mask``, ``labels`` (unshifted, ``-100`` where
    nothing is learnt) and ``offsets``; ``teachers``: a list with one such dict per online teacher; ``text``:
    the raw strings; ``index``: the examples' ``index`` column when present (record stores are read by it).
    """

    tokenizer: object
    teacher_tokenizers: Sequence[object] = ()
    max_length: Optional[int] = None
    text_field: str = "text"
    pad_to_multiple_of: Optional[int] = None
    packing: bool = False

    def __call__(self, features) -> dict:
        if not features:
            raise ValueError("FusionCollator got an empty list of examples")
        texts, starts = texts_and_starts(features, self.text_field)
        batch = tokenize(self.tokenizer, texts, starts, self.max_length, self.pad_to_multiple_of)
        if self.packing:
            batch = pack(batch)
        batch["teachers"] = [tokenize(tok, texts, starts, self.max_length) for tok in self.teacher_tokenizers]
        batch["text"] = texts
        if all("index" in feature for feature in features):
            batch["index"] = torch.tensor([int(feature["index"]) for feature in features], dtype=torch.long)
        return batch


def pack(batch: dict) -> dict:
    """A padded batch -> one row holding its sequences back to back, with ``position_ids`` restarting at 0."""
    present = batch["attention_mask"].bool()
    packed = {key: batch[key][present].unsqueeze(0) for key in ("input_ids", "labels", "offsets")}
    packed["attention_mask"] = torch.ones_like(packed["input_ids"])
    positions = torch.arange(present.shape[1]).expand_as(present)
    packed["position_ids"] = positions[present].unsqueeze(0)
    return packed


def sequences_of(x: torch.Tensor, view: Optional["SequenceView"], fill=0) -> torch.Tensor:
    """Shifted (B, T - 1, ...) values -> one row per sequence (S, L, ...) of ``view`` (:func:`sequence_view` of
    the unshifted grid), or ``x`` itself when no row is packed (``view`` None)."""
    if view is None:
        return x
    padded = torch.cat([x, torch.full_like(x[:, :1], fill)], dim=1)  # position T - 1 predicts nothing
    return view.gather(padded, fill)


def shifted_targets(labels: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T) unshifted labels -> (B, T - 1) targets aligned with ``logits[:, :-1]``: target t is label t + 1,
    and ``-100`` where position t + 1 starts a new packed sequence (``position_ids == 0``)."""
    targets = labels[:, 1:]
    if position_ids is not None:
        targets = targets.masked_fill(position_ids[:, 1:] == 0, IGNORE_INDEX)
    return targets


@dataclass
class SequenceView:
    """Where each sequence of a (possibly packed) batch lies: ``rows``/``columns`` (S, L) index the (B, T) grid
    (padding slots point at (0, 0) and are masked by ``inside``)."""

    rows: torch.Tensor
    columns: torch.Tensor
    inside: torch.Tensor

    def gather(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """(B, T, ...) -> (S, L, ...), ``fill`` outside the sequences."""
        picked = x[self.rows, self.columns]
        inside = self.inside.view(*self.inside.shape, *([1] * (picked.dim() - 2)))
        return torch.where(inside, picked, torch.as_tensor(fill, dtype=picked.dtype, device=picked.device))


def sequence_view(position_ids: Optional[torch.Tensor]) -> Optional[SequenceView]:
    """Split packed (B, T) rows at ``position_ids == 0`` (after column 0). Returns None when there are no
    ``position_ids`` or no row is packed (each row is one sequence), so unpacked batches pay nothing. Syncs with
    the host twice (where the sequences start, and the longest)."""
    if position_ids is None:
        return None
    starts = position_ids == 0
    starts[:, 0] = True
    (batch, length), device = position_ids.shape, position_ids.device
    first = starts.reshape(-1).nonzero()[:, 0]  # flat start of every sequence, in order
    if first.numel() == batch:
        return None
    lengths = torch.diff(first, append=first.new_tensor([batch * length]))
    width = int(lengths.max())
    slot = torch.arange(width, device=device)
    inside = slot < lengths.unsqueeze(-1)
    flat_index = torch.where(inside, first.unsqueeze(-1) + slot, 0)
    return SequenceView(flat_index // length, flat_index % length, inside)
