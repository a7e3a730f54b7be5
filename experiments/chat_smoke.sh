#!/usr/bin/env bash
# A smoke check of conversation SFT on SmolLM2-135M-Instruct (its Q4_1 GGUF): 24 conversation
# rows of 6 one-word answers, SingLoRA r 8 for 12 updates, and the answers to one trained and
# one held-out question before (an adapter trained with lr 1e-12) and after.
#   bash experiments/chat_smoke.sh SMOLLM2_GGUF [OUT_DIR]
set -euo pipefail
G=${1:?the SmolLM2-135M-Instruct GGUF}
OUT=${2:-runs/chat_smoke}
S=${SINGLORA:-singlora}
mkdir -p "$OUT"
python3 - "$OUT/train.jsonl" <<'PY'
import json, sys
pairs = [("What colour is the sky on a clear day?", "Blue."), ("How many days are in a week?", "Seven."),
         ("What is the largest planet in the solar system?", "Jupiter."), ("What do cows drink?", "Water."),
         ("What is frozen water called?", "Ice."), ("Which animal says meow?", "A cat.")]
with open(sys.argv[1], "w") as f:
    for _ in range(4):
        for q, a in pairs:
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
PY
common=(--model "$G" --train "$OUT/train.jsonl" --task sft --max-length 96 --overwrite --quiet)
"$S" train "${common[@]}" --method lora --max-steps 1 --lr 1e-12 --batch-size 1 --out "$OUT/base"
"$S" train "${common[@]}" --method singlora --rank 8 --max-steps 12 --batch-size 4 --lr 2e-3 --out "$OUT/run"
for r in base run; do
  echo "== $r"
  "$S" predict --adapter "$OUT/$r" --system "Answer in one short sentence." --max-new-tokens 24 --json \
    "What is frozen water called?" "What colour is grass?"
done
