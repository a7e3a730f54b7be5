"""Writes the tiny Stable Diffusion fixture (crates/singlora/tests/fixtures/sd-tiny) as one
single-file checkpoint in the original (LDM / A1111 / ComfyUI) layout, and checks with diffusers
itself that it is one: `StableDiffusionPipeline.from_single_file(..., config=sd-tiny)` must give
back every tensor of the folder exactly.

    ~/.cache/singlora/hf-venv/bin/python scripts/make_single_file_fixture.py [OUT] [--openclip | --xl]

OUT defaults to crates/singlora/tests/fixtures/sd-tiny-single.safetensors
(sd-tiny-single-openclip.safetensors with --openclip, which writes the text encoder as SD 2.x
files keep it, OpenCLIP's `cond_stage_model.model.*` with fused q/k/v; sd-tiny-xl-single.safetensors with
--xl, the SDXL fixture as SDXL files keep it: `conditioner.embedders.0.transformer.*` and the
second encoder in OpenCLIP's layout as `conditioner.embedders.1.model.*`, the U-Net's added
conditioning as `label_emb`). The layout written:
`model.diffusion_model.*` (the U-Net: `input_blocks`, `middle_block`, `output_blocks`),
`first_stage_model.*` (the VAE: `encoder.down.N.block.M`, `mid.attn_1` with 1x1 convolutions),
`cond_stage_model.transformer.text_model.*` (the CLIP text encoder), and the schedule buffers
and an EMA copy that real checkpoints carry (`alphas_cumprod`, `model_ema.decay`).
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "crates", "singlora", "tests", "fixtures", "sd-tiny")
OPENCLIP = "--openclip" in sys.argv
XL = "--xl" in sys.argv
ARGS = [a for a in sys.argv[1:] if a not in ("--openclip", "--xl")]
if XL:
    SRC = SRC + "-xl"
OUT = ARGS[0] if ARGS else os.path.join(
    os.path.dirname(SRC),
    "sd-tiny-xl-single.safetensors" if XL
    else "sd-tiny-single-openclip.safetensors" if OPENCLIP else "sd-tiny-single.safetensors")


def cfg(part):
    return json.load(open(os.path.join(SRC, part, "config.json")))


def unet_to_ldm(sd, c):
    lpb, n = c["layers_per_block"], len(c["block_out_channels"])
    down_attn = [t.startswith("CrossAttn") for t in c["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in c["up_block_types"]]
    m = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    i = 1
    for b in range(n):
        for j in range(lpb):
            m[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            if down_attn[b]:
                m[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if b < n - 1:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    i = 0
    for b in range(n):
        for j in range(lpb + 1):
            m[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            if up_attn[b]:
                m[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            if j == lpb and b < n - 1:
                m[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i}.{2 if up_attn[b] else 1}.conv"
            i += 1
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    out = {}
    for k, v in sd.items():
        prefix = max((p for p in m if k.startswith(p + ".")), key=len)
        rest = k[len(prefix) + 1:]
        if ".resnets." in prefix or prefix.startswith("mid_block.resnets"):
            head, tail = rest.split(".", 1)
            rest = f"{resnet[head]}.{tail}"
        out[f"model.diffusion_model.{m[prefix]}.{rest}"] = v
    return out


def vae_to_ldm(sd, c):
    n = len(c["block_out_channels"])
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] in ("encoder", "decoder"):
            side, rest = parts[0], parts[1:]
            if rest[0] in ("down_blocks", "up_blocks"):
                b = int(rest[1])
                if rest[0] == "up_blocks":
                    b = n - 1 - b
                kind = "down" if side == "encoder" else "up"
                if rest[2] == "resnets":
                    name = f"{kind}.{b}.block.{rest[3]}." + ".".join(rest[4:])
                else:  # downsamplers.0.conv / upsamplers.0.conv
                    name = f"{kind}.{b}.{'downsample' if kind == 'down' else 'upsample'}.conv." + rest[-1]
            elif rest[0] == "mid_block":
                if rest[1] == "resnets":
                    name = f"mid.block_{int(rest[2]) + 1}." + ".".join(rest[3:])
                else:
                    sub = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[rest[3]]
                    name = f"mid.attn_1.{sub}.{rest[-1]}"
                    if v.dim() == 2:
                        v = v[:, :, None, None]
            elif rest[0] == "conv_norm_out":
                name = "norm_out." + rest[-1]
            else:
                name = ".".join(rest)
            name = name.replace("conv_shortcut", "nin_shortcut")
            out[f"first_stage_model.{side}.{name}"] = v
        else:
            out[f"first_stage_model.{k}"] = v
    return out


unet = load_file(os.path.join(SRC, "unet", "diffusion_pytorch_model.safetensors"))
vae = load_file(os.path.join(SRC, "vae", "diffusion_pytorch_model.safetensors"))
text = load_file(os.path.join(SRC, "text_encoder", "model.safetensors"))
single = {}
single.update(unet_to_ldm(unet, cfg("unet")))
single.update(vae_to_ldm(vae, cfg("vae")))
def text_to_openclip(sd):
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"]}
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(n):
        p, q = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[q + f"attn.in_proj_{kind}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[q + f"attn.out_proj.{kind}"] = sd[p + f"self_attn.out_proj.{kind}"]
            out[q + f"ln_1.{kind}"] = sd[p + f"layer_norm1.{kind}"]
            out[q + f"ln_2.{kind}"] = sd[p + f"layer_norm2.{kind}"]
            out[q + f"mlp.c_fc.{kind}"] = sd[p + f"mlp.fc1.{kind}"]
            out[q + f"mlp.c_proj.{kind}"] = sd[p + f"mlp.fc2.{kind}"]
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    return out


def hf_text(sd, prefix):
    # transformers 5 saves CLIPTextModel's tensors without their `text_model.` prefix
    return {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items()}


if XL:
    text2 = load_file(os.path.join(SRC, "text_encoder_2", "model.safetensors"))
    single.update(hf_text(text, "conditioner.embedders.0.transformer."))
    single.update({f"conditioner.embedders.1.model.{k}": v for k, v in text_to_openclip(
        {k.removeprefix("text_model."): v for k, v in text2.items()}).items()})
elif OPENCLIP:
    single.update({f"cond_stage_model.model.{k}": v for k, v in text_to_openclip(text).items()})
else:
    single.update(hf_text(text, "cond_stage_model.transformer."))
# what real checkpoints carry besides the three models
single["alphas_cumprod"] = torch.linspace(0.999, 0.01, 1000)
single["model_ema.decay"] = torch.tensor(0.9999)
if not OPENCLIP and not XL:
    single["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
        text["embeddings.position_embedding.weight"].shape[0])[None]
save_file({k: v.contiguous() for k, v in single.items()}, OUT)

# diffusers' own converter must give the folder back
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

if XL:
    pipe = StableDiffusionXLPipeline.from_single_file(OUT, config=SRC, local_files_only=True,
                                                      torch_dtype=torch.float16)
else:
    pipe = StableDiffusionPipeline.from_single_file(OUT, config=SRC, local_files_only=True,
                                                    safety_checker=None, torch_dtype=torch.float16)
bad = 0
models = [("unet", unet, pipe.unet), ("vae", vae, pipe.vae), ("text_encoder", text, pipe.text_encoder)]
if XL:
    models.append(("text_encoder_2", {k.removeprefix("text_model."): v for k, v in text2.items()}, pipe.text_encoder_2))
for name, want, model in models:
    got = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in got]
    diff = [k for k in want if k in got and not torch.equal(got[k].to(want[k].dtype), want[k])]
    print(f"{name}: {len(want)} tensors, {len(missing)} missing, {len(diff)} different", missing[:3], diff[:3])
    bad += len(missing) + len(diff)
print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes, {len(single)} tensors)")
sys.exit(1 if bad else 0)
