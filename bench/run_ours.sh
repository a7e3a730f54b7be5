#!/usr/bin/env bash
# Our side of the GPU benchmark on the device (after scripts/build-cuda.sh here): the device
# check, then bench-llama at both shapes (batch 8 x 512) and at 7B shape with 2 x 2048 tokens.
# JSON lines under ${OUT:-/tmp}/bench; bench/run_torch.sh is PyTorch's side.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}/bench; mkdir -p "$out"
timeout 150 .carry/lab gpu-check --device cuda > "$out/gpu-check.txt" 2>&1; echo "gpu-check rc=$?" >> "$out/gpu-check.txt"
tail -2 "$out/gpu-check.txt"
for s in 7b tinyllama; do
  timeout 200 .carry/lab bench-llama --shape "$s" --methods base,singlora,lora,dora --ceiling --json > "$out/singlora-$s.jsonl" 2> "$out/singlora-$s.err"
done
timeout 150 .carry/lab bench-llama --shape 7b --batch 2 --seq 2048 --methods base,singlora --json > "$out/long-singlora-7b.jsonl" 2> "$out/long-singlora-7b.err"
cat "$out"/*.jsonl | cut -c1-200
