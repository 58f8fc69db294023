"""CLI: ``python -m benchmarks.gw_compare [--quick] [--out DIR] [--plots DIR] [--pairs N] [--max-seconds S] ...``.

Writes ``results.csv`` (one row per measurement), ``run.json`` (settings and run-level checks), ``summary.md``
and the PNG plots, and prints the Markdown summary; ``--render DIR`` redoes the last two from the first two.
"""
import argparse
import dataclasses
import os
import shlex
import sys
import time

# BLAS thread pools read these when numpy/torch load, so they are set (from --threads) before those imports.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gw_compare", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small run, under 2 minutes on 2 CPU cores")
    parser.add_argument("--out", default=None,
                        help="output directory (default benchmarks/out/gw_compare-<quick|full>-<UTC time>)")
    parser.add_argument("--plots", default=None, help="directory of the PNG plots (default: --out)")
    parser.add_argument("--pairs", type=int, default=None, help="agreement pairs per similarity level")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop growing n for a method once one call takes longer (default 60; quick 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-entropic", choices=("auto", "on", "off"), default="auto",
                        help="also run the torch entropic GW (auto: only when CUDA is available)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="device of the GLD closed-form timings (the solvers run on the CPU; the torch "
                             "entropic solver on CUDA when available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of torch and BLAS (default 1: stable timings on a shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--render", metavar="DIR", default=None,
                        help="only re-render summary.md and the plots of a finished run in DIR (no measurement)")
    args = parser.parse_args(argv)
    if args.pairs is not None and args.pairs < 3:
        parser.error("--pairs must be >= 3 (rank correlations need at least 3 pairs)")
    if args.max_seconds is not None and not args.max_seconds > 0:
        parser.error("--max-seconds must be > 0")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for variable in _THREAD_VARIABLES:
        os.environ[variable] = str(args.threads)
    import torch

    from ..common import commit, timed
    from . import harness, report

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.render:
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    preset = harness.QUICK if args.quick else harness.FULL
    overrides = dict(seed=args.seed, progress=False if args.no_progress else None, device=args.device)
    if args.pairs is not None:
        overrides["pairs"] = args.pairs
    if args.max_seconds is not None:
        overrides["max_seconds"] = args.max_seconds
    if args.torch_entropic != "auto":
        overrides["torch_entropic"] = args.torch_entropic == "on"
    settings = dataclasses.replace(preset, **overrides)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or os.path.join("benchmarks", "out", f"gw_compare-{'quick' if args.quick else 'full'}-{stamp}")
    os.makedirs(out, exist_ok=True)

    if args.render:
        results, settings = report.load_run(args.render)
        return _finish(results, settings, args.render, args.plots or args.render, report)

    results = harness.Results()
    results.notes.update(load_before=os.getloadavg()[0], threads=args.threads)
    phases = (harness.run_timing, harness.run_agreement, harness.run_brute_force)
    with torch.no_grad():
        for phase in phases:
            _, results.notes[phase.__name__] = timed(lambda: phase(settings, results))
    results.notes.update(
        load_after=os.getloadavg()[0], elapsed=sum(results.notes[p.__name__] for p in phases),
        machine=report.machine_description(), commit=commit(),
        command=" ".join(["python -m benchmarks.gw_compare"] + [shlex.quote(a) for a in (argv or sys.argv[1:])]))
    report.save_run(results, settings, out)
    return _finish(results, settings, out, args.plots or out, report)


def _finish(results, settings, out: str, plots_dir: str, report) -> int:
    plots = report.make_plots(results, settings, plots_dir)
    summary = report.summary_markdown(results, settings, plots)
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(summary)
    print(summary)
    print(f"wrote {out}/results.csv, {out}/run.json, {out}/summary.md and {len(plots)} plots")
    # The contract's inequality is a hard check: a violation fails the run.
    return 1 if results.bound.violations else 0


if __name__ == "__main__":
    sys.exit(main())
