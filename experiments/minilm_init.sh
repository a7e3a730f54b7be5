#!/usr/bin/env bash
# MiniLM (all-MiniLM-L6-v2) on Rotten Tomatoes, the fixed split: SingLoRA r = 8 with each
# initialisation (width-scaled kaiming, the public implementations' kaiming over r, a small
# Gaussian), with the default ramp (1% of updates) and without one (T = 0).
#   SEEDS="0 1 2" EPOCHS=3 experiments/minilm_init.sh [OUT_DIR]   (needs `singlora demo --fetch-only`)
# Writes OUT_DIR/summary.jsonl, one line per run, and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${SINGLORA_BIN:-target/release/singlora}
CACHE=${SINGLORA_CACHE:-$HOME/.cache/singlora}
OUT=${1:-runs/minilm_init}
EPOCHS=${EPOCHS:-1}
BATCH=${BATCH:-16}
SEEDS=${SEEDS:-0}
mkdir -p "$OUT"
for init in kaiming_width kaiming_rank gaussian:0.01; do
  for ramp in default 0; do
    for seed in $SEEDS; do
      run="$OUT/${init/:/-}-ramp$ramp-s$seed"
      ramp_arg=(); [ "$ramp" = default ] || ramp_arg=(--ramp-steps "$ramp")
      if [ ! -f "$run/adapter_model.safetensors" ]; then
        "$BIN" train --model "$CACHE/all-MiniLM-L6-v2" --train "$CACHE/rotten_tomatoes/train.jsonl" \
          --eval "$CACHE/rotten_tomatoes/eval.jsonl" --method singlora --rank 8 --alpha 8 --init "$init" \
          "${ramp_arg[@]}" --seed "$seed" --epochs "$EPOCHS" --batch-size "$BATCH" --out "$run" \
          --overwrite --quiet >/dev/null
      fi
      python3 - "$run" "$init" "$ramp" "$seed" >> "$OUT/summary.jsonl" <<'PY'
import json, sys
run, init, ramp, seed = sys.argv[1:]
lines = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
ev = [l for l in lines if "eval_accuracy" in l][-1]
first = next(l for l in lines if "loss" in l)
print(json.dumps({"init": init, "ramp": ramp, "seed": int(seed), "eval_accuracy": ev["eval_accuracy"],
                  "eval_loss": ev["eval_loss"], "first_loss": first["loss"], "steps": ev["step"]}))
PY
      tail -1 "$OUT/summary.jsonl"
    done
  done
done
