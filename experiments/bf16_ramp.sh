#!/usr/bin/env bash
# Long SingLoRA ramps with the adapters' weights in bf16 against f32 (docs/results.md, "Long
# ramps with bf16 adapter weights"): the attention fit, SingLoRA r = 16, full-rank target,
# 15,000 updates, seeds 0-4, for each weight dtype, ramp T (1% and 30% of the updates) and
# learning rate (1e-4, 1e-3). Then the table, from the runs' raw lines.
#   bash experiments/bf16_ramp.sh [OUT]      (OUT: docs/results/attention_fit/bf16_ramp)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/results/attention_fit/bf16_ramp}
LAB=${LAB:-singlora-lab}
for lr in 1e-4 1e-3; do for t in 0.01 0.30; do for w in f32 bf16; do
  d="$OUT/lr$lr-T$t-$w"
  [ -f "$d/attention_fit.jsonl" ] && continue
  flag=(); [ "$w" = bf16 ] && flag=(--store-bf16)
  "$LAB" experiment attention-fit --seeds 5 --arms singlora:16 --lr "$lr" --ramp-fraction "$t" \
    "${flag[@]}" --out "$d" > /dev/null
done; done; done
python3 - "$OUT" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
print("| lr | ramp T | weights | median final loss (min … max) | entries unchanged by the update at 1,500 / 4,500 / 15,000 (median over seeds) |")
print("|---|---|---|---|---|")
for lr in ["1e-4", "1e-3"]:
    for t in ["0.01", "0.30"]:
        for w in ["f32", "bf16"]:
            runs = [json.loads(l) for l in open(out / f"lr{lr}-T{t}-{w}" / "attention_fit.jsonl")]
            fin = [r["final_loss"] for r in runs]
            def at(step):
                v = [dict(r["unchanged"]).get(step) for r in runs]
                return statistics.median(v)
            print(f"| {lr} | {float(t):.0%} | {w} | {statistics.median(fin):.3g} ({min(fin):.3g} … {max(fin):.3g}) "
                  f"| {at(1500):.1%} / {at(4500):.1%} / {at(15000):.1%} |")
PY
