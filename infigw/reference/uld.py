"""Token-level term: ULD (Boizard et al. 2024), the sorted-probability L1 of two distributions (docs/math.md §7).

The plain-torch definition of one pair of rows; the pairing of positions and the teacher weights are
orchestrated in :mod:`infigw.uld`.
"""
from typing import Optional

import torch

from ..contract import compute_dtype
from .closed_forms import pad_to, sorted_l1


def standardize(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """z-score over the last dimension (population std), in fp32 (fp64 for fp64 input)."""
    logits = logits.to(compute_dtype(logits.dtype))
    mean = logits.mean(-1, keepdim=True)
    std = logits.std(-1, keepdim=True, unbiased=False)
    return (logits - mean) / (std + eps)


def uld_probabilities(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                      standardized: bool = False) -> torch.Tensor:
    """(N, V) logits -> (N, V or top_k) probabilities: ``softmax(x / T)``, or with ``top_k=m`` the softmax of
    the top-m logits (z-scored over the m with ``standardized``). Only their sorted values matter to ULD."""
    logits = logits.to(compute_dtype(logits.dtype))
    if top_k is not None:
        logits = torch.topk(logits, top_k, dim=-1).values
        if standardized:
            logits = standardize(logits)
    return torch.softmax(logits / temperature, dim=-1)


def sort_descending(values: torch.Tensor) -> torch.Tensor:
    """Rows sorted in descending order; the gradient that reaches a rank is shared equally by the entries tied
    at its value.

    The tie rule of ULD's gradient (docs/math.md §7): the loss is not differentiable where entries of the student
    tie, and ``torch.sort`` would hand each rank's gradient to whichever tied entry it placed there. Sharing it
    equally is the mean of the gradients over every order of the tie (a subgradient) and depends on values only,
    so every backend computes the same one.
    """
    with torch.no_grad():
        ordered, order = values.sort(-1, descending=True)
        starts = ordered[..., 1:] != ordered[..., :-1]  # NaN never equals itself: each NaN is a group of its own
        group = torch.cat([torch.zeros_like(ordered[..., :1], dtype=torch.long), starts.long().cumsum(-1)], -1)
        sizes = torch.zeros_like(ordered).scatter_add(-1, group, torch.ones_like(ordered))
    gathered = values.gather(-1, order)
    means = (torch.zeros_like(gathered).scatter_add(-1, group, gathered) / sizes.clamp_min(1)).gather(-1, group)
    return ordered + (means - means.detach())  # the sorted values, with the tie-shared gradient


def padded_l1(p_sorted: torch.Tensor, q_sorted: torch.Tensor) -> torch.Tensor:
    """Row-wise ``sum_i |p_i - q_i|`` of two descending lists (N, Vp), (N, Vq), the shorter zero-padded."""
    width = max(p_sorted.shape[-1], q_sorted.shape[-1])
    return sorted_l1(pad_to(p_sorted, width), pad_to(q_sorted, width))


def sorted_prob_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """ULD of rows of two distributions (N, Vp), (N, Vq): ``sum_i |sort_desc(p)_i - sort_desc(q)_i|``.

    Differentiable in ``p`` with the tie rule of :func:`sort_descending`; ``q`` is a constant."""
    return padded_l1(sort_descending(p), q.detach().sort(-1, descending=True).values)


def uld_full(student: torch.Tensor, teacher: torch.Tensor, partner: torch.Tensor, temperature: float,
             teacher_probs: bool = False) -> torch.Tensor:
    """The op-level reference of full-vocabulary ULD: (N,) ULD of each student row with its partner teacher row.

    Args:
        student: (N, V) logits, differentiable. teacher: (M, V_t) logits (softmaxed at ``temperature``), or
            probabilities taken as given with ``teacher_probs``; never differentiated.
        partner: (N,) int64: the teacher row of each student row, -1 for none (loss 0, zero gradient).
    Returns:
        (N,) fp32 (fp64 for fp64 students).
    """
    paired = partner >= 0
    # unpaired rows are zeroed first: -inf/NaN padding there must not reach the gradient as 0 * NaN
    logits = torch.where(paired.unsqueeze(-1), student, torch.zeros((), dtype=student.dtype, device=student.device))
    p = uld_probabilities(logits, temperature)
    with torch.no_grad():
        rows = (teacher.detach()[partner.clamp_min(0)] if teacher.shape[0] else
                teacher.new_zeros((partner.shape[0], teacher.shape[-1])))
        q = rows.to(compute_dtype(rows.dtype)) if teacher_probs else uld_probabilities(rows, temperature)
    loss = sorted_prob_l1(p, q)
    return torch.where(paired, loss, torch.zeros_like(loss))
