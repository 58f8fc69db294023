"""nn.Module wrappers: they hold the configuration; all argument handling lives in :mod:`infigw.functional`."""
import torch

from . import functional as F


class _ConfiguredLoss(torch.nn.Module):
    """Stores keyword options and shows them in ``repr``."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items())


class GLDLoss(_ConfiguredLoss):
    """Graph-on-Logits Distillation loss; see :func:`infigw.functional.gld_loss` for every option.

    ``forward(student_logits, teacher_logits, labels=None, **per_call)``: ``per_call`` takes the per-batch
    arguments (mask, teacher_labels, teacher_mask) and may override stored options.
    """

    def __init__(self, k: int = 10, values: str = "logits", nodes: str = "vocab", graph_norm: str = "mean",
                 scope: str = "sequence", num_nodes=None, distance: str = "l1", temperature: float = 1.0,
                 reduction: str = "mean", teacher_weights=None, weight_temperature: float = 1.0,
                 weight_granularity: str = "sequence", ignore_index: int = -100, deterministic: bool = False,
                 backend: str = "auto", return_components: bool = False):
        super().__init__(k=k, values=values, nodes=nodes, graph_norm=graph_norm, scope=scope, num_nodes=num_nodes,
                         distance=distance, temperature=temperature, reduction=reduction,
                         teacher_weights=teacher_weights, weight_temperature=weight_temperature,
                         weight_granularity=weight_granularity, ignore_index=ignore_index,
                         deterministic=deterministic, backend=backend,
                         return_components=return_components)

    def forward(self, student_logits, teacher_logits, labels=None, **per_call):
        return F.gld_loss(student_logits, teacher_logits, labels, **{**self.options, **per_call})


class ULDLoss(_ConfiguredLoss):
    """Universal Logit Distillation loss; see :func:`infigw.functional.uld_loss` (several teachers: per-sequence or
    per-token uncertainty weights, ``teacher_weights="uncertainty" | "nll"``, ``weight_granularity``)."""

    def __init__(self, temperature: float = 1.0, top_k=None, standardize: bool = False, reduction: str = "mean",
                 teacher_weights=None, weight_temperature: float = 1.0, weight_k: int = 10,
                 weight_granularity: str = "sequence", ignore_index: int = -100, return_components: bool = False):
        super().__init__(temperature=temperature, top_k=top_k, standardize=standardize, reduction=reduction,
                         teacher_weights=teacher_weights, weight_temperature=weight_temperature, weight_k=weight_k,
                         weight_granularity=weight_granularity, ignore_index=ignore_index,
                         return_components=return_components)

    def forward(self, student_logits, teacher_logits, labels=None, **per_call):
        return F.uld_loss(student_logits, teacher_logits, labels, **{**self.options, **per_call})


class InfiGFusionLoss(_ConfiguredLoss):
    """``(1 - lam) * CE + lam * sum_s w_s (ULD_s + gamma * GLD_s)``; see :func:`infigw.functional.infigfusion_loss`
    (``weight_granularity="token"``: ULD weighted per aligned position, GLD per sequence)."""

    def __init__(self, lam: float = 0.5, gamma: float = 1.0, k: int = 10, values: str = "logits",
                 nodes: str = "vocab", graph_norm: str = "mean", num_nodes=None, distance: str = "l1",
                 temperature: float = 1.0, uld_top_k=None, standardize: bool = False, teacher_weights=None,
                 weight_temperature: float = 1.0, weight_granularity: str = "sequence", reduction: str = "mean",
                 ignore_index: int = -100, deterministic: bool = False, backend: str = "auto",
                 return_components: bool = False):
        super().__init__(lam=lam, gamma=gamma, k=k, values=values, nodes=nodes, graph_norm=graph_norm,
                         num_nodes=num_nodes, distance=distance, temperature=temperature, uld_top_k=uld_top_k,
                         standardize=standardize, teacher_weights=teacher_weights,
                         weight_temperature=weight_temperature, weight_granularity=weight_granularity,
                         reduction=reduction, ignore_index=ignore_index,
                         deterministic=deterministic, backend=backend, return_components=return_components)

    def forward(self, student_logits, teacher_logits, labels, **per_call):
        return F.infigfusion_loss(student_logits, teacher_logits, labels, **{**self.options, **per_call})
