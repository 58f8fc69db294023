"""Dynamic Logits Fusion (Fan et al., NeurIPS 2024, arXiv 2406.15480): decoding-time transfer of small
fine-tuned experts to a large base model.

Per decoding step and sequence, with large-base logits ``L``, small-base ``S`` and experts ``S_t``, the fused
distribution is ``softmax(L + Σ_t α_t (S_t − S))`` with α chosen on a grid to minimise
``Σ_t [(KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))²]`` — the *main-text* KL pairing of the paper (its
appendix's last display swaps the pairing; we do not follow it).

:func:`dlf_search` is the fused search (the ``dlf_search`` op of :mod:`infigw.dispatch`: Triton kernels in
:mod:`infigw.triton.dlf_search`, a vectorised torch path in :mod:`infigw.dlf.search`), :func:`dlf_reference` the
brute-force ground truth, :class:`DLFLogitsProcessor` and :func:`dlf_generate` the Hugging Face decoding helpers
(``docs/dlf.md``).
"""
from .common import DEFAULT_GRID, MODES, DLFResult, candidate_alphas
from .decoding import DLFGeneration, DLFLogitsProcessor, dlf_generate
from .reference import dlf_reference
from .search import dlf_search

__all__ = [
    "DEFAULT_GRID",
    "MODES",
    "DLFGeneration",
    "DLFLogitsProcessor",
    "DLFResult",
    "candidate_alphas",
    "dlf_generate",
    "dlf_reference",
    "dlf_search",
]
