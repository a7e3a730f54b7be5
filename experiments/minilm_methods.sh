#!/usr/bin/env bash
# MiniLM (all-MiniLM-L6-v2) on Rotten Tomatoes, the project's fixed split: SingLoRA vs LoRA at
# equal rank (r = 8) and at equal parameter budget (SingLoRA r = 16 vs LoRA r = 8), 3 seeds each.
#   experiments/minilm_methods.sh [OUT_DIR]      (needs `singlora demo --fetch-only` first)
# Writes OUT_DIR/summary.jsonl (one line per run: method, rank, seed, final eval accuracy, loss,
# trainable parameters) and prints mean ± std per configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${SINGLORA_BIN:-target/release/singlora}
CACHE=${SINGLORA_CACHE:-$HOME/.cache/singlora}
OUT=${1:-runs/minilm_methods}
EPOCHS=${EPOCHS:-3}
mkdir -p "$OUT"
for cfg in "singlora 8" "lora 8" "singlora 16"; do
  set -- $cfg
  for seed in 0 1 2; do
    run="$OUT/$1-r$2-s$seed"
    if [ ! -f "$run/adapter_model.safetensors" ]; then
      "$BIN" train --model "$CACHE/all-MiniLM-L6-v2" --train "$CACHE/rotten_tomatoes/train.jsonl" \
        --eval "$CACHE/rotten_tomatoes/eval.jsonl" --method "$1" --rank "$2" --alpha "$2" --seed "$seed" \
        --epochs "$EPOCHS" --batch-size 32 --out "$run" --overwrite --quiet >/dev/null
    fi
    python3 - "$run" "$1" "$2" "$seed" >> "$OUT/summary.jsonl" <<'PY'
import json, sys
run, method, r, seed = sys.argv[1:]
lines = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
ev = [l for l in lines if "eval_accuracy" in l][-1]
plan = json.load(open(f"{run}/run.json"))["plan"]
print(json.dumps({"method": method, "rank": int(r), "seed": int(seed), "eval_accuracy": ev["eval_accuracy"],
                  "eval_loss": ev["eval_loss"], "eval_f1_macro": ev["eval_f1_macro"], "adapter_params": plan["adapter_params"],
                  "steps": ev["step"]}))
PY
  done
done
python3 - "$OUT/summary.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
seen = {}
for r in rows:
    seen[(r["method"], r["rank"], r["seed"])] = r
groups = {}
for (m, k, s), r in seen.items():
    groups.setdefault((m, k), []).append(r)
print("| method | r | adapter params | eval accuracy (mean ± std, 3 seeds) | eval loss |")
print("|---|---|---|---|---|")
for (m, k), rs in groups.items():
    acc = [100 * r["eval_accuracy"] for r in rs]
    loss = [r["eval_loss"] for r in rs]
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    print(f"| {m} | {k} | {rs[0]['adapter_params']:,} | {statistics.mean(acc):.2f} ± {sd:.2f} (n={len(rs)}) | {statistics.mean(loss):.4f} |")
PY
