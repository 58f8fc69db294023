"""The fused pass: the student's per-row statistics (a :class:`~infigw.summary.TopKSummary`'s tensors, and the
full-vocabulary ULD terms) from its hidden states and head, one chunk of positions at a time, and their gradient
into the hidden states, weight and bias (accumulated in fp32; see :mod:`infigw.fused_linear`)."""
from typing import NamedTuple, Optional

import torch

from ..contract import compute_dtype
from .head import MIN_CHUNK_BYTES, LogitTransform, chunks, project_, row_statistics, vocab_tiles
from .teachers import FullULD


def _dense_gradient_(logits, transform: LogitTransform, temperature: float, *, lse=None, unit=None, kept=None,
                     gold=None, uld=None) -> torch.Tensor:
    """Overwrite a chunk's logits (c, V) with the gradient, with respect to the head's raw output, of
    ``sum(coefficient * quantity)`` over the per-row quantities the loss reads, one vocabulary tile at a time and
    in place where it can (the softmax of the cross-entropy's normaliser is taken in the logits' own storage).

    lse / unit: (coefficients (c,), values (c,)) of logsumexp(logits / T) and logsumexp(logits); kept / gold:
    (coefficients (c, m), ids (c, m)) of single logits; uld: (c, V) gradient of the ULD terms w.r.t. the logits.
    """
    for tile in vocab_tiles(logits.shape[-1]):
        chunk = logits[:, tile]
        # the transform's derivative and the temperature's softmax read the logits before they are overwritten
        derivative = transform.derivative(chunk) if transform.softcap is not None else None
        tempered = None
        if lse is not None:
            coefficient, value = lse
            tempered = torch.div(chunk, temperature).sub_(value.unsqueeze(-1)).exp_()
            tempered.mul_((coefficient / temperature).unsqueeze(-1))
        if unit is not None:
            coefficient, value = unit
            chunk.sub_(value.unsqueeze(-1)).exp_().mul_(coefficient.unsqueeze(-1))
        else:
            chunk.zero_()
        for part in (tempered, None if uld is None else uld[:, tile]):
            if part is not None:
                chunk.add_(part)
        for entries in (kept, gold):
            if entries is not None:
                coefficient, ids = entries
                inside = (ids >= tile.start) & (ids < tile.stop)
                chunk.scatter_add_(1, torch.where(inside, ids - tile.start, 0),
                                   torch.where(inside, coefficient, torch.zeros_like(coefficient)))
        if derivative is not None:
            chunk.mul_(derivative)
        elif transform.scale != 1:
            chunk.mul_(transform.scale)
    return logits


# ----------------------------------------------------------------------------------------------- the fused pass
class Fold(NamedTuple):
    """Coefficients of the loss's linear per-position terms, folded into the forward: of logsumexp(logits) (the
    cross-entropy's normaliser) and of the gold logit (N,), of the full-vocabulary ULD terms (S, N); or None."""

    unit: Optional[torch.Tensor]
    gold: Optional[torch.Tensor]
    uld: Optional[torch.Tensor]


class Plan(NamedTuple):
    """What the fused pass computes for the student."""

    valid: torch.Tensor  # (N,) bool
    k: int
    temperature: float
    gold: Optional[torch.Tensor]  # (N,) int64 label ids (0 at invalid rows), or None
    unit: bool  # also logsumexp(logits) at temperature 1 (the cross-entropy's, when temperature != 1)
    transform: LogitTransform
    rows: int  # positions per chunk
    uld_rows: int  # positions per block of the full-vocabulary ULD's autograd
    backend: str
    uld: Optional[FullULD]
    fold: Optional[Fold]


class _Gradients:
    """fp32 (fp64) accumulators of the gradients of the hidden states, weight and bias that are needed."""

    def __init__(self, hidden, weight, bias, needed):
        dtype = compute_dtype(weight.dtype)
        self.hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if needed[0] else None
        self.weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if needed[1] else None
        self.bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if needed[2] else None

    def add_dense(self, rows: slice, hidden, grad_raw, weight) -> None:
        """A chunk's gradient (c, V) with respect to ``hidden @ W^T + b``."""
        if self.hidden is not None:
            target = self.hidden[rows]
            if weight.dtype == target.dtype:
                target.addmm_(grad_raw, weight)
            elif weight.device.type == "cuda":
                torch.addmm(target, grad_raw.to(weight.dtype), weight, out_dtype=target.dtype, out=target)
            else:  # each position's row is written once: rounded like the logits path's bf16 product
                target += torch.mm(grad_raw.to(weight.dtype), weight)
        if self.weight is not None:
            if hidden.dtype == self.weight.dtype:
                self.weight.addmm_(grad_raw.t(), hidden)
            elif hidden.device.type == "cuda":
                torch.addmm(self.weight, grad_raw.t().to(hidden.dtype), hidden, out_dtype=self.weight.dtype,
                            out=self.weight)
            else:  # accumulated over chunks: in fp32
                self.weight.addmm_(grad_raw.t(), hidden.to(self.weight.dtype))
        if self.bias is not None:
            self.bias += grad_raw.sum(0)

    def add_sparse(self, rows: slice, hidden, columns, grad_raw, weight) -> None:
        """A chunk's gradient with respect to the raw outputs at ``columns`` (c, m): ``grad_raw`` (c, m)."""
        weight_rows = weight[columns].to(grad_raw.dtype)  # (c, m, H): the only rows of W this reads
        if self.hidden is not None:
            self.hidden[rows] += torch.einsum("cm,cmh->ch", grad_raw, weight_rows)
        flat = columns.reshape(-1)
        if self.weight is not None:
            outer = grad_raw.unsqueeze(-1) * hidden.to(grad_raw.dtype).unsqueeze(1)
            self.weight.index_add_(0, flat, outer.reshape(-1, hidden.shape[-1]))
        if self.bias is not None:
            self.bias.index_add_(0, flat, grad_raw.reshape(-1))

    def scale(self, factor: torch.Tensor) -> None:
        for grad in (self.hidden, self.weight, self.bias):
            if grad is not None:
                grad.mul_(factor)

    def result(self, hidden, weight, bias):
        return tuple(None if grad is None else grad.to(like.dtype)
                     for grad, like in ((self.hidden, hidden), (self.weight, weight), (self.bias, bias)))


def _chunk_input(hidden: torch.Tensor, valid: torch.Tensor, rows: slice) -> torch.Tensor:
    # invalid rows are zeroed first: NaN there (padding) must not reach the weight gradient as 0 * NaN
    return torch.where(valid[rows].unsqueeze(-1), hidden[rows], torch.zeros((), dtype=hidden.dtype,
                                                                            device=hidden.device))


def _block(entries, block: slice):
    """Rows ``block`` of (coefficients, values) entries for :func:`_dense_gradient_`, or None."""
    return None if entries is None else (entries[0][block], entries[1][block])


def _chunk_gradient_(logits, rows: slice, plan: Plan, *, lse=None, unit=None, kept=None, gold=None, uld=None):
    """Overwrite a chunk's logits (c, V) with the gradient, w.r.t. the head's raw output, of
    ``sum(coefficient * quantity)``: entries as in :func:`_dense_gradient_`, for the chunk's rows; ``uld``: (S, c)
    coefficients of the full-vocabulary ULD terms, differentiated by blocks of ``plan.uld_rows`` positions.
    Returns the chunk's ULD terms (S, c), or None without ``uld``."""
    terms = []
    for block in chunks(logits.shape[0], logits.shape[0] if uld is None else plan.uld_rows):
        uld_grad = None
        if uld is not None:
            block_terms, uld_grad = plan.uld.gradient(logits[block], _shifted(block, rows.start), uld[:, block])
            terms.append(block_terms)
        _dense_gradient_(logits[block], plan.transform, plan.temperature, lse=_block(lse, block),
                         unit=_block(unit, block), kept=_block(kept, block), gold=_block(gold, block), uld=uld_grad)
    return torch.cat(terms, dim=1) if terms else None


def _shifted(block: slice, offset: int) -> slice:
    return slice(block.start + offset, block.stop + offset)


def _uld_terms(logits, rows: slice, plan: Plan) -> torch.Tensor:
    """(S, c) full-vocabulary ULD terms of a chunk, by blocks of ``plan.uld_rows`` positions (no gradient)."""
    return torch.cat([plan.uld.terms(logits[block], _shifted(block, rows.start))
                      for block in chunks(logits.shape[0], plan.uld_rows)], dim=1)


class FusedSummary(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), bias (V,) or None) -> the student's per-row statistics, chunk by chunk:
    kept (N, k), ids (N, k), lse (N,), unit (N,) or empty, gold logit (N,) or empty, full-vocabulary ULD terms
    (S, N) or empty, and the value of the folded terms (a scalar, 0 without them)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: Plan):
        ctx.set_materialize_grads(False)
        fold = plan.fold if any(ctx.needs_input_grad[:3]) else None
        grads = None if fold is None else _Gradients(hidden, weight, bias, ctx.needs_input_grad[:3])
        dtype = compute_dtype(weight.dtype)
        buffer = torch.empty((min(plan.rows, hidden.shape[0]), weight.shape[0]), dtype=dtype, device=hidden.device)
        outputs = [[] for _ in range(6)]
        folded = hidden.new_zeros((), dtype=dtype)
        for rows in chunks(hidden.shape[0], plan.rows):
            chunk = _chunk_input(hidden, plan.valid, rows)
            logits = project_(buffer[:chunk.shape[0]], chunk, weight, bias, plan.transform)
            kept, ids, lse, unit = row_statistics(logits, plan.valid[rows], plan.k, plan.temperature, plan.unit,
                                                   plan.backend)
            gold_ids = None if plan.gold is None else plan.gold[rows].unsqueeze(-1)
            gold = None if gold_ids is None else logits.gather(-1, gold_ids).squeeze(-1) * plan.valid[rows]
            if fold is None:
                terms = None if plan.uld is None else _uld_terms(logits, rows, plan)
            else:  # the folded terms' gradient now, projected at once; the chunk's logits are overwritten
                normaliser = unit if plan.unit else lse
                terms = _chunk_gradient_(
                    logits, rows, plan, unit=None if fold.unit is None else (fold.unit[rows], normaliser),
                    gold=None if fold.gold is None else (fold.gold[rows].unsqueeze(-1), gold_ids),
                    uld=None if fold.uld is None else fold.uld[:, rows])
                for coefficient, value in ((fold.unit, normaliser), (fold.gold, gold), (fold.uld, terms)):
                    if coefficient is not None:
                        folded += (coefficient[..., rows] * value).sum()
                grads.add_dense(rows, chunk, logits, weight)
            for out, value in zip(outputs, (kept, ids, lse, unit, gold, terms)):
                if value is not None:
                    out.append(value)
        kept, ids, lse, unit, gold = (torch.cat(out) if out else folded.new_empty(0) for out in outputs[:5])
        terms = torch.cat(outputs[5], dim=1) if outputs[5] else folded.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, kept, ids, lse, unit, gold)
        ctx.plan, ctx.grads = plan, grads
        ctx.mark_non_differentiable(ids, *((unit, gold, terms) if fold is not None else ()))
        return kept, ids, lse, unit, gold, terms, folded

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kept, _grad_ids, grad_lse, grad_unit, grad_gold, grad_terms, grad_folded):
        hidden, weight, bias, kept, ids, lse, unit, gold = ctx.saved_tensors
        plan, grads, ctx.grads = ctx.plan, ctx.grads, None  # the folded gradients are scaled in place, once
        needed = ctx.needs_input_grad[:3]
        if plan.fold is not None and grads is None and grad_folded is not None and any(needed):
            raise RuntimeError("a fused-linear loss with folded terms can be backpropagated once: its forward "
                               "computed their gradient and the first backward consumed it (retain_graph=True "
                               "cannot replay it); compute the loss again")
        if grads is not None and grad_folded is not None:
            grads.scale(grad_folded)
        else:
            grads = _Gradients(hidden, weight, bias, needed)
        valid = plan.valid

        def at_valid(grad, row_mask):
            return None if grad is None else torch.where(row_mask, grad, torch.zeros_like(grad))
        grad_kept, grad_lse = at_valid(grad_kept, valid.unsqueeze(-1)), at_valid(grad_lse, valid)
        grad_unit, grad_gold = at_valid(grad_unit, valid), at_valid(grad_gold, valid)
        dense = grad_lse is not None or grad_unit is not None or grad_terms is not None
        sparse = grad_kept is not None or grad_gold is not None
        if not any(needed) or not (dense or sparse):
            return (*grads.result(hidden, weight, bias), None)
        gold_ids = None if plan.gold is None else plan.gold.unsqueeze(-1)
        if dense:  # recompute each chunk's logits

            def entries(coefficients, values, rows):
                return None if coefficients is None else (coefficients[rows], values[rows])
            buffer = torch.empty((min(plan.rows, hidden.shape[0]), weight.shape[0]), dtype=kept.dtype,
                                 device=hidden.device)
            for rows in chunks(hidden.shape[0], plan.rows):
                chunk = _chunk_input(hidden, valid, rows)
                logits = project_(buffer[:chunk.shape[0]], chunk, weight, bias, plan.transform)
                _chunk_gradient_(logits, rows, plan, lse=entries(grad_lse, lse, rows),
                                 unit=entries(grad_unit, unit, rows), kept=entries(grad_kept, ids, rows),
                                 gold=entries(None if grad_gold is None else grad_gold.unsqueeze(-1), gold_ids, rows),
                                 uld=None if grad_terms is None else grad_terms[:, rows])
                grads.add_dense(rows, chunk, logits, weight)
            return (*grads.result(hidden, weight, bias), None)
        # sparse: only the kept entries and the gold logit; their logits give the transform's derivative
        columns, grad_logits, logits = [], [], []
        if grad_kept is not None:
            columns.append(ids), grad_logits.append(grad_kept), logits.append(kept)
        if grad_gold is not None:
            columns.append(gold_ids), grad_logits.append(grad_gold.unsqueeze(-1)), logits.append(gold.unsqueeze(-1))
        columns, logits = torch.cat(columns, -1), torch.cat(logits, -1)
        grad_raw = torch.cat(grad_logits, -1) * plan.transform.derivative(logits)
        # (c, m, H) gathered rows of W and their outer products per chunk
        rows_per_chunk = max(1, MIN_CHUNK_BYTES // (12 * columns.shape[-1] * hidden.shape[-1]))
        for rows in chunks(hidden.shape[0], rows_per_chunk):
            grads.add_sparse(rows, _chunk_input(hidden, valid, rows), columns[rows], grad_raw[rows], weight)
        return (*grads.result(hidden, weight, bias), None)


