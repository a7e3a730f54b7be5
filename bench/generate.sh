#!/usr/bin/env bash
# Generation speed: greedy decoding of NEW tokens after a short chat prompt, singlora
# (`predict`, KV cache) against transformers' `generate` on the same weights, same machine.
#   [DEVICE=cpu|cuda] [NEW=128] bash bench/generate.sh MODEL.gguf [OUT_DIR]
# MODEL: a LLaMA-family GGUF (SmolLM2-135M-Instruct's); both sides dequantise it (f32 on the
# CPU, bf16 on a GPU). singlora needs an adapter to predict with: a LoRA that cannot move (one
# update at lr 1e-12) is trained first. PY: a Python with torch and transformers (skipped
# when it has none). Prints a table; the raw lines go to OUT_DIR.
set -euo pipefail
M=${1:?a GGUF model}
OUT=${2:-runs/generate}
S=${SINGLORA:-singlora}
PY=${PY:-python3}
DEVICE=${DEVICE:-cpu}
NEW=${NEW:-128}
mkdir -p "$OUT"
PROMPT="Write a long story about a dragon who learns to cook."
printf '{"prompt": "%s", "completion": "Once"}\n' "$PROMPT" > "$OUT/one.jsonl"
"$S" train --model "$M" --train "$OUT/one.jsonl" --task sft --method lora --max-steps 1 \
  --lr 1e-12 --batch-size 1 --device "$DEVICE" --save-minutes 0 --out "$OUT/noop" --overwrite \
  --quiet > "$OUT/noop.log" 2>&1
# the first call warms the caches; the second is timed (a run of NEW tokens unless EOS comes)
for i in 1 2; do
  printf '{"prompt": "%s"}\n' "$PROMPT" |
    "$S" predict --adapter "$OUT/noop" --input /dev/stdin --max-new-tokens "$NEW" --json \
      --device "$DEVICE" > "$OUT/singlora.jsonl" 2> "$OUT/singlora.log"
done
ours=$(grep -o 'generated .*' "$OUT/singlora.log")
echo "| implementation | device | new tokens | seconds | tokens/s |"
echo "|---|---|---|---|---|"
echo "$ours" | awk -v d="$DEVICE" '{printf "| singlora | %s | %s | %s | %s |\n", d, $2, $5, substr($7, 2)}'
# transformers reads GGUF files through the `gguf` package: unpacked from a carried wheel
# (.whl/gguf-*.whl) where the Python lacks it
if ! "$PY" -c "import gguf" 2>/dev/null; then
  for w in .whl/gguf-*.whl; do
    [ -f "$w" ] && "$PY" -m zipfile -e "$w" /tmp/pylib-gguf && export PYTHONPATH=/tmp/pylib-gguf:${PYTHONPATH:-}
  done
fi
if "$PY" -c "import torch, transformers" 2>/dev/null; then
  "$PY" - "$M" "$DEVICE" "$NEW" "$PROMPT" "$OUT" <<'PY'
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, device, new, prompt, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
dtype = torch.float32 if device == "cpu" else torch.bfloat16
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype).to(device).eval()
text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                               add_generation_prompt=True)
ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
with torch.no_grad():
    for i in range(2):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        g = model.generate(ids, max_new_tokens=new, do_sample=False, use_cache=True)
        if device != "cpu":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
n = g.shape[1] - ids.shape[1]
json.dump({"new_tokens": n, "seconds": secs, "torch": torch.__version__,
           "threads": torch.get_num_threads()}, open(f"{out}/transformers.json", "w"))
print(f"| transformers {__import__('transformers').__version__} (torch {torch.__version__}, {torch.get_num_threads()} threads) | {device} | {n} | {secs:.1f} | {n / secs:.1f} |")
PY
fi
