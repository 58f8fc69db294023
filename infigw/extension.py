"""The compiled kernels of ``infigw._C`` as the ``cpp`` (CPU) and ``cuda`` backends.

Importing this module loads the extension (its static registrations define the ``torch.ops.infigw.*`` ops,
see ``csrc/ops.cpp``), adds what the C++ side does not provide -- fake kernels for torch.compile and autograd
formulas -- and registers the op-level callables of :mod:`infigw.contract` with :mod:`infigw.dispatch`.
The same callables serve both backends: the torch dispatcher routes each call to the CPU or CUDA kernel by
the tensors' device. Set ``INFIGW_DISABLE_EXTENSION=1`` to run as if the extension were not built.
"""
import os

import torch

from . import dispatch
from .contract import NODES, NORMS, VALUES, TopKDegrees, compute_dtype

PROBS = VALUES["probs"]
CUDA_MAX_K = 256  # kMaxK of csrc/cuda/common.cuh: the candidate buffer is sized for it
VOCAB = NODES["vocab"]


def _load_reason():
    """None when ``infigw._C`` is loaded, else why it is not."""
    if os.environ.get("INFIGW_DISABLE_EXTENSION", "0") == "1":
        return "disabled by INFIGW_DISABLE_EXTENSION=1"
    try:
        from . import _C  # noqa: F401  (importing runs the op registrations)
    except ImportError as exc:
        return f"infigw._C is not built ({exc}); build it with `python setup.py build_ext --inplace` or pip install"
    return None


def _code(table, name, argument):
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(f"{argument} must be one of {tuple(table)}, got {name!r}") from None


# ---- op-level callables (signatures of infigw.contract) -------------------------------------------------

def topk_degrees(logits, row_graph, num_graphs, k, values, temperature, nodes, norm, deterministic):
    degrees, touched, kept_values, kept_ids, _ = torch.ops.infigw.topk_degrees(
        logits, row_graph, int(num_graphs), int(k), _code(VALUES, values, "values"), float(temperature),
        _code(NODES, nodes, "nodes"), _code(NORMS, norm, "graph_norm"), bool(deterministic))
    return TopKDegrees(degrees, touched, kept_values, kept_ids)


def sorted_gw1d(x, y, lengths):
    return torch.ops.infigw.sorted_gw1d(x, y, lengths)


CALLABLES = {
    "topk_degrees": topk_degrees,
    "sorted_gw1d": sorted_gw1d,
}


# ---- fake kernels (shapes for torch.compile / meta tensors) -------------------------------------------------

def _register_fakes():
    @torch.library.register_fake("infigw::topk_degrees")
    def _(logits, row_graph, num_graphs, k, values_mode, temperature, nodes_mode, norm_mode, deterministic):
        rows, vocab = logits.shape
        acc = compute_dtype(logits.dtype)
        num_nodes = vocab if nodes_mode == VOCAB else k
        return (
            logits.new_empty((num_graphs, num_nodes), dtype=acc),
            logits.new_empty((num_graphs, num_nodes), dtype=torch.bool),
            logits.new_empty((rows, k), dtype=acc),
            logits.new_empty((rows, k), dtype=torch.int64),
            logits.new_empty((rows if values_mode == PROBS else 0,), dtype=acc),
        )

    @torch.library.register_fake("infigw::topk_degrees_backward")
    def _(grad_degrees, logits, row_graph, kept_values, kept_ids, row_lse, num_graphs, values_mode, temperature,
          nodes_mode, norm_mode):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("infigw::sorted_gw1d")
    def _(x, y, lengths):
        return x.new_empty(x.shape[:1])

    @torch.library.register_fake("infigw::sorted_gw1d_backward")
    def _(grad, x, y, lengths):
        return x.new_empty(x.shape), y.new_empty(y.shape)


# ---- autograd --------------------------------------------------------------------------------------------

def _topk_degrees_setup(ctx, inputs, output):
    logits, row_graph, num_graphs, _, values_mode, temperature, nodes_mode, norm_mode, _ = inputs
    _, touched, kept_values, kept_ids, row_lse = output
    ctx.save_for_backward(logits, row_graph, kept_values, kept_ids, row_lse)
    ctx.modes = (num_graphs, values_mode, temperature, nodes_mode, norm_mode)
    ctx.mark_non_differentiable(touched, kept_values, kept_ids, row_lse)


def _topk_degrees_backward(ctx, grad_degrees, *_):
    logits, row_graph, kept_values, kept_ids, row_lse = ctx.saved_tensors
    grad_logits = torch.ops.infigw.topk_degrees_backward(
        grad_degrees, logits, row_graph, kept_values, kept_ids, row_lse, *ctx.modes)
    return (grad_logits,) + (None,) * 8


def _pair_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sorted_gw1d_backward(ctx, grad):
    x, y, lengths = ctx.saved_tensors
    grad_x, grad_y = torch.ops.infigw.sorted_gw1d_backward(grad, x, y, lengths)
    return grad_x, grad_y, None


def _register_autograd():
    torch.library.register_autograd(
        "infigw::topk_degrees", _topk_degrees_backward, setup_context=_topk_degrees_setup)
    torch.library.register_autograd("infigw::sorted_gw1d", _sorted_gw1d_backward, setup_context=_pair_setup)


def _register_backends():
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    for op, fn in CALLABLES.items():
        if has_kernel(f"infigw::{op}", "CPU"):
            dispatch.register("cpp", op, fn)
        if has_kernel(f"infigw::{op}", "CUDA"):
            dispatch.register("cuda", op, fn, max_k=CUDA_MAX_K if op == "topk_degrees" else None)
    if not has_kernel("infigw::topk_degrees", "CUDA"):
        dispatch.mark_unavailable("cuda", "infigw._C was built without CUDA kernels")


_reason = _load_reason()
if _reason is None:
    _register_fakes()
    _register_autograd()
    _register_backends()
    from . import extension_objective  # noqa: E402,F401  (the objective's kernels register themselves there)
else:
    dispatch.mark_unavailable("cpp", _reason)
    dispatch.mark_unavailable("cuda", _reason)
