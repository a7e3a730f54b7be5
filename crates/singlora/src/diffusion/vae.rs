//! Stable Diffusion's VAE (diffusers' `AutoencoderKL`, the `vae/` folder), forward only, built
//! from candle-transformers' blocks over our validated checkpoint.
//!
//! Encoder: conv_in → `DownEncoderBlock2D`s (ResNet blocks, a stride-2 convolution between
//! levels) → mid block (ResNet, single-head self-attention, ResNet) → GroupNorm → SiLU →
//! conv_out → `quant_conv`, giving a diagonal Gaussian q(z|x) = N(μ, σ²) with
//! [μ, log σ²] split along channels and log σ² clamped to [−30, 20] as diffusers does.
//! Decoder: `post_quant_conv` → conv_in → mid block → `UpDecoderBlock2D`s (nearest 2× upsampling
//! then a convolution between levels) → GroupNorm → SiLU → conv_out.
//!
//! The diffusion model works on scaled latents: [`Vae::encode`] returns
//! (z − shift_factor)·scaling_factor with z = μ, or z = μ + σ·n, n ~ N(0, I) drawn from the
//! caller's generator; [`Vae::decode`] inverts that (latents/scaling_factor + shift_factor) and
//! returns images in [−1, 1] (not clamped).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Linear;
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::resnet::{ResnetBlock2D, ResnetBlock2DConfig};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UpDecoderBlock2D, UpDecoderBlock2DConfig,
};
use rand_distr::{Distribution, StandardNormal};
use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model::weights::{refuse_unread, ConfigReader, Weights};

/// diffusers' `AutoencoderKL` normalises with this epsilon everywhere.
const EPS: f64 = 1e-6;

/// The fields of `vae/config.json` that shape the model and its latents.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

impl VaeConfig {
    pub fn from_config(value: &Value, path: &Path) -> Result<Self> {
        let c = ConfigReader { path, value };
        c.refuse_unless(
            "_class_name",
            |v| v == "AutoencoderKL",
            "singlora runs diffusers' AutoencoderKL",
        )?;
        let block_out_channels: Vec<usize> = match c.get("block_out_channels") {
            Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                Error::bad_field(
                    path,
                    "block_out_channels",
                    format!("must be a list of positive integers, found {v}"),
                )
            })?,
            None => vec![64],
        };
        if block_out_channels.is_empty() || block_out_channels.contains(&0) {
            return Err(Error::bad_field(
                path,
                "block_out_channels",
                "must be a non-empty list of positive integers",
            ));
        }
        let levels = block_out_channels.len();
        for (field, block) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            let supported = |v: &Value| {
                v.as_array()
                    .is_some_and(|a| a.len() == levels && a.iter().all(|b| b == block))
            };
            c.refuse_unless(
                field,
                supported,
                &format!("expected {levels} × {block}, one per block_out_channels entry"),
            )?;
        }
        c.refuse_unless("act_fn", |v| v == "silu", "expected silu")?;
        c.refuse_unless(
            "mid_block_add_attention",
            |v| v == &Value::Bool(true),
            "the VAE's mid block without attention is not implemented",
        )?;
        for field in ["latents_mean", "latents_std"] {
            c.refuse_unless(
                field,
                |_| false,
                "per-channel latent normalisation is not implemented; only scaling_factor and shift_factor",
            )?;
        }
        let norm_num_groups = c.usize_or("norm_num_groups", Some(32))?;
        if let Some(ch) = block_out_channels
            .iter()
            .find(|&&ch| norm_num_groups == 0 || ch % norm_num_groups != 0)
        {
            return Err(Error::bad_field(
                path,
                "norm_num_groups",
                format!("{norm_num_groups} does not divide the {ch} channels of a block"),
            ));
        }
        let scaling_factor = c.f64_or("scaling_factor", 0.18215)?;
        if !(scaling_factor.is_finite() && scaling_factor > 0.0) {
            return Err(Error::bad_field(
                path,
                "scaling_factor",
                format!("must be a positive number, found {scaling_factor}"),
            ));
        }
        Ok(Self {
            in_channels: c.usize_or("in_channels", Some(3))?,
            out_channels: c.usize_or("out_channels", Some(3))?,
            block_out_channels,
            layers_per_block: c.usize_or("layers_per_block", Some(1))?,
            latent_channels: c.usize_or("latent_channels", Some(4))?,
            norm_num_groups,
            use_quant_conv: c.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: c.bool_or("use_post_quant_conv", true)?,
            scaling_factor,
            shift_factor: c.f64_or("shift_factor", 0.0)?,
        })
    }
}

/// A [`Weights`] as candle's `VarBuilder` backend, noting every name it is asked for so that
/// tensors the model never read can be refused afterwards.
struct TrackedWeights<'a> {
    w: &'a Weights,
    read: &'a Mutex<BTreeSet<String>>,
}

impl TrackedWeights<'_> {
    fn note(&self, name: &str) {
        self.read
            .lock()
            .expect("no reader panics while holding the lock")
            .insert(name.to_string());
    }
}

impl SimpleBackend for TrackedWeights<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            // candle-transformers asks again with another shape where checkpoints differ
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("tensor `{name}` in {}", self.w.source().display()),
                expected: s,
                got: t.shape().clone(),
            });
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.note(name);
        self.w
            .get(name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.w.contains(name)
    }
}

fn conv(vb: VarBuilder, cin: usize, cout: usize, kernel: usize) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: kernel / 2,
        ..Default::default()
    };
    candle_nn::conv2d(cin, cout, kernel, cfg, vb)
}

/// The middle of the encoder and of the decoder: ResNet block, self-attention, ResNet block.
struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: SelfAttention,
    resnet_out: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        let cfg = ResnetBlock2DConfig {
            eps: EPS,
            groups,
            temb_channels: None,
            ..Default::default()
        };
        Ok(Self {
            resnet_in: ResnetBlock2D::new(vb.pp("resnets.0"), channels, cfg)?,
            attention: SelfAttention::new(vb.pp("attentions.0"), channels, groups)?,
            resnet_out: ResnetBlock2D::new(vb.pp("resnets.1"), channels, cfg)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.resnet_in.forward(x, None)?;
        let x = self.attention.forward(&x)?;
        self.resnet_out.forward(&x, None)
    }
}

/// Single-head self-attention over the pixels, with a residual:
/// x + W_o·softmax(q·kᵀ/√c)·v, q, k, v = W·GroupNorm(x) (diffusers' attention_head_dim is the
/// channel count, so one head). candle-transformers' `AttentionBlock` is not used: it feeds a
/// transposed view to `Linear`, which candle 0.11's CPU matmul gets wrong for batches above one.
struct SelfAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SelfAttention {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> candle_core::Result<Self> {
        // diffusers' current names, or those of checkpoints saved before diffusers 0.14
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let linear = |name: &str| -> candle_core::Result<Linear> {
            let vb = vb.pp(name);
            // some conversions store these projections as 1×1 convolutions
            let w = match vb.get((c, c), "weight") {
                Ok(w) => w,
                Err(_) => vb.get((c, c, 1, 1), "weight")?.reshape((c, c))?,
            };
            Ok(Linear::new(w, Some(vb.get(c, "bias")?)))
        };
        Ok(Self {
            norm: candle_nn::group_norm(groups, c, EPS, vb.pp("group_norm"))?,
            q: linear(names[0])?,
            k: linear(names[1])?,
            v: linear(names[2])?,
            out: linear(names[3])?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.q.forward(&tokens)?;
        let k = self.k.forward(&tokens)?;
        let v = self.v.forward(&tokens)?;
        let scores = (q.matmul(&k.t()?)? / (c as f64).sqrt())?;
        // softmax in f32: half-precision exponentials overflow
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
        let attended = self.out.forward(&probs.matmul(&v)?)?;
        x + attended.transpose(1, 2)?.reshape((b, c, h, w))?
    }
}

/// Where a stack of convolutions and norms ends: GroupNorm, SiLU, then a 3×3 convolution.
struct Head {
    norm: GroupNorm,
    conv: Conv2d,
}

impl Head {
    fn new(vb: &VarBuilder, groups: usize, cin: usize, cout: usize) -> candle_core::Result<Self> {
        Ok(Self {
            norm: candle_nn::group_norm(groups, cin, EPS, vb.pp("conv_norm_out"))?,
            conv: conv(vb.pp("conv_out"), cin, cout, 3)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::silu(&self.norm.forward(x)?)?.apply(&self.conv)
    }
}

struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownEncoderBlock2D>,
    mid: MidBlock,
    head: Head,
    quant_conv: Option<Conv2d>,
}

impl Encoder {
    /// `root` is the checkpoint's root: `quant_conv` sits beside `encoder`.
    fn new(root: &VarBuilder, c: &VaeConfig) -> candle_core::Result<Self> {
        let vb = root.pp("encoder");
        let ch = &c.block_out_channels;
        let groups = c.norm_num_groups;
        let down = (0..ch.len())
            .map(|i| {
                let cfg = DownEncoderBlock2DConfig {
                    num_layers: c.layers_per_block,
                    resnet_eps: EPS,
                    resnet_groups: groups,
                    output_scale_factor: 1.0,
                    add_downsample: i + 1 < ch.len(),
                    // diffusers pads right and bottom by one, then convolves unpadded
                    downsample_padding: 0,
                };
                let cin = ch[i.saturating_sub(1)];
                DownEncoderBlock2D::new(vb.pp(format!("down_blocks.{i}")), cin, ch[i], cfg)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let top = ch[ch.len() - 1];
        let moments = 2 * c.latent_channels;
        Ok(Self {
            conv_in: conv(vb.pp("conv_in"), c.in_channels, ch[0], 3)?,
            down,
            mid: MidBlock::new(vb.pp("mid_block"), top, groups)?,
            head: Head::new(&vb, groups, top, moments)?,
            quant_conv: c
                .use_quant_conv
                .then(|| conv(root.pp("quant_conv"), moments, moments, 1))
                .transpose()?,
        })
    }

    /// (μ, log σ²).
    fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut h = x.apply(&self.conv_in)?;
        for block in &self.down {
            h = h.apply(block)?;
        }
        let mut h = self.head.forward(&self.mid.forward(&h)?)?;
        if let Some(q) = &self.quant_conv {
            h = h.apply(q)?;
        }
        let half = h.dim(1)? / 2;
        Ok((
            h.narrow(1, 0, half)?,
            h.narrow(1, half, half)?.clamp(-30.0, 20.0)?,
        ))
    }
}

struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<UpDecoderBlock2D>,
    head: Head,
}

impl Decoder {
    /// `root` is the checkpoint's root: `post_quant_conv` sits beside `decoder`.
    fn new(root: &VarBuilder, c: &VaeConfig) -> candle_core::Result<Self> {
        let vb = root.pp("decoder");
        let l = c.latent_channels;
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let groups = c.norm_num_groups;
        let up = (0..rev.len())
            .map(|i| {
                let cfg = UpDecoderBlock2DConfig {
                    num_layers: c.layers_per_block + 1,
                    resnet_eps: EPS,
                    resnet_groups: groups,
                    output_scale_factor: 1.0,
                    add_upsample: i + 1 < rev.len(),
                };
                let cin = rev[i.saturating_sub(1)];
                UpDecoderBlock2D::new(vb.pp(format!("up_blocks.{i}")), cin, rev[i], cfg)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            post_quant_conv: c
                .use_post_quant_conv
                .then(|| conv(root.pp("post_quant_conv"), l, l, 1))
                .transpose()?,
            conv_in: conv(vb.pp("conv_in"), l, rev[0], 3)?,
            mid: MidBlock::new(vb.pp("mid_block"), rev[0], groups)?,
            up,
            head: Head::new(&vb, groups, rev[rev.len() - 1], c.out_channels)?,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => z.apply(p)?,
            None => z.clone(),
        };
        let mut h = self.mid.forward(&z.apply(&self.conv_in)?)?;
        for block in &self.up {
            h = h.apply(block)?;
        }
        self.head.forward(&h)
    }
}

/// A Stable Diffusion VAE, frozen.
pub struct Vae {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    dtype: DType,
}

impl Vae {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (or shards).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        let config = VaeConfig::from_config(ckpt.config(), &dir.join("config.json"))?;
        let w = Weights::Checkpoint(ckpt);
        let read = Mutex::new(BTreeSet::new());
        let vb = VarBuilder::from_backend(
            Box::new(TrackedWeights { w: &w, read: &read }),
            dtype,
            device.clone(),
        );
        let built = Encoder::new(&vb, &config).and_then(|e| Ok((e, Decoder::new(&vb, &config)?)));
        let (encoder, decoder) = built
            .map_err(|e| Error::msg(format!("{}: cannot build the VAE: {e}", dir.display())))?;
        drop(vb);
        let read = read.into_inner().expect("no reader panicked");
        refuse_unread(&w, &read, |_| true)?;
        Ok(Self {
            config,
            encoder,
            decoder,
            dtype,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Scaled latents of (b, in_channels, H, W) images in [−1, 1]: the posterior mean, or a draw
    /// from the posterior with `sample`'s generator. H and W must be multiples of
    /// 2^(levels − 1).
    pub fn encode(
        &self,
        images: &Tensor,
        sample: Option<&mut dyn rand::RngCore>,
    ) -> Result<Tensor> {
        let images = images.to_dtype(self.dtype)?;
        let (mean, logvar) = self.encoder.forward(&images)?;
        let z = match sample {
            None => mean,
            Some(rng) => {
                let n: Vec<f32> = (0..mean.elem_count())
                    .map(|_| StandardNormal.sample(rng))
                    .collect();
                let noise =
                    Tensor::from_vec(n, mean.shape(), mean.device())?.to_dtype(mean.dtype())?;
                (mean + ((logvar * 0.5)?.exp()? * noise)?)?
            }
        };
        let c = &self.config;
        Ok(((z - c.shift_factor)? * c.scaling_factor)?)
    }

    /// The posterior N(μ, σ²) of each image in scaled latent units: ((μ − shift)·s, σ·s), so a
    /// training step can draw x₀ = μ + σ·z from latents encoded once.
    pub fn encode_moments(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let images = images.to_dtype(self.dtype)?;
        let (mean, logvar) = self.encoder.forward(&images)?;
        let c = &self.config;
        Ok((
            ((mean - c.shift_factor)? * c.scaling_factor)?,
            ((logvar * 0.5)?.exp()? * c.scaling_factor)?,
        ))
    }

    /// How many pixels one latent cell spans on each side: 2^(levels − 1).
    pub fn downscale(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// Images in [−1, 1] (b, out_channels, 8·h, 8·w for SD's four levels) from scaled latents.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let z = ((latents.to_dtype(self.dtype)? / c.scaling_factor)? + c.shift_factor)?;
        Ok(self.decoder.forward(&z)?)
    }
}
