"""The small DreamBooth test bed of docs/results.md ("DreamBooth proxy"): a text-conditional
pixel-space diffusion model pretrained on Fashion-MNIST without one class, an image encoder
trained here for subject fidelity (as DINO is used in the paper), and the scores of samples.

    python proxy.py pretrain --data DIR --out BASE [--steps 6000] [--device cuda]
    python proxy.py embedder --data DIR --out EMB.pt [--device cuda]
    python proxy.py subject --data DIR --out SUBJ_DIR        # the 5 subject images
    python proxy.py score --data DIR --emb EMB.pt --run RUN_DIR   # reads RUN_DIR-eval/{subject,classes}.png

DIR holds Debian's dataset-fashion-mnist files (train/t10k-images/labels-idx*-ubyte.gz).
The base is a diffusers-layout folder singlora reads: unet/ (1 channel, 32x32, cross-attention
to a 64-wide text context), text_encoder/ (a 2-layer CLIP text model trained with it),
tokenizer/ (a CLIP BPE vocabulary from the test fixtures), scheduler/ (DDPM, 1000 steps,
epsilon), and "vae": [null, null] in model_index.json (pixel space). Prompts are
"a photo of a <class>"; 10% of the captions are empty so classifier-free guidance works.
The held-out class (ankle boot) is never seen in pretraining.
"""
import argparse
import gzip
import json
import os
import shutil
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
HELD_OUT = 9
SUBJECT_PROMPT = "a photo of sks boot"
HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "..", "crates", "singlora", "tests", "fixtures", "sd_parts", "tokenizer")


def load(data, split):
    pre = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(data, f"{pre}-images-idx3-ubyte.gz")) as f:
        _, n, h, w = struct.unpack(">IIII", f.read(16))
        x = np.frombuffer(f.read(), np.uint8).reshape(n, h, w)
    with gzip.open(os.path.join(data, f"{pre}-labels-idx1-ubyte.gz")) as f:
        f.read(8)
        y = np.frombuffer(f.read(), np.uint8)
    return x, y


def to_unit(x):
    """uint8 28x28 -> float (n, 1, 32, 32) in [-1, 1], padded with the background (-1)."""
    t = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    return F.pad(t, (2, 2, 2, 2), value=-1.0)


def prompt(c):
    return f"a photo of a {CLASSES[c]}"


def pretrain(a):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    dev = a.device
    x, y = load(a.data, "train")
    keep = y != HELD_OUT
    # the whole set on the device: a step then reads no host memory
    x, y = to_unit(x[keep]).to(dev), torch.from_numpy(y[keep].astype(np.int64)).to(dev)
    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    width = 64
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).to(dev)
    ch = (32, 64) if a.tiny else (64, 128, 256)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=1, out_channels=1,
        # attention below full resolution only, as SDXL places it: 1,024-token attention with
        # 8-wide heads made a step ~5x slower for little gain on 32x32 images
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(ch) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",),
        block_out_channels=ch, layers_per_block=1 if a.tiny else 2, norm_num_groups=8 if a.tiny else 32,
        cross_attention_dim=width, attention_head_dim=8,
    ).to(dev)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012, prediction_type="epsilon", clip_sample=False)
    ids = tok([prompt(c) for c in range(10)] + [""], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids.to(dev)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    acsd = sched.alphas_cumprod.to(dev)
    n = len(x)
    t0 = time.time()
    for step in range(a.steps):
        if (a.max_seconds and time.time() - t0 > a.max_seconds) or (a.stop_after and step >= a.stop_after):
            # a time-capped call keeps what it trained rather than nothing
            print(json.dumps({"stopped_at_step": step, "of": a.steps, "secs": round(time.time() - t0, 1)}), flush=True)
            break
        idx = torch.randint(0, n, (a.batch,), device=dev)
        x0 = x[idx]
        c = y[idx]
        c = torch.where(torch.rand(a.batch, device=dev) < 0.1, torch.full_like(c, 10), c)
        t = torch.randint(0, 1000, (a.batch,), device=dev)
        eps = torch.randn_like(x0)
        ab = acsd[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dev.startswith("cuda")):
            ctx = te(ids[c]).last_hidden_state
            pred = unet(xt, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 500) * (0.1 + 0.9 * (1 - step / a.steps))
        opt.step()
        if step % 500 == 0 or step == a.steps - 1:
            print(json.dumps({"step": step, "loss": loss.item(), "secs": round(time.time() - t0, 1)}), flush=True)
    shutil.rmtree(a.out, ignore_errors=True)
    # stored in f16 (half the size to carry; the GPU runs compute in bf16 anyway)
    unet.to(torch.float16).save_pretrained(os.path.join(a.out, "unet"), safe_serialization=True)
    te.to(torch.float16).save_pretrained(os.path.join(a.out, "text_encoder"), safe_serialization=True)
    tok.save_pretrained(os.path.join(a.out, "tokenizer"))
    sched.save_pretrained(os.path.join(a.out, "scheduler"))
    with open(os.path.join(a.out, "model_index.json"), "w") as f:
        json.dump({
            "_class_name": "StableDiffusionPipeline", "_note": "pixel space: no VAE",
            "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
            "vae": [None, None],
        }, f, indent=2)
    print(f"wrote {a.out}")


class Encoder(nn.Module):
    """A small CNN classifier of Fashion-MNIST; its 128-wide penultimate features are the
    image embedding for subject fidelity and diversity."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, 128), nn.GELU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.f(x))


def embedder(a):
    torch.manual_seed(0)
    dev = a.device
    x, y = load(a.data, "train")
    x, y = to_unit(x), torch.from_numpy(y.astype(np.int64))
    m = Encoder().to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    for step in range(a.steps):
        idx = torch.randint(0, len(x), (256,))
        loss = F.cross_entropy(m(x[idx].to(dev)), y[idx].to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = load(a.data, "test")
    with torch.no_grad():
        pred = torch.cat([m(to_unit(xt[i:i + 1000]).to(dev)).argmax(1).cpu() for i in range(0, len(xt), 1000)])
    acc = (pred.numpy() == yt).mean()
    torch.save(m.state_dict(), a.out)
    print(json.dumps({"embedder_test_accuracy": float(acc)}))


def subject(a):
    from PIL import Image

    xt, yt = load(a.data, "test")
    os.makedirs(a.out, exist_ok=True)
    # the subject: the first 5 test images of the held-out class, in file order
    for k, i in enumerate(np.flatnonzero(yt == HELD_OUT)[:5]):
        Image.fromarray(np.pad(xt[i], 2)).convert("RGB").save(os.path.join(a.out, f"subject-{k}.png"))
    print(f"wrote 5 subject images to {a.out}")


def tiles(path, side=32):
    from PIL import Image

    img = np.asarray(Image.open(path).convert("L"), np.float32) / 127.5 - 1.0
    h, w = img.shape
    out = [img[r:r + side, c:c + side] for r in range(0, h, side) for c in range(0, w, side)]
    return torch.from_numpy(np.stack(out)).unsqueeze(1)


def score(a):
    dev = a.device
    m = Encoder().to(dev)
    m.load_state_dict(torch.load(a.emb, map_location=dev))
    m.eval()
    xt, yt = load(a.data, "test")
    subj = to_unit(xt[np.flatnonzero(yt == HELD_OUT)[:5]]).to(dev)
    # beside the run: singlora refuses to write into an adapter directory it reads
    ev = a.run.rstrip("/") + "-eval"
    with torch.no_grad():
        emb = lambda t: F.normalize(m.f(t.to(dev)), dim=1)
        s_emb = emb(subj)
        g = tiles(os.path.join(ev, "subject.png"))
        g_emb = emb(g)
        fidelity = (g_emb @ s_emb.T).mean().item()
        sim = g_emb @ g_emb.T
        n = len(g)
        diversity = (1 - (sim.sum() - n) / (n * (n - 1))).item()
        as_class = (m(g.to(dev)).argmax(1) == HELD_OUT).float().mean().item()
        # classes.png: one row of samples per pretrained class, in CLASSES order
        rows = tiles(os.path.join(ev, "classes.png"))
        per = len(rows) // HELD_OUT
        prompt_ok = []
        for c in range(HELD_OUT):
            p = rows[c * per:(c + 1) * per]
            prompt_ok.append((m(p.to(dev)).argmax(1) == c).float().mean().item())
    out = {
        "subject_fidelity": fidelity, "diversity": diversity, "subject_as_class": as_class,
        "prompt_fidelity": float(np.mean(prompt_ok)), "prompt_fidelity_per_class": prompt_ok,
    }
    with open(os.path.join(ev, "scores.json"), "w") as f:
        json.dump(out, f)
    print(json.dumps(out))


p = argparse.ArgumentParser()
p.add_argument("cmd", choices=["pretrain", "embedder", "subject", "score"])
p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
p.add_argument("--out")
p.add_argument("--emb")
p.add_argument("--run")
p.add_argument("--steps", type=int, default=6000)
p.add_argument("--batch", type=int, default=256)
p.add_argument("--lr", type=float, default=3e-4)
p.add_argument("--max-seconds", type=float, default=0, help="pretrain: stop and save after this long")
p.add_argument("--stop-after", type=int, default=0,
               help="pretrain: stop and save after this many steps (the schedule still planned over --steps)")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--tiny", action="store_true", help="a small model for a CPU smoke test")
a = p.parse_args()
# TF32 for the f32 parts (the optimiser's master weights, the embedder): same results to
# well within what the scores resolve, several times faster on the GPU
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
{"pretrain": pretrain, "embedder": embedder, "subject": subject, "score": score}[a.cmd](a)
