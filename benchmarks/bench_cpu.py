"""CPU benchmark: the C++ kernels (backend "cpp") against the pure-PyTorch reference (backend "torch").

Both backends run in this one process on the same inputs. Reported per configuration: median wall time of the
forward and of forward+backward of ``topk_degrees`` (the fused select -> transform -> degree op that dominates
GLD), their ratio, and the peak extra resident memory of forward+backward in units of one N x V tensor of the
logits' dtype (the logits gradient itself is 1.0). A first table times the whole GLD loss
(``infigw.functional.gld_loss``, student and teacher dense logits) at the acceptance configuration.

    python -m benchmarks.bench_cpu                 # full grid (about 10 minutes on a 2-core machine)
    python -m benchmarks.bench_cpu --quick         # acceptance row and the smallest grid point only

Peak memory: the kernel's high-water mark of this process's resident set (VmHWM), reset before every timed
call through /proc/self/clear_refs (Linux); tracemalloc cannot see torch's allocations.
"""
import argparse
import gc
import itertools
import statistics
import sys
import time

import torch

from infigw import dispatch
from infigw import functional as F

SEQ_LEN = 512  # rows per graph (sequence length); N = B * SEQ_LEN
BACKENDS = ("cpp", "torch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure(fn, warmup, repeat):
    """(median wall seconds, median process CPU seconds, peak extra resident bytes) of ``fn()``.

    CPU time (all threads) is reported beside wall time because the CI machine is shared: wall time there
    includes waiting for the cores."""
    for _ in range(warmup):
        fn()
    times, cpu_times, peaks = [], [], []
    for _ in range(repeat):
        gc.collect()
        base = _status_kb("VmRSS")
        _reset_peak()
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        peaks.append((_status_kb("VmHWM") - base) * 1024)
    return statistics.median(times), statistics.median(cpu_times), max(peaks)


def op_calls(backend, logits, row_graph, num_graphs, k):
    """(forward, forward+backward) closures of topk_degrees on one backend."""
    _, topk_degrees = dispatch.resolve("topk_degrees", backend, logits.device)
    args = (row_graph, num_graphs, k, "logits", 1.0, "vocab", "mean", False)
    leaf = logits.detach().requires_grad_(True)

    def forward():
        with torch.no_grad():
            topk_degrees(logits, *args)

    def forward_backward():
        degrees = topk_degrees(leaf, *args).degrees
        torch.autograd.grad(degrees.sum(), leaf)

    return forward, forward_backward


def gld_call(backend, student, teacher, k):
    leaf = student.detach().requires_grad_(True)

    def forward_backward():
        loss = F.gld_loss(leaf, teacher, k=k, backend=backend)
        torch.autograd.grad(loss, leaf)

    return forward_backward


def fmt_ms(seconds):
    return f"{seconds * 1e3:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="acceptance row and the smallest grid point only")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (C++ backend)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (C++ backend)")
    parser.add_argument("--ref-warmup", type=int, default=0, help="untimed calls of the (slow) reference")
    parser.add_argument("--ref-repeat", type=int, default=2, help="timed calls of the (slow) reference")
    parser.add_argument("--max-elements", type=float, default=5e8,
                        help="skip grid points whose logits have more elements (memory of this machine)")
    args = parser.parse_args(argv)
    status = dispatch.backends()
    if status["cpp"] != "available":
        sys.exit(f"the C++ backend is not available: {status['cpp']}")
    timing = {"cpp": (args.warmup, args.repeat), "torch": (args.ref_warmup, args.ref_repeat)}
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; C++ median of {args.repeat} after "
          f"{args.warmup} warm-up, reference median of {args.ref_repeat} after {args.ref_warmup} warm-up\n")

    # Acceptance: GLD forward+backward, N = 4096, V = 32000, k = 10, fp32, dense teacher of the same shape.
    batch, vocab, k = 4096 // SEQ_LEN, 32000, 10
    student = torch.randn(batch, SEQ_LEN, vocab, generator=gen)
    teacher = torch.randn(batch, SEQ_LEN, vocab, generator=gen)
    results = {b: measure(gld_call(b, student, teacher, k), *timing[b]) for b in BACKENDS}
    unit = student.numel() * student.element_size()
    cpp, ref = results["cpp"], results["torch"]
    print("| GLD loss fwd+bwd, N=4096, V=32000, k=10, fp32 | C++ ms | reference ms | speed-up | C++ CPU ms | "
          "reference CPU ms | CPU-time speed-up | C++ peak extra (x N·V) | reference peak extra (x N·V) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| gld_loss(student, dense teacher) | {fmt_ms(cpp[0])} | {fmt_ms(ref[0])} | {ref[0] / cpp[0]:.2f}x | "
          f"{fmt_ms(cpp[1])} | {fmt_ms(ref[1])} | {ref[1] / cpp[1]:.2f}x | {cpp[2] / unit:.2f} | "
          f"{ref[2] / unit:.2f} |\n", flush=True)
    del student, teacher

    grid = list(itertools.product((2048, 8192), (32000, 151936), (10, 64), DTYPES))
    if args.quick:
        grid = grid[:1]
    print("| N | V | k | dtype | fwd C++ ms | fwd ref ms | fwd speed-up | fwd+bwd C++ ms | fwd+bwd ref ms | "
          "fwd+bwd speed-up | peak extra C++ (x N·V) | peak extra ref (x N·V) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rows, vocab, k, dtype_name in grid:
        if rows * vocab > args.max_elements:
            print(f"| {rows} | {vocab} | {k} | {dtype_name} | skipped: N·V = {rows * vocab:.2e} > --max-elements "
                  f"{args.max_elements:.0e} (memory of this machine) |" + " |" * 7, flush=True)
            continue
        logits = torch.randn(rows, vocab, generator=gen).to(DTYPES[dtype_name])
        row_graph = torch.arange(rows) // SEQ_LEN
        unit = logits.numel() * logits.element_size()
        fwd, both = {}, {}
        for backend in BACKENDS:
            forward, forward_backward = op_calls(backend, logits, row_graph, rows // SEQ_LEN, k)
            fwd[backend] = measure(forward, *timing[backend])
            both[backend] = measure(forward_backward, *timing[backend])
        print(f"| {rows} | {vocab} | {k} | {dtype_name} | {fmt_ms(fwd['cpp'][0])} | {fmt_ms(fwd['torch'][0])} | "
              f"{fwd['torch'][0] / fwd['cpp'][0]:.1f}x | {fmt_ms(both['cpp'][0])} | {fmt_ms(both['torch'][0])} | "
              f"{both['torch'][0] / both['cpp'][0]:.1f}x | {both['cpp'][2] / unit:.2f} | "
              f"{both['torch'][2] / unit:.2f} |", flush=True)
        del logits


if __name__ == "__main__":
    main()
