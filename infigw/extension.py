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
from .contract import CUDA_MAX_K, TopKDegrees, compute_dtype


def _load_reason():
    """None when ``infigw._C`` is loaded, else why it is not."""
    if os.environ.get("INFIGW_DISABLE_EXTENSION", "0") == "1":
        return "disabled by INFIGW_DISABLE_EXTENSION=1"
    try:
        from . import _C  # noqa: F401  (importing runs the op registrations)
    except ImportError as exc:
        return f"infigw._C is not built ({exc}); build it with `python setup.py build_ext --inplace` or pip install"
    return None


# ---- op-level callables (signatures of infigw.contract) -------------------------------------------------
# infigw builds their index arguments, so they skip the data scan (check_data=False: no host sync on CUDA).

def topk_degrees(logits, row_graph, num_graphs, k, values, temperature, nodes, norm, deterministic):
    degrees, touched, kept_values, kept_ids, _ = torch.ops.infigw.topk_degrees(
        logits, row_graph, int(num_graphs), int(k), values, float(temperature), nodes, norm, bool(deterministic),
        False)
    return TopKDegrees(degrees, touched, kept_values, kept_ids)


def sorted_gw1d(x, y, lengths):
    return torch.ops.infigw.sorted_gw1d(x, y, lengths, False)


CALLABLES = {  # dispatch op -> (callable, the torch.ops op whose kernels it runs)
    "topk_degrees": (topk_degrees, "topk_degrees"),
    "sorted_gw1d": (sorted_gw1d, "sorted_gw1d"),
}


# ---- fake kernels (shapes for torch.compile / meta tensors) -------------------------------------------------

def _register_fakes():
    @torch.library.register_fake("infigw::topk_degrees")
    def _(logits, row_graph, num_graphs, k, values, temperature, nodes, graph_norm, deterministic, check_data=True):
        rows, vocab = logits.shape
        acc = compute_dtype(logits.dtype)
        num_nodes = vocab if nodes == "vocab" else k
        return (
            logits.new_empty((num_graphs, num_nodes), dtype=acc),
            logits.new_empty((num_graphs, num_nodes), dtype=torch.bool),
            logits.new_empty((rows, k), dtype=acc),
            logits.new_empty((rows, k), dtype=torch.int64),
            logits.new_empty((rows if values != "logits" else 0,), dtype=acc),
        )

    @torch.library.register_fake("infigw::topk_degrees_backward")
    def _(grad_degrees, logits, row_graph, kept_values, kept_ids, row_lse, num_graphs, values, temperature, nodes,
          graph_norm, check_data=True):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("infigw::sorted_gw1d")
    def _(x, y, lengths, check_data=True):
        return x.new_empty(x.shape[:1])

    @torch.library.register_fake("infigw::sorted_gw1d_backward")
    def _(grad, x, y, lengths, check_data=True):
        return x.new_empty(x.shape), y.new_empty(y.shape)


# ---- autograd --------------------------------------------------------------------------------------------

# The backward ops get the forward's own indices: no data scan (check_data=False).

def _topk_degrees_setup(ctx, inputs, output):
    logits, row_graph, num_graphs, _, values, temperature, nodes, graph_norm = inputs[:8]
    _, touched, kept_values, kept_ids, row_lse = output
    ctx.save_for_backward(logits, row_graph, kept_values, kept_ids, row_lse)
    ctx.options = (num_graphs, values, temperature, nodes, graph_norm)
    ctx.mark_non_differentiable(touched, kept_values, kept_ids, row_lse)


def _topk_degrees_backward(ctx, grad_degrees, *_):
    logits, row_graph, kept_values, kept_ids, row_lse = ctx.saved_tensors
    grad_logits = torch.ops.infigw.topk_degrees_backward(
        grad_degrees, logits, row_graph, kept_values, kept_ids, row_lse, *ctx.options, False)
    return (grad_logits,) + (None,) * 9


def _sorted_gw1d_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])


def _sorted_gw1d_backward(ctx, grad):
    x, y, lengths = ctx.saved_tensors
    grad_x, grad_y = torch.ops.infigw.sorted_gw1d_backward(grad, x, y, lengths, False)
    return grad_x, grad_y, None, None


def _register_autograd():
    torch.library.register_autograd(
        "infigw::topk_degrees", _topk_degrees_backward, setup_context=_topk_degrees_setup)
    torch.library.register_autograd("infigw::sorted_gw1d", _sorted_gw1d_backward,
                                   setup_context=_sorted_gw1d_setup)


def _register_backends(callables):
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    for op, (fn, kernel) in callables.items():
        if has_kernel(f"infigw::{kernel}", "CPU"):
            dispatch.register("cpp", op, fn)
        if has_kernel(f"infigw::{kernel}", "CUDA"):
            dispatch.register("cuda", op, fn, max_k=CUDA_MAX_K if op == "topk_degrees" else None)
    if not has_kernel("infigw::topk_degrees", "CUDA"):
        dispatch.mark_unavailable("cuda", "infigw._C was built without CUDA kernels")


_reason = _load_reason()
if _reason is None:
    _register_fakes()
    _register_autograd()
    from . import extension_objective  # noqa: E402  (the objective's ops: their fakes and autograd register there)
    _register_backends({**CALLABLES, **extension_objective.CALLABLES})
else:
    dispatch.mark_unavailable("cpp", _reason)
    dispatch.mark_unavailable("cuda", _reason)
