"""DLF candidate search: fused (``dlf_search``) vs brute-force reference (``dlf_reference``).

    python -m benchmarks.bench_dlf --device cuda --out DIR            # batch 256, V ∈ {32000, 128256}, T ∈ {1, 4}
    python -m benchmarks.bench_dlf --device cpu --batch 32 --reps 2   # what fits a small CPU box

Per cell: fp32 random logits (B, V), (B, V), (B, T, V); the default paper grid (C = 21·T candidates, one active
expert). Times are medians after warm-up: ``triton.testing.do_bench`` on CUDA, ``time.perf_counter`` on CPU.
"Extra memory" is the peak allocated during one call minus what was allocated before it (CUDA allocator
statistics; on CPU the growth of the process peak RSS, VmHWM, reset before each call after ``malloc_trim`` —
approximate). The reference evaluates candidates in chunks sized to ``--ref-mem-gib`` (it
materialises (B, chunk, V) several times); a cell whose single candidate would not fit is skipped with a note.
Prints a Markdown table and writes ``bench_dlf_<device>.csv`` under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import functools
import os
import statistics
import time
from pathlib import Path

import torch

from infigw.dlf import candidate_alphas, dlf_reference, dlf_search

# The reference holds about this many (B, chunk, V) fp32 tensors at once (logits, log-softmax, exp, products).
REFERENCE_LIVE_COPIES = 4
GIB = 1 << 30
# triton.testing.do_bench time budgets (ms) for warm-up and timed repetitions
CUDA_WARMUP_MS, CUDA_REP_MS = 100, 1000


def _inputs(batch, vocab, experts, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    large = torch.randn(batch, vocab, device=device, generator=g) * 3
    small = torch.randn(batch, vocab, device=device, generator=g) * 3
    expert = small.unsqueeze(1) + torch.randn(batch, experts, vocab, device=device, generator=g)
    return large, small, expert


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _extra_memory_bytes(fn, device):
    """Peak memory of one call of ``fn`` above what was in use before it (None where not measurable)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so reuse does not hide growth
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_kib("VmRSS:")
    fn()
    return (_rss_kib("VmHWM:") - before) * 1024


def _median_ms(fn, device, reps):
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=CUDA_WARMUP_MS, rep=CUDA_REP_MS, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _fmt_bytes(n):
    return "n/a" if n is None else f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def run(device, batch, vocabs, experts_list, reps, ref_mem_gib, out):
    backend = "triton" if device == "cuda" else "torch"
    rows = []
    for vocab in vocabs:
        for experts in experts_list:
            inputs = _inputs(batch, vocab, experts, device)
            num_c = candidate_alphas(experts).shape[0]
            per_candidate = REFERENCE_LIVE_COPIES * batch * vocab * 4
            chunk = min(num_c, int(ref_mem_gib * GIB // per_candidate))
            row = dict(device=device, batch=batch, vocab=vocab, experts=experts, candidates=num_c,
                       fused_backend=backend, ref_chunk=chunk)
            fused = functools.partial(dlf_search, *inputs, backend=backend)
            row["fused_ms"] = _median_ms(fused, device, reps)
            row["fused_extra_bytes"] = _extra_memory_bytes(fused, device)
            if chunk >= 1:
                reference = functools.partial(dlf_reference, *inputs, candidate_chunk=chunk)
                same = torch.equal(fused().candidate, reference().candidate)
                row["ref_ms"] = _median_ms(reference, device, reps)
                row["ref_extra_bytes"] = _extra_memory_bytes(reference, device)
                row["speedup"] = row["ref_ms"] / row["fused_ms"]
                row["same_argmin"] = same
                row["note"] = "" if chunk == num_c else f"reference in candidate chunks of {chunk}"
            else:
                row.update(ref_ms=None, ref_extra_bytes=None, speedup=None, same_argmin=None,
                           note=f"reference skipped: one candidate needs > {ref_mem_gib} GiB")
            rows.append(row)
            print(_markdown([row], header=not rows[:-1]), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_dlf_{device}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{_markdown(rows)}\n\nwrote {path}")
    return rows


def _markdown(rows, header=True):
    lines = []
    if header:
        lines += ["| device | B | V | T | C | reference ms | fused ms | speed-up | ref extra mem | fused extra mem | same argmin | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = "—" if r["ref_ms"] is None else f"{r['ref_ms']:.1f}"
        speed = "—" if r["speedup"] is None else f"{r['speedup']:.1f}×"
        lines.append(
            f"| {r['device']} ({r['fused_backend']}) | {r['batch']} | {r['vocab']} | {r['experts']} | {r['candidates']} "
            f"| {ref} | {r['fused_ms']:.2f} | {speed} | {_fmt_bytes(r['ref_extra_bytes'])} "
            f"| {_fmt_bytes(r['fused_extra_bytes'])} | {r['same_argmin']} | {r['note']} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU (CUDA: do_bench time budget)")
    parser.add_argument("--ref-mem-gib", type=float, default=None,
                        help="memory budget of the reference's candidate chunks (default: 4 on CPU, half the free "
                        "GPU memory on CUDA)")
    args = parser.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda needs a visible CUDA device")
        free, _ = torch.cuda.mem_get_info()
        ref_mem = args.ref_mem_gib or free / GIB / 2
    else:
        ref_mem = args.ref_mem_gib or 4.0
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else os.cpu_count()} "
          f"{'' if args.device == 'cuda' else 'CPU cores'}, threads {torch.get_num_threads()}")
    run(args.device, args.batch, args.vocab, args.experts, args.reps, ref_mem, args.out)


if __name__ == "__main__":
    main()
