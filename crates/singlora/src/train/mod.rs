//! The trainer: `singlora train`.
//!
//! AdamW on the adapters (and a classification head), gradient accumulation, warm-up and a
//! decay schedule, global-norm clipping, evaluation, atomic checkpoints with the optimizer and
//! data position (so `--resume` continues exactly: on the CPU a resumed run ends with a
//! bit-identical adapter), `metrics.jsonl`, `curves.svg`, the final adapter and the best one by
//! eval loss. SingLoRA's ramp clock advances once per optimizer update. Progress goes to an
//! [`Observer`]; several devices train data-parallel ([`crate::dist`]).
//!
//! - [`config`]: the typed settings ([`TrainConfig`], saved as `run.json`);
//! - [`setup`]: model, adapters, data and the [`Plan`];
//! - [`run`]: one rank's loop; [`state`]: checkpoints; [`schedule`]: learning rates;
//! - [`observer`]: how a run reports and hears that it should stop.

pub mod config;
pub mod observer;
mod run;
pub mod rundir;
pub mod schedule;
pub mod setup;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use config::TrainConfig;
pub use observer::{Observer, Silent, UpdateReport};
pub use setup::{prepare_data, setup, Plan, PreparedData, Setup};

use crate::error::{Error, Result};
use crate::eval::EvalResult;
use run::{RankCtx, Start, Trainer};
use rundir::RunDir;

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub total_steps: u64,
    pub interrupted: bool,
    pub final_eval: Option<EvalResult>,
    pub baseline_eval: Option<EvalResult>,
    pub trainable_params: usize,
    pub adapted: Vec<String>,
    pub train_loss: Option<f64>,
}

/// Runs (or resumes) training into `out`: on one device, or data-parallel over
/// `cfg.devices` (one thread per device; a failure on any rank ends the run with its error).
/// `resume` continues the run in `out` with the settings in its `run.json` (the caller's
/// `stop_after` and `fast` kept); `overwrite` replaces an existing `out`.
pub fn train(
    cfg: TrainConfig,
    out: &Path,
    resume: bool,
    overwrite: bool,
    observer: Arc<dyn Observer>,
) -> Result<TrainSummary> {
    let held = if resume {
        let held = RunDir::resume(out)?;
        if !held.cleaned.is_empty() {
            observer.cleaned(&held.cleaned);
        }
        Some(held)
    } else {
        None
    };
    let cfg = if resume {
        let p = out.join("run.json");
        let saved = crate::checkpoint::read_json(&p)?;
        let mut c: TrainConfig = serde_json::from_value(saved["config"].clone())
            .map_err(|e| Error::bad_file(&p, format!("is not a run description: {e}")))?;
        c.stop_after = cfg.stop_after;
        c.fast = cfg.fast;
        c
    } else {
        if out.exists() && !overwrite {
            return Err(Error::msg(format!(
                "{} already exists; pass --resume to continue that run or --overwrite to replace it",
                out.display()
            )));
        }
        let mut inputs = vec![("--model", cfg.model.as_path()), ("--train", &cfg.train)];
        inputs.extend(cfg.eval.as_deref().map(|e| ("--eval", e)));
        crate::atomic::check_disjoint(out, &inputs)?;
        crate::atomic::check_replaceable(out, overwrite)?;
        cfg
    };
    // rank 0 holds the run directory (a resumed one now, a fresh one once set up)
    let mut held = held;
    let mut start = |rank: usize| match (resume, rank) {
        (true, 0) => Start::Resume(held.take()),
        (true, _) => Start::Resume(None),
        (false, _) => Start::Fresh { overwrite },
    };
    let devices = cfg.rank_devices();
    if devices.len() == 1 {
        let mut cfg = cfg;
        cfg.device = devices[0];
        return Trainer::start(cfg, out, start(0), None, observer.as_ref())?.run();
    }
    let world = devices.len();
    if cfg.batch_size < world {
        return Err(Error::msg(format!(
            "--batch-size {} is smaller than the {world} devices: it is the global batch, split over them",
            cfg.batch_size
        )));
    }
    let makers = crate::dist::group_makers(&devices, cfg.bucket_values)?;
    let (tx, rx) = std::sync::mpsc::channel();
    for (rank, (dev, make)) in devices.iter().zip(makers).enumerate() {
        let mut c = cfg.clone();
        c.device = *dev;
        let obs: Arc<dyn Observer> = if rank == 0 {
            observer.clone()
        } else {
            Arc::new(StopOnly(observer.clone()))
        };
        let (tx, out) = (tx.clone(), out.to_path_buf());
        let first = start(rank);
        std::thread::Builder::new()
            .name(format!("rank {rank}"))
            .spawn(move || {
                let ctx = RankCtx { rank, world, make };
                let r =
                    Trainer::start(c, &out, first, Some(ctx), obs.as_ref()).and_then(Trainer::run);
                let _ = tx.send((rank, r));
            })
            .map_err(|e| Error::msg(format!("could not start rank {rank}: {e}")))?;
    }
    drop(tx);
    let mut lead = None;
    for _ in 0..world {
        // a rank that fails ends the run at once (the others may wait on it for ever)
        let (rank, r) = rx
            .recv()
            .map_err(|_| Error::msg("a rank ended without a result"))?;
        match r {
            Ok(sum) if rank == 0 => lead = Some(sum),
            Ok(_) => {}
            Err(e) => {
                return Err(Error::msg(format!(
                    "rank {rank} ({}) failed: {e}",
                    devices[rank]
                )))
            }
        }
    }
    lead.ok_or_else(|| Error::msg("rank 0 ended without a result"))
}

/// The observer of ranks other than the first: they report nothing but hear a stop.
struct StopOnly(Arc<dyn Observer>);

impl Observer for StopOnly {
    fn stop_requested(&self) -> bool {
        self.0.stop_requested()
    }
}
