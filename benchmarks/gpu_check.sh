#!/usr/bin/env bash
# One GPU session for issue 14, under 8 minutes: the gpu-marked tests (the cudasim ring on CuPy arrays, real
# kernels), then benchmarks/gpu_decode.py, which writes benchmarks/results/gpu_decode.md; the tests' summary is
# appended to it. Needs CuPy, numba-cuda, torch, pytest and hypothesis (the GPU image holds them) and no network.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; OUT=<dir> also keeps the logs there
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOGS=${OUT:-benchmarks/out}
mkdir -p "$LOGS" benchmarks/results
export PYTHONUNBUFFERED=1

# retrokv maps retrokv.fast -> fast/ and retrokv.reference -> reference/: install it (offline, no dependencies)
if ! $PY -c "import retrokv.fast.cuda" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$LOGS/install.log" 2>&1 \
    || { echo "pip install -e . failed:"; tail -5 "$LOGS/install.log"; exit 1; }
fi
$PY -c "import cupy; assert cupy.cuda.is_available(); print('GPU:', cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())" \
  || { echo "no GPU: nothing to check"; $PY benchmarks/gpu_decode.py; exit 0; }

# 1. the cudasim ring on a real GPU (CuPy arrays): at most 150 s
timeout 150 $PY -m pytest -q -m gpu tests/cudasim -p no:cacheprovider 2>&1 | tee "$LOGS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# 2. the benchmark: at most 300 s (sections past --budget-s are reported as not run)
timeout 300 $PY benchmarks/gpu_decode.py --budget-s 240 2>&1 | tee "$LOGS/gpu_decode.log"
bench_rc=${PIPESTATUS[0]}

{
  echo
  echo "### gpu-marked tests (\`$PY -m pytest -q -m gpu tests/cudasim\`, exit status $tests_rc)"
  echo
  echo '```'
  tail -n 15 "$LOGS/gpu_tests.log"
  echo '```'
} >> benchmarks/results/gpu_decode.md
cp benchmarks/results/gpu_decode.md "$LOGS/" 2>/dev/null || true
echo "tests exit $tests_rc, benchmark exit $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
