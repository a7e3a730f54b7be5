#!/usr/bin/env bash
# The SNLI comparison (docs/results.md) on a GPU machine without network, after
# scripts/build-cuda.sh: MiniLM and the prepared splits arrive as parts of one tar.xz
# (all-MiniLM-L6-v2/ and snli/ from ~/.cache/singlora), the runs so far from
# docs/results/snli/runs.jsonl. runs.jsonl, summary.md, lr.svg, the log and the runs' own
# files (a .tgz) go to $OUT.
#   [JOBS=6] bash bench/snli_device.sh PARTS_DIR MINUTES [TRAIN_ROWS]
# The state lives in /tmp/snli-work on the machine, so a second call on the same warm machine
# goes on from the first call's runs without waiting for them to be committed.
set -uo pipefail
cd "$(dirname "$0")/.."
parts=$1; minutes=$2; rows=${3:-20000}
OUT=${OUT:-/tmp/out}
work=/tmp/snli-work
if [ ! -f $work/snli/test.jsonl ]; then
  mkdir -p $work && cat "$parts"/part-* | xz -dc | tar xf - -C $work || exit 1
fi
state=$work/out
mkdir -p "$state" "$OUT/snli"
[ -f "$state/runs.jsonl" ] || cp docs/results/snli/runs.jsonl "$state/" 2>/dev/null || true
timeout $(( ${minutes%.*} * 60 + 150 )) .carry/lab experiment snli --model $work/all-MiniLM-L6-v2 \
  --data $work/snli --train-rows "$rows" --devices cuda --jobs-per-device "${JOBS:-6}" \
  --minutes "$minutes" --out "$state" > "$OUT/snli.log" 2>&1
echo "exit $?" >> "$OUT/snli.log"
cp "$state"/runs.jsonl "$state"/summary.md "$state"/*.svg "$OUT/snli/" 2>/dev/null
tar czf "$OUT/snli-runs.tgz" -C "$state" runs 2>/dev/null
tail -30 "$OUT/snli.log"
