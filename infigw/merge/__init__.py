"""Model merging: mergekit's task arithmetic, TIES, DARE and linear rules, and RSAF (our reconstruction).

In memory (``merge_state_dicts``) or streaming over safetensors shards (``merge_safetensors``); both give
bit-identical results. mergekit YAML configs run as they are (``run_config``, CLI
``python -m infigw.merge CONFIG.yml OUT``). Methods are swappable: pass a name from ``METHODS`` plus its
options, or any object implementing the ``MergeMethod`` protocol.
"""
from .config import MergeConfig, load_config, run_config
from .engine import DEFAULT_CHUNK_ELEMS, TensorSource, merge_state_dicts, merge_tensor
from .methods import (
    LEGACY_METHODS,
    METHODS,
    DareLinear,
    DareTies,
    Linear,
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
from .streaming import merge_safetensors, parse_size, remove_dead_merges

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "LEGACY_METHODS",
    "METHODS",
    "DareLinear",
    "DareTies",
    "Linear",
    "MergeConfig",
    "MergeMethod",
    "MergePlan",
    "Rsaf",
    "TaskArithmetic",
    "TensorSource",
    "TensorStats",
    "Ties",
    "get_method",
    "keep_count",
    "load_config",
    "merge_safetensors",
    "merge_state_dicts",
    "merge_tensor",
    "parse_size",
    "remove_dead_merges",
    "rsaf_keep_ratios",
    "run_config",
]
