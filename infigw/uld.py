"""The token-level term: ULD (Boizard et al. 2024), the sorted-probability L1 between paired positions, and its
teacher weighting (docs/math.md §7).

Each student position is paired with at most one teacher position (:attr:`infigw.inputs.CallInputs.partners`);
per pair ``sum_i |sort_desc(P)_i - sort_desc(Q)_i|`` with the shorter distribution zero-padded.

Full vocabulary: the dispatched op ``uld_full`` (kernels: an exact sorted L1 without sorting whole rows), or,
inside the InfiGFusion objective, the student's summary computes it in the same read of the logits
(``topk_summary_uld``). ``top_k=m``: the top-m logits of each side come from the summary op (of the student, and
of each dense teacher), and the rest is O(B*T*m) torch.
"""
from typing import Callable, Optional, Tuple

import torch

from . import dispatch
from .checks import check_choice, check_k
from .inputs import CallInputs
from .summary import TopKSummary, UldTeachers, summarize
from .reference import uld_probabilities
from .reference.uld import padded_l1, sort_descending
from .teacher import Teacher, TopKRecord, kept_width, teacher_name
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


def teacher_rows(teacher: Teacher, temperature: float, record_tail: str) -> Tuple[torch.Tensor, bool]:
    """A teacher as the rows of the full-vocabulary ULD, and whether they are probabilities: dense logits
    (B*T', V_t), or a record's kept probabilities (B*T', k_t) -- exact with a normaliser, else renormalised over
    the kept entries, the rest counted as 0 -- with ``record_tail="bucket"`` one more entry holding the mass
    outside the kept ones."""
    if not isinstance(teacher, TopKRecord):
        return teacher.detach().flatten(0, 1), False
    with torch.no_grad():
        probs = teacher.log_probs(temperature).exp()
        if record_tail == "bucket":
            probs = torch.cat([probs, teacher.residual_mass(temperature).unsqueeze(-1)], dim=-1)
    return probs.flatten(0, 1), True


def full_vocabulary_teachers(inputs: CallInputs, temperature: float, record_tail: str) -> UldTeachers:
    """Every teacher's rows and the partners, as the summary's fused full-vocabulary ULD takes them."""
    rows, probs = zip(*(teacher_rows(teacher, temperature, record_tail) for teacher in inputs.teachers))
    return UldTeachers(list(rows), list(probs), inputs.partners)


def _full_vocabulary_terms(inputs: CallInputs, temperature: float, record_tail: str, backend: str) -> torch.Tensor:
    student = inputs.student.reshape(-1, inputs.student.shape[-1])
    _, uld_full = dispatch.resolve("uld_full", backend, student.device)
    out = []
    for teacher, partner in zip(inputs.teachers, inputs.partners):
        rows, probs = teacher_rows(teacher, temperature, record_tail)
        out.append(uld_full(student, rows, partner.reshape(-1), temperature, probs).view(partner.shape))
    return torch.stack(out)


def _top_k_terms(inputs: CallInputs, temperature: float, top_k: int, standardized: bool,
                 student: Optional[TopKSummary], backend: str) -> torch.Tensor:
    partners = inputs.partners
    if student is None:
        student = summarize(inputs.student, (partners >= 0).any(0), top_k, temperature, backend=backend)
    p_sorted = sort_descending(student.uld_probabilities(top_k, standardized, temperature))
    out = []
    for teacher, teacher_valid, partner in zip(inputs.teachers, inputs.teacher_valids, partners):
        rows = partner.reshape(-1).clamp_min(0)
        with torch.no_grad():
            if isinstance(teacher, TopKRecord):
                kept = teacher.kept_logits()
            else:
                kept = summarize(teacher.detach(), teacher_valid, top_k, temperature, backend=backend).values
            q = uld_probabilities(kept.flatten(0, 1)[rows], temperature, top_k, standardized)
            q_sorted = q.sort(-1, descending=True).values
        term = padded_l1(p_sorted, q_sorted).view(partner.shape)
        out.append(torch.where(partner >= 0, term, torch.zeros_like(term)))
    return torch.stack(out)


def terms(inputs: CallInputs, *, temperature: float, top_k: Optional[int], standardized: bool,
          record_tail: str = "zeros", student: Optional[TopKSummary] = None, backend: str = "auto") -> torch.Tensor:
    """(S, B, T) ULD of each student position with its partner in teacher s (0 where it has none). The student
    may come as its :class:`~infigw.summary.TopKSummary`: its ``uld`` is the full-vocabulary term when it holds
    one, and its top-k (k >= top_k) feeds the top-k form."""
    if top_k is not None:
        return _top_k_terms(inputs, temperature, top_k, standardized, student, backend)
    if student is not None and student.uld is not None:
        return student.uld
    return _full_vocabulary_terms(inputs, temperature, record_tail, backend)


def reduced(per_position: torch.Tensor, inputs: CallInputs, reduce: Callable, reduction: str):
    """``uld_loss``'s value, components and token weights from the (S, B, T) terms; ``reduce(per_sequence,
    included, reduction)`` (:meth:`infigw.distributed.Parallel.reduce`)."""
    per_sequence, mean_terms, included, weights, token_weights = weighted(per_position, inputs)
    loss = reduce(per_sequence, included.any(0), reduction)
    return loss, {"uld": mean_terms.detach(), "weights": weights, "included": included}, token_weights


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
