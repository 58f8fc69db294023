#!/usr/bin/env bash
# Everything the GPU machine is for, in one run from the repository root (it keeps nothing between runs):
# build the CUDA extension, run the GPU tests, compute-sanitizer, and the GPU benchmarks.
# Usage: OUT=/path bash benchmarks/gpu_session.sh [build] [test] [sanitize] [bench] [objective] [dlf] [gw] [fused]
#        (default: all)
# POT is not on the GPU machines: carry its wheel in .whl/ (see the device notes) for the gw stage.
set -uo pipefail
OUT="${OUT:-/tmp/infigw-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
stages="${*:-build test sanitize bench objective dlf gw fused}"
status=0
want() { [[ " $stages " == *" $1 "* ]]; }
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$OUT/device.txt"

if want build; then
  step "build (CPU + CUDA kernels)"
  if ! INFIGW_FORCE_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"; exit 1
  fi
  grep -iE "warning|error" "$OUT/build.log" | grep -v "^running" | head -20
  python3 -c "import infigw; print(infigw.backends())" | tee -a "$OUT/device.txt"
fi

if want test; then
  step "GPU tests"
  # every test that runs on CUDA (marked gpu: the op tests' cuda-cuda and triton-cuda cases, the CUDA extremes,
  # the Triton and DLF GPU cases), then the op tests in full (their CPU cases are quick)
  python3 -m pytest tests -m gpu -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  python3 -m pytest tests/test_topk_degrees.py tests/test_sorted_gw1d.py tests/test_op_arguments.py \
    tests/test_extension_ops.py tests/test_dlf.py tests/test_uld_kernels.py tests/test_objective.py \
    tests/test_fused_linear.py -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee -a "$OUT/tests.log" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want sanitize; then
  step "compute-sanitizer"
  PYTHON=python3 bash benchmarks/gpu_check.sh > "$OUT/sanitizer.log" 2>&1 || status=1
  tail -15 "$OUT/sanitizer.log"
fi

if want bench; then
  step "GLD op benchmarks"
  python3 -m benchmarks.bench_topk_degrees --device cuda --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench_topk_degrees.log" | tail -80
fi

if want objective; then
  step "objective benchmark (ULD kernels, the fused objective; floors at the measured copy bandwidth)"
  python3 -m benchmarks.bench_objective --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_objective.log" | tail -25
fi

if want dlf; then
  step "DLF benchmark"
  python3 -m benchmarks.bench_dlf --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_dlf.log" | tail -20
fi

if want fused; then
  step "fused-linear losses vs the logits path (B*T = 16384, V = 151936, bf16)"
  # the top-k forms first; then the full-vocabulary ULD, whose logits path may not fit beside its logits
  python3 -m benchmarks.bench_fused_linear --gpu --out "$OUT/fused_topk" 2>&1 | tee "$OUT/bench_fused_linear.log" \
    | tail -8
  python3 -m benchmarks.bench_fused_linear --gpu --losses uld objective --out "$OUT/fused_full" 2>&1 \
    | tee -a "$OUT/bench_fused_linear.log" | tail -8
fi

if want gw; then
  step "exact-GW tools and the GW comparison on CUDA"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  python3 -m pytest tests/test_exact_gw.py -q -p no:cacheprovider -m gpu 2>&1 | tee "$OUT/gw.log" | tail -5
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  python3 -m benchmarks.gw_compare --quick --device cuda --no-progress --out /tmp/gw --plots /tmp/gw/plots \
    2>&1 | tee -a "$OUT/gw.log" | tail -40
  tar czf "$OUT/gw.tgz" -C /tmp gw
fi
exit $status
