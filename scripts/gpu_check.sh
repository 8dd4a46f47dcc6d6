#!/usr/bin/env bash
# The one GPU call: install (building the CUDA extension), run the whole test suite, run the benchmarks.
# Everything lands under $OUT (the device tool's output folder) or ./out:
#   gpu_check.log (install, info, benchmark tables), tests.log, and one JSON per benchmark.
# Usage: bash scripts/gpu_check.sh [--tests PATH...] [--select EXPR] [--shards N] [--part K/P]
#          [--bench "lora ia3 ..."] [--bench-args "..."] [--skip-done DIR]
#   --select EXPR is pytest's -k EXPR over the tests collected (--tests is split at spaces, so an expression with
#   "or" cannot go there: on 2026-12-06 a -k passed through --tests collected nothing).
#   --shards N runs the collected tests in N pytest processes at once (the suite is mostly CPU-bound: Triton
#   compiles, model builds); their logs end up in one tests.log; the exit status is the worst of them.
#   --part K/P (with --shards) runs only the collected tests i with i mod P = K (K from 0): the suite in P device
#   calls. On an H200 with the CUDA extension built, the whole suite took more than 440 s on 16 shards (2026-12-03,
#   60a7cf5: three shards cut), and building csrc/ took 71 s: together more than one call's 600 s.
#   --skip-done DIR leaves out every test that an earlier run's shard logs in DIR (tests.*.log, pytest -v) show with
#   an outcome: the rest of a part whose call was cut (2026-12-05: two shards of part 2/3 cut at 285 s).
#   On an H100 the whole suite took ~7.5 min with one process per test file (test_adapter.py alone ~7 min);
#   the device tool allows 600 s a call, so run the tests and the benchmarks in separate calls.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PEFTKERN_RESULTS_DIR="$OUT"
# Every comparison's error / tolerance (tests/conftest.py), ranked into gpu_check.log after the tests: which GPU
# comparisons come nearest their limit on fresh random inputs (scripts/margins.py). The raw log stays out of $OUT
# (the device tool returns 8 files at most).
export PEFTKERN_MARGIN_LOG="${PEFTKERN_MARGIN_LOG:-$(mktemp --suffix=.margins.tsv)}"
margins() {
  [ -s "$PEFTKERN_MARGIN_LOG" ] && python3 scripts/margins.py "$PEFTKERN_MARGIN_LOG" --top 20 | tee -a "$LOG"
}
TESTS="tests"
SHARDS=1
PART=""
BENCH="all"
BENCH_ARGS=""
SKIP_DONE=""
SELECT=""
while [ $# -gt 0 ]; do
  case "$1" in
    # --tests takes every word up to the next option, quoted together or not: on 2026-12-07 an unquoted list of two
    # files ended a device step at once with "unknown argument"
    --tests) TESTS="$2"; shift 2; while [ $# -gt 0 ] && [[ "$1" != --* ]]; do TESTS="$TESTS $1"; shift; done ;;
    --shards) SHARDS="$2"; shift 2 ;;
    --part) PART="$2"; shift 2 ;;
    --bench) BENCH="$2"; shift 2 ;;
    --bench-args) BENCH_ARGS="$2"; shift 2 ;;
    --skip-done) SKIP_DONE="$2"; shift 2 ;;
    --select) SELECT="$2"; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
# before anything is installed: on a machine without a GPU the suite and the benchmarks would run on the CPU and
# write CPU results where GPU ones are expected, and the install would repoint the package to this checkout
# (an audit, 2026-12-08). PEFTKERN_ALLOW_CPU=1 runs anyway.
if [ -z "${PEFTKERN_ALLOW_CPU:-}" ] && ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    2>/dev/null; then
  echo "gpu_check.sh: torch sees no CUDA GPU; this is the GPU run (on the CPU: the README's test command, or" \
    "PEFTKERN_ALLOW_CPU=1 to run it anyway)" >&2
  exit 2
fi
LOG="$OUT/gpu_check.log"
{
  # PEFTKERN_GIT_REV first, as the benchmarks' JSON takes it: the device's copy of .git can carry a stale HEAD
  echo "== $(date -u) ${PEFTKERN_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null)}"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  echo "== install"
  [ -n "${NO_INSTALL:-}" ] || python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 5
  python3 -m peftkern info
} 2>&1 | tee "$LOG"
status=0
if [ "$TESTS" != "none" ] && [ "$SHARDS" -gt 1 ]; then
  # The collected tests dealt out to SHARDS pytest processes like cards (test i to shard i mod SHARDS), so that
  # slow files spread over all of them: in contiguous chunks (2026-11-23, 16 shards) the test_adapter.py shards
  # ran past 440 s while the others finished in 75-275 s. Triton's on-disk cache shares compiled kernels.
  # shellcheck disable=SC2086
  mapfile -t ids < <(python3 -m pytest --collect-only -q -p no:cacheprovider $TESTS ${SELECT:+-k "$SELECT"} \
    2>/dev/null | grep '::')
  if [ -n "$PART" ]; then  # K/P: every P-th collected test from the K-th
    part_k=${PART%/*} part_p=${PART#*/}
    mapfile -t ids < <(printf '%s\n' "${ids[@]}" | awk -v k="$part_k" -v p="$part_p" '(NR - 1) % p == k')
  fi
  if [ -n "$SKIP_DONE" ]; then  # a test id runs to the space before its outcome (ids may hold spaces)
    mapfile -t ids < <(printf '%s\n' "${ids[@]}" | awk 'NR == FNR { done[$0]; next } !($0 in done)' \
      <(cat "$SKIP_DONE"/tests.*.log | grep -oP '^tests/\S.*?(?= (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b)') -)
  fi
  n=${#ids[@]}
  # One process per 6 GB of the GPU's memory at most: 16 processes on an H100 (80 GB) ran out of memory on
  # 2026-12-05 (each held 4-7 GB); an H200 (141 GB) keeps 16.
  mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
  if [ -n "$mem_mib" ] && [ "$(( mem_mib / 1024 / 6 ))" -lt "$SHARDS" ]; then
    SHARDS=$(( mem_mib / 1024 / 6 ))
    echo "== $mem_mib MiB of GPU memory: $SHARDS processes" | tee -a "$LOG"
  fi
  echo "== tests: $TESTS${SELECT:+ -k '$SELECT'}${PART:+ (part $PART)}, $n in $SHARDS processes" | tee -a "$LOG"
  pids=()
  # The shards write outside $OUT and their logs are gathered into $OUT/tests.log however the script ends: on
  # 2026-12-03 a device call ran out of time with 16 shard logs in $OUT, and the tool returned 7 of them.
  # PEFTKERN_SHARD_DIR (a folder under $OUT, with device_steps.sh, which packs the step's folder into one file)
  # keeps each shard's log where it comes back even when the call is cut before gather runs: on 2026-12-05 a part
  # ran past device_steps' timeout and came back with no shard log at all.
  SHARD_DIR=${PEFTKERN_SHARD_DIR:-$(mktemp -d)}
  mkdir -p "$SHARD_DIR"
  gather() {
    for ((i = 0; i < SHARDS; i++)); do
      [ -f "$SHARD_DIR/tests.$i.log" ] || continue
      { echo "===== shard $i"; cat "$SHARD_DIR/tests.$i.log"; echo; } >> "$OUT/tests.log"
      echo "-- shard $i: $(tail -n 1 "$SHARD_DIR/tests.$i.log")" | tee -a "$LOG"
      grep -E "^(FAILED|ERROR)" "$SHARD_DIR/tests.$i.log" | head -n 40 | tee -a "$LOG"
    done
    [ -n "${PEFTKERN_SHARD_DIR:-}" ] || rm -rf "$SHARD_DIR"
    margins
  }
  # A timeout around this script stops bash alone: the shards would run on beside whatever comes next (on
  # 2026-11-23 they overlapped an e2e benchmark and spoiled it), so they are stopped with it.
  trap 'kill "${pids[@]}" 2>/dev/null; [ -d "$SHARD_DIR" ] && [ ! -f "$OUT/tests.log" ] && gather' EXIT
  trap 'exit 143' TERM INT
  for ((i = 0; i < SHARDS && i < n; i++)); do
    shard=()
    for ((j = i; j < n; j += SHARDS)); do shard+=("${ids[j]}"); done
    # --durations: the slowest tests of each shard, so that the suite's time on the GPU can be cut where it goes
    # -v names each test as it starts, so a shard cut short shows the test it was in; faulthandler_timeout dumps
    # the stacks of a test still running after 150 s (a hang, or where the time goes). PEFTKERN_INSTAFAIL: each
    # failure's traceback as it happens (tests/conftest.py), kept by a shard that is cut before its summary.
    PEFTKERN_INSTAFAIL=1 python3 -m pytest "${shard[@]}" -v -p no:cacheprovider -rfs --durations=5 -o faulthandler_timeout=150 \
      > "$SHARD_DIR/tests.$i.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  gather
elif [ "$TESTS" != "none" ]; then
  echo "== tests: $TESTS" | tee -a "$LOG"
  # shellcheck disable=SC2086
  python3 -m pytest $TESTS ${SELECT:+-k "$SELECT"} -q -p no:cacheprovider -rfs 2>&1 | tee "$OUT/tests.log" | tail -n 60
  status=${PIPESTATUS[0]}
  tail -n 3 "$OUT/tests.log" >> "$LOG"
  margins
fi
for b in $BENCH; do
  [ "$b" = "none" ] && continue
  echo "== bench $b" | tee -a "$LOG"
  # shellcheck disable=SC2086
  python3 -m peftkern bench "$b" $BENCH_ARGS 2>&1 | tee -a "$LOG" | grep -v '^\[' | tail -n 80
done
exit "$status"
