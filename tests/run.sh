#!/usr/bin/env bash
# Sets everything up and runs the whole CPU test suite: with the C++ extension, without it, and the Triton
# kernels under the interpreter. Usage: bash tests/run.sh [extra pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/tests/setup_env.sh"
cd "$root"

echo "== 1/3 full suite, C++ extension loaded (and the CUDA bindings compile-checked with nvcc, ~1 min)"
INFIGW_CHECK_CUDA_BINDINGS=1 INFIGW_REQUIRE_MERGEKIT=1 python -m pytest tests -q "$@"

echo "== 2/3 full suite, extension disabled (pure-PyTorch path)"
INFIGW_DISABLE_EXTENSION=1 python -c "import infigw; print('import without extension:', infigw.__version__, infigw.backends()['cpp'])"
INFIGW_DISABLE_EXTENSION=1 python -m pytest tests -q "$@"

echo "== 3/3 Triton kernels under TRITON_INTERPRET=1"
TRITON_INTERPRET=1 python -m pytest tests -q -m triton_interpret "$@"
