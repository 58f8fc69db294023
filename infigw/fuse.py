"""``python -m infigw.fuse CONFIG.yaml``: a whole fusion run, from a YAML file to a trained pivot and a report.

Configuration (every key but ``student``, ``teachers``, ``data.train`` and ``output`` is optional)::

    student: path/to/pivot                  # a transformers causal LM folder (its tokenizer beside it)
    teachers:
      - {name: math, model: path/to/teacher_a, weight: 1.0, offload: false}   # tokenizer: defaults to model
      - {name: lore, store: path/to/records}  # offline: captured with python -m infigw.records capture
    data:
      train: train.jsonl                    # .jsonl (a "text" column, or "prompt" + "completion") or .txt lines
      eval: eval.jsonl                      # optional: held-out bits per character before and after
      text_field: text
      max_length: 512
    objective: {preset: null, lam: 0.5, gamma: 1.0}       # InfiGFusionLoss options (see docs/training.md)
    strategy: unified                       # or pairwise: one copy of the pivot per teacher, then merged
    merge: {method: rsaf}                   # pairwise only: infigw.merge method and its options
    training: {max_steps: 100, per_device_train_batch_size: 8, learning_rate: 1.0e-4}  # TrainingArguments
    output: runs/fused

Strategies (InfiFusion): ``unified`` distils every teacher at once with their weights (``weight`` of each
teacher, or ``objective.teacher_weights``); ``pairwise`` distils each teacher into its own copy of the pivot
(``output/pairwise/<name>``; the teachers' weights do not apply) and merges the copies with
:func:`infigw.merge.merge_safetensors` into ``output/model``. Writes ``output/model`` (``save_pretrained`` +
tokenizer), ``output/report.md``, ``output/loss_components.png`` and ``output/log_history.json``. Nothing is
left half-written: the model folder is written beside its final name and renamed at the end.
"""
import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional

STRATEGIES = ("unified", "pairwise")
_TOP_LEVEL = ("student", "teachers", "data", "objective", "strategy", "merge", "training", "output")


class ConfigError(ValueError):
    """A configuration file that cannot run, with the key at fault."""


def load_config(path) -> dict:
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping with keys {_TOP_LEVEL}")
    return check_config(config, base=path.parent)


def _path(value, key: str, base: Path) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(f"{key} must be a path, got {value!r}")
    path = Path(value)
    return path if path.is_absolute() else base / path


def check_config(config: dict, base: Path = Path(".")) -> dict:
    """Validate ``config`` and resolve its paths against ``base``; every error names its key."""
    unknown = sorted(set(config) - set(_TOP_LEVEL))
    if unknown:
        raise ConfigError(f"unknown keys {unknown}; the keys are {_TOP_LEVEL}")
    for key in ("student", "teachers", "data", "output"):
        if key not in config:
            raise ConfigError(f"missing key {key!r}")
    out = dict(config)
    out["student"] = _path(config["student"], "student", base)
    teachers = config["teachers"]
    if not isinstance(teachers, list) or not teachers:
        raise ConfigError("teachers must be a non-empty list of {name, model, tokenizer?, weight?, offload?}")
    resolved, names = [], set()
    for i, teacher in enumerate(teachers):
        if not isinstance(teacher, dict) or ("model" in teacher) == ("store" in teacher):
            raise ConfigError(f"teachers[{i}] must be a mapping with either a 'model' path or a records 'store'")
        extra = sorted(set(teacher) - {"name", "model", "store", "tokenizer", "weight", "offload"})
        if extra:
            raise ConfigError(f"teachers[{i}] has unknown keys {extra}")
        name = str(teacher.get("name", f"teacher{i}"))
        if name in names:
            raise ConfigError(f"teachers[{i}].name {name!r} is used twice")
        names.add(name)
        weight = teacher.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0):
            raise ConfigError(f"teachers[{i}].weight must be a number >= 0, got {weight!r}")
        source = "model" if "model" in teacher else "store"
        path = _path(teacher[source], f"teachers[{i}].{source}", base)
        tokenizer = teacher.get("tokenizer", path if source == "model" else None)
        resolved.append({"name": name, "model": path if source == "model" else None,
                         "store": path if source == "store" else None,
                         "tokenizer": None if tokenizer is None else _path(tokenizer, f"teachers[{i}].tokenizer", base),
                         "weight": weight, "offload": bool(teacher.get("offload", False))})
    out["teachers"] = resolved
    data = config["data"]
    if not isinstance(data, dict) or "train" not in data:
        raise ConfigError("data must be a mapping with a 'train' file")
    out["data"] = {"train": _path(data["train"], "data.train", base),
                   "eval": None if data.get("eval") is None else _path(data["eval"], "data.eval", base),
                   "text_field": str(data.get("text_field", "text")), "max_length": data.get("max_length")}
    strategy = config.get("strategy", "unified")
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    out["strategy"] = strategy
    for key in ("objective", "merge", "training"):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        out[key] = dict(value)
    weights = [t["weight"] for t in resolved]
    if any(w is not None for w in weights):
        if any(w is None for w in weights):
            raise ConfigError("give every teacher a weight, or none")
        if "teacher_weights" in out["objective"]:
            raise ConfigError("teacher weights are given twice: in teachers[*].weight and objective.teacher_weights")
    out["output"] = _path(config["output"], "output", base)
    return out


def read_texts(path: Path, text_field: str) -> List[dict]:
    """Examples of a .jsonl or .parquet file, numbered as :mod:`infigw.records` numbers them (so that a store
    captured from the same file lines up), or of a .txt file (one text per line)."""
    from .records.text import iter_rows

    if not path.exists():
        raise ConfigError(f"data file {str(path)!r} does not exist")
    if path.suffix in (".jsonl", ".parquet"):
        try:
            return [row for _, row in iter_rows(path)]
        except ValueError as error:
            raise ConfigError(str(error)) from None
    with open(path, encoding="utf-8") as lines:
        return [{text_field: line.rstrip("\r\n")} for line in lines if line.strip()]


def _train(config: dict, teacher_specs: List[dict], output: Path, progress_desc: str):
    """One FusionTrainer run of the pivot against ``teacher_specs``; returns (trainer, history)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from .losses import InfiGFusionLoss
    from .train import FusionTrainer, OnlineTeacher, StoreTeacher

    student = AutoModelForCausalLM.from_pretrained(config["student"])
    tokenizer = AutoTokenizer.from_pretrained(config["student"])
    teachers = []
    for spec in teacher_specs:
        tokenizer_of = None if spec["tokenizer"] is None else AutoTokenizer.from_pretrained(spec["tokenizer"])
        if spec["store"] is not None:
            teachers.append(StoreTeacher(spec["store"], name=spec["name"], tokenizer=tokenizer_of))
        else:
            teachers.append(OnlineTeacher(AutoModelForCausalLM.from_pretrained(spec["model"]), tokenizer_of,
                                          name=spec["name"], offload=spec["offload"]))
    objective = dict(config["objective"])
    if len(teacher_specs) > 1 and teacher_specs[0]["weight"] is not None:  # unified: the teachers' fixed weights
        objective["teacher_weights"] = [spec["weight"] for spec in teacher_specs]
    try:
        objective = InfiGFusionLoss(**objective)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"objective: {error}") from None
    training = {"report_to": [], "save_strategy": "no", "logging_steps": 10, **config["training"],
                "output_dir": str(output / "checkpoints")}
    try:
        arguments = TrainingArguments(**training)
    except TypeError as error:
        raise ConfigError(f"training: {error}") from None
    # "index": the row numbers, by which record stores captured from the same file are read
    examples = [{**example, "index": row}
                for row, example in enumerate(read_texts(config["data"]["train"], config["data"]["text_field"]))]
    trainer = FusionTrainer(model=student, args=arguments, train_dataset=Dataset.from_list(examples),
                            processing_class=tokenizer, teachers=teachers,
                            objective=objective,
                            max_length=config["data"]["max_length"])
    print(f"== {progress_desc}: {len(examples)} examples, teachers {[t.name for t in teachers]}", flush=True)
    trainer.train()
    return trainer, tokenizer


def _save(model, tokenizer, folder: Path) -> None:
    """save_pretrained into a sibling folder, renamed when complete."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def run(config: dict) -> Path:
    """Run a checked configuration (see :func:`check_config`); returns the report's path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import report
    from .train.batch import texts_and_starts

    output: Path = config["output"]
    output.mkdir(parents=True, exist_ok=True)
    histories = {}
    if config["strategy"] == "unified":
        trainer, tokenizer = _train(config, config["teachers"], output, "unified fusion")
        _save(trainer.model, tokenizer, output / "model")
        histories["unified"] = trainer.state.log_history
    else:
        from .merge import merge_safetensors

        copies = []
        for spec in config["teachers"]:
            trainer, tokenizer = _train(config, [spec], output, f"pairwise fusion with {spec['name']}")
            copy = output / "pairwise" / spec["name"]
            _save(trainer.model, tokenizer, copy)
            copies.append(copy)
            histories[spec["name"]] = trainer.state.log_history
        merge = dict(config["merge"])
        method = merge.pop("method", "rsaf")
        merged = output / "model.partial"
        shutil.rmtree(merged, ignore_errors=True)
        merge_safetensors(config["student"], copies, merged, method, **merge)
        shutil.rmtree(output / "model", ignore_errors=True)
        merged.rename(output / "model")
    evaluation = None
    if config["data"]["eval"] is not None:
        texts, _ = texts_and_starts(read_texts(config["data"]["eval"], config["data"]["text_field"]),
                                    config["data"]["text_field"])
        evaluation = report.evaluate(config, texts, AutoModelForCausalLM, AutoTokenizer)
    return report.write(output, config, histories, evaluation)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infigw.fuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the YAML configuration")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        path = run(config)
    except ConfigError as error:
        print(f"infigw.fuse: {args.config}: {error}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
