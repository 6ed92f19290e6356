#!/usr/bin/env bash
# The GPU check in one command (issue #16): build the native core with CUDA, run every CUDA and
# Triton test on the device and the GPU rows of the benches, and write one results file.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]      (default: bench/gpu-results; on the device tool: $OUT)
#
# Uses the machine's own python3 and its packages (torch, triton, pybind11, cmake, pytest,
# pytest-benchmark, hypothesis): nothing is installed, nothing downloaded. Sized for < 8 minutes
# on one H100/H200. Without a CUDA device it says so and exits 0 (the CPU paths are what the
# test suite covers).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
results=${1:-${OUT:-bench/gpu-results}}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): skipped."
    echo "gpu_check: every CUDA op and Triton kernel has a CPU path and a reference, tested by the suite."
    exit 0
fi
mkdir -p "$results"
report="$results/gpu_check.md"
start=$(date +%s)
{
    echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
    nvcc --version | tail -1
    echo '```'
} > "$report"

# 1. the native core with CUDA, for Hopper (sm_90) itself: no PTX fallback at start
build=$(mktemp -d)
arch=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
if ! cmake -S . -B "$build" -DRECBASE_CUDA=ON -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$arch" \
        -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$PY")" \
        > "$results/build.log" 2>&1 \
   || ! cmake --build "$build" -j "$(nproc)" >> "$results/build.log" 2>&1; then
    { echo; echo "**build failed** (last lines of build.log):"; echo '```'; tail -30 "$results/build.log"; echo '```'; } >> "$report"
    cat "$report"
    exit 1
fi
pkg=$(mktemp -d)
cp -r python/recbase "$pkg/"
cp "$build"/_C*.so "$pkg/recbase/"
cp -r kernels/. "$pkg/recbase/kernels/" 2>/dev/null || true
export PYTHONPATH="$pkg"
"$PY" -c "import recbase; print(recbase.info())" >> "$results/build.log" 2>&1
echo "- build: sm_$arch, $(( $(date +%s) - start )) s" >> "$report"

# 2. every test file that holds CUDA or Triton tests, on the device (no interpreter mode)
unset TRITON_INTERPRET
tests="tests/test_rq_ops.py tests/test_quantize.py tests/test_search.py tests/test_concept_attention.py
       tests/test_concept_embedding.py tests/test_level_cross_entropy.py tests/test_model.py tests/test_dense.py"
# shellcheck disable=SC2086
"$PY" -m pytest $tests -q -p no:cacheprovider -m "not slow" --timeout 300 -o addopts="-rfEs" \
    > "$results/tests.log" 2>&1
rc_tests=$?
{ echo "- tests (rc $rc_tests): $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$results/tests.log" | tail -1)"
  grep -E '^(FAILED|ERROR)' "$results/tests.log" | head -20 | sed 's/^/  - /'; } >> "$report"

# 3. the GPU rows of the benches (attention: Triton vs PyTorch SDPA; dense top-N; beam step)
"$PY" -m pytest bench/bench_attention.py bench/bench_dense.py -q -p no:cacheprovider --benchmark-only \
    --benchmark-json="$results/bench.json" -o addopts="" -s > "$results/bench.log" 2>&1
rc_bench=$?
{ echo "- benches (rc $rc_bench): bench.json, bench.log"
  echo; echo '```'; sed -n '/recbase bench summary/,$p' "$results/bench.log" | head -60; echo '```'
  echo; echo "wall time: $(( $(date +%s) - start )) s"; } >> "$report"
cat "$report"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
