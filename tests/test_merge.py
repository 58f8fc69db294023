"""infigw.merge: method math on hand-computed tensors, streaming == in-memory bit for bit, bad inputs."""
import json
import math

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from infigw.merge import (  # noqa: E402
    METHODS,
    Dare,
    MergePlan,
    Rsaf,
    TensorStats,
    Ties,
    get_method,
    keep_count,
    merge_safetensors,
    merge_state_dicts,
    parse_size,
    rsaf_keep_ratios,
)
from infigw.merge.__main__ import main as cli_main  # noqa: E402
from infigw.merge.methods import MagnitudeSelector  # noqa: E402


def _vec(values):
    return {"w": torch.tensor(values, dtype=torch.float32)}


def _assert_equal(actual, expected, what):
    assert torch.equal(actual, expected), (
        f"{what}: max |diff| = {(actual.double() - expected.double()).abs().max().item()}\n"
        f"actual   {actual}\nexpected {expected}"
    )


# ------------------------------------------------------------------------------------------- method math


def test_average_and_task_arithmetic_by_hand():
    base = _vec([1.0, 2.0, 3.0])
    models = [_vec([2.0, 2.0, 5.0]), _vec([0.0, 4.0, 3.0])]
    _assert_equal(merge_state_dicts(base, models, "average")["w"], torch.tensor([1.0, 3.0, 4.0]), "average")
    out = merge_state_dicts(base, models, "average", weights=[1.0, 1.0], scale=0.5)["w"]
    _assert_equal(out, torch.tensor([1.0, 3.0, 4.0]), "task arithmetic 0.5·(Δ1+Δ2)")


def test_ties_trim_elect_sign_disjoint_mean_by_hand():
    base = _vec([1.0, 1.0, 1.0, 1.0])
    deltas = [[3.0, -2.0, 0.5, 1.0], [-1.0, -3.0, 0.2, 2.0], [-4.0, 1.0, 0.1, -0.5]]
    models = [{"w": base["w"] + torch.tensor(d)} for d in deltas]
    # density 0.5 of 4 entries keeps 2 per model: T1=[3,-2,0,0], T2=[0,-3,0,2], T3=[-4,1,0,0];
    # elected sign of the sum [-1,-4,0,2] = [-,-,0,+]; disjoint means of agreeing entries: [-4, -2.5, 0, 2]
    out = merge_state_dicts(base, models, "ties", density=0.5)["w"]
    _assert_equal(out, torch.tensor([-3.0, -1.5, 1.0, 3.0]), "TIES")


def test_top_r_keeps_all_ties_at_the_threshold():
    base = _vec([0.0] * 4)
    models = [_vec([1.0, -1.0, 1.0, 0.5])]
    # k = round(0.25·4) = 1, threshold |Δ| = 1 is shared by three entries: all three are kept
    out = merge_state_dicts(base, models, "ties", density=0.25)["w"]
    _assert_equal(out, torch.tensor([1.0, -1.0, 1.0, 0.0]), "TIES tie rule")


def test_keep_count_rounds_and_clamps():
    assert [keep_count(0.2, 10), keep_count(0.25, 10), keep_count(1e-9, 10), keep_count(1.0, 7)] == [2, 2, 1, 7]


@pytest.mark.parametrize("numel,chunk", [(1, 1), (1000, 1000), (1009, 331), (4096, 1024)])
def test_radix_threshold_equals_kthvalue(numel, chunk):
    g = torch.Generator().manual_seed(numel)
    values = torch.randn(numel, generator=g).abs()
    values[:: 7] = 0.0  # many exact ties at zero
    values[1::11] = values[-1]  # and a repeated (mostly non-zero) value
    for k in sorted({1, min(2, numel), numel // 3 + 1, numel // 2 + 1, numel}):
        selector = MagnitudeSelector()
        for start in range(0, numel, chunk):
            selector.add_high(values[start : start + chunk])
        selector.choose_bucket(k)
        for start in range(0, numel, chunk):
            selector.add_low(values[start : start + chunk])
        expected = torch.kthvalue(values, numel - k + 1).values.item()
        assert selector.threshold() == expected, f"k={k}: radix {selector.threshold()} vs kthvalue {expected}"


def test_dare_rescale_expectation_and_seed():
    n, p, c = 200_000, 0.9, 0.5
    base = {"w": torch.zeros(n)}
    models = [{"w": torch.full((n,), c)}]
    out = merge_state_dicts(base, models, "dare", drop_rate=p, seed=3)["w"]
    kept = out != 0
    _assert_equal(out[kept], torch.full_like(out[kept], c) * (1.0 / (1.0 - p)), "DARE rescaled entries")
    frac_sd = math.sqrt(p * (1 - p) / n)
    assert abs(kept.double().mean().item() - (1 - p)) < 6 * frac_sd, f"kept fraction {kept.double().mean()}"
    mean_sd = c / (1 - p) * frac_sd
    assert abs(out.double().mean().item() - c) < 6 * mean_sd, f"E[out] = {out.double().mean()} vs Δ = {c}"
    again = merge_state_dicts(base, models, "dare", drop_rate=p, seed=3)["w"]
    other = merge_state_dicts(base, models, "dare", drop_rate=p, seed=4)["w"]
    _assert_equal(again, out, "DARE with the same seed")
    assert not torch.equal(other, out), "a different seed must give a different mask"


def test_dare_elect_sign_is_disjoint_mean_without_drop():
    base = _vec([0.0, 0.0])
    models = [_vec([2.0, -1.0]), _vec([-1.0, -3.0]), _vec([4.0, 5.0])]
    # drop_rate 0 keeps everything; signs of sums [5, 1] are +,+; agreeing means [3, 5]
    out = merge_state_dicts(base, models, Dare(drop_rate=0.0, elect_sign=True))["w"]
    _assert_equal(out, torch.tensor([3.0, 5.0]), "DARE-TIES")


def test_rsaf_keep_ratios_formula_and_bounds():
    r = rsaf_keep_ratios([1.0, 3.0], [0.0, 1.0])
    expected = [0.2 * (1 + math.tanh(0.5)), 0.2 * (1 + math.tanh(1.5)) / 2]
    assert r == pytest.approx(expected, rel=1e-12)
    assert rsaf_keep_ratios([0.0, 0.0], [0.0, 0.0]) == [0.2, 0.2]
    g = torch.Generator().manual_seed(0)
    rates = (torch.rand(500, generator=g) * 10).pow(3).tolist()
    skews = (torch.randn(500, generator=g) * 20).tolist()
    for r_min, r_max in [(0.05, 0.5), (0.1, 0.15), (0.3, 0.3)]:
        ratios = rsaf_keep_ratios(rates, skews, r0=0.4, beta=3.0, r_min=r_min, r_max=r_max)
        assert all(r_min <= x <= r_max for x in ratios), f"ratios outside [{r_min}, {r_max}]"
        assert min(ratios) == r_min or r_min == r_max


def test_tensor_stats_skewness_matches_population_formula():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5000, generator=g, dtype=torch.float64).exp()
    stats = TensorStats(a.numel(), 1.0, [a.sum().item()], [(a**2).sum().item()], [(a**3).sum().item()])
    centred = a - a.mean()
    expected = (centred**3).mean() / (centred**2).mean() ** 1.5
    assert stats.skewness()[0] == pytest.approx(expected.item(), rel=1e-9)
    constant = TensorStats(4, 1.0, [4.0], [4.0], [4.0])
    assert constant.skewness() == [0.0]


@pytest.mark.parametrize("chunk_elems", [10_000, 64])
def test_rsaf_merge_against_explicit_formula(chunk_elems):
    g = torch.Generator().manual_seed(2)
    shape = (40, 30)
    base = {"w": torch.randn(shape, generator=g)}
    scales = [0.01, 0.05, 0.2]
    models = [{"w": base["w"] + s * torch.randn(shape, generator=g) ** 3} for s in scales]
    out = merge_state_dicts(base, models, "rsaf", chunk_elems=chunk_elems)["w"]

    deltas = [(m["w"] - base["w"]).double() for m in models]
    rates = [d.abs().sum().item() / (base["w"].double().abs().sum().item() + 1e-12) for d in deltas]
    skews = []
    for d in deltas:
        c = d.abs() - d.abs().mean()
        skews.append(((c**3).mean() / (c**2).mean() ** 1.5).item())
    ratios = rsaf_keep_ratios(rates, skews)
    expected = base["w"].clone()
    n = base["w"].numel()
    for d, rate, ratio in zip(deltas, rates, ratios):
        assert 0.05 <= ratio <= 0.5
        d32 = d.float()
        k = keep_count(ratio, n)
        threshold = torch.kthvalue(d32.abs().flatten(), n - k + 1).values
        mask = d32.abs() >= threshold
        assert mask.sum().item() == k, "continuous deltas: exactly k entries kept"
        expected += (rate / sum(rates)) * torch.where(mask, d32, 0.0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_method_option_validation():
    with pytest.raises(ValueError, match="density must lie in"):
        Ties(density=0.0)
    with pytest.raises(ValueError, match="drop_rate must lie in"):
        Dare(drop_rate=1.0)
    with pytest.raises(ValueError, match="r_min .* must not exceed r_max"):
        Rsaf(r_min=0.6, r_max=0.5)
    with pytest.raises(ValueError, match="method: expected one of"):
        get_method("nope")
    with pytest.raises(ValueError, match="weights has 1 entries, expected one per model"):
        merge_state_dicts(_vec([0.0]), [_vec([1.0]), _vec([2.0])], "average", weights=[1.0])
    assert sorted(METHODS) == ["average", "dare", "rsaf", "ties"]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(17) == 17
    with pytest.raises(ValueError, match="shard size"):
        parse_size("five")


def test_custom_method_plugs_in_and_keep_ratio_needs_stats():
    class Second:
        name, needs_stats = "second", False

        def plan(self, num_models, stats):
            return MergePlan(weights=[0.0, 1.0])

    base, models = _vec([1.0, 1.0]), [_vec([5.0, 5.0]), _vec([2.0, 3.0])]
    _assert_equal(merge_state_dicts(base, models, Second())["w"], torch.tensor([2.0, 3.0]), "custom method")

    class Broken(Second):
        def plan(self, num_models, stats):
            return MergePlan(weights=[0.5, 0.5], keep_ratio=[0.5, 0.5])

    with pytest.raises(TypeError, match="does not set needs_stats"):
        merge_state_dicts(base, models, Broken())


# ------------------------------------------------------------------------------------------- state dicts


def test_state_dict_single_model_inputs_untouched_and_buffers_copied():
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 3, generator=g).bfloat16(), "pos": torch.arange(6), "flag": torch.tensor(True)}
    model = {"w": (base["w"].float() + torch.randn(6, 3, generator=g)).bfloat16(), "pos": torch.arange(6),
             "flag": torch.tensor(True)}
    snapshot = {k: v.clone() for k, v in model.items()}
    out = merge_state_dicts(base, [model], "average", chunk_elems=4)
    _assert_equal(out["w"], model["w"], "K=1 average returns the model")
    assert out["w"].dtype == torch.bfloat16
    _assert_equal(out["pos"], base["pos"], "integer buffer copied")
    assert out["pos"].data_ptr() != base["pos"].data_ptr(), "output must not alias the base"
    for k in model:
        _assert_equal(model[k], snapshot[k], f"input {k} unchanged")


def test_tied_weights_stay_tied():
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(8, 4, generator=g)
    base = {"embed": emb, "lm_head": emb, "b": torch.zeros(4)}
    models = []
    for _ in range(2):
        e = emb + torch.randn(8, 4, generator=g)
        models.append({"embed": e, "lm_head": e, "b": torch.randn(4, generator=g)})
    out = merge_state_dicts(base, models, "dare", drop_rate=0.5)
    assert out["embed"] is out["lm_head"], "tied names must share one merged tensor"
    models[1]["lm_head"] = models[1]["lm_head"] + 1.0
    with pytest.raises(ValueError, match="'embed' and 'lm_head' are tied in the base but differ"):
        merge_state_dicts(base, models, "average")


def test_state_dict_bad_inputs():
    base = {"w": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="at least one fine-tuned model"):
        merge_state_dicts(base, [], "average")
    with pytest.raises(ValueError, match=r"model 0: tensor 'w' has shape \[3, 2\], base has \[2, 3\]"):
        merge_state_dicts(base, [{"w": torch.zeros(3, 2)}], "average")
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        merge_state_dicts(base, [{"w": [0.0]}], "average")
    with pytest.raises(ValueError, match="merged values are not finite"):
        merge_state_dicts(base, [{"w": torch.full((2, 3), float("nan"))}], "average")
    with pytest.raises(ValueError, match="inf/NaN deltas"):
        merge_state_dicts(base, [{"w": torch.full((2, 3), float("inf"))}], "ties")


# ------------------------------------------------------------------------------------------- streaming


def _write_checkpoint(directory, state, shard_names=None):
    """HF layout: one model.safetensors, or shards + index when ``shard_names`` maps tensor -> file."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "tiny"}')
    (directory / "pytorch_model.bin").write_bytes(b"stale weights that must not be copied")
    if shard_names is None:
        safetensors_torch.save_file(state, str(directory / "model.safetensors"))
        return
    for file in sorted(set(shard_names.values())):
        part = {k: v for k, v in state.items() if shard_names[k] == file}
        safetensors_torch.save_file(part, str(directory / file))
    index = {"metadata": {}, "weight_map": shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _load_checkpoint(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        state.update(safetensors_torch.load_file(str(directory / file)))
    assert set(state) == set(index["weight_map"])
    return state


def _tiny_states(num_models, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "embed.weight": torch.randn(33, 7, generator=g).bfloat16(),
        "layer.0.w": torch.randn(19, 5, generator=g),
        "layer.0.b": torch.randn(5, generator=g).half(),
        "layer.1.w": torch.randn(3, 2, 4, generator=g),
        "scale": torch.tensor(0.75),
        "position_ids": torch.arange(11).reshape(1, 11),
        "empty": torch.zeros(0, 3),
        "fp8.weight": torch.randn(6, 4, generator=g).to(torch.float8_e4m3fn),
        "fp64.weight": torch.randn(9, generator=g, dtype=torch.float64),
    }
    models = []
    for m in range(num_models):
        sd = {}
        for k, v in base.items():
            if v.is_floating_point():
                noise = torch.randn(v.shape, generator=g) * (0.05 * (m + 1))
                sd[k] = (v.float() + noise).to(v.dtype)
            else:
                sd[k] = v.clone()
        models.append(sd)
    return base, models


SHARDS = {"embed.weight": "a.safetensors", "layer.0.w": "a.safetensors", "layer.0.b": "b.safetensors",
          "layer.1.w": "b.safetensors", "scale": "b.safetensors", "position_ids": "a.safetensors",
          "empty": "b.safetensors", "fp8.weight": "a.safetensors", "fp64.weight": "b.safetensors"}


def _write_set(tmp_path, base, models):
    _write_checkpoint(tmp_path / "base", base, SHARDS)
    dirs = []
    for i, sd in enumerate(models):
        dirs.append(tmp_path / f"m{i}")
        _write_checkpoint(dirs[-1], sd, SHARDS if i % 2 else None)
    return tmp_path / "base", dirs


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("num_models", [1, 3])
def test_streaming_equals_in_memory_bit_for_bit(tmp_path, method, num_models):
    base, models = _tiny_states(num_models)
    base_dir, dirs = _write_set(tmp_path, base, models)
    expected = merge_state_dicts(base, models, method, seed=7, chunk_elems=40)
    out = merge_safetensors(base_dir, dirs, tmp_path / "out", method, seed=7, chunk_elems=40, max_shard_size=300)
    merged = _load_checkpoint(out)
    assert set(merged) == set(expected)
    for name, t in expected.items():
        assert merged[name].dtype == t.dtype, f"{name}: dtype {merged[name].dtype} vs {t.dtype}"
        _assert_equal(merged[name], t, f"{method}: {name}")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).stat().st_size <= 300 + 1024 for f in files), "shard size"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    assert (out / "config.json").read_text() == '{"model_type": "tiny"}'
    assert not (out / "pytorch_model.bin").exists(), "weight files of the base must not be copied"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "temporary dir left behind"


def test_cli_matches_api(tmp_path, capsys):
    base, models = _tiny_states(2, seed=1)
    base_dir, dirs = _write_set(tmp_path, base, models)
    argv = ["--base", str(base_dir), "--models", *map(str, dirs), "--out", str(tmp_path / "cli"),
            "--method", "ties", "--density", "0.3", "--no-progress", "--shard-size", "1KB"]
    assert cli_main(argv) == 0
    api = merge_safetensors(base_dir, dirs, tmp_path / "api", "ties", density=0.3, max_shard_size="1KB")
    cli_state, api_state = _load_checkpoint(tmp_path / "cli"), _load_checkpoint(api)
    for name in api_state:
        _assert_equal(cli_state[name], api_state[name], f"CLI vs API {name}")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main([a if a != str(tmp_path / "cli") else str(tmp_path / "x") for a in argv] + ["--drop-rate", "0.5"])
    assert "--drop-rate does not apply to --method ties" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli_main(argv) == 2 and "already exists" in capsys.readouterr().err


def _corrupt(kind, tmp_path, base, models):
    """Apply one bad-input case to the written set; return (model dirs, expected error type, message regex)."""
    base_dir, dirs = _write_set(tmp_path, base, models)
    if kind == "names":
        sd = dict(models[0])
        sd["extra.weight"] = sd.pop("layer.0.b").float()
        _write_checkpoint(tmp_path / "bad", sd)
        return [tmp_path / "bad"] + dirs[1:], ValueError, r"tensor names differ .*missing \['layer.0.b'\].*extra"
    if kind == "shape":
        sd = dict(models[0], **{"layer.0.w": torch.zeros(5, 19)})
        _write_checkpoint(tmp_path / "bad", sd)
        return [tmp_path / "bad"] + dirs[1:], ValueError, r"'layer.0.w' has shape \[5, 19\], base has \[19, 5\]"
    if kind == "dtype":
        sd = dict(models[0], **{"embed.weight": models[0]["embed.weight"].float()})
        _write_checkpoint(tmp_path / "bad", sd)
        message = r"'embed.weight' has dtype torch.float32, base has torch.bfloat16"
        return [tmp_path / "bad"] + dirs[1:], ValueError, message
    if kind == "missing_dir":
        return dirs + [tmp_path / "nope"], FileNotFoundError, r"directory .*nope.* does not exist"
    if kind == "missing_shard":
        (dirs[1] / "b.safetensors").unlink()
        return dirs, FileNotFoundError, r"shard .*b.safetensors.* listed in model.safetensors.index.json is missing"
    if kind == "no_weights":
        (tmp_path / "empty_dir").mkdir()
        return [tmp_path / "empty_dir"], FileNotFoundError, "holds neither model.safetensors nor"
    if kind == "buffer_differs":  # only found while merging, after the temporary directory exists
        sd = dict(models[1], position_ids=models[1]["position_ids"] + 1)
        _write_checkpoint(tmp_path / "bad", sd)
        return dirs[:1] + [tmp_path / "bad"] + dirs[2:], ValueError, r"'position_ids' has non-float dtype .* differs"
    if kind == "corrupt":
        (dirs[0] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
        return dirs, ValueError, r"model.safetensors.* is not a valid safetensors file"
    if kind == "truncated":
        path = dirs[1] / "a.safetensors"
        path.write_bytes(path.read_bytes()[:-8])
        return dirs, ValueError, r"a.safetensors.* is not a valid safetensors file: .*do not fit"
    if kind == "no_models":
        return [], ValueError, "at least one fine-tuned model"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["names", "shape", "dtype", "missing_dir", "missing_shard", "no_weights", "corrupt", "truncated",
     "buffer_differs", "no_models"],
)
def test_streaming_bad_inputs_leave_no_output(tmp_path, kind):
    base, models = _tiny_states(3, seed=2)
    dirs, error, message = _corrupt(kind, tmp_path, base, models)
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        merge_safetensors(tmp_path / "base", dirs, out, "rsaf", chunk_elems=64)
    assert not out.exists(), "a failed merge must not leave an output directory"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "temporary dir left behind"


def test_streaming_refuses_existing_output(tmp_path):
    base, models = _tiny_states(1)
    base_dir, dirs = _write_set(tmp_path, base, models)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        merge_safetensors(base_dir, dirs, tmp_path / "out", "average")
