"""Model merging for pairwise fusion: task arithmetic, TIES, DARE and RSAF (our reconstruction).

In memory (``merge_state_dicts``) or streaming over safetensors shards (``merge_safetensors``, CLI
``python -m infigw.merge``); both give bit-identical results. Methods are swappable: pass a name from
``METHODS`` plus its options, or any object implementing the ``MergeMethod`` protocol.
"""
from .engine import DEFAULT_CHUNK_ELEMS, TensorSource, merge_state_dicts, merge_tensor
from .methods import (
    METHODS,
    Dare,
    MergeMethod,
    MergePlan,
    Rsaf,
    TaskArithmetic,
    TensorStats,
    Ties,
    get_method,
    keep_count,
    rsaf_keep_ratios,
)
from .streaming import merge_safetensors, parse_size

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "METHODS",
    "Dare",
    "MergeMethod",
    "MergePlan",
    "Rsaf",
    "TaskArithmetic",
    "TensorSource",
    "TensorStats",
    "Ties",
    "get_method",
    "keep_count",
    "merge_safetensors",
    "merge_state_dicts",
    "merge_tensor",
    "parse_size",
    "rsaf_keep_ratios",
]
