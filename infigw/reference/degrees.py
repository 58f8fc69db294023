"""Stage 2 of GLD: per-graph weighted node degrees of the co-activation graph, never forming the graph.

For graph g (a sequence, or the whole batch) with valid rows p and k-sparse node vectors a_p:

    G_g = (1 / c_g) * sum_p a_p a_p^T,    d_g[i] = sum_j G_g[i, j] = (1 / c_g) * sum_p a_p[i] * s_p,

with s_p = sum_j a_p[j], c_g = number of valid rows (``mean``) or 1 (``sum``). ``cosine`` (ours) normalises
G_ij by sqrt(G_ii G_jj): with D_i = sum_p a_p[i]^2 the degrees are those of the ``sum`` graph built from
b_p[i] = a_p[i] D_i^(-1/2) (0 where D_i = 0), computed without forming D^(-1/2) (see :func:`cosine_normalised`).
The degrees accumulate in fp64: a term a_p[i] s_p of finite fp32 logits may exceed fp32, never fp64, so a degree
is at most +-inf in fp32, never inf - inf. O(rows * k) work and memory beyond the outputs.
"""
import torch

from ..contract import NODES, NORMS, TopKDegrees, compute_dtype
from .select import log_values, row_logsumexp, select_topk, values_from_logs


def node_ids(kept_ids: torch.Tensor, nodes: str) -> torch.Tensor:
    """Node id of every kept slot (N, k): the vocabulary id, or the rank slot."""
    if nodes == "vocab":
        return kept_ids
    if nodes == "rank":
        return torch.arange(kept_ids.shape[-1], device=kept_ids.device).expand_as(kept_ids)
    raise ValueError(f"nodes must be one of {tuple(NODES)}, got {nodes!r}")


def _slot_index(row_graph, slot_nodes, num_nodes):
    """Flat (graph, node) index of every kept slot (N, k); masked rows point at graph 0 (their terms are 0)."""
    return row_graph.clamp_min(0).unsqueeze(-1) * num_nodes + slot_nodes


def _per_node(index, contributions, size, reduce="sum", initial=0.0):
    """Reduce ``contributions`` (N, k) over equal ``index`` into a flat (size,) tensor."""
    out = contributions.new_full((size,), initial)
    return out.scatter_reduce(0, index.reshape(-1), contributions.reshape(-1), reduce)


def cosine_normalised(values, logs, index, valid, size, combine=None):
    """b = a D^(-1/2) per slot, D = sum of a^2 over the slots of the same (graph, node), 0 where D = 0.

    D^(-1/2) overflows fp32 once a kept probability is below ~1e-19, so it is never formed: per node, M is the
    largest |a| (``logs`` None: values="logits") or the largest log a (the probability values, ``logs`` = log a);
    u = a / M or exp(log a - M), Q = sum u^2 (>= 1) and b = u Q^(-1/2), all bounded by 1. M is a pure scale (b does
    not depend on it), so it is detached: the gradient reaching log a is b (gb - b z), finite for any finite input.
    ``combine(per_node, op)`` (op "max" or "sum", on the flat (size,) per-node tensors) merges in the rows of
    other processes when a graph is pooled over several (:mod:`infigw.distributed`).
    """
    combine = combine or (lambda per_node, op: per_node)
    if logs is None:
        key = torch.where(valid, values.detach().abs(), torch.zeros_like(values))
        node_max = combine(_per_node(index, key, size, "amax", 0.0), "max")[index]
        has_scale = node_max != 0
        units = torch.where(has_scale, values / torch.where(has_scale, node_max, torch.ones_like(node_max)), 0.0)
    else:
        key = torch.where(valid, logs.detach(), torch.full_like(logs, float("-inf")))
        node_max = combine(_per_node(index, key, size, "amax", float("-inf")), "max")[index]
        has_scale = node_max != float("-inf")
        units = torch.where(valid & has_scale, (logs - torch.where(has_scale, node_max, 0.0)).exp(), 0.0)
    q = combine(_per_node(index, units * units, size), "sum")[index]
    return units * torch.where(q > 0, torch.where(q > 0, q, torch.ones_like(q)).rsqrt(), 0.0)


def degrees_from_kept(kept_values, kept_ids, row_graph, num_graphs: int, num_nodes: int, nodes: str, norm: str,
                      logs=None):
    """Degrees and touched nodes of each graph from the kept entries.

    Args:
        kept_values: (N, k) f32 node values a_p (differentiable).
        kept_ids: (N, k) int64 vocabulary ids of the kept entries, rank order.
        row_graph: (N,) int64 graph index of each row, -1 for a masked row.
        num_graphs: G. num_nodes: V for vocab nodes, k for rank nodes.
        logs: optional (N, k) log a_p of probability values: the cosine norm then scales by them
            (:func:`cosine_normalised`), which stays exact where a_p underflows.
    Returns:
        degrees (G, num_nodes) f32 and touched (G, num_nodes) bool.
    """
    if norm not in NORMS:
        raise ValueError(f"graph_norm must be one of {tuple(NORMS)}, got {norm!r}")
    slot_nodes = node_ids(kept_ids, nodes)
    valid = (row_graph >= 0).unsqueeze(-1)
    dtype = compute_dtype(kept_values.dtype)
    values = torch.where(valid, kept_values.to(dtype), torch.zeros((), dtype=dtype, device=kept_values.device))
    index = _slot_index(row_graph, slot_nodes, num_nodes)
    size = num_graphs * num_nodes
    if norm == "cosine":
        values = cosine_normalised(values, None if logs is None else logs.to(dtype), index, valid, size)
    wide = values.double()
    contributions = torch.where(valid, wide * wide.sum(-1, keepdim=True), torch.zeros_like(wide))
    degrees = _per_node(index, contributions, size).view(num_graphs, num_nodes)
    if norm == "mean":
        rows = wide.new_zeros(num_graphs).index_add(0, row_graph.clamp_min(0), valid.squeeze(-1).to(wide.dtype))
        degrees = degrees / rows.clamp_min(1).unsqueeze(-1)
    touched = _per_node(index, valid.expand_as(values).to(torch.int32), size, "amax", 0).view(num_graphs, num_nodes)
    return degrees.to(dtype), touched > 0


def topk_degrees(logits, row_graph, num_graphs: int, k: int, values: str = "logits", temperature: float = 1.0,
                 nodes: str = "vocab", norm: str = "mean", deterministic: bool = False) -> TopKDegrees:
    """The op-level reference: select, transform and aggregate in one call (autograd through torch).

    Args:
        logits: (N, V) fp32/fp16/bf16.
        row_graph: (N,) int64, graph index per row or -1 for a masked row.
        deterministic: accepted for signature parity; this path is always deterministic.
    """
    valid = (row_graph >= 0).unsqueeze(-1)
    # masked rows are zeroed before any math: -inf/NaN there (padding) must not reach the gradient as 0 * NaN
    logits = torch.where(valid, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    kept, kept_ids = select_topk(logits, k)
    row_lse = row_logsumexp(logits, temperature) if values == "probs" else None
    logs = log_values(kept, values, temperature, row_lse)
    kept_values = values_from_logs(kept, logs)
    kept_values = torch.where(valid, kept_values, torch.zeros_like(kept_values))
    num_nodes = logits.shape[-1] if nodes == "vocab" else k
    degrees, touched = degrees_from_kept(kept_values, kept_ids, row_graph, num_graphs, num_nodes, nodes, norm, logs)
    return TopKDegrees(degrees, touched, kept_values.detach(), kept_ids)
