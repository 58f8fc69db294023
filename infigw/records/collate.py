"""Turn the records of a batch's examples into one padded :class:`~infigw.TopKRecord` plus masks."""
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

from ..teacher import TopKRecord
from ..alignment import response_mask
from .store import Example


@dataclass(frozen=True)
class RecordBatch:
    """The teacher side of a batch, right-padded to T' record positions.

    Attributes:
        record: ``TopKRecord(values (B, T', k), indices (B, T', k), vocab_size, logsumexp (B, T'), temperature,
            kind)``; padded rows hold zeros (losses ignore them through ``valid``).
        valid: (B, T') bool, the stored rows (the teacher mask for the losses).
        labels: (B, T') int64 the token each row predicts, ``ignore_index`` on padding (usable as
            ``teacher_labels``).
        offsets: (B, T', 2) int64 the character spans of those target tokens, -1 on padding: what
            :func:`~infigw.records.offset_pairs` and :func:`~infigw.records.response_mask` take.
        response_start, response_end: (B,) int64 the response's character span per example (-1: not marked).
        examples: (B,) int64 the examples' source indices, in batch order.
    """

    record: TopKRecord
    valid: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    response_start: torch.Tensor
    response_end: torch.Tensor
    examples: torch.Tensor

    def response_mask(self) -> torch.Tensor:
        """(B, T') bool: valid rows whose target token overlaps the response (all valid rows where unmarked)."""
        return response_mask(self.offsets, self.response_start, self.response_end, self.valid)

    def to(self, device, non_blocking: bool = False) -> "RecordBatch":
        """The batch on ``device``."""
        def move(x):
            return x.to(device, non_blocking=non_blocking) if isinstance(x, torch.Tensor) else x

        record = TopKRecord(**{f.name: move(getattr(self.record, f.name)) for f in fields(TopKRecord)})
        return RecordBatch(record, *(move(getattr(self, f.name)) for f in fields(self)[1:]))


def collate(examples: Sequence[Example], *, pad_to: Optional[int] = None, index_dtype: torch.dtype = torch.int64,
            ignore_index: int = -100) -> RecordBatch:
    """Pad the records of ``examples`` (in the student batch's order) into a :class:`RecordBatch`.

    Args:
        examples: :class:`~infigw.records.Example` s of one store (``store[i]`` for the batch's example indices).
        pad_to: the number T' of record positions (default: the longest example's, at least 1); use the student's
            T when both sides share a tokenizer, so that row t of both sides predicts the same token.
        index_dtype: torch.int64 (default) or torch.int32 for the top-k ids.
        ignore_index: the label of padded rows.
    """
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError("examples must be a non-empty list of infigw.records.Example")
    for i, example in enumerate(examples):
        if not isinstance(example, Example):
            raise TypeError(f"examples[{i}] must be an infigw.records.Example, got {type(example).__name__}")
    metadata = examples[0].metadata
    for i, example in enumerate(examples[1:], 1):
        if example.metadata is not metadata and example.metadata != metadata:
            raise ValueError(f"examples[{i}] comes from another store than examples[0] (their metadata differ)")
    if index_dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index_dtype must be torch.int64 or torch.int32, got {index_dtype}")
    longest = max(example.num_positions for example in examples)
    if pad_to is None:
        pad_to = max(longest, 1)
    elif isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < max(longest, 1):
        raise ValueError(f"pad_to must be an int >= the longest example's {longest} record positions (and >= 1), "
                         f"got {pad_to!r}")
    batch, k = len(examples), metadata.k
    values = torch.zeros(batch, pad_to, k, dtype=examples[0].values.dtype)
    indices = torch.zeros(batch, pad_to, k, dtype=index_dtype)
    logsumexp = torch.zeros(batch, pad_to, dtype=torch.float32)
    valid = torch.zeros(batch, pad_to, dtype=torch.bool)
    labels = torch.full((batch, pad_to), ignore_index, dtype=torch.int64)
    offsets = torch.full((batch, pad_to, 2), -1, dtype=torch.int64)
    for row, example in enumerate(examples):
        n = example.num_positions
        values[row, :n] = example.values
        indices[row, :n] = example.indices.to(index_dtype)
        logsumexp[row, :n] = example.logsumexp
        valid[row, :n] = True
        labels[row, :n] = example.target_ids
        offsets[row, :n] = example.target_offsets

    def span(value):
        return -1 if value is None else value

    normaliser = logsumexp if metadata.kind == "logits" else None  # log-probabilities carry their own (0)
    record = TopKRecord(values, indices, metadata.vocab_size, normaliser, float(metadata.temperature), metadata.kind)
    return RecordBatch(record, valid, labels, offsets,
                       torch.tensor([span(e.response_start) for e in examples], dtype=torch.int64),
                       torch.tensor([span(e.response_end) for e in examples], dtype=torch.int64),
                       torch.tensor([e.index for e in examples], dtype=torch.int64))
