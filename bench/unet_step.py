"""diffusers + PEFT side of the U-Net benchmark: a DreamBooth LoRA training step of an SD
1.5-shaped U-Net (random weights, bf16), eager and under torch.compile.

    python bench/unet_step.py --write DIR          # a random SD 1.5 U-Net as a diffusers unet/ folder
    python bench/unet_step.py --unet DIR [--batch 1,4] [--rank 8] [--steps 10] [--warmup 3]

The step: x_t (b, 4, 64, 64), t, a (b, 77, 768) context; loss = mean((unet(x_t, t, c) - eps)^2)
in f32; backward into LoRA r (alpha = r) on to_q, to_k, to_v, to_out.0; AdamW. Prints one JSON
line per (mode, batch), with the median milliseconds per step after warm-up.
"""
import argparse
import json
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

p = argparse.ArgumentParser()
p.add_argument("--write")
p.add_argument("--unet")
p.add_argument("--batch", default="1,4")
p.add_argument("--rank", type=int, default=8)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--modes", default="eager,compile")
a = p.parse_args()

if a.write:
    torch.manual_seed(0)
    UNet2DConditionModel(**SD15).to(torch.bfloat16).save_pretrained(a.write, safe_serialization=True)
    print(f"wrote {a.write}")
    raise SystemExit

dev = "cuda"
for mode in a.modes.split(","):
    for b in [int(x) for x in a.batch.split(",")]:
        unet = UNet2DConditionModel.from_pretrained(a.unet, torch_dtype=torch.bfloat16).to(dev)
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                       target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
        params = [q for q in unet.parameters() if q.requires_grad]
        for q in params:
            q.data = q.data.float()
        trainable = sum(q.numel() for q in params)
        opt = torch.optim.AdamW(params, lr=1e-4)
        if mode == "compile":
            # each batch size compiled on its own, with static shapes, as a run at one batch
            # size is: without the reset the second size reuses the first's cache and is
            # recompiled with a dynamic batch dimension
            torch._dynamo.reset()
        model = torch.compile(unet) if mode == "compile" else unet
        x = torch.randn(b, 4, 64, 64, device=dev, dtype=torch.bfloat16)
        eps = torch.randn(b, 4, 64, 64, device=dev)
        ctx = torch.randn(b, 77, 768, device=dev, dtype=torch.bfloat16)
        t = torch.tensor([(100 + 397 * i) % 1000 for i in range(b)], device=dev)
        times = []
        for i in range(a.warmup + a.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                pred = model(x, t, encoder_hidden_states=ctx).sample
            loss = ((pred.float() - eps) ** 2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= a.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        print(json.dumps({
            "impl": f"diffusers+peft {mode}", "batch": b, "rank": a.rank, "trainable_params": trainable,
            "median_ms": statistics.median(times), "min_ms": min(times),
            "images_per_s": b / (statistics.median(times) / 1e3),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        }), flush=True)
        del model, unet, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
