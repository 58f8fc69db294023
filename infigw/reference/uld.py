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


def padded_l1(p_sorted: torch.Tensor, q_sorted: torch.Tensor) -> torch.Tensor:
    """Row-wise ``sum_i |p_i - q_i|`` of two descending lists (N, Vp), (N, Vq), the shorter zero-padded."""
    width = max(p_sorted.shape[-1], q_sorted.shape[-1])
    return sorted_l1(pad_to(p_sorted, width), pad_to(q_sorted, width))


def sorted_prob_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """ULD of rows of two distributions (N, Vp), (N, Vq): ``sum_i |sort_desc(p)_i - sort_desc(q)_i|``."""
    return padded_l1(p.sort(-1, descending=True).values, q.sort(-1, descending=True).values)
