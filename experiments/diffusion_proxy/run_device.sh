#!/usr/bin/env bash
# The DreamBooth proxy of docs/results.md, in one device call: pretrain the base and the image
# encoder, then every (targets, method, rank, lr, seed) run, its samples and scores.
#   JOBS=6 OUT=$OUT bash experiments/diffusion_proxy/run_device.sh DATA_DIR
# DATA_DIR holds the four Fashion-MNIST idx .gz files; .carry holds the CUDA binaries
# (scripts/build-cuda.sh). Every run's scores go to $OUT/proxy/runs.jsonl, its sample grids to
# $OUT/proxy/grids/.
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:?the Fashion-MNIST folder}
OUT=${OUT:-/tmp/out}; W=${W:-/tmp/proxy}; mkdir -p "$OUT/proxy/grids" "$W"
RUN=${RUN:-.carry/run}
# no new run starts after DEADLINE (seconds since the epoch), so a capped call ends cleanly;
# runs already in runs.jsonl are skipped, so the script resumes where it stopped
DEADLINE=${DEADLINE:-0}
PY=${PY:-$(ls /opt/torch/.venv/bin/python 2>/dev/null || echo python3)}
X=experiments/diffusion_proxy/proxy.py
JOBS=${JOBS:-6}
# the protocol's settings; a smoke test on the CPU shrinks them (DEVICE=cpu TINY=--tiny ...)
# the protocol's base: 6,000 steps planned, stopped after 2,492 (where the first base's time cap
# stopped it)
DEVICE=${DEVICE:-cuda}; PRETRAIN_STEPS=${PRETRAIN_STEPS:-6000}; PRETRAIN_STOP=${PRETRAIN_STOP:-2492}; MAX_STEPS=${MAX_STEPS:-400}
SAMPLE_STEPS=${SAMPLE_STEPS:-50}; SEEDS=${SEEDS:-1 2 3}; LRS=${LRS:-1e-3 1e-4}; TINY=${TINY:-}
[ -d "$W/base" ] || "$PY" $X pretrain --data "$DATA" --out "$W/base" --steps "$PRETRAIN_STEPS" --stop-after "$PRETRAIN_STOP" --device "$DEVICE" $TINY 2>&1 | grep -v Warn | tee "$OUT/proxy/pretrain.log" || exit 1
[ -f "$W/emb.pt" ] || "$PY" $X embedder --data "$DATA" --out "$W/emb.pt" --steps "$PRETRAIN_STEPS" --device "$DEVICE" | tee "$OUT/proxy/embedder.json" || exit 1
"$PY" $X subject --data "$DATA" --out "$W/subject" || exit 1
CLASSES=("t-shirt" "trouser" "pullover" "dress" "coat" "sandal" "shirt" "sneaker" "bag")

# samples of one adapter (or of the base with ADAPTER empty) and their scores
evaluate() { # RUN_NAME ADAPTER
  local name=$1 adapter=$2 ev="$W/$1-eval"
  mkdir -p "$ev"
  local a=(); [ -n "$adapter" ] && a=(--adapter "$adapter")
  local -a CLASSES=($CLASSES_STR)
  $RUN generate --model "$W/base" "${a[@]}" --prompt "a photo of sks boot" --num-images 32 --seed 1000 \
    --steps "$SAMPLE_STEPS" --guidance 5 --device "$DEVICE" --out "$ev/subject.png" --overwrite > /dev/null || return 1
  local p=(); for c in "${CLASSES[@]}"; do p+=(--prompt "a photo of a $c"); done
  $RUN generate --model "$W/base" "${a[@]}" "${p[@]}" --num-images 8 --seed 2000 \
    --steps "$SAMPLE_STEPS" --guidance 5 --device "$DEVICE" --out "$ev/classes.png" --overwrite > /dev/null || return 1
  "$PY" $X score --data "$DATA" --emb "$W/emb.pt" --run "$W/$name" --device "$DEVICE" | tail -1
}
export -f evaluate; export W DATA PY X DEVICE MAX_STEPS SAMPLE_STEPS OUT RUN DEADLINE JOBS; export CLASSES_STR="${CLASSES[*]}"

one() { # TARGETS METHOD RANK LR SEED
  local t=$1 m=$2 r=$3 lr=$4 s=$5 name="$1-$2-r$3-lr$4-s$5"
  if grep -q "\"run\": \"$name\"" "$OUT/proxy/runs.jsonl" 2>/dev/null; then return; fi
  if [ "$DEADLINE" != 0 ] && [ "$(date +%s)" -ge "$DEADLINE" ]; then return; fi
  local t0=$(date +%s%N)
  $RUN train-diffusion --model "$W/base" --instance-images "$W/subject" --instance-prompt "a photo of sks boot" \
    --method "$m" --rank "$r" --alpha "$r" --targets "$t" --lr "$lr" --max-steps "$MAX_STEPS" --seed "$s" \
    --sample-every 0 --samples-per-prompt 4 --sample-steps "$SAMPLE_STEPS" --guidance 5 --device "$DEVICE" \
    --out "$W/$name" --overwrite --quiet > "$W/$name.log" 2>&1 || { echo "{\"run\": \"$name\", \"failed\": true}" >> "$OUT/proxy/runs.jsonl"; return; }
  local t1=$(date +%s%N)
  local sc=$(evaluate "$name" "$W/$name")
  local secs=$(awk "BEGIN {printf \"%.1f\", ($t1 - $t0) / 1e9}") esecs=$(awk "BEGIN {printf \"%.1f\", ($(date +%s%N) - $t1) / 1e9}")
  local params=$($RUN inspect --adapter "$W/$name" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["adapter_params"])' 2>/dev/null || echo null)
  cp "$W/$name-eval/subject.png" "$OUT/proxy/grids/$name.png"
  echo "{\"run\": \"$name\", \"targets\": \"$t\", \"method\": \"$m\", \"rank\": $r, \"lr\": $lr, \"seed\": $s, \"params\": $params, \"train_s\": $secs, \"eval_s\": $esecs, \"jobs\": $JOBS, \"scores\": $sc}" >> "$OUT/proxy/runs.jsonl"
}
export -f one

# the base before any adaptation
grep -q '"run": "base"' "$OUT/proxy/runs.jsonl" 2>/dev/null || {
  sc=$(evaluate base ""); cp "$W/base-eval/subject.png" "$OUT/proxy/grids/base.png"
  echo "{\"run\": \"base\", \"scores\": $sc}" >> "$OUT/proxy/runs.jsonl"; }

for s in $SEEDS; do for lr in $LRS; do for t in qk to_q,to_k,to_v,to_out.0; do
  for mr in "singlora 8" "lora 8" "dora 8" "singlora 16"; do echo "$t $mr $lr $s"; done
done; done; done | xargs -P "$JOBS" -L 1 bash -c 'one $0 $1 $2 $3 $4'
wc -l "$OUT/proxy/runs.jsonl"
