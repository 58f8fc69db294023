"""The InfiGFusion objective ``(1 - lam) * CE + lam * sum_s w_s * (ULD_s + gamma * GLD_s)`` (docs/math.md §7):
its cross-entropy term and the combination of the three terms of one call."""
import torch

from . import dispatch, functional, uld
from .checks import check_ids_in_range, check_number
from .inputs import CallInputs
from .summary import summarize


def check_factors(lam, gamma) -> None:
    check_number(lam, "lam")
    check_number(gamma, "gamma")
    if lam > 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")


def check_labels(inputs: CallInputs, ignore_index: int) -> None:
    """The cross-entropy's targets lie in the student vocabulary (a data check: one host sync)."""
    vocab = inputs.student.shape[-1]
    check_ids_in_range(inputs.labels, inputs.valid, vocab,
                       f"labels must be in [0, {vocab}) (the student vocabulary) or ignore_index={ignore_index}")


def _summary_computes_uld(backend: str, device: torch.device) -> bool:
    """Whether the student's summary also computes the full-vocabulary ULD (op ``topk_summary_uld``): wherever
    it has a kernel, or where neither it nor ``uld_full`` has one; not where only ``uld_full`` has a kernel."""
    try:
        return (dispatch.resolve("topk_summary_uld", backend, device)[0] != "torch"
                or dispatch.resolve("uld_full", backend, device)[0] == "torch")
    except dispatch.BackendUnavailableError:
        return False


def infigfusion(inputs: CallInputs, *, lam: float, gamma: float, reduction: str, gld_options: dict,
                uld_options: dict, ignore_index: int):
    """The objective's value, its components and the token weights (None at sequence granularity).

    CE: mean over valid tokens ("mean"), per-sequence means ("none"), or the sum ("sum"). The distillation part
    is per sequence and reduced over the included sequences like :func:`infigw.functional.gld_loss`.
    """
    batch = inputs.valid.shape[0]
    zeros = inputs.student.new_zeros((len(inputs.teachers), batch), dtype=torch.float32)
    uld_terms, gld_terms, included = zeros, zeros, zeros.bool()
    weights, token_weights = zeros, None
    distill = zeros.new_zeros(batch)
    graphs, top_k = lam != 0 and gamma != 0, uld_options["top_k"]
    temperature, backend = gld_options["temperature"], gld_options["backend"]
    # one read of the student feeds the cross-entropy, GLD and the top-k ULD -- or the full-vocabulary ULD, which
    # the summary then computes too, so that one backward writes the whole gradient
    summary_k = max(gld_options["k"] if graphs else 1, top_k or 1)
    full_uld = (uld.full_vocabulary_teachers(inputs, temperature, uld_options["record_tail"])
                if lam != 0 and top_k is None and _summary_computes_uld(backend, inputs.student.device) else None)
    check_labels(inputs, ignore_index)
    student = summarize(inputs.student, inputs.valid, summary_k, temperature, inputs.labels, backend, full_uld)
    token_ce = torch.where(inputs.valid, student.cross_entropy(), torch.zeros_like(student.lse))
    if lam != 0:
        per_position = uld.terms(inputs, **uld_options, student=student, backend=backend)
        uld_sum, uld_terms, included, weights, token_weights = uld.weighted(per_position, inputs)
        distill = uld_sum
        if graphs:
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
        ce = token_ce.sum() / tokens.sum().clamp_min(1)
        loss = (1 - lam) * ce + lam * functional.reduce(distill, included.any(0), "mean")
    components = {"ce": ce.detach(), "uld": uld_terms.detach(), "gld": gld_terms.detach(), "weights": weights,
                  "included": included}
    return loss, components, token_weights
