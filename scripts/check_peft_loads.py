"""The other direction of PEFT compatibility: PEFT loads what singlora writes.

Run where torch, transformers and peft are installed (the GPU machine has them; so does any
Python environment with `pip install torch transformers peft`), with the `singlora` and
`singlora-lab` binaries (default: target/release/singlora and target/release/singlora-lab):

    python scripts/check_peft_loads.py path/to/singlora path/to/singlora-lab

It builds a tiny LLaMA checkpoint with transformers, has singlora write random LoRA, rsLoRA
and DoRA adapters (through `singlora-lab example-adapters`) and a SingLoRA adapter exported
with `singlora export-lora`, loads each with PeftModel.from_pretrained, and checks that PEFT's
merge_and_unload gives the same weights as `singlora merge` and the same logits as the merged
model. Prints one line per case and exits non-zero on any mismatch.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file

singlora = sys.argv[1] if len(sys.argv) > 1 else "target/release/singlora"
singlora_lab = sys.argv[2] if len(sys.argv) > 2 else "target/release/singlora-lab"
tmp = tempfile.mkdtemp()
base = os.path.join(tmp, "base")
cfg = transformers.LlamaConfig(
    vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
)
torch.manual_seed(0)
m = transformers.LlamaForCausalLM(cfg)
with torch.no_grad():
    for p in m.parameters():
        p.normal_(0.0, 0.2)
m.save_pretrained(base, safe_serialization=True)


def run(*args, binary=singlora):
    r = subprocess.run([binary, *args], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout, r.stderr)
        raise SystemExit(f"{binary} {' '.join(args)} failed")
    return r.stdout


adapters = os.path.join(tmp, "adapters")
run("example-adapters", "--base", base, "--out", adapters, binary=singlora_lab)
run("export-lora", "--adapter", os.path.join(adapters, "singlora"), "--out", os.path.join(adapters, "singlora-as-lora"))

ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
failed = False
for case in ["lora", "rslora", "dora", "singlora-as-lora"]:
    adir = os.path.join(adapters, case)
    model = transformers.LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adir)
    with torch.no_grad():
        logits_peft = peft_model(ids).logits
    merged_peft = peft_model.merge_and_unload().state_dict()
    ours_dir = os.path.join(tmp, "merged-" + case)
    src = os.path.join(adapters, "singlora") if case == "singlora-as-lora" else adir
    run("merge", "--base", base, "--adapter", src, "--out", ours_dir)
    ours = load_file(os.path.join(ours_dir, "model.safetensors"))
    wdiff = max((merged_peft[k] - ours[k]).abs().max().item() for k in ours)
    ours_model = transformers.LlamaForCausalLM.from_pretrained(ours_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        ldiff = (ours_model(ids).logits - logits_peft).abs().max().item()
    ok = wdiff < 1e-5 and ldiff < 1e-4
    failed |= not ok
    cfg = json.load(open(os.path.join(adir, "adapter_config.json")))
    print(f"{case:18s} peft_type={cfg['peft_type']} r={cfg['r']} alpha={cfg['lora_alpha']} "
          f"use_rslora={cfg['use_rslora']} use_dora={cfg['use_dora']}: PEFT loaded it; "
          f"max |W_peft - W_singlora| = {wdiff:.2e}, max |logits diff| = {ldiff:.2e} {'OK' if ok else 'MISMATCH'}")

# PEFT refuses a SINGLORA adapter instead of misreading it
try:
    PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), os.path.join(adapters, "singlora"))
    print("SINGLORA adapter: PEFT loaded it (unexpected)")
    failed = True
except Exception as e:  # noqa: BLE001
    print(f"SINGLORA adapter: PEFT refuses it as it should ({type(e).__name__})")
sys.exit(1 if failed else 0)
