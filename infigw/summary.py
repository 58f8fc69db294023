"""The student's top-k summary: one selection that feeds GLD's degrees, the top-k ULD and the cross-entropy.

:func:`summarize` reads the student logits once (the dispatched op ``topk_summary``) and returns a
:class:`TopKSummary`; everything after it works on O(B*T*k) numbers with autograd, and the op's backward writes
the logits' gradient once. A summary is also what producers that never hold B*T*V logits hand to the losses
(fused-linear chunks, vocabulary-parallel shards): like a :class:`~infigw.TopKRecord`, it offers
``kept(k, values, temperature)``, so GLD's degree stage treats both alike (docs/math.md §2, §3, §7).
"""
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch

from . import dispatch
from .reference import uld_probabilities
from .reference.select import log_values, values_from_logs


@dataclass(frozen=True)
class TopKSummary:
    """Differentiable per-row statistics of student logits (B, T, V).

    values: (B, T, k) kept logits in rank order (value descending, ties to the smaller id); 0 on invalid rows.
    ids: (B, T, k) int64 vocabulary ids (unspecified on invalid rows).
    lse: (B, T) logsumexp(logits / temperature) over the full vocabulary.
    unit_lse: (B, T) logsumexp(logits), the cross-entropy's normaliser (``lse`` itself when temperature is 1).
    gold: (B, T) logit of the label, or None without labels.
    vocab_size: V. temperature: of ``lse``.
    uld: (S, B, T) full-vocabulary ULD against each teacher, when :func:`summarize` was asked for it (else None).
    """

    values: torch.Tensor
    ids: torch.Tensor
    lse: torch.Tensor
    unit_lse: torch.Tensor
    gold: Optional[torch.Tensor]
    vocab_size: int
    temperature: float
    uld: Optional[torch.Tensor] = None

    def kept(self, k: int, values: str, temperature: float):
        """Node values (N, k), ids (N, k) and, for the probability values, their logs (N, k) (else None) of the
        top ``k`` <= the summary's k (docs/math.md §2)."""
        kept, ids = self.values[..., :k].reshape(-1, k), self.ids[..., :k].reshape(-1, k)
        logs = log_values(kept, values, temperature, self.lse.reshape(-1) if values == "probs" else None)
        return values_from_logs(kept, logs), ids, logs

    def cross_entropy(self) -> torch.Tensor:
        """(B, T) ``logsumexp(x) - x[label]`` (meaningless at invalid positions)."""
        return self.unit_lse - self.gold

    def uld_probabilities(self, top_k: int, standardized: bool, temperature: float) -> torch.Tensor:
        """(B*T, top_k) the top-k ULD's student distribution (the top_k <= k kept logits)."""
        return uld_probabilities(self.values[..., :top_k].flatten(0, 1), temperature, top_k, standardized)


class UldTeachers(NamedTuple):
    """The full-vocabulary ULD that :func:`summarize` computes in the same read of the student logits.

    rows: per teacher, its (M_s, W_s) rows: logits, or probabilities taken as given where ``probs[s]``.
    partners: (S, B, T) int64, the flat teacher row paired with each student position (-1 for none).
    """

    rows: List[torch.Tensor]
    probs: List[bool]
    partners: torch.Tensor


def summarize(logits: torch.Tensor, valid: torch.Tensor, k: int, temperature: float,
              labels: Optional[torch.Tensor] = None, backend: str = "auto",
              uld: Optional[UldTeachers] = None) -> TopKSummary:
    """Summarize student logits (B, T, V) at the (B, T) valid positions: top-``k``, logsumexps, gold logits and,
    with ``uld``, the full-vocabulary ULD at ``temperature`` against each teacher (dispatched op
    ``topk_summary_uld``: the kernels read each row once and write its gradient once)."""
    batch, length, vocab = logits.shape
    gold = None if labels is None else torch.where(valid, labels, torch.zeros_like(labels)).reshape(-1)
    args = (logits.reshape(-1, vocab), valid.reshape(-1), k, temperature, gold, temperature != 1 and labels is not None)
    terms = None
    if uld is None:
        _, implementation = dispatch.resolve("topk_summary", backend, logits.device, k)
        kept, ids, lse, unit, gold_logit = implementation(*args)
    else:
        _, implementation = dispatch.resolve("topk_summary_uld", backend, logits.device, k)
        kept, ids, lse, unit, gold_logit, terms = implementation(
            *args, uld.rows, uld.partners.reshape(len(uld.rows), -1), uld.probs)
        terms = terms.view(len(uld.rows), batch, length)
    lse = lse.view(batch, length)
    return TopKSummary(kept.view(batch, length, k), ids.view(batch, length, k), lse,
                       unit.view(batch, length) if unit.numel() else lse,
                       None if labels is None else gold_logit.view(batch, length), vocab, temperature, terms)
