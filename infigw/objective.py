"""The InfiGFusion objective ``(1 - lam) * CE + lam * sum_s w_s * (ULD_s + gamma * GLD_s)`` (docs/math.md §7):
its cross-entropy term and the combination of the three terms of one call."""
import torch

from . import functional, uld
from .checks import check_ids_in_range, check_number
from .inputs import CallInputs
from .summary import TopKSummary


def check_factors(lam, gamma) -> None:
    check_number(lam, "lam")
    check_number(gamma, "gamma")
    if lam > 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")


def check_labels(inputs: CallInputs, ignore_index: int) -> None:
    """The cross-entropy's targets lie in the student vocabulary (a data check: one host sync)."""
    vocab = inputs.vocab
    check_ids_in_range(inputs.labels, inputs.valid, vocab,
                       f"labels must be in [0, {vocab}) (the student vocabulary) or ignore_index={ignore_index}")


def summary_k(lam: float, gamma: float, k: int, uld_top_k) -> int:
    """How many entries per row the student's summary keeps: GLD's k and the top-k ULD's, when they run."""
    return max(k if lam != 0 and gamma != 0 else 1, uld_top_k or 1)


def infigfusion(inputs: CallInputs, student: TopKSummary, uld_per_position, *, lam: float, gamma: float,
                reduction: str, gld_options: dict, denominators=None):
    """The objective's value, its components and the token weights (None at sequence granularity).

    Args:
        student: the student's summary (its k >= :func:`summary_k`): the cross-entropy and GLD come from it.
        uld_per_position: the (S, B, T) ULD terms (:func:`infigw.uld.terms`), or None when ``lam`` is 0.
    CE: mean over valid tokens ("mean"), per-sequence means ("none"), or the sum ("sum"). The distillation part
    is per sequence and reduced over the included sequences like :func:`infigw.functional.gld_loss`.
    denominators: "mean"'s (tokens, sequences) from the local counts (default: those, at least 1); data-parallel
    calls count the whole batch (:meth:`infigw.distributed.Parallel.denominators`).
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
            gld_terms, gld_included = functional.gld_terms(inputs, **gld_options, student=student)
            included = included | gld_included  # the same sets: both need valid positions on both sides
            distill = distill + gamma * (weights * gld_terms).sum(0)
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
