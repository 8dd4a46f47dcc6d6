#!/usr/bin/env bash
# A device call in steps: each step runs under its own timeout in a work folder outside $OUT, and the folder is
# packed into $OUT/steps.tgz, the only file under $OUT, after every step. So a call cut short by the lease still
# returns all finished steps as one file. (On 2026-12-03 the last call of the session ran out of device time
# before its one packing step, and the device tool, which returns 8 files, brought back 7 of 16 test logs and no
# benchmark JSON.)
# Usage: bash scripts/device_steps.sh "SECONDS NAME COMMAND..." ...
#   e.g. bash scripts/device_steps.sh "360 tests bash scripts/gpu_check.sh --shards 16 --bench none" \
#          "90 pdx python3 scripts/explore_lora.py --persistent-dx"
# Each step's output goes to steps/NAME.log. PEFTKERN_RESULTS_DIR, and gpu_check.sh's OUT, point to
# steps/NAME/, so JSON results land there. Keep the sum of the SECONDS under the lease's budget_left_s
# less ~60 s for the machine's start.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
mkdir -p "$WORK/steps"
status=0
for step in "$@"; do
  read -r secs name cmd <<< "$step"
  mkdir -p "$WORK/steps/$name"
  start=$(date +%s)
  # gpu_check.sh's shard logs go into the step's folder too, so a step cut by its timeout still brings back each shard's
  # pytest -v log: on 2026-12-06 a cut test step came back with its header alone (233 s of device time, no outcome),
  # because PEFTKERN_SHARD_DIR was not set and the shards wrote to a temporary folder that was never packed
  PEFTKERN_SHARD_DIR="${PEFTKERN_SHARD_DIR:-$WORK/steps/$name/shards}" \
  PEFTKERN_RESULTS_DIR="$WORK/steps/$name" OUT="$WORK/steps/$name" timeout "$secs" bash -c "$cmd" \
    > "$WORK/steps/$name.log" 2>&1
  rc=$?
  # a step cut by the timeout may leave a script's EXIT trap still writing its logs (the TERM goes to the whole
  # group): a moment for it before the folder is packed
  [ "$rc" -eq 124 ] && sleep 3
  [ "$rc" -eq 0 ] || status=1
  echo "== step $name: rc $rc in $(( $(date +%s) - start )) s" | tee -a "$WORK/steps/steps.log"
  tar czf "$WORK/steps.tgz" -C "$WORK" steps && mv "$WORK/steps.tgz" "$OUT/steps.tgz"
done
rm -rf "$WORK"
exit "$status"
