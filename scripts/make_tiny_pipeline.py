"""Writes a tiny random Stable Diffusion pipeline in the diffusers folder layout, made and saved
by diffusers and transformers themselves, for the DreamBooth tests and the diffusers checks.

    ~/.cache/singlora/hf-venv/bin/python scripts/make_tiny_pipeline.py [OUT] [--xl]

OUT defaults to crates/singlora/tests/fixtures/sd-tiny (sd-tiny-xl with --xl). The tokenizer is
the one of crates/singlora/tests/fixtures/sd_parts/tokenizer (a small CLIP BPE vocabulary).
Weights are stored in f16. Images are 32x32 pixels: the VAE halves them to 16x16 latents of 4 channels, the U-Net has two
levels (16 and 32 channels) with cross-attention to a 32-wide text context (SD 1.x style) or,
with --xl, SDXL's two text encoders (32 + 48 wide, pooled 48) and its added conditioning.
"""
import json
import os
import shutil
import sys

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "crates", "singlora", "tests", "fixtures")
args = [a for a in sys.argv[1:] if not a.startswith("--")]
XL = "--xl" in sys.argv
OUT = args[0] if args else os.path.join(FIXTURES, "sd-tiny-xl" if XL else "sd-tiny")
torch.manual_seed(0)

tokenizer = CLIPTokenizer.from_pretrained(
    os.environ.get("TINY_TOKENIZER", os.path.join(FIXTURES, "sd_parts", "tokenizer"))
)


def text_config(hidden, layers, heads, proj=None):
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=proj or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def randomise(model, std=0.02):
    # diffusers zero-initialises some output convolutions; random ones make every path matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn_like(p) / fan_in**0.5)


vae = AutoencoderKL(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.18215,
)
randomise(vae)
# the schedulers SD 1.5 and SDXL ship with (only their betas matter for training)
scheduler_kw = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
)
if XL:
    scheduler = EulerDiscreteScheduler(timestep_spacing="leading", **scheduler_kw)
else:
    scheduler = PNDMScheduler(set_alpha_to_one=False, skip_prk_steps=True, **scheduler_kw)

if not XL:
    text_encoder = CLIPTextModel(text_config(32, 2, 2))
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    randomise(unet)
    randomise(text_encoder)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
else:
    text_encoder = CLIPTextModel(text_config(32, 2, 2))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(48, 2, 2, proj=48))
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=80,
        attention_head_dim=(4, 8),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=48 + 6 * 8,
    )
    for m in (unet, text_encoder, text_encoder_2):
        randomise(m)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )

shutil.rmtree(OUT, ignore_errors=True)
# half precision on disk keeps the fixture small; every reader computes in f32 from the same
# rounded values
pipe.to(torch.float16).save_pretrained(OUT, safe_serialization=True)
size = sum(
    os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(OUT) for f in files
)
print(f"wrote {OUT} ({size / 1024:.0f} KB)")

# What the pipeline generates from fixed initial latents, for the sampling tests: DDIM and
# Euler, 4 steps, guidance 7.5, empty negative prompt; images in [-1, 1].
pipe = (StableDiffusionXLPipeline if XL else StableDiffusionPipeline).from_pretrained(
    OUT, torch_dtype=torch.float32
)
latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
expected = {"latents": latents}
for name, cls in [("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler)]:
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    images = pipe(
        ["a photo of sks dog", "a red cat"],
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=7.5,
        latents=latents.clone(),
        output_type="pt",
    ).images
    expected[f"images.{name}"] = images * 2.0 - 1.0
save_file(
    {k: v.contiguous() for k, v in expected.items()},
    OUT.rstrip("/") + ".expected.safetensors",
)
print(f"wrote {OUT.rstrip('/')}.expected.safetensors")
