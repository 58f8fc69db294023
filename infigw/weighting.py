"""Weights of several teachers per sequence (GLD.md section 5).

``None``: uniform over the teachers that have valid positions in the sequence. A fixed sequence of S numbers:
used as given (a teacher with no valid position in a sequence gets 0 there). ``"uncertainty"`` (InfiFusion's
idea, formula ours): w_{s,b} = softmax_s(-H_{s,b} / tau_w) over the teachers present in sequence b, with
H_{s,b} the mean entropy of teacher s's top-k renormalised next-token distribution over b's valid positions.
Weights are always detached.
"""
from typing import Sequence, Union

import torch

from .teacher import TopKRecord

WeightSpec = Union[None, str, Sequence[float], torch.Tensor]


def topk_entropy(teacher, valid: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Mean over each sequence's valid positions of the entropy of softmax(top-k logits / T): (B,) f32.

    Args:
        teacher: dense logits (B, T', V_t) or a TopKRecord; valid: (B, T') bool.
    """
    with torch.no_grad():
        logits = teacher.values if isinstance(teacher, TopKRecord) else teacher
        top = torch.topk(logits.float(), k, dim=-1).values / temperature
        log_q = torch.log_softmax(top, dim=-1)
        entropy = -(log_q.exp() * log_q).sum(-1)
        entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
        return entropy.sum(-1) / valid.sum(-1).clamp_min(1)


def teacher_weights(spec: WeightSpec, included: torch.Tensor, entropy_fn=None, temperature: float = 1.0):
    """(S, G) detached weights for the per-teacher terms.

    Args:
        spec: None, "uncertainty", or S fixed weights.
        included: (S, G) bool, teacher s has valid positions in graph g (and so does the student).
        entropy_fn: called as ``entropy_fn()`` -> (S, G) mean top-k entropies; only for "uncertainty".
    """
    num_teachers = included.shape[0]
    present = included.float()
    if spec is None:
        return present / present.sum(0, keepdim=True).clamp_min(1)
    if isinstance(spec, str):
        if spec != "uncertainty":
            raise ValueError(f"teacher_weights must be None, 'uncertainty' or {num_teachers} numbers, got {spec!r}")
        scores = (-entropy_fn() / temperature).masked_fill(~included, float("-inf"))
        weights = torch.softmax(scores, dim=0)
        return torch.where(included, weights, torch.zeros_like(weights)).detach()
    fixed = torch.as_tensor(spec, dtype=torch.float32, device=included.device).detach()
    if fixed.dim() != 1 or fixed.numel() != num_teachers:
        raise ValueError(f"teacher_weights must hold one number per teacher ({num_teachers}), got shape {tuple(fixed.shape)}")
    if not torch.isfinite(fixed).all():
        raise ValueError("teacher_weights must be finite numbers")
    return fixed.unsqueeze(-1) * present
