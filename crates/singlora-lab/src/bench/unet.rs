//! A DreamBooth training step of a Stable Diffusion U-Net, timed: forward on noisy latents,
//! the ε-prediction MSE, backward into the adapters on the attention projections, AdamW.
//! The U-Net comes from a diffusers `unet/` folder (`bench/unet_step.py` writes a random
//! SD 1.5-shaped one); latents, timesteps, noise and text context are random.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use singlora::adapter::inject;
use singlora::adapter::ramp::{RampClock, RampSchedule};
use singlora::adapter::target::TargetSpec;
use singlora::adapter::{AdapterSpec, Method};
use singlora::diffusion::unet::UNet;
use singlora::error::Result;
use singlora::optim::{AdamW, AdamWConfig, GradAccumulator};

use super::llama::device_memory_used;

/// Per stage of a profiled step: label, device milliseconds, gaps, host milliseconds
/// ([`singlora::ops::prof::Stage`]).
pub type ProfileRows = Vec<(String, f64, usize, f64)>;

/// One configuration's timing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UNetBench {
    pub method: String,
    pub batch: usize,
    pub latent: usize,
    pub context: usize,
    pub trainable_params: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub images_per_s: f64,
    pub peak_memory_gib: Option<f64>,
    /// Median of a forward alone (no backward, no update).
    pub forward_ms: f64,
    /// With `profile` on CUDA: per stage of one step (forward by block kind, then the loss,
    /// the backward and the update), milliseconds and how many gaps it had.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileRows>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Times `steps` training steps after `warmup` at batch `batch` with a rank-`rank` `method`
/// adapter on `targets`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    unet_dir: &Path,
    method: Method,
    rank: usize,
    targets: &str,
    batch: usize,
    (latent, context_len): (usize, usize),
    (warmup, steps): (usize, usize),
    device: &Device,
    profile: bool,
) -> Result<UNetBench> {
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let mut unet = UNet::load(unet_dir, dtype, device)?;
    let spec = AdapterSpec {
        rslora: method.uses_rslora(),
        ..AdapterSpec::new(method.kind(), rank, rank as f64)
    };
    let clock = RampClock::new(RampSchedule::none(), 0);
    let targets = TargetSpec::parse(targets, None)?;
    inject::inject(unet.linears_mut(), &[], &spec, &targets, &clock)?;
    let params = singlora::adapter::params_of(unet.linears());
    let trainable_params = params.iter().map(|p| p.var.elem_count()).sum();
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            lr: 1e-4,
            lora_plus_ratio: method.b_lr_ratio(16.0),
            ..Default::default()
        },
    )
    .with_clock(clock.clone());
    let mut acc = GradAccumulator::new(opt.vars());
    let c = unet.cfg.in_channels;
    let ctx_dim = unet.cfg.cross_attention_dim[0];
    let x = Tensor::randn(0f32, 1.0, (batch, c, latent, latent), device)?.to_dtype(dtype)?;
    let noise = Tensor::randn(0f32, 1.0, (batch, c, latent, latent), device)?;
    let ctx = Tensor::randn(0f32, 1.0, (batch, context_len, ctx_dim), device)?.to_dtype(dtype)?;
    let t = Tensor::new(
        (0..batch)
            .map(|i| (100 + 397 * i) as f32 % 1000.0)
            .collect::<Vec<_>>(),
        device,
    )?;
    let mut times = vec![];
    let mut peak = 0u64;
    for i in 0..warmup + steps {
        device.synchronize()?;
        let t0 = Instant::now();
        train_step(
            &unet,
            (&x, &t, &ctx, &noise),
            &mut opt,
            &mut acc,
            &mut |_| Ok(()),
        )?;
        device.synchronize()?;
        if let Some(m) = device_memory_used(device) {
            peak = peak.max(m);
        }
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median_ms = median(times.clone());
    let mut fwd = vec![];
    for _ in 0..steps.max(1) {
        device.synchronize()?;
        let t0 = Instant::now();
        let pred = unet.forward(&x, &t, &ctx, None)?;
        device.synchronize()?;
        drop(pred);
        fwd.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let profile = if profile {
        profile_step(&unet, (&x, &t, &ctx, &noise), &mut opt, &mut acc, device)?
    } else {
        None
    };
    Ok(UNetBench {
        method: method.to_string(),
        batch,
        latent,
        context: context_len,
        trainable_params,
        median_ms,
        min_ms: times.iter().cloned().fold(f64::INFINITY, f64::min),
        images_per_s: batch as f64 / (median_ms / 1e3),
        peak_memory_gib: (peak > 0).then(|| peak as f64 / (1u64 << 30) as f64),
        forward_ms: median(fwd),
        profile,
    })
}

#[cfg(feature = "cuda")]
const BACKWARD: &str = singlora::ops::prof::OTHER_BACKWARD;
#[cfg(not(feature = "cuda"))]
const BACKWARD: &str = "autograd backward";

/// One DreamBooth training step: the ε-prediction MSE, its backward into the adapters, an
/// AdamW update; `mark(stage)` after the loss, the backward (the part after the last
/// self-marking op's backward) and the update.
fn train_step(
    unet: &UNet,
    (x, t, ctx, noise): (&Tensor, &Tensor, &Tensor, &Tensor),
    opt: &mut AdamW,
    acc: &mut GradAccumulator,
    mark: &mut dyn FnMut(&'static str) -> Result<()>,
) -> Result<()> {
    let loss = |pred: &Tensor| -> singlora::Result<(Tensor, ())> {
        Ok(((pred.to_dtype(DType::F32)? - noise)?.sqr()?.mean_all()?, ()))
    };
    let (_, grads) = unet.taped_step((x, t, ctx, None), loss)?;
    mark(BACKWARD)?;
    acc.add(&grads)?;
    opt.step(acc, 1e-4, Some(1.0))?;
    mark("adamw")
}

/// [`train_step`] with the CUDA timing marks on: the forward's blocks mark themselves, the
/// step the loss, the backward and the update. None off CUDA.
#[cfg(feature = "cuda")]
fn profile_step(
    unet: &UNet,
    (x, t, ctx, noise): (&Tensor, &Tensor, &Tensor, &Tensor),
    opt: &mut AdamW,
    acc: &mut GradAccumulator,
    device: &Device,
) -> Result<Option<ProfileRows>> {
    use singlora::ops::prof;
    let Device::Cuda(d) = device else {
        return Ok(None);
    };
    device.synchronize()?;
    prof::enable(true);
    let r = (|| -> Result<ProfileRows> {
        prof::mark(d, "start")?;
        let mut mark = |stage| Ok(prof::mark(d, stage)?);
        train_step(unet, (x, t, ctx, noise), opt, acc, &mut mark)?;
        device.synchronize()?;
        Ok(prof::take()?
            .into_iter()
            .map(|s| (s.label.to_string(), s.ms, s.count, s.host_ms))
            .collect())
    })();
    prof::enable(false);
    r.map(Some)
}

#[cfg(not(feature = "cuda"))]
fn profile_step(
    _: &UNet,
    _: (&Tensor, &Tensor, &Tensor, &Tensor),
    _: &mut AdamW,
    _: &mut GradAccumulator,
    _: &Device,
) -> Result<Option<ProfileRows>> {
    Ok(None)
}

/// Forward and forward + backward milliseconds (medians of 5 after 2 warm-ups) of the U-Net's
/// building blocks at Stable Diffusion 1.5's first level (320 channels, a 64×64 latent, 8 heads
/// of 40, a 77 × 768 context) at batch `batch`, frozen weights, the gradient to the input only:
/// where a step's time goes, part by part.
pub fn components(batch: usize, device: &Device) -> Result<Vec<(String, f64, f64)>> {
    use singlora::diffusion::unet::attention::attend;
    use singlora::diffusion::unet::blocks::upsample2;
    use singlora::diffusion::unet::conv::Conv2d;
    use singlora::diffusion::unet::norm::{GroupNorm, LayerNorm};
    let dt = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let (c, side, t, s, heads) = (320usize, 64usize, 64 * 64usize, 77usize, 8usize);
    let rnd = |shape: &[usize], std: f32| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, std, shape, device)?.to_dtype(dt)?)
    };
    let ones = Tensor::ones(c, dt, device)?;
    let zeros = Tensor::zeros(c, dt, device)?;
    let gn = GroupNorm::new(ones.clone(), zeros.clone(), 32, 1e-5);
    let ln = LayerNorm::new(ones, zeros, 1e-5);
    let w3 = rnd(&[c, c, 3, 3], 0.02)?;
    let conv = Conv2d::new(w3.clone(), Some(rnd(&[c], 0.02)?), 1, 1);
    let gemm_only = Conv2d::new(rnd(&[c, 9 * c, 1, 1], 0.02)?, None, 1, 0);
    let down = Conv2d::new(rnd(&[c, c, 3, 3], 0.02)?, Some(rnd(&[c], 0.02)?), 2, 1);
    let w_ff = rnd(&[2 * 4 * c, c], 0.02)?;
    let w_out = rnd(&[c, 4 * c], 0.02)?;
    let image = vec![batch, c, side, side];
    let seq = vec![batch, t, c];
    let ctx = vec![batch, s, c];
    type Part<'a> = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>;
    let parts: Vec<(&str, Vec<Vec<usize>>, Part)> = vec![
        (
            "GroupNorm + SiLU (b, 320, 64, 64)",
            vec![image.clone()],
            Box::new(|x| Ok(gn.forward(&x[0])?.silu()?)),
        ),
        (
            "conv 3x3, 320 -> 320, 64x64",
            vec![image.clone()],
            Box::new(|x| conv.forward(&x[0])),
        ),
        (
            // the 3×3 convolution's GEMM alone (the same m, n, k), without its im2col
            "conv 1x1, 2880 -> 320, 64x64 (the GEMM of the 3x3's)",
            vec![vec![batch, 9 * c, side, side]],
            Box::new(|x| gemm_only.forward(&x[0])),
        ),
        (
            "conv 3x3, 320 -> 320, 64x64 (candle's conv2d)",
            vec![image.clone()],
            Box::new(|x| Ok(x[0].conv2d(&w3, 1, 1, 1, 1)?)),
        ),
        (
            "conv 3x3 stride 2 (downsample)",
            vec![image.clone()],
            Box::new(|x| down.forward(&x[0])),
        ),
        (
            "upsample x2 (candle's nearest)",
            vec![vec![batch, c, side / 2, side / 2]],
            Box::new(|x| Ok(x[0].upsample_nearest2d(side, side)?)),
        ),
        (
            "upsample x2 (the U-Net's)",
            vec![vec![batch, c, side / 2, side / 2]],
            Box::new(|x| upsample2(&x[0])),
        ),
        (
            "LayerNorm (b, 4096, 320)",
            vec![seq.clone()],
            Box::new(|x| ln.forward(&x[0])),
        ),
        (
            "self-attention core, 4096 tokens",
            vec![seq.clone(); 3],
            Box::new(|x| attend(&x[0], &x[1], &x[2], heads, false)),
        ),
        (
            "cross-attention core, 4096 x 77",
            vec![seq.clone(), ctx.clone(), ctx],
            Box::new(|x| attend(&x[0], &x[1], &x[2], heads, false)),
        ),
        (
            "GEGLU feed-forward (frozen)",
            vec![seq],
            Box::new(|x| {
                let h = x[0].broadcast_matmul(&w_ff.t()?)?;
                let inner = h.dim(2)? / 2;
                let g = (h.narrow(2, 0, inner)? * h.narrow(2, inner, inner)?.gelu_erf()?)?;
                Ok(g.broadcast_matmul(&w_out.t()?)?)
            }),
        ),
        (
            "residual add (b, 320, 64, 64)",
            vec![image.clone(), image],
            Box::new(|x| Ok((&x[0] + &x[1])?)),
        ),
    ];
    let mut out = vec![];
    for (name, shapes, f) in parts {
        let xs: Vec<candle_core::Var> = shapes
            .iter()
            .map(|sh| Ok(candle_core::Var::from_tensor(&rnd(sh, 1.0)?)?))
            .collect::<Result<_>>()?;
        let ts: Vec<Tensor> = xs.iter().map(|v| v.as_tensor().clone()).collect();
        let time = |backward: bool| -> Result<f64> {
            let mut v = vec![];
            for i in 0..7 {
                device.synchronize()?;
                let t0 = Instant::now();
                let y = f(&ts)?;
                if backward {
                    let g = y.to_dtype(DType::F32)?.sqr()?.mean_all()?.backward()?;
                    drop(g);
                }
                device.synchronize()?;
                if i >= 2 {
                    v.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok(median(v))
        };
        let fwd = time(false)?;
        let both = time(true)?;
        out.push((name.to_string(), fwd, both));
    }
    Ok(out)
}
