#!/usr/bin/env bash
# The main job: set everything up, then compare GLD's closed forms with exact Gromov-Wasserstein on generated
# LLM-like logits (quick mode, under 2 minutes on 2 cores); prints a table, writes CSV/plots to benchmarks/out/.
# Usage: bash benchmarks/run.sh [extra arguments of python -m benchmarks.gw_compare]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/tests/setup_env.sh"
cd "$root"
python -m benchmarks.gw_compare --quick "$@"
