"""``python -m infigw.fuse CONFIG.yaml``: unified and pairwise runs with tiny models built here, and the
configuration errors."""
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")
pytest.importorskip("safetensors")

import yaml  # noqa: E402

from infigw import fuse  # noqa: E402
from infigw.train.toy import tiny_llama, train_tokenizer  # noqa: E402

TEXTS = ["the cat sees a dog .", "3 + 4 = 7. 1 + 1 = 2.", "a blick is green and lives in the sea.",
         "count 5 6 7 8.", "some foxes help the farmers .", "Q: what colour is a zorp? A: blue."]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, kind, size, seed in (("pivot", "unigram", 100, 0), ("math", "bpe", 280, 1),
                                   ("lore", "wordpiece", 150, 2)):
        tokenizer = train_tokenizer(kind, TEXTS * 3, size)
        tiny_llama(len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    (root / "eval.txt").write_text("\n".join(TEXTS[:3]) + "\n")
    return root


def _config(models, out, **changes):
    config = {"student": str(models / "pivot"),
              "teachers": [{"name": "math", "model": str(models / "math"), "weight": 0.7},
                           {"name": "lore", "model": str(models / "lore"), "weight": 0.3}],
              "data": {"train": str(models / "train.jsonl"), "eval": str(models / "eval.txt"), "max_length": 32},
              "objective": {"values": "topk_probs", "nodes": "rank"},
              "training": {"max_steps": 2, "per_device_train_batch_size": 3, "logging_steps": 1, "use_cpu": True,
                           "disable_tqdm": True},
              "output": str(out)}
    config.update(changes)
    return config


def _run(tmp_path, config) -> int:
    path = tmp_path / "fuse.yaml"
    path.write_text(yaml.safe_dump(config))
    return fuse.main([str(path)])


@pytest.mark.skipif(os.environ.get("INFIGW_DISABLE_EXTENSION") == "1",
                    reason="backend-independent end-to-end run: checked in the stage with the extension")
@pytest.mark.parametrize("strategy", ["unified", "pairwise"])
def test_a_run_writes_the_fused_model_and_its_report(models, tmp_path, strategy):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert _run(tmp_path, _config(models, out, strategy=strategy, merge={"method": "ties", "density": 0.5})) == 0
    fused = AutoModelForCausalLM.from_pretrained(out / "model")
    pivot = AutoModelForCausalLM.from_pretrained(models / "pivot")
    changed = [name for name, p in fused.state_dict().items() if not p.equal(pivot.state_dict()[name])]
    assert changed, "the fused model equals the pivot"
    report = (out / "report.md").read_text()
    assert "| fused pivot |" in report and "gld/" in report
    assert (out / "loss_components.png").stat().st_size > 0
    history = json.loads((out / "log_history.json").read_text())
    if strategy == "pairwise":
        assert sorted(history) == ["lore", "math"]
        assert (out / "pairwise" / "math" / "config.json").exists()
        assert "uld/math" in history["math"][0] and "uld/lore" not in history["math"][0]
    else:
        assert history["unified"][0]["weights/math"] == pytest.approx(0.7)
    assert not list(out.glob("*.partial"))


@pytest.mark.skipif(os.environ.get("INFIGW_DISABLE_EXTENSION") == "1",
                    reason="backend-independent end-to-end run: checked in the stage with the extension")
def test_a_record_store_teacher_in_a_unified_run(models, tmp_path):
    """A teacher given as a records store (captured from the training file) beside an online one."""
    from infigw.records.capture import capture

    capture(str(models / "lore"), models / "train.jsonl", tmp_path / "lore_store", k=16, progress=False)
    config = _config(models, tmp_path / "run")
    config["teachers"][1] = {"name": "lore", "store": str(tmp_path / "lore_store"), "weight": 0.3,
                             "tokenizer": str(models / "lore")}
    assert _run(tmp_path, config) == 0
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())["unified"]
    assert history[0]["gld/lore"] > 0 and history[0]["weights/lore"] == pytest.approx(0.3)
    assert "teacher lore" not in (tmp_path / "run" / "report.md").read_text()  # no model to evaluate


@pytest.mark.parametrize("change, message", [
    (dict(strategy="sideways"), "strategy must be one of"),
    (dict(teachers=[]), "teachers must be a non-empty list"),
    (dict(teachers=[{"name": "a", "model": "m", "weight": -1}]), r"teachers\[0\].weight must be a number >= 0"),
    (dict(teachers=[{"name": "a", "model": "m", "store": "s"}]), "either a 'model' path or a records 'store'"),
    (dict(objective={"values": "logits", "colour": 1}), "objective: .*unknown options"),
    (dict(objective={"teacher_weights": "nll"}), "teacher weights are given twice"),
    (dict(surprise=1), "unknown keys"),
])
def test_configuration_errors_name_the_key(models, tmp_path, capsys, change, message):
    assert _run(tmp_path, _config(models, tmp_path / "bad", **change)) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


def test_data_files_are_read_as_the_record_stores_read_them(tmp_path):
    """JSON lines may hold U+2028 unescaped (json.dumps(ensure_ascii=False)); Parquet is read too."""
    rows = [{"text": "a\u2028b"}, {"text": "c\u0085d"}]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    assert fuse.read_texts(jsonl, "text") == rows
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "train.parquet")
    assert fuse.read_texts(tmp_path / "train.parquet", "text") == rows
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\nnot json\n')
    with pytest.raises(fuse.ConfigError, match="bad.jsonl:2"):
        fuse.read_texts(tmp_path / "bad.jsonl", "text")
