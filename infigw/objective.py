"""The InfiGFusion objective ``(1 - lam) * CE + lam * sum_s w_s * (ULD_s + gamma * GLD_s)`` (docs/math.md §7):
its cross-entropy term and the combination of the three terms of one call."""
import torch

from . import functional, uld
from .checks import check_ids_in_range, check_number
from .contract import compute_dtype
from .inputs import CallInputs


def check_factors(lam, gamma) -> None:
    check_number(lam, "lam")
    check_number(gamma, "gamma")
    if lam > 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")


def token_cross_entropy(inputs: CallInputs, ignore_index: int) -> torch.Tensor:
    """(B, T) cross-entropy of the student on its labels, 0 at invalid positions (fp32 math)."""
    logits, valid, labels = inputs.student, inputs.valid, inputs.labels
    vocab = logits.shape[-1]
    check_ids_in_range(labels, valid, vocab,
                       f"labels must be in [0, {vocab}) (the student vocabulary) or ignore_index={ignore_index}")
    # masked rows are zeroed first so that -inf/NaN logits there (padding) give no NaN gradient
    rows = torch.where(valid.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    targets = torch.where(valid, labels, torch.zeros_like(labels))
    token_ce = torch.nn.functional.cross_entropy(rows.reshape(-1, vocab).to(compute_dtype(logits.dtype)),
                                                 targets.reshape(-1), reduction="none").view(valid.shape)
    return torch.where(valid, token_ce, torch.zeros_like(token_ce))


def infigfusion(inputs: CallInputs, *, lam: float, gamma: float, reduction: str, gld_options: dict,
                uld_options: dict, ignore_index: int):
    """The objective's value, its components and the token weights (None at sequence granularity).

    CE: mean over valid tokens ("mean"), per-sequence means ("none"), or the sum ("sum"). The distillation part
    is per sequence and reduced over the included sequences like :func:`infigw.functional.gld_loss`.
    """
    batch = inputs.valid.shape[0]
    num_teachers = len(inputs.teachers)
    zeros = inputs.student.new_zeros((num_teachers, batch), dtype=torch.float32)
    token_ce = token_cross_entropy(inputs, ignore_index) if lam != 1 else zeros.new_zeros(inputs.valid.shape)
    uld_terms, gld_terms, included = zeros, zeros, zeros.bool()
    weights, token_weights = zeros, None
    distill = zeros.new_zeros(batch)
    if lam != 0:
        per_position = uld.terms(inputs, **uld_options)
        uld_sum, uld_terms, included, weights, token_weights = uld.weighted(per_position, inputs)
        distill = uld_sum
        if gamma != 0:
            gld_terms, gld_included = functional.gld_terms(inputs, **gld_options)
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
