#!/usr/bin/env bash
# One GPU session, under 8 minutes: the environment, a smoke test, benchmarks/gpu_decode.py (which writes
# benchmarks/results/gpu_decode.md), then the gpu-marked tests (the cudasim ring on CuPy arrays with GPU-sized
# cases, real kernels), whose summary is appended to the results. Needs CuPy, numba-cuda, torch, pytest and hypothesis (the GPU image holds
# them) and no network. Every stage has its own time limit, so a hang in one still brings back the others' logs.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; OUT=<dir> also keeps the logs there
#   TESTS_S=120 BENCH_S=200 NCU_S=0 bash benchmarks/gpu_check.sh     # stage limits in seconds; NCU_S=0: no profile
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOGS=${OUT:-benchmarks/out}
TESTS_S=${TESTS_S:-150}
BENCH_S=${BENCH_S:-240}
mkdir -p "$LOGS" benchmarks/results
export PYTHONUNBUFFERED=1 NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0
T0=$SECONDS

# 0. what this machine is (the results file repeats the GPU line)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1
  $PY - <<'EOF' 2>&1
import importlib
for name in ("numpy", "numba", "numba_cuda", "cupy", "torch", "hypothesis", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:
        print(name, "MISSING", type(err).__name__, err)
EOF
} | tee "$LOGS/env.log"

# retrokv maps retrokv.fast -> fast/ and retrokv.reference -> reference/: install it (offline, no dependencies);
# if pip cannot, links inside the source tree give the same package layout to any import from the root.
if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/retrokv_install.log 2>&1; then
  tail -5 /tmp/retrokv_install.log
  echo "pip install -e . failed; linking retrokv/fast and retrokv/reference instead"
  ln -sfn ../fast retrokv/fast && ln -sfn ../reference retrokv/reference
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import retrokv.fast.cuda, retrokv.reference.wave_index" 2>&1 | tail -3
if ! $PY -c "import cupy; assert cupy.cuda.is_available(); print('GPU:', cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())"; then
  echo "no GPU: nothing to check"; $PY benchmarks/gpu_decode.py; exit 0
fi

# 1. a smoke test of one kernel, so that a broken toolchain shows in seconds, not as 40 failed tests
timeout 120 $PY - <<'EOF' 2>&1 | tee "$LOGS/smoke.log"
import time, numpy as np, cupy as cp
t = time.perf_counter()
from retrokv.fast.cuda import attention as cu
from retrokv.reference import attention as ref
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((8, 128), (2, 5000, 128), (2, 5000, 128)))
out, lse = cu.partial_attention(cp.asarray(q), cp.asarray(k), cp.asarray(v))
want, want_lse = ref.partial_attention(q, k, v)
print(f"smoke: partial_attention N=5000 max|diff| {np.abs(out.get() - want).max():.2e}, "
      f"lse {np.abs(lse.get() - want_lse).max():.2e}, first call {time.perf_counter() - t:.1f} s")
EOF
echo "[${SECONDS}s] smoke done"

# 2. the benchmark, first: it checks its own outputs at full size (sections past --budget-s are reported as not run)
timeout $((BENCH_S + 60)) $PY benchmarks/gpu_decode.py --budget-s "$BENCH_S" 2>&1 | tee "$LOGS/gpu_decode.log"
bench_rc=${PIPESTATUS[0]}


# 2b. Nsight Compute on one decode step's attention kernels (128K tokens, batch 8): where their time goes
# (memory throughput, occupancy, stalls); --clock-control none leaves the GPU's clocks as they are
if command -v ncu >/dev/null && [ "${NCU_S:-90}" -gt 0 ]; then
  timeout "${NCU_S:-90}" ncu --clock-control none --kernel-name regex:'group_kernel|chunk_kernel|merge_kernel' \
    --launch-skip 2 --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats $PY - >"$LOGS/ncu.txt" 2>&1 <<'EOF'
import cupy as cp
from retrokv.fast.cuda import attention as cu
k = cp.random.standard_normal((64, 131072, 128), dtype=cp.float32).astype(cp.float16)
v = cp.random.standard_normal((64, 131072, 128), dtype=cp.float32).astype(cp.float16)
q = cp.random.standard_normal((256, 128), dtype=cp.float32)
for _ in range(3):
    cu.partial_attention(q, k, v)
cp.cuda.Device().synchronize()
EOF
  echo "[${SECONDS}s] ncu done (exit $?; $LOGS/ncu.txt)"
fi

# 3. the cudasim ring on a real GPU (CuPy arrays); a per-test limit where pytest-timeout is installed
PER_TEST=(); $PY -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout 100)
timeout "$TESTS_S" $PY -m pytest -q -m gpu tests/cudasim -p no:cacheprovider -rfE "${PER_TEST[@]}" \
  --junitxml "$LOGS/gpu_tests.xml" 2>&1 | tee "$LOGS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "[${SECONDS}s] tests done (exit $tests_rc)"

{
  echo
  echo "### gpu-marked tests (\`$PY -m pytest -q -m gpu tests/cudasim\`, exit status $tests_rc)"
  echo
  echo '```'
  grep -E "passed|failed|error|FAILED|ERROR" "$LOGS/gpu_tests.log" | tail -n 25
  echo '```'
} >> benchmarks/results/gpu_decode.md
cp benchmarks/results/gpu_decode.md "$LOGS/" 2>/dev/null || true
echo "tests exit $tests_rc, benchmark exit $bench_rc, $((SECONDS - T0)) s in all"
exit $(( tests_rc != 0 || bench_rc != 0 ))
