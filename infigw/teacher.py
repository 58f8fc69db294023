"""Teacher inputs: dense logits, or the sparse top-k record in which teacher outputs are stored offline."""
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .checks import check_k, check_logits
from .reference import row_logsumexp, select_topk


@dataclass(frozen=True)
class TopKRecord:
    """A teacher's stored top-k outputs.

    Attributes:
        values: (B, T', k_t) floating: the teacher's top-k logits (any order).
        indices: (B, T', k_t) integer: their vocabulary ids, each in [0, vocab_size).
        vocab_size: size V_t of the teacher's vocabulary.
        logsumexp: optional (B, T') floating: logsumexp over the *full* vocabulary of logits / ``temperature``.
            With it, probability-valued nodes are exact probabilities; without it, probabilities are renormalised
            over the k_t stored entries.
        temperature: the temperature the logsumexp was taken at; a loss at another temperature rejects the record.
        kind: what ``values`` hold: ``"logits"`` (raw logits) or ``"logprobs"`` (log-probabilities over the full
            vocabulary, as vLLM and DistillKit store them).
    """

    values: torch.Tensor
    indices: torch.Tensor
    vocab_size: int
    logsumexp: Optional[torch.Tensor] = None
    temperature: float = 1.0
    kind: str = "logits"

    @property
    def shape(self):
        return self.values.shape

    @property
    def device(self):
        return self.values.device

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float = 1.0, with_logsumexp: bool = True):
        """Record the top-k of dense teacher logits (B, T', V_t) with the contract's tie rule, e.g. to store them
        offline; ``with_logsumexp`` also stores logsumexp(logits / temperature)."""
        check_logits(logits, "logits")
        check_k(k, logits.shape[-1], "k", "teacher vocabulary")
        with torch.no_grad():
            values, indices = select_topk(logits, k)
            lse = row_logsumexp(logits, temperature) if with_logsumexp else None
        return cls(values, indices, logits.shape[-1], lse, float(temperature))


Teacher = Union[torch.Tensor, TopKRecord]
Teachers = Union[Teacher, Sequence[Teacher]]


def as_teacher_list(teacher: Teachers, name: str = "teacher_logits"):
    """One teacher or a sequence of teachers -> list of teachers (at least one)."""
    if isinstance(teacher, (torch.Tensor, TopKRecord)):
        return [teacher]
    if isinstance(teacher, (list, tuple)) and teacher:
        for i, item in enumerate(teacher):
            if not isinstance(item, (torch.Tensor, TopKRecord)):
                raise TypeError(f"{name}[{i}] must be a tensor or infigw.TopKRecord, got {type(item).__name__}")
        return list(teacher)
    raise TypeError(
        f"{name} must be a tensor (B, T', V_t), an infigw.TopKRecord or a non-empty list of those, "
        f"got {type(teacher).__name__}"
    )
