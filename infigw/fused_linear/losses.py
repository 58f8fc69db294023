"""The fused-linear losses' orchestration and public functions: resolve the call's inputs as the logits path does,
run the fused pass for the student's summary, then the logits path's own code after it."""
from typing import NamedTuple, Optional

import torch

from .. import distributed, functional, objective, uld
from ..checks import check_choice, check_count, check_optional_count
from ..contract import REDUCTIONS, compute_dtype
from ..inputs import CallInputs, StudentSpec, resolve
from ..summary import TopKSummary
from ..teacher import check_records_serve
from ..weighting import resolve_rule
from .head import Head, chunk_rows, validated_head
from .summary_pass import Fold, FusedSummary, Plan
from .teachers import FullULD, Teachers


class _Student(NamedTuple):
    """The fused pass's options for one call (besides what the call's inputs say)."""

    head: Head
    k: int
    temperature: float
    backend: str
    chunk_size: Optional[int]


def _linear_coefficients(finish, inputs: CallInputs, vocab: int, temperature: float, ce: bool, full_uld: bool,
                         dtype: torch.dtype):
    """The loss's gradient with respect to the per-position logsumexp and gold logit of the cross-entropy and the
    ULD terms. The loss is linear in them (the teacher weights are detached and the reductions are sums), so that
    gradient, taken at zero through ``finish`` itself, is the coefficient each is folded with."""
    batch, length = inputs.valid.shape
    zeros = torch.zeros((batch, length), dtype=dtype, device=inputs.valid.device)
    with torch.enable_grad():
        unit, gold = zeros.clone().requires_grad_(ce), zeros.clone().requires_grad_(ce)
        terms = zeros.expand(len(inputs.teachers), batch, length).clone().requires_grad_(full_uld)
        probe = TopKSummary(zeros.unsqueeze(-1), zeros.long().unsqueeze(-1), zeros, unit, gold, vocab, temperature)
        loss = finish(probe, terms, graphs=False)[0]
        leaves = [leaf for leaf in (unit, gold, terms) if leaf.requires_grad]
        grads = iter(torch.autograd.grad(loss, leaves, allow_unused=True))
    flat = [next(grads) if leaf.requires_grad else None for leaf in (unit, gold, terms)]
    flat = [None if grad is None else grad.reshape(*grad.shape[:-2], -1) for grad in flat]
    return Fold(*flat)


def _student_pass(student: _Student, inputs: CallInputs, finish, *, ce: bool = False, ce_grad: bool = False,
                  lse_grad: bool = False, full_uld: Optional[FullULD] = None, reduction: str = "mean"):
    """The student's summary (and full-vocabulary ULD terms) through the fused pass, then ``finish(summary,
    per_position)``, the logits path's own tail; returns its ``(loss, components, token_weights)``.

    ``ce``: the loss reads the cross-entropy (``ce_grad``: with a nonzero factor); ``lse_grad``: it differentiates
    the summary's logsumexp (``values="probs"``)."""
    head = student.head
    batch, length, vocab = head.shape
    linear_terms = ce_grad or full_uld is not None
    # folding pays unless the backward recomputes the chunks anyway (values="probs" without a full-vocabulary ULD)
    fold = None
    if reduction != "none" and linear_terms and not (lse_grad and full_uld is None):
        fold = _linear_coefficients(finish, inputs, vocab, student.temperature, ce_grad, full_uld is not None,
                                    compute_dtype(head.weight.dtype))
    gold = torch.where(inputs.valid, inputs.labels, torch.zeros_like(inputs.labels)).reshape(-1) if ce else None
    rows, uld_rows = chunk_rows(student.chunk_size, batch * length, vocab, head.weight.element_size())
    plan = Plan(inputs.valid.reshape(-1), student.k, student.temperature, gold, ce and student.temperature != 1,
                head.transform, rows, uld_rows, student.backend, full_uld, fold)
    kept, ids, lse, unit, gold_logit, terms, folded = FusedSummary.apply(head.hidden, head.weight, head.bias, plan)
    lse = lse.view(batch, length)
    unit = unit.view(batch, length) if plan.unit else lse
    if fold is not None or not ce_grad:  # the cross-entropy's gradient is folded, or zero
        unit, gold_logit = unit.detach(), gold_logit.detach()
    summary = TopKSummary(kept.view(batch, length, student.k), ids.view(batch, length, student.k), lse, unit,
                          gold_logit.view(batch, length) if ce else None, vocab, student.temperature)
    per_position = None if full_uld is None else terms.view(-1, batch, length)
    loss, components, token_weights = finish(summary, per_position)
    if fold is not None:  # adds 0, and the folded terms' gradient
        loss = loss + (folded - folded.detach())
    return loss, components, token_weights


def _prepare(student_hidden, lm_head_weight, lm_head_bias, logit_scale, logit_softcapping, teacher_logits, *,
             required: int, keep: int, temperature: float, teacher_weights, backend: str,
             chunk_size: Optional[int], vocab_parallel_group):
    """The student's head (a vocabulary-parallel one gathered whole) and the call's teachers (head teachers
    summarised into records)."""
    check_optional_count(chunk_size, "chunk_size")
    head = validated_head(student_hidden, lm_head_weight, lm_head_bias, logit_scale, logit_softcapping,
                          ("student_hidden", "lm_head_weight", "lm_head_bias"), vocab_group=vocab_parallel_group)
    num_teachers = len(teacher_logits) if isinstance(teacher_logits, (list, tuple)) else 1
    rule = resolve_rule(teacher_weights, max(num_teachers, 1))
    gold_slot = rule.measure is not None and rule.measure.needs_labels
    return head, Teachers(teacher_logits, head, required, keep, temperature, backend, chunk_size, gold_slot)


def _resolved(head: Head, teachers: Teachers, labels, **options) -> CallInputs:
    inputs = resolve(StudentSpec(head.shape, head.hidden.device), teachers.resolvable, labels, **options)
    teachers.add_golds(inputs)
    return inputs


# ----------------------------------------------------------------------------------------------- public losses
def fused_linear_gld_loss(student_hidden, lm_head_weight, teacher_logits, labels=None, *, lm_head_bias=None,
                          logit_scale: float = 1.0, logit_softcapping: Optional[float] = None, mask=None,
                          teacher_labels=None, teacher_mask=None, teacher_chars=None, ignore_index: int = -100,
                          k: int = 10, values: str = "topk_probs", nodes: str = "rank", graph_norm: str = "mean",
                          scope: str = "sequence", num_nodes: Optional[int] = None, distance: str = "mean_l1",
                          temperature: float = 1.0, reduction: str = "mean", teacher_weights=None,
                          weight_temperature: float = 1.0, weight_granularity: str = "sequence",
                          deterministic: bool = False, backend: str = "auto", chunk_size: Optional[int] = None,
                          return_components: bool = False, vocab_parallel_group=None, data_parallel_group=None,
                          num_items_in_batch=None):
    """:func:`infigw.functional.gld_loss` of the student logits ``transform(student_hidden @ lm_head_weight^T +
    lm_head_bias)``, never formed (:mod:`infigw.fused_linear`).

    Args:
        student_hidden: (B, T, H) the student's final hidden states (after its final norm), differentiable.
        lm_head_weight: (V, H) its LM head (tied embeddings too; an FSDP2 DTensor is gathered once per call);
            lm_head_bias: (V,) or None. Both differentiable.
        teacher_logits: dense (B, T', V_t) logits, a TopKRecord, a :class:`TeacherHead`, or a list of those.
        logit_scale, logit_softcapping: the student's logit post-processing (:func:`logit_settings` reads them
            from a transformers model): ``logits = tanh(raw * logit_scale / c) * c`` with c = logit_softcapping.
        chunk_size: positions per chunk (default: as many as the memory budget of docs/fused_linear.md holds).
        vocab_parallel_group: rank r holds the rows ``[r * V_r, (r + 1) * V_r)`` of the head; every rank gathers
            it whole once per call (docs/fused_linear.md). The other arguments are
            :func:`~infigw.functional.gld_loss`'s.
    """
    functional.check_graph_options(values, nodes, graph_norm, scope, num_nodes, distance)
    check_choice(reduction, "reduction", REDUCTIONS)
    parallel = distributed.Parallel(None, data_parallel_group, num_items_in_batch, reduction, scope)
    head, teachers = _prepare(student_hidden, lm_head_weight, lm_head_bias, logit_scale, logit_softcapping,
                              teacher_logits, required=k, keep=k, temperature=temperature,
                              teacher_weights=teacher_weights, backend=backend, chunk_size=chunk_size,
                              vocab_parallel_group=vocab_parallel_group)
    inputs = _resolved(head, teachers, labels, mask=mask, teacher_labels=teacher_labels, teacher_mask=teacher_mask,
                       teacher_chars=teacher_chars, ignore_index=ignore_index, k=k, temperature=temperature,
                       teacher_weights=teacher_weights, weight_temperature=weight_temperature,
                       weight_granularity=weight_granularity)
    check_records_serve(inputs.teachers, values=values, exact_probs=values == "probs", temperature=temperature)

    def finish(summary, _per_position, graphs=True):
        return functional.gld_result(inputs, parallel, summary, reduction=reduction, k=k, values=values, nodes=nodes,
                                     graph_norm=graph_norm, scope=scope, num_nodes=num_nodes, distance=distance,
                                     temperature=temperature, deterministic=deterministic, backend=backend)

    student = _Student(head, k, temperature, backend, chunk_size)
    loss, components, token_weights = _student_pass(student, inputs, finish, lse_grad=values == "probs",
                                                    reduction=reduction)
    return functional._with_components(loss, components, token_weights, return_components)


def fused_linear_uld_loss(student_hidden, lm_head_weight, teacher_logits, labels=None, *, lm_head_bias=None,
                          logit_scale: float = 1.0, logit_softcapping: Optional[float] = None, mask=None,
                          teacher_labels=None, teacher_mask=None, teacher_chars=None, ignore_index: int = -100,
                          temperature: float = 1.0, top_k: Optional[int] = None, standardize: bool = False,
                          record_tail: str = "zeros", pairing: str = "index", student_offsets=None,
                          teacher_offsets=None, reduction: str = "mean", teacher_weights=None,
                          weight_temperature: float = 1.0, weight_k: int = 10, weight_granularity: str = "sequence",
                          backend: str = "auto", chunk_size: Optional[int] = None, return_components: bool = False,
                          vocab_parallel_group=None, data_parallel_group=None, num_items_in_batch=None):
    """:func:`infigw.functional.uld_loss` from the student's hidden states and head (arguments as in
    :func:`fused_linear_gld_loss`). The full-vocabulary form runs the ``uld_full`` op on each chunk's rows; a head
    teacher's paired rows are projected per block of positions."""
    check_choice(reduction, "reduction", REDUCTIONS)
    check_count(weight_k, "weight_k")
    parallel = distributed.Parallel(None, data_parallel_group, num_items_in_batch, reduction)
    head, teachers = _prepare(student_hidden, lm_head_weight, lm_head_bias, logit_scale, logit_softcapping,
                              teacher_logits, required=top_k or 1, keep=max(top_k or 1, weight_k),
                              temperature=temperature, teacher_weights=teacher_weights, backend=backend,
                              chunk_size=chunk_size, vocab_parallel_group=vocab_parallel_group)
    inputs = _resolved(head, teachers, labels, mask=mask, teacher_labels=teacher_labels, teacher_mask=teacher_mask,
                       teacher_chars=teacher_chars, ignore_index=ignore_index, temperature=temperature,
                       teacher_weights=teacher_weights, weight_temperature=weight_temperature,
                       weight_granularity=weight_granularity, weight_k=weight_k, pairing=pairing,
                       student_offsets=student_offsets, teacher_offsets=teacher_offsets)
    uld.check_options(inputs, top_k, standardize, record_tail)
    check_records_serve(inputs.teachers, exact_probs=top_k is None, temperature=temperature)

    def finish(summary, per_position, graphs=True):
        if per_position is None:  # the top-k form reads the student's summary
            per_position = uld.terms(inputs, temperature=temperature, top_k=top_k, standardized=standardize,
                                     record_tail=record_tail, student=summary, backend=backend)
        return uld.reduced(per_position, inputs, parallel.reduce, reduction)

    full = None if top_k is not None else teachers.full_uld(inputs, temperature, record_tail, backend)
    student = _Student(head, top_k or 1, temperature, backend, chunk_size)
    loss, components, token_weights = _student_pass(student, inputs, finish, full_uld=full, reduction=reduction)
    return functional._with_components(loss, components, token_weights, return_components)


def fused_linear_infigfusion_loss(student_hidden, lm_head_weight, teacher_logits, labels, *, lm_head_bias=None,
                                  logit_scale: float = 1.0, logit_softcapping: Optional[float] = None,
                                  teacher_labels=None, teacher_mask=None, teacher_chars=None,
                                  ignore_index: int = -100, lam: float = 0.5, gamma: float = 1.0, k: int = 10,
                                  values: str = "topk_probs", nodes: str = "rank", graph_norm: str = "mean",
                                  num_nodes: Optional[int] = None, distance: str = "mean_l1",
                                  temperature: float = 1.0, uld_top_k: Optional[int] = None,
                                  standardize: bool = False, record_tail: str = "zeros", pairing: str = "index",
                                  student_offsets=None, teacher_offsets=None, teacher_weights=None,
                                  weight_temperature: float = 1.0, weight_granularity: str = "sequence",
                                  reduction: str = "mean", deterministic: bool = False, backend: str = "auto",
                                  chunk_size: Optional[int] = None, return_components: bool = False,
                                  vocab_parallel_group=None, data_parallel_group=None, num_items_in_batch=None):
    """:func:`infigw.functional.infigfusion_loss` from the student's hidden states and head (arguments as in
    :func:`fused_linear_gld_loss`): the cross-entropy, GLD and the top-k ULD read one fused summary; the
    full-vocabulary ULD is computed chunk by chunk."""
    if labels is None:
        raise ValueError("labels (B, T) are required: they define the cross-entropy target and the valid positions")
    functional.check_graph_options(values, nodes, graph_norm, "sequence", num_nodes, distance)
    check_choice(reduction, "reduction", REDUCTIONS)
    objective.check_factors(lam, gamma)
    parallel = distributed.Parallel(None, data_parallel_group, num_items_in_batch, reduction, both_counts=True)
    head, teachers = _prepare(student_hidden, lm_head_weight, lm_head_bias, logit_scale, logit_softcapping,
                              teacher_logits, required=max(k, uld_top_k or 1), keep=max(k, uld_top_k or 1),
                              temperature=temperature, teacher_weights=teacher_weights, backend=backend,
                              chunk_size=chunk_size, vocab_parallel_group=vocab_parallel_group)
    inputs = _resolved(head, teachers, labels, teacher_labels=teacher_labels, teacher_mask=teacher_mask,
                       teacher_chars=teacher_chars, ignore_index=ignore_index, k=k, temperature=temperature,
                       teacher_weights=teacher_weights, weight_temperature=weight_temperature,
                       weight_granularity=weight_granularity, pairing=pairing, student_offsets=student_offsets,
                       teacher_offsets=teacher_offsets)
    objective.check_inputs(inputs, lam=lam, gamma=gamma, values=values, uld_top_k=uld_top_k, standardized=standardize,
                           record_tail=record_tail, temperature=temperature, ignore_index=ignore_index)
    gld_options = dict(k=k, values=values, nodes=nodes, graph_norm=graph_norm, scope="sequence",
                       num_nodes=num_nodes, distance=distance, temperature=temperature, deterministic=deterministic,
                       backend=backend)

    def finish(summary, per_position, graphs=True):
        if lam != 0 and per_position is None:  # the top-k form reads the student's summary
            per_position = uld.terms(inputs, temperature=temperature, top_k=uld_top_k, standardized=standardize,
                                     record_tail=record_tail, student=summary, backend=backend)
        return objective.infigfusion(inputs, summary, per_position, lam=lam, gamma=gamma, reduction=reduction,
                                     gld_options=gld_options, denominators=parallel.denominators, graphs=graphs)

    full = (teachers.full_uld(inputs, temperature, record_tail, backend) if lam != 0 and uld_top_k is None
            else None)
    student = _Student(head, objective.summary_k(lam, gamma, k, uld_top_k), temperature, backend, chunk_size)
    loss, components, token_weights = _student_pass(student, inputs, finish, ce=True, ce_grad=lam != 1,
                                                    lse_grad=lam != 0 and gamma != 0 and values == "probs",
                                                    full_uld=full, reduction=reduction)
    return functional._with_components(loss, components, token_weights, return_components)
