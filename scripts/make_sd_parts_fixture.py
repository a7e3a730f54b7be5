"""Writes crates/singlora/tests/fixtures/sd_parts/: tiny random Stable Diffusion components made
with the real libraries (transformers' CLIP text models and CLIP tokenizer, diffusers'
AutoencoderKL and schedulers) and what those libraries compute with them, for
crates/singlora/tests/sd_parts.rs to compare against.

Run with an environment that has torch, transformers and diffusers:

    ~/.cache/singlora/hf-venv/bin/python scripts/make_sd_parts_fixture.py

Outputs: text_encoder/ (CLIPTextModel, quick_gelu, the old eos_token_id 2), text_encoder_2/
(CLIPTextModelWithProjection, gelu, the real eos id), tokenizer/ (vocab.json + merges.txt, as
Stable Diffusion repositories ship it, pads with <|endoftext|>), tokenizer_2/ (with
tokenizer.json, pads with "!"), vae/, scheduler/*.json, expected.json (token ids, timesteps)
and expected.safetensors (tensors).
"""
import json
import os
import shutil
import sys

import diffusers
import torch
import transformers
from safetensors.torch import save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "crates", "singlora", "tests", "fixtures", "sd_parts"
)
shutil.rmtree(OUT, ignore_errors=True)
os.makedirs(OUT)
torch.manual_seed(0)
expected = {}
tensors = {}


def put(name, t):
    tensors[name] = t.detach().to(torch.float32).contiguous()


# --- tokenizer ----------------------------------------------------------------------------
def byte_chars():
    """GPT-2's printable stand-ins for the 256 byte values, in GPT-2's order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


chars = byte_chars()
vocab = chars + [c + "</w>" for c in chars]
merges = []
WORDS = ["a", "photo", "of", "sks", "dog", "cat", "the", "in", "red", "hello", "world", "painting"]
for word in WORDS:
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pair = (pieces[0], pieces[1])
        if pair not in merges:
            merges.append(pair)
            merged = pieces[0] + pieces[1]
            if merged not in vocab:
                vocab.append(merged)
        pieces = [pieces[0] + pieces[1]] + pieces[2:]
vocab += ["<|startoftext|>", "<|endoftext|>"]
# tokenizer/ as Stable Diffusion 1.x repositories ship it: no tokenizer.json, special tokens
# written as AddedToken objects.
tok_dir = os.path.join(OUT, "tokenizer")
os.makedirs(tok_dir)
with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def added(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"add_prefix_space": False, "bos_token": added("<|startoftext|>"), "do_lower_case": True,
               "eos_token": added("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
               "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
               "unk_token": added("<|endoftext|>")}, f, indent=2)
with open(os.path.join(tok_dir, "special_tokens_map.json"), "w") as f:
    json.dump({"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
               "pad_token": "<|endoftext|>", "unk_token": added("<|endoftext|>")}, f, indent=2)
tok1 = transformers.CLIPTokenizer.from_pretrained(tok_dir)
# tokenizer_2/ as transformers saves it (tokenizer.json), padding with "!" like SD 2.x and SDXL
tok2 = transformers.CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")
tok2.save_pretrained(os.path.join(OUT, "tokenizer_2"))
tok2 = transformers.CLIPTokenizer.from_pretrained(os.path.join(OUT, "tokenizer_2"))

PROMPTS = [
    "a photo of sks dog",
    "  A   PHOTO\tof\n sks   Dog!!  ",
    "Hello, world's red cat... in the painting?",
    "café naïve 123 — 4,5 <|endoftext|> don't",
    "",
    "a photo of a dog in the painting " * 12,
]
expected["prompts"] = PROMPTS
expected["tokenizer_ids"] = tok1(PROMPTS, padding="max_length", truncation=True, max_length=77)["input_ids"]
expected["tokenizer_2_ids"] = tok2(PROMPTS, padding="max_length", truncation=True, max_length=77)["input_ids"]

# --- text encoders ------------------------------------------------------------------------
ids = torch.tensor(expected["tokenizer_ids"][1:3])
common = dict(
    vocab_size=len(vocab),
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=2,
    max_position_embeddings=77,
    bos_token_id=len(vocab) - 2,
)
enc1 = transformers.CLIPTextModel(
    transformers.CLIPTextConfig(**common, hidden_act="quick_gelu", eos_token_id=2, layer_norm_eps=1e-5)
).eval()
enc2 = transformers.CLIPTextModelWithProjection(
    transformers.CLIPTextConfig(
        **common, hidden_act="gelu", eos_token_id=len(vocab) - 1, projection_dim=16, layer_norm_eps=1e-6
    )
).eval()
with torch.no_grad():
    for name, enc, ids_ in [("text_encoder", enc1, ids), ("text_encoder_2", enc2, torch.tensor(expected["tokenizer_2_ids"][1:3]))]:
        # random weights, larger than the initialiser's, so that every layer moves the output
        for pname, p in enc.named_parameters():
            is_gain = "layer_norm" in pname and pname.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_gain else 0.0))
        enc.save_pretrained(os.path.join(OUT, name))
        out = enc(ids_, output_hidden_states=True)
        put(f"{name}.ids", ids_)
        put(f"{name}.last_hidden", out.last_hidden_state)
        put(f"{name}.penultimate", out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        put(f"{name}.pooled", pooled)

# --- VAE ----------------------------------------------------------------------------------
vae = diffusers.AutoencoderKL(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[4, 8],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=2,
    sample_size=16,
    scaling_factor=0.13025,
).eval()
with torch.no_grad():
    for p in vae.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    vae.save_pretrained(os.path.join(OUT, "vae"))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    dist = vae.encode(images).latent_dist
    put("vae.images", images)
    put("vae.latents", dist.mean * vae.config.scaling_factor)
    put("vae.std", dist.std)
    latents = torch.randn(2, 4, 8, 8)
    put("vae.decode_in", latents)
    put("vae.decoded", vae.decode(latents / vae.config.scaling_factor).sample)

# --- schedules ----------------------------------------------------------------------------
sched_dir = os.path.join(OUT, "scheduler")
os.makedirs(sched_dir)
CONFIGS = {
    # Stable Diffusion 1.5's file: PNDM, no timestep_spacing (so PNDM's default, leading)
    "sd15": {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    },
    "zero_snr": {
        "_class_name": "DDIMScheduler",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "clip_sample": True,
        "clip_sample_range": 1.5,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    },
    "cosine": {
        "_class_name": "EulerDiscreteScheduler",
        "beta_schedule": "squaredcos_cap_v2",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "steps_offset": 1,
    },
}
for name, cfg in CONFIGS.items():
    with open(os.path.join(sched_dir, f"{name}.json"), "w") as f:
        json.dump(cfg, f, indent=2)
with open(os.path.join(sched_dir, "bad_beta.json"), "w") as f:
    json.dump({**CONFIGS["sd15"], "beta_schedule": "sigmoid"}, f, indent=2)


x0 = torch.randn(3, 4, 4, 4)
noise = torch.randn(3, 4, 4, 4)
put("sched.x0", x0)
put("sched.noise", noise)
T = [0, 421, 999]
expected["sched_t"] = T
STEPS = 7
x_init = torch.randn(1, 4, 4, 4)
model_outs = torch.randn(STEPS, 1, 4, 4, 4)
put("sched.x_init", x_init)
put("sched.model_outs", model_outs)
expected["sched_steps"] = STEPS
cases = []
for name, cfg in CONFIGS.items():
    ddpm = diffusers.DDPMScheduler.from_config(cfg)
    put(f"sched.{name}.alphas_cumprod", ddpm.alphas_cumprod)
    tt = torch.tensor(T)
    put(f"sched.{name}.add_noise", ddpm.add_noise(x0, noise, tt))
    put(f"sched.{name}.velocity", ddpm.get_velocity(x0, noise, tt))
    acp = ddpm.alphas_cumprod.double()
    snr = acp / (1 - acp)
    expected[f"sched.{name}.snr"] = [snr[t].item() for t in T]
    for spacing in [None, "leading", "trailing", "linspace"]:
        for pred in ["epsilon", "v_prediction"]:
            over = {"prediction_type": pred}
            if spacing is not None:
                over["timestep_spacing"] = spacing
            full = {**cfg, **over}
            for kind, cls in [("ddim", diffusers.DDIMScheduler), ("euler", diffusers.EulerDiscreteScheduler)]:
                s = cls.from_config(full)
                s.set_timesteps(STEPS)
                x = x_init * s.init_noise_sigma
                firsts = None
                for i, t in enumerate(s.timesteps):
                    xin = s.scale_model_input(x, t)
                    out = model_outs[i] + 0.1 * xin
                    x = s.step(out, t, x).prev_sample
                    if i == 0:
                        firsts = x
                key = f"sched.{name}.{spacing}.{pred}.{kind}"
                put(key + ".first", firsts)
                put(key + ".final", x)
                cases.append(
                    {
                        "config": name,
                        "timestep_spacing": spacing,
                        "prediction_type": pred,
                        "sampler": kind,
                        "timesteps": [float(t) for t in s.timesteps],
                        "init_noise_sigma": float(s.init_noise_sigma),
                        "key": key,
                    }
                )
expected["sampler_cases"] = cases

with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1, ensure_ascii=False)
save_file(tensors, os.path.join(OUT, "expected.safetensors"))
print("wrote", OUT)
