"""mergekit YAML path: wall time and peak memory of ``python -m infigw.merge CONFIG OUT`` and of mergekit's own
``mergekit-yaml CONFIG OUT`` on the same configs and checkpoints.

    python -m benchmarks.bench_merge --size-gb 0.7 --models 3 --out /tmp

Generates a Llama-shaped bf16 base and K fine-tuned checkpoints (``--size-gb`` each, with a config.json that
mergekit recognises) under ``--out``, writes one mergekit config per method (per-model weights and densities,
seed 0), runs each tool once per config in a fresh process, prints a Markdown table, writes the rows
(``benchmarks/common.py`` schema; p50 = p20 = p80 = the one run) to ``--csv`` and removes what it generated.
Peak memory = the child's max RSS (``getrusage(RUSAGE_CHILDREN)`` in a wrapper process), interpreter and torch
included. Inputs were just written, so they come from the page cache: this measures the merge, not the disk.
mergekit runs from its own environment (``--mergekit-python``, default ``.venv-mergekit/bin/python``; skipped if
absent).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import Timing, markdown_table, row, write_csv

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, VOCAB, HEADS = 2048, 5504, 32000, 16

METHODS = {
    "task_arithmetic": [{"weight": 0.5}, {"weight": 0.3}, {"weight": -0.2}],
    "ties": [{"weight": 1.0, "density": 0.3}, {"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.7}],
    "dare_ties": [{"weight": 0.5, "density": 0.3}, {"weight": 0.5, "density": 0.5}, {"weight": 0.5, "density": 0.7}],
    "linear": [{"weight": 0.3}, {"weight": 0.3}, {"weight": 0.2}],
}

# Runs a command, then prints its wall time, CPU time and peak RSS as JSON (RUSAGE_CHILDREN of this wrapper is
# exactly the command's process tree).
WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": done.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_rss": usage.ru_maxrss * 1024, "stderr": done.stderr[-2000:]}))
"""


def _layers_for(size_bytes: int) -> int:
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    return max(1, round((size_bytes / 2 - fixed) / per_layer))


def _shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("lm_head.weight", (VOCAB, HIDDEN)),
              ("model.norm.weight", (HIDDEN,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
                   (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                   (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)), (p + "input_layernorm.weight", (HIDDEN,)),
                   (p + "post_attention_layernorm.weight", (HIDDEN,))]
    return shapes


def _generate(root: Path, num_models: int, size_bytes: int) -> int:
    """Base + models as single-file bf16 safetensors checkpoints with a Llama config; returns bytes per model."""
    from safetensors.torch import save_file

    layers = _layers_for(size_bytes)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": HEADS, "vocab_size": VOCAB, "tie_word_embeddings": False,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "dtype": "bfloat16"}
    g = torch.Generator().manual_seed(0)
    states = [dict() for _ in range(num_models + 1)]
    for name, shape in _shapes(layers):
        base = torch.randn(shape, generator=g).mul_(0.02)
        states[0][name] = base.bfloat16()
        for m in range(num_models):
            states[m + 1][name] = (base + torch.randn(shape, generator=g).mul_(2e-3 * (m + 1))).bfloat16()
        del base
    for i, state in enumerate(states):
        directory = root / ("base" if i == 0 else f"model{i - 1}")
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in states[0].values())


def _measure(command: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result['stderr']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_merge", description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=0.7, help="size of each checkpoint in GB (10^9 bytes)")
    parser.add_argument("--models", type=int, default=3, choices=[3], help="number of fine-tuned models K")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default=tempfile.gettempdir(), help="scratch parent directory (cleaned up)")
    parser.add_argument("--mergekit-python", default=os.environ.get("INFIGW_MERGEKIT_PYTHON")
                        or str(ROOT / ".venv-mergekit" / "bin" / "python"))
    parser.add_argument("--csv", default=str(ROOT / "benchmarks" / "out" / "merge_yaml.csv"))
    args = parser.parse_args(argv)

    size_bytes = int(args.size_gb * 1e9)
    needed = (args.models + 3) * size_bytes * 1.1
    if shutil.disk_usage(args.out).free < needed:
        print(f"error: {args.out} needs about {needed / 1e9:.1f} GB free", file=sys.stderr)
        return 2
    mergekit = Path(args.mergekit_python)
    tools = {"infigw": [sys.executable, "-m", "infigw.merge"]}
    if mergekit.exists():
        tools["mergekit"] = [str(mergekit), "-c", "from mergekit.scripts.run_yaml import main; main()"]
    else:
        print(f"note: {mergekit} not found: mergekit is not timed", file=sys.stderr)
    flags = {"infigw": ["--no-progress"], "mergekit": ["--quiet"]}

    root = Path(tempfile.mkdtemp(prefix="bench_merge-", dir=args.out))
    rows, extra = [], []
    try:
        start = time.perf_counter()
        per_model = _generate(root, args.models, size_bytes)
        print(f"generated base + {args.models} models of {per_model / 1e9:.2f} GB in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
        shape = f"K={args.models} x {per_model / 1e9:.2f} GB bf16"
        for method in args.methods:
            models = [{"model": str(root / f"model{m}"), "parameters": p} for m, p in enumerate(METHODS[method])]
            if method == "linear":  # linear averages the base too: mergekit requires its weight
                models = [{"model": str(root / "base"), "parameters": {"weight": 0.2}}] + models
            config = {"merge_method": method, "base_model": str(root / "base"), "models": models}
            path = root / f"{method}.yml"
            path.write_text(json.dumps(config))  # JSON is YAML
            for tool, command in tools.items():
                out = root / f"out-{tool}-{method}"
                result = _measure([*command, str(path), str(out), "--random-seed", "0", *flags[tool]])
                shutil.rmtree(out)
                wall_ms = result["wall_s"] * 1e3
                rows.append(row("merge_yaml", tool, method, shape,
                                Timing(wall_ms, wall_ms, wall_ms, result["peak_rss"]), "cpu"))
                extra.append((tool, method, result))
                print(f"{tool} {method}: {result['wall_s']:.1f} s, peak {result['peak_rss'] / 2**20:.0f} MiB",
                      file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    write_csv(rows, args.csv)
    print(f"\nmergekit YAML path, base + {shape}, {os.cpu_count()} CPU cores; one run each\n")
    print("| tool | method | wall (s) | CPU (s, all threads) | peak RSS (MiB) |")
    print("|---|---|---:|---:|---:|")
    for tool, method, r in extra:
        print(f"| {tool} | {method} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss'] / 2**20:.0f} |")
    print(f"\n{markdown_table(rows, ('op', 'backend', 'mode', 'shape', 'p50_ms', 'peak_extra_mib', 'commit'))}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (shared machine: wall times include waiting)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
