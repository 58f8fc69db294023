"""The InfiGFusion objective ``(1 - lam) * CE + lam * sum_s w_s * (ULD_s + gamma * GLD_s)`` (docs/math.md §7):
its cross-entropy term and the combination of the three terms of one call."""
from typing import Callable

import torch

from . import dispatch, functional, uld
from .checks import check_ids_in_range, check_number
from .inputs import CallInputs
from .summary import TopKSummary
from .teacher import check_records_serve


def check_factors(lam, gamma) -> None:
    check_number(lam, "lam")
    check_number(gamma, "gamma")
    if lam > 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")


def check_inputs(inputs: CallInputs, *, lam: float, gamma: float, values: str, uld_top_k, standardized: bool,
                 record_tail: str, temperature: float, ignore_index: int) -> None:
    """The objective's own checks: ULD's options, what record teachers must serve, the labels' range."""
    uld.check_options(inputs, uld_top_k, standardized, record_tail)
    graphs = lam != 0 and gamma != 0
    check_records_serve(inputs.teachers, values=values if graphs else None, temperature=temperature,
                        exact_probs=lam != 0 and (uld_top_k is None or (graphs and values == "probs")))
    _check_labels(inputs, ignore_index)


def _check_labels(inputs: CallInputs, ignore_index: int) -> None:
    """The cross-entropy's targets lie in the student vocabulary (a data check: one host sync)."""
    vocab = inputs.vocab
    check_ids_in_range(inputs.labels, inputs.valid, vocab,
                       f"labels must be in [0, {vocab}) (the student vocabulary) or ignore_index={ignore_index}")


def summary_k(lam: float, gamma: float, k: int, uld_top_k) -> int:
    """How many entries per row the student's summary keeps: GLD's k and the top-k ULD's, when they run."""
    return max(k if lam != 0 and gamma != 0 else 1, uld_top_k or 1)


def _summary_computes_uld(backend: str, device: torch.device) -> bool:
    """Whether the student's summary also computes the full-vocabulary ULD (op ``topk_summary_uld``): wherever
    it has a kernel, or where neither it nor ``uld_full`` has one; not where only ``uld_full`` has a kernel."""
    try:
        return (dispatch.resolve("topk_summary_uld", backend, device)[0] != "torch"
                or dispatch.resolve("uld_full", backend, device)[0] == "torch")
    except dispatch.BackendUnavailableError:
        return False


def student_pass(inputs: CallInputs, summarize: Callable, *, lam: float, gamma: float, k: int, uld_top_k,
                 standardized: bool, record_tail: str, temperature: float, backend: str):
    """The student's summary and the (S, B, T) ULD terms (None when ``lam`` is 0) from as few reads of its logits
    as the kernels allow: one read feeds the cross-entropy, GLD and the top-k ULD -- or the full-vocabulary ULD,
    which the summary then computes too, so that one backward writes the whole gradient.

    ``summarize(valid, k, temperature, labels, backend, uld)`` makes the summary (:func:`infigw.summary.summarize`
    of the dense logits, or the vocabulary-parallel merge of :mod:`infigw.distributed`)."""
    top_k = uld_top_k
    full_uld = (uld.full_vocabulary_teachers(inputs, temperature, record_tail)
                if lam != 0 and top_k is None and inputs.student is not None
                and _summary_computes_uld(backend, inputs.valid.device) else None)
    student = summarize(inputs.valid, summary_k(lam, gamma, k, top_k), temperature, inputs.labels, backend, full_uld)
    per_position = (uld.terms(inputs, temperature=temperature, top_k=top_k, standardized=standardized,
                              record_tail=record_tail, student=student, backend=backend) if lam != 0 else None)
    return student, per_position


def infigfusion(inputs: CallInputs, student: TopKSummary, uld_per_position, *, lam: float, gamma: float,
                reduction: str, gld_options: dict, denominators=None, graphs: bool = True):
    """The objective's value, its components and the token weights (None at sequence granularity).

    Args:
        student: the student's summary (its k >= :func:`summary_k`): the cross-entropy and GLD come from it.
        uld_per_position: the (S, B, T) ULD terms (:func:`infigw.uld.terms`), or None when ``lam`` is 0.
    CE: mean over valid tokens ("mean"), per-sequence means ("none"), or the sum ("sum"). The distillation part
    is per sequence and reduced over the included sequences like :func:`infigw.functional.gld_loss`.
    denominators: "mean"'s (tokens, sequences) from the local counts (default: those, at least 1); data-parallel
    calls count the whole batch (:meth:`infigw.distributed.Parallel.denominators`).
    graphs: False takes the GLD terms as 0 but still counts their sequences (the fused-linear pass probes the
    terms that are linear in the summary this way, :mod:`infigw.fused_linear.losses`).
    """
    batch = inputs.valid.shape[0]
    zeros = student.lse.new_zeros((len(inputs.teachers), batch))
    uld_terms, gld_terms, included = zeros, zeros, zeros.bool()
    weights, token_weights = zeros, None
    distill = zeros.new_zeros(batch)
    token_ce = torch.where(inputs.valid, student.cross_entropy(), torch.zeros_like(student.lse))
    if lam != 0:
        distill, uld_terms, included, weights, token_weights = uld.weighted(uld_per_position, inputs)
        if gamma != 0:
            if graphs:
                gld_terms, gld_included = functional.gld_terms(inputs, **gld_options, student=student)
                distill = distill + gamma * (weights * gld_terms).sum(0)
            else:  # a graph needs valid positions on both sides; ULD under offsets pairing needs a pair
                gld_included = torch.stack([inputs.valid.any(-1) & valid.any(-1) for valid in inputs.teacher_valids])
            included = included | gld_included
    tokens = inputs.valid.sum(-1)
    if reduction == "none":
        ce = token_ce.sum(-1) / tokens.clamp_min(1)
        loss = (1 - lam) * ce + lam * distill
    elif reduction == "sum":
        ce = token_ce.sum()
        loss = (1 - lam) * ce + lam * distill.sum()
    else:
        counts = tokens.sum(), included.any(0).sum()
        tokens, sequences = denominators(*counts) if denominators else (count.clamp_min(1) for count in counts)
        ce = token_ce.sum() / tokens
        loss = (1 - lam) * ce + lam * distill.sum() / sequences
    components = {"ce": ce.detach(), "uld": uld_terms.detach(), "gld": gld_terms.detach(), "weights": weights,
                  "included": included}
    return loss, components, token_weights
