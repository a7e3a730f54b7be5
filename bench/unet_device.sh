#!/usr/bin/env bash
# One device call for the Stable Diffusion side: the diffusers checks on the tiny pipelines,
# then an SD 1.5-shaped U-Net DreamBooth step, singlora beside diffusers + PEFT (eager and
# compiled), at batch 1 and 4. `bench/unet_device.sh check` or `... bench` runs one half.
# Needs .carry (scripts/build-cuda.sh) and .whl with diffusers and peft (docs/diffusion.md
# says how). Logs go to $OUT: the bench half's lines in unet-bench.tgz, each run's median in
# medians.txt. MODES=compile leaves out eager PyTorch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=$(ls /opt/torch/.venv/bin/python 2>/dev/null || echo python3)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
F=crates/singlora/tests/fixtures
PART=${1:-all}
if [ "$PART" != bench ]; then
echo "== DreamBooth on the tiny pipeline (GPU), merge, diffusers loads the files"
rm -rf /tmp/sd && mkdir -p /tmp/sd/subject
"$PY" - <<'PYEOF'
import numpy as np
from PIL import Image
for k in range(3):
    Image.fromarray((np.random.RandomState(k).rand(48, 40, 3) * 255).astype("uint8")).save(f"/tmp/sd/subject/{k}.png")
PYEOF
for m in singlora lora dora; do
  .carry/run train-diffusion --model $F/sd-tiny --instance-images /tmp/sd/subject --instance-prompt "a photo of sks dog" \
    --method $m --rank 4 --max-steps 20 --lr 3e-3 --sample-every 10 --sample-steps 3 --device cuda --out /tmp/sd/run-$m 2>&1 | tail -2
  .carry/run merge --base $F/sd-tiny --adapter /tmp/sd/run-$m --out /tmp/sd/merged-$m --dtype f32 | tail -1
  "$PY" scripts/check_diffusers.py --pipeline $F/sd-tiny --run /tmp/sd/run-$m --merged /tmp/sd/merged-$m 2>&1 | grep -E "^(ok|FAIL)|effect" | tee -a "$OUT/diffusers-check.txt"
done
cp /tmp/sd/run-singlora/samples/*.png "$OUT/" 2>/dev/null
fi
[ "$PART" = check ] && exit 0
echo "== SD 1.5-shaped U-Net step"
# BATCH: the batch sizes (default 1,4; DBATCH for diffusers, default BATCH); DTIMEOUT: the
# diffusers run's limit in seconds (default 400; both sizes compiled took 242 s when fast). Each
# part's start time goes to $OUT/times.txt.
BATCH=${BATCH:-1,4}
stamp() { echo "$(date +%s) $1" >> "$OUT/times.txt"; }
stamp write
timeout 120 "$PY" bench/unet_step.py --write /tmp/sd15-unet
# diffusers first: run after our processes, compiled diffusers took 98 to 113 ms at batch 4
# (and its whole run about 220 s); first on a fresh machine, 64 to 66 ms (2026-12-06)
stamp diffusers
timeout "${DTIMEOUT:-400}" "$PY" bench/unet_step.py --unet /tmp/sd15-unet --batch "${DBATCH:-$BATCH}" --modes "${MODES:-eager,compile}" --steps 20 2> "$OUT/unet-diffusers.log" | grep '^{' | tee "$OUT/unet-diffusers.jsonl"
# the first of our processes times batch 1 slower (up to 1.5×, calls of 2026-12-06): one
# short untimed run first
stamp warm-up
timeout 60 .carry/lab bench-unet --unet /tmp/sd15-unet --methods singlora --batch 1 --steps 2 --warmup 1 > /dev/null 2>&1
stamp singlora
timeout 240 .carry/lab bench-unet --unet /tmp/sd15-unet --methods singlora,lora --batch "$BATCH" --json --profile --steps 20 2>&1 | tee "$OUT/unet-singlora.jsonl"
# the transformers' sublayers recorded op by op (the library runs each as one autograd op);
# RECORDED=1 runs it
if [ "${RECORDED:-0}" = 1 ]; then
stamp recorded
timeout 240 .carry/lab bench-unet --unet /tmp/sd15-unet --methods singlora,lora --batch "$BATCH" --json --profile --recorded-sublayers 2>&1 | tee "$OUT/unet-singlora-recorded.jsonl"
fi
# the built-in convolutions (im2col and cuBLAS) instead of cuDNN's; NO_CUDNN=1 runs it
if [ "${NO_CUDNN:-0}" = 1 ]; then
stamp no-cudnn
SINGLORA_CUDNN=off timeout 120 .carry/lab bench-unet --unet /tmp/sd15-unet --methods singlora,lora --batch "$BATCH" --json --profile --steps 20 2>&1 | tee "$OUT/unet-singlora-no-cudnn.jsonl"
fi
# each step through candle's autograd between the blocks (the library records the forward
# itself); NO_TAPE=1 runs it
if [ "${NO_TAPE:-0}" = 1 ]; then
stamp no-tape
timeout 120 .carry/lab bench-unet --unet /tmp/sd15-unet --methods singlora,lora --batch "$BATCH" --json --profile --steps 20 --no-tape 2>&1 | tee "$OUT/unet-singlora-no-tape.jsonl"
fi
# PyTorch's (cuDNN's) convolution beside the building blocks' conv rows
stamp conv
timeout 60 "$PY" bench/conv_torch.py 2>&1 | grep '^{' | tee "$OUT/conv-torch.jsonl"
stamp end
# the device returns at most 8 files: the bench's lines go back as one archive
(cd "$OUT" && grep '"median_ms"' unet-*.jsonl | cut -c1-160 > medians.txt; tar czf unet-bench.tgz unet-*.jsonl unet-diffusers.log conv-torch.jsonl times.txt \
  && rm -f unet-*.jsonl unet-diffusers.log conv-torch.jsonl)
