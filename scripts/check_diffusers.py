"""Checks that diffusers loads what `singlora train-diffusion`, `export-lora` and `merge` write,
and computes with it what singlora means.

    python scripts/check_diffusers.py --pipeline SD_DIR --run RUN_DIR --merged MERGED_DIR

RUN_DIR is a finished train-diffusion run (pytorch_lora_weights.safetensors and, except for
DoRA, lora_kohya.safetensors beside the adapter); MERGED_DIR is `singlora merge --base SD_DIR
--adapter RUN_DIR --out MERGED_DIR --dtype f32` (f32, so that rounding the merged weights to
a half-precision base's dtype does not enter the comparison). On fixed random inputs, the U-Net of SD_DIR with the
diffusers file loaded through `pipe.load_lora_weights` (and, separately, with the kohya file)
must give the output of the merged U-Net, and differ from the base U-Net's output by much more
than that. Prints one line per check and exits non-zero when one fails.
"""
import argparse
import json
import os
import sys

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

p = argparse.ArgumentParser()
p.add_argument("--pipeline", required=True)
p.add_argument("--run", required=True)
p.add_argument("--merged", required=True)
p.add_argument("--tol", type=float, default=2e-4, help="largest relative difference allowed")
a = p.parse_args()

torch.manual_seed(0)
pipe = DiffusionPipeline.from_pretrained(a.pipeline, torch_dtype=torch.float32)
unet = pipe.unet
cfg = unet.config
size = cfg.sample_size
x = torch.randn(2, cfg.in_channels, size, size)
t = torch.tensor([10.0, 700.0])
ctx = torch.randn(2, 7, cfg.cross_attention_dim)
kw = {}
if cfg.addition_embed_type == "text_time":
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    kw["added_cond_kwargs"] = {
        "text_embeds": torch.randn(2, pooled),
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
    }


def run(u):
    with torch.no_grad():
        return u(x, t, encoder_hidden_states=ctx, **kw).sample


base = run(unet)
merged_unet = UNet2DConditionModel.from_pretrained(
    os.path.join(a.merged, "unet"), torch_dtype=torch.float32
)
merged = run(merged_unet)
effect = (merged - base).abs().max().item()
scale = merged.abs().max().item()
print(f"adapter effect on the U-Net output: max |merged - base| = {effect:.3e} (output max {scale:.3e})")
failed = effect < 1e-3 * scale
if failed:
    print("FAIL: the adapter barely changes the output, so the comparisons below prove nothing")

checks = [("diffusers", "pytorch_lora_weights.safetensors")]
if os.path.exists(os.path.join(a.run, "lora_kohya.safetensors")):
    checks.append(("kohya", "lora_kohya.safetensors"))
results = {}
for name, weight_name in checks:
    pipe.load_lora_weights(a.run, weight_name=weight_name, adapter_name=name)
    pipe.set_adapters([name])
    y = run(pipe.unet)
    pipe.delete_adapters(name)
    diff = (y - merged).abs().max().item()
    rel = diff / max(effect, 1e-12)
    ok = diff <= a.tol * scale
    results[name] = {"max_abs_diff": diff, "relative_to_effect": rel, "ok": ok}
    print(
        f"{'ok  ' if ok else 'FAIL'} {name:9s} load_lora_weights({weight_name}) vs merged U-Net: "
        f"max |diff| = {diff:.3e} ({rel:.2e} of the adapter's effect)"
    )
    failed |= not ok
print(json.dumps({"effect": effect, "output_max": scale, "checks": results}))
sys.exit(1 if failed else 0)
