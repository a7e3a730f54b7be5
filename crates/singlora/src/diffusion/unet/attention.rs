//! The U-Net's transformers (diffusers' `Transformer2DModel` on continuous input, made of
//! `BasicTransformerBlock`s), where the adapters go.
//!
//! Transformer on x (b, c, h, w), context (b, s, d_ctx):
//!
//! t = proj_in(GroupNorm(x) as (b, h·w, c)); t = block(t) for each block;
//! y = x + proj_out(t) as (b, c, h, w)
//!
//! (proj_in/proj_out: linear layers with `use_linear_projection`, else 1×1 convolutions, the
//! same map on each position.) A block, with LayerNorms n1..n3:
//!
//! t += attn1(n1(t)) (self-attention); t += attn2(n2(t), context) (cross-attention);
//! t += ff.net.2(a ⊙ gelu(g)), [a, g] = ff.net.0.proj(n3(t)) (GEGLU, 4·c wide)
//!
//! attn(x, ctx) = to_out.0(softmax(q·kᵀ/√d)·v) per head, q = to_q(x), k = to_k(ctx),
//! v = to_v(ctx), no biases on q, k, v. Every one of these linear layers is an
//! [`AdaptedLinear`]; with `upcast_attention` the scores and softmax are f32.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};

use super::load::Loader;
use super::norm::{GroupNorm, LayerNorm};
use super::tie::{self, not_on_tape, recording, tie, tie_params, tracked};
use super::tie::{InputGradient, ParamsGradient};
use crate::adapter::{AdaptedLinear, LowRankLinear};
use crate::error::Result;
use crate::linear::FrozenLinear;
use crate::ops::{mark_on, probe};

/// diffusers' fixed epsilons: the transformer's GroupNorm and the blocks' LayerNorms.
const GROUP_NORM_EPS: f64 = 1e-6;
const LAYER_NORM_EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
pub struct Attention {
    to_q: AdaptedLinear,
    to_k: AdaptedLinear,
    to_v: AdaptedLinear,
    to_out: AdaptedLinear,
    heads: usize,
    upcast: bool,
}

impl Attention {
    /// Attention of `heads` heads through these projections (to_q, to_k, to_v: no bias); with
    /// `upcast` the scores and softmax in f32.
    pub fn new([to_q, to_k, to_v, to_out]: [AdaptedLinear; 4], heads: usize, upcast: bool) -> Self {
        Self {
            to_q,
            to_k,
            to_v,
            to_out,
            heads,
            upcast,
        }
    }

    /// Keys and values from `kv_dim`-wide inputs: the block's own (self-attention) or the
    /// context's (cross-attention).
    fn load(ld: &mut Loader, p: &str, s: &TransformerShape, kv_dim: usize) -> Result<Self> {
        let dim = s.channels;
        Ok(Self {
            to_q: ld.adapted(&format!("{p}.to_q"), dim, dim, false)?,
            to_k: ld.adapted(&format!("{p}.to_k"), dim, kv_dim, false)?,
            to_v: ld.adapted(&format!("{p}.to_v"), dim, kv_dim, false)?,
            to_out: ld.adapted(&format!("{p}.to_out.0"), dim, dim, true)?,
            heads: s.heads,
            upcast: s.upcast,
        })
    }

    /// `x` (b, t, dim); `ctx` (b, s, ctx_dim), or None for self-attention.
    pub fn forward(&self, x: &Tensor, ctx: Option<&Tensor>) -> Result<Tensor> {
        let kv = ctx.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(kv)?;
        let v = self.to_v.forward(kv)?;
        mark_on(v.device(), "unet: attention projections")?;
        let a = attend(&q, &k, &v, self.heads, self.upcast)?;
        mark_on(a.device(), core_label(ctx.is_some()))?;
        let y = self.to_out.forward(&a)?;
        mark_on(y.device(), "unet: attention projections")?;
        Ok(y)
    }

    /// Whether [`Self::low_rank`] takes all four projections apart, without making the
    /// factors' copies.
    fn takes_apart(&self, dtype: DType) -> bool {
        [&self.to_q, &self.to_k, &self.to_v, &self.to_out]
            .iter()
            .all(|l| l.takes_apart(dtype))
    }

    /// to_q, to_k, to_v, to_out.0 taken apart for [`attention_sublayer_one_op`], or None
    /// where one of them cannot be (see [`AdaptedLinear::as_low_rank`]).
    fn low_rank(&self, dtype: DType) -> Result<Option<[LowRankLinear; 4]>> {
        let mut parts = vec![];
        for l in [&self.to_q, &self.to_k, &self.to_v, &self.to_out] {
            match l.as_low_rank(dtype)? {
                Some(p) => parts.push(p),
                None => return Ok(None),
            }
        }
        Ok(parts.try_into().ok())
    }

    /// to_q, to_k, to_v, to_out.0.
    pub fn linears<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        out.extend([&self.to_q, &self.to_k, &self.to_v, &self.to_out]);
    }

    /// to_q, to_k, to_v, to_out.0, to put adapters on.
    pub fn linears_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        out.extend([
            &mut self.to_q,
            &mut self.to_k,
            &mut self.to_v,
            &mut self.to_out,
        ]);
    }
}

/// softmax(q·kᵀ/√d)·v per head, on q (b, t, h·d) and k, v (b, s, h·d); heads merged. On CUDA
/// in bf16, self-attention with heads of up to 128 takes the fused kernels
/// ([`attend_fused`]), attention to a short context (up to 80 keys, heads of 40, 64 or 80) the
/// cross-attention kernels where they are in use ([`crate::ops::cross_attention::IN_USE`]);
/// otherwise the scores are materialised.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, upcast: bool) -> Result<Tensor> {
    let (b, t, inner) = q.dims3()?;
    let s = k.dim(1)?;
    let d = inner / heads;
    let lens = vec![s; b];
    let half = !matches!(q.dtype(), DType::F32 | DType::F64);
    if fused_self_attention(q, k, heads, upcast)? {
        return attend_fused(q, k, v, heads, &crate::ops::FastPath::default());
    }
    // f32 arithmetic inside, as `upcast` asks
    if crate::ops::cross_attention::IN_USE {
        if let Some(y) = crate::ops::cross_attention::cross_attention(q, k, v, heads)? {
            return Ok(y);
        }
    }
    if t == s && q.device().is_cpu() && !half {
        // self-attention on the CPU: one op each way, no head transposes
        return crate::ops::heads_attention(q, k, v, heads, &lens, false);
    }
    let split = |x: &Tensor, n: usize| -> Result<Tensor> {
        Ok(x.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?)
    };
    let (qh, kh, vh) = (split(q, t)?, split(k, s)?, split(v, s)?);
    let (qs, ks) = if upcast && half {
        (qh.to_dtype(DType::F32)?, kh.to_dtype(DType::F32)?)
    } else {
        (qh, kh)
    };
    let scores = qs.matmul(&ks.t()?)?;
    let p = crate::ops::masked_softmax(&scores, 1.0 / (d as f64).sqrt(), &lens, false)?;
    let a = p.to_dtype(vh.dtype())?.matmul(&vh)?;
    Ok(a.transpose(1, 2)?.reshape((b, t, inner))?)
}

/// What the forward profile files an attention's core under.
fn core_label(cross: bool) -> &'static str {
    match cross {
        true => "unet: cross-attention core",
        false => "unet: self-attention core",
    }
}

/// Whether [`attend`] takes the fused self-attention op for q (b, t, heads·d) and k: bf16 on
/// CUDA, as many keys as queries, scores not asked for in f32, and heads up to 128 wide (the
/// flash kernels, padded) or of an even width (wider heads: the op's cuBLAS path, unpadded).
fn fused_self_attention(q: &Tensor, k: &Tensor, heads: usize, upcast: bool) -> Result<bool> {
    let (_, t, inner) = q.dims3()?;
    let d = inner / heads;
    Ok(t == k.dim(1)?
        && !upcast
        && q.dtype() == DType::BF16
        && q.device().is_cuda()
        && (d <= 128 || d % 2 == 0))
}

/// Self-attention on CUDA in bf16 through the fused (flash) attention kernels, which take
/// heads of 64 or 128 (and 48 where [`crate::ops::FastPath::flash_48`] is on): each head
/// zero-padded to the next of those (zeros add nothing to q·k and give output columns that are
/// cut off), q scaled so that the kernels' 1/√(padded size) is the head's own 1/√d, and the
/// rotation the kernels apply made the identity (cos 1, sin 0).
/// The scores never exist in memory, forward or backward.
fn attend_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    fast: &crate::ops::FastPath,
) -> Result<Tensor> {
    let (b, t, inner) = q.dims3()?;
    let heads_of = PaddedHeads::new(inner / heads, fast);
    let ([qp, kp, vp], (cos, sin)) = heads_of.inputs(q, k, v)?;
    let y = crate::ops::attention_block(
        &qp,
        &kp,
        &vp,
        (&cos, &sin),
        (heads, heads),
        &vec![t; b],
        false,
        fast,
    )?;
    heads_of.unpad(&y)
}

/// Heads of `d` zero-padded to the fused kernels' size `hd` (48 with `flash_48`, 64, 80 with
/// `flash_80`, or 128); wider heads as they are (`hd` = d: the fused op runs them through
/// cuBLAS with the scores in memory, as SD 1.5's heads of 160 at its two lowest levels, which
/// are 16 × 16 and 8 × 8).
#[derive(Debug, Clone, Copy)]
struct PaddedHeads {
    d: usize,
    hd: usize,
}

impl PaddedHeads {
    fn new(d: usize, fast: &crate::ops::FastPath) -> Self {
        let hd = match d {
            ..=48 if fast.flash_48 => 48,
            ..=64 => 64,
            ..=80 if fast.flash_80 => 80,
            65..=128 => 128,
            _ => d,
        };
        Self { d, hd }
    }

    /// What q is multiplied by so that the kernels' 1/√hd is the head's own 1/√d (1 where the
    /// heads are not padded).
    fn q_scale(&self) -> f64 {
        (self.hd as f64 / self.d as f64).sqrt()
    }

    /// `x` times [`Self::q_scale`] (as it is where the heads are not padded).
    fn scaled(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.hd == self.d {
            true => Ok(x.clone()),
            false => x * self.q_scale(),
        }
    }

    /// The fused kernels' inputs for q, k, v (b, t, heads·d): q scaled, all three padded; and
    /// RoPE tables that rotate nothing (cos 1, sin 0), (t, hd).
    fn inputs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<([Tensor; 3], (Tensor, Tensor))> {
        let (t, dev) = (q.dim(1)?, q.device());
        let padded = [self.pad(&self.scaled(q)?)?, self.pad(k)?, self.pad(v)?];
        let rotation = (
            Tensor::ones((t, self.hd), DType::F32, dev)?,
            Tensor::zeros((t, self.hd), DType::F32, dev)?,
        );
        Ok((padded, rotation))
    }

    /// (b, t, heads·d) → (b, t, heads·hd), each head's columns past d zero (one op).
    fn pad(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::rows::resize_rows(x, self.d, self.hd)
    }

    /// (b, t, heads·hd) → (b, t, heads·d): each head's first d columns (one op).
    fn unpad(&self, y: &Tensor) -> Result<Tensor> {
        crate::ops::rows::resize_rows(y, self.hd, self.d)
    }
}

/// The attention inside a sublayer op ([`attention_sublayer_one_op`]), kept for its backward:
/// on the fused kernels (self-attention on padded heads, cross-attention to a short context)
/// their own forward and backward outside autograd; otherwise a small recorded graph on the
/// leaves q, k, v, run backward from the output's gradient.
enum KeptAttention {
    SelfFused {
        run: crate::ops::attention::FusedAttention,
        heads: PaddedHeads,
    },
    Cross {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        heads: usize,
    },
    Graph {
        qkv: [candle_core::Var; 3],
        out: Tensor,
    },
}

impl KeptAttention {
    /// softmax(q·kᵀ/√d)·v per head as [`attend`] computes it, on detached q, k, v.
    fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        upcast: bool,
    ) -> Result<(Tensor, Self)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        if fused_self_attention(&q, &k, heads, upcast)? {
            let (b, t, inner) = q.dims3()?;
            let fast = crate::ops::FastPath::default();
            let heads_of = PaddedHeads::new(inner / heads, &fast);
            let ([qp, kp, vp], (cos, sin)) = heads_of.inputs(&q, &k, &v)?;
            let run = crate::ops::attention::FusedAttention::forward(
                &qp,
                &kp,
                &vp,
                (&cos, &sin),
                (heads, heads),
                &vec![t; b],
                false,
                &fast,
            )?;
            if let Some(run) = run {
                let y = heads_of.unpad(run.output())?;
                let kept = KeptAttention::SelfFused {
                    run,
                    heads: heads_of,
                };
                return Ok((y, kept));
            }
        }
        if crate::ops::cross_attention::IN_USE {
            if let Some(y) = crate::ops::cross_attention::cross_attention(&q, &k, &v, heads)? {
                return Ok((y, KeptAttention::Cross { q, k, v, heads }));
            }
        }
        let qkv = [
            candle_core::Var::from_tensor(&q)?,
            candle_core::Var::from_tensor(&k)?,
            candle_core::Var::from_tensor(&v)?,
        ];
        let out = attend(
            qkv[0].as_tensor(),
            qkv[1].as_tensor(),
            qkv[2].as_tensor(),
            heads,
            upcast,
        )?;
        Ok((out.detach(), KeptAttention::Graph { qkv, out }))
    }

    /// (dq, dk, dv) for the output's gradient `g`; once.
    fn backward(&self, g: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let wrap = candle_core::Error::wrap;
        match self {
            KeptAttention::SelfFused { run, heads } => {
                let (dq, dk, dv) = run.backward(&heads.pad(g).map_err(wrap)?).map_err(wrap)?;
                let dq = heads.scaled(&heads.unpad(&dq).map_err(wrap)?)?;
                Ok((
                    dq,
                    heads.unpad(&dk).map_err(wrap)?,
                    heads.unpad(&dv).map_err(wrap)?,
                ))
            }
            KeptAttention::Cross { q, k, v, heads } => {
                crate::ops::cross_attention::cross_attention_backward(q, k, v, *heads, g)
                    .map_err(wrap)
            }
            KeptAttention::Graph { qkv, out } => {
                let grads = (out * g)?.sum_all()?.backward()?;
                let grad_of = |v: &candle_core::Var| {
                    grads.get(v.as_tensor()).cloned().ok_or_else(|| {
                        candle_core::Error::Msg("attention: no gradient for an input".into())
                    })
                };
                Ok((grad_of(&qkv[0])?, grad_of(&qkv[1])?, grad_of(&qkv[2])?))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: AdaptedLinear,
    ff_out: AdaptedLinear,
}

impl TransformerBlock {
    fn load(ld: &mut Loader, p: &str, s: &TransformerShape) -> Result<Self> {
        let dim = s.channels;
        let inner = 4 * dim;
        Ok(Self {
            norm1: ld.layer_norm(&format!("{p}.norm1"), dim, LAYER_NORM_EPS)?,
            attn1: Attention::load(ld, &format!("{p}.attn1"), s, dim)?,
            norm2: ld.layer_norm(&format!("{p}.norm2"), dim, LAYER_NORM_EPS)?,
            attn2: Attention::load(ld, &format!("{p}.attn2"), s, s.ctx_dim)?,
            norm3: ld.layer_norm(&format!("{p}.norm3"), dim, LAYER_NORM_EPS)?,
            ff_in: ld.adapted(&format!("{p}.ff.net.0.proj"), 2 * inner, dim, true)?,
            ff_out: ld.adapted(&format!("{p}.ff.net.2"), dim, inner, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let x = probe(x, "backward: autograd, self-attention sublayers")?;
        let x = attention_sublayer(&self.norm1, &self.attn1, &x, None)?;
        let x = probe(&x, "backward: autograd, cross-attention sublayers")?;
        let x = attention_sublayer(&self.norm2, &self.attn2, &x, Some(ctx))?;
        let x = probe(&x, "backward: autograd, feed-forward sublayers")?;
        let frozen = (
            self.ff_in.frozen_dense_weight(),
            self.ff_out.frozen_dense_weight(),
        );
        if let (true, (Some(w_in), Some(w_out))) = (tracked(&x) || recording(), frozen) {
            return self.feed_forward_one_op(&x, w_in, w_out);
        }
        if recording() {
            return Err(not_on_tape("a feed-forward with adapters"));
        }
        let y = (self.feed_forward(&x)? + x)?;
        mark_on(y.device(), "unet: feed-forward")?;
        Ok(y)
    }

    /// ff.net.2(GEGLU(ff.net.0.proj(norm3(x)))).
    fn feed_forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = self.norm3.forward(x)?;
        mark_on(n.device(), "unet: layer norms, residuals")?;
        let gated = crate::ops::geglu::geglu(&self.ff_in.forward(&n)?)?;
        self.ff_out.forward(&gated)
    }

    /// x + the feed-forward, computed outside autograd and tied to `x` by one op whose backward
    /// is written out ([`FeedForwardGrad`]), where neither of its linear layers trains (the
    /// default: adapters on the attention): candle's autograd would record the norm, both
    /// products, the GEGLU and the residual add, and give each a zero-filled gradient to add
    /// into (the GEGLU's input is 8 times the block's width).
    fn feed_forward_one_op(&self, x: &Tensor, w_in: &Tensor, w_out: &Tensor) -> Result<Tensor> {
        let xd = x.detach();
        let n = self.norm3.forward(&xd)?;
        mark_on(n.device(), "unet: layer norms, residuals")?;
        let pre = self.ff_in.forward(&n)?;
        mark_on(n.device(), "unet: feed-forward, products")?;
        let gated = crate::ops::geglu::geglu(&pre)?;
        mark_on(n.device(), "unet: feed-forward, GEGLU")?;
        let y = (self.ff_out.forward(&gated)? + &xd)?;
        let grad = FeedForwardGrad {
            norm: self.norm3.clone(),
            w_in: w_in.clone(),
            w_out: w_out.clone(),
            pre,
        };
        let y = tie(x, &y, grad)?;
        mark_on(y.device(), "unet: feed-forward")?;
        Ok(y)
    }

    fn linears<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        self.attn1.linears(out);
        self.attn2.linears(out);
        out.extend([&self.ff_in, &self.ff_out]);
    }

    fn linears_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        self.attn1.linears_mut(out);
        self.attn2.linears_mut(out);
        out.extend([&mut self.ff_in, &mut self.ff_out]);
    }
}

/// The input gradient of y = x + W_out·GEGLU(W_in·norm3(x) + b_in) + b_out, for [`tie`]:
///
/// dx = g + norm3ᵀ(GEGLUᵀ(g·W_out)·W_in), with normᵀ the LayerNorm's backward (its statistics
/// recomputed from x) and GEGLUᵀ the gate's (at its input, kept from the forward).
struct FeedForwardGrad {
    norm: LayerNorm,
    /// ff.net.0.proj's weight (2·inner, c) and ff.net.2's (c, inner)
    w_in: Tensor,
    w_out: Tensor,
    /// The GEGLU's input (b, t, 2·inner).
    pre: Tensor,
}

impl InputGradient for FeedForwardGrad {
    const NAME: &'static str = "unet-feed-forward";
    const PROFILE_LABEL: &'static str = "backward: feed-forward sublayers";

    fn input_grad(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        let wrap = candle_core::Error::wrap;
        let (b, t, c) = g.dims3()?;
        let m = b * t;
        let mark = |label| mark_on(g.device(), label).map_err(wrap);
        let d_gated = g.reshape((m, c))?.matmul(&self.w_out)?;
        mark("backward: feed-forward sublayers, products")?;
        let pre = self.pre.reshape((m, self.w_in.dim(0)?))?;
        let d_pre = crate::ops::geglu::geglu_backward(&pre, &d_gated).map_err(wrap)?;
        mark("backward: feed-forward sublayers, GEGLU")?;
        let d_n = d_pre.matmul(&self.w_in)?.reshape((b, t, c))?;
        mark("backward: feed-forward sublayers, products")?;
        let dx = self.norm.backward(&x.detach(), &d_n).map_err(wrap)?;
        dx + g
    }
}

/// Whether the transformers' attention sublayers, entries and exits run as one autograd op
/// each ([`attention_sublayer_one_op`], [`EntryGrad`], [`ExitGrad`]) instead of op by op. On
/// by default: the SD 1.5-shaped training step at batch 4 measures a few percent faster with
/// them on an H100 (a little slower at batch 1, where the launches dominate; docs/benchmarks.md
/// has the measurements); `singlora-lab bench-unet --recorded-sublayers` times the other way.
static ONE_OP_SUBLAYERS: AtomicBool = AtomicBool::new(true);

/// Switches [`ONE_OP_SUBLAYERS`] for this process.
pub fn set_one_op_sublayers(on: bool) {
    ONE_OP_SUBLAYERS.store(on, Ordering::Relaxed);
}

pub(crate) fn one_op_sublayers() -> bool {
    ONE_OP_SUBLAYERS.load(Ordering::Relaxed)
}

/// x + attn(norm(x), ctx): self-attention without `ctx`, cross-attention to it. One autograd
/// op ([`attention_sublayer_one_op`]) where that is switched on ([`set_one_op_sublayers`]),
/// `x` takes a gradient, `ctx` does not, and every projection can be taken apart; otherwise
/// recorded op by op.
pub fn attention_sublayer(
    norm: &LayerNorm,
    attn: &Attention,
    x: &Tensor,
    ctx: Option<&Tensor>,
) -> Result<Tensor> {
    if one_op_sublayers() && (tracked(x) || recording()) && !ctx.is_some_and(tracked) {
        if let Some(proj) = attn.low_rank(x.dtype())? {
            return attention_sublayer_one_op(norm, attn, proj, x, ctx);
        }
    }
    if recording() {
        return Err(not_on_tape(
            "an attention whose projections cannot be taken apart (DoRA, a quantised weight)",
        ));
    }
    let n = norm.forward(x)?;
    mark_on(n.device(), "unet: layer norms, residuals")?;
    Ok((attn.forward(&n, ctx)? + x)?)
}

/// [`attention_sublayer`] computed outside autograd and tied to `x` and the adapters' factors
/// by one op whose backward is written out ([`SublayerGrad`]): recorded op by op, the norm,
/// the four projections, the heads' layout changes around the attention and the residual add
/// would each give their inputs a zero-filled gradient to add into. The attention runs its
/// kernels' own forward and backward where it is on them ([`KeptAttention`]).
fn attention_sublayer_one_op(
    norm: &LayerNorm,
    attn: &Attention,
    proj: [LowRankLinear; 4],
    x: &Tensor,
    ctx: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let xd = x.detach();
    let n = norm.forward(&xd)?.reshape((b * t, c))?;
    mark_on(n.device(), "unet: layer norms, residuals")?;
    let (kv_in, s) = match ctx {
        Some(ctx) => {
            let (_, s, w) = ctx.dims3()?;
            (ctx.detach().reshape((b * s, w))?, s)
        }
        None => (n.clone(), t),
    };
    let heads3 = |y: Tensor, rows: usize| -> Result<Tensor> {
        let w = y.dim(1)?;
        Ok(y.reshape((b, rows, w))?)
    };
    let q = heads3(proj[0].forward(&n)?, t)?;
    let k = heads3(proj[1].forward(&kv_in)?, s)?;
    let v = heads3(proj[2].forward(&kv_in)?, s)?;
    mark_on(n.device(), "unet: attention projections")?;
    let (core, kept) = KeptAttention::forward(&q, &k, &v, attn.heads, attn.upcast)?;
    mark_on(n.device(), core_label(ctx.is_some()))?;
    let a = core.reshape((b * t, core.dim(2)?))?;
    let y = (proj[3].forward(&a)?.reshape((b, t, c))? + &xd)?;
    mark_on(n.device(), "unet: attention projections")?;
    let params = param_list(&proj);
    let grad = SublayerGrad {
        norm: norm.clone(),
        proj,
        n,
        kv_in: ctx.is_some().then_some(kv_in),
        a,
        attention: kept,
    };
    tie_params(x, &params, &y, grad)
}

/// The gradients of y = x + to_out(A(to_q(n), to_k(c), to_v(c))), n = norm(x), c = n (self-
/// attention) or the context, for [`tie_params`]:
///
/// da = to_outᵀ(g); (dq, dk, dv) = Aᵀ(da) ([`KeptAttention`]);
/// dn = to_qᵀ(dq), plus to_kᵀ(dk) and to_vᵀ(dv) for self-attention; dx = g + normᵀ(dn), with
/// linᵀ a projection's input gradient (its factors' gradients beside) and normᵀ the
/// LayerNorm's backward (statistics recomputed).
struct SublayerGrad {
    norm: LayerNorm,
    /// to_q, to_k, to_v, to_out.0
    proj: [LowRankLinear; 4],
    /// The norm's output (b·t, c).
    n: Tensor,
    /// The context (b·s, d_ctx) for cross-attention.
    kv_in: Option<Tensor>,
    /// The attention's output (b·t, inner).
    a: Tensor,
    attention: KeptAttention,
}

/// What the kernel profile files the attention sublayers' projections' backward under (the
/// products and their adapters' gradients).
const PROJECTIONS_BACKWARD: &str = "backward: attention sublayers, projections";

impl ParamsGradient for SublayerGrad {
    const NAME: &'static str = "unet-attention-sublayer";
    const PROFILE_LABEL: &'static str = "backward: attention sublayers";

    fn grads(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let wrap = candle_core::Error::wrap;
        let mark = |label| mark_on(g.device(), label).map_err(wrap);
        let (b, t, c) = g.dims3()?;
        let g2 = g.reshape((b * t, c))?;
        let (da, p_out) = self.proj[3]
            .backward_with_input(&self.a, &g2)
            .map_err(wrap)?;
        mark(PROJECTIONS_BACKWARD)?;
        let da = da.reshape((b, t, self.a.dim(1)?))?;
        let flat = |x: Tensor| -> candle_core::Result<Tensor> {
            let (xb, xt, xw) = x.dims3()?;
            x.reshape((xb * xt, xw))
        };
        let (dq, dk, dv) = self.attention.backward(&da)?;
        mark("backward: attention sublayers, attention and head layout")?;
        let (dq, dk, dv) = (flat(dq)?, flat(dk)?, flat(dv)?);
        let self_attention = self.kv_in.is_none();
        let kv_in = self.kv_in.as_ref().unwrap_or(&self.n);
        let (mut dn, p_q) = self.proj[0]
            .backward_with_input(&self.n, &dq)
            .map_err(wrap)?;
        let (dn_k, p_k) = self.proj[1]
            .backward(kv_in, &dk, self_attention)
            .map_err(wrap)?;
        let (dn_v, p_v) = self.proj[2]
            .backward(kv_in, &dv, self_attention)
            .map_err(wrap)?;
        for d in [dn_k, dn_v].into_iter().flatten() {
            dn = (dn + d)?;
        }
        mark(PROJECTIONS_BACKWARD)?;
        let dx = self
            .norm
            .backward(&x.detach(), &dn.reshape((b, t, c))?)
            .map_err(wrap)?;
        Ok(((dx + g)?, [p_q, p_k, p_v, p_out].concat()))
    }
}

/// The projections into and out of the transformer: linear layers adapters can go on, or
/// 1×1 convolutions (frozen, applied as the linear map they are on each position).
#[derive(Debug, Clone)]
enum Projection {
    Linear(AdaptedLinear),
    Conv(FrozenLinear),
}

impl Projection {
    fn load(ld: &mut Loader, p: &str, d_out: usize, d_in: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(ld.adapted(p, d_out, d_in, true)?)
        } else {
            Projection::Conv(ld.pointwise_conv(p, d_out, d_in)?)
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Projection::Linear(l) => l.forward(x),
            Projection::Conv(c) => Ok(c.forward(x)?),
        }
    }

    /// The projection taken apart for a one-op entry or exit on `x`, where one-op sublayers are
    /// switched on, `x` takes a gradient and the projection can be taken apart.
    fn one_op_parts(&self, x: &Tensor) -> Result<Option<LowRankLinear>> {
        match one_op_sublayers() && (tracked(x) || recording()) {
            true => self.low_rank(x.dtype()),
            false => Ok(None),
        }
    }

    /// Whether [`Self::low_rank`] takes the projection apart, without making copies.
    fn takes_apart(&self, dtype: DType) -> bool {
        match self {
            Projection::Linear(l) => l.takes_apart(dtype),
            Projection::Conv(c) => c
                .dense_weight()
                .is_some_and(|w| w.dtype() == dtype && w.is_contiguous()),
        }
    }

    /// The projection taken apart for a backward written out by hand, where it can be.
    fn low_rank(&self, dtype: DType) -> Result<Option<LowRankLinear>> {
        match self {
            // as_low_rank makes its own takes_apart check
            Projection::Linear(l) => l.as_low_rank(dtype),
            Projection::Conv(c) => {
                Ok(c.dense_weight()
                    .filter(|_| self.takes_apart(dtype))
                    .map(|w| LowRankLinear {
                        w0: w.clone(),
                        bias: c.bias().cloned(),
                        adapter: None,
                    }))
            }
        }
    }
}

/// The adapter variables of the projections that have adapters, in turn: the small tensors a
/// written-out backward hands gradients to ([`tie_params`]).
fn param_list<'a>(proj: impl IntoIterator<Item = &'a LowRankLinear>) -> Vec<Tensor> {
    proj.into_iter()
        .flat_map(|p| p.variables().iter().cloned())
        .collect()
}

/// (b, c, h, w) as the transformer's tokens (b, h·w, c), contiguous.
fn tokens_of(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
}

/// Tokens (b, h·w, c) as the image (b, c, h, w), contiguous.
fn image_of(t: &Tensor, (h, w): (usize, usize)) -> candle_core::Result<Tensor> {
    let (b, _, c) = t.dims3()?;
    t.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))
}

/// The gradients of the transformer's entry, tokens = proj_in(GroupNorm(x) as (b, h·w, c)),
/// for [`tie_params`]: dx = GroupNormᵀ(proj_inᵀ(g) as (b, c, h, w)).
struct EntryGrad {
    norm: GroupNorm,
    proj: LowRankLinear,
    /// The projection's input (b·h·w, c).
    tokens: Tensor,
}

impl ParamsGradient for EntryGrad {
    const NAME: &'static str = "unet-transformer-entry";
    const PROFILE_LABEL: &'static str = "backward: transformers' norm, proj_in, proj_out";

    fn grads(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let wrap = candle_core::Error::wrap;
        let (b, c, h, w) = x.dims4()?;
        let c_out = g.dim(2)?;
        let g2 = g.reshape((b * h * w, c_out))?;
        let (dt, dp) = self
            .proj
            .backward_with_input(&self.tokens, &g2)
            .map_err(wrap)?;
        let dn = image_of(&dt.reshape((b, h * w, c))?, (h, w))?;
        let dx = self.norm.backward(&x.detach(), &dn).map_err(wrap)?;
        Ok((dx, dp))
    }
}

/// The gradients of the transformer's exit before its residual add, y = proj_out(t) as
/// (b, c, h, w), for [`tie_params`]: dt = proj_outᵀ(g as (b, h·w, c)).
struct ExitGrad {
    proj: LowRankLinear,
}

impl ParamsGradient for ExitGrad {
    const NAME: &'static str = "unet-transformer-exit";
    const PROFILE_LABEL: &'static str = "backward: transformers' norm, proj_in, proj_out";

    fn grads(&self, t: &Tensor, g: &Tensor) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let wrap = candle_core::Error::wrap;
        let (b, c, h, w) = g.dims4()?;
        let g2 = tokens_of(g)?.reshape((b * h * w, c))?;
        let t2 = t.detach().reshape((b * h * w, t.dim(2)?))?;
        let (dt, dp) = self.proj.backward_with_input(&t2, &g2).map_err(wrap)?;
        Ok((dt.reshape(t.shape())?, dp))
    }
}

#[derive(Debug, Clone)]
pub struct Transformer2d {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

/// A transformer's shape: channels, context width, heads, blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransformerShape {
    pub channels: usize,
    pub ctx_dim: usize,
    pub heads: usize,
    pub layers: usize,
    pub linear_projection: bool,
    pub upcast: bool,
}

impl Transformer2d {
    pub(crate) fn load(ld: &mut Loader, p: &str, s: TransformerShape) -> Result<Self> {
        let c = s.channels;
        let groups = ld.cfg_groups;
        Ok(Self {
            norm: ld.group_norm(&format!("{p}.norm"), c, groups, GROUP_NORM_EPS)?,
            proj_in: Projection::load(ld, &format!("{p}.proj_in"), c, c, s.linear_projection)?,
            blocks: (0..s.layers)
                .map(|i| {
                    let bp = format!("{p}.transformer_blocks.{i}");
                    TransformerBlock::load(ld, &bp, &s)
                })
                .collect::<Result<_>>()?,
            proj_out: Projection::load(ld, &format!("{p}.proj_out"), c, c, s.linear_projection)?,
        })
    }

    /// `x` (b, c, h, w), `ctx` (b, s, ctx_dim) → (b, c, h, w).
    pub fn forward(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let x = &probe(x, "backward: autograd, transformers' norm, proj_in, layout")?;
        let mut t = self.entry(x)?;
        mark_on(t.device(), "unet: transformer norm, proj in/out")?;
        for block in &self.blocks {
            t = block.forward(&t, ctx)?;
        }
        let t = probe(
            &t,
            "backward: autograd, transformers' proj_out, layout, residual",
        )?;
        let y = tie::add(&self.exit(&t, x.dims4()?)?, x)?;
        mark_on(y.device(), "unet: transformer norm, proj in/out")?;
        Ok(y)
    }

    /// proj_in(GroupNorm(x) as (b, h·w, c)); one autograd op where that is switched on
    /// ([`set_one_op_sublayers`]), `x` takes a gradient and proj_in can be taken apart
    /// ([`EntryGrad`]): recorded op by op, the layout change's
    /// transpose, copy and reshapes would each give their inputs a zero-filled gradient to add
    /// into, one of them through a transposed view.
    fn entry(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = |x: &Tensor| -> Result<Tensor> { Ok(tokens_of(&self.norm.forward(x)?)?) };
        let Some(proj) = self.proj_in.one_op_parts(x)? else {
            if recording() {
                return Err(not_on_tape("a proj_in that cannot be taken apart"));
            }
            return self.proj_in.forward(&tokens(x)?);
        };
        let t = tokens(&x.detach())?.reshape((b * h * w, c))?;
        let y = proj.forward(&t)?;
        let y = y.reshape((b, h * w, y.dim(1)?))?;
        let params = param_list([&proj]);
        let grad = EntryGrad {
            norm: self.norm.clone(),
            proj,
            tokens: t,
        };
        tie_params(x, &params, &y, grad)
    }

    /// proj_out(t) as (b, c, h, w) for the transformer's input of `dims`; one autograd op where
    /// that is switched on, `t` takes a gradient and proj_out can be taken apart ([`ExitGrad`]).
    fn exit(&self, t: &Tensor, (b, c, h, w): (usize, usize, usize, usize)) -> Result<Tensor> {
        let Some(proj) = self.proj_out.one_op_parts(t)? else {
            if recording() {
                return Err(not_on_tape("a proj_out that cannot be taken apart"));
            }
            let y = self.proj_out.forward(t)?;
            return Ok(y.transpose(1, 2)?.reshape((b, c, h, w))?);
        };
        let y = proj.forward(&t.detach().reshape((b * h * w, t.dim(2)?))?)?;
        let y = image_of(&y.reshape((b, h * w, c))?, (h, w))?;
        let params = param_list([&proj]);
        tie_params(t, &params, &y, ExitGrad { proj })
    }

    /// Whether this transformer can run on a U-Net tape: its projections can be taken apart
    /// and its feed-forwards train nothing (checked without making the factors' copies: this
    /// runs every step).
    pub(crate) fn tape_ready(&self, dtype: DType) -> bool {
        let projections = [&self.proj_in, &self.proj_out]
            .iter()
            .all(|p| p.takes_apart(dtype));
        projections
            && self.blocks.iter().all(|b| {
                b.ff_in.frozen_dense_weight().is_some()
                    && b.ff_out.frozen_dense_weight().is_some()
                    && b.attn1.takes_apart(dtype)
                    && b.attn2.takes_apart(dtype)
            })
    }

    pub(crate) fn linears<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        if let Projection::Linear(l) = &self.proj_in {
            out.push(l);
        }
        for b in &self.blocks {
            b.linears(out);
        }
        if let Projection::Linear(l) = &self.proj_out {
            out.push(l);
        }
    }

    pub(crate) fn linears_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        if let Projection::Linear(l) = &mut self.proj_in {
            out.push(l);
        }
        for b in &mut self.blocks {
            b.linears_mut(out);
        }
        if let Projection::Linear(l) = &mut self.proj_out {
            out.push(l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The padded-head route to the fused kernels computes the heads' own attention: run here
    /// through the composed form the same op takes off CUDA (the kernels themselves are checked
    /// by `singlora-lab gpu-check`), values and input gradients, for heads narrower than 64
    /// (padded to 48, and to 64 without `flash_48`), between 64 and 80 (to 80, and to 128
    /// without `flash_80`), between 80 and 128, and wider (not padded).
    #[test]
    fn padded_heads_attend_as_the_heads_do() {
        let dev = Device::Cpu;
        let no_48 = crate::ops::FastPath {
            flash_48: false,
            ..Default::default()
        };
        let no_80 = crate::ops::FastPath {
            flash_80: false,
            ..Default::default()
        };
        for (heads, d, fast) in [
            (2, 5, no_48),
            (3, 80, Default::default()),
            (3, 72, Default::default()),
            (3, 72, no_80),
            (2, 40, Default::default()),
            (2, 100, Default::default()),
            (2, 160, Default::default()),
        ] {
            let (b, t) = (2, 7);
            let x = || Var::randn(0f64, 1.0, (b, t, heads * d), &dev).unwrap();
            let (q, k, v) = (x(), x(), x());
            let g = Tensor::randn(0f64, 1.0, (b, t, heads * d), &dev).unwrap();
            let a = attend_fused(&q, &k, &v, heads, &fast).unwrap();
            // the scores materialised: the composed path of `attend` (f64 takes it)
            let r = attend(&q, &k, &v, heads, true).unwrap();
            let err = (&a - &r).unwrap().abs().unwrap().max_all().unwrap();
            assert!(err.to_scalar::<f64>().unwrap() < 1e-12, "heads {heads}×{d}");
            let ga = (a * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (r * &g).unwrap().sum_all().unwrap().backward().unwrap();
            for x in [&q, &k, &v] {
                let e = (ga.get(x).unwrap() - gr.get(x).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap();
                assert!(e.to_scalar::<f64>().unwrap() < 1e-12, "heads {heads}×{d}");
            }
        }
    }

    /// The attention sublayer as one op against the same sublayer recorded op by op (f64 on
    /// the CPU): values, the input's gradient and every adapter variable's, for self- and
    /// cross-attention, SingLoRA and LoRA on all four projections and on q and v only; DoRA
    /// cannot be taken apart.
    #[test]
    fn one_op_sublayer_matches_the_recorded_one() {
        use crate::adapter::inject::inject;
        use crate::adapter::ramp::{RampClock, RampSchedule};
        use crate::adapter::target::TargetSpec;
        use crate::adapter::{AdapterKind, AdapterSpec};
        let dev = Device::Cpu;
        let (b, t, s, c, ctx_dim, heads) = (2, 6, 5, 8, 6, 2);
        let mut seed = 0u64;
        let mut rand = |dims: &[usize]| {
            seed += 1;
            let mut rng = crate::rng::rng_for(seed, "noise");
            crate::rng::normal(&mut rng, 0.5, dims, DType::F64, &dev).unwrap()
        };
        let lin = |name: &str, w: Tensor, bias: Option<Tensor>| {
            AdaptedLinear::new(name, FrozenLinear::new(w, bias))
        };
        for cross in [false, true] {
            let kv_dim = if cross { ctx_dim } else { c };
            for (kind, targets) in [
                (AdapterKind::SingLora, "to_q,to_k,to_v,to_out.0"),
                (AdapterKind::Lora, "to_q,to_k,to_v,to_out.0"),
                (AdapterKind::SingLora, "to_q,to_v"),
                (AdapterKind::Dora, "to_q,to_k,to_v,to_out.0"),
            ] {
                let mut attn = Attention {
                    to_q: lin("to_q", rand(&[c, c]), None),
                    to_k: lin("to_k", rand(&[c, kv_dim]), None),
                    to_v: lin("to_v", rand(&[c, kv_dim]), None),
                    to_out: lin("to_out.0", rand(&[c, c]), Some(rand(&[c]))),
                    heads,
                    upcast: false,
                };
                let norm = LayerNorm::new(rand(&[c]), rand(&[c]), 1e-5);
                let mut spec = AdapterSpec::new(kind, 2, 4.0);
                spec.dtype = DType::F64;
                let clock = RampClock::new(RampSchedule::none(), 0);
                let mut ls = vec![];
                attn.linears_mut(&mut ls);
                let chosen = TargetSpec::parse(targets, None).unwrap();
                inject(ls, &[], &spec, &chosen, &clock).unwrap();
                let mut ls = vec![];
                attn.linears(&mut ls);
                let vars: Vec<Var> = crate::adapter::params_of(ls)
                    .into_iter()
                    .map(|p| p.var)
                    .collect();
                // off the init (LoRA's B is zero), so every factor carries signal
                for v in &vars {
                    v.set(&(v.as_tensor() + rand(v.dims())).unwrap()).unwrap();
                }
                let x = Var::from_tensor(&rand(&[b, t, c])).unwrap();
                let ctx = rand(&[b, s, ctx_dim]);
                let ctx = cross.then_some(&ctx);
                let g = rand(&[b, t, c]);
                let Some(parts) = attn.low_rank(DType::F64).unwrap() else {
                    // DoRA's rescaled output is not of the one op's form
                    assert_eq!(kind, AdapterKind::Dora);
                    continue;
                };
                assert_ne!(kind, AdapterKind::Dora);
                let one = attention_sublayer_one_op(&norm, &attn, parts, &x, ctx).unwrap();
                let n = norm.forward(&x).unwrap();
                let rec = (attn.forward(&n, ctx).unwrap() + x.as_tensor()).unwrap();
                let diff = |a: &Tensor, b: &Tensor| {
                    let e = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                    e.to_scalar::<f64>().unwrap()
                };
                let what = format!("{kind:?} {targets:?} cross {cross}");
                assert!(diff(&one, &rec) < 1e-12, "{what}: values");
                let g1 = (one * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (rec * &g).unwrap().sum_all().unwrap().backward().unwrap();
                for v in vars.iter().chain([&x]) {
                    let (a, r) = (g1.get(v.as_tensor()), g2.get(v.as_tensor()));
                    let (a, r) = (a.expect("a gradient"), r.expect("a gradient"));
                    assert!(diff(a, r) < 1e-10, "{what}: gradient of {:?}", v.dims());
                }
            }
        }
    }
}
