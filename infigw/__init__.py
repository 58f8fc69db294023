"""infigw: kernel-accelerated Graph-on-Logits Distillation (GLD) and fusion losses for LLMs.

Public names: the losses (``GLDLoss``, ``ULDLoss``, ``InfiGFusionLoss`` and their fused-linear forms from hidden
states, ``FusedLinear*Loss``), ``functional``, the teacher inputs ``TopKRecord`` and ``TeacherHead``,
``logit_settings(model)``, and ``backends()`` (which implementations this machine can run, and why not).
"""
__version__ = "0.1.0"

from . import dispatch, functional
from .dispatch import BackendUnavailableError, backends
from .fused_linear import TeacherHead, logit_settings
from .losses import (FusedLinearGLDLoss, FusedLinearInfiGFusionLoss, FusedLinearULDLoss, GLDLoss, InfiGFusionLoss,
                     ULDLoss)
from .teacher import TopKRecord

dispatch.load_providers()  # registered now, not inside a torch.compile trace of the first call

__all__ = ["functional", "GLDLoss", "ULDLoss", "InfiGFusionLoss", "FusedLinearGLDLoss", "FusedLinearULDLoss",
           "FusedLinearInfiGFusionLoss", "TeacherHead", "logit_settings", "TopKRecord", "backends",
           "BackendUnavailableError", "__version__"]
