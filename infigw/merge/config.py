"""mergekit YAML configs: parse one into a :class:`MergeConfig` and run it with the streaming merge.

Supported, as mergekit 0.1.5 reads them: ``merge_method`` (``task_arithmetic``, ``ties``, ``dare_ties``,
``dare_linear``, ``linear``; and our ``rsaf``), ``base_model``, ``models`` (``model`` + ``parameters``:
``weight``, ``density``), method ``parameters`` (``normalize``, ``lambda``, ``rescale``, ``int8_mask``; top-level
``weight``/``density`` are defaults for every model), ``dtype``, ``out_dtype``, ``tokenizer_source: base``.
``consensus_method: sum|count`` for ``ties``/``dare_ties`` is our extension (mergekit 0.1.5 fixes ``sum``).
Anything else (``slices``, ``modules``, tensor filters, layer gradients, other methods, ``tokenizer_source:
union``) is refused with an error naming the key.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .engine import DEFAULT_CHUNK_ELEMS, resolve_dtype
from .methods import METHODS, DareLinear, DareTies, Linear, MergeMethod, Rsaf, TaskArithmetic, Ties

__all__ = ["MergeConfig", "load_config", "run_config", "parse_kmb"]

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_UNSUPPORTED_TOP = {
    "slices": "layer slices are not supported by infigw.merge (use 'models')",
    "modules": "per-module definitions are not supported by infigw.merge (use 'models')",
    "tokenizer": "tokenizer surgery is not supported by infigw.merge (the base's tokenizer is copied)",
    "chat_template": "chat template selection is not supported by infigw.merge (the base's files are copied)",
}
_MERGEKIT_ONLY = {"breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "model_stock",
                  "karcher", "slerp", "nuslerp", "multislerp", "nearswap", "arcee_fusion", "passthrough"}
_TASK_ARITHMETIC = {"task_arithmetic": TaskArithmetic, "ties": Ties, "dare_ties": DareTies,
                    "dare_linear": DareLinear}
# (per-model keys, method-wide keys); method-wide "weight"/"density" are defaults for every model
_KEYS = {
    **{name: ({"weight", "density"}, {"weight", "density", "normalize", "lambda", "rescale", "int8_mask"})
       for name in _TASK_ARITHMETIC},
    "linear": ({"weight"}, {"weight", "normalize"}),
    "rsaf": (set(), {"r0", "beta", "r_min", "r_max", "elect_sign", "scale", "eps"}),
}
for _name in ("ties", "dare_ties"):
    _KEYS[_name][1].add("consensus_method")
_BOOLEAN = {"normalize", "rescale", "int8_mask", "elect_sign"}


@dataclass
class MergeConfig:
    """A parsed config: the method object, the base (layout and extra files) and the models, dtypes, the text."""

    method: MergeMethod
    base: Path
    models: list[Path]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    text: str


def parse_kmb(value: int | str) -> int:
    """mergekit's size syntax: ``1000``, ``500K``, ``20M``, ``5B`` (×10³, ×10⁶, ×10⁹). mergekit 0.1.5 calls
    ``--out-shard-size`` a number of parameters but its writer compares it with bytes (numel × element size);
    so does infigw."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+)([kKmMbB]?)", text)
    if isinstance(value, bool) or not match or int(match.group(1)) <= 0:
        raise ValueError(f"--out-shard-size: expected a positive count like 500M or 5B, got {value!r}")
    return int(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[match.group(2).lower()]


def _scalar(value, where: str):
    if isinstance(value, list):
        if value and all(isinstance(v, Mapping) for v in value):
            raise ValueError(f"{where}: tensor filters (filter/value entries) are not supported by infigw.merge")
        raise ValueError(f"{where}: layer gradients (a list of values) are not supported by infigw.merge")
    if isinstance(value, Mapping):
        raise ValueError(f"{where}: tensor filters (filter/value entries) are not supported by infigw.merge")
    return value


def _number(value, where: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; mergekit's pydantic accepts it
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _boolean(value, where: str) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    return value


def _parameters(raw, allowed: set[str], where: str, method: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping of parameter names to values, got {raw!r}")
    out = {}
    for key, value in raw.items():
        at = f"{where}.{key}"
        if key not in allowed:
            hint = f" (accepted: {', '.join(sorted(allowed))})" if allowed else ""
            raise ValueError(f"{at}: not a parameter of {method} here{hint}")
        value = _scalar(value, at)
        if key in _BOOLEAN:
            out[key] = _boolean(value, at)
        elif key == "consensus_method":
            if value not in ("sum", "count"):
                raise ValueError(f"{at}: expected 'sum' or 'count', got {value!r}")
            out[key] = value
        else:
            out[key] = _number(value, at)
    return out


def _path(value, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected the path of a local model directory, got {value!r}")
    return Path(value)


def _vocabulary(model: Path, where: str) -> tuple[dict[str, int], int]:
    """Token → id of a model's tokenizer.json, without the ids at or beyond its config's vocab_size (mergekit
    strips those as padding)."""
    try:
        from tokenizers import Tokenizer

        vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
        vocab = Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab(with_added_tokens=True)
    except Exception as err:  # missing/invalid files; the tokenizers library raises its own exception type
        raise ValueError(f"tokenizer_source: base needs {where}'s config.json (vocab_size) and tokenizer.json to "
                         f"check that the vocabulary stays as it is ({type(err).__name__}: {err}); drop "
                         "tokenizer_source to copy the base's tokenizer files unchecked") from None
    return {token: i for token, i in vocab.items() if i < vocab_size}, vocab_size


def _check_base_tokenizer(base: Path, models: list[Path]) -> None:
    """``tokenizer_source: base`` is supported where mergekit's vocabulary alignment is the identity: the base
    tokenizer numbers every embedding row once and every model has the base's vocabulary."""
    vocab, rows = _vocabulary(base, "base_model")
    if sorted(vocab.values()) != list(range(rows)):
        raise ValueError(f"tokenizer_source: the base tokenizer has {len(vocab)} tokens for {rows} embedding rows; "
                         "mergekit would resize the embeddings to the tokenizer, which infigw.merge does not do "
                         "(drop tokenizer_source to keep the embeddings and copy the base's tokenizer)")
    for i, model in enumerate(models):
        if _vocabulary(model, f"models[{i}]")[0] != vocab:
            raise ValueError(f"tokenizer_source: models[{i}] ({model}) has another vocabulary than the base; "
                             "mergekit would permute its embeddings, which infigw.merge does not do")


def _same_model(a: Path, b: Path | None) -> bool:
    return b is not None and (a == b or os.path.realpath(a) == os.path.realpath(b))


def load_config(source: str | os.PathLike | Mapping) -> MergeConfig:
    """Parse a mergekit YAML config (a file path, or an already loaded mapping); errors name the key."""
    import yaml

    if isinstance(source, Mapping):
        raw, text = dict(source), yaml.safe_dump(dict(source), sort_keys=False)
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as err:
            raise OSError(err.errno, f"cannot read the merge config: {err.strerror}", str(source)) from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, Mapping):
        raise ValueError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    for key in raw:
        if key in _UNSUPPORTED_TOP:
            raise ValueError(f"{key}: {_UNSUPPORTED_TOP[key]}")
        if key not in _TOP_KEYS:
            raise ValueError(f"{key}: unknown config key (accepted: {', '.join(sorted(_TOP_KEYS))})")

    method = raw.get("merge_method")
    if method in _MERGEKIT_ONLY:
        raise ValueError(f"merge_method: mergekit's {method!r} is not supported by infigw.merge "
                         f"(supported: {', '.join(METHODS)})")
    if method not in METHODS:
        raise ValueError(f"merge_method: expected one of {', '.join(METHODS)}, got {method!r}")
    base = _path(raw["base_model"], "base_model") if raw.get("base_model") is not None else None
    if base is None and method != "linear":
        raise ValueError(f"base_model: required by {method}")
    source = raw.get("tokenizer_source")
    if source not in (None, "base") and not (isinstance(source, str) and _same_model(Path(source), base)):
        raise ValueError(f"tokenizer_source: only 'base' is supported by infigw.merge (the base's tokenizer is "
                         f"copied), got {source!r}")

    per_model_keys, shared_keys = _KEYS[method]
    shared = _parameters(raw.get("parameters"), shared_keys, "parameters", method)
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError("models: expected a non-empty list of {model: PATH, parameters: {...}} entries")
    models, per_model = [], []
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise ValueError(f"{where}: expected a mapping with a 'model' path, got {entry!r}")
        for key in entry:
            if key not in ("model", "parameters"):
                raise ValueError(f"{where}.{key}: unknown key (accepted: model, parameters)")
        path = _path(entry["model"], f"{where}.model")
        if method != "linear" and _same_model(path, base):
            continue  # the base listed among the models (common in mergekit configs) is the base
        params = {**{k: v for k, v in shared.items() if k in ("weight", "density")},
                  **_parameters(entry.get("parameters"), per_model_keys, f"{where}.parameters", method)}
        if "weight" in per_model_keys and "weight" not in params:
            raise ValueError(f"{where}.parameters.weight: required (mergekit needs a weight for every model)")
        models.append(path)
        per_model.append(params)
    if not models:
        raise ValueError("models: every entry is the base model; list at least one model to merge into it")
    if method == "linear" and base is not None and not any(_same_model(m, base) for m in models):
        raise ValueError("base_model: linear averages the base with the models; list it under models with a "
                         "weight too (mergekit requires one), or drop base_model")

    options = {k: v for k, v in shared.items() if k not in ("weight", "density", "int8_mask")}
    if method == "rsaf":
        merge_method = Rsaf(**options)
    elif method == "linear":
        merge_method = Linear(weights=[p["weight"] for p in per_model], **options)
    else:
        cls = _TASK_ARITHMETIC[method]
        if "lambda" in options:
            options["scale"] = options.pop("lambda")
        if cls.rule.sparsification is None:  # mergekit accepts and ignores these without sparsification
            options.pop("rescale", None)
        else:
            options["density"] = [p.get("density", 1.0) for p in per_model]
        merge_method = cls(weights=[p["weight"] for p in per_model], **options)
    if source is not None:
        _check_base_tokenizer(base if base is not None else models[0], models)
    return MergeConfig(
        method=merge_method,
        base=base if base is not None else models[0],
        models=models,
        dtype=resolve_dtype(raw.get("dtype"), "dtype"),
        out_dtype=resolve_dtype(raw.get("out_dtype"), "out_dtype"),
        text=text,
    )


def run_config(
    config: MergeConfig | str | os.PathLike | Mapping,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    max_shard_size: int | str = 5 * 10**9,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    device: str = "cpu",
    copy_tokenizer: bool = True,
    progress: bool = False,
) -> Path:
    """Run a mergekit config with the streaming merge into the new directory ``out``; mergekit's dtype rule:
    working dtype = ``dtype`` or the inputs' promoted dtype, output = ``out_dtype`` or the working dtype.
    ``max_shard_size``: bytes, in mergekit's syntax as ``--out-shard-size`` (``500M``, ``5B``: ×10⁶, ×10⁹)."""
    from .streaming import merge_safetensors

    if not isinstance(config, MergeConfig):
        config = load_config(config)
    return merge_safetensors(
        config.base, config.models, out, config.method, seed=seed, max_shard_size=parse_kmb(max_shard_size),
        chunk_elems=chunk_elems, progress=progress, dtype=config.dtype,
        out_dtype=config.out_dtype or config.dtype, device=device, copy_tokenizer=copy_tokenizer,
        config_text=config.text,
    )
