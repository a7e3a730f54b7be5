#!/usr/bin/env bash
# Training throughput with and without --packing on a length-skewed conversation set.
#   [DEVICE=cuda] [N=192] [SKIP_FIRST=1] bash bench/packing.sh MODEL [OUT_DIR]
# MODEL: a decoder (HF directory or GGUF) with a chat template, e.g. SmolLM2-135M-Instruct.
# The set: N conversations (default 192) whose answers are mostly short (85%: 2-12 words) with
# a long tail (15%: 60-160 words), made with a fixed seed. Both runs: SingLoRA r 8,
# --max-length 256, --batch-size 8 (rows; a packed row holds several conversations), one epoch.
# Time is the sum of the updates' times from metrics.jsonl (model loading left out; with
# SKIP_FIRST=1 the first update, which carries a GPU's start-up, too). Prints one table row
# each.
set -euo pipefail
M=${1:?a decoder model: HF directory or GGUF}
OUT=${2:-runs/packing}
S=${SINGLORA:-singlora}
DEVICE=${DEVICE:-cpu}
mkdir -p "$OUT"
python3 - "$OUT/train.jsonl" "${N:-192}" <<'PY'
import json, random, sys
rng = random.Random(0)
words = ("the a river stone light north quiet market window garden letter winter bridge "
         "music paper salt field engine cloud lamp road story night table voice").split()
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        n = rng.randint(60, 160) if rng.random() < 0.15 else rng.randint(2, 12)
        answer = " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."
        f.write(json.dumps({"messages": [
            {"role": "user", "content": f"Write {n} words, number {i}."},
            {"role": "assistant", "content": answer}]}) + "\n")
PY
printf '| setting | updates | real tokens per update | epoch (s) | tokens/s |\n'
printf '|---|---|---|---|---|\n'
for mode in plain packed; do
  extra=()
  [ "$mode" = packed ] && extra=(--packing)
  "$S" train --model "$M" --train "$OUT/train.jsonl" --task sft --method singlora --rank 8 \
    --max-length 256 --batch-size 8 --epochs 1 --lr 1e-3 --save-minutes 0 --device "$DEVICE" \
    --overwrite --quiet "${extra[@]}" --out "$OUT/$mode" > "$OUT/$mode.log" 2>&1
  python3 - "$OUT/$mode" "$mode" "${SKIP_FIRST:-0}" <<'PY'
import json, sys
run, mode, skip = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
lines = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"tokens_per_s"' in l]
tokens = sum(l["tokens"] for l in lines)
updates = len(lines)
# SKIP_FIRST=1 leaves the first update out of the time: on a GPU it includes the device's
# one-time start-up (kernel loading, cuBLAS handles)
timed = lines[1:] if skip and updates > 1 else lines
secs = sum(l["tokens"] / l["tokens_per_s"] for l in timed)
rate = sum(l["tokens"] for l in timed) / secs
print(f"| {mode} | {updates} | {tokens / updates:.0f} | {secs:.1f} | {rate:.0f} |")
PY
done
