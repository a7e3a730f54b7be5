"""Writes crates/singlora/tests/fixtures/lora-step/: one DreamBooth loss and its gradients,
computed by diffusers + PEFT + torch autograd on the tiny pipeline of
crates/singlora/tests/fixtures/sd-tiny, for crates/singlora/tests/diffusion.rs to match.

    ~/.cache/singlora/hf-venv/bin/python scripts/make_lora_step_fixture.py

PEFT puts a LoRA (r 4, alpha 8, on to_q, to_k, to_v, to_out.0) with random non-zero A and B on
the U-Net; the loss is mean((unet(x_t, t, c) - eps)^2) with x_t = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps from the pipeline's scheduler. The adapter is written in singlora's
layout (adapter/, keys base_model.model.unet.<module>.lora_A.weight), the inputs, loss and
every lora_A / lora_B gradient in io.safetensors.
"""
import json
import os
import shutil

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "crates", "singlora", "tests", "fixtures")
SD = os.path.join(FIXTURES, "sd-tiny")
OUT = os.path.join(FIXTURES, "lora-step")
torch.manual_seed(0)

unet = UNet2DConditionModel.from_pretrained(os.path.join(SD, "unet"), torch_dtype=torch.float32)
sched = DDPMScheduler.from_pretrained(os.path.join(SD, "scheduler"))
targets = ["to_q", "to_k", "to_v", "to_out.0"]
r, alpha = 4, 8
unet = inject_adapter_in_model(
    LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False), unet
)
with torch.no_grad():
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.copy_(0.1 * torch.randn_like(p))
for n, p in unet.named_parameters():
    p.requires_grad_("lora_" in n)

cfg = unet.config
x0 = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
eps = torch.randn_like(x0)
ts = torch.tensor([37, 811])
ctx = torch.randn(2, 77, cfg.cross_attention_dim)
xt = sched.add_noise(x0, eps, ts)
pred = unet(xt, ts.float(), encoder_hidden_states=ctx).sample
loss = ((pred - eps) ** 2).mean()
loss.backward()

shutil.rmtree(OUT, ignore_errors=True)
os.makedirs(os.path.join(OUT, "adapter"))
adapter, io = {}, {"x0": x0, "eps": eps, "t": ts.float(), "ctx": ctx, "loss": loss.detach().reshape(1)}
modules = set()
for n, p in unet.named_parameters():
    if "lora_" not in n:
        continue
    # down_blocks.0...to_q.lora_A.default.weight -> unet.down_blocks.0...to_q.lora_A.weight
    key = "unet." + n.replace(".default", "")
    modules.add(key.split(".lora_")[0])
    adapter["base_model.model." + key] = p.detach().clone()
    io["grad." + key] = p.grad.detach().clone()
save_file(adapter, os.path.join(OUT, "adapter", "adapter_model.safetensors"))
with open(os.path.join(OUT, "adapter", "adapter_config.json"), "w") as f:
    json.dump(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "target_modules": targets,
            "use_rslora": False,
            "use_dora": False,
            "base_model_name_or_path": "sd-tiny",
        },
        f,
        indent=2,
    )
save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(OUT, "io.safetensors"))
print(f"wrote {OUT}: {len(modules)} adapted layers, loss {loss.item():.6f}")
