"""CLI. mergekit style: ``python -m infigw.merge CONFIG.yml OUT [--out-shard-size 5B] [--random-seed N]
[--cuda | --device DEV] [--no-copy-tokenizer]``; infigw's flags: ``python -m infigw.merge --base DIR --models DIR
[DIR ...] --method rsaf --out DIR``."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings

from .config import parse_kmb, run_config
from .engine import DEFAULT_CHUNK_ELEMS

from .streaming import MergeTerminated, merge_safetensors

_PROG = "python -m infigw.merge"
_FLAG_METHODS = {
    "average": ("weights", "scale"),
    "task_arithmetic": ("weights", "scale"),
    "ties": ("density", "weights", "scale"),
    "dare": ("drop_rate", "weights", "elect_sign", "scale"),
    "dare_ties": ("density", "weights", "scale"),
    "dare_linear": ("density", "weights", "scale"),
    "linear": ("weights",),
    "rsaf": ("r0", "beta", "r_min", "r_max", "elect_sign", "scale"),
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--chunk-elems", type=int, default=DEFAULT_CHUNK_ELEMS,
                        help="elements per processing chunk (memory ~ (K+1) x 4-12 bytes x this)")
    parser.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                        help="hide the progress bar")


def _yaml_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Run a mergekit YAML config (task_arithmetic, ties, dare_ties, dare_linear, "
        "linear, or rsaf: our reconstruction of InfiFusion's RSAF) with infigw's streaming merge.")
    parser.add_argument("config", help="mergekit YAML config")
    parser.add_argument("out", help="output directory (must not exist)")
    parser.add_argument("--out-shard-size", default="5B",
                        help="max output shard size like mergekit's: 500M, 5B (x10^6, x10^9; counted in bytes, as "
                        "mergekit 0.1.5's writer does)")
    parser.add_argument("--random-seed", type=int, default=0, help="seed of the DARE masks (default 0)")
    parser.add_argument("--cuda", action="store_true", help="merge on the GPU (same as --device cuda)")
    parser.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                        help="copy the base's tokenizer files (default: yes)")
    for flag in ("--lazy-unpickle", "--low-cpu-memory", "--write-model-card", "--allow-crimes"):
        parser.add_argument(flag, action="store_true", help="accepted for mergekit compatibility; no effect")
    _common(parser)
    return parser


def _flag_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Merge fine-tuned safetensors checkpoints of one base model (streaming, bounded "
        f"memory). Also: {_PROG} CONFIG.yml OUT runs a mergekit config. RSAF is our reconstruction of "
        "InfiFusion's Rate-Skewness Adaptive Fusion, not the paper's formula.")
    parser.add_argument("--base", required=True, help="base (pivot) model directory")
    parser.add_argument("--models", required=True, nargs="+", help="fine-tuned model directories")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--method", choices=sorted(_FLAG_METHODS), default="rsaf",
                        help="'dare' is deprecated: use dare_linear / dare_ties with --density = 1 - drop rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the DARE masks")
    parser.add_argument("--shard-size", default="5GB", help="max output shard size, e.g. 5GB or 2GiB")
    parser.add_argument("--dtype", default="float32", help="working dtype (default float32)")
    parser.add_argument("--out-dtype", default=None, help="dtype of the merged tensors (default: the base's)")
    _common(parser)
    group = parser.add_argument_group("method options (defaults per method)")
    group.add_argument("--weights", type=float, nargs="+", help="per-model weights, any sign (default 1/K)")
    group.add_argument("--scale", type=float, help="scale of the merged delta (task-arithmetic lambda)")
    group.add_argument("--density", type=float, nargs="+",
                       help="ties/dare_ties/dare_linear: kept fraction, one value or one per model")
    group.add_argument("--drop-rate", type=float, help="dare (deprecated): drop probability (default 0.9)")
    group.add_argument("--elect-sign", action="store_true", help="dare/rsaf: TIES sign election")
    group.add_argument("--r0", type=float, help="rsaf: base keep ratio (default 0.2)")
    group.add_argument("--beta", type=float, help="rsaf: rate sensitivity (default 1)")
    group.add_argument("--r-min", type=float, help="rsaf: lower clip of the keep ratio (default 0.05)")
    group.add_argument("--r-max", type=float, help="rsaf: upper clip of the keep ratio (default 0.5)")
    return parser


def _options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Constructor options of the chosen method from the flags that apply to it (unset flags keep defaults)."""
    given = {k: getattr(args, k) for k in ("weights", "scale", "density", "drop_rate", "elect_sign",
                                              "r0", "beta", "r_min", "r_max")}
    given = {k: v for k, v in given.items() if v is not None and v is not False}
    unused = sorted(set(given) - set(_FLAG_METHODS[args.method]))
    if unused:
        parser.error(f"--{unused[0].replace('_', '-')} does not apply to --method {args.method}")
    if "density" in given and len(given["density"]) == 1:
        given["density"] = given["density"][0]
    return given


def _run(merge) -> int:
    """Run ``merge()``; print its result or a one-line error; return the exit status."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FutureWarning)
            out = merge()
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
    except MergeTerminated:
        print("error: terminated by SIGTERM; the partial merge was removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted; the partial merge was removed", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(f"merged into {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("infigw.merge")
    logger.addHandler(handler)
    try:
        if argv and not argv[0].startswith("-"):
            parser = _yaml_parser()
            args = parser.parse_args(argv)
            try:
                shard = parse_kmb(args.out_shard_size)
            except ValueError as err:
                parser.error(str(err))
            return _run(lambda: run_config(
                args.config, args.out, seed=args.random_seed, max_shard_size=shard, chunk_elems=args.chunk_elems,
                device="cuda" if args.cuda else args.device, copy_tokenizer=args.copy_tokenizer,
                progress=not args.no_progress,
            ))
        parser = _flag_parser()
        args = parser.parse_args(argv)
        options = _options(args, parser)
        return _run(lambda: merge_safetensors(
            args.base, args.models, args.out, args.method, seed=args.seed, max_shard_size=args.shard_size,
            chunk_elems=args.chunk_elems, progress=not args.no_progress, dtype=args.dtype, out_dtype=args.out_dtype,
            device=args.device, **options,
        ))
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
