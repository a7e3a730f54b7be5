#!/usr/bin/env bash
# The side-by-side speed table of docs/benchmarks.md in one device call (after scripts/build-cuda.sh here; ~4 min):
#   bash bench/run_table.sh
# Ours at both shapes (frozen base, SingLoRA, LoRA, DoRA, with the matmul ceiling), PyTorch's
# frozen base eager and under torch.compile at both shapes, then a second run of ours, 7B at
# 2 x 2048 and TinyLlama with --recompute. The table goes to ${OUT:-/tmp}/table.md, the second
# runs to more.txt, every JSON line to all.jsonl. (bench/run_gpu.sh --compiled also compiles
# PEFT LoRA/DoRA and PyTorch SingLoRA, which does not fit a 10-minute call.)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
PY=${PYTHON:-$(ls /opt/torch/.venv/bin/python 2>/dev/null || echo python3)}
out=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
for s in tinyllama 7b; do
  timeout 120 .carry/lab bench-llama --shape $s --methods base,singlora,lora,dora --ceiling --json > $out/singlora-$s.jsonl 2>/dev/null
done
for s in tinyllama 7b; do
  timeout 150 "$PY" bench/torch_llama.py --shape $s --methods base --eager-and-compiled > $out/torch-$s.jsonl 2>/dev/null
done
for s in tinyllama 7b; do
  timeout 60 .carry/lab bench-llama --shape $s --methods base,singlora --json > $out/again-$s.jsonl 2>/dev/null
done
timeout 90 .carry/lab bench-llama --shape 7b --batch 2 --seq 2048 --methods base,singlora --json > $out/long-7b.jsonl 2>/dev/null
timeout 60 .carry/lab bench-llama --shape tinyllama --methods base,singlora --recompute --json > $out/recompute-tinyllama.jsonl 2>/dev/null
"$PY" bench/compare.py $out/singlora-tinyllama.jsonl $out/singlora-7b.jsonl $out/torch-*.jsonl | tee "$OUT/table.md"
for f in again-tinyllama again-7b long-7b recompute-tinyllama; do
  echo "== $f"
  grep -o '"method":"[a-z]*"\|"median_ms":[0-9.]*\|"peak_memory_gib":[0-9.]*' $out/$f.jsonl | paste - - -
done | tee "$OUT/more.txt"
cat $out/*.jsonl > "$OUT/all.jsonl"
