#!/usr/bin/env bash
# compute-sanitizer over every CUDA kernel of infigw._C, on a GPU machine, after the extension is built
# (e.g. `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`); builds nothing.
#
#   bash benchmarks/gpu_check.sh            # memcheck, racecheck and synccheck; exits non-zero on any error
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Each tool runs a small pytest selection that launches every kernel at least once with tiny shapes: the top-k
# kernel with and without the seed / compaction path and the probs pass, the cosine scale and the deterministic
# degree reductions, every backward stage, the closed form, and direct calls with out-of-range indices under
# check_data=False (the kernels must skip them: memcheck is the test).
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own allocation, so memcheck sees out-of-bounds
# accesses that the caching allocator would otherwise hide inside a larger block.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SANITIZER=${COMPUTE_SANITIZER:-compute-sanitizer}
command -v "$SANITIZER" >/dev/null || { echo "gpu_check: $SANITIZER not found (set COMPUTE_SANITIZER)"; exit 2; }
"$PYTHON" - <<'PY'
import sys, torch
from infigw import dispatch
status = dispatch.backends()["cuda"]
if not torch.cuda.is_available() or status != "available":
    sys.exit(f"gpu_check: the CUDA kernels are not usable here: {status}")
PY

SELECTION=(
  "test_odd_vocabulary_forward_and_backward and (probs-vocab-cosine-torch.bfloat16 or topk_probs-rank-mean-torch.float32 or logits-vocab-sum-torch.float16)"
  "test_rows_that_defeat_the_threshold_filter and bfloat16 and (ascending or nan)"
  "test_shapes_and_k_extremes and (torch.float32-1000-256 or torch.float32-7-7)"
  "test_deterministic_variant and cuda-cuda and (cosine-vocab or mean-rank)"
  "test_cosine_gradient_with_tiny_probabilities and cuda-cuda"
  "test_closed_forms_on_long_lists and 1000"
  "test_cuda_skips_bad_indices_without_check_data"
)
EXPRESSION=$(printf " or (%s)" "${SELECTION[@]}")
EXPRESSION=${EXPRESSION# or }

status=0
for tool in memcheck racecheck synccheck; do
  echo "== compute-sanitizer --tool $tool"
  if ! PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 \
      "$PYTHON" -m pytest tests/test_cuda_kernels.py tests/test_topk_degrees.py tests/test_op_arguments.py -q -x \
      -p no:cacheprovider -k "$EXPRESSION"; then
    echo "gpu_check: $tool reported errors (or a test failed)"
    status=1
  fi
done
exit $status
