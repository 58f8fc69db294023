"""The explicit co-activation graph in Triton (validation at large sizes; GLD itself never forms it).

One program per row writes the k x k outer product a_p a_p^T of a valid row as (key, value) pairs with
key = (graph * M + node_i) * M + node_j (M = number of node ids), which orders entries lexicographically by
(graph, i, j); the pairs are coalesced by the deterministic stable-sort segment sum of
:mod:`.topk_degrees`, then normalised (mean: 1/c_g; cosine: 1/sqrt(G_ii G_jj), 0 where a diagonal is 0).
The output size is data dependent, so this op syncs with the host once; it is a ``custom_op`` whose fake
kernel declares a dynamic nnz.
"""
import torch
import triton
import triton.language as tl

from ..ops.common import NODES, NORMS
from .topk_degrees import _MODE_DIAG, _aggregate, _pad, _row_scale, check_device, segment_sum


@triton.jit
def _outer_products_kernel(kept_val_ptr, kept_id_ptr, row_graph_ptr, key_ptr, prod_ptr, num_ids, sentinel,
                           K: tl.constexpr, K_PAD: tl.constexpr, RANK_NODES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, K_PAD)
    in_k = slot < K
    graph = tl.load(row_graph_ptr + row)
    live = in_k & (graph >= 0)
    a = tl.load(kept_val_ptr + row * K + slot, mask=live, other=0.0)
    if RANK_NODES:
        node = slot.to(tl.int64)
    else:
        node = tl.load(kept_id_ptr + row * K + slot, mask=live, other=0)
    pair = live[:, None] & live[None, :]
    key = (graph * num_ids + node[:, None]) * num_ids + node[None, :]
    out = row * K * K + slot[:, None] * K + slot[None, :]
    stored = in_k[:, None] & in_k[None, :]
    tl.store(key_ptr + out, tl.where(pair, key, sentinel), mask=stored)
    tl.store(prod_ptr + out, a[:, None] * a[None, :], mask=stored)


@torch.library.custom_op("infigw_triton::coactivation_graph", mutates_args=())
def _coactivation_graph_op(kept_values: torch.Tensor, kept_ids: torch.Tensor, row_graph: torch.Tensor,
                           num_graphs: int, nodes_mode: int, norm_mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, k = kept_values.shape
    device = kept_values.device
    rank_nodes = nodes_mode == NODES["rank"]
    valid = row_graph >= 0
    if rank_nodes:
        num_ids = k
    else:  # the largest kept id of a valid row bounds the node ids (one host sync)
        num_ids = int(torch.where(valid.unsqueeze(-1), kept_ids, 0).max()) + 1 if rows else 1
    sentinel = num_graphs * num_ids * num_ids
    keys = torch.empty(rows * k * k, dtype=torch.int64, device=device)
    products = torch.empty(rows * k * k, dtype=torch.float32, device=device)
    if rows:
        _outer_products_kernel[(rows,)](kept_values, kept_ids, row_graph, keys, products, num_ids, sentinel,
                                        K=k, K_PAD=_pad(k), RANK_NODES=rank_nodes)
    flat, summed = segment_sum(products, keys, sentinel)
    graph = flat // (num_ids * num_ids)
    node_i = (flat // num_ids) % num_ids
    node_j = flat % num_ids
    if norm_mode == NORMS["mean"]:
        summed = summed * _row_scale(row_graph, num_graphs, norm_mode)[graph]
    elif norm_mode == NORMS["cosine"]:
        diag = _aggregate(_MODE_DIAG, kept_values, kept_ids, row_graph, num_graphs, num_ids, rank_nodes, True)
        safe = torch.where(diag > 0, diag, torch.ones_like(diag))
        inv_sqrt = torch.where(diag > 0, safe.rsqrt(), torch.zeros_like(diag))
        summed = summed * inv_sqrt[graph, node_i] * inv_sqrt[graph, node_j]
    return torch.stack([graph, node_i, node_j]), summed


@_coactivation_graph_op.register_fake
def _(kept_values, kept_ids, row_graph, num_graphs, nodes_mode, norm_mode):
    nnz = torch.library.get_ctx().new_dynamic_size()
    return kept_ids.new_empty(3, nnz), kept_values.new_empty(nnz)


def coactivation_graph(kept_values, kept_ids, row_graph, num_graphs: int, nodes: str = "vocab",
                       norm: str = "mean"):
    """The op-level callable of :mod:`infigw.dispatch`: coalesced COO ``(indices (3, nnz), values (nnz,))``."""
    if not isinstance(kept_values, torch.Tensor) or kept_values.dim() != 2 or kept_values.dtype != torch.float32:
        raise ValueError(f"kept_values must be a 2-D (N, k) float32 tensor, got "
                         f"{getattr(kept_values, 'dtype', type(kept_values))} "
                         f"{tuple(getattr(kept_values, 'shape', ()))}")
    if not isinstance(kept_ids, torch.Tensor) or kept_ids.dtype != torch.int64 or kept_ids.shape != kept_values.shape:
        raise ValueError(f"kept_ids must be an int64 tensor of shape {tuple(kept_values.shape)}, got "
                         f"{getattr(kept_ids, 'dtype', type(kept_ids))} {tuple(getattr(kept_ids, 'shape', ()))}")
    if not isinstance(row_graph, torch.Tensor) or row_graph.dtype != torch.int64 or \
            row_graph.shape != kept_values.shape[:1]:
        raise ValueError(f"row_graph must be an int64 tensor of shape ({kept_values.shape[0]},), got "
                         f"{getattr(row_graph, 'dtype', type(row_graph))} {tuple(getattr(row_graph, 'shape', ()))}")
    if kept_ids.device != kept_values.device or row_graph.device != kept_values.device:
        raise ValueError("kept_values, kept_ids and row_graph must be on one device")
    if isinstance(num_graphs, bool) or not isinstance(num_graphs, int) or num_graphs < 0:
        raise ValueError(f"num_graphs must be an int >= 0, got {num_graphs!r}")
    if nodes not in NODES:
        raise ValueError(f"nodes must be one of {tuple(NODES)}, got {nodes!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {tuple(NORMS)}, got {norm!r}")
    check_device(kept_values, "kept_values")
    return torch.ops.infigw_triton.coactivation_graph(
        kept_values.contiguous(), kept_ids.contiguous(), row_graph.contiguous(), num_graphs, NODES[nodes],
        NORMS[norm])
