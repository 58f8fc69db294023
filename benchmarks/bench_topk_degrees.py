"""Benchmark of topk_degrees (the fused top-k -> value transform -> degrees op that dominates GLD) and of the
1-D GW closed form, on every backend of one device, in one process, on the timer and CSV row schema of
benchmarks/common.py (the device is a column).

    python -m benchmarks.bench_topk_degrees --device cpu  --out DIR [--quick]   # cpp vs torch (~10 min, 2 cores)
    python -m benchmarks.bench_topk_degrees --device cuda --out DIR [--quick]   # torch, triton, cuda (~5 min, H100)

What it measures, in order:
  1. CUDA: the device-to-device copy bandwidth (``dst.copy_(src)`` of 2 GiB: bytes read + written per second);
     every topk_degrees time is also reported as a multiple of its floor at that bandwidth (forward = one read of
     the logits; backward = one write of the gradient; forward+backward = the sum).
     CPU: the whole GLD loss (``gld_loss``, dense teacher) forward+backward at N = 4096, V = 32000, k = 10.
  2. for each shape (B*T, V, k, dtype) and each backend of :mod:`infigw.dispatch` on the device:
     ``topk_degrees`` (values=logits, nodes=vocab, graph_norm=mean, sequences of ``SEQ_LEN`` rows) forward, backward
     alone (CUDA: autograd.grad on a retained graph) and forward+backward, plus ``torch.topk`` alone as the
     selection baseline; on CUDA the inputs rotate over enough copies to exceed 4 x the L2 cache;
     peak extra memory of forward+backward beyond the inputs and the gradient itself;
  3. CUDA: the Triton kernels' launch shapes (tile bytes x warps) at the acceptance shape, values logits and
     probs, to pick ``infigw.triton.topk_degrees.TILE_BYTES`` / ``NUM_WARPS`` from measurements;
  4. ``sorted_gw1d`` forward+backward on (16, V) lists.
Shapes or backends that do not fit in memory are printed as skipped, not fatal. Writes ``topk_degrees_<device>.csv``
(rows of ``common.ROW_FIELDS``) into --out and prints Markdown tables.
"""
import argparse
import gc
import itertools
import os
import sys

import torch

from infigw import dispatch
from infigw import functional as F

from .common import copy_bandwidth, markdown_table, row, time_call, time_cpu, write_csv

SEQ_LEN = {"cpu": 512, "cuda": 1024}  # rows per graph: B = (B*T) / SEQ_LEN sequences
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GRID = {"cpu": dict(rows=(2048, 8192), vocab=(32000, 151936), k=(10, 64), dtype=("fp32", "bf16")),
        "cuda": dict(rows=(4096, 16384), vocab=(32000, 151936, 262144), k=(10, 64), dtype=("bf16", "fp32"))}
QUICK = {"cpu": [(2048, 32000, 10, "fp32")], "cuda": [(16384, 151936, 10, "bf16"), (4096, 32000, 64, "fp32")]}
TARGET = (16384, 151936, 10, "bf16")  # the CUDA acceptance shape
L2_ROTATION_BYTES = 4 * 50 * 2**20
LAUNCH_SWEEP = [(2048, 2), (2048, 4), (4096, 2), (4096, 4), (8192, 4), (8192, 8)]  # (tile bytes, warps)
OPTIONS = ("logits", 1.0, "vocab", "mean", False)  # values, temperature, nodes, graph_norm, deterministic


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Rotation:
    """Cycles through independent inputs so that, on CUDA, successive calls miss the L2 cache."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def copies(make, nbytes, device):
    """One input on CPU; on CUDA enough copies that cycling through them defeats the L2 cache."""
    count = max(1, -(-L2_ROTATION_BYTES // nbytes)) if device.type == "cuda" else 1
    return [make() for _ in range(count)]


def timer(device, slow=False):
    """The common timer with options fit for the device (the CPU reference is slow: fewer repeats)."""
    if device.type == "cuda":
        return lambda fn: time_call(fn, device)
    return lambda fn: time_call(fn, device, warmup=0 if slow else 1, repeat=2 if slow else 3)


def measure_topk_degrees(fn, inputs, row_graph, num_graphs, k, grad_degrees, measure):
    """{mode: Timing} of forward, backward alone (CUDA) and forward+backward of one backend."""
    rotation = Rotation(inputs)

    def degrees_of(x):
        return fn(x, row_graph, num_graphs, k, *OPTIONS).degrees

    def forward():
        with torch.no_grad():
            return degrees_of(rotation.next())

    def forward_backward():
        x = rotation.next()
        return torch.autograd.grad(degrees_of(x), x, grad_degrees)[0]

    timings = {"fwd": measure(forward)}
    if inputs[0].device.type == "cuda":
        graphs = Rotation([(degrees_of(x), x) for x in inputs])

        def backward():
            degrees, x = graphs.next()
            return torch.autograd.grad(degrees, x, grad_degrees, retain_graph=True)[0]

        timings["bwd"] = measure(backward)
        del graphs
        free_memory()
    timings["fwd+bwd"] = measure(forward_backward)
    return timings


def run_shape(device, rows, vocab, k, dtype_name, backends, bandwidth, args):
    """CSV rows and Markdown lines of one shape on every backend."""
    free_memory()
    dtype = DTYPES[dtype_name]
    shape = f"{rows}x{vocab} k={k} {dtype_name}"
    num_graphs = max(1, rows // SEQ_LEN[device.type])
    logits_bytes = rows * vocab * dtype.itemsize
    if device.type == "cpu" and rows * vocab > args.max_elements:
        return [], [f"| {shape} | skipped: N*V = {rows * vocab:.2e} > --max-elements {args.max_elements:.0e} |"]
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        inputs = copies(lambda: (torch.randn(rows, vocab, generator=gen, device=device) * 2).to(dtype)
                        .requires_grad_(True), logits_bytes, device)
    except torch.cuda.OutOfMemoryError:
        free_memory()
        return [], [f"| {shape} | skipped: inputs do not fit (OOM) |"]
    row_graph = torch.arange(rows, device=device) // SEQ_LEN[device.type]
    grad_degrees = torch.randn(num_graphs, vocab, device=device)
    plain = Rotation([x.detach() for x in inputs])
    csv_rows = [row("torch.topk", "torch", "fwd", shape, timer(device)(lambda: torch.topk(plain.next(), k, dim=-1)),
                    device)]
    lines, reference_ms = [], None
    for name, fn in backends.items():
        try:
            timings = measure_topk_degrees(fn, inputs, row_graph, num_graphs, k, grad_degrees,
                                           timer(device, slow=name == "torch"))
        except torch.cuda.OutOfMemoryError:
            lines.append(f"| {shape} | {name} | skipped: OOM |")
            free_memory()
            continue
        csv_rows += [row("topk_degrees", name, mode, shape, t, device) for mode, t in timings.items()]
        both = timings["fwd+bwd"]
        reference_ms = both.p50_ms if name == "torch" else reference_ms
        floors = ""
        if bandwidth:
            floor_ms = logits_bytes / bandwidth * 1e3
            floors = " | ".join(f"{timings[m].p50_ms / (floor_ms * f):.2f}" for m, f in (("fwd", 1), ("bwd", 1),
                                                                                         ("fwd+bwd", 2)))
        extra = both.peak_extra_bytes - logits_bytes  # beyond the gradient itself
        speed = f"{reference_ms / both.p50_ms:.1f}x" if reference_ms and name != "torch" else "-"
        lines.append(f"| {shape} | {name} | {timings['fwd'].p50_ms:.3f} | {both.p50_ms:.3f} | {speed} | "
                     f"{100 * extra / logits_bytes:.2f} |" + (f" {floors} |" if floors else ""))
        print(lines[-1], flush=True)
        free_memory()
    return csv_rows, lines


def gld_loss_rows(device, backends):
    """CPU: the whole GLD loss forward+backward at N = 4096, V = 32000, k = 10, fp32, dense teacher."""
    gen = torch.Generator().manual_seed(0)
    batch, vocab = 4096 // SEQ_LEN["cpu"], 32000
    student = torch.randn(batch, SEQ_LEN["cpu"], vocab, generator=gen)
    teacher = torch.randn(batch, SEQ_LEN["cpu"], vocab, generator=gen)
    rows = []
    for name in backends:
        leaf = student.detach().requires_grad_(True)
        timing = time_cpu(lambda: torch.autograd.grad(F.gld_loss(leaf, teacher, k=10, backend=name), leaf),
                          warmup=0 if name == "torch" else 1, repeat=2 if name == "torch" else 3)
        rows.append(row("gld_loss", name, "fwd+bwd", f"{batch * SEQ_LEN['cpu']}x{vocab} k=10 fp32", timing, device))
        print(f"gld_loss fwd+bwd {name}: {timing.p50_ms:.1f} ms", flush=True)
    return rows


def sweep_triton_launch(device):
    """Triton forward and forward+backward at the acceptance shape for each launch shape of the kernels."""
    from infigw.triton import topk_degrees as module

    fn = dispatch.resolve("topk_degrees", "triton", device)[1]
    rows, vocab, k, dtype_name = TARGET
    shape = f"{rows}x{vocab} k={k} {dtype_name}"
    x = (torch.randn(rows, vocab, device=device) * 2).to(DTYPES[dtype_name]).requires_grad_(True)
    row_graph = torch.arange(rows, device=device) // SEQ_LEN["cuda"]
    num_graphs = max(1, rows // SEQ_LEN["cuda"])
    grad_degrees = torch.randn(num_graphs, vocab, device=device)
    defaults = (module.TILE_BYTES, module.NUM_WARPS)
    csv_rows = []
    try:
        for (tile_bytes, warps), values in itertools.product(LAUNCH_SWEEP, ("logits", "probs")):
            module.TILE_BYTES, module.NUM_WARPS = tile_bytes, warps

            def forward():
                return fn(x, row_graph, num_graphs, k, values, 1.0, "vocab", "mean", False)

            backend = f"triton[{tile_bytes}B/{warps}w]"
            csv_rows.append(row("topk_degrees", backend, f"fwd {values}", shape, time_call(forward, device), device))
            csv_rows.append(row("topk_degrees", backend, f"fwd+bwd {values}", shape,
                                time_call(lambda: torch.autograd.grad(forward().degrees, x, grad_degrees)[0], device),
                                device))
    finally:
        module.TILE_BYTES, module.NUM_WARPS = defaults
    return csv_rows


def closed_form_rows(device, vocab):
    """sorted_gw1d forward+backward on (16, vocab) lists, per backend of the device."""
    gen = torch.Generator(device=device).manual_seed(0)
    f = torch.randn(16, vocab, device=device, generator=gen).sort(-1, descending=True).values.requires_grad_(True)
    g = torch.randn(16, vocab, device=device, generator=gen).sort(-1, descending=True).values.requires_grad_(True)
    lengths = torch.full((16,), vocab, dtype=torch.int64, device=device)
    rows = []
    for name in dispatch.BACKENDS:
        try:
            _, fn = dispatch.resolve("sorted_gw1d", name, device)
        except dispatch.BackendUnavailableError:
            continue
        shape = f"16x{vocab}"
        rows.append(row("sorted_gw1d", name, "fwd", shape, timer(device)(lambda: fn(f, g, lengths)), device))
        rows.append(row("sorted_gw1d", name, "fwd+bwd", shape,
                        timer(device)(lambda: torch.autograd.grad(fn(f, g, lengths).sum(), (f, g))), device))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", required=True, help="directory for topk_degrees_<device>.csv")
    parser.add_argument("--quick", action="store_true", help="the acceptance shape(s) only")
    parser.add_argument("--max-elements", type=float, default=5e8,
                        help="CPU: skip grid points whose logits have more elements (memory of this machine)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_topk_degrees: --device cuda needs a CUDA device")
    backends = {}
    for name in dispatch.BACKENDS:
        try:
            backends[name] = dispatch.resolve("topk_degrees", name, device)[1]
        except dispatch.BackendUnavailableError as exc:
            print(f"backend {name}: unavailable ({exc})")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; backends {sorted(backends)}")
    csv_rows, bandwidth = [], None
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device)
        print(f"{torch.cuda.get_device_name(device)}: device-to-device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    else:
        csv_rows += gld_loss_rows(device, backends)
    header = ["| shape | backend | fwd ms | fwd+bwd ms | speed-up vs torch | peak extra beyond the gradient, % of logits |"
              + (" fwd xF | bwd xF | fwd+bwd xF |" if bandwidth else ""),
              "|---|---|---|---|---|---|" + ("---|---|---|" if bandwidth else "")]
    print("\n".join(header), flush=True)
    lines = []
    shapes = QUICK[device.type] if args.quick else list(itertools.product(*GRID[device.type].values()))
    for shape in shapes:
        shape_rows, shape_lines = run_shape(device, *shape, backends, bandwidth, args)
        csv_rows += shape_rows
        lines += shape_lines
    if "triton" in backends and device.type == "cuda":
        csv_rows += sweep_triton_launch(device)
    free_memory()
    csv_rows += closed_form_rows(device, 151936)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"topk_degrees_{device.type}.csv")
    write_csv(csv_rows, path)
    print("\n" + "\n".join(header + lines))
    print("\n" + markdown_table([r for r in csv_rows if r["op"] != "topk_degrees" or "[" in r["backend"]],
                                columns=("op", "backend", "mode", "shape", "p50_ms", "p20_ms", "p80_ms")))
    print(f"\nwrote {path} ({len(csv_rows)} rows)")


if __name__ == "__main__":
    main()
