"""The GLD contract (docs/math.md) in plain PyTorch: the reference every backend is tested against.

Stages, in data-flow order: select (top-k + value transform) -> degrees (per-graph node degrees) -> graph
(explicit co-activation graph, for validation) -> closed_forms (sort/compress, sorted L1, 1-D GW) -> uld.
"""
from .. import dispatch
from .closed_forms import sorted_gw1d, pad_to, sorted_degrees, sorted_l1
from .degrees import degrees_from_kept, node_ids, topk_degrees
from .graph import coactivation_graph, dense_graphs
from .select import rank_order, row_logsumexp, select_topk, transform_values
from .summary import topk_summary, topk_summary_uld
from .uld import sort_descending, sorted_prob_l1, standardize, uld_full, uld_probabilities

__all__ = [
    "select_topk", "rank_order", "row_logsumexp", "transform_values",
    "node_ids", "degrees_from_kept", "topk_degrees",
    "coactivation_graph", "dense_graphs",
    "sorted_degrees", "pad_to", "sorted_l1", "sorted_gw1d",
    "standardize", "uld_probabilities", "sort_descending", "sorted_prob_l1", "uld_full",
    "topk_summary", "topk_summary_uld",
]

# the always-available ``torch`` backend of every dispatched op
dispatch.register("torch", "topk_degrees", topk_degrees)
dispatch.register("torch", "sorted_gw1d", sorted_gw1d)
dispatch.register("torch", "kept_degrees", degrees_from_kept)
dispatch.register("torch", "topk_summary", topk_summary)
dispatch.register("torch", "topk_summary_uld", topk_summary_uld)
dispatch.register("torch", "uld_full", uld_full)
