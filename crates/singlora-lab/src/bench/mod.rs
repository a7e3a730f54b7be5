//! Benchmarks (never timed in tests): a training step of a real or generated model, timed after
//! warm-up, median of several steps.

pub mod llama;
pub mod profile;
pub mod unet;

use std::time::Instant;

use candle_core::Device;

use singlora::data::{collate, Batch, Encoded};
use singlora::error::Result;
use singlora::model::TaskModel;
use singlora::optim::{AdamW, AdamWConfig, GradAccumulator};

/// Timing of repeated training steps.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepTiming {
    pub steps: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub tokens_per_step: usize,
    pub tokens_per_s: f64,
    /// Medians of the forward, backward and optimizer parts.
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
}

/// The middle value (the upper one of an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Synthetic batch: `b` rows of `t` random token ids below `vocab`, all real.
pub fn random_batch(
    b: usize,
    t: usize,
    vocab: usize,
    n_labels: usize,
    device: &Device,
) -> Result<Batch> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let items: Vec<Encoded> = (0..b)
        .map(|i| Encoded {
            ids: (0..t).map(|_| (next() % vocab as u64) as u32).collect(),
            type_ids: vec![0; t],
            label: Some(i % n_labels.max(1)),
            target_mask: vec![0; t],
        })
        .collect();
    let idx: Vec<usize> = (0..b).collect();
    collate(&items, &idx, 0, device)
}

/// Forward, backward and AdamW update, `warmup` untimed then `steps` timed.
pub fn time_steps(
    model: &TaskModel,
    batch: &Batch,
    warmup: usize,
    steps: usize,
    sync: impl FnMut() -> Result<()>,
) -> Result<StepTiming> {
    time_steps_in(model, batch, warmup, steps, sync, None)
}

/// [`time_steps`] as one rank of a data-parallel group: the adapter gradients are summed over
/// the ranks (overlapping the backward where the transport can) before each update.
pub fn time_steps_in(
    model: &TaskModel,
    batch: &Batch,
    warmup: usize,
    steps: usize,
    mut sync: impl FnMut() -> Result<()>,
    group: Option<&dyn singlora::dist::Collective>,
) -> Result<StepTiming> {
    let mut opt =
        AdamW::new(model.params(), AdamWConfig::default()).with_clock(model.clock.clone());
    let vars = opt.vars();
    let mut acc = GradAccumulator::new(opt.vars());
    model.clock.set_training(true);
    let (mut times, mut fwd, mut bwd, mut upd) = (vec![], vec![], vec![], vec![]);
    for i in 0..warmup + steps {
        sync()?;
        let t0 = Instant::now();
        // forward and backward timed together where the model runs them as one (the CUDA
        // LLaMA path); the split is then forward = loss only, on the autograd path
        let (_loss, mut grads, summed) =
            model.loss_and_grads_synced(batch, 1.0, group.and_then(|g| g.as_grad_sync()))?;
        if let Some(g) = group {
            singlora::dist::all_reduce_grads(&vars, &mut grads, &summed, g)?;
        }
        sync()?;
        let t1 = Instant::now();
        acc.add(&grads)?;
        sync()?;
        let t2 = Instant::now();
        opt.step(&mut acc, 1e-4, None)?;
        sync()?;
        let t3 = Instant::now();
        if i >= warmup {
            times.push((t3 - t0).as_secs_f64() * 1e3);
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
            upd.push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    model.clock.set_training(false);
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let median_ms = median(times);
    Ok(StepTiming {
        steps,
        median_ms,
        min_ms: min,
        tokens_per_step: batch.n_tokens,
        tokens_per_s: batch.n_tokens as f64 / (median_ms / 1e3),
        forward_ms: median(fwd),
        backward_ms: median(bwd),
        optimizer_ms: median(upd),
    })
}
