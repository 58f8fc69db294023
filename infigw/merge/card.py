"""Provenance of a merged checkpoint: the config that ran (``mergekit_config.yml``) and a model card."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .methods import MergeMethod

__all__ = ["config_yaml", "model_card"]

_METHOD_TITLES = {
    "task_arithmetic": "Task Arithmetic (Ilharco et al. 2023, arXiv 2212.04089)",
    "ties": "TIES (Yadav et al. 2023, arXiv 2306.01708)",
    "dare_ties": "DARE-TIES (Yu et al. 2024, arXiv 2311.03099)",
    "dare_linear": "DARE (Yu et al. 2024, arXiv 2311.03099)",
    "linear": "Linear (weighted average of the weights)",
    "rsaf": "RSAF — infigw's reconstruction of InfiFusion's Rate-Skewness Adaptive Fusion (not the paper's formula)",
}


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def config_yaml(
    method: MergeMethod,
    base: os.PathLike,
    models: Sequence[os.PathLike],
    dtype: torch.dtype | None,
    out_dtype: torch.dtype | None,
    seed: int,
    note: str = "",
) -> str:
    """A mergekit-style YAML config equivalent to this merge (``python -m infigw.merge`` runs it again);
    ``note`` adds a comment line."""
    import yaml

    described = getattr(method, "config", None)
    if described is None:
        name, per_model, shared = method.name, [{} for _ in models], {}
        note += "\n# custom merge method object: its parameters are not recorded here"
    else:
        name, per_model, shared = described(len(models))
    config = {"merge_method": name, "base_model": str(base),
              "models": [{"model": str(m), **({"parameters": p} if p else {})} for m, p in zip(models, per_model)]}
    if shared:
        config["parameters"] = shared
    if dtype is not None:
        config["dtype"] = _dtype_name(dtype)
    if out_dtype is not None:
        config["out_dtype"] = _dtype_name(out_dtype)
    header = (f"# written by infigw.merge; reproduce with: python -m infigw.merge mergekit_config.yml OUT "
              f"--random-seed {seed}\n")
    return header + "".join(f"# {line}\n" for line in note.strip().splitlines()) + yaml.safe_dump(
        config, sort_keys=False)


def model_card(
    name: str,
    method: MergeMethod,
    base: os.PathLike,
    models: Sequence[os.PathLike],
    *,
    seed: int,
    dtype: torch.dtype | None,
    out_dtype: torch.dtype | None,
    config_text: str,
) -> str:
    """A short README.md: the method, the sources, the numeric settings and the config that ran."""
    title = _METHOD_TITLES.get(method.name, f"custom method {method.name!r}")
    sources = "\n".join(f"- `{m}`" for m in models)
    return (
        "---\n"
        "library_name: transformers\n"
        "tags:\n- merge\n- infigw\n"
        "---\n\n"
        f"# {name}\n\n"
        f"A merge of {len(models)} fine-tuned model(s) of the base model `{base}`, made with `infigw.merge` "
        f"using **{title}**.\n\n"
        f"Merged models:\n{sources}\n\n"
        f"Working dtype: {_dtype_name(dtype) or 'the inputs’ (promoted) dtype'}; output dtype: "
        f"{_dtype_name(out_dtype) or 'the base’s'}; random seed: {seed} (used by DARE only).\n\n"
        "The configuration that produced this model (also in `mergekit_config.yml`):\n\n"
        f"```yaml\n{config_text.rstrip()}\n```\n"
    )
