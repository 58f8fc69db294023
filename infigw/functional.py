"""The public functional API of infigw (torch.nn.functional style) and the GLD orchestration.

Data flow of :func:`gld_loss`: logits -> top-k and node values -> per-graph degrees (the graph is never formed) ->
sort/compress -> closed-form distance -> reduction; the math: docs/math.md (*ours* marked). Conventions of every loss:
- student first, teacher second; the teacher is never differentiated;
- ``labels`` (B, T) are aligned with the logits (label t is the target of logits[:, t]; shift beforehand) and
  give the valid positions ``labels != ignore_index``; alternatively an explicit bool ``mask``; neither = all valid;
- teachers are dense logits (B, T', V_t), :class:`~infigw.TopKRecord` records, or a list of those; one of another
  length needs its own ``teacher_labels`` / ``teacher_mask`` unless neither side has labels or masks;
- inputs may be fp32, fp16 or bf16 (fp64 for gradcheck); all math is fp32 (fp64 for fp64 inputs);
- ``reduction``: "mean" over included sequences (0 if none), "sum", or "none" (a per-graph vector). A sequence
  with no valid position on the student or the teacher side is excluded: loss 0, gradient 0, never NaN.
"""
from typing import Optional

import torch

from . import dispatch, distributed, objective, reference, uld
from .checks import (check_choice, check_count, check_k, check_lengths, check_logits, check_optional_count,
                     check_points, check_same_device, check_temperature, valid_positions)
from .contract import DISTANCES, NODES, NORMS, REDUCTIONS, SCOPES, VALUES, TopKDegrees, compute_dtype
from .fused_linear import fused_linear_gld_loss, fused_linear_infigfusion_loss, fused_linear_uld_loss  # noqa: F401
from .inputs import CallInputs, resolve
from .summary import TopKSummary
from .teacher import TopKRecord, check_records_serve


# ----------------------------------------------------------------------------------------------- GLD stages
def check_graph_options(values, nodes, graph_norm, scope, num_nodes=None, distance="l1"):
    check_choice(values, "values", tuple(VALUES))
    check_choice(nodes, "nodes", tuple(NODES))
    check_choice(graph_norm, "graph_norm", tuple(NORMS))
    check_choice(scope, "scope", SCOPES)
    check_optional_count(num_nodes, "num_nodes")
    check_choice(distance, "distance", DISTANCES)


def _graph_rows(valid: torch.Tensor, scope: str):
    """Flattened row -> graph index (-1 for invalid rows) and the number of graphs."""
    batch = valid.shape[0]
    graph = torch.arange(batch, device=valid.device).unsqueeze(-1).expand_as(valid)
    if scope == "batch":
        graph = torch.zeros_like(graph)
    return torch.where(valid, graph, -1).reshape(-1), (batch if scope == "sequence" else 1)


def _degrees(teacher_or_student, valid, *, k, values, nodes, graph_norm, scope, temperature, deterministic,
             backend):
    """Degrees of dense logits (``topk_degrees``) or of kept entries (``kept_degrees``: a record, a student
    summary), both through :mod:`infigw.dispatch`; returns the degrees, the row -> graph map and the number of
    graphs."""
    row_graph, num_graphs = _graph_rows(valid, scope)
    if isinstance(teacher_or_student, (TopKRecord, TopKSummary)):
        kept_values, kept_ids, logs = teacher_or_student.kept(k, values, temperature)
        kept_values = torch.where((row_graph >= 0).unsqueeze(-1), kept_values, torch.zeros_like(kept_values))
        num_nodes = teacher_or_student.vocab_size if nodes == "vocab" else k
        _, aggregate = dispatch.resolve("kept_degrees", backend, kept_values.device)
        degrees, touched = aggregate(kept_values, kept_ids, row_graph, num_graphs, num_nodes, nodes, graph_norm, logs)
        return TopKDegrees(degrees, touched, kept_values, kept_ids), row_graph, num_graphs
    logits = teacher_or_student
    _, implementation = dispatch.resolve("topk_degrees", backend, logits.device, k)
    result = implementation(logits.reshape(-1, logits.shape[-1]), row_graph, num_graphs, k, values, temperature,
                            nodes, graph_norm, deterministic)
    return result, row_graph, num_graphs


def gld_terms(inputs: CallInputs, *, k, values, nodes, graph_norm, scope, num_nodes, distance, temperature,
              deterministic, backend, student: Optional[TopKSummary] = None, degree_stage=None):
    """Per-teacher, per-graph GLD distances (S, G) and which of them are included (S, G); the student is its
    dense logits or, given, its :class:`~infigw.summary.TopKSummary`. ``degree_stage`` replaces :func:`_degrees`
    (pooled graphs of :mod:`infigw.distributed`); a graph is present where it touches a node (has a valid row)."""
    options = dict(k=k, values=values, nodes=nodes, graph_norm=graph_norm, scope=scope, temperature=temperature,
                   deterministic=deterministic, backend=backend)
    degree_stage = degree_stage or _degrees
    student = degree_stage(inputs.student if student is None else student, inputs.valid, **options)[0]
    f, f_counts = reference.sorted_degrees(student.degrees, student.touched, num_nodes)
    gw1d = dispatch.resolve("sorted_gw1d", backend, f.device)[1] if distance == "gw1d" else None
    terms, included = [], []
    for teacher, teacher_valid in zip(inputs.teachers, inputs.teacher_valids):
        with torch.no_grad():
            result = degree_stage(teacher if isinstance(teacher, TopKRecord) else teacher.detach(), teacher_valid,
                                  **options)[0]
            g, g_counts = reference.sorted_degrees(result.degrees, result.touched, num_nodes)
        width, dtype = max(f.shape[-1], g.shape[-1]), torch.promote_types(f.dtype, g.dtype)
        f_pad, g_pad = reference.pad_to(f, width).to(dtype), reference.pad_to(g, width).to(dtype)
        common = torch.maximum(f_counts, g_counts)  # n of the pair: the longer list after truncation
        term = reference.sorted_l1(f_pad, g_pad) if gw1d is None else gw1d(f_pad, g_pad, common)
        if distance == "mean_l1":
            term = term / common.clamp_min(1).to(term.dtype)
        both = student.touched.any(-1) & result.touched.any(-1)
        terms.append(torch.where(both, term, torch.zeros_like(term)))
        included.append(both)
    return torch.stack(terms), torch.stack(included)


def gld_result(inputs: CallInputs, parallel, student, *, reduction: str, scope: str, **options):
    """``gld_loss``'s value, components and token weights; ``options`` as :func:`gld_terms`'."""
    terms, included = gld_terms(inputs, scope=scope, student=student, degree_stage=parallel.degree_stage, **options)
    weights, token_weights = parallel.graph_weights(inputs, included, scope)
    loss = parallel.reduce((weights * terms).sum(0), included.any(0), reduction)
    return loss, {"gld": terms.detach(), "weights": weights, "included": included}, token_weights


def reduce(per_graph: torch.Tensor, included: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_graph
    if reduction == "sum":
        return per_graph.sum()
    return per_graph.sum() / included.sum().clamp_min(1)


def _with_components(loss, components: dict, token_weights, return_components: bool):
    if not return_components:
        return loss
    return loss, components if token_weights is None else {**components, "token_weights": token_weights}


# ----------------------------------------------------------------------------------------------- public stages
def coactivation_degrees(logits, labels=None, *, mask=None, ignore_index: int = -100, k: int = 10,
                         values: str = "logits", nodes: str = "vocab", graph_norm: str = "mean",
                         scope: str = "sequence", temperature: float = 1.0, deterministic: bool = False,
                         backend: str = "auto") -> TopKDegrees:
    """Weighted node degrees of each co-activation graph, without forming the graph (docs/math.md §3).

    Args: logits (B, T, V); labels / mask (B, T) valid positions; k, values, nodes, graph_norm, scope,
    temperature as in :func:`gld_loss`. Returns :class:`~infigw.contract.TopKDegrees` with degrees
    (G, num_nodes), G = B or 1; differentiable.
    """
    check_logits(logits, "logits")
    check_k(k, logits.shape[-1], "k", "vocabulary")
    check_graph_options(values, nodes, graph_norm, scope)
    check_temperature(temperature)
    valid = valid_positions(labels, mask, logits.shape[:2], ignore_index, "", logits)
    return _degrees(logits, valid, k=k, values=values, nodes=nodes, graph_norm=graph_norm, scope=scope,
                    temperature=temperature, deterministic=deterministic, backend=backend)[0]


def coactivation_graph(logits, labels=None, *, mask=None, ignore_index: int = -100, k: int = 10,
                       values: str = "logits", nodes: str = "vocab", graph_norm: str = "mean",
                       scope: str = "sequence", temperature: float = 1.0, layout: str = "coo",
                       backend: str = "auto"):
    """The explicit co-activation graphs, for validation and exact-GW comparisons (plain torch, not
    differentiable; ``backend`` picks the degree pass that selects the kept entries).

    Returns ``layout="coo"``: a coalesced sparse COO tensor (G, num_nodes, num_nodes) f32;
    ``layout="dense"``: a list of G pairs ``(node_ids (n,), matrix (n, n))`` over each graph's touched node ids.
    """
    check_choice(layout, "layout", ("coo", "dense"))
    with torch.no_grad():
        check_logits(logits, "logits")
        check_k(k, logits.shape[-1], "k", "vocabulary")
        check_graph_options(values, nodes, graph_norm, scope)
        check_temperature(temperature)
        valid = valid_positions(labels, mask, logits.shape[:2], ignore_index, "", logits)
        result, row_graph, num_graphs = _degrees(logits, valid, k=k, values=values, nodes=nodes,
                                                 graph_norm=graph_norm, scope=scope, temperature=temperature,
                                                 deterministic=True, backend=backend)
        indices, entries = reference.coactivation_graph(result.kept_values, result.kept_ids, row_graph, num_graphs,
                                                        nodes, graph_norm)
        if layout == "dense":
            return reference.dense_graphs(indices, entries, num_graphs)
        num_nodes = logits.shape[-1] if nodes == "vocab" else k
        return torch.sparse_coo_tensor(indices, entries, (num_graphs, num_nodes, num_nodes),
                                       is_coalesced=True, check_invariants=False)


def sorted_degrees(degrees: torch.Tensor, touched: torch.Tensor, num_nodes: Optional[int] = None):
    """Sort/compress: descending degrees of the touched nodes, truncated to ``num_nodes``, zero-padded.

    Args: degrees (G, M) floating; touched (G, M) bool (as from :func:`coactivation_degrees`).
    Returns ``(sorted (G, L) f32, counts (G,) int64)``.
    """
    check_logits(degrees, "degrees", ndim=2)
    if not isinstance(touched, torch.Tensor) or touched.dtype != torch.bool or touched.shape != degrees.shape:
        raise ValueError(f"touched must be a bool tensor of the degrees' shape {tuple(degrees.shape)}")
    check_same_device(degrees, touched, "touched", "degrees")
    check_optional_count(num_nodes, "num_nodes")
    return reference.sorted_degrees(degrees, touched, num_nodes)


def sorted_gw1d(x: torch.Tensor, y: torch.Tensor, lengths: Optional[torch.Tensor] = None, *, backend: str = "auto"):
    """1-D GW closed form between batches of 1-D point sets (min of identity / anti-identity matchings).

    An upper bound on 1-D GW with squared-distance costs, exact for n <= 6 only (not in general).

    Args: x, y (..., n) floating point sets (any order); lengths: optional (...) integer tensor in [0, n]: only
    the first ``lengths`` points of each set count. Returns (...) f32 (f64 for f64 input):
    (1/n^2) * min(cost(x, y sorted alike), cost(x, y sorted oppositely)).
    """
    for tensor, name in ((x, "x"), (y, "y")):
        check_points(tensor, name)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (..., n), got {tuple(x.shape)} and {tuple(y.shape)}")
    check_same_device(x, y, "y", "x")
    batch_shape, width = x.shape[:-1], x.shape[-1]
    dtype = compute_dtype(torch.promote_types(x.dtype, y.dtype))
    flat_x, flat_y = x.reshape(-1, width).to(dtype), y.reshape(-1, width).to(dtype)
    lengths = check_lengths(lengths, batch_shape, width, x)
    inside = torch.arange(width, device=x.device) < lengths.unsqueeze(-1)
    low = torch.tensor(float("-inf"), device=x.device)

    def descending(points):  # points outside the set go to the end
        order = torch.sort(torch.where(inside, points.detach(), low), dim=-1, descending=True, stable=True).indices
        return points.gather(-1, order)

    _, implementation = dispatch.resolve("sorted_gw1d", backend, x.device)
    return implementation(descending(flat_x), descending(flat_y), lengths).reshape(batch_shape)


# ----------------------------------------------------------------------------------------------- losses
def gld_loss(student_logits, teacher_logits, labels=None, *, mask=None, teacher_labels=None, teacher_mask=None,
             teacher_chars=None, ignore_index: int = -100, k: int = 10, values: str = "topk_probs",
             nodes: str = "rank", graph_norm: str = "mean", scope: str = "sequence", num_nodes: Optional[int] = None,
             distance: str = "mean_l1", temperature: float = 1.0, reduction: str = "mean", teacher_weights=None,
             weight_temperature: float = 1.0, weight_granularity: str = "sequence", deterministic: bool = False,
             backend: str = "auto", return_components: bool = False, vocab_parallel_group=None,
             data_parallel_group=None, num_items_in_batch=None):
    """Graph-on-Logits Distillation loss (InfiGFusion) between a student and one or several teachers.

    Args:
        student_logits: (B, T, V_s) fp32/fp16/bf16, differentiable.
        teacher_logits: dense (B, T', V_t) logits, a TopKRecord, or a list of those (never differentiated).
        labels / mask: the student's valid positions; teacher_labels / teacher_mask: the teachers' (a tensor,
            or a list with one entry per teacher); default: the student's, when the lengths agree.
        k: kept entries per position. values: "logits" | "probs" (full softmax at ``temperature``) |
            "topk_probs" (ours). nodes: "vocab" (node = token id) | "rank" (node = rank slot, a k x k graph).
        graph_norm: "mean" (ours) | "sum" | "cosine" (ours). scope: "sequence" | "batch" (one graph).
        num_nodes: keep the largest m degrees of each graph (None = all touched nodes).
        distance: "mean_l1" (ours: the sorted-degree L1 divided by the pair's node count n, so that its scale
            does not grow with the graph) | "l1" (the paper's sorted-degree distance) | "gw1d" (1-D GW closed form).
        Defaults (ours, chosen by the fusion experiment, benchmarks/RESULTS.md): values="topk_probs",
            nodes="rank", graph_norm="mean", distance="mean_l1": bounded and scale-free; ``preset="paper"`` on
            the modules gives the paper-literal reading.
        teacher_weights: None (uniform), S fixed weights >= 0, "uncertainty" or "nll" (ours, see
            :mod:`infigw.weighting`); weight_granularity: "sequence" | "token" (per aligned position).
        teacher_chars: per teacher, (B, T') characters covered by each position's target token: the weights'
            uncertainties become per character, comparable across tokenizers (ours; :mod:`infigw.weighting`).
        backend: "auto" | "torch" | "cpp" | "cuda" | "triton" (see :mod:`infigw.dispatch`).
        return_components: also return a dict with per-teacher terms "gld" (S, G), "weights" (S, G) and
            "included" (S, G); at token granularity also "token_weights" (S, B, T) on the student positions.
        vocab_parallel_group, data_parallel_group, num_items_in_batch: see :mod:`infigw.distributed`.
    Returns:
        The loss (scalar, or (G,) for reduction="none"); with ``return_components`` a ``(loss, dict)`` pair.
    """
    check_graph_options(values, nodes, graph_norm, scope, num_nodes, distance)
    check_choice(reduction, "reduction", REDUCTIONS)
    parallel = distributed.Parallel(vocab_parallel_group, data_parallel_group, num_items_in_batch, reduction, scope)
    inputs = resolve(parallel.student(student_logits), teacher_logits, labels, mask=mask, teacher_labels=teacher_labels,
                     teacher_mask=teacher_mask, teacher_chars=teacher_chars, ignore_index=ignore_index, k=k,
                     temperature=temperature, teacher_weights=teacher_weights, weight_temperature=weight_temperature,
                     weight_granularity=weight_granularity)
    check_records_serve(inputs.teachers, values=values, exact_probs=values == "probs", temperature=temperature)
    result = gld_result(inputs, parallel, parallel.sharded_summary(inputs, k, temperature, backend),
                        reduction=reduction, k=k, values=values, nodes=nodes, graph_norm=graph_norm, scope=scope,
                        num_nodes=num_nodes, distance=distance, temperature=temperature, deterministic=deterministic,
                        backend=backend)
    return _with_components(*result, return_components)


def uld_loss(student_logits, teacher_logits, labels=None, *, mask=None, teacher_labels=None, teacher_mask=None,
             teacher_chars=None, ignore_index: int = -100, temperature: float = 1.0, top_k: Optional[int] = None,
             standardize: bool = False, record_tail: str = "zeros", pairing: str = "index", student_offsets=None,
             teacher_offsets=None, reduction: str = "mean", teacher_weights=None, weight_temperature: float = 1.0,
             weight_k: int = 10, weight_granularity: str = "sequence", backend: str = "auto",
             return_components: bool = False, vocab_parallel_group=None, data_parallel_group=None,
             num_items_in_batch=None):
    """Universal Logit Distillation: sorted-probability L1 between paired student/teacher positions.

    ``pairing="index"``: the i-th valid student position of a sequence pairs with the i-th valid teacher position
    (up to the shorter count); ``"offsets"`` (ours, across tokenizers): the positions whose target tokens start at
    the same character (``student_offsets`` (B, T, 2), ``teacher_offsets`` per teacher: the target tokens'
    character spans, e.g. from :mod:`infigw.records`). Full vocabulary by default:
    ``sum_i |sort(softmax(x/T))_i - sort(softmax(y/T))_i|`` with the smaller vocabulary zero-padded. ``top_k=m``
    (InfiFusion v3 style; details ours): keep the top-m logits of each side, optionally z-score them over the m
    entries (``standardize=True``), softmax over the m.
    Per sequence the pairs are averaged; ``reduction`` then acts over sequences as in :func:`gld_loss`.
    A TopKRecord teacher gives its kept probabilities (exact with a normaliser, else renormalised over the kept
    entries); the mass outside them counts as 0 (``record_tail="zeros"``) or as one more entry
    (``record_tail="bucket"``, as served-teacher trainers do).

    Several teachers: ``teacher_weights`` as in :func:`gld_loss` ("uncertainty" entropies from the teachers'
    top-``weight_k`` logits); ``weight_granularity="sequence"``: ``L_b = sum_s w_{s,b} * mean_i ULD_{s,b,i}``;
    ``"token"`` (ours): one softmax over the teachers per paired student position t,
    ``L_b = (1 / n_b) sum_t sum_s w_{s,b,t} ULD_{s,b,t}`` over the n_b student positions with a pair.
    ``backend``: the kernels of the full-vocabulary term (op ``uld_full``) and of the top-k selection (op
    ``topk_summary``), as in :func:`gld_loss`.
    ``return_components``: also a dict with "uld" (S, B) per-teacher means, "weights" (S, B), "included" (S, B)
    and, at token level, "token_weights" (S, B, T). Distributed arguments: see :mod:`infigw.distributed`.
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    check_count(weight_k, "weight_k")
    parallel = distributed.Parallel(vocab_parallel_group, data_parallel_group, num_items_in_batch, reduction)
    inputs = resolve(parallel.student(student_logits, dense=top_k is None), teacher_logits, labels, mask=mask,
                     teacher_labels=teacher_labels, teacher_mask=teacher_mask, teacher_chars=teacher_chars,
                     ignore_index=ignore_index, temperature=temperature, teacher_weights=teacher_weights,
                     weight_temperature=weight_temperature, weight_granularity=weight_granularity, weight_k=weight_k,
                     pairing=pairing, student_offsets=student_offsets, teacher_offsets=teacher_offsets)
    uld.check_options(inputs, top_k, standardize, record_tail)
    check_records_serve(inputs.teachers, exact_probs=top_k is None, temperature=temperature)
    per_position = uld.terms(inputs, temperature=temperature, top_k=top_k, standardized=standardize,
                             record_tail=record_tail, backend=backend,
                             student=parallel.sharded_summary(inputs, top_k, temperature, backend))
    return _with_components(*uld.reduced(per_position, inputs, parallel.reduce, reduction), return_components)


def infigfusion_loss(student_logits, teacher_logits, labels, *, teacher_labels=None, teacher_mask=None,
                     teacher_chars=None, ignore_index: int = -100, lam: float = 0.5, gamma: float = 1.0, k: int = 10,
                     values: str = "topk_probs", nodes: str = "rank", graph_norm: str = "mean",
                     num_nodes: Optional[int] = None, distance: str = "mean_l1", temperature: float = 1.0,
                     uld_top_k: Optional[int] = None, standardize: bool = False, record_tail: str = "zeros",
                     pairing: str = "index", student_offsets=None, teacher_offsets=None, teacher_weights=None,
                     weight_temperature: float = 1.0, weight_granularity: str = "sequence",
                     reduction: str = "mean", deterministic: bool = False, backend: str = "auto",
                     return_components: bool = False, vocab_parallel_group=None, data_parallel_group=None,
                     num_items_in_batch=None):
    """The InfiGFusion objective ``(1 - lam) * CE + lam * sum_s w_s * (ULD_s + gamma * GLD_s)``.

    CE is the student's token-level cross-entropy on ``labels`` (aligned with the logits); ULD and GLD are per
    sequence (graph scope "sequence"), with the options of :func:`uld_loss` and :func:`gld_loss`; one set of
    teacher weights serves both ("uncertainty" entropies from the top-``k`` logits; at token granularity ULD is
    weighted per position and GLD by the per-sequence averages). Terms with a zero factor are not computed.
    ``reduction``: "mean" (CE over valid tokens, the distillation over included sequences), "sum", "none"
    (per sequence). ``return_components``: also "ce", "uld" (S, B), "gld" (S, B), "weights" (S, B),
    "included" (S, B) and, at token level, "token_weights" (S, B, T). Defaults lam = 0.5, gamma = 1 are ours.
    Distributed arguments (num_items_in_batch: an ItemCounts): see :mod:`infigw.distributed`.
    """
    if labels is None:
        raise ValueError("labels (B, T) are required: they define the cross-entropy target and the valid positions")
    check_graph_options(values, nodes, graph_norm, "sequence", num_nodes, distance)
    check_choice(reduction, "reduction", REDUCTIONS)
    objective.check_factors(lam, gamma)
    parallel = distributed.Parallel(vocab_parallel_group, data_parallel_group, num_items_in_batch, reduction,
                                    both_counts=True)
    inputs = resolve(parallel.student(student_logits, dense=lam != 0 and uld_top_k is None), teacher_logits, labels,
                     teacher_labels=teacher_labels, teacher_mask=teacher_mask, teacher_chars=teacher_chars,
                     ignore_index=ignore_index, k=k, temperature=temperature, teacher_weights=teacher_weights,
                     weight_temperature=weight_temperature, weight_granularity=weight_granularity, pairing=pairing,
                     student_offsets=student_offsets, teacher_offsets=teacher_offsets)
    objective.check_inputs(inputs, lam=lam, gamma=gamma, values=values, uld_top_k=uld_top_k, standardized=standardize,
                           record_tail=record_tail, temperature=temperature, ignore_index=ignore_index)
    student, per_position = objective.student_pass(inputs, parallel.summarize, lam=lam, gamma=gamma, k=k,
                                                   uld_top_k=uld_top_k, standardized=standardize,
                                                   record_tail=record_tail, temperature=temperature, backend=backend)
    gld_options = dict(k=k, values=values, nodes=nodes, graph_norm=graph_norm, scope="sequence",
                       num_nodes=num_nodes, distance=distance, temperature=temperature, deterministic=deterministic,
                       backend=backend)
    loss, components, token_weights = objective.infigfusion(inputs, student, per_position, lam=lam, gamma=gamma,
                                                            reduction=reduction, gld_options=gld_options,
                                                            denominators=parallel.denominators)
    return _with_components(loss, components, token_weights, return_components)
