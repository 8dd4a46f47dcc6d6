#!/usr/bin/env bash
# The one GPU call: install (building the CUDA extension), run the whole test suite, run the benchmarks.
# Everything lands under $OUT (the device tool's output folder) or ./out:
#   gpu_check.log (install, info, benchmark tables), tests.log, and one JSON per benchmark.
# Usage: bash scripts/gpu_check.sh [--tests PYTEST_ARGS...] [--bench "lora ia3 ..."] [--bench-args "..."]
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PEFTKERN_RESULTS_DIR="$OUT"
TESTS="tests"
BENCH="lora ia3 krona adapter e2e"
BENCH_ARGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) TESTS="$2"; shift 2 ;;
    --bench) BENCH="$2"; shift 2 ;;
    --bench-args) BENCH_ARGS="$2"; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
LOG="$OUT/gpu_check.log"
{
  echo "== $(date -u) $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  echo "== install"
  python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 5
  python3 -m peftkern info
} 2>&1 | tee "$LOG"
status=0
if [ "$TESTS" != "none" ]; then
  echo "== tests: $TESTS" | tee -a "$LOG"
  # shellcheck disable=SC2086
  python3 -m pytest $TESTS -q -p no:cacheprovider -rfs 2>&1 | tee "$OUT/tests.log" | tail -n 60
  status=${PIPESTATUS[0]}
  tail -n 3 "$OUT/tests.log" >> "$LOG"
fi
for b in $BENCH; do
  [ "$b" = "none" ] && continue
  echo "== bench $b" | tee -a "$LOG"
  # shellcheck disable=SC2086
  python3 -m peftkern bench "$b" $BENCH_ARGS 2>&1 | tee -a "$LOG" | grep -v '^\[' | tail -n 80
done
exit "$status"
