"""Stage 1 of GLD: keep the top-k entries of each row and turn them into node values a_p.

Contract (docs/math.md §2): the kept set of a row is its k largest entries; among equal values the smaller
vocabulary id wins; the kept entries are returned in *rank order* (value descending, then id ascending).
NaN ranks above every number (as in ``torch.topk``/``torch.sort``), so a NaN in a row is always kept.
"""
from typing import Optional

import torch

from ..contract import VALUES, compute_dtype


def select_topk(logits: torch.Tensor, k: int):
    """Top-k of the last dimension with the contract's tie rule.

    Args:
        logits: (..., V) floating tensor.
        k: 1 <= k <= V.
    Returns:
        values (..., k) in the input dtype and ids (..., k) int64, in rank order.
    """
    with torch.no_grad():
        # torch.topk returns the right multiset of values but may pick any of several tied ids at the
        # k-th value; the ids above the k-th value are unambiguous.
        top_values, top_ids = torch.topk(logits, k, dim=-1, sorted=True)
        kth = top_values[..., -1:]
        strictly_above = ~(top_values <= kth)  # NaN counts as above
        num_above = strictly_above.sum(-1, keepdim=True)
        # Among the entries equal to the k-th value keep the smallest ids: key = -id on ties, -inf elsewhere.
        vocab = logits.shape[-1]
        neg_ids = -torch.arange(vocab, device=logits.device, dtype=torch.float64 if vocab > 2**24 else torch.float32)
        tie_key = torch.where(logits == kth, neg_ids, torch.tensor(float("-inf"), dtype=neg_ids.dtype, device=logits.device))
        tie_ids = torch.topk(tie_key, k, dim=-1, sorted=True).indices  # ascending ids among the ties
        slot = torch.arange(k, device=logits.device)
        # Slots [0, num_above) take the ids above the threshold (they lead top_ids); the rest take ties.
        above_ids = torch.where(strictly_above, top_ids, torch.full_like(top_ids, vocab))
        above_ids = above_ids.sort(-1).values  # the num_above real ids first
        tie_slot = (slot - num_above).clamp_min(0)
        ids = torch.where(slot < num_above, above_ids, tie_ids.gather(-1, tie_slot))
        # A NaN k-th value (k or more NaNs) makes the tie pass meaningless: keep topk's ids.
        ids = torch.where(torch.isnan(kth), top_ids, ids)
        ids = rank_order(logits.gather(-1, ids), ids)
    return logits.gather(-1, ids), ids


def rank_order(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Reorder ``ids`` (..., k) by value descending (NaN first), then id ascending."""
    by_id = ids.sort(-1).values
    key = values.gather(-1, ids.argsort(-1)).float()
    # Where NaN lands in a sort differs between devices and dtypes (bf16 on CUDA puts it last): rank by
    # value with NaN as +inf, then move the NaNs to the front; both passes are stable, so ties keep id order.
    nan = torch.isnan(key)
    order = torch.sort(torch.where(nan, float("inf"), key), dim=-1, descending=True, stable=True).indices
    nan_first = torch.sort(nan.gather(-1, order).to(torch.int8), dim=-1, descending=True, stable=True).indices
    return by_id.gather(-1, order.gather(-1, nan_first))


def row_logsumexp(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logsumexp(logits / temperature) over the last dimension, in fp32 (fp64 for fp64 input)."""
    return torch.logsumexp(logits.to(compute_dtype(logits.dtype)) / temperature, dim=-1)


def log_values(kept: torch.Tensor, values: str, temperature: float = 1.0, row_lse=None):
    """log a_p of the probability values, ``kept / T - lse`` (..., k), in fp32 (fp64 for fp64 input); None for
    ``values="logits"``.

    ``probs``: ``lse`` is ``row_lse``, the full-row logsumexp of ``logits / T`` (required). ``topk_probs`` (ours):
    the logsumexp of the k kept entries. Every backend forms a_p = exp(log a_p) from this one expression.
    """
    if values not in VALUES:
        raise ValueError(f"values must be one of {tuple(VALUES)}, got {values!r}")
    if values == "logits":
        return None
    scaled = kept.to(compute_dtype(kept.dtype)) / temperature
    if values == "probs":
        if row_lse is None:
            raise ValueError("values='probs' needs the full-row logsumexp (row_lse)")
        return scaled - row_lse.unsqueeze(-1)
    return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)


def transform_values(kept: torch.Tensor, values: str, temperature: float = 1.0, row_lse=None) -> torch.Tensor:
    """Node values a_p from the kept entries (..., k), in fp32 (fp64 for fp64 input).

    ``logits``: the kept logits. ``probs``: ``exp(kept / T - row_lse)`` with ``row_lse`` the full-row
    logsumexp of ``logits / T`` (required). ``topk_probs`` (ours): softmax of ``kept / T`` over the k kept.
    """
    return values_from_logs(kept, log_values(kept, values, temperature, row_lse))


def values_from_logs(kept: torch.Tensor, logs: Optional[torch.Tensor]) -> torch.Tensor:
    """Node values from the kept logits and :func:`log_values`' logs: the logits in the compute dtype, or
    ``exp(logs)``."""
    return kept.to(compute_dtype(kept.dtype)) if logs is None else logs.exp()
