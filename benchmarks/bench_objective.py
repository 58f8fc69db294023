"""The InfiGFusion objective and its terms, forward+backward, before (the plain-torch paths) and after (the kernels),
in one run (issue 15).

    python -m benchmarks.bench_objective --out DIR                  # CPU: B=2, T=512, V=32000, fp32
    python -m benchmarks.bench_objective --out DIR --device cuda    # GPU: B*T=16384, V=151936, bf16, with floors
    python -m benchmarks.bench_objective --out DIR --quick          # a small shape, to check the script

Terms (student logits (B, T, V) with labels; one dense teacher of T+20 positions and V+500 entries, teacher
positions all valid; k = 10): the cross-entropy (``torch.nn.functional.cross_entropy``), ``gld_loss``,
``uld_loss`` with the full vocabulary and with ``top_k=10``, and ``infigfusion_loss`` with its defaults (full
ULD) and with ``uld_top_k=10``. Each on backend "torch" (before) and on the kernels (after: "cpp" on CPU, "auto"
on CUDA, which picks the CUDA kernels where built). ``gld_loss`` runs on the kernels only: it is the baseline
term of the targets, (CE + GLD) = cross-entropy on torch + ``gld_loss`` on the kernels, as measured in the
same run.

Timer and CSV schema: :mod:`benchmarks.common` (CPU: median wall time after warm-up, peak extra resident set, and
the median process CPU time, printed beside wall time because the development machine is shared; CUDA:
``triton.testing.do_bench`` medians). On CUDA each term is also reported as a multiple of its bandwidth
floor at the measured device-to-device copy bandwidth: full-vocabulary ULD reads both logit tensors and writes
the gradient; the objective reads the student logits and the teacher once and writes the gradient once (the
floor of every variant of it). A term that runs out of memory is recorded as such, not fatal. Writes
``objective_<device>.csv`` into --out and prints a Markdown table with the speed-ups and the targets.
"""
import argparse
import gc
import os
import sys
from typing import Callable, Dict, Optional

import torch

from benchmarks import common
from infigw import dispatch
from infigw import functional as F

SHAPES = {  # (B, T, V, dtype)
    "cpu": (2, 512, 32000, torch.float32),
    "cuda": (8, 2048, 151936, torch.bfloat16),
}
QUICK = (2, 64, 4000, torch.float32)
TEACHER_EXTRA_POSITIONS, TEACHER_EXTRA_VOCAB, K = 20, 500, 10


class Problem:
    """One batch: student logits and labels, a longer, wider dense teacher (all positions valid)."""

    def __init__(self, batch, length, vocab, dtype, device, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.student = torch.randn(batch, length, vocab, generator=gen, device=device).to(dtype)
        self.labels = torch.randint(0, vocab, (batch, length), generator=gen, device=device)
        teacher_shape = (batch, length + TEACHER_EXTRA_POSITIONS, vocab + TEACHER_EXTRA_VOCAB)
        self.teacher = torch.randn(*teacher_shape, generator=gen, device=device).to(dtype)
        self.teacher_mask = torch.ones(teacher_shape[:2], dtype=torch.bool, device=device)
        self.leaf = self.student.detach().requires_grad_(True)
        self.shape = (f"B={batch} T={length} V={vocab} T_t={teacher_shape[1]} V_t={teacher_shape[2]} k={K} "
                      f"{str(dtype).replace('torch.', '')}")

    def fwd_bwd(self, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def call():
            self.leaf.grad = None
            loss_fn(self.leaf).backward()
        return call


def terms(problem: Problem, kernels: str) -> Dict[str, Dict[str, Callable[[], None]]]:
    """term -> {backend label -> forward+backward closure}."""
    p = problem
    teacher = dict(teacher_mask=p.teacher_mask)

    def uld(backend, **options):
        return p.fwd_bwd(lambda x: F.uld_loss(x, p.teacher, p.labels, backend=backend, **teacher, **options))

    def objective(backend, **options):
        return p.fwd_bwd(lambda x: F.infigfusion_loss(x, p.teacher, p.labels, k=K, backend=backend, **teacher,
                                                      **options))

    vocab = p.student.shape[-1]
    both = ("torch", kernels)
    return {
        "cross_entropy": {"torch": p.fwd_bwd(lambda x: torch.nn.functional.cross_entropy(
            x.reshape(-1, vocab).float(), p.labels.reshape(-1)))},
        "gld_loss": {kernels: p.fwd_bwd(lambda x: F.gld_loss(x, p.teacher, p.labels, k=K, backend=kernels,
                                                             **teacher))},
        "uld_loss full": {b: uld(b) for b in both},
        f"uld_loss top_k={K}": {b: uld(b, top_k=K) for b in both},
        "infigfusion_loss defaults": {b: objective(b) for b in both},
        f"infigfusion_loss uld_top_k={K}": {b: objective(b, uld_top_k=K) for b in both},
    }


def floors_ms(problem: Problem, bandwidth: Optional[float]) -> Dict[str, float]:
    """Bandwidth floors of the terms that have one (CUDA only)."""
    if bandwidth is None:
        return {}
    student = problem.student.numel() * problem.student.element_size()
    teacher = problem.teacher.numel() * problem.teacher.element_size()
    one_pass = (2 * student + teacher) / bandwidth * 1e3  # read student + teacher, write the gradient
    return {"uld_loss full": one_pass, "infigfusion_loss defaults": one_pass,
            f"infigfusion_loss uld_top_k={K}": one_pass}


def measure(fn, device, slow: bool) -> Optional[common.Timing]:
    """The timing of ``fn``, or None when it runs out of memory."""
    options = {} if torch.device(device).type == "cuda" else dict(warmup=1, repeat=3 if slow else 5)
    try:
        return common.time_call(fn, device, **options)
    except torch.OutOfMemoryError:
        return None
    finally:
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=None, help="directory for objective_<device>.csv")
    parser.add_argument("--quick", action="store_true", help=f"the small shape {QUICK[:3]} instead")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    kernels = "cpp" if device == "cpu" else "auto"
    status = dispatch.backends()
    if device == "cpu" and status["cpp"] != "available":
        sys.exit(f"the C++ backend is not available: {status['cpp']}")
    resolved = {op: dispatch.resolve(op, kernels, torch.device(device))[0]
                for op in ("topk_summary", "topk_summary_uld", "uld_full", "topk_degrees")}
    batch, length, vocab, dtype = QUICK if args.quick else SHAPES[device]
    problem = Problem(batch, length, vocab, dtype, device)
    bandwidth = common.copy_bandwidth(device) if device == "cuda" else None
    floors = floors_ms(problem, bandwidth)
    print(f"{common.device_name(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads; commit "
          f"{common.commit()}; kernels: {kernels} -> {resolved}"
          + (f"; copy bandwidth {bandwidth / 1e9:.0f} GB/s" if bandwidth else ""), flush=True)

    rows, timings = [], {}
    for term, calls in terms(problem, kernels).items():
        for backend, fn in calls.items():
            timing = measure(fn, device, slow=backend == "torch")
            mode = "fwd+bwd" + (" OOM" if timing is None else "")
            if timing is not None:
                timings[(term, backend)] = timing
                rows.append(common.row(term, backend, mode, problem.shape, timing, device))
            else:
                rows.append(dict(op=term, backend=backend, mode=mode, shape=problem.shape, device=device))
            print(f"  {term} [{backend}]: " + ("OOM" if timing is None else f"{timing.p50_ms:.1f} ms"), flush=True)
    if args.out:
        common.write_csv(rows, os.path.join(args.out, f"objective_{device}.csv"))
    report(timings, kernels, floors, problem.shape)


def report(timings, kernels, floors, shape) -> None:
    """The Markdown table and the targets, in wall time (and, on CPU, process CPU time)."""
    cpu = all(t.cpu_p50_ms is not None for t in timings.values())
    measures = {"wall": {key: t.p50_ms for key, t in timings.items()}}
    if cpu:
        measures["CPU"] = {key: t.cpu_p50_ms for key, t in timings.items()}
    print(f"\n{shape}, forward+backward, median ms; kernels = backend {kernels!r}\n")
    header = ["term"] + [f"{backend} {name} ms" for name in measures for backend in ("torch", "kernels")]
    header += [f"speed-up ({name})" for name in measures] + (["kernels × floor"] if floors else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for term in dict.fromkeys(term for term, _ in timings):
        cells = [term]
        for times in measures.values():
            cells += [f"{times[(term, b)]:.1f}" if (term, b) in times else "" for b in ("torch", kernels)]
        for times in measures.values():
            before, after = times.get((term, "torch")), times.get((term, kernels))
            cells.append(f"{before / after:.1f}×" if before and after else "")
        if floors:
            after = measures["wall"].get((term, kernels))
            cells.append(f"{after / floors[term]:.2f}" if after and term in floors else "")
        print("| " + " | ".join(cells) + " |")
    for name, times in measures.items():
        baseline = times.get(("cross_entropy", "torch"), 0) + times.get(("gld_loss", kernels), 0)
        if baseline:
            print(f"\n{name}: (CE + GLD) = {baseline:.1f} ms")
            for term in ("infigfusion_loss defaults", f"infigfusion_loss uld_top_k={K}"):
                if (term, kernels) in times:
                    print(f"{name}: {term} = {times[(term, kernels)] / baseline:.2f} × (CE + GLD)")
        full = (times.get(("uld_loss full", "torch")), times.get(("uld_loss full", kernels)))
        if all(full):
            print(f"{name}: full-vocabulary ULD {full[0] / full[1]:.1f}× faster than the torch path")


if __name__ == "__main__":
    main()
