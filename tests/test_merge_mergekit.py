"""Conformance with the real mergekit 0.1.5: one YAML config through ``mergekit`` and ``infigw.merge`` gives the
same tensors (bit for bit, DARE's random masks included) and the same output layout.

mergekit lives in its own virtual environment (its dependencies are not infigw's): ``INFIGW_MERGEKIT_PYTHON``
names its interpreter, default ``.venv-mergekit/bin/python`` at the repository root (see
``infigw/merge/README.md``). Without it these tests skip, unless ``INFIGW_REQUIRE_MERGEKIT=1`` (CI) makes that a
failure. The checkpoints are tiny ``transformers`` Llama models built here; mergekit runs once for all configs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")
safetensors_torch = pytest.importorskip("safetensors.torch")

from infigw.merge import run_config  # noqa: E402
from infigw.merge.__main__ import main as cli_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_PYTHON = Path(os.environ.get("INFIGW_MERGEKIT_PYTHON") or ROOT / ".venv-mergekit" / "bin" / "python")

if os.environ.get("INFIGW_DISABLE_EXTENSION") == "1":  # tests/run.sh stage 2: merging never uses the extension
    pytest.skip("runs once, in the stage with the extension", allow_module_level=True)
if not MERGEKIT_PYTHON.exists():
    if os.environ.get("INFIGW_REQUIRE_MERGEKIT") == "1":
        pytest.fail(f"INFIGW_REQUIRE_MERGEKIT=1 but {MERGEKIT_PYTHON} does not exist", pytrace=False)
    pytest.skip(f"mergekit's interpreter {MERGEKIT_PYTHON} not found (set INFIGW_MERGEKIT_PYTHON)",
                allow_module_level=True)

# Runs every job in one process (mergekit's imports take seconds): the same calls as `mergekit-yaml CONFIG OUT
# --random-seed N --out-shard-size S` (scripts/run_yaml.py), without the click wrapper.
DRIVER = """
import json, sys, yaml
from mergekit.common import parse_kmb
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for job in json.load(open(sys.argv[1])):
    text = open(job["config"]).read()
    options = MergeOptions(random_seed=job["seed"], out_shard_size=parse_kmb(job["shard"]), quiet=True)
    options.apply_global_options()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), job["out"], options=options,
              config_source=text)
"""


def _tokenizer(size: int = 64):
    """A word-level tokenizer numbering exactly ``size`` tokens (one per embedding row)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def _build_family(root: Path, dtype: torch.dtype) -> None:
    """A tiny Llama base and three fine-tunes whose deltas hold the hard cases: equal magnitudes at the top-k
    threshold, exactly opposite deltas of equally weighted models (a zero sign vote) and zero deltas."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(dtype)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for t in state.values():
        t.view(-1)[:8] = 0.0  # exact deltas below
    base.load_state_dict(state)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    first = {}
    for m in range(3):
        tuned = {}
        for name, t in state.items():
            delta = torch.randn(t.shape, generator=g) * (0.01 * (m + 1))
            flat = delta.view(-1)
            ties = flat[8:40]  # magnitudes 0.02 or 0: many equal values at the top-k threshold
            ties.copy_(0.02 * torch.randint(-1, 2, ties.shape, generator=g))
            if m == 1:
                flat[:8] = -first[name][:8]  # opposite of model 0: with weights 1 and 1 the sign vote is 0
            elif m == 2:
                flat[:4] = 0.0
            if m == 0:
                first[name] = flat.clone()
            tuned[name] = (t.float() + delta).to(dtype)
        model = transformers.LlamaForCausalLM(config).to(dtype)
        model.load_state_dict(tuned)
        model.save_pretrained(root / f"m{m}")
        tokenizer.save_pretrained(root / f"m{m}")


def _configs(bf16: Path, fp32: Path) -> dict:
    def models(root, params):
        return [{"model": str(root / f"m{i}"), "parameters": p} for i, p in enumerate(params)]

    return {
        "task_arithmetic": ({"merge_method": "task_arithmetic", "base_model": str(bf16 / "base"),
                             "models": models(bf16, [{"weight": 1.0}, {"weight": 1.0}, {"weight": -0.5}]),
                             "parameters": {"lambda": 0.9}}, 0, "5B"),
        "ties": ({"merge_method": "ties", "base_model": str(bf16 / "base"), "tokenizer_source": "base",
                  "models": [{"model": str(bf16 / "base")}] + models(
                      bf16, [{"weight": 1.0, "density": 0.3}, {"weight": 1.0, "density": 0.5},
                             {"weight": 0.5, "density": 0.7}])}, 0, "5B"),
        "ties_fp32_rescale": ({"merge_method": "ties", "base_model": str(fp32 / "base"),
                               "models": models(fp32, [{"weight": 0.6}, {"weight": 0.4}, {"weight": -0.3}]),
                               "parameters": {"density": 0.4, "normalize": False, "rescale": True,
                                              "lambda": 0.8, "int8_mask": True}}, 0, "5B"),
        "dare_ties": ({"merge_method": "dare_ties", "base_model": str(bf16 / "base"),
                       "models": models(bf16, [{"weight": 0.5, "density": 0.3}, {"weight": 0.7, "density": 0.6},
                                               {"weight": -0.2, "density": 0.5}])}, 3, "5B"),
        "dare_linear_fp32_work": ({"merge_method": "dare_linear", "base_model": str(bf16 / "base"),
                                   "dtype": "float32", "out_dtype": "bfloat16",
                                   "models": models(bf16, [{"weight": 0.4}, {"weight": 0.4}, {"weight": 0.4}]),
                                   "parameters": {"density": 0.5}}, 7, "5B"),
        "dare_ties_fp32_norescale": ({"merge_method": "dare_ties", "base_model": str(fp32 / "base"),
                                      "models": models(fp32, [{"weight": 1.0, "density": 0.2},
                                                              {"weight": 1.0, "density": 0.9},
                                                              {"weight": 1.0, "density": 1.0}]),
                                      "parameters": {"rescale": False, "normalize": True}}, 11, "5B"),
        "linear_sharded": ({"merge_method": "linear", "base_model": str(bf16 / "base"),
                            "models": [{"model": str(bf16 / "base"), "parameters": {"weight": 0.2}}]
                            + models(bf16, [{"weight": 0.5}, {"weight": 0.3}])}, 0, "20K"),
    }


def _load(directory: Path) -> tuple[dict, dict | None]:
    index_path = directory / "model.safetensors.index.json"
    if not index_path.exists():
        return safetensors_torch.load_file(str(directory / "model.safetensors")), None
    weight_map = json.loads(index_path.read_text())["weight_map"]
    state = {}
    for file in sorted(set(weight_map.values())):
        state.update(safetensors_torch.load_file(str(directory / file)))
    return state, weight_map


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """{config name: (mergekit's output dir, infigw's output dir)}."""
    root = tmp_path_factory.mktemp("mergekit_conformance")
    for dtype, folder in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        _build_family(root / folder, dtype)
    configs = _configs(root / "bf16", root / "fp32")
    jobs = []
    for name, (config, seed, shard) in configs.items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        jobs.append({"config": str(path), "out": str(root / f"mergekit_{name}"), "seed": seed, "shard": shard})
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "driver.py").write_text(DRIVER)
    done = subprocess.run([str(MERGEKIT_PYTHON), str(root / "driver.py"), str(root / "jobs.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"mergekit failed:\n{done.stderr[-4000:]}"
    outputs = {}
    for job, (name, (_, seed, shard)) in zip(jobs, configs.items()):
        ours = root / f"infigw_{name}"
        if name == "ties":  # one of them through the CLI, with mergekit's flags
            assert cli_main([job["config"], str(ours), "--random-seed", str(seed), "--out-shard-size", shard,
                             "--no-progress", "--lazy-unpickle", "--chunk-elems", "200"]) == 0
        else:
            from infigw.merge.config import parse_kmb

            # small chunks: every tensor is merged in several pieces, mergekit's in one
            run_config(job["config"], ours, seed=seed, max_shard_size=parse_kmb(shard), chunk_elems=200)
        outputs[name] = (Path(job["out"]), ours)
    outputs["root"] = root
    return outputs


CONFIG_NAMES = ["task_arithmetic", "ties", "ties_fp32_rescale", "dare_ties", "dare_linear_fp32_work",
                "dare_ties_fp32_norescale", "linear_sharded"]
# what may differ per config (everything else must be bit-equal)
TOLERATED = {
    "ties": {"ties": ("bf16", [0.3, 0.5, 0.7], torch.bfloat16)},
    "ties_fp32_rescale": {"ties": ("fp32", [0.4] * 3, torch.float32), "rounding": "fp32"},
    "dare_linear_fp32_work": {"rounding": "bf16"},
}


def _threshold_ties(family: Path, tensor_name: str, densities, dtype) -> torch.Tensor:
    """Where a magnitude selection must pick among entries equal to its threshold: mergekit's unstable argsort
    picks an implementation-defined subset, infigw the lowest flat indices (a stable sort's choice)."""
    base = safetensors_torch.load_file(str(family / "base" / "model.safetensors"))[tensor_name].to(dtype)
    where = torch.zeros(base.shape, dtype=torch.bool)
    for m, density in enumerate(densities):
        model = safetensors_torch.load_file(str(family / f"m{m}" / "model.safetensors"))[tensor_name].to(dtype)
        magnitude = (model - base).abs().float()
        k = max(1, int(density * magnitude.numel()))
        threshold = magnitude.flatten().sort(descending=True).values[k - 1]
        at_threshold = magnitude == threshold
        if int((magnitude > threshold).sum()) + int(at_threshold.sum()) > k:
            where |= at_threshold
    return where


def _within_rounding(actual: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Elementwise: the merged deltas agree to a few rounding steps of the working dtype (the L1 rescale factors
    differ in their last bits: mergekit sums the norms with torch's fp32 reduction, infigw in fp64 over chunks),
    or the outputs to one rounding step of theirs."""
    a, e, b = actual.double(), expected.double(), base.double()
    out, work = torch.finfo(actual.dtype), torch.finfo(torch.float32)
    one_step = (a - e).abs() <= out.eps * torch.maximum(a.abs(), e.abs()) + out.tiny
    return one_step | ((a - e).abs() <= 16 * work.eps * ((a - b).abs() + (e - b).abs()))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_same_tensors_as_mergekit(merged, name):
    """Bit-equal, except (a) TIES: which of the entries tied at the top-k threshold are kept (the count is the
    same) and (b) with L1 rescale in fp32: the norms are summed in another order (one rounding step)."""
    theirs_dir, ours_dir = merged[name]
    theirs, their_map = _load(theirs_dir)
    ours, our_map = _load(ours_dir)
    assert sorted(ours) == sorted(theirs), "tensor names"
    assert our_map == their_map, "shard layout (None: one model.safetensors without an index)"
    tolerance = TOLERATED.get(name, {})
    for tensor_name, expected in theirs.items():
        actual = ours[tensor_name]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, tensor_name
        differ = (actual != expected) & ~(actual.isnan() & expected.isnan())
        if "rounding" in tolerance:
            family = merged["root"] / tolerance["rounding"] / "base" / "model.safetensors"
            differ &= ~_within_rounding(actual, expected, safetensors_torch.load_file(str(family))[tensor_name])
        if "ties" in tolerance:
            family, densities, dtype = tolerance["ties"]
            differ &= ~_threshold_ties(merged["root"] / family, tensor_name, densities, dtype)
        assert not differ.any(), (
            f"{name}: {tensor_name}: {int(differ.sum())} of {expected.numel()} elements differ beyond the "
            f"tolerated cases {sorted(tolerance)}, max |diff| "
            f"{(actual.double() - expected.double()).abs()[differ].max().item():.3g}"
        )


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_same_output_files_as_mergekit(merged, name):
    theirs_dir, ours_dir = merged[name]
    theirs_files = {p.name for p in theirs_dir.iterdir()}
    ours_files = {p.name for p in ours_dir.iterdir()}
    expected = {"config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "mergekit_config.yml"}
    assert expected <= theirs_files & ours_files, (theirs_files, ours_files)
    our_config = json.loads((ours_dir / "config.json").read_text())
    their_config = json.loads((theirs_dir / "config.json").read_text())
    assert our_config.get("dtype") == their_config.get("dtype"), "dtype recorded in config.json"
    assert (ours_dir / "mergekit_config.yml").read_text() == (theirs_dir / "mergekit_config.yml").read_text()
    assert "infigw.merge" in (ours_dir / "README.md").read_text()
