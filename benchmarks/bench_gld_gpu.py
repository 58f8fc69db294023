"""GPU benchmark of the GLD ops: every backend on the device against the memory-bandwidth floor, one process.

    python -m benchmarks.bench_gld_gpu --out DIR            # the issue's grid (about 5 minutes on an H100)
    python -m benchmarks.bench_gld_gpu --out DIR --quick    # the acceptance shape and one small shape

What it measures, in order:
  1. device-to-device copy bandwidth (``dst.copy_(src)`` of 2 GiB: bytes read + bytes written per second);
     every later time is also reported as a multiple of its floor at that bandwidth;
  2. for each shape (B*T, V, k, dtype) and each backend of :mod:`infigw.dispatch` available on the device
     ("torch" reference, "triton", "cuda"): ``topk_degrees`` (values=logits, nodes=vocab, graph_norm=mean,
     sequences of ``SEQ_LEN`` rows) forward, backward alone (autograd.grad on a retained graph) and
     forward+backward, plus ``torch.topk`` alone as the selection baseline; medians of
     ``triton.testing.do_bench`` with the input rotated over enough copies to exceed 4 x the L2 cache;
     peak extra memory = ``max_memory_allocated`` during forward+backward minus what was allocated before
     and minus the gradient itself;
  3. the Triton kernels' launch shapes (tile bytes x warps) at the acceptance shape, values logits and probs,
     to pick ``infigw.triton.topk_degrees.TILE_BYTES`` / ``NUM_WARPS`` from measurements;
  4. the sorted closed forms (sorted L1, 1-D GW) forward+backward on (16, V) lists.
Floors: forward = one read of the logits; backward = one write of the gradient (plus one read of the logits
for values=probs, whose backward re-reads them); forward+backward = the sum.
Shapes or backends that do not fit in memory are recorded as skipped (OOM), not fatal. Writes
``gld_gpu.csv`` and ``gld_gpu.json`` into --out and prints the Markdown tables last.
"""
import argparse
import csv
import gc
import itertools
import json
import os
import sys

import torch

from infigw import dispatch

SEQ_LEN = 1024  # rows per graph: B = (B*T) / SEQ_LEN sequences
BACKENDS = ("torch", "triton", "cuda")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FULL = dict(rows=(4096, 16384), vocab=(32000, 151936, 262144), k=(10, 64), dtype=("bf16", "fp32"))
QUICK = [(16384, 151936, 10, "bf16"), (4096, 32000, 64, "fp32")]
TARGET = (16384, 151936, 10, "bf16")  # the acceptance shape
L2_ROTATION_BYTES = 4 * 50 * 2**20


def bench(fn, warmup_ms=10, rep_ms=40):
    """Median milliseconds of ``fn()`` (triton.testing.do_bench; fewer repeats for slow calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def copy_bandwidth(device):
    """Bytes per second of a device-to-device copy (read + write counted)."""
    size = 2 * 2**30
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / (bench(lambda: dst.copy_(src), rep_ms=100) * 1e-3)


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def rotated(make, nbytes):
    """Enough independent inputs that cycling through them defeats the L2 cache."""
    copies = max(1, -(-L2_ROTATION_BYTES // nbytes))
    return [make() for _ in range(copies)]


class Rotation:
    def __init__(self, items):
        self.items, self.i = items, 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def bench_backward(degrees_of, inputs, grad_degrees):
    """Backward alone: autograd.grad over a retained graph per rotated input (freed on return)."""
    graphs = Rotation([(degrees_of(x), x) for x in inputs])

    def backward():
        degrees, x = graphs.next()
        return torch.autograd.grad(degrees, x, grad_degrees, retain_graph=True)[0]

    return bench(backward)


def measure_backend(fn, inputs, row_graph, num_graphs, k, grad_degrees):
    """fwd / bwd / fwd+bwd medians (ms) and peak extra bytes of forward+backward for one backend."""
    rotation = Rotation(inputs)

    def degrees_of(x):
        return fn(x, row_graph, num_graphs, k, "logits", 1.0, "vocab", "mean", False).degrees

    def forward():
        return degrees_of(rotation.next())

    def forward_backward():
        x = rotation.next()
        return torch.autograd.grad(degrees_of(x), x, grad_degrees)[0]

    result = {"fwd_ms": bench(forward), "bwd_ms": bench_backward(degrees_of, inputs, grad_degrees)}
    free_memory()  # the retained graphs of the backward timing
    result["fwd_bwd_ms"] = bench(forward_backward)
    free_memory()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grad = forward_backward()
    torch.cuda.synchronize()
    result["extra_bytes"] = torch.cuda.max_memory_allocated() - before - grad.numel() * grad.element_size()
    return result


def run_shape(rows, vocab, k, dtype_name, bandwidth, backends, device):
    free_memory()  # the previous shape's inputs
    dtype = DTYPES[dtype_name]
    num_graphs = max(1, rows // SEQ_LEN)
    logits_bytes = rows * vocab * dtype.itemsize
    record = dict(rows=rows, vocab=vocab, k=k, dtype=dtype_name, graphs=num_graphs, logits_gb=logits_bytes / 1e9,
                  floor_fwd_ms=logits_bytes / bandwidth * 1e3, floor_bwd_ms=logits_bytes / bandwidth * 1e3,
                  floor_fwd_bwd_ms=2 * logits_bytes / bandwidth * 1e3)
    try:
        inputs = rotated(lambda: (torch.randn(rows, vocab, device=device) * 2).to(dtype).requires_grad_(True),
                         logits_bytes)
    except torch.cuda.OutOfMemoryError:
        free_memory()
        return [dict(record, backend=name, status="skipped: inputs do not fit (OOM)") for name in backends]
    row_graph = torch.arange(rows, device=device) // SEQ_LEN
    grad_degrees = torch.randn(num_graphs, vocab, device=device)
    plain = Rotation([x.detach() for x in inputs])
    record["topk_ms"] = bench(lambda: torch.topk(plain.next(), k, dim=-1))
    records = []
    for name, fn in backends.items():
        row = dict(record, backend=name)
        try:
            row.update(measure_backend(fn, inputs, row_graph, num_graphs, k, grad_degrees), status="ok")
            for phase in ("fwd", "bwd", "fwd_bwd"):
                row[f"{phase}_x_floor"] = row[f"{phase}_ms"] / row[f"floor_{phase}_ms"]
            row["extra_pct_of_logits"] = 100.0 * row["extra_bytes"] / logits_bytes
        except torch.cuda.OutOfMemoryError:
            row["status"] = "skipped: OOM"
        free_memory()
        records.append(row)
        print(f"  {name:7s} {rows}x{vocab} k={k} {dtype_name}: " +
              (f"fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms "
               f"({row['fwd_bwd_x_floor']:.2f}x floor), extra {row['extra_pct_of_logits']:.3f}%"
               if row["status"] == "ok" else row["status"]), flush=True)
    reference = next((r for r in records if r["backend"] == "torch" and r["status"] == "ok"), None)
    for row in records:
        if reference is not None and row["status"] == "ok":
            row["speedup_vs_torch"] = reference["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return records


LAUNCH_SWEEP = [(2048, 2), (2048, 4), (4096, 2), (4096, 4), (8192, 4), (8192, 8)]  # (tile bytes, warps)


def sweep_triton_launch(fn, device):
    """Triton forward and forward+backward at the acceptance shape for each launch shape of the kernels."""
    from infigw.triton import topk_degrees as module

    rows, vocab, k, dtype_name = TARGET
    defaults = (module.TILE_BYTES, module.NUM_WARPS)
    results = []
    try:
        x = (torch.randn(rows, vocab, device=device) * 2).to(DTYPES[dtype_name]).requires_grad_(True)
    except torch.cuda.OutOfMemoryError:
        free_memory()
        return results
    row_graph = torch.arange(rows, device=device) // SEQ_LEN
    num_graphs = max(1, rows // SEQ_LEN)
    grad_degrees = torch.randn(num_graphs, vocab, device=device)
    try:
        for tile_bytes, warps in LAUNCH_SWEEP:
            module.TILE_BYTES, module.NUM_WARPS = tile_bytes, warps
            for values in ("logits", "probs"):
                def forward():
                    return fn(x, row_graph, num_graphs, k, values, 1.0, "vocab", "mean", False)

                def forward_backward():
                    return torch.autograd.grad(forward().degrees, x, grad_degrees)[0]

                results.append(dict(tile_bytes=tile_bytes, num_warps=warps, values=values, fwd_ms=bench(forward),
                                    fwd_bwd_ms=bench(forward_backward)))
    finally:
        module.TILE_BYTES, module.NUM_WARPS = defaults
    return results


def run_closed_forms(vocab, backends, device):
    """sorted_gw1d forward+backward on (16, vocab) lists, per backend."""
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    f = torch.randn(16, vocab, device=device, generator=gen).sort(-1, descending=True).values.requires_grad_(True)
    g = torch.randn(16, vocab, device=device, generator=gen).sort(-1, descending=True).values.requires_grad_(True)
    lengths = torch.full((16,), vocab, dtype=torch.int64, device=device)
    for op, args in (("sorted_gw1d", (f, g, lengths)),):
        for name in backends:
            try:
                _, fn = dispatch.resolve(op, name, f.device)
            except dispatch.BackendUnavailableError:
                continue

            def step():
                return torch.autograd.grad(fn(*args).sum(), (f, g))

            rows.append(dict(op=op, backend=name, lists=f"16x{vocab}", fwd_ms=bench(lambda: fn(*args)),
                             fwd_bwd_ms=bench(step)))
    return rows


def verdict(ok):
    return "met" if ok else "missed"


def markdown(records, closed, sweep, bandwidth, device_name):
    lines = [f"Device: {device_name}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write). "
             "Times are medians in ms; xF = multiple of the bandwidth floor; extra = peak memory beyond the "
             "inputs and the gradient, in % of the logits' size.", "",
             "| B*T | V | k | dtype | backend | fwd ms (xF) | bwd ms (xF) | fwd+bwd ms (xF) | topk ms | "
             "speedup vs torch | extra % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        head = f"| {r['rows']} | {r['vocab']} | {r['k']} | {r['dtype']} | {r['backend']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | | | |")
            continue
        speed = f"{r['speedup_vs_torch']:.1f}x" if "speedup_vs_torch" in r else "-"
        lines.append(f"{head} {r['fwd_ms']:.3f} ({r['fwd_x_floor']:.2f}) | {r['bwd_ms']:.3f} ({r['bwd_x_floor']:.2f}) "
                     f"| {r['fwd_bwd_ms']:.3f} ({r['fwd_bwd_x_floor']:.2f}) | {r.get('topk_ms', float('nan')):.3f} "
                     f"| {speed} | {r['extra_pct_of_logits']:.3f} |")
    target = [r for r in records if (r["rows"], r["vocab"], r["k"], r["dtype"]) == TARGET and r["status"] == "ok"]
    if target:
        lines += ["", f"Targets at B*T={TARGET[0]}, V={TARGET[1]}, k={TARGET[2]}, {TARGET[3]} "
                      "(fwd+bwd <= 2x floor, >= 5x faster than torch, extra < 1%):"]
        for r in target:
            checks = [f"{r['fwd_bwd_x_floor']:.2f}x floor [{verdict(r['fwd_bwd_x_floor'] <= 2)}]"]
            if r["backend"] != "torch" and "speedup_vs_torch" in r:
                checks.append(f"{r['speedup_vs_torch']:.1f}x vs torch [{verdict(r['speedup_vs_torch'] >= 5)}]")
            checks.append(f"extra {r['extra_pct_of_logits']:.3f}% [{verdict(r['extra_pct_of_logits'] < 1)}]")
            lines.append(f"- {r['backend']}: " + ", ".join(checks))
    if sweep:
        floor = 2 * TARGET[0] * TARGET[1] * DTYPES[TARGET[3]].itemsize / bandwidth * 1e3
        lines += ["", f"Triton launch shapes at B*T={TARGET[0]}, V={TARGET[1]}, k={TARGET[2]}, {TARGET[3]} "
                      f"(default: {sweep_default()}); fwd+bwd floor {floor:.3f} ms (probs re-reads: +50%):", "",
                  "| tile bytes | warps | values | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|"]
        lines += [f"| {r['tile_bytes']} | {r['num_warps']} | {r['values']} | {r['fwd_ms']:.3f} "
                  f"| {r['fwd_bwd_ms']:.3f} |" for r in sweep]
    if closed:
        lines += ["", "| closed form | backend | lists | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|"]
        lines += [f"| {c['op']} | {c['backend']} | {c['lists']} | {c['fwd_ms']:.3f} | {c['fwd_bwd_ms']:.3f} |"
                  for c in closed]
    return "\n".join(lines)


def sweep_default():
    from infigw.triton import topk_degrees as module

    return f"{module.TILE_BYTES} bytes, {module.NUM_WARPS} warps"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gld_gpu.csv / gld_gpu.json")
    parser.add_argument("--quick", action="store_true", help="the acceptance shape and one small shape only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gld_gpu: needs a CUDA device")
    device = torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    backends = {}
    for name in BACKENDS:
        try:
            backends[name] = dispatch.resolve("topk_degrees", name, device)[1]
        except dispatch.BackendUnavailableError as exc:
            print(f"backend {name}: unavailable ({exc})")
    device_name = torch.cuda.get_device_name(device)
    bandwidth = copy_bandwidth(device)
    print(f"{device_name}: device-to-device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    shapes = QUICK if args.quick else list(itertools.product(*FULL.values()))
    records = []
    for rows, vocab, k, dtype_name in shapes:
        records += run_shape(rows, vocab, k, dtype_name, bandwidth, backends, device)
    free_memory()
    sweep = sweep_triton_launch(backends["triton"], device) if "triton" in backends else []
    free_memory()
    closed = run_closed_forms(151936, BACKENDS, device)
    with open(os.path.join(args.out, "gld_gpu.json"), "w") as out:
        json.dump(dict(device=device_name, bandwidth_bytes_per_s=bandwidth, seq_len=SEQ_LEN, topk_degrees=records,
                       triton_launch_sweep=sweep, closed_forms=closed), out, indent=1)
    fields = sorted({key for r in records for key in r})
    with open(os.path.join(args.out, "gld_gpu.csv"), "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    print()
    print(markdown(records, closed, sweep, bandwidth, device_name))


if __name__ == "__main__":
    main()
