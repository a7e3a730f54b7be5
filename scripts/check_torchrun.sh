#!/usr/bin/env bash
# Starts `singlora train` under PyTorch's own torchrun (2 processes on the CPU) and checks the
# adapter against the threaded group over 2 CPU ranks (`--devices cpu,cpu`): the same values,
# bit for bit. Needs torchrun (PyTorch) and a built singlora.
#   bash scripts/check_torchrun.sh [WORK_DIR]
set -euo pipefail
S=${SINGLORA:-singlora}
TORCHRUN=${TORCHRUN:-torchrun}
W=${1:-$(mktemp -d)}
mkdir -p "$W"
"$S" example --dir "$W/example" > /dev/null
python3 - "$W/train.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(24):
        f.write(json.dumps({"prompt": f"count {i}", "completion": f" {i + 1}"}) + "\n")
PY
MODEL="$W/example/base"
common=(train --model "$MODEL" --train "$W/train.jsonl" --task sft --batch-size 6 --epochs 2
        --quiet --overwrite)
"$S" "${common[@]}" --devices cpu,cpu --out "$W/threaded"
"$TORCHRUN" --standalone --nproc-per-node 2 --no-python "$S" "${common[@]}" --device cpu \
  --out "$W/torchrun"
python3 - "$W" <<'PY'
import json, struct, sys
def tensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    return {k: raw[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]]
            for k, v in head.items() if k != "__metadata__"}
a = tensors(f"{sys.argv[1]}/threaded/adapter_model.safetensors")
b = tensors(f"{sys.argv[1]}/torchrun/adapter_model.safetensors")
world = json.load(open(f"{sys.argv[1]}/torchrun/run.json"))["world_size"]
assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "the adapters differ"
print(f"torchrun, {world} processes: the adapter equals the threaded group's, bit for bit "
      f"({len(a)} tensors)")
PY
