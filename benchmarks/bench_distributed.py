"""Communication volume and time of the distributed losses vs world size, on CPU gloo (loopback).

    python -m benchmarks.bench_distributed [--worlds 1 2 4] [--batch 4 --length 128 --vocab 32768 --k 10]
                                           [--repeat 3] [--out benchmarks/results/distributed.csv]

For each world size W a fresh group of W processes (``torch.multiprocessing``, gloo, one intra-op thread each) runs
forward + backward of:

- ``infigfusion vocab-parallel``: ``infigfusion_loss`` (uld_top_k = k, GLD on) with the student's logits sharded
  along the vocabulary (V / W per rank): the merged top-k summary, O(B*T*k*W) words;
- ``uld full vocab-parallel``: ``uld_loss`` in its full-vocabulary form, which gathers the logits: O(B*T*V);
- ``gld pooled data-parallel``: ``gld_loss(scope="batch")`` with the batch split over the ranks (B / W sequences
  each, at least 1): the degrees (length V) all-reduced forward and backward;
- at W = 1 also the one-process losses without a group (the baseline).

Bytes are *counted*: every ``torch.distributed`` collective is wrapped and its payload (the bytes this rank puts in:
the input of an all-gather, the tensor of an all-reduce) summed per call of the loss, with the number of
collectives. Time: the median (and 20 / 80 % quantiles) over ``--repeat`` calls after one warm-up, the slowest rank.
The machine has few cores: with W above the core count the processes share them (oversubscribed), which the
"cores" column records.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import commit, device_name, time_cpu

COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor")
FIELDS = ("op", "world", "cores", "shape", "bytes_per_rank", "collectives", "p50_ms", "p20_ms", "p80_ms", "device",
          "commit", "date")


class Counter:
    """Wraps the collectives of ``torch.distributed`` to count calls and payload bytes."""

    def __init__(self):
        self.bytes, self.calls = 0, 0
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name), name))

    def _wrap(self, collective, name):
        @functools.wraps(collective)
        def counted(*args, **kwargs):
            payload = args[0] if name == "all_reduce" else args[1]
            self.bytes += payload.numel() * payload.element_size()
            self.calls += 1
            return collective(*args, **kwargs)
        return counted

    def measure(self, fn):
        self.bytes, self.calls = 0, 0
        fn()
        return self.bytes, self.calls


def _inputs(batch, length, vocab, k, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, length, vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    teacher = 2 * torch.randn(batch, length, vocab // 2, generator=generator)
    return logits, labels, teacher


def _worker(rank, world, store, args, queue):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    from infigw import functional as F

    counter = Counter()  # infigw and torch.distributed.nn look the collectives up at call time: all are counted
    group = dist.group.WORLD
    logits, labels, teacher = _inputs(args.batch, args.length, args.vocab, args.k)
    shard = logits.chunk(world, -1)[rank].clone().requires_grad_()
    per_rank = max(1, args.batch // world)
    rows = slice(rank * per_rank % args.batch, rank * per_rank % args.batch + per_rank)
    own = logits[rows].clone().requires_grad_()
    cases = {
        "infigfusion vocab-parallel": lambda: F.infigfusion_loss(shard, teacher, labels, k=args.k, uld_top_k=args.k,
                                                                 vocab_parallel_group=group).backward(),
        "uld full vocab-parallel": lambda: F.uld_loss(shard, teacher, labels, vocab_parallel_group=group).backward(),
        "gld pooled data-parallel": lambda: F.gld_loss(own, teacher[rows], labels[rows], k=args.k, scope="batch",
                                                       data_parallel_group=group).backward(),
    }
    if world == 1:
        full = logits.clone().requires_grad_()
        cases.update({
            "infigfusion one process": lambda: F.infigfusion_loss(full, teacher, labels, k=args.k,
                                                                  uld_top_k=args.k).backward(),
            "uld full one process": lambda: F.uld_loss(full, teacher, labels).backward(),
            "gld batch graph one process": lambda: F.gld_loss(full[rows], teacher[rows], labels[rows], k=args.k,
                                                              scope="batch").backward(),
        })
    for op, run in cases.items():
        payload, calls = counter.measure(run)
        dist.barrier()
        timing = time_cpu(run, warmup=1, repeat=args.repeat)
        slowest = torch.tensor([timing.p50_ms, timing.p20_ms, timing.p80_ms], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            shape = f"B={args.batch} T={args.length} V={args.vocab} k={args.k}" + (
                f" (B/rank={per_rank})" if "data-parallel" in op else "")
            queue.put(dict(op=op, world=world, cores=os.cpu_count(), shape=shape, bytes_per_rank=payload,
                           collectives=calls, p50_ms=round(float(slowest[0]), 2), p20_ms=round(float(slowest[1]), 2),
                           p80_ms=round(float(slowest[2]), 2), device=device_name("cpu"), commit=commit(),
                           date=datetime.date.today().isoformat()))
    if rank == 0:
        queue.put(None)
    dist.destroy_process_group()


def run_world(world: int, args) -> list:
    context = mp.get_context("spawn")
    queue = context.Queue()
    store = os.path.join(tempfile.mkdtemp(prefix="infigw-bench-gloo-"), "store")
    mp.start_processes(_worker, args=(world, store, args, queue), nprocs=world, start_method="spawn")
    rows = []
    while (row := queue.get(timeout=60)) is not None:
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None, help="CSV file to write (optional)")
    args = parser.parse_args(argv)
    for world in args.worlds:
        if args.vocab % world:
            parser.error(f"--vocab {args.vocab} must be divisible by every world size (got {world})")
    rows = [row for world in args.worlds for row in run_world(world, args)]
    columns = ("op", "world", "cores", "bytes_per_rank", "collectives", "p50_ms", "p20_ms", "p80_ms")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in sorted(rows, key=lambda r: (r["op"], r["world"])):
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    print(f"\nshape: {rows[0]['shape'] if rows else ''}; device: {device_name('cpu')}; commit {commit()}")
    if args.out:
        import csv
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
