#!/usr/bin/env bash
# Data-parallel scaling on a multi-GPU device: the data-parallel correctness checks, ours
# (`singlora-lab bench-scaling`, 1..N GPUs) and PyTorch DDP + PEFT (torchrun, 1..N GPUs), 7B
# shape, 8 x 512 per GPU. JSON lines under ${OUT:-/tmp}/scaling; NCCL's NVLink multicast stays
# off.
#   bash bench/run_scaling.sh [N_GPUS] [ours|torch|all]
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0
n=${1:-2}; what=${2:-all}
out=${OUT:-/tmp}/scaling; mkdir -p "$out"
devs=$(seq -s, -f "cuda:%g" 0 $((n - 1)))
if [ "$what" = ours ] || [ "$what" = all ]; then
  .carry/lab gpu-check --devices "$devs" 2>&1 | tee "$out/dp-check.txt"
  for m in singlora lora; do
    .carry/lab bench-scaling --shape 7b --method $m --devices "$devs" --json > "$out/ours-7b-$m.jsonl" 2> "$out/ours-7b-$m.err"
  done
  cat "$out"/ours-7b-*.jsonl
fi
if [ "$what" = torch ] || [ "$what" = all ]; then
  PY=${PYTHON:-$(ls /opt/torch/.venv/bin/python 2>/dev/null || echo python3)}
  k=1
  while [ $k -le "$n" ]; do
    "$PY" -m torch.distributed.run --standalone --nproc_per_node $k bench/torch_ddp.py --shape 7b \
      --methods peft-lora,singlora > "$out/torch-ddp-7b-$k.jsonl" 2> "$out/torch-ddp-7b-$k.err"
    cat "$out/torch-ddp-7b-$k.jsonl"
    k=$((k * 2))
  done
fi
