"""The U-Net test fixtures: tiny random diffusers `UNet2DConditionModel`s and their outputs.

Run with diffusers and torch installed (CPU is enough):

    python scripts/make_unet_fixture.py [crates/singlora/tests/fixtures]

Writes two diffusers `unet/` folders under the given directory (default: the test fixtures):

- `unet-tiny/`: SD 1.x/2.x layout (CrossAttnDownBlock2D + DownBlock2D, the cross-attention mid
  block, UpBlock2D + CrossAttnUpBlock2D), 1x1 convolutions around the transformers,
  cross-attention from 24-wide context (non-square k/v projections).
- `unet-tiny-xl/`: SDXL layout (DownBlock2D + CrossAttnDownBlock2D, 1 and 2 transformer
  layers a block, linear projections, `text_time` added conditioning, heads given per block),
  with the other sinusoid convention (flip_sin_to_cos false, freq_shift 1), a centred input
  and the f32 softmax (`upcast_attention`).

Each holds `config.json` and `diffusion_pytorch_model.safetensors` (weights stored as f16 to
keep the folders small; the outputs are computed in f32 from the same f16-rounded values, so
a reader that widens them computes the same function) and `io.safetensors`: a fixed input
(`sample`, `timesteps` one integer and one fractional, `context`, for the XL folder
`text_embeds` and `time_ids`) and diffusers' output `out`, all f32.
"""
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

root = sys.argv[1] if len(sys.argv) > 1 else "crates/singlora/tests/fixtures"


def randomise(model, seed):
    """Default init for matrices and kernels; biases and norm weights moved off 0 and 1, so a
    test sees whether each is applied."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def make(name, seed, added=False, **cfg):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**cfg).eval()
    randomise(model, seed)
    out_dir = os.path.join(root, name)
    model.half().save_pretrained(out_dir, safe_serialization=True)
    model = model.float()

    g = torch.Generator().manual_seed(seed + 1)
    b = 2
    io = {
        "sample": torch.randn((b, cfg["in_channels"], 8, 8), generator=g),
        # one integer, one fractional timestep (samplers with continuous time use those)
        "timesteps": torch.tensor([981.0, 37.25]),
        "context": torch.randn((b, 7, cfg["cross_attention_dim"]), generator=g),
    }
    added_cond = None
    if added:
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        io["text_embeds"] = torch.randn((b, pooled), generator=g)
        io["time_ids"] = torch.tensor(
            [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 80.0, 4.0, 8.0, 64.0, 64.0]]
        )
        added_cond = {"text_embeds": io["text_embeds"], "time_ids": io["time_ids"]}
    with torch.no_grad():
        io["out"] = model(
            io["sample"], io["timesteps"], io["context"], added_cond_kwargs=added_cond
        ).sample
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out_dir, "io.safetensors"))
    n = sum(p.numel() for p in model.parameters())
    print(f"{out_dir}: {n} parameters, |out| max {io['out'].abs().max():.3f}")


make(
    "unet-tiny",
    seed=1,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 24),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=24,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)

make(
    "unet-tiny-xl",
    seed=2,
    added=True,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=24,
    attention_head_dim=[2, 4],
    transformer_layers_per_block=[1, 2],
    use_linear_projection=True,
    upcast_attention=True,
    flip_sin_to_cos=False,
    freq_shift=1,
    center_input_sample=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
)
