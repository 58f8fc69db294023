"""Which implementation of an op runs, and why.

Backends:
  ``torch``   the pure-PyTorch reference (:mod:`infigw.reference`); always available, any device.
  ``cpp``     the C++ CPU kernels of the extension ``infigw._C``; CPU tensors.
  ``cuda``    the CUDA kernels of ``infigw._C``; CUDA tensors.
  ``triton``  the Triton kernels (:mod:`infigw.triton`); CUDA tensors, or CPU tensors under
              ``TRITON_INTERPRET=1`` (how CI tests them).

``backend="auto"`` picks, per op and device, the first available entry of :data:`AUTO_ORDER`;
the environment variable ``INFIGW_BACKEND`` replaces ``auto`` by a fixed name. A backend asked for by
name that cannot run the call raises :class:`BackendUnavailableError` saying why; there is no silent fallback.

:data:`SHARED_OPS` are stages with one plain-torch implementation that serves every backend by design (no
kernel pays there, e.g. the O(N*k) degree aggregation of a stored teacher record); naming a backend selects the
kernels of the other ops and never fails on these.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Tuple

import torch

BACKENDS = ("torch", "cpp", "cuda", "triton")
OPS = ("topk_degrees", "sorted_gw1d", "topk_summary", "topk_summary_uld", "uld_full", "dlf_search")
SHARED_OPS = ("kept_degrees",)

# auto preference per device type and op, from the measurements in benchmarks/RESULTS.md (H100):
# topk_degrees: CUDA is faster than Triton at every shape (equal at fp32, k=10); sorted_gw1d: Triton
# 0.66 ms vs CUDA 1.12 ms fwd+bwd on 16 x 151936 lists. The sorted L1 (one elementwise pass, where torch's own
# kernels beat custom ones) and the explicit graph (validation only) have no kernels: they are plain torch.
# topk_summary, topk_summary_uld, uld_full (issue 15): C++ first on CPU (about 11x the torch path for the
# full-vocabulary ULD, benchmarks/RESULTS.md). On CUDA the summary is Triton's and its full-vocabulary ULD
# uld_full's CUDA kernel (topk_summary_uld has no GPU kernel); neither is timed on a GPU yet.
AUTO_ORDER: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "cpu": {"topk_degrees": ("cpp", "torch"), "sorted_gw1d": ("cpp", "torch"), "topk_summary": ("cpp", "torch"),
            "topk_summary_uld": ("cpp", "torch"), "uld_full": ("cpp", "torch"), "dlf_search": ("torch",)},
    "cuda": {
        "topk_degrees": ("cuda", "triton", "torch"),
        "topk_summary": ("triton", "torch"),
        "topk_summary_uld": ("torch",),
        "uld_full": ("cuda", "torch"),
        "sorted_gw1d": ("triton", "cuda", "torch"),
        "dlf_search": ("triton", "torch"),  # the Triton kernel; its torch path was never timed on a GPU
    },
}

# Modules that register implementations when imported, and why a backend may be missing.
_PROVIDERS = {
    "torch": ("infigw.reference", "infigw.dlf.search"),
    "cpp": ("infigw.extension",),
    "cuda": ("infigw.extension",),
    "triton": ("infigw.triton",),
}
_IMPLS: Dict[Tuple[str, str], Callable] = {}
_MAX_K: Dict[Tuple[str, str], int] = {}  # the largest k an implementation accepts, where it has a limit
_UNAVAILABLE: Dict[str, str] = {}
_loaded: set = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def register(backend: str, op: str, fn: Callable, max_k: int | None = None) -> None:
    """Called by provider modules at import time; ``max_k`` is the largest top-k the implementation takes."""
    if backend not in BACKENDS or op not in OPS + SHARED_OPS or (op in SHARED_OPS and backend != "torch"):
        raise ValueError(f"unknown backend/op pair ({backend!r}, {op!r})")
    _IMPLS[(backend, op)] = fn
    if max_k is not None:
        _MAX_K[(backend, op)] = max_k


def mark_unavailable(backend: str, reason: str) -> None:
    """Called by provider modules that cannot offer ``backend`` on this machine."""
    _UNAVAILABLE[backend] = reason


def _load(backend: str) -> None:
    for module in _PROVIDERS[backend]:
        if module in _loaded:
            continue
        _loaded.add(module)
        try:
            importlib.import_module(module)
        except Exception as exc:  # an optional dependency failing to import is a reason, not a crash
            for name, providers in _PROVIDERS.items():
                if module in providers:
                    _UNAVAILABLE.setdefault(name, f"importing {module} failed: {exc}")


def _why_not(backend: str, op: str, device: torch.device, k: int | None = None) -> str | None:
    """None when ``backend`` can run ``op`` on ``device`` (with top-k ``k``), else the reason it cannot."""
    _load(backend)
    if (backend, op) not in _IMPLS:
        return _UNAVAILABLE.get(backend, f"backend {backend!r} has no implementation of {op!r}")
    limit = _MAX_K.get((backend, op))
    if k is not None and limit is not None and k > limit:
        return f"backend {backend!r} supports k <= {limit} for {op!r}, got k = {k}"
    if backend == "cpp" and device.type != "cpu":
        return f"backend 'cpp' runs on CPU tensors, got a {device.type} tensor"
    if backend == "cuda" and device.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors, got a {device.type} tensor"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    return None


def load_providers() -> None:
    """Import every provider now (``import infigw`` does), so that no import happens inside a traced call."""
    for backend in BACKENDS:
        _load(backend)


def _requested(backend: str) -> str:
    if backend == "auto":
        backend = os.environ.get("INFIGW_BACKEND", "auto") or "auto"
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"the environment variable INFIGW_BACKEND must be 'auto' or one of {BACKENDS}, "
                             f"got {backend!r}")
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def resolve(op: str, backend: str, device: torch.device, k: int | None = None) -> Tuple[str, Callable]:
    """Return ``(backend_name, implementation)`` of ``op`` for tensors on ``device`` (and top-k ``k``)."""
    if op not in OPS + SHARED_OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS + SHARED_OPS}")
    backend = _requested(backend)
    if op in SHARED_OPS:
        _load("torch")
        return "torch", _IMPLS[("torch", op)]
    if backend == "auto":
        for candidate in AUTO_ORDER.get(device.type, {}).get(op, ("torch",)):
            if _why_not(candidate, op, device, k) is None:
                return candidate, _IMPLS[(candidate, op)]
        return "torch", _IMPLS[("torch", op)]
    reason = _why_not(backend, op, device, k)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run {op!r}: {reason}")
    return backend, _IMPLS[(backend, op)]


def backends() -> Dict[str, str]:
    """Map every backend name to ``"available"`` or the reason it is not, for this machine."""
    report = {}
    for name in BACKENDS:
        _load(name)
        have = any((name, op) in _IMPLS for op in OPS)
        if not have:
            report[name] = _UNAVAILABLE.get(name, "no implementation registered")
        elif name == "cuda" and not torch.cuda.is_available():
            report[name] = "built, but no CUDA device is visible"
        elif name == "triton" and not torch.cuda.is_available():
            report[name] = "importable; runs on CUDA tensors (CPU only under TRITON_INTERPRET=1)"
        else:
            report[name] = "available"
    return report
