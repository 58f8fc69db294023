"""The student's top-k summary: one selection that feeds GLD's degrees, the top-k ULD and the cross-entropy.

:func:`summarize` reads the student logits once (the dispatched op ``topk_summary``) and returns a
:class:`TopKSummary`; everything after it works on O(B*T*k) numbers with autograd, and the op's backward writes
the logits' gradient once. A summary is also what producers that never hold B*T*V logits hand to the losses
(fused-linear chunks, vocabulary-parallel shards): like a :class:`~infigw.TopKRecord`, it offers
``kept(k, values, temperature)``, so GLD's degree stage treats both alike (docs/math.md §2, §3, §7).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from . import dispatch
from .contract import compute_dtype
from .reference import uld_probabilities
from .reference.select import log_values


@dataclass(frozen=True)
class TopKSummary:
    """Differentiable per-row statistics of student logits (B, T, V).

    values: (B, T, k) kept logits in rank order (value descending, ties to the smaller id); 0 on invalid rows.
    ids: (B, T, k) int64 vocabulary ids (unspecified on invalid rows).
    lse: (B, T) logsumexp(logits / temperature) over the full vocabulary.
    unit_lse: (B, T) logsumexp(logits), the cross-entropy's normaliser (``lse`` itself when temperature is 1).
    gold: (B, T) logit of the label, or None without labels.
    vocab_size: V. temperature: of ``lse``.
    """

    values: torch.Tensor
    ids: torch.Tensor
    lse: torch.Tensor
    unit_lse: torch.Tensor
    gold: Optional[torch.Tensor]
    vocab_size: int
    temperature: float

    def kept(self, k: int, values: str, temperature: float):
        """Node values (N, k), ids (N, k) and, for the probability values, their logs (N, k) (else None) of the
        top ``k`` <= the summary's k (docs/math.md §2)."""
        kept, ids = self.values[..., :k].reshape(-1, k), self.ids[..., :k].reshape(-1, k)
        logs = log_values(kept, values, temperature, self.lse.reshape(-1) if values == "probs" else None)
        return (kept.to(compute_dtype(kept.dtype)) if logs is None else logs.exp()), ids, logs

    def cross_entropy(self) -> torch.Tensor:
        """(B, T) ``logsumexp(x) - x[label]`` (meaningless at invalid positions)."""
        return self.unit_lse - self.gold

    def uld_probabilities(self, top_k: int, standardized: bool, temperature: float) -> torch.Tensor:
        """(B*T, top_k) the top-k ULD's student distribution (the top_k <= k kept logits)."""
        return uld_probabilities(self.values[..., :top_k].flatten(0, 1), temperature, top_k, standardized)


def summarize(logits: torch.Tensor, valid: torch.Tensor, k: int, temperature: float,
              labels: Optional[torch.Tensor] = None, backend: str = "auto") -> TopKSummary:
    """Summarize student logits (B, T, V) at the (B, T) valid positions: top-``k``, logsumexps, gold logits."""
    batch, length, vocab = logits.shape
    _, implementation = dispatch.resolve("topk_summary", backend, logits.device, k)
    gold = None if labels is None else torch.where(valid, labels, torch.zeros_like(labels)).reshape(-1)
    kept, ids, lse, unit, gold_logit = implementation(logits.reshape(-1, vocab), valid.reshape(-1), k, temperature,
                                                      gold, temperature != 1 and labels is not None)
    lse = lse.view(batch, length)
    return TopKSummary(kept.view(batch, length, k), ids.view(batch, length, k), lse,
                       unit.view(batch, length) if unit.numel() else lse,
                       None if labels is None else gold_logit.view(batch, length), vocab, temperature)
