"""The sample figure of docs/results.md's DreamBooth proxy: the subject's five training images,
then the first 12 samples of "a photo of sks boot" from the base and from each method at the
paper's setting (q/k adapters, rate 1e-3, seed 1), all drawn from the same noise.

    python figure.py DATA_DIR RESULTS_DIR    # DATA_DIR: Debian's fashion-mnist files
                                             # RESULTS_DIR: docs/results/diffusion_proxy

Needs numpy and Pillow; writes RESULTS_DIR/paper-setting-seed1.png.
"""
import gzip
import os
import struct
import sys

import numpy as np
from PIL import Image, ImageDraw

data, res = sys.argv[1], sys.argv[2]
with gzip.open(os.path.join(data, "t10k-images-idx3-ubyte.gz")) as f:
    _, n, h, w = struct.unpack(">IIII", f.read(16))
    x = np.frombuffer(f.read(), np.uint8).reshape(n, h, w)
with gzip.open(os.path.join(data, "t10k-labels-idx1-ubyte.gz")) as f:
    f.read(8)
    y = np.frombuffer(f.read(), np.uint8)
# the subject as proxy.py picks it: the first five ankle boots (class 9), padded to 32
rows = [("subject (training images)", [np.pad(x[i], 2) for i in np.flatnonzero(y == 9)[:5]])]
N, S, SIDE = 12, 2, 32


def tiles(name):
    im = np.asarray(Image.open(os.path.join(res, "grids", name + ".png")).convert("L"))
    return [im[:, c * SIDE:(c + 1) * SIDE] for c in range(N)]


rows.append(("base, no adapter", tiles("base")))
for label, run in [("LoRA r 8", "qk-lora-r8-lr1e-3-s1"), ("DoRA r 8", "qk-dora-r8-lr1e-3-s1"),
                   ("SingLoRA r 8", "qk-singlora-r8-lr1e-3-s1"),
                   ("SingLoRA r 16", "qk-singlora-r16-lr1e-3-s1")]:
    rows.append((label, tiles(run)))
label_w = 170
out = Image.new("RGB", (label_w + N * SIDE * S, len(rows) * (SIDE * S + 4)), "white")
draw = ImageDraw.Draw(out)
for r, (label, ts) in enumerate(rows):
    y0 = r * (SIDE * S + 4)
    draw.text((6, y0 + SIDE * S // 2 - 6), label, fill="black")
    for c, t in enumerate(ts):
        tile = Image.fromarray(t).convert("RGB").resize((SIDE * S, SIDE * S), Image.NEAREST)
        out.paste(tile, (label_w + c * SIDE * S, y0))
out.save(os.path.join(res, "paper-setting-seed1.png"), optimize=True)
