"""infigw: kernel-accelerated Graph-on-Logits Distillation (GLD) and fusion losses for LLMs.

Public names: the losses (``GLDLoss``, ``ULDLoss``, ``InfiGFusionLoss``), ``functional``, the teacher record
type ``TopKRecord``, and ``backends()`` (which implementations this machine can run, and why not).
"""
__version__ = "0.1.0"

from . import dispatch, functional
from .dispatch import BackendUnavailableError, backends
from .losses import GLDLoss, InfiGFusionLoss, ULDLoss
from .teacher import TopKRecord

dispatch.load_providers()  # registered now, not inside a torch.compile trace of the first call

__all__ = ["functional", "GLDLoss", "ULDLoss", "InfiGFusionLoss", "TopKRecord", "backends",
           "BackendUnavailableError", "__version__"]
