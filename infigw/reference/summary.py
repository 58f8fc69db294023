"""What the whole objective needs from each student row, in one read: the top-k logits and their ids, the row's
logsumexp at the loss temperature (and at temperature 1 for the cross-entropy) and the logit of the gold token
(docs/math.md §2 and §7). GLD's degrees, the top-k ULD and the cross-entropy are all functions of these few
numbers per row, so producers that never hold B*T*V logits (fused-linear chunks, vocabulary-parallel shards)
and the fused kernels all meet the losses here."""
from typing import Optional

import torch

from .select import row_logsumexp, select_topk
from .uld import uld_full


def topk_summary(logits: torch.Tensor, row_valid: torch.Tensor, k: int, temperature: float,
                 gold: Optional[torch.Tensor], unit_lse: bool):
    """The op-level reference (autograd through torch).

    Args:
        logits: (N, V) floating. row_valid: (N,) bool; invalid rows (padding) may hold anything.
        k: kept entries per row. temperature: of ``lse``. gold: (N,) int64 label ids or None.
        unit_lse: also return logsumexp(logits) (the cross-entropy's normaliser when temperature != 1).
    Returns:
        kept (N, k) logits in rank order (value descending, ties to the smaller id), ids (N, k) int64,
        lse (N,) = logsumexp(logits / temperature), unit (N,) = logsumexp(logits) (empty unless ``unit_lse``),
        gold_logit (N,) (empty without ``gold``); fp32 (fp64 for fp64 logits); zeros on invalid rows.
    """
    valid = row_valid.unsqueeze(-1)
    # invalid rows are zeroed before any math: -inf/NaN there (padding) must not reach the gradient as 0 * NaN
    logits = torch.where(valid, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    kept, ids = select_topk(logits, k)
    lse = row_logsumexp(logits, temperature)
    acc = lse.dtype
    unit = row_logsumexp(logits, 1.0) if unit_lse else lse.new_empty(0)
    picked = (logits.gather(-1, gold.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1).to(acc)
              if gold is not None else lse.new_empty(0))
    zero = torch.zeros((), dtype=acc, device=logits.device)
    return (torch.where(valid, kept.to(acc), zero), ids, torch.where(row_valid, lse, zero),
            torch.where(row_valid, unit, zero) if unit_lse else unit,
            torch.where(row_valid, picked, zero) if gold is not None else picked)


def topk_summary_uld(logits: torch.Tensor, row_valid: torch.Tensor, k: int, temperature: float,
                     gold: Optional[torch.Tensor], unit_lse: bool, teachers, partners: torch.Tensor, teacher_probs):
    """:func:`topk_summary` and, in the same call, the full-vocabulary ULD of the student against each teacher.

    Args (besides those of :func:`topk_summary`):
        teachers: S teacher tensors (M_s, V_s): logits, or probabilities where ``teacher_probs[s]``.
        partners: (S, N) int64: the teacher row of each student row, -1 for none; -1 on invalid rows.
    Returns:
        the five outputs of :func:`topk_summary` and uld (S, N) (0 where a row has no partner), as
        :func:`infigw.reference.uld.uld_full` computes it at ``temperature``.
    """
    outputs = topk_summary(logits, row_valid, k, temperature, gold, unit_lse)
    terms = [uld_full(logits, teacher, partner, temperature, probs)
             for teacher, partner, probs in zip(teachers, partners, teacher_probs)]
    uld = torch.stack(terms) if terms else outputs[2].new_zeros((0, logits.shape[0]))
    return (*outputs, uld)
