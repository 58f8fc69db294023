"""The explicit co-activation graph, for validation and exact-GW comparisons (GLD never needs it)."""
import torch

from .degrees import node_ids


def coactivation_graph(kept_values, kept_ids, row_graph, num_graphs: int, nodes: str = "vocab", norm: str = "mean"):
    """Coalesced COO entries of G_g = (1/c_g) sum_p a_p a_p^T for every graph g.

    Args:
        kept_values: (N, k) f32 node values; kept_ids: (N, k) int64; row_graph: (N,) int64 (-1 = masked).
    Returns:
        indices (3, nnz) int64 with rows (graph, node_i, node_j) sorted lexicographically, and values (nnz,)
        f32. Every pair of touched nodes that co-occur in a kept set has an entry (possibly 0).
    """
    valid = row_graph >= 0
    values = kept_values[valid].float()
    slots = node_ids(kept_ids, nodes)[valid]
    graphs = row_graph[valid]
    k = values.shape[-1]
    g = graphs.view(-1, 1, 1).expand(-1, k, k)
    i = slots.unsqueeze(-1).expand(-1, k, k)
    j = slots.unsqueeze(-2).expand(-1, k, k)
    keys = torch.stack([g.reshape(-1), i.reshape(-1), j.reshape(-1)])
    indices, inverse = torch.unique(keys, dim=1, return_inverse=True)
    products = (values.unsqueeze(-1) * values.unsqueeze(-2)).reshape(-1)
    summed = products.new_zeros(indices.shape[1]).index_add(0, inverse, products)
    if norm == "mean":
        rows = torch.bincount(graphs, minlength=num_graphs).clamp_min(1).float()
        summed = summed / rows[indices[0]]
    elif norm == "cosine":
        # G_ij / sqrt(G_ii G_jj): every touched node has its diagonal entry, found by the key (graph, node).
        stride = int(indices[1].max()) + 1 if indices.numel() else 1
        on_diag = indices[1] == indices[2]
        diag_keys = indices[0][on_diag] * stride + indices[1][on_diag]  # ascending: indices are sorted
        diag = summed[on_diag]
        inv_sqrt = torch.where(diag > 0, diag.clamp_min(torch.finfo(torch.float32).tiny).rsqrt(), torch.zeros_like(diag))

        def inv_sqrt_of(node):
            return inv_sqrt[torch.searchsorted(diag_keys, indices[0] * stride + node)]

        summed = summed * inv_sqrt_of(indices[1]) * inv_sqrt_of(indices[2])
    elif norm != "sum":
        raise ValueError(f"graph_norm must be 'mean', 'sum' or 'cosine', got {norm!r}")
    return indices, summed


def dense_graphs(indices, values, num_graphs: int):
    """Dense matrices over the touched node ids (ascending) of each graph, from coalesced COO entries.

    Returns a list of ``num_graphs`` pairs ``(node_ids (n,) int64, matrix (n, n) f32)``; n = 0 for a graph
    with no valid row.
    """
    out = []
    for graph in range(num_graphs):
        mine = indices[0] == graph
        rows, cols, vals = indices[1][mine], indices[2][mine], values[mine]
        ids = torch.unique(rows)
        matrix = vals.new_zeros(ids.numel(), ids.numel())
        matrix[torch.searchsorted(ids, rows), torch.searchsorted(ids, cols)] = vals
        out.append((ids, matrix))
    return out
