#!/usr/bin/env bash
# PyTorch's side of the GPU benchmark on the device: frozen base, PEFT LoRA, PEFT DoRA and a
# plain SingLoRA layer, eager and under torch.compile, at both shapes (batch 8 x 512); then 7B
# at 2 x 2048 (base and SingLoRA). JSON lines under ${OUT:-/tmp}/bench.
#   bash bench/run_torch.sh [SECONDS_7B SECONDS_TINY SECONDS_LONG]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}/bench; mkdir -p "$out"
PY=${PYTHON:-$(ls /opt/torch/.venv/bin/python 2>/dev/null || echo python3)}
timeout "${1:-300}" "$PY" bench/torch_llama.py --shape 7b --methods base,peft-lora,peft-dora,singlora --eager-and-compiled > "$out/torch-7b.jsonl" 2> "$out/torch-7b.err"
timeout "${2:-200}" "$PY" bench/torch_llama.py --shape tinyllama --methods base,peft-lora,peft-dora,singlora --eager-and-compiled > "$out/torch-tinyllama.jsonl" 2> "$out/torch-tinyllama.err"
timeout "${3:-150}" "$PY" bench/torch_llama.py --shape 7b --batch 2 --seq 2048 --methods base,singlora --eager-and-compiled > "$out/long-torch-7b.jsonl" 2> "$out/long-torch-7b.err"
