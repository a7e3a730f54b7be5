#!/usr/bin/env bash
# Conversation SFT on a real task, small enough for a CPU: SNLI pairs as chat turns
# ("Premise: … Hypothesis: … Answer with one word: entailment, neutral or contradiction."),
# the assistant answering with the label. SmolLM2-135M-Instruct (or another chat model) is
# fine-tuned with SingLoRA and with LoRA (r 8, one epoch of N_TRAIN conversations, --packing),
# and each model, the base included, is scored on N_TEST held-out SNLI test pairs:
#   - held-out loss: the mean cross-entropy of the assistant's answer tokens (its label word
#     and end-of-turn token), from the run's evaluations before and after training;
#   - accuracy: greedy answers (up to 4 tokens), the first word compared with the gold label.
#   bash experiments/chat_snli.sh MODEL SNLI_DIR [OUT_DIR]
# SNLI_DIR holds train.jsonl and test.jsonl as `singlora-lab experiment snli` writes them
# ({"text", "text_pair", "label"}). Settings fixed before the runs: N_TRAIN 320 and N_TEST 150
# (each the first rows after a seed-0 shuffle), seed 0, lr 1e-3 for both methods (no sweep),
# batch 8 packed rows of 256 tokens, warm-up 6%.
set -euo pipefail
M=${1:?a chat model: HF directory or GGUF}
SNLI=${2:?the SNLI directory}
OUT=${3:-runs/chat_snli}
S=${SINGLORA:-singlora}
N_TRAIN=${N_TRAIN:-320}
N_TEST=${N_TEST:-150}
mkdir -p "$OUT"
python3 - "$SNLI" "$OUT" "$N_TRAIN" "$N_TEST" <<'PY'
import json, random, sys
snli, out, n_train, n_test = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
SYSTEM = "You label sentence pairs."
def ask(r):
    return (f"Premise: {r['text']}\nHypothesis: {r['text_pair']}\n"
            "Answer with one word: entailment, neutral or contradiction.")
def pick(path, n):
    rows = [json.loads(l) for l in open(path)]
    random.Random(0).shuffle(rows)
    return rows[:n]
with open(f"{out}/train.jsonl", "w") as f:
    for r in pick(f"{snli}/train.jsonl", n_train):
        f.write(json.dumps({"messages": [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": ask(r)}, {"role": "assistant", "content": r["label"]}]}) + "\n")
test = pick(f"{snli}/test.jsonl", n_test)
with open(f"{out}/test_chat.jsonl", "w") as f, open(f"{out}/test_prompts.jsonl", "w") as p, \
        open(f"{out}/test_labels.json", "w") as l:
    for r in test:
        f.write(json.dumps({"messages": [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": ask(r)}, {"role": "assistant", "content": r["label"]}]}) + "\n")
        p.write(json.dumps({"prompt": ask(r), "system": SYSTEM}) + "\n")
    json.dump([r["label"] for r in test], l)
PY
# TRAIN_ARGS: more `train` flags, e.g. --chat-template FILE for a base model without one
common=(--model "$M" --train "$OUT/train.jsonl" --eval "$OUT/test_chat.jsonl" --task sft
        --max-length 256 --packing --batch-size 8 --seed 0 --save-minutes 0 --overwrite --quiet
        ${TRAIN_ARGS:-})
# the base model: an adapter that cannot move (lr 1e-12, one update)
"$S" train "${common[@]}" --method lora --max-steps 1 --lr 1e-12 --out "$OUT/base" > "$OUT/base.log" 2>&1
for m in singlora lora; do
  "$S" train "${common[@]}" --method $m --rank 8 --alpha 8 --epochs 1 --lr 1e-3 --out "$OUT/$m" \
    > "$OUT/$m.log" 2>&1
done
for r in base singlora lora; do
  "$S" predict --adapter "$OUT/$r" --input "$OUT/test_prompts.jsonl" --max-new-tokens 4 \
    > "$OUT/$r.predictions.jsonl"
done
python3 - "$OUT" <<'PY'
import json, math, sys
out = sys.argv[1]
labels = json.load(open(f"{out}/test_labels.json"))
def wilson(k, n, z=1.96):
    p = k / n; d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d; h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h
print("| model | held-out answer loss | accuracy (95% interval) | unparsed answers |")
print("|---|---|---|---|")
for r in ["base", "singlora", "lora"]:
    preds = [json.loads(l) for l in open(f"{out}/{r}.predictions.jsonl")]
    words = [(p.get("completion") or "").strip().split() for p in preds]
    first = [w[0].strip(".,!:;\"'").lower() if w else "" for w in words]
    k = sum(f == g for f, g in zip(first, labels))
    bad = sum(f not in ("entailment", "neutral", "contradiction") for f in first)
    ev = [json.loads(l) for l in open(f"{out}/{r}/metrics.jsonl") if '"eval_loss"' in l]
    # the base: the evaluation before its one update; the others: the last one
    loss = (ev[0] if r == "base" else ev[-1])["eval_loss"]
    lo, hi = wilson(k, len(labels))
    print(f"| {r} | {loss:.3f} | {100*k/len(labels):.1f}% ({100*lo:.1f}–{100*hi:.1f}) | {bad} |")
PY
