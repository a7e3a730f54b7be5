#!/usr/bin/env bash
# On a GPU device: the MiniLM + Rotten Tomatoes sweeps of docs/results.md (rank, init, ramp, lr),
# several runs at once per GPU, from the bf16 MiniLM copy and the split carried in runs/carry:
#   python3 experiments/to_bf16.py ~/.cache/singlora/all-MiniLM-L6-v2 runs/carry/all-MiniLM-L6-v2
#   cp ~/.cache/singlora/rotten_tomatoes/*.jsonl runs/carry/rotten_tomatoes/
# then, on the device (carry .carry and runs/carry):
#   DEVICES=cuda:0,cuda:1 PER_DEVICE=8 bash experiments/run_sweeps_gpu.sh
# Results go to ${OUT:-/tmp}/sweeps/KIND (runs.jsonl, summary.md, summary.json, KIND.svg). Runs
# already in runs/carry/sweeps/KIND/runs.jsonl (an earlier call's) are not repeated.
set -uo pipefail
cd "$(dirname "$0")/.."
devs=${DEVICES:-cuda:0}; per=${PER_DEVICE:-4}
out=${OUT:-/tmp}/sweeps; mkdir -p "$out"
for kind in ${KINDS:-rank init ramp lr}; do
  mkdir -p "$out/$kind"
  if [ -f "runs/carry/sweeps/$kind/runs.jsonl" ] && [ ! -f "$out/$kind/runs.jsonl" ]; then
    cp "runs/carry/sweeps/$kind/runs.jsonl" "$out/$kind/runs.jsonl"
  fi
  .carry/lab experiment sweep "$kind" --model runs/carry/all-MiniLM-L6-v2 \
    --train runs/carry/rotten_tomatoes/train.jsonl --eval runs/carry/rotten_tomatoes/eval.jsonl \
    --devices "$devs" --jobs-per-device "$per" --out "$out/$kind" ${SWEEP_ARGS:-} 2>> "$out/$kind.log" | head -12
  tail -2 "$out/$kind.log"
  # the per-run directories stay behind (the device tool returns a limited number of files)
  rm -rf "$out/$kind/runs"
done
