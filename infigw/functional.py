"""The public functional API of infigw (torch.nn.functional style).

Data flow of :func:`gld_loss`: student/teacher logits -> top-k selection and value transform -> per-graph node
degrees (the co-activation graph is never formed) -> sort/compress -> closed-form distance -> reduction.
The math contract is GLD.md (in the repository's shared spec); choices marked *ours* there are listed in README.

Conventions shared by every loss here:
- student first, teacher second; the teacher is never differentiated;
- ``labels`` (B, T) are aligned with the logits (label t is the target of logits[:, t]; shift beforehand) and
  give the valid positions ``labels != ignore_index``; alternatively an explicit bool ``mask``; neither = all valid;
- teachers are dense logits (B, T', V_t), :class:`~infigw.TopKRecord` records, or a list of those; a teacher
  whose length differs from the student's needs its own ``teacher_labels`` / ``teacher_mask``;
- inputs may be fp32, fp16 or bf16 (fp64 for gradcheck); all math is fp32 (fp64 for fp64 inputs);
- ``reduction``: "mean" over included sequences (0 if none), "sum", or "none" (a per-graph vector). A sequence
  with no valid position on the student or the teacher side is excluded: loss 0, gradient 0, never NaN.
"""
from typing import Optional

import torch

from . import dispatch
from .checks import (check_choice, check_count, check_k, check_logits, check_number, check_optional_count,
                     check_points, check_positive, check_record, check_same_device, data_checks_enabled,
                     valid_positions)
from .contract import NODES, NORMS, VALUES, TopKDegrees, compute_dtype
from . import reference
from .reference import (aligned_rows, degrees_from_kept, pad_to, row_logsumexp, select_topk, sorted_prob_l1,
                        standardize, transform_values)
from .teacher import TopKRecord, as_teacher_list
from . import weighting

SCOPES = ("sequence", "batch")
DISTANCES = ("l1", "gw1d")
REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------- helpers
def _graph_rows(valid: torch.Tensor, scope: str):
    """Flattened row -> graph index (-1 for invalid rows) and the number of graphs."""
    batch = valid.shape[0]
    num_graphs = batch if scope == "sequence" else 1
    graph = torch.arange(batch, device=valid.device).unsqueeze(-1).expand_as(valid)
    if scope == "batch":
        graph = torch.zeros_like(graph)
    return torch.where(valid, graph, -1).reshape(-1), num_graphs


def _graphs_with_rows(row_graph: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """(G,) bool: the graph has at least one valid row."""
    counts = torch.zeros(num_graphs, device=row_graph.device, dtype=torch.long)
    counts.index_add_(0, row_graph.clamp_min(0), (row_graph >= 0).long())
    return counts > 0


def _check_graph_options(k, vocab, values, nodes, graph_norm, scope, temperature, vocab_name="student vocabulary"):
    check_k(k, vocab, "k", vocab_name)
    check_choice(values, "values", tuple(VALUES))
    check_choice(nodes, "nodes", tuple(NODES))
    check_choice(graph_norm, "graph_norm", tuple(NORMS))
    check_choice(scope, "scope", SCOPES)
    check_positive(temperature, "temperature")


def _per_teacher(given, name, num):
    """None, one tensor (one teacher) or a list of S entries -> a list of S entries."""
    if not (given is None or isinstance(given, (torch.Tensor, list, tuple))):
        raise TypeError(f"{name} must be None, a tensor or a list with one entry per teacher, got {type(given).__name__}")
    if given is None or isinstance(given, torch.Tensor):
        if isinstance(given, torch.Tensor) and num > 1:
            raise ValueError(f"{name} must be a list with one entry per teacher ({num}) when there are several teachers")
        return [given] * num
    if len(given) != num:
        raise ValueError(f"{name} must have one entry per teacher ({num}), got {len(given)}")
    return list(given)


def _teacher_valid_list(teachers, teacher_labels, teacher_mask, student_valid, ignore_index, student):
    """Resolve each teacher's (B, T') valid positions; validate shapes and devices."""
    num = len(teachers)
    labels_list = _per_teacher(teacher_labels, "teacher_labels", num)
    mask_list = _per_teacher(teacher_mask, "teacher_mask", num)
    batch, length = student_valid.shape
    valids = []
    for i, (teacher, labels, mask) in enumerate(zip(teachers, labels_list, mask_list)):
        name = "teacher_logits" if num == 1 else f"teacher_logits[{i}]"
        shape = tuple(teacher.shape[:2])
        if shape[0] != batch:
            raise ValueError(f"{name} has batch size {shape[0]} but the student logits have {batch}")
        if labels is None and mask is None:
            if shape[1] != length:
                raise ValueError(
                    f"{name} has {shape[1]} positions but the student has {length}: pass teacher_labels or "
                    "teacher_mask to say which teacher positions are valid"
                )
            valids.append(student_valid)
        else:
            valids.append(valid_positions(labels, mask, shape, ignore_index, "teacher", student))
    return valids


def _check_teachers(teachers, batch, k, student, temperature):
    for i, teacher in enumerate(teachers):
        name = "teacher_logits" if len(teachers) == 1 else f"teacher_logits[{i}]"
        if isinstance(teacher, TopKRecord):
            check_record(teacher, batch, k, name, student, temperature)
        else:
            check_logits(teacher, name)
            check_same_device(student, teacher, name, "student_logits")
            check_k(k, teacher.shape[-1], "k", f"{name} vocabulary")


def _record_kept(record: TopKRecord, k: int, values: str, temperature: float):
    """Top-k of a record (ties to the smaller vocabulary id) -> node values (N, k) and ids (N, k)."""
    by_id = record.indices.long().argsort(-1)
    ids = record.indices.long().gather(-1, by_id)
    kept, position = select_topk(record.values.gather(-1, by_id), k)
    kept_ids = ids.gather(-1, position)
    row_lse = _record_logsumexp(record, temperature) if values == "probs" else None
    node_values = transform_values(kept, values, temperature, row_lse)
    return node_values.reshape(-1, k), kept_ids.reshape(-1, k)


def _record_logsumexp(record: TopKRecord, temperature: float):
    """(B, T') full-vocabulary logsumexp of logits / T: the stored one, else that of the k_t stored entries
    (probabilities are then renormalised over what the record holds)."""
    if record.logsumexp is not None:
        return record.logsumexp.to(compute_dtype(record.values.dtype))
    return row_logsumexp(record.values, temperature)


def _degrees(logits, valid, *, k, values, nodes, graph_norm, scope, temperature, deterministic, backend):
    row_graph, num_graphs = _graph_rows(valid, scope)
    _, implementation = dispatch.resolve("topk_degrees", backend, logits.device, k)
    result = implementation(logits.reshape(-1, logits.shape[-1]), row_graph, num_graphs, k, values,
                            temperature, nodes, graph_norm, deterministic)
    return result, row_graph, num_graphs


def _teacher_degrees(teacher, valid, *, k, values, nodes, graph_norm, scope, temperature, deterministic, backend):
    with torch.no_grad():
        if isinstance(teacher, TopKRecord):
            row_graph, num_graphs = _graph_rows(valid, scope)
            kept_values, kept_ids = _record_kept(teacher, k, values, temperature)
            kept_values = torch.where((row_graph >= 0).unsqueeze(-1), kept_values, torch.zeros_like(kept_values))
            num_nodes = teacher.vocab_size if nodes == "vocab" else k
            degrees, touched = degrees_from_kept(kept_values, kept_ids, row_graph, num_graphs, num_nodes, nodes, graph_norm)
            return TopKDegrees(degrees, touched, kept_values, kept_ids), row_graph, num_graphs
        return _degrees(teacher.detach(), valid, k=k, values=values, nodes=nodes, graph_norm=graph_norm, scope=scope,
                        temperature=temperature, deterministic=deterministic, backend=backend)


def _teacher_golds(spec, teachers, teacher_labels, teacher_mask, labels, teacher_valids):
    """Each teacher's (B, T') gold next-token ids for a label-aware weight measure (else None each).

    A teacher's own ``teacher_labels``; a teacher with neither teacher_labels nor teacher_mask shares the
    student's positions (as everywhere) and so takes the student's ``labels``.
    """
    measure = weighting.measure_of(spec, len(teachers))
    if measure is None or not measure.needs_labels:
        return [None] * len(teachers)
    num = len(teachers)
    golds = []
    for i, (teacher, own, mask, valid) in enumerate(zip(teachers, _per_teacher(teacher_labels, "teacher_labels", num),
                                                        _per_teacher(teacher_mask, "teacher_mask", num),
                                                        teacher_valids)):
        gold = own if own is not None else (labels if mask is None else None)
        name = "teacher_labels" if num == 1 else f"teacher_labels[{i}]"
        if gold is None:
            raise ValueError(f"teacher_weights={spec!r} needs each teacher's gold next tokens: pass {name} (the "
                             "teacher's own token ids, aligned with its logits) or, for a teacher that shares the "
                             "student's positions and tokenizer, the student's labels")
        if data_checks_enabled():
            vocab = teacher.vocab_size if isinstance(teacher, TopKRecord) else teacher.shape[-1]
            if bool((valid & ((gold < 0) | (gold >= vocab))).any()):  # host sync, like the record id check
                raise ValueError(f"{name} (gold tokens for teacher_weights={spec!r}) must be in [0, {vocab}) at the "
                                 "teacher's valid positions")
        golds.append(gold)
    return golds


def _teacher_weighting(spec, teachers, teacher_labels, teacher_mask, labels, teacher_valids, *, k, temperature,
                       weight_temperature):
    """The :class:`~infigw.weighting.TeacherWeighting` of one loss call (resolves gold tokens for "nll")."""
    golds = _teacher_golds(spec, teachers, teacher_labels, teacher_mask, labels, teacher_valids)
    return weighting.TeacherWeighting(spec, teachers, teacher_valids, golds, k=k, temperature=temperature,
                                      weight_temperature=weight_temperature)


def _check_weight_options(teacher_weights, num_teachers, weight_temperature, weight_granularity):
    weighting.measure_of(teacher_weights, num_teachers)
    check_positive(weight_temperature, "weight_temperature")
    check_choice(weight_granularity, "weight_granularity", weighting.GRANULARITIES)


def _with_token_weights(components: dict, token_weights) -> dict:
    """Add the (S, B, T) token weights to ``return_components`` at token granularity."""
    return components if token_weights is None else {**components, "token_weights": token_weights}


def _aligned_presence(valid, teacher_valids):
    """(S, B, T) bool: student position has an aligned pair with teacher s."""
    return torch.stack([weighting.student_presence(aligned_rows(valid, teacher_valid)[0], valid.shape)
                        for teacher_valid in teacher_valids])


def _reduce(per_graph: torch.Tensor, included: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_graph
    if reduction == "sum":
        return per_graph.sum()
    return per_graph.sum() / included.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------- stages
def coactivation_degrees(logits, labels=None, *, mask=None, ignore_index: int = -100, k: int = 10,
                         values: str = "logits", nodes: str = "vocab", graph_norm: str = "mean",
                         scope: str = "sequence", temperature: float = 1.0, deterministic: bool = False,
                         backend: str = "auto") -> TopKDegrees:
    """Weighted node degrees of each co-activation graph, without forming the graph.

    Args:
        logits: (B, T, V). labels / mask: (B, T) valid positions.
        k: kept entries per position. values: "logits" | "probs" | "topk_probs" (ours).
        nodes: "vocab" (node = token id, V nodes) | "rank" (node = rank slot, k nodes).
        graph_norm: "mean" (ours, default) | "sum" (paper-literal) | "cosine" (ours).
        scope: "sequence" (one graph per sequence) | "batch" (one graph for the batch).
    Returns:
        :class:`~infigw.ops.common.TopKDegrees` with degrees (G, num_nodes), G = B or 1; differentiable.
    """
    check_logits(logits, "logits")
    _check_graph_options(k, logits.shape[-1], values, nodes, graph_norm, scope, temperature)
    valid = valid_positions(labels, mask, logits.shape[:2], ignore_index, "", logits)
    result, _, _ = _degrees(logits, valid, k=k, values=values, nodes=nodes, graph_norm=graph_norm, scope=scope,
                            temperature=temperature, deterministic=deterministic, backend=backend)
    return result


def coactivation_graph(logits, labels=None, *, mask=None, ignore_index: int = -100, k: int = 10,
                       values: str = "logits", nodes: str = "vocab", graph_norm: str = "mean",
                       scope: str = "sequence", temperature: float = 1.0, layout: str = "coo",
                       backend: str = "auto"):
    """The explicit co-activation graphs (for validation and exact-GW comparisons; not differentiable).

    Returns:
        ``layout="coo"``: a coalesced sparse COO tensor (G, num_nodes, num_nodes) f32.
        ``layout="dense"``: a list of G pairs ``(node_ids (n,), matrix (n, n))`` over each graph's touched
        node ids in ascending order.
    """
    check_choice(layout, "layout", ("coo", "dense"))
    with torch.no_grad():
        check_logits(logits, "logits")
        _check_graph_options(k, logits.shape[-1], values, nodes, graph_norm, scope, temperature)
        valid = valid_positions(labels, mask, logits.shape[:2], ignore_index, "", logits)
        result, row_graph, num_graphs = _degrees(
            logits, valid, k=k, values=values, nodes=nodes, graph_norm=graph_norm, scope=scope,
            temperature=temperature, deterministic=True, backend=backend)
        indices, entries = reference.coactivation_graph(result.kept_values, result.kept_ids, row_graph, num_graphs,
                                                        nodes, graph_norm)
        if layout == "dense":
            return reference.dense_graphs(indices, entries, num_graphs)
        num_nodes = logits.shape[-1] if nodes == "vocab" else k
        return torch.sparse_coo_tensor(indices, entries, (num_graphs, num_nodes, num_nodes),
                                       is_coalesced=True, check_invariants=False)


def sorted_degrees(degrees: torch.Tensor, touched: torch.Tensor, num_nodes: Optional[int] = None):
    """Sort/compress: descending degrees of the touched nodes, truncated to ``num_nodes``, zero-padded.

    Args:
        degrees: (G, M) floating; touched: (G, M) bool (as returned by :func:`coactivation_degrees`).
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

    Args:
        x, y: (..., n) floating point sets (any order). lengths: optional (...) int: only the first
            ``lengths`` points of each set count (the sets are taken as given, then sorted).
    Returns:
        (...) f32 (f64 for f64 input): (1/n^2) * min(cost(x, y sorted alike), cost(x, y sorted oppositely)).
    """
    for tensor, name in ((x, "x"), (y, "y")):
        check_points(tensor, name)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (..., n), got {tuple(x.shape)} and {tuple(y.shape)}")
    check_same_device(x, y, "y", "x")
    batch_shape, width = x.shape[:-1], x.shape[-1]
    dtype = compute_dtype(torch.promote_types(x.dtype, y.dtype))
    flat_x, flat_y = x.reshape(-1, width).to(dtype), y.reshape(-1, width).to(dtype)
    if lengths is None:
        lengths = torch.full((flat_x.shape[0],), width, dtype=torch.long, device=x.device)
    else:
        if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != tuple(batch_shape):
            raise ValueError(f"lengths must be a tensor of shape {tuple(batch_shape)}")
        if lengths.dtype.is_floating_point:
            raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
        lengths = lengths.reshape(-1).long().clamp(0, width)
    inside = torch.arange(width, device=x.device) < lengths.unsqueeze(-1)
    low = torch.tensor(float("-inf"), device=x.device)

    def descending(points):  # points outside the set go to the end
        order = torch.sort(torch.where(inside, points.detach(), low), dim=-1, descending=True, stable=True).indices
        return points.gather(-1, order)

    _, implementation = dispatch.resolve("sorted_gw1d", backend, x.device)
    return implementation(descending(flat_x), descending(flat_y), lengths).reshape(batch_shape)


# ----------------------------------------------------------------------------------------------- GLD
def _gld_terms(student_logits, valid, teachers, teacher_valids, *, k, values, nodes, graph_norm, scope, num_nodes,
               distance, temperature, deterministic, backend):
    """Per-teacher, per-graph GLD distances (S, G) and which of them are included (S, G)."""
    options = dict(k=k, values=values, nodes=nodes, graph_norm=graph_norm, scope=scope, temperature=temperature,
                   deterministic=deterministic, backend=backend)
    student, row_graph, num_graphs = _degrees(student_logits, valid, **options)
    f, f_counts = reference.sorted_degrees(student.degrees, student.touched, num_nodes)
    student_present = _graphs_with_rows(row_graph, num_graphs)
    if distance == "gw1d":
        _, gw1d = dispatch.resolve("sorted_gw1d", backend, student_logits.device)
    terms, included = [], []
    for teacher, teacher_valid in zip(teachers, teacher_valids):
        result, teacher_rows, _ = _teacher_degrees(teacher, teacher_valid, **options)
        g, g_counts = reference.sorted_degrees(result.degrees, result.touched, num_nodes)
        width, dtype = max(f.shape[-1], g.shape[-1]), torch.promote_types(f.dtype, g.dtype)
        f_pad, g_pad = pad_to(f, width).to(dtype), pad_to(g, width).to(dtype)
        if distance == "l1":
            term = reference.sorted_l1(f_pad, g_pad)
        else:
            term = gw1d(f_pad, g_pad, torch.maximum(f_counts, g_counts))
        both = student_present & _graphs_with_rows(teacher_rows, num_graphs)
        terms.append(torch.where(both, term, torch.zeros_like(term)))
        included.append(both)
    return torch.stack(terms), torch.stack(included)


def gld_loss(student_logits, teacher_logits, labels=None, *, mask=None, teacher_labels=None, teacher_mask=None,
             ignore_index: int = -100, k: int = 10, values: str = "logits", nodes: str = "vocab",
             graph_norm: str = "mean", scope: str = "sequence", num_nodes: Optional[int] = None,
             distance: str = "l1", temperature: float = 1.0, reduction: str = "mean", teacher_weights=None,
             weight_temperature: float = 1.0, weight_granularity: str = "sequence", deterministic: bool = False,
             backend: str = "auto", return_components: bool = False):
    """Graph-on-Logits Distillation loss (InfiGFusion) between a student and one or several teachers.

    Args:
        student_logits: (B, T, V_s) fp32/fp16/bf16, differentiable.
        teacher_logits: dense (B, T', V_t) logits, a TopKRecord, or a list of those (never differentiated).
        labels / mask: the student's valid positions; teacher_labels / teacher_mask: the teachers' (a tensor,
            or a list with one entry per teacher); default: the student's, when the lengths agree.
        k, values, nodes, graph_norm, scope: see :func:`coactivation_degrees`.
        num_nodes: keep the largest m degrees of each graph (None = all touched nodes).
        distance: "l1" (the paper's sorted-degree distance, default) or "gw1d" (1-D GW closed form).
        teacher_weights: None (uniform), S fixed numbers, or uncertainty weights (ours, see
            :mod:`infigw.weighting`): ``softmax_s(-u_s / weight_temperature)`` with u the entropy of the teacher's
            top-k renormalised distribution ("uncertainty", label-free) or the NLL of its gold next tokens
            ("nll", label-aware: needs teacher_labels, or the student's labels for a teacher sharing its
            positions). Detached.
        weight_granularity: "sequence" (u averaged over each sequence) or "token" (softmax per aligned position,
            then averaged over the sequence's aligned positions: one weight per graph).
        backend: "auto" | "torch" | "cpp" | "cuda" | "triton" (see :mod:`infigw.dispatch`).
        return_components: also return a dict with per-teacher terms "gld" (S, G), "weights" (S, G) and
            "included" (S, G); at token granularity also "token_weights" (S, B, T) on the student positions.
    Returns:
        The loss (scalar, or (G,) for reduction="none"); with ``return_components`` a ``(loss, dict)`` pair.
    """
    check_logits(student_logits, "student_logits")
    teachers = as_teacher_list(teacher_logits)
    _check_graph_options(k, student_logits.shape[-1], values, nodes, graph_norm, scope, temperature)
    check_choice(distance, "distance", DISTANCES)
    check_choice(reduction, "reduction", REDUCTIONS)
    check_optional_count(num_nodes, "num_nodes")
    _check_weight_options(teacher_weights, len(teachers), weight_temperature, weight_granularity)
    valid = valid_positions(labels, mask, student_logits.shape[:2], ignore_index, "", student_logits)
    _check_teachers(teachers, student_logits.shape[0], k, student_logits, temperature)
    teacher_valids = _teacher_valid_list(teachers, teacher_labels, teacher_mask, valid, ignore_index, student_logits)
    weigher = _teacher_weighting(teacher_weights, teachers, teacher_labels, teacher_mask, labels, teacher_valids,
                                 k=k, temperature=temperature, weight_temperature=weight_temperature)
    terms, included = _gld_terms(student_logits, valid, teachers, teacher_valids, k=k, values=values, nodes=nodes,
                                 graph_norm=graph_norm, scope=scope, num_nodes=num_nodes, distance=distance,
                                 temperature=temperature, deterministic=deterministic, backend=backend)
    if weight_granularity == "token":
        present = _aligned_presence(valid, teacher_valids)
        token_weights = weigher.per_position(present, valid)
        weights = weighting.pooled_weights(token_weights, present, scope)
    else:
        token_weights, weights = None, weigher.per_graph(included, scope)
    loss = _reduce((weights * terms).sum(0), included.any(0), reduction)
    if return_components:
        components = {"gld": terms.detach(), "weights": weights, "included": included}
        return loss, _with_token_weights(components, token_weights)
    return loss


# ----------------------------------------------------------------------------------------------- ULD
def _uld_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int], standardized: bool):
    """(P, V) logits -> (P, V or top_k) probabilities; only the sorted values matter to ULD."""
    logits = logits.to(compute_dtype(logits.dtype))
    if top_k is not None:
        logits = torch.topk(logits, top_k, dim=-1).values
        if standardized:
            logits = standardize(logits)
    return torch.softmax(logits / temperature, dim=-1)


def _record_uld_probs(record: TopKRecord, rows, temperature, top_k, standardized):
    values = record.values.reshape(-1, record.values.shape[-1])[rows]
    if top_k is None:  # probabilities of the stored entries (exact with the record's logsumexp)
        return transform_values(values, "probs", temperature, _record_logsumexp(record, temperature).reshape(-1)[rows])
    return _uld_probs(values, temperature, top_k, standardized)


def _uld_terms(student_logits, valid, teachers, teacher_valids, *, temperature, top_k, standardized):
    """Per-teacher ULD of each aligned pair on the student positions (S, B, T) (0 where the student position has
    no pair with that teacher) and the pairs' presence (S, B, T)."""
    vocab = student_logits.shape[-1]
    student_rows = student_logits.reshape(-1, vocab)
    terms, present = [], []
    for teacher, teacher_valid in zip(teachers, teacher_valids):
        s_rows, t_rows, _ = aligned_rows(valid, teacher_valid)
        p = _uld_probs(student_rows[s_rows], temperature, top_k, standardized)
        with torch.no_grad():
            if isinstance(teacher, TopKRecord):
                q = _record_uld_probs(teacher, t_rows, temperature, top_k, standardized)
            else:
                q = _uld_probs(teacher.detach().reshape(-1, teacher.shape[-1])[t_rows], temperature, top_k, standardized)
        terms.append(weighting.to_student_positions(sorted_prob_l1(p, q), s_rows, valid.shape))
        present.append(weighting.student_presence(s_rows, valid.shape))
    return torch.stack(terms), torch.stack(present)


def _weighted_uld(terms, present, weigher, granularity, valid):
    """Weighted ULD per sequence (B,), the per-teacher mean ULD (S, B), its inclusion (S, B), the (S, B) weights and
    the (S, B, T) token weights (None at sequence granularity).

    Sequence granularity: ``sum_s w_{s,b} * mean_i ULD_{s,b,i}``. Token granularity (ours):
    ``(1 / n_b) sum_t sum_s w_{s,b,t} ULD_{s,b,t}`` over the n_b student positions of b with at least one pair;
    the reported (S, B) weights ``(1 / n_b) sum_t w_{s,b,t}`` are the teachers' shares of that sum.
    """
    pairs = present.sum(-1)
    mean_terms = terms.sum(-1) / pairs.clamp_min(1)
    included = pairs > 0
    if granularity == "token":
        token_weights = weigher.per_position(present, valid)
        covered = present.any(0).sum(-1).clamp_min(1)
        return ((token_weights * terms).sum((0, 2)) / covered, mean_terms, included,
                weighting.pooled_weights(token_weights, present), token_weights)
    weights = weigher.per_graph(included)
    return (weights * mean_terms).sum(0), mean_terms, included, weights, None


def _check_uld_options(student_logits, teachers, temperature, top_k, standardized):
    check_positive(temperature, "temperature")
    if top_k is not None:
        check_k(top_k, student_logits.shape[-1], "top_k", "student vocabulary")
        for i, teacher in enumerate(teachers):
            size = teacher.values.shape[-1] if isinstance(teacher, TopKRecord) else teacher.shape[-1]
            check_k(top_k, size, "top_k", f"teacher {i} kept/vocabulary")
    elif standardized:
        raise ValueError("standardize=True needs top_k (the z-score is taken over the top-k kept logits)")


def uld_loss(student_logits, teacher_logits, labels=None, *, mask=None, teacher_labels=None, teacher_mask=None,
             ignore_index: int = -100, temperature: float = 1.0, top_k: Optional[int] = None,
             standardize: bool = False, reduction: str = "mean", teacher_weights=None,
             weight_temperature: float = 1.0, weight_k: int = 10, weight_granularity: str = "sequence",
             return_components: bool = False):
    """Universal Logit Distillation: sorted-probability L1 between aligned student/teacher positions.

    The i-th valid student position of a sequence pairs with the i-th valid teacher position (up to the
    shorter count). Full vocabulary by default: ``sum_i |sort(softmax(x/T))_i - sort(softmax(y/T))_i|`` with
    the smaller vocabulary zero-padded. ``top_k=m`` (InfiFusion v3 style; details ours): keep the top-m logits
    of each side, optionally z-score them over the m entries (``standardize=True``), softmax over the m.
    Per sequence the pairs are averaged; ``reduction`` then acts over sequences as in :func:`gld_loss`.
    A TopKRecord teacher gives exact kept probabilities with its logsumexp (the rest count as 0), else
    probabilities renormalised over its kept entries.

    Several teachers: ``teacher_weights`` as in :func:`gld_loss` ("uncertainty" entropies from the teachers'
    top-``weight_k`` logits). ``weight_granularity="sequence"``: ``L_b = sum_s w_{s,b} * mean_i ULD_{s,b,i}``;
    ``"token"`` (ours): one softmax over the teachers per aligned student position t,
    ``L_b = (1 / n_b) sum_t sum_s w_{s,b,t} ULD_{s,b,t}`` over the n_b student positions with at least one pair
    (equal to the sequence form when every teacher pairs with every position and the weights are uniform).
    ``return_components``: also a dict with "uld" (S, B) per-teacher means, "weights" (S, B) (at token level the
    teachers' shares ``(1 / n_b) sum_t w_{s,b,t}``), "included" (S, B) and, at token level, "token_weights"
    (S, B, T) on the student positions (0 where a teacher has no pair).
    """
    check_logits(student_logits, "student_logits")
    teachers = as_teacher_list(teacher_logits)
    check_choice(reduction, "reduction", REDUCTIONS)
    _check_weight_options(teacher_weights, len(teachers), weight_temperature, weight_granularity)
    check_count(weight_k, "weight_k")
    _check_teachers(teachers, student_logits.shape[0], 1, student_logits, temperature)
    _check_uld_options(student_logits, teachers, temperature, top_k, standardize)
    valid = valid_positions(labels, mask, student_logits.shape[:2], ignore_index, "", student_logits)
    teacher_valids = _teacher_valid_list(teachers, teacher_labels, teacher_mask, valid, ignore_index, student_logits)
    weigher = _teacher_weighting(teacher_weights, teachers, teacher_labels, teacher_mask, labels, teacher_valids,
                                 k=weight_k, temperature=temperature, weight_temperature=weight_temperature)
    terms, present = _uld_terms(student_logits, valid, teachers, teacher_valids, temperature=temperature,
                                top_k=top_k, standardized=standardize)
    per_sequence, mean_terms, included, weights, token_weights = _weighted_uld(terms, present, weigher,
                                                                               weight_granularity, valid)
    loss = _reduce(per_sequence, included.any(0), reduction)
    if return_components:
        components = {"uld": mean_terms.detach(), "weights": weights, "included": included}
        return loss, _with_token_weights(components, token_weights)
    return loss


# ----------------------------------------------------------------------------------------------- InfiGFusion
def infigfusion_loss(student_logits, teacher_logits, labels, *, teacher_labels=None, teacher_mask=None,
                     ignore_index: int = -100, lam: float = 0.5, gamma: float = 1.0, k: int = 10,
                     values: str = "logits", nodes: str = "vocab", graph_norm: str = "mean",
                     num_nodes: Optional[int] = None, distance: str = "l1", temperature: float = 1.0,
                     uld_top_k: Optional[int] = None, standardize: bool = False, teacher_weights=None,
                     weight_temperature: float = 1.0, weight_granularity: str = "sequence", reduction: str = "mean",
                     deterministic: bool = False, backend: str = "auto", return_components: bool = False):
    """The InfiGFusion objective ``(1 - lam) * CE + lam * sum_s w_s * (ULD_s + gamma * GLD_s)``.

    Defaults lam = 0.5, gamma = 1 are ours (only the (1 - lam) * L_SFT part is confirmed by the paper's figure).
    CE is the student's token-level cross-entropy on ``labels`` (aligned with the logits; mean over valid tokens
    for "mean"/"none"-per-sequence, sum for "sum"). The distillation part is per sequence (graph scope
    "sequence"). Teacher weights (``teacher_weights``, ``weight_temperature``: see :func:`gld_loss`; "uncertainty"
    entropies from the top-``k`` logits) at ``weight_granularity="sequence"`` are one (S, B) set shared by ULD
    and GLD; at ``"token"`` ULD uses the per-position weights (as in :func:`uld_loss`) and GLD their per-sequence
    averages (as in :func:`gld_loss`). ``return_components``: also "ce", "uld" (S, B), "gld" (S, B),
    "weights" (S, B), "included" (S, B) and, at token level, "token_weights" (S, B, T).
    """
    check_logits(student_logits, "student_logits")
    if labels is None:
        raise ValueError("labels (B, T) are required: they define the cross-entropy target and the valid positions")
    check_number(lam, "lam")
    check_number(gamma, "gamma")
    if lam > 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    teachers = as_teacher_list(teacher_logits)
    _check_graph_options(k, student_logits.shape[-1], values, nodes, graph_norm, "sequence", temperature)
    check_choice(distance, "distance", DISTANCES)
    check_choice(reduction, "reduction", REDUCTIONS)
    check_optional_count(num_nodes, "num_nodes")
    _check_weight_options(teacher_weights, len(teachers), weight_temperature, weight_granularity)
    _check_uld_options(student_logits, teachers, temperature, uld_top_k, standardize)
    valid = valid_positions(labels, None, student_logits.shape[:2], ignore_index, "", student_logits)
    _check_teachers(teachers, student_logits.shape[0], k, student_logits, temperature)
    teacher_valids = _teacher_valid_list(teachers, teacher_labels, teacher_mask, valid, ignore_index, student_logits)
    weigher = _teacher_weighting(teacher_weights, teachers, teacher_labels, teacher_mask, labels, teacher_valids,
                                 k=k, temperature=temperature, weight_temperature=weight_temperature)

    batch, length, vocab = student_logits.shape
    if data_checks_enabled() and bool((valid & ((labels < 0) | (labels >= vocab))).any()):  # host sync
        raise ValueError(f"labels must be in [0, {vocab}) (the student vocabulary) or ignore_index={ignore_index}")
    # masked rows are zeroed first so that -inf/NaN logits there (padding) give no NaN gradient
    ce_logits = torch.where(valid.unsqueeze(-1), student_logits, torch.zeros((), dtype=student_logits.dtype,
                                                                             device=student_logits.device))
    token_ce = torch.nn.functional.cross_entropy(
        ce_logits.reshape(-1, vocab).to(compute_dtype(student_logits.dtype)), labels.reshape(-1).long(),
        ignore_index=ignore_index, reduction="none").view(batch, length)
    uld_pairs, present = _uld_terms(student_logits, valid, teachers, teacher_valids, temperature=temperature,
                                    top_k=uld_top_k, standardized=standardize)
    uld, uld_terms, uld_included, weights, token_weights = _weighted_uld(uld_pairs, present, weigher,
                                                                         weight_granularity, valid)
    gld_terms, gld_included = _gld_terms(student_logits, valid, teachers, teacher_valids, k=k, values=values,
                                         nodes=nodes, graph_norm=graph_norm, scope="sequence", num_nodes=num_nodes,
                                         distance=distance, temperature=temperature, deterministic=deterministic,
                                         backend=backend)
    included = uld_included | gld_included  # the same sets: both need valid positions on both sides
    distill = uld + gamma * (weights * gld_terms).sum(0)
    tokens = valid.sum(-1)
    if reduction == "none":
        ce = token_ce.sum(-1) / tokens.clamp_min(1)
        loss = (1 - lam) * ce + lam * distill
    elif reduction == "sum":
        ce = token_ce.sum()
        loss = (1 - lam) * ce + lam * distill.sum()
    else:
        ce = token_ce.sum() / tokens.sum().clamp_min(1)
        loss = (1 - lam) * ce + lam * _reduce(distill, included.any(0), "mean")
    if return_components:
        components = {"ce": ce.detach(), "uld": uld_terms.detach(), "gld": gld_terms.detach(), "weights": weights,
                      "included": included}
        return loss, _with_token_weights(components, token_weights)
    return loss
