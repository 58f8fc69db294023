"""Registers the reference as the always-available ``torch`` backend of every op."""
from .. import dispatch
from .closed_forms import gw1d_sorted, sorted_l1
from .degrees import topk_degrees
from .graph import coactivation_graph

dispatch.register("torch", "topk_degrees", topk_degrees)
dispatch.register("torch", "coactivation_graph", coactivation_graph)
dispatch.register("torch", "sorted_l1", sorted_l1)
dispatch.register("torch", "gw1d_sorted", gw1d_sorted)
