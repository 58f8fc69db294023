"""What every backend of an op shares: the option codes, the kernels' k limit and the result type.

The codes are those of ``csrc/contract.h`` (the one C++ copy; ``tests/test_contract.py`` keeps the two equal).
The C++ schemas take the options as strings; the codes here serve the Triton kernels, whose constexpr mode
arguments are these integers.

An op implementation ("backend") is a plain Python callable registered in :mod:`infigw.dispatch`; all
backends of one op take the same arguments and return the same thing:

``topk_degrees(logits, row_graph, num_graphs, k, values, temperature, nodes, norm, deterministic)``
    logits (N, V) fp32/fp16/bf16; row_graph (N,) int64, graph index per row or -1 for a masked row.
    Returns :class:`TopKDegrees`; ``degrees`` is differentiable w.r.t. ``logits``.
``sorted_gw1d(x, y, lengths)``
    x, y (G, L) f32 descending lists, lengths (G,) int64 -> (G,) f32; differentiable in x and y.

The callables trust their index arguments (infigw builds them): the compiled and Triton ops validate the data
of direct calls, see ``csrc/op_checks.h``.
"""
from typing import NamedTuple

import torch

#: values= -> code: how a kept logit becomes its node value (docs/math.md §2).
VALUES = {"logits": 0, "probs": 1, "topk_probs": 2}
#: nodes= -> code: a node is a vocabulary id or a rank slot.
NODES = {"vocab": 0, "rank": 1}
#: graph_norm= -> code (docs/math.md §3).
NORMS = {"mean": 0, "sum": 1, "cosine": 2}
#: The largest k of the CUDA kernels (kCudaMaxK of csrc/contract.h).
CUDA_MAX_K = 256


class TopKDegrees(NamedTuple):
    """Per-graph node degrees and the kept top-k entries they were built from.

    degrees:     (G, num_nodes) f32; num_nodes = V for vocab nodes, k for rank nodes.
    touched:     (G, num_nodes) bool; the node appears in a kept set of a valid row of that graph.
    kept_values: (N, k) f32 transformed node values a_p in rank order (0 on masked rows), detached.
    kept_ids:    (N, k) int64 vocabulary ids in rank order (value descending, ties to the smaller id);
                 unspecified on masked rows (kernels skip those rows entirely).
    """

    degrees: torch.Tensor
    touched: torch.Tensor
    kept_values: torch.Tensor
    kept_ids: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every input dtype, except fp64 inputs (gradcheck), which stay fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32

# Option names of the public losses (the kernels' codes above cover values / nodes / graph_norm).
SCOPES = ("sequence", "batch")
DISTANCES = ("l1", "mean_l1", "gw1d")
REDUCTIONS = ("mean", "sum", "none")
GRANULARITIES = ("sequence", "token")
PAIRINGS = ("index", "offsets")
