"""Stage 2 of GLD: per-graph weighted node degrees of the co-activation graph, never forming the graph.

For graph g (a sequence, or the whole batch) with valid rows p and k-sparse node vectors a_p:

    G_g = (1 / c_g) * sum_p a_p a_p^T,    d_g[i] = sum_j G_g[i, j] = (1 / c_g) * sum_p a_p[i] * s_p,

with s_p = sum_j a_p[j], c_g = number of valid rows (``mean``) or 1 (``sum``). ``cosine`` (ours) normalises
G_ij by sqrt(G_ii G_jj): with D_i = sum_p a_p[i]^2 and w_i = D_i^(-1/2) (0 where D_i = 0) the degrees are
those of the ``sum`` graph built from a_p[i] * w_i. O(rows * k) work and memory beyond the outputs.
"""
import torch

from ..contract import NODES, NORMS, TopKDegrees, compute_dtype
from .select import row_logsumexp, select_topk, transform_values


def node_ids(kept_ids: torch.Tensor, nodes: str) -> torch.Tensor:
    """Node id of every kept slot (N, k): the vocabulary id, or the rank slot."""
    if nodes == "vocab":
        return kept_ids
    if nodes == "rank":
        return torch.arange(kept_ids.shape[-1], device=kept_ids.device).expand_as(kept_ids)
    raise ValueError(f"nodes must be one of {tuple(NODES)}, got {nodes!r}")


def _scatter_per_graph(row_graph, nodes_of_slot, contributions, num_graphs, num_nodes):
    """Sum ``contributions`` (N, k) into (num_graphs, num_nodes) at (row_graph[p], nodes_of_slot[p, r])."""
    valid = row_graph >= 0
    flat = (row_graph.clamp_min(0).unsqueeze(-1) * num_nodes + nodes_of_slot).reshape(-1)
    contributions = torch.where(valid.unsqueeze(-1), contributions, torch.zeros_like(contributions))
    out = contributions.new_zeros(num_graphs * num_nodes)
    return out.index_add(0, flat, contributions.reshape(-1)).view(num_graphs, num_nodes)


def degrees_from_kept(kept_values, kept_ids, row_graph, num_graphs: int, num_nodes: int, nodes: str, norm: str):
    """Degrees and touched nodes of each graph from the kept entries.

    Args:
        kept_values: (N, k) f32 node values a_p (differentiable).
        kept_ids: (N, k) int64 vocabulary ids of the kept entries, rank order.
        row_graph: (N,) int64 graph index of each row, -1 for a masked row.
        num_graphs: G. num_nodes: V for vocab nodes, k for rank nodes.
    Returns:
        degrees (G, num_nodes) f32 and touched (G, num_nodes) bool.
    """
    if norm not in NORMS:
        raise ValueError(f"graph_norm must be one of {tuple(NORMS)}, got {norm!r}")
    slot_nodes = node_ids(kept_ids, nodes)
    valid = (row_graph >= 0).unsqueeze(-1)
    values = kept_values.to(compute_dtype(kept_values.dtype))
    values = torch.where(valid, values, torch.zeros_like(values))
    if norm == "cosine":
        diag = _scatter_per_graph(row_graph, slot_nodes, values * values, num_graphs, num_nodes)
        # where() keeps the gradient finite at D = 0 (such a node only ever meets a_p = 0).
        safe = torch.where(diag > 0, diag, torch.ones_like(diag))
        scale = torch.where(diag > 0, safe.rsqrt(), torch.zeros_like(diag))
        values = values * scale[row_graph.clamp_min(0).unsqueeze(-1), slot_nodes]
    contributions = values * values.sum(-1, keepdim=True)
    degrees = _scatter_per_graph(row_graph, slot_nodes, contributions, num_graphs, num_nodes)
    if norm == "mean":
        rows = values.new_zeros(num_graphs).index_add(0, row_graph.clamp_min(0), (row_graph >= 0).to(values.dtype))
        degrees = degrees / rows.clamp_min(1).unsqueeze(-1)
    touched = _scatter_per_graph(
        row_graph, slot_nodes, torch.ones_like(values), num_graphs, num_nodes
    ) > 0
    return degrees, touched


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
    kept_values = transform_values(kept, values, temperature, row_lse)
    kept_values = torch.where(valid, kept_values, torch.zeros_like(kept_values))
    num_nodes = logits.shape[-1] if nodes == "vocab" else k
    degrees, touched = degrees_from_kept(kept_values, kept_ids, row_graph, num_graphs, num_nodes, nodes, norm)
    return TopKDegrees(degrees, touched, kept_values.detach(), kept_ids)
