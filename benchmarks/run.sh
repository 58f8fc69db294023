#!/usr/bin/env bash
# The main job: set everything up, then compare GLD's closed forms with exact Gromov-Wasserstein on generated
# LLM-like logits (quick mode, under 2 minutes on 2 cores), and run the quick embedded fusion experiment (two
# teachers with their own tokenizers, a third-tokenizer student, CE / CE+ULD / CE+ULD+GLD; about 5 minutes the
# first time, teachers cached under benchmarks/out/cache); prints both tables, writes CSV/JSON/plots to
# benchmarks/out/. Usage: bash benchmarks/run.sh [extra arguments of python -m benchmarks.gw_compare]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/tests/setup_env.sh"
cd "$root"
python -m benchmarks.gw_compare --quick "$@"
python -m benchmarks.fusion --quick
