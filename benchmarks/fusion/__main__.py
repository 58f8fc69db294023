"""CLI: ``python -m benchmarks.fusion [--quick] [--seeds N] [--arms NAME ...] [--out DIR] [--cache DIR]``.

The embedded fusion experiment (see ``benchmarks/fusion/assets.py`` for its set-up and ``grid.py`` for its arms):
trains the teachers once (cached under ``--cache``), then one student per arm and seed; writes ``runs.json``,
``summary.md`` (the table) and PNG plots to ``--out``, and prints the table. ``--render DIR`` redoes the table
and plots from a finished run's ``runs.json``.
"""
import argparse
import dataclasses
import multiprocessing
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fusion", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the small version (a few minutes on 2 cores)")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per arm (>= 2 for intervals)")
    parser.add_argument("--arms", nargs="*", default=None, help="only these arms (names as in the table)")
    parser.add_argument("--out", default=None, help="output directory (default benchmarks/out/fusion-<mode>)")
    parser.add_argument("--cache", default="benchmarks/out/cache", help="where trained teachers are cached")
    parser.add_argument("--jobs", type=int, default=2,
                        help="student runs in parallel processes (default 2: one per core)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: tiny models run fastest single-threaded on a shared machine)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--render", metavar="DIR", default=None, help="re-render a finished run's table and plots")
    parser.add_argument("--combine", nargs="+", metavar="DIR", default=None,
                        help="with --render: first gather the runs of these finished runs (e.g. arms run in "
                             "parallel processes) into DIR")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (confidence intervals need two runs)")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return args


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    args = parse_args(argv)
    from . import report

    if args.render:
        if args.combine:
            report.combine([Path(d) for d in args.combine], Path(args.render))
        print(report.render(Path(args.render)))
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from tqdm import tqdm

    from . import assets as assets_module
    from . import grid

    torch.set_num_threads(args.threads)
    scale = assets_module.QUICK if args.quick else assets_module.FULL
    arms = grid.QUICK_ARMS if args.quick else grid.FULL_ARMS
    if args.arms:
        arms = [grid.arm_by_name(name) for name in args.arms]
    out = Path(args.out or f"benchmarks/out/fusion-{'quick' if args.quick else 'full'}")
    out.mkdir(parents=True, exist_ok=True)
    progress = None if args.no_progress else tqdm
    started = time.perf_counter()
    assets = assets_module.build(scale, Path(args.cache), progress)
    setup_seconds = time.perf_counter() - started
    runs = []
    bar = tqdm(total=len(arms) * args.seeds, desc="students", disable=args.no_progress)

    def meta():
        return {
            "command": "python -m benchmarks.fusion " + shlex.join(sys.argv[1:] if argv is None else argv),
            "mode": "quick" if args.quick else "full", "scale": dataclasses.asdict(scale),
            "teacher_bpc": assets.teacher_bpc, "setup_seconds": setup_seconds,
            "total_seconds": time.perf_counter() - started, "commit": _commit(), "jobs": args.jobs,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores visible, {args.jobs} processes x "
                       f"{args.threads} threads, torch {torch.__version__}",
            "metric_gld": grid.METRIC_GLD, "arms": [dataclasses.asdict(a) for a in arms]}

    tasks = [(arm, seed) for arm in arms for seed in range(args.seeds)]
    context = multiprocessing.get_context("spawn")  # workers load the cached assets themselves
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=grid.worker_setup,
                             initargs=(scale, args.cache, args.threads)) as pool:
        futures = {pool.submit(grid.worker_run, arm, seed): (arm, seed) for arm, seed in tasks}
        for future in as_completed(futures):
            arm, seed = futures[future]
            result = future.result()
            runs.append(dataclasses.asdict(result))
            report.save(out, meta(), runs)  # after every run: a stopped grid keeps what it finished
            bar.set_postfix_str(f"{arm.name} seed {seed}: {result.bpc:.3f} bits/char")
            bar.update(1)
    bar.close()
    print(report.render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
