#!/usr/bin/env bash
# One-shot GPU check of fastvat on a CUDA machine (H200 / sm_90): build, CUDA tests, every kernel
# path against the reference (plain and under compute-sanitizer memcheck), op benchmark, rest of
# the test suite. Everything is logged under OUTDIR; each step goes on when the
# previous one fails, and the whole run stays under ~8 minutes (every step has a timeout derived
# from a global deadline).
#
#   benchmarks/gpu_check.sh OUTDIR            (run from anywhere; it cd's to the repo root)
#
# Env: PYTHON (default python3), FASTVAT_GPU_CHECK_BUDGET (total seconds, default 470),
#      TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 16).
# Outputs: OUTDIR/summary.log env.log build.log resource.log pytest.log pytest_all.log
#          sanitize_plain.log sanitizer.log bench.log gpu_ops/bench_cuda.{json,csv,png}
set -u -o pipefail

OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export FASTVAT_CUDA=1
export FASTVAT_BENCH_OPS=1  # the benchmark-only op (_kl_div_with_logits_variant) the checks below use
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${FASTVAT_GPU_CHECK_BUDGET:-470}
DEADLINE=$((START + BUDGET))
SUMMARY="$OUT/summary.log"
: > "$SUMMARY"

elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "=== [$(elapsed)s] $*" | tee -a "$SUMMARY"; }
# limit CAP RESERVE: seconds this step may take: at most CAP, leaving RESERVE for the later steps.
limit() {
  local left=$(( DEADLINE - $(date +%s) - $2 ))
  (( left > $1 )) && left=$1
  (( left < 10 )) && left=10
  echo "$left"
}
# run NAME LOG CAP RESERVE cmd...: timed step; output to LOG (and its tail to the terminal)
run() {
  local name=$1 logf=$2 cap=$3 reserve=$4; shift 4
  local t; t=$(limit "$cap" "$reserve")
  note "$name (timeout ${t}s)"
  local s=$(date +%s)
  timeout --kill-after=10 "$t" "$@" > "$logf" 2>&1
  local rc=$?
  tail -n 15 "$logf"
  local verdict=ok; (( rc == 124 || rc == 137 )) && verdict=TIMEOUT; (( rc != 0 && rc != 124 && rc != 137 )) && verdict=FAILED
  note "$name: $verdict (rc=$rc, $(( $(date +%s) - s ))s)"
  return $rc
}

# ---- 0. machine -------------------------------------------------------------------------------
{
  echo "date: $(date -u)"; echo "repo: $ROOT"; git -C "$ROOT" log --oneline -1 2>/dev/null
  nvidia-smi 2>&1 | head -20
  command -v nvcc && nvcc --version | tail -2
  $PY -c "import torch,sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log" | tail -6

# ---- 1. build in place ------------------------------------------------------------------------
rm -f "$ROOT"/fastvat/_C*.so
run "build (setup.py build_ext --inplace, arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)" "$OUT/build.log" 300 160 \
  $PY setup.py build_ext --inplace
BUILD_RC=$?
$PY -c "import fastvat; print(fastvat.extension_info())" 2>&1 | tee -a "$OUT/build.log" | tee -a "$SUMMARY"
SO=$(ls "$ROOT"/fastvat/_C*.so 2>/dev/null | head -1)
if [ -n "$SO" ] && command -v cuobjdump > /dev/null; then
  # registers / stack / spills per kernel, as built here
  cuobjdump --dump-resource-usage "$SO" > "$OUT/resource.log" 2>&1 || true
  grep -c "Function" "$OUT/resource.log" 2>/dev/null | sed 's/^/kernels in .so: /' | tee -a "$SUMMARY"
  grep -E "STACK:[1-9]|LOCAL:[1-9]" "$OUT/resource.log" | head -5 | sed 's/^/stack\/local use: /' | tee -a "$SUMMARY"
fi
if [ "$BUILD_RC" -ne 0 ]; then
  grep -nE "error|Error" "$OUT/build.log" | head -20 | tee -a "$SUMMARY"
fi

# ---- 2. CUDA tests --------------------------------------------------------------------------------
PYTEST_TIMEOUT=""
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT="--timeout=120"
run "pytest -k cuda (the CUDA cases of the suite)" "$OUT/pytest.log" 120 150 \
  $PY -m pytest tests -q -k cuda -rfE --maxfail=25 -p no:cacheprovider $PYTEST_TIMEOUT
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -2 | tee -a "$SUMMARY"

# ---- 3a. every kernel path once, against the reference (plain run) ----------------------------------
run "sanitize_cases.py (plain: every kernel path vs the reference)" "$OUT/sanitize_plain.log" 45 120 \
  $PY benchmarks/sanitize_cases.py
grep -E "failing checks" "$OUT/sanitize_plain.log" | tee -a "$SUMMARY"

# ---- 4. op benchmark (before the slower checks, so that a slow build still leaves it time) ----------
T_BENCH=$(limit 200 60)
# torch.compile only in the first half of its time, so that every case still gets timed
run "op benchmark (benchmarks/run.py --device cuda --only ops)" "$OUT/bench.log" "$T_BENCH" 0 \
  $PY benchmarks/run.py --device cuda --only ops --no-progress --out "$OUT/gpu_ops" --budget $(( T_BENCH / 2 ))

# ---- 3b. compute-sanitizer memcheck of the same cases ------------------------------------------------
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  run "compute-sanitizer memcheck (fp32,bf16)" "$OUT/sanitizer.log" 90 25 \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 9 --print-limit 20 \
    $PY benchmarks/sanitize_cases.py --dtypes fp32,bf16
  grep -E "ERROR SUMMARY|failing checks|Device not supported|Invalid" "$OUT/sanitizer.log" | head -8 | tee -a "$SUMMARY"
else
  note "compute-sanitizer not found: skipped" | tee "$OUT/sanitizer.log"
fi

# ---- 5. the rest of the test suite (not slow), in what time is left -----------------------------------
run "pytest tests/ minus the cuda cases above (-m 'not slow')" "$OUT/pytest_all.log" 90 0 \
  $PY -m pytest tests -q -k "not cuda" -m "not slow" -rfE --maxfail=25 -p no:cacheprovider $PYTEST_TIMEOUT
grep -E "passed|failed|error" "$OUT/pytest_all.log" | tail -2 | tee -a "$SUMMARY"

# the benchmark table (end of its log) last, next to the summary
sed -n '/^case  /,$p' "$OUT/bench.log" | head -80
note "done in $(elapsed)s; logs in $OUT"
cat "$SUMMARY"
