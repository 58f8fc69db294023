"""Weights of several teachers, per sequence or per aligned position (docs/math.md §5 and §7).

Specs (``teacher_weights=``):

- ``None``: uniform over the teachers present (at the sequence, or at the position).
- S fixed numbers, each >= 0 and not all 0: used as given (a teacher absent from a sequence/position gets 0
  there). They weight losses, so a negative weight would reward distance from a teacher; merge weights
  (:mod:`infigw.merge`, task vectors) may be negative, loss weights may not.
- ``"uncertainty"`` (label-free) or ``"nll"`` (label-aware): InfiFusion's uncertainty-based source weights; the
  paper's formula was not available, so these are **ours**:
  ``w_s = softmax_s(-u_s / tau_w)`` over the present teachers, with ``u_s`` the teacher's per-position
  uncertainty (see :data:`MEASURES`):

  - ``"uncertainty"``: entropy of the teacher's top-k renormalised next-token distribution
    ``softmax(top-k logits / T)``;
  - ``"nll"``: ``-log p_s(gold)`` of the teacher's own gold next token (its ``teacher_labels``) under
    ``softmax(logits / T)`` (a TopKRecord: see :func:`position_nll`).

Granularity (``weight_granularity=``):

- ``"sequence"``: ``u_{s,b}`` = mean of ``u_s`` over teacher s's valid positions of sequence b; one weight per
  teacher and sequence (graph scope "batch": the mean of the per-sequence means over the sequences where the
  teacher has valid positions).
- ``"token"``: ``u_s`` is read at the aligned pairs (the i-th valid student position pairs with the i-th valid
  position of each teacher), the softmax runs over the teachers that have a pair at that student position.
  Where one weight per sequence is needed (GLD: one graph per sequence), the token weights are averaged over
  the sequence's covered student positions (those with at least one pair): the result still sums to 1 over the
  teachers, and a teacher that covers fewer positions (a shorter tokenisation) gets proportionally less.

Tokenizers of different granularity (ours): a per-token uncertainty grows with the characters a token covers, so
teachers that cut the same text into fewer, longer tokens would look less certain. Given each teacher's
per-position character counts (``teacher_chars``: the characters of the token each position predicts), the
uncertainty becomes per character: ``sum_t u_t / sum_t chars_t`` over a sequence, ``u_t / max(chars_t, 1)`` at a
position. The trainer (:mod:`infigw.train`) passes them from the tokenizers' character offsets.

Weights are always detached. New measures can be added to :data:`MEASURES` (same signature) and are then
accepted as ``teacher_weights`` names.
"""
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from .contract import compute_dtype
from .teacher import TopKRecord, teacher_logits_for_topk

WeightSpec = Union[None, str, Sequence[float], torch.Tensor]


def position_entropy(teacher, gold: Optional[torch.Tensor], k: int, temperature: float) -> torch.Tensor:
    """(B, T') entropy of ``softmax(top-k logits / T)`` at every teacher position (``gold`` unused).

    Args:
        teacher: dense logits (B, T', V_t) or a TopKRecord (its k_t kept logits; k is capped at k_t).
    """
    with torch.no_grad():
        logits = teacher_logits_for_topk(teacher)
        top = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values  # selection in the input dtype
        log_q = torch.log_softmax(top.to(compute_dtype(top.dtype)) / temperature, dim=-1)
        return torch.special.entr(log_q.exp()).sum(-1)  # 0 * log 0 = 0: -inf logits (vocab padding) are fine


def position_nll(teacher, gold: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """(B, T') ``-log p(gold)`` under the teacher's ``softmax(logits / T)`` (``k`` unused).

    Dense logits: exact, full vocabulary. TopKRecord: its kept log-probabilities (exact with a normaliser, else
    renormalised over the kept entries, see :mod:`infigw.teacher`). A gold token outside the kept ids has an
    unknown probability, bounded above by the smallest kept probability (the kept ids are the top k) and, with
    a normaliser, by the mass left outside the kept entries; its NLL is ``-log`` of that bound (ours: a lower
    bound on the true NLL, so such a teacher never looks more confident than when its least likely kept token
    is the gold one). Values at positions where ``gold`` is not a valid id are meaningless.
    """
    with torch.no_grad():
        gold = gold.long()
        if not isinstance(teacher, TopKRecord):
            scaled = teacher.to(compute_dtype(teacher.dtype)) / temperature
            picked = scaled.gather(-1, gold.clamp(0, scaled.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
            return torch.logsumexp(scaled, dim=-1) - picked
        log_p = teacher.log_probs(temperature)
        left = teacher.residual_mass(temperature).clamp_min(torch.finfo(log_p.dtype).tiny).log()
        bound = torch.minimum(log_p.min(-1).values, left) if teacher.has_normaliser() else log_p.min(-1).values
        hit = teacher.indices.long() == gold.unsqueeze(-1)
        found = torch.where(hit, log_p, torch.full_like(log_p, float("-inf"))).max(-1).values
        return -torch.where(hit.any(-1), found, bound)


class Measure(NamedTuple):
    """A per-position uncertainty ``fn(teacher, gold, k, temperature) -> (B, T')`` (higher = less trusted)."""
    fn: Callable
    needs_labels: bool


MEASURES = {
    "uncertainty": Measure(position_entropy, needs_labels=False),
    "nll": Measure(position_nll, needs_labels=True),
}


class WeightRule(NamedTuple):
    """A validated ``teacher_weights`` spec: uniform (both None), S fixed weights, or an uncertainty measure."""
    fixed: Optional[torch.Tensor]
    measure: Optional[Measure]


def resolve_rule(spec: WeightSpec, num_teachers: int) -> WeightRule:
    """Validate ``spec`` once per call (see the module docstring for the rules)."""
    expected = f"teacher_weights must be None, one of {tuple(MEASURES)} or {num_teachers} numbers, got {spec!r}"
    if spec is None:
        return WeightRule(None, None)
    if isinstance(spec, str):
        if spec not in MEASURES:
            raise ValueError(expected)
        return WeightRule(None, MEASURES[spec])
    try:
        fixed = torch.as_tensor(spec, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(expected) from error
    if fixed.dim() != 1 or fixed.numel() != num_teachers:
        raise ValueError(f"teacher_weights must hold one number per teacher ({num_teachers}), got shape "
                         f"{tuple(fixed.shape)}")
    if not torch.isfinite(fixed).all() or (fixed < 0).any() or not (fixed > 0).any():
        raise ValueError(f"teacher_weights must be finite numbers >= 0, not all 0 (they weight losses), got {spec!r}")
    return WeightRule(fixed.float(), None)


def sequence_mean(per_position: torch.Tensor, valid: torch.Tensor,
                  chars: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T') values, (B, T') bool -> (B,) mean over each sequence's valid positions (0 when none); with
    ``chars`` (B, T'), the sum over the valid positions per character they cover."""
    kept = torch.where(valid, per_position, torch.zeros_like(per_position))
    if chars is None:
        return kept.sum(-1) / valid.sum(-1).clamp_min(1)
    covered = torch.where(valid, chars.to(kept.dtype), torch.zeros_like(kept))
    return kept.sum(-1) / covered.sum(-1).clamp_min(1)


def at_partners(per_position: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """A teacher's (B, T') values read at each student position's partner (B, T) (flat teacher row, -1 for
    none) -> (B, T), 0 where there is no partner."""
    picked = per_position.reshape(-1)[partner.clamp_min(0)]
    return torch.where(partner >= 0, picked, torch.zeros_like(picked))


def pooled_weights(token_weights: torch.Tensor, present: torch.Tensor, scope: str = "sequence",
                   combine: Optional[Callable] = None) -> torch.Tensor:
    """(S, B, T) token weights -> (S, G) mean over the covered student positions of each graph. ``combine`` sums a
    batch-scope graph's totals over the ranks that share it (:mod:`infigw.distributed`)."""
    covered = present.any(0)
    if scope == "batch":
        totals = torch.cat([token_weights.sum((1, 2)), covered.sum().reshape(1).to(token_weights.dtype)])
        totals = totals if combine is None else combine(totals)
        return (totals[:-1] / totals[-1].clamp_min(1)).unsqueeze(-1)
    return token_weights.sum(-1) / covered.sum(-1).clamp_min(1)


def teacher_weights(rule: WeightRule, included: torch.Tensor, uncertainty_fn=None, temperature: float = 1.0):
    """(S, ...) detached weights, one per teacher and sequence (S, G) or aligned student position (S, B, T).

    Args:
        rule: from :func:`resolve_rule`.
        included: (S, ...) bool, the teacher is present there (and so is the student).
        uncertainty_fn: called as ``uncertainty_fn()`` -> (S, ...) uncertainties; only for a measure.
        temperature: tau_w of the softmax over teachers.
    """
    present = included.float()
    if rule.measure is not None:
        scores = -uncertainty_fn() / temperature
        # an infinite uncertainty (a gold token of probability 0) ranks last, yet a teacher present keeps a finite
        # score, so the softmax over present teachers never sees only -inf
        scores = torch.where(torch.isneginf(scores), torch.finfo(scores.dtype).min, scores)
        scores = scores.masked_fill(~included, float("-inf"))
        weights = torch.softmax(scores, dim=0)
        return torch.where(included, weights, torch.zeros_like(weights)).detach()
    if rule.fixed is None:
        return present / present.sum(0, keepdim=True).clamp_min(1)
    fixed = rule.fixed.to(included.device)
    return fixed.view(-1, *([1] * (included.dim() - 1))) * present


class TeacherWeighting:
    """The weight inputs of one loss call; computes (S, G) per-graph or (S, B, T) per-position weights.

    Args:
        rule: the validated spec. teachers / teacher_valids: the S teachers and their (B, T') valid positions.
        golds: each teacher's (B, T') gold next-token ids, or None (label-free measures).
        chars: each teacher's (B, T') character counts (uncertainties per character), or None each.
        k: top-k of the entropy measure. temperature: the loss temperature T of the teachers' softmax.
        weight_temperature: tau_w.
    """

    def __init__(self, rule: WeightRule, teachers, teacher_valids, golds, *, k: int, temperature: float,
                 weight_temperature: float, chars=None):
        self.rule = rule
        self.teachers, self.teacher_valids, self.golds = teachers, teacher_valids, golds
        self.chars = [None] * len(teachers) if chars is None else list(chars)
        self.k, self.temperature, self.weight_temperature = k, temperature, weight_temperature
        self._computed = None

    def _uncertainties(self):
        if self._computed is None:  # once per call, however many terms are weighted
            self._computed = [self.rule.measure.fn(teacher, gold, self.k, self.temperature)
                              for teacher, gold in zip(self.teachers, self.golds)]
        return self._computed

    def per_graph(self, included: torch.Tensor, scope: str = "sequence",
                  combine: Optional[Callable] = None) -> torch.Tensor:
        """(S, G) weights from the teachers' mean uncertainty over each sequence's valid positions; ``combine``
        as in :func:`pooled_weights`."""
        def uncertainty():
            per_sequence = torch.stack([sequence_mean(u, valid, chars) for u, valid, chars
                                        in zip(self._uncertainties(), self.teacher_valids, self.chars)])
            if scope == "batch":  # one graph: the mean over the sequences that have valid positions
                present = torch.stack([valid.any(-1) for valid in self.teacher_valids]).to(per_sequence.dtype)
                totals = torch.stack([(per_sequence * present).sum(-1), present.sum(-1)], -1)
                totals = totals if combine is None else combine(totals)
                return totals[:, :1] / totals[:, 1:].clamp_min(1)
            return per_sequence
        return teacher_weights(self.rule, included, uncertainty, self.weight_temperature)

    def graph_weights(self, included: torch.Tensor, scope: str, granularity: str, partners: Callable,
                      combine: Optional[Callable] = None):
        """(S, G) weights of per-graph terms, and the (S, B, T) token weights at token granularity (else None):
        a graph then uses the token weights averaged over its covered positions. ``partners()`` gives the
        (S, B, T) pairs (computed only when needed); ``combine`` as in :func:`pooled_weights`."""
        if granularity == "token":
            pairs = partners()
            token_weights = self.per_position(pairs)
            return pooled_weights(token_weights, pairs >= 0, scope, combine), token_weights
        return self.per_graph(included, scope, combine), None

    def per_position(self, partners: torch.Tensor) -> torch.Tensor:
        """(S, B, T) weights at the aligned student positions; ``partners`` (S, B, T) as :func:`at_partners`."""
        def uncertainty():
            per_char = [u if chars is None else u / chars.to(u.dtype).clamp_min(1)
                        for u, chars in zip(self._uncertainties(), self.chars)]
            return torch.stack([at_partners(u, partner) for u, partner in zip(per_char, partners)])
        return teacher_weights(self.rule, partners >= 0, uncertainty, self.weight_temperature)
