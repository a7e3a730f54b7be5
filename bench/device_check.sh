#!/usr/bin/env bash
# One device call: correctness on the GPU, PEFT loading what singlora writes, and our side of
# the benchmark. Logs go to $OUT (the device tool brings them back).
#   bash bench/device_check.sh [shapes...]     (default: tinyllama 7b)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=$(ls /opt/torch/.venv/bin/python 2>/dev/null || echo python3)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
echo "== gpu-check"; timeout 180 .carry/lab gpu-check --device cuda 2>&1 | tee "$OUT/gpu-check.txt"
echo "== PEFT loads what singlora writes"; timeout 120 "$PY" scripts/check_peft_loads.py .carry/run .carry/lab 2>&1 | grep -vi warn | tee "$OUT/peft-check.txt"
for s in "${@:-tinyllama 7b}"; do
  for s1 in $s; do
    echo "== bench $s1"; timeout 300 .carry/lab bench-llama --shape "$s1" --methods base,singlora,lora,dora --ceiling --json 2>&1 | tee "$OUT/singlora-$s1.jsonl"
  done
done
