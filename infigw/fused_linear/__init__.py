"""Fused-linear losses: GLD, ULD and the InfiGFusion objective from hidden states and the LM head, never forming
the (B*T, V) logits (docs/fused_linear.md).

The student's logits exist one chunk of positions at a time: ``transform(hidden @ W^T + b)`` in fp32, reduced at
once to what the losses read from each row (its :class:`~infigw.summary.TopKSummary` through the dispatched
``topk_summary`` op: the top-k logits and ids, the logsumexps, the gold logit; and the full-vocabulary ULD terms
through the ``uld_full`` op), then dropped. Everything after that is the logits path's own code on O(B*T*k)
tensors, so values and gradients are the logits path's.

How the gradient reaches the hidden states and the head (accumulated in fp32):

- *folded*: under ``reduction="mean"``/``"sum"`` the loss is linear in the per-position cross-entropy and
  full-vocabulary ULD terms, with coefficients known before the pass (teacher weights are detached). The forward
  differentiates those terms on each chunk and projects them to the hidden/weight gradients at once; the backward
  only scales them (Liger's fused-linear design);
- *sparse*: the kept top-k logits (GLD with values "logits"/"topk_probs", the top-k ULD) and the gold logit have a
  k-sparse gradient: the backward reads the k rows of W each position kept, and no logits;
- *recomputed*: the rest (the logsumexp behind ``values="probs"``, every term under ``reduction="none"``)
  recomputes each chunk's logits in the backward.

A teacher may be dense logits, :class:`~infigw.TopKRecord` records, or a :class:`TeacherHead` (its own hidden
states and head, never materialised either): that teacher is summarised once per call, chunk by chunk, into a
record of its top logits and logsumexp, and for the full-vocabulary ULD its paired rows are projected per chunk.

Modules: :mod:`.head` (inputs, logit post-processing, chunk sizes), :mod:`.teachers`, :mod:`.summary_pass` (the
autograd function of the fused pass), :mod:`.losses` (the public functions, re-exported by
:mod:`infigw.functional`).
"""
from .head import logit_settings
from .losses import fused_linear_gld_loss, fused_linear_infigfusion_loss, fused_linear_uld_loss
from .teachers import TeacherHead

__all__ = ["fused_linear_gld_loss", "fused_linear_uld_loss", "fused_linear_infigfusion_loss", "TeacherHead",
           "logit_settings"]
