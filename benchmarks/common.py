"""What every benchmark of infigw shares: one timer, one peak-memory probe and one CSV row schema.

Timer: on CUDA the median and quantiles of ``triton.testing.do_bench`` (it flushes L2 between calls and
synchronises); on CPU ``time.perf_counter`` around each call after warm-up, with the peak extra resident set
(VmHWM, reset through /proc/self/clear_refs) since tracemalloc cannot see torch's allocations, and the median
process CPU time (on a shared machine wall time also counts the waits for the cores); :func:`timed` for one call.
Every result is one :data:`ROW_FIELDS` row, so the CSV files of all benchmarks read alike:

    op, backend, mode, shape, p50_ms, p20_ms, p80_ms, peak_extra_mib, device, commit, date
"""
from __future__ import annotations

import csv
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

import torch

ROW_FIELDS = ("op", "backend", "mode", "shape", "p50_ms", "p20_ms", "p80_ms", "peak_extra_mib", "device",
              "commit", "date")


@dataclass(frozen=True)
class Timing:
    """Quantiles of one call's wall time in milliseconds, and its peak extra memory in bytes (None if unknown)."""

    p50_ms: float
    p20_ms: float
    p80_ms: float
    peak_extra_bytes: Optional[int] = None
    cpu_p50_ms: Optional[float] = None  # CPU: median process CPU time of the call (all threads), else None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _quantile(samples, q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_cpu(fn: Callable[[], object], warmup: int = 1, repeat: int = 5, memory: bool = True) -> Timing:
    """Wall-time quantiles of ``fn()`` (perf_counter around each call) and, with ``memory``, the peak extra
    resident memory over the timed calls (a garbage collection and two /proc reads per call: leave it off to
    time many calls of microseconds)."""
    for _ in range(warmup):
        fn()
    times, cpu_times, peaks = [], [], []
    for _ in range(repeat):
        if memory:
            gc.collect()
            base = _status_kb("VmRSS")
            _reset_peak_rss()
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        cpu_times.append((time.process_time() - cpu_start) * 1e3)
        if memory:
            peaks.append((_status_kb("VmHWM") - base) * 1024)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8),
                  max(peaks) if peaks else None, statistics.median(cpu_times))


def timed(fn: Callable[[], object]) -> Tuple[object, float]:
    """(``fn()``, its wall time in seconds) of one call; CUDA work is synchronised before the clock stops."""
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def time_cuda(fn: Callable[[], object], warmup_ms: int = 10, rep_ms: int = 40) -> Timing:
    """``triton.testing.do_bench`` quantiles of ``fn()`` and its peak extra CUDA memory (one more call)."""
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return Timing(p50, p20, p80, torch.cuda.max_memory_allocated() - base)


def time_call(fn: Callable[[], object], device, **options) -> Timing:
    """:func:`time_cuda` for CUDA devices, :func:`time_cpu` otherwise."""
    return time_cuda(fn, **options) if torch.device(device).type == "cuda" else time_cpu(fn, **options)


def copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy of 2 GiB (read + write counted): the bandwidth floors' unit."""
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_call(lambda: dst.copy_(src), device, rep_ms=100).p50_ms * 1e-3)


def commit() -> str:
    """The repository's short commit hash, with ``+dirty`` when the working tree has changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def device_name(device) -> str:
    """A short description of the machine that ran ``device``: the GPU's name, or the CPU model and cores."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def row(op: str, backend: str, mode: str, shape: str, timing: Timing, device) -> dict:
    """One CSV row of :data:`ROW_FIELDS`."""
    peak = None if timing.peak_extra_bytes is None else round(timing.peak_extra_bytes / 2**20, 2)
    return dict(op=op, backend=backend, mode=mode, shape=shape, p50_ms=round(timing.p50_ms, 4),
                p20_ms=round(timing.p20_ms, 4), p80_ms=round(timing.p80_ms, 4), peak_extra_mib=peak,
                device=device_name(device), commit=commit(), date=datetime.date.today().isoformat())


def write_csv(rows: Iterable[dict], path: str) -> None:
    """Write rows of :data:`ROW_FIELDS` (extra keys are an error) to ``path``, atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def markdown_table(rows: Iterable[dict], columns=("op", "backend", "mode", "shape", "p50_ms", "peak_extra_mib")) -> str:
    """The rows as a Markdown table of the given columns."""
    rows = list(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
