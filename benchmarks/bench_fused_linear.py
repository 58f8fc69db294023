"""Fused-linear losses against the logits path: time and peak extra memory of forward + backward, LM head included.

    python -m benchmarks.bench_fused_linear                      # CPU: B*T = 8192, H = 1024, V = 32000, fp32
    python -m benchmarks.bench_fused_linear --quick              # CPU, B*T = 1024: a minute
    python -m benchmarks.bench_fused_linear --gpu --out DIR      # CUDA: B*T = 16384, V = 151936, bf16

Per loss, both paths compute the loss and the gradients of the hidden states (B, T, H) and the head (V, H) from the
same inputs: the logits path forms ``logits = hidden @ W^T`` and calls the logits-path loss; the fused path calls
its ``fused_linear_*`` counterpart. The teacher is a stored :class:`~infigw.TopKRecord` (k_t = 32, vocabulary
V + 500, with its logsumexp), the same object for both paths, so the numbers are the student's.

Losses, each with its defaults: ``gld`` (``gld_loss``: k = 10, values "topk_probs", rank nodes, "mean_l1"),
``uld`` (``uld_loss``: the full-vocabulary ULD), ``objective`` (``infigfusion_loss``: cross-entropy + GLD + the
full-vocabulary ULD), and ``objective-topk`` (``infigfusion_loss`` with ``uld_top_k=10``: the top-k ULD).

Time: the median (and 20 %/80 % quantiles) over ``--repeat`` calls after one warm-up (``benchmarks.common``), and
on CPU the median process CPU time (all threads), steadier than wall time when other jobs share the cores.
Memory: the peak of the call above what was allocated before it, minus the gradients the call returns (both
paths return the same ones), so it is what each path needs beyond its inputs and outputs: the logits path's
logits, their gradient and the loss's temporaries; the fused path's chunk, its accumulators and the summary. On
CPU each (loss, path) is timed in a fresh process, and its memory taken in another one with
``MALLOC_MMAP_THRESHOLD_`` set, so that freed blocks go back to the system and the resident-set peak (VmHWM) sees
live memory only; on CUDA the allocator's peak.
Prints a Markdown table (the fused/logits ratios too) and writes ``fused_linear_<device>.csv`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import common

LOSSES = ("gld", "uld", "objective", "objective-topk")
PATHS = ("logits", "fused")
TEACHER_K, TEACHER_EXTRA_VOCAB = 32, 500
SEQUENCE = 512  # positions per sequence: B = rows / SEQUENCE


def _functions(loss):
    """(the fused-linear function, the logits-path function, their options) of a benchmarked loss."""
    from infigw import functional as F

    return {"gld": (F.fused_linear_gld_loss, F.gld_loss, {}), "uld": (F.fused_linear_uld_loss, F.uld_loss, {}),
            "objective": (F.fused_linear_infigfusion_loss, F.infigfusion_loss, {}),
            "objective-topk": (F.fused_linear_infigfusion_loss, F.infigfusion_loss, {"uld_top_k": 10})}[loss]


def _inputs(rows, hidden_size, vocab, dtype, device, seed=0):
    """hidden (B, T, H), weight (V, H) with logits of a few units, labels (B, T) with padding, a teacher record."""
    generator = torch.Generator().manual_seed(seed)
    batch, length = max(1, rows // SEQUENCE), min(rows, SEQUENCE)
    hidden = torch.randn(batch, length, hidden_size, generator=generator).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * (2.0 / hidden_size ** 0.5)).to(device, dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[:, -length // 16:] = -100  # some padding at the end of every sequence
    teacher_vocab = vocab + TEACHER_EXTRA_VOCAB
    values, indices, lse = [], [], []
    for start in range(0, batch * length, 1024):  # the teacher's logits exist one block at a time
        block = torch.randn(min(1024, batch * length - start), teacher_vocab, generator=generator) * 2
        top = block.topk(TEACHER_K, dim=-1)
        values.append(top.values), indices.append(top.indices), lse.append(block.logsumexp(-1))
    from infigw import TopKRecord

    shape = (batch, length)
    teacher = TopKRecord(torch.cat(values).view(*shape, TEACHER_K).to(device),
                         torch.cat(indices).view(*shape, TEACHER_K).to(device), teacher_vocab,
                         torch.cat(lse).view(shape).to(device))
    return hidden, weight, labels.to(device), teacher


def _call(loss, path, hidden, weight, labels, teacher):
    """One forward + backward; returns the gradients (kept alive until the measurement ends)."""
    leaves = (hidden.detach().requires_grad_(), weight.detach().requires_grad_())
    fused, logits, options = _functions(loss)
    if path == "fused":
        value = fused(*leaves, teacher, labels, **options)
    else:
        value = logits(leaves[0] @ leaves[1].t(), teacher, labels, **options)
    return torch.autograd.grad(value, leaves)


def measure(loss, path, rows, hidden_size, vocab, dtype, device, repeat):
    """{"p50_ms", "p20_ms", "p80_ms", "peak_extra_bytes"} of one (loss, path) in this process."""
    hidden, weight, labels, teacher = _inputs(rows, hidden_size, vocab, dtype, device)
    gradient_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    cpu_seconds = []

    def call():  # also the process's CPU time (every thread): steadier than wall time on a shared machine
        start = time.process_time()
        grads = _call(loss, path, hidden, weight, labels, teacher)
        cpu_seconds.append(time.process_time() - start)
        return grads
    timing = common.time_cuda(call) if device == "cuda" else common.time_cpu(call, repeat=repeat)
    cpu = None if device == "cuda" else statistics.median(cpu_seconds[-repeat:])
    return {"p50_ms": timing.p50_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "cpu_s": cpu,
            "peak_extra_bytes": timing.peak_extra_bytes - gradient_bytes}


def _in_fresh_processes(loss, path, args):
    """:func:`measure` on CPU: the time in a child process with the default allocator; the memory in another, whose
    freed blocks go back to the system (one timed call; that setting makes every allocation a fresh mapping, which
    would also slow the many per-chunk allocations of the fused path down)."""
    results = []
    for repeat, environment in ((args.repeat, {}), (1, {"MALLOC_MMAP_THRESHOLD_": "65536",
                                                        "MALLOC_TRIM_THRESHOLD_": "65536"})):
        spec = json.dumps(dict(loss=loss, path=path, rows=args.rows, hidden_size=args.hidden, vocab=args.vocab,
                               dtype=args.dtype, device=args.device, repeat=repeat))
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_fused_linear", "--child", spec],
                              env=dict(os.environ, **environment), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"measuring {loss}/{path} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    timing, memory = results
    return {**timing, "peak_extra_bytes": memory["peak_extra_bytes"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="CUDA, B*T = 16384, V = 151936, bf16")
    parser.add_argument("--quick", action="store_true", help="B*T = 1024 (CPU)")
    parser.add_argument("--rows", type=int, default=8192, help="B*T (default 8192)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--losses", nargs="+", choices=LOSSES,
                        help="default: all on CPU; gld and objective-topk with --gpu (the full-vocabulary ULD's "
                             "logits path keeps fp32 state of the (B*T, V) logits for its backward beside them: ask "
                             "for uld and objective separately there)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls after one warm-up (CPU)")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        spec["dtype"] = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
        print(json.dumps(measure(**spec)))
        return
    args.device = "cuda" if args.gpu else "cpu"
    args.losses = args.losses or (["gld", "objective-topk"] if args.gpu else list(LOSSES))
    if args.gpu:
        args.rows, args.vocab, args.dtype = 16384, 151936, "bf16"
    elif args.quick:
        args.rows = 1024
    shape = f"B*T={args.rows},H={args.hidden},V={args.vocab},{args.dtype}"
    rows, lines = [], []
    for loss in args.losses:
        results = {}
        for path in PATHS:
            if args.device == "cuda":  # the CUDA allocator's statistics need no fresh process
                spec = dict(rows=args.rows, hidden_size=args.hidden, vocab=args.vocab, device="cuda",
                            dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32, repeat=args.repeat)
                results[path] = measure(loss, path, **spec)
            else:
                results[path] = _in_fresh_processes(loss, path, args)
            result = results[path]
            timing = common.Timing(result["p50_ms"], result["p20_ms"], result["p80_ms"], result["peak_extra_bytes"])
            rows.append(common.row(loss, path, "fwd+bwd", shape, timing, args.device))
            extra = result["peak_extra_bytes"] / 2**20
            cpu = "" if result["cpu_s"] is None else f" (CPU {result['cpu_s']:.1f} s)"
            print(f"{loss:15s} {path:7s} {result['p50_ms']:10.1f} ms{cpu}  extra {extra:9.1f} MiB", flush=True)
        fused, logits = results["fused"], results["logits"]
        seconds = {path: f"{r['p50_ms'] / 1e3:.2f} ({r['p20_ms'] / 1e3:.2f}–{r['p80_ms'] / 1e3:.2f})"
                   for path, r in results.items()}
        lines.append(f"| {loss} | {seconds['logits']} | {seconds['fused']} "
                     f"| {fused['p50_ms'] / logits['p50_ms']:.2f}× "
                     f"| {'–' if fused['cpu_s'] is None else format(fused['cpu_s'] / logits['cpu_s'], '.2f') + '×'} "
                     f"| {logits['peak_extra_bytes'] / 2**20:.0f} "
                     f"| {fused['peak_extra_bytes'] / 2**20:.0f} "
                     f"| {100 * fused['peak_extra_bytes'] / logits['peak_extra_bytes']:.1f} % |")
    common.write_csv(rows, os.path.join(args.out, f"fused_linear_{args.device}.csv"))
    print(f"\n{shape}, {common.device_name(args.device)}, commit {common.commit()}")
    print("| loss | logits path s (p20–p80) | fused s (p20–p80) | wall fused/logits | CPU time fused/logits "
          "| logits extra MiB | fused extra MiB | memory fused/logits |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
