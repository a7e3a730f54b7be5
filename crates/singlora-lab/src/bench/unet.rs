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
    let params: Vec<_> = unet
        .linears()
        .iter()
        .filter_map(|l| l.adapter())
        .flat_map(|a| a.params())
        .collect();
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
        let pred = unet.forward(&x, &t, &ctx, None)?.to_dtype(DType::F32)?;
        let loss = (pred - &noise)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        acc.add(&grads)?;
        opt.step(&mut acc, 1e-4, Some(1.0))?;
        device.synchronize()?;
        if let Some(m) = device_memory_used(device) {
            peak = peak.max(m);
        }
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median_ms = median(times.clone());
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
    })
}
