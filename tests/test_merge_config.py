"""mergekit YAML configs in infigw.merge: what is accepted, what is refused (naming the key), the CLI, the output
folder (one shard, model card, provenance that runs again)."""
import json

import pytest
import torch

yaml = pytest.importorskip("yaml")
pytest.importorskip("safetensors.torch")

from infigw.merge import (  # noqa: E402
    DareTies,
    Linear,
    Rsaf,
    TaskArithmetic,
    Ties,
    load_config,
    merge_safetensors,
    merge_state_dicts,
    run_config,
)
from infigw.merge.__main__ import main as cli_main  # noqa: E402
from infigw.merge.config import parse_kmb  # noqa: E402
from tests.test_merge import _assert_equal, _load_checkpoint, _tiny_states, _write_set  # noqa: E402


def _config(**fields):
    config = {"merge_method": "ties", "base_model": "base",
              "models": [{"model": "m0", "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": "m1", "parameters": {"weight": 0.5}}]}
    config.update(fields)
    return config


def test_parsed_methods_and_parameters():
    config = load_config(_config(parameters={"density": 0.3, "normalize": False, "lambda": "1e-1",
                                             "int8_mask": True, "consensus_method": "count"}))
    assert isinstance(config.method, Ties)
    plan = config.method.plan(2)
    assert (plan.weights, plan.density, plan.normalize, plan.scale, plan.consensus) == (
        [1.0, 0.5], [0.5, 0.3], False, 0.1, "count"), "per-model values override the method-wide defaults"
    dare = load_config(_config(merge_method="dare_ties")).method
    assert isinstance(dare, DareTies) and dare.plan(2).rescale and not dare.plan(2).normalize
    assert dare.plan(2).density == [0.5, 1.0], "density defaults to 1 (mergekit)"
    ta = load_config(_config(merge_method="task_arithmetic", models=[
        {"model": "base"}, {"model": "m0", "parameters": {"weight": -1.0, "density": 0.2}}])).method
    assert isinstance(ta, TaskArithmetic) and ta.plan(1).weights == [-1.0] and ta.plan(1).sparsification is None
    linear = load_config({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 2}},
                                                                {"model": "b", "parameters": {"weight": 1}}]})
    assert isinstance(linear.method, Linear) and str(linear.base) == "a", "linear without a base: first model"
    rsaf = load_config({"merge_method": "rsaf", "base_model": "base", "models": [{"model": "m0"}],
                        "parameters": {"r0": 0.3, "elect_sign": True}, "dtype": "bfloat16", "out_dtype": "float32"})
    assert isinstance(rsaf.method, Rsaf) and rsaf.method.r0 == 0.3 and rsaf.method.elect_sign
    assert (rsaf.dtype, rsaf.out_dtype) == (torch.bfloat16, torch.float32)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"slices": []}, "slices: layer slices are not supported"),
        ({"modules": {}}, "modules: per-module definitions are not supported"),
        ({"chat_template": "chatml"}, "chat_template: chat template selection is not supported"),
        ({"foo": 1}, "foo: unknown config key"),
        ({"merge_method": "slerp"}, "merge_method: mergekit's 'slerp' is not supported"),
        ({"merge_method": "average"}, "merge_method: expected one of"),
        ({"base_model": None}, "base_model: required by ties"),
        ({"tokenizer_source": "union"}, "tokenizer_source: only 'base' is supported"),
        ({"models": [{"model": "m0"}]}, r"models\[0\].parameters.weight: required"),
        ({"models": [{"model": "m0", "parameters": {"weight": [0.1, 0.9]}}]},
         r"models\[0\].parameters.weight: layer gradients"),
        ({"models": [{"model": "m0", "parameters": {"weight": [{"filter": "mlp", "value": 1}]}}]},
         r"models\[0\].parameters.weight: tensor filters"),
        ({"parameters": {"density": {"filter": "self_attn", "value": 0.5}}}, "parameters.density: tensor filters"),
        ({"models": [{"model": "m0", "parameters": {"weight": 1, "normalize": True}}]},
         r"models\[0\].parameters.normalize: not a parameter of ties here"),
        ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon: not a parameter of ties"),
        ({"parameters": {"normalize": "maybe"}}, "parameters.normalize: expected true or false"),
        ({"models": [{"model": "m0", "parameters": {"weight": "heavy"}}]}, "weight: expected a number"),
        ({"models": [{"model": "m0", "lora": "x", "parameters": {"weight": 1}}]}, r"models\[0\].lora: unknown key"),
        ({"models": [{"model": "base"}]}, "models: every entry is the base model"),
        ({"dtype": "int8"}, "dtype: expected one of"),
        ({"merge_method": "task_arithmetic", "parameters": {"consensus_method": "sum"}},
         "parameters.consensus_method: not a parameter of task_arithmetic"),
        ({"parameters": {"consensus_method": "median"}}, "consensus_method: expected 'sum' or 'count'"),
        ({"merge_method": "linear", "models": [{"model": "m0", "parameters": {"weight": 1}}]},
         "base_model: linear averages the base with the models"),
    ],
)
def test_unsupported_or_wrong_keys_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        load_config(_config(**fields))


def test_shard_size_syntax_is_mergekits():
    assert [parse_kmb("1000"), parse_kmb("500K"), parse_kmb("20m"), parse_kmb("5B"), parse_kmb(7)] == [
        1000, 500_000, 20_000_000, 5_000_000_000, 7]
    for bad in ("5GB", "-1", "0", "x"):
        with pytest.raises(ValueError, match="--out-shard-size"):
            parse_kmb(bad)


@pytest.fixture
def family(tmp_path):
    base, models = _tiny_states(2, seed=8)
    base_dir, dirs = _write_set(tmp_path, base, models)
    (base_dir / "README.md").write_text("the base's own model card")
    (base_dir / "tokenizer_config.json").write_text("{}")
    return tmp_path, base, models, base_dir, dirs


def _write_yaml(path, config):
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_yaml_run_equals_the_api_in_the_working_dtype(family):
    tmp_path, base, models, base_dir, dirs = family
    config = {"merge_method": "ties", "base_model": str(base_dir), "dtype": "float32",
              "models": [{"model": str(dirs[0]), "parameters": {"weight": 0.7, "density": 0.4}},
                         {"model": str(dirs[1]), "parameters": {"weight": -0.3, "density": 0.6}}]}
    out = run_config(_write_yaml(tmp_path / "c.yml", config), tmp_path / "out", chunk_elems=40)
    expected = merge_state_dicts(base, models, "ties", weights=[0.7, -0.3], density=[0.4, 0.6], chunk_elems=40,
                                 out_dtype="float32")
    merged = _load_checkpoint(out)
    for name, t in expected.items():
        _assert_equal(merged[name], t, name)
        if t.is_floating_point():
            assert merged[name].dtype == torch.float32, "mergekit's rule: output in dtype when out_dtype is unset"
    assert json.loads((out / "config.json").read_text()) == {"model_type": "tiny"}, "no dtype key to update"


def test_run_config_reads_shard_sizes_in_mergekits_syntax(family):
    tmp_path, _, _, base_dir, dirs = family
    config = _write_yaml(tmp_path / "c.yml", {"merge_method": "task_arithmetic", "base_model": str(base_dir),
                                              "models": [{"model": str(d), "parameters": {"weight": 0.5}}
                                                         for d in dirs]})
    one = run_config(config, tmp_path / "5B", max_shard_size="5B")  # 5·10⁹ bytes, not 5 bytes
    assert sorted(p.name for p in one.glob("*.safetensors")) == ["model.safetensors"]
    many = run_config(config, tmp_path / "1K", max_shard_size="1K")
    assert len(list(many.glob("model-*.safetensors"))) > 1


def test_output_folder_one_shard_card_and_provenance_that_runs_again(family, capsys):
    tmp_path, base, models, base_dir, dirs = family
    out = merge_safetensors(base_dir, dirs, tmp_path / "api", "ties", weights=[1.0, 0.5], density=0.3,
                            dtype=None, seed=4)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files, "one shard: no index"
    assert {"config.json", "tokenizer_config.json", "README.md", "mergekit_config.yml"} <= set(files)
    card = (out / "README.md").read_text()
    assert "the base's own model card" not in card
    assert "TIES" in card and str(dirs[0]) in card and str(base_dir) in card and "random seed: 4" in card
    provenance = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert provenance["merge_method"] == "ties" and "dtype" not in provenance, "None: the inputs' dtype"
    assert provenance["models"][1] == {"model": str(dirs[1]), "parameters": {"weight": 0.5, "density": 0.3}}
    assert cli_main([str(out / "mergekit_config.yml"), str(tmp_path / "again"), "--random-seed", "4",
                     "--no-progress"]) == 0
    first, again = _load_checkpoint(out), _load_checkpoint(tmp_path / "again")
    for name in first:
        _assert_equal(again[name], first[name], f"rerun of the provenance config: {name}")
    capsys.readouterr()
    mixed = merge_safetensors(base_dir, dirs, tmp_path / "mixed", "average", dtype="bfloat16")
    assert "# the merged tensors kept their base dtypes" in (mixed / "mergekit_config.yml").read_text()


def test_cli_flags(family, capsys):
    tmp_path, base, models, base_dir, dirs = family
    config = _write_yaml(tmp_path / "c.yml", {
        "merge_method": "dare_linear", "base_model": str(base_dir), "tokenizer_source": None,
        "models": [{"model": str(d), "parameters": {"weight": 0.5, "density": 0.5}} for d in dirs]})
    assert cli_main([str(config), str(tmp_path / "sharded"), "--out-shard-size", "1K", "--random-seed", "9",
                     "--no-copy-tokenizer", "--no-progress", "--low-cpu-memory", "--allow-crimes"]) == 0
    out = tmp_path / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "tokenizer_config.json").exists()
    api = run_config(config, tmp_path / "api", seed=9, max_shard_size=1000)
    for name, t in _load_checkpoint(api).items():
        _assert_equal(_load_checkpoint(out)[name], t, f"CLI vs run_config {name}")
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert cli_main([str(config), str(tmp_path / "gpu"), "--cuda", "--no-progress"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err
    bad = _write_yaml(tmp_path / "bad.yml", {"merge_method": "ties", "base_model": str(base_dir), "slices": []})
    assert cli_main([str(bad), str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == "error: slices: layer slices are not supported by infigw.merge (use 'models')\n"
    assert cli_main([str(tmp_path / "missing.yml"), str(tmp_path / "x")]) == 1
    assert "missing.yml" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_tokenizer_source_base_must_leave_the_vocabulary_as_it_is(family):
    tokenizers = pytest.importorskip("tokenizers")
    tmp_path, base, models, base_dir, dirs = family

    def write(directory, size, rows):
        vocab = {f"t{i}": i for i in range(size)}
        tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0")).save(str(directory / "tokenizer.json"))
        (directory / "config.json").write_text(json.dumps({"vocab_size": rows}))

    for directory in [base_dir, *dirs]:
        write(directory, 33, 33)
    config = {"merge_method": "task_arithmetic", "base_model": str(base_dir), "tokenizer_source": "base",
              "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in dirs]}
    assert load_config(config).models == dirs
    write(dirs[1], 34, 34)
    with pytest.raises(ValueError, match=r"tokenizer_source: models\[1\] .* has another vocabulary than the base"):
        load_config(config)
    write(base_dir, 30, 33)
    with pytest.raises(ValueError, match="the base tokenizer has 30 tokens for 33 embedding rows"):
        load_config(config)
