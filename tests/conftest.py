"""The (backend, device) pairs an op can be tested on here, as pytest parameters whose ids name them.

On this machine: ``cpp`` on CPU when the extension is built (not under INFIGW_DISABLE_EXTENSION=1), ``triton`` on
CPU under TRITON_INTERPRET=1 (marked ``triton_interpret``: CI's third stage), and, where a GPU is visible,
``cuda`` and ``triton`` on CUDA. The reference ``torch`` runs everywhere; op tests compare the other backends
with it, and check the properties every backend must have (the reference included) over ``with_reference=True``.
Interpreted Triton runs Python per program, so op tests give it only their tiny shapes (:func:`op_cases`).
"""
from dataclasses import dataclass

import pytest
import torch

from infigw import dispatch


@dataclass(frozen=True)
class Backend:
    name: str
    device: str

    @property
    def interpreted(self) -> bool:
        """Triton kernels run by the interpreter (CPU tensors): only tiny cases."""
        return self.name == "triton" and self.device == "cpu"

    def op(self, op: str):
        """The op-level callable of :mod:`infigw.dispatch` for this backend."""
        return dispatch.resolve(op, self.name, torch.device(self.device))[1]

    def __str__(self):
        return f"{self.name}-{self.device}"


def _available(op: str):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in dispatch.BACKENDS:
        for device in devices:
            try:
                dispatch.resolve(op, name, torch.device(device))
            except dispatch.BackendUnavailableError:
                continue
            yield Backend(name, device)


def _param(backend: Backend, *values, id_suffix=""):
    marks = [pytest.mark.triton_interpret] if backend.interpreted else []
    if backend.device == "cuda":
        marks.append(pytest.mark.gpu)
    return pytest.param(backend, *values, id=f"{backend}{id_suffix}", marks=marks)


def op_backends(op: str, with_reference: bool = False):
    """pytest params of every Backend that runs ``op`` here (the reference ``torch`` only if asked)."""
    return [_param(b) for b in _available(op) if with_reference or b.name != "torch"]


def op_cases(op: str, cases, tiny, with_reference: bool = False):
    """pytest params (backend, case) of every backend here x every case; interpreted Triton gets only the cases
    for which ``tiny(case)`` holds."""
    return [_param(b, case, id_suffix=f"-{case_id(case)}")
            for b in _available(op) if with_reference or b.name != "torch"
            for case in cases if tiny(case) or not b.interpreted]


def case_id(case) -> str:
    if isinstance(case, (tuple, list)):
        return "x".join(case_id(c) for c in case)
    return str(case).replace("torch.", "")


@pytest.fixture(autouse=True, scope="session")
def _small_triton_tiles():
    """Interpreted Triton gets 16-wide vocabulary tiles: tiny rows still cross several tiles and a ragged tail."""
    try:
        from infigw.triton import _common, topk_degrees
    except ImportError:
        yield
        return
    if not _common.INTERPRETED:
        yield
        return
    default = topk_degrees._MAX_BLOCK_V
    topk_degrees._MAX_BLOCK_V = 16
    yield
    topk_degrees._MAX_BLOCK_V = default
