"""CLI: ``python -m infigw.merge --base DIR --models DIR [DIR ...] --method rsaf --out DIR``."""
from __future__ import annotations

import argparse
import sys

from .engine import DEFAULT_CHUNK_ELEMS
from .methods import METHODS
from .streaming import merge_safetensors


def _options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Constructor options of the chosen method from the flags that apply to it (unset flags keep defaults)."""
    per_method = {
        "average": ("weights", "scale"),
        "ties": ("density", "weights", "scale"),
        "dare": ("drop_rate", "weights", "elect_sign", "scale"),
        "rsaf": ("r0", "beta", "r_min", "r_max", "elect_sign", "scale"),
    }
    allowed = per_method[args.method]
    given = {k: getattr(args, k) for k in ("weights", "scale", "density", "drop_rate", "elect_sign",
                                              "r0", "beta", "r_min", "r_max")}
    given = {k: v for k, v in given.items() if v is not None and v is not False}
    unused = sorted(set(given) - set(allowed))
    if unused:
        parser.error(f"--{unused[0].replace('_', '-')} does not apply to --method {args.method}")
    return given


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infigw.merge",
        description="Merge fine-tuned safetensors checkpoints of one base model (streaming, bounded memory). "
        "RSAF is our reconstruction of InfiFusion's Rate-Skewness Adaptive Fusion, not the paper's formula.",
    )
    parser.add_argument("--base", required=True, help="base (pivot) model directory")
    parser.add_argument("--models", required=True, nargs="+", help="fine-tuned model directories")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--method", choices=sorted(METHODS), default="rsaf")
    parser.add_argument("--seed", type=int, default=0, help="seed of the DARE drop masks")
    parser.add_argument("--shard-size", default="5GB", help="max output shard size, e.g. 5GB or 2GiB")
    parser.add_argument("--chunk-elems", type=int, default=DEFAULT_CHUNK_ELEMS,
                        help="elements per processing chunk (memory ~ (K+1) x 4-12 bytes x this)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    group = parser.add_argument_group("method options (defaults per method)")
    group.add_argument("--weights", type=float, nargs="+", help="average/ties/dare: per-model weights")
    group.add_argument("--scale", type=float, help="all: scale of the merged delta (task-arithmetic lambda)")
    group.add_argument("--density", type=float, help="ties: kept fraction of |delta| (default 0.2)")
    group.add_argument("--drop-rate", type=float, help="dare: drop probability (default 0.9)")
    group.add_argument("--elect-sign", action="store_true", help="dare/rsaf: TIES sign election")
    group.add_argument("--r0", type=float, help="rsaf: base keep ratio (default 0.2)")
    group.add_argument("--beta", type=float, help="rsaf: rate sensitivity (default 1)")
    group.add_argument("--r-min", type=float, help="rsaf: lower clip of the keep ratio (default 0.05)")
    group.add_argument("--r-max", type=float, help="rsaf: upper clip of the keep ratio (default 0.5)")
    args = parser.parse_args(argv)

    try:
        out = merge_safetensors(
            args.base, args.models, args.out, args.method, seed=args.seed, max_shard_size=args.shard_size,
            chunk_elems=args.chunk_elems, progress=not args.no_progress, **_options(args, parser),
        )
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged {len(args.models)} model(s) with {args.method} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
