"""Triton kernels of infigw: the ``triton`` backend of :mod:`infigw.dispatch`.

The loss ops are ``torch.library.triton_op``s in the ``infigw_triton`` namespace (``torch.compile`` traces into
the kernels without graph breaks) with their autograd registered beside them, one file per op; ``dlf_search``
(decoding, no gradient) launches its kernels directly. What they share is in ``_common.py``. Kernels run on CUDA
tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (read when this package is imported), which is how CI
tests them. Importing this package without Triton marks the backend unavailable with the reason.
"""
from .. import dispatch

try:
    import triton  # noqa: F401
except ImportError as exc:  # the backend is optional
    dispatch.mark_unavailable("triton", f"triton is not importable: {exc}")
else:
    from . import closed_forms, dlf_search, topk_degrees, topk_summary

    dispatch.register("triton", "topk_degrees", topk_degrees.topk_degrees, max_k=topk_degrees.MAX_K)
    dispatch.register("triton", "topk_summary", topk_summary.topk_summary, max_k=topk_degrees.MAX_K)
    dispatch.register("triton", "sorted_gw1d", closed_forms.sorted_gw1d)
    dispatch.register("triton", "dlf_search", dlf_search.dlf_search)
