//! The Stable Diffusion U-Net (diffusers' `UNet2DConditionModel`: SD 1.x, SD 2.x, SDXL),
//! written for training adapters on its attention projections.
//!
//! ε̂ = U(x, t, c): noisy latents x (b, in, h, w), timesteps t (b,), text context c (b, s, d):
//!
//! ```text
//! emb  = time_embedding(sinusoid(t))        [+ add_embedding([text_embeds, sinusoid(time_ids)])]
//! h    = conv_in(x)                          (x ↦ 2x − 1 first with center_input_sample)
//! h    = down blocks (resnets, transformers, stride-2 convs), each output kept as a skip
//! h    = mid block (resnet, transformer, resnet)
//! h    = up blocks (resnets on [h, skip], transformers, ×2 upsampling)
//! ε̂    = conv_out(silu(GroupNorm(h)))
//! ```
//!
//! Each part has its file: `config.rs` (config.json), `embeddings.rs` (time and added
//! conditioning), `resnet.rs`, `attention.rs` (the transformers), `blocks.rs` (down, mid,
//! up), `conv.rs` and `norm.rs` (the frozen layers' ops), `load.rs` (weights by name).
//!
//! Every linear layer of the transformers (attn1/attn2 `to_q`, `to_k`, `to_v`, `to_out.0`,
//! `ff.net.0.proj`, `ff.net.2`, and `proj_in`/`proj_out` with `use_linear_projection`) is an
//! [`AdaptedLinear`] named `unet.` + its diffusers module path, so adapters go on by the same
//! target matching as on the language models. Everything else is frozen: plain tensors, ops
//! whose backward computes input gradients only, so autograd computes gradients for the
//! adapters' variables and nothing else.
//!
//! Memory: the self-attention scores are (b, heads, h·w, h·w); at SD's 64×64 latents that is
//! 4096² per head and batch row in the first block, kept for the backward.

pub mod attention;
pub mod blocks;
pub mod config;
pub mod conv;
pub mod embeddings;
pub(crate) mod load;
pub mod norm;
pub mod resnet;
pub(crate) mod tie;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};

pub use config::{BlockKind, TextTimeConfig, UNetConfig};

use crate::adapter::AdaptedLinear;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model::weights::{refuse_unread, Weights};
use crate::ops::mark_on;
use attention::TransformerShape;
use blocks::{DownBlock, MidBlock, UpBlock, UpChannels};
use conv::Conv2d;
use embeddings::{timesteps_for, Sinusoid, TimestepMlp};
use load::Loader;
use norm::GroupNorm;

/// SDXL's added conditioning (`addition_embed_type` "text_time").
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// The pooled text embedding (b, pooled dim).
    pub text_embeds: Tensor,
    /// Original height, width, crop top, left, target height, width (b, 6).
    pub time_ids: Tensor,
}

/// SDXL's added-conditioning embedding: its sinusoid and MLP.
#[derive(Debug, Clone)]
struct TextTime {
    sinusoid: Sinusoid,
    mlp: TimestepMlp,
    cfg: TextTimeConfig,
}

/// Whether [`UNet::taped_step`] records the forward (see [`tie::Tape`]) instead of running it
/// through candle's autograd (on by default: the two agree to rounding, `tests/unet_tape.rs`
/// on the CPU and the device check on a GPU; `singlora-lab bench-unet --no-tape` times the
/// autograd step).
static TAPED_STEPS: AtomicBool = AtomicBool::new(true);

/// Switches [`UNet::taped_step`]'s record on or off for this process.
pub fn set_taped_steps(on: bool) {
    TAPED_STEPS.store(on, Ordering::Relaxed);
}

/// The input gradient of SiLU(GroupNorm(x)), for [`tie::tie`].
struct NormSiluGrad(GroupNorm);

impl tie::InputGradient for NormSiluGrad {
    const NAME: &'static str = "unet-norm-out";
    const PROFILE_LABEL: &'static str = "backward: GroupNorm, LayerNorm";

    fn input_grad(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        self.0.backward_silu(x, g).map_err(candle_core::Error::wrap)
    }
}

pub struct UNet {
    pub cfg: UNetConfig,
    dtype: DType,
    device: Device,
    time_proj: Sinusoid,
    time_embedding: TimestepMlp,
    text_time: Option<TextTime>,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    num_params: usize,
}

impl UNet {
    /// Loads a diffusers `unet/` folder (config.json, diffusion_pytorch_model.safetensors or
    /// its sharded form); frozen weights go to `device` in `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = UNetConfig::read(dir)?;
        let w = Weights::Checkpoint(Checkpoint::open(dir)?);
        Self::from_weights(&w, cfg, dtype, device)
    }

    pub fn from_weights(
        w: &Weights,
        cfg: UNetConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut ld = Loader::new(w, dtype, device, cfg.norm_num_groups, cfg.norm_eps);
        let ch = &cfg.block_out_channels;
        let (c0, temb) = (ch[0], cfg.time_embed_dim());
        let time_proj = Sinusoid {
            dim: c0,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            shift: cfg.freq_shift,
        };
        let mlp = |ld: &mut Loader, p: &str, d_in: usize| -> Result<TimestepMlp> {
            Ok(TimestepMlp {
                linear_1: ld.frozen_linear(&format!("{p}.linear_1"), temb, d_in)?,
                linear_2: ld.frozen_linear(&format!("{p}.linear_2"), temb, temb)?,
            })
        };
        let time_embedding = mlp(&mut ld, "time_embedding", c0)?;
        let text_time = match &cfg.text_time {
            Some(tt) => Some(TextTime {
                sinusoid: Sinusoid {
                    dim: tt.time_embed_dim,
                    flip_sin_to_cos: cfg.flip_sin_to_cos,
                    shift: cfg.freq_shift,
                },
                mlp: mlp(&mut ld, "add_embedding", tt.input_dim)?,
                cfg: tt.clone(),
            }),
            None => None,
        };
        let conv_in = ld.conv("conv_in", c0, cfg.in_channels, 3, 1, 1)?;
        let shape = |i: usize, layers: usize| TransformerShape {
            channels: ch[i],
            ctx_dim: cfg.cross_attention_dim[i],
            heads: cfg.heads[i],
            layers,
            linear_projection: cfg.use_linear_projection,
            upcast: cfg.upcast_attention,
        };

        // the channels of every skip, in the order the down blocks push them
        let mut skips = vec![c0];
        let mut down = vec![];
        let n = ch.len();
        for (i, kind) in cfg.down_blocks.iter().enumerate() {
            let c_in = if i == 0 { c0 } else { ch[i - 1] };
            let attn = (*kind == BlockKind::CrossAttn)
                .then(|| shape(i, cfg.transformer_layers_per_block[i]));
            let layers = cfg.layers_per_block[i];
            let last = i + 1 == n;
            let p = format!("down_blocks.{i}");
            down.push(DownBlock::load(
                &mut ld,
                &p,
                (c_in, ch[i], temb),
                layers,
                attn,
                !last,
            )?);
            skips.extend(std::iter::repeat_n(ch[i], layers + usize::from(!last)));
        }
        let mid = MidBlock::load(
            &mut ld,
            "mid_block",
            ch[n - 1],
            temb,
            shape(n - 1, cfg.transformer_layers_per_block[n - 1]),
        )?;
        let mut up = vec![];
        let mut c_prev = ch[n - 1];
        for (i, kind) in cfg.up_blocks.iter().enumerate() {
            let j = n - 1 - i; // the down block this one mirrors
            let taken = cfg.layers_per_block[j] + 1;
            if skips.len() < taken {
                return Err(Error::msg(format!(
                    "{}: up block {i} needs {taken} skips but only {} remain; check \
                     layers_per_block in config.json",
                    w.source().display(),
                    skips.len()
                )));
            }
            let mut taken_ch = skips.split_off(skips.len() - taken);
            taken_ch.reverse();
            let attn = (*kind == BlockKind::CrossAttn)
                .then(|| shape(j, cfg.transformer_layers_per_block[j]));
            let chans = UpChannels {
                c_out: ch[j],
                c_prev,
                skips: taken_ch,
                temb,
            };
            let p = format!("up_blocks.{i}");
            up.push(UpBlock::load(&mut ld, &p, &chans, attn, i + 1 < n)?);
            c_prev = ch[j];
        }
        let norm_out = ld.group_norm("conv_norm_out", c0, cfg.norm_num_groups, cfg.norm_eps)?;
        let conv_out = ld.conv("conv_out", cfg.out_channels, c0, 3, 1, 1)?;
        refuse_unread(w, &ld.read, |_| true)?;
        Ok(Self {
            num_params: ld.count,
            cfg,
            dtype,
            device: device.clone(),
            time_proj,
            time_embedding,
            text_time,
            conv_in,
            down,
            mid,
            up,
            norm_out,
            conv_out,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The predicted noise (or v) (b, out, h, w) for `sample` (b, in, h, w), `timesteps` (b,)
    /// (may be fractional; one value serves every row) and `context` (b, seq,
    /// cross_attention_dim); `added` is required by SDXL (`text_time`) and refused otherwise.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let (b, _, _, _) = self.check_inputs(sample, context)?;
        let x = sample.to_dtype(self.dtype)?;
        let x = if self.cfg.center_input_sample {
            ((x * 2.0)? - 1.0)?
        } else {
            x
        };
        let ctx = context.to_dtype(self.dtype)?;
        let t = timesteps_for(timesteps, b, &self.device)?;
        let t_emb = self.time_proj.forward(&t)?.to_dtype(self.dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        match (&self.text_time, added) {
            (Some(tt), Some(a)) => emb = (emb + self.added_embedding(tt, a, b)?)?,
            (Some(_), None) => {
                return Err(Error::msg(
                    "this U-Net (addition_embed_type \"text_time\", SDXL) needs the added \
                     conditioning: the pooled text embedding and the time ids",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::msg(
                    "added conditioning given to a U-Net without addition_embed_type \
                     \"text_time\" (only SDXL takes it)",
                ))
            }
            (None, None) => {}
        }
        let emb_act = emb.silu()?;
        mark_on(emb_act.device(), "unet: embeddings")?;

        let mut h = self.conv_in.forward(&x)?;
        mark_on(h.device(), "unet: conv in/out")?;
        let mut skips = vec![h.clone()];
        for d in &self.down {
            h = d.forward(&h, &emb_act, &ctx, &mut skips)?;
        }
        h = self.mid.forward(&h, &emb_act, &ctx)?;
        for u in &self.up {
            h = u.forward(&h, &emb_act, &ctx, &mut skips)?;
        }
        debug_assert!(skips.is_empty());
        let a = match tie::recording() {
            true => {
                let a = self.norm_out.forward_silu(&h.detach())?;
                tie::tie(&h, &a, NormSiluGrad(self.norm_out.clone()))?
            }
            false => self.norm_out.forward_silu(&h)?,
        };
        let y = self.conv_out.forward(&a)?;
        mark_on(y.device(), "unet: conv in/out")?;
        Ok(y)
    }

    /// Whether [`Self::taped_step`] runs this U-Net on its tape: taped steps are switched on
    /// ([`set_taped_steps`]), sublayers run as one op (the default), and every transformer's
    /// attention projections, proj_in and proj_out can be taken apart for a written-out
    /// backward and its feed-forwards train nothing. Otherwise the step runs through
    /// candle's autograd.
    pub fn tape_ready(&self) -> bool {
        if !TAPED_STEPS.load(Ordering::Relaxed) || !attention::one_op_sublayers() {
            return false;
        }
        let mut layers = (self.down.iter().map(|d| &d.layers))
            .chain([&self.mid.layers])
            .chain(self.up.iter().map(|u| &u.layers));
        layers.all(|l| l.tape_ready(self.dtype))
    }

    /// One training step's forward and backward without candle's autograd between the blocks
    /// (see [`tie::Tape`]): the forward is recorded, `loss(pred)` runs through candle's
    /// autograd on the output alone (the output a leaf), and the record's backward hands the
    /// adapters' variables their gradients, which are added into the loss's gradient store.
    /// Returns what `loss` returned and that store. Where [`Self::tape_ready`] is false, the
    /// same through candle's autograd.
    pub fn taped_step<T>(
        &self,
        (sample, timesteps, context, added): (&Tensor, &Tensor, &Tensor, Option<&AddedCond>),
        loss: impl FnOnce(&Tensor) -> Result<(Tensor, T)>,
    ) -> Result<((Tensor, T), candle_core::backprop::GradStore)> {
        if !self.tape_ready() {
            let (l, extra) = loss(&self.forward(sample, timesteps, context, added)?)?;
            let grads = l.backward()?;
            return Ok(((l, extra), grads));
        }
        let rec = tie::Tape::start()?;
        let pred = self.forward(sample, timesteps, context, added)?;
        let tape = tie::Tape::finish(rec)?;
        let leaf = candle_core::Var::from_tensor(&pred)?;
        let (l, extra) = loss(leaf.as_tensor())?;
        let mut grads = l.backward()?;
        let g = grads
            .remove(leaf.as_tensor())
            .ok_or_else(|| Error::msg("U-Net tape: the loss does not depend on the output"))?;
        for (param, dp) in tape.backward(&pred, &g)? {
            let sum = match grads.remove(&param) {
                Some(prev) => (prev + dp)?,
                None => dp,
            };
            grads.insert(&param, sum);
        }
        Ok(((l, extra), grads))
    }

    /// add_embedding([text_embeds, sinusoid(time_ids) flattened per row]).
    fn added_embedding(&self, tt: &TextTime, a: &AddedCond, b: usize) -> Result<Tensor> {
        let pooled = tt.cfg.text_embeds_dim();
        if a.text_embeds.dims() != [b, pooled] || a.time_ids.dims() != [b, 6] {
            return Err(Error::msg(format!(
                "U-Net added conditioning: text_embeds must be ({b}, {pooled}) and time_ids \
                 ({b}, 6) for a batch of {b}, found {:?} and {:?}",
                a.text_embeds.dims(),
                a.time_ids.dims()
            )));
        }
        let ids = a.time_ids.to_device(&self.device)?.flatten_all()?;
        let time = tt
            .sinusoid
            .forward(&ids)?
            .reshape((b, 6 * tt.cfg.time_embed_dim))?;
        let text = a
            .text_embeds
            .to_device(&self.device)?
            .to_dtype(DType::F32)?;
        let input = Tensor::cat(&[&text, &time], 1)?.to_dtype(self.dtype)?;
        tt.mlp.forward(&input)
    }

    /// (b, c, h, w) of a sample that fits the model and its context.
    fn check_inputs(
        &self,
        sample: &Tensor,
        context: &Tensor,
    ) -> Result<(usize, usize, usize, usize)> {
        let (b, c, h, w) = sample.dims4()?;
        let step = 1 << self.cfg.num_downsamplers();
        if c != self.cfg.in_channels || h % step != 0 || w % step != 0 || h == 0 || w == 0 {
            return Err(Error::msg(format!(
                "U-Net input {:?}: expected (batch, {}, height, width) with height and width \
                 multiples of {step}",
                sample.dims(),
                self.cfg.in_channels
            )));
        }
        let (cb, _, cd) = context.dims3()?;
        let want = &self.cfg.cross_attention_dim;
        if cb != b || want.iter().any(|&d| d != cd) {
            return Err(Error::msg(format!(
                "U-Net context {:?}: expected ({b}, sequence, {}) for a batch of {b}",
                context.dims(),
                want[0]
            )));
        }
        Ok((b, c, h, w))
    }

    /// The adaptable linear layers, in model order.
    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        let mut v = vec![];
        let layers = self.down.iter().map(|d| &d.layers);
        let layers = layers
            .chain([&self.mid.layers])
            .chain(self.up.iter().map(|u| &u.layers));
        for l in layers {
            l.linears(&mut v);
        }
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut v = vec![];
        let layers = self.down.iter_mut().map(|d| &mut d.layers);
        let layers = layers
            .chain([&mut self.mid.layers])
            .chain(self.up.iter_mut().map(|u| &mut u.layers));
        for l in layers {
            l.linears_mut(&mut v);
        }
        v
    }

    /// The frozen parameters loaded (adapters not included).
    pub fn num_params(&self) -> usize {
        self.num_params
    }
}
