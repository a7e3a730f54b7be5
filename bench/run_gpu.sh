#!/usr/bin/env bash
# The GPU benchmark, one command on the device machine (after scripts/build-cuda.sh here):
#   bash bench/run_gpu.sh [tinyllama|7b|all] [--compiled]
# Runs singlora-lab's bench-llama and PyTorch's reference for the shape(s), writes JSON lines
# under ${OUT:-/tmp}/bench, and prints the side-by-side table.
set -euo pipefail
cd "$(dirname "$0")/.."
shapes=${1:-tinyllama}; [ "$shapes" = all ] && shapes="tinyllama 7b"
mode=${2:-}
out=${OUT:-/tmp}/bench; mkdir -p "$out"
PY=${PYTHON:-$(ls /opt/torch/.venv/bin/python 2>/dev/null || echo python3)}
for s in $shapes; do
  .carry/lab bench-llama --shape "$s" --methods base,singlora,lora,dora --ceiling --json | tee "$out/singlora-$s.jsonl"
  if [ "$mode" = --compiled ]; then
    "$PY" bench/torch_llama.py --shape "$s" --methods base,peft-lora,peft-dora,singlora --eager-and-compiled | tee "$out/torch-$s.jsonl"
  else
    "$PY" bench/torch_llama.py --shape "$s" --methods base,peft-lora,peft-dora,singlora | tee "$out/torch-$s.jsonl"
  fi
done
"$PY" bench/compare.py "$out"/*.jsonl | tee "$out/table.md"
