"""Streaming merge benchmark: throughput (GB/s) and peak RSS per method on generated safetensors shard sets.

    python -m benchmarks.bench_merge --size-gb 2 --models 3 --out /tmp

Generates a base and K fine-tuned checkpoints (bf16, Llama-like tensor shapes, ``--size-gb`` each, sharded)
in a temporary directory under ``--out``, merges them once per method in a fresh child process, prints a
Markdown table and removes everything it wrote. Throughput = (bytes of the K+1 inputs + bytes written) / wall
time of ``merge_safetensors`` (each input byte counted once, although TIES/RSAF read multi-chunk tensors up to
three times). Peak RSS = the child's VmHWM (``/proc/self/status``), which includes the interpreter and torch
(reported separately as "baseline"). Inputs were just written, so they are read from the page cache: this
measures the merge, not the disk.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, VOCAB = 4096, 11008, 32000


def _tensor_shapes(size_bytes: int, element_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-7B-like names and shapes (embedding, then whole decoder layers) up to about ``size_bytes``."""
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    layer = [("self_attn.q_proj.weight", (HIDDEN, HIDDEN)), ("self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
             ("self_attn.v_proj.weight", (HIDDEN, HIDDEN)), ("self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
             ("mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), ("mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
             ("mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)), ("input_layernorm.weight", (HIDDEN,)),
             ("post_attention_layernorm.weight", (HIDDEN,))]
    total, i = math.prod(shapes[0][1]) * element_size, 0
    while total < size_bytes:
        for name, shape in layer:
            shapes.append((f"model.layers.{i}.{name}", shape))
            total += math.prod(shape) * element_size
        i += 1
    return shapes


def _generate(root: Path, num_models: int, size_bytes: int, shard_bytes: int, dtype: torch.dtype) -> int:
    """Write base + models as HF sharded checkpoints (one shard in memory at a time); return bytes per model."""
    from safetensors.torch import save_file

    shapes = _tensor_shapes(size_bytes, torch.empty((), dtype=dtype).element_size())
    dirs = [root / "base"] + [root / f"model{m}" for m in range(num_models)]
    for d in dirs:
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for s, shard in enumerate(shards):
        file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        parts = [dict() for _ in dirs]
        for name, shape in shard:
            base = torch.randn(shape, generator=g) * 0.02
            parts[0][name] = base.to(dtype)
            for m in range(num_models):
                # heavy-tailed, model-specific change magnitudes so RSAF's rates and skews differ
                delta = torch.randn(shape, generator=g).pow_(3).mul_(1e-3 * (m + 1))
                parts[m + 1][name] = (base + delta).to(dtype)
            weight_map[name] = file
        for d, part in zip(dirs, parts):
            save_file(part, str(d / file), metadata={"format": "pt"})
        del parts
    for d in dirs:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(math.prod(shape) for _, shape in shapes) * torch.empty((), dtype=dtype).element_size()


def _vm_hwm_bytes() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _child(spec: dict) -> None:
    """Run one merge in this (fresh) process and print wall time and peak RSS as JSON."""
    from infigw.merge import merge_safetensors

    baseline = _vm_hwm_bytes()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    merge_safetensors(spec["base"], spec["models"], spec["out"], spec["method"], seed=0,
                      chunk_elems=spec["chunk_elems"], max_shard_size=spec["shard_bytes"])
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime - cpu_before,
                      "peak_rss": _vm_hwm_bytes(), "baseline_rss": baseline}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_merge", description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of each checkpoint in GB (10^9 bytes)")
    parser.add_argument("--models", type=int, default=3, help="number of fine-tuned models K")
    parser.add_argument("--out", default=tempfile.gettempdir(), help="scratch parent directory (cleaned up)")
    parser.add_argument("--methods", nargs="+", default=["average", "ties", "dare", "rsaf"])
    parser.add_argument("--shard-gb", type=float, default=1.0, help="input and output shard size in GB")
    parser.add_argument("--chunk-elems", type=int, default=None, help="merge chunk size (default: library's)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0

    from infigw.merge import DEFAULT_CHUNK_ELEMS

    chunk_elems = args.chunk_elems or DEFAULT_CHUNK_ELEMS
    size_bytes, shard_bytes = int(args.size_gb * 1e9), int(args.shard_gb * 1e9)
    needed = (args.models + 2) * size_bytes * 1.1
    free = shutil.disk_usage(args.out).free
    if free < needed:
        print(f"error: {args.out} has {free / 1e9:.1f} GB free, the benchmark needs about {needed / 1e9:.1f} GB",
              file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="bench_merge-", dir=args.out))
    rows = []
    try:
        start = time.perf_counter()
        per_model = _generate(root, args.models, size_bytes, shard_bytes, getattr(torch, args.dtype))
        elapsed = time.perf_counter() - start
        print(f"generated base + {args.models} models of {per_model / 1e9:.2f} GB in {elapsed:.0f} s", file=sys.stderr)
        moved = (args.models + 2) * per_model  # K+1 checkpoints read, one written
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                         os.environ.get("PYTHONPATH")])))
        for method in args.methods:
            spec = {"base": str(root / "base"), "models": [str(root / f"model{m}") for m in range(args.models)],
                    "out": str(root / "merged"), "method": method, "chunk_elems": chunk_elems,
                    "shard_bytes": shard_bytes}
            done = subprocess.run([sys.executable, "-m", "benchmarks.bench_merge", "--child", json.dumps(spec)],
                                  env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((method, result))
            shutil.rmtree(root / "merged")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nStreaming merge, K={args.models} models + base, {per_model / 1e9:.2f} GB each ({args.dtype}), "
          f"chunk {chunk_elems} elements, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}\n")
    print("| method | wall (s) | CPU (s, all threads) | GB/s (read+written) | peak RSS (MB) | baseline RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, r in rows:
        print(f"| {method} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {moved / r['wall_s'] / 1e9:.2f} "
              f"| {r['peak_rss'] / 2**20:.0f} | {r['baseline_rss'] / 2**20:.0f} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (the machine is shared; wall times include waiting)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
