#!/usr/bin/env bash
# Does a 4-bit base cost accuracy? MiniLM (all-MiniLM-L6-v2) on Rotten Tomatoes, the project's
# fixed split, SingLoRA r = 8, seeds 0-2, with the frozen base in f32 and in NF4
# (`--base-dtype nf4`), everything else equal. CPU.
#   experiments/nf4_quality.sh [OUT_DIR]      (needs `singlora demo --fetch-only` first)
# Writes OUT_DIR/summary.jsonl (one line per run) and prints, per seed, both accuracies, their
# difference, and the largest difference of the training loss over the first 100 updates.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${SINGLORA_BIN:-target/release/singlora}
CACHE=${SINGLORA_CACHE:-$HOME/.cache/singlora}
OUT=${1:-runs/nf4_quality}
mkdir -p "$OUT"
for seed in 0 1 2; do
  for base in auto nf4; do
    run="$OUT/$base-s$seed"
    if [ ! -f "$run/adapter_model.safetensors" ]; then
      "$BIN" train --model "$CACHE/all-MiniLM-L6-v2" --train "$CACHE/rotten_tomatoes/train.jsonl" \
        --eval "$CACHE/rotten_tomatoes/eval.jsonl" --method singlora --rank 8 --alpha 8 \
        --seed "$seed" --epochs 3 --batch-size 32 --base-dtype "$base" --out "$run" --overwrite \
        --quiet >/dev/null
    fi
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
def read(run):
    lines = [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl")]
    ev = [l for l in lines if "eval_accuracy" in l][-1]
    loss = [l["loss"] for l in lines if "loss" in l]
    return ev["eval_accuracy"], loss
rows, diffs = [], []
with open(f"{out}/summary.jsonl", "w") as f:
    for seed in range(3):
        a, la = read(f"auto-s{seed}")
        q, lq = read(f"nf4-s{seed}")
        n = min(100, len(la), len(lq))
        dl = max(abs(x - y) for x, y in zip(la[:n], lq[:n]))
        rel = max(abs(x - y) / abs(x) for x, y in zip(la[:n], lq[:n]))
        row = {"seed": seed, "f32": a, "nf4": q, "nf4_minus_f32": q - a,
               "max_abs_loss_diff_first_100": dl, "max_rel_loss_diff_first_100": rel}
        f.write(json.dumps(row) + "\n")
        rows.append(row)
        diffs.append(q - a)
print("| seed | f32 base | NF4 base | NF4 − f32 | max |Δloss|, first 100 updates (relative) |")
print("|---|---|---|---|---|")
for r in rows:
    print(f"| {r['seed']} | {100*r['f32']:.2f} | {100*r['nf4']:.2f} | {100*r['nf4_minus_f32']:+.2f} | "
          f"{r['max_abs_loss_diff_first_100']:.4f} ({r['max_rel_loss_diff_first_100']:.2%}) |")
f32 = [r["f32"] for r in rows]
print(f"f32: {100*statistics.mean(f32):.2f} ± {100*statistics.stdev(f32):.2f}; "
      f"NF4 − f32: {100*statistics.mean(diffs):+.2f} (from {100*min(diffs):+.2f} to {100*max(diffs):+.2f})")
PY
