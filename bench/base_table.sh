#!/usr/bin/env bash
# The frozen base in fewer bits on the GPU (after scripts/build-cuda.sh here), in two device
# calls of up to 10 minutes on one warm machine:
#   bash bench/base_table.sh 1   # gpu-check (the NF4 and FP8 kernels, the fast path on NF4 and
#                                # FP8 bases, packed rows, layer checkpointing, SFT on an NF4
#                                # base); bench-llama with the bf16, FP8, NF4 and Q4_K bases at
#                                # TinyLlama and 7B shape (frozen base and SingLoRA, batch 8 x
#                                # 512), FP8 with fast accumulation, bf16 and NF4 with layer
#                                # checkpointing; PyTorch's frozen bf16 base, eager and compiled,
#                                # and bitsandbytes NF4 + PEFT LoRA at 7B: the same-call table
#   bash bench/base_table.sh 2   # a 70B-shaped NF4 base with SingLoRA (activations recomputed,
#                                # batch 1 and 4 x 512)
#   bash bench/base_table.sh 3   # the kernel profiles of the bf16 and FP8 steps
# Every JSON line goes to ${OUT:-/tmp}/base.jsonl, gpu-check's table to gpu-check.txt, a
# summary to base.txt.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
PY=${PYTHON:-$(ls /opt/torch/.venv/bin/python 2>/dev/null || echo python3)}
PART=${1:-1}
# bitsandbytes for the PyTorch QLoRA row: its wheel holds a library for every CUDA version
# (43 MB); the CUDA 13 one alone fits a call. Made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d /tmp/bnb bitsandbytes==0.50.2
#   (cd /tmp/bnb && unzip -q bitsandbytes-*.whl -d x && cd x && find . -name '*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete && tar czf ../bnb.tgz .)
# and carried as .stage/bnb/bnb.tgz
if [ -f .stage/bnb/bnb.tgz ]; then
  mkdir -p /tmp/site && tar xzf .stage/bnb/bnb.tgz -C /tmp/site && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
j="$OUT/base.jsonl"
: > "$j"
if [ "$PART" = 1 ]; then
  timeout 200 .carry/lab gpu-check --device cuda > "$OUT/gpu-check.txt" 2>&1
  echo "gpu-check rc $?: $(tail -1 "$OUT/gpu-check.txt")"
  for s in tinyllama 7b; do
    for b in bf16 fp8 nf4 q4k; do
      timeout 100 .carry/lab bench-llama --shape $s --methods base,singlora --base-dtype $b --json >> "$j" 2>> "$OUT/base.err"
    done
  done
  # FP8 with the forward's GEMMs in cuBLASLt's fast accumulation mode; layer checkpointing
  timeout 60 .carry/lab bench-llama --shape 7b --methods base,singlora --base-dtype fp8 --fp8-fast-accum --json >> "$j" 2>> "$OUT/base.err"
  for b in bf16 nf4; do
    timeout 60 .carry/lab bench-llama --shape 7b --methods singlora --base-dtype $b --checkpoint-layers --json >> "$j" 2>> "$OUT/base.err"
  done
  timeout 150 "$PY" bench/torch_llama.py --shape 7b --methods base --eager-and-compiled >> "$j" 2>> "$OUT/base.err"
  # bitsandbytes NF4 + PEFT LoRA, where bitsandbytes is importable (see bench/torch_llama.py)
  if "$PY" -c "import bitsandbytes" 2>/dev/null; then
    timeout 120 "$PY" bench/torch_llama.py --shape 7b --methods qlora >> "$j" 2>> "$OUT/base.err"
  fi
elif [ "$PART" = 3 ]; then
  # where the step's time goes
  for b in bf16 fp8; do
    timeout 60 .carry/lab bench-llama --shape 7b --methods singlora --base-dtype $b --kernel-profile > "$OUT/kernel-profile-$b.md" 2>> "$OUT/base.err"
  done
else
  for batch in 1 4; do
    timeout 270 .carry/lab bench-llama --shape 70b --methods singlora --base-dtype nf4 --recompute \
      --batch $batch --seq 512 --steps 5 --warmup 2 --json >> "$j" 2>> "$OUT/base.err"
  done
fi
"$PY" - "$j" <<'PY' | tee "$OUT/base.txt"
import json, sys
print("| shape | implementation | base | method | batch | ms/step | tokens/s | peak GiB |")
print("|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    t = r.get("timing", r)
    m = r.get("method", "")
    base = "NF4" if "(NF4)" in m or m == "qlora" else "FP8" if "(FP8)" in m else "Q4_K" if "(Q4_K)" in m else "bf16"
    if "fp8_fast_accum: true" in r.get("fast", ""):
        m += ", fast accumulation"
    if r.get("checkpoint_layers"):
        m += ", layers recomputed"
    elif r.get("recompute"):
        m += ", activations recomputed"
    print(f"| {r.get('shape')} | {r.get('impl', r.get('torch', 'torch'))} | {base} | {m.replace(' (NF4)', '').replace(' (FP8)', '').replace(' (Q4_K)', '')} "
          f"| {r.get('batch')} | {t.get('median_ms', 0):.1f} | {t.get('tokens_per_s', 0):.0f} "
          f"| {r.get('peak_memory_gib') or '-'} |")
PY
tail -5 "$OUT/base.err" 2>/dev/null
