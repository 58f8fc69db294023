#!/usr/bin/env bash
# Shared by tests/run.sh and benchmarks/run.sh: create .venv, install torch (CPU wheel on this kind of machine),
# the test/benchmark extras, and build infigw with its C++ extension against that torch.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# build with the torch above (no isolation: an isolated build would fetch another torch)
python -m pip install -q --no-build-isolation -e ".[test,bench,merge,hf,records]"
# mergekit (for the merge conformance tests) in a venv of its own: its dependencies pull numpy >= 2.4, which the
# Triton interpreter tests cannot use
if [ ! -x .venv-mergekit/bin/python ]; then
  python3 -m venv .venv-mergekit
fi
.venv-mergekit/bin/python -c "import mergekit" 2>/dev/null \
  || .venv-mergekit/bin/python -m pip install -q "torch==2.13.0" "mergekit==0.1.5"
python - <<'PY'
import infigw
print(f"infigw {infigw.__version__}; backends: {infigw.backends()}")
PY
