"""The token-level term: ULD (Boizard et al. 2024), the sorted-probability L1 between paired positions, and its
teacher weighting (docs/math.md §7).

Each student position is paired with at most one teacher position (:attr:`infigw.inputs.CallInputs.partners`);
per pair ``sum_i |sort_desc(P)_i - sort_desc(Q)_i|`` with the shorter distribution zero-padded. The student's
sorted distribution is computed once and shared by every teacher.
"""
from typing import Optional

import torch

from .checks import check_choice, check_k
from .inputs import CallInputs
from .summary import TopKSummary
from .reference import uld_probabilities
from .reference.uld import padded_l1
from .teacher import TopKRecord, kept_width, teacher_name
from .weighting import pooled_weights

RECORD_TAILS = ("zeros", "bucket")


def check_options(inputs: CallInputs, top_k: Optional[int], standardized: bool, record_tail: str) -> None:
    """ULD's own options against the call's student and teachers."""
    check_choice(record_tail, "record_tail", RECORD_TAILS)
    if top_k is None:
        if standardized:
            raise ValueError("standardize=True needs top_k (the z-score is taken over the top-k kept logits)")
        return
    check_k(top_k, inputs.vocab, "top_k", "student vocabulary")
    for i, teacher in enumerate(inputs.teachers):
        check_k(top_k, kept_width(teacher), "top_k", f"{teacher_name(i, len(inputs.teachers))} kept/vocabulary")


def _record_probabilities(record: TopKRecord, rows, temperature, top_k, standardized, tail: bool):
    """The record's distribution at the given flat rows: its kept probabilities (exact with a normaliser, the
    rest counted as 0, or with ``tail`` one more entry holding the mass outside the kept ones), or with
    ``top_k`` the softmax over its top-k kept logits."""
    if top_k is not None:
        return uld_probabilities(record.kept_logits().flatten(0, 1)[rows], temperature, top_k, standardized)
    probs = record.log_probs(temperature).exp().flatten(0, 1)[rows]
    if tail:
        probs = torch.cat([probs, record.residual_mass(temperature).flatten()[rows].unsqueeze(-1)], dim=-1)
    return probs


def terms(inputs: CallInputs, *, temperature: float, top_k: Optional[int], standardized: bool,
          record_tail: str = "zeros", student: Optional[TopKSummary] = None) -> torch.Tensor:
    """(S, B, T) ULD of each student position with its partner in teacher s (0 where it has none). The top-k
    form may take the student's :class:`~infigw.summary.TopKSummary` (its k >= top_k) instead of its logits."""
    partners = inputs.partners
    if student is not None and top_k is not None:
        p = student.uld_probabilities(top_k, standardized, temperature)
    else:
        paired = (partners >= 0).any(0).reshape(-1, 1)
        logits = inputs.student.reshape(-1, inputs.student.shape[-1])
        # rows without a partner are zeroed first: -inf/NaN padding there must not reach the gradient as 0 * NaN
        logits = torch.where(paired, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        p = uld_probabilities(logits, temperature, top_k, standardized)
    p_sorted = p.sort(-1, descending=True).values
    out = []
    for teacher, partner in zip(inputs.teachers, partners):
        rows = partner.reshape(-1).clamp_min(0)
        with torch.no_grad():
            if isinstance(teacher, TopKRecord):
                q = _record_probabilities(teacher, rows, temperature, top_k, standardized, record_tail == "bucket")
            else:
                q = uld_probabilities(teacher.detach().flatten(0, 1)[rows], temperature, top_k, standardized)
            q_sorted = q.sort(-1, descending=True).values
        term = padded_l1(p_sorted, q_sorted).view(partner.shape)
        out.append(torch.where(partner >= 0, term, torch.zeros_like(term)))
    return torch.stack(out)


def weighted(per_position: torch.Tensor, inputs: CallInputs):
    """Weighted ULD per sequence (B,), the per-teacher mean ULD (S, B), its inclusion (S, B), the (S, B) weights
    and the (S, B, T) token weights (None at sequence granularity).

    Sequence granularity: ``sum_s w_{s,b} * mean_i ULD_{s,b,i}``. Token granularity (ours):
    ``(1 / n_b) sum_t sum_s w_{s,b,t} ULD_{s,b,t}`` over the n_b student positions of b with at least one pair;
    the reported (S, B) weights ``(1 / n_b) sum_t w_{s,b,t}`` are the teachers' shares of that sum.
    """
    present = inputs.partners >= 0
    pairs = present.sum(-1)
    mean_terms = per_position.sum(-1) / pairs.clamp_min(1)
    included = pairs > 0
    if inputs.granularity == "token":
        token_weights = inputs.weighting.per_position(inputs.partners)
        covered = present.any(0).sum(-1).clamp_min(1)
        return ((token_weights * per_position).sum((0, 2)) / covered, mean_terms, included,
                pooled_weights(token_weights, present), token_weights)
    weights = inputs.weighting.per_graph(included)
    return (weights * mean_terms).sum(0), mean_terms, included, weights, None
