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
use crate::ops::FastPath;
pub(crate) use run::write_adapter_in_place;
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

/// What may change when a run resumes; everything else is the run's, from its `run.json`.
#[derive(Debug, Clone, Default)]
pub struct ResumeChanges {
    /// Train to this many updates in all (a longer or shorter run).
    pub max_steps: Option<u64>,
    /// Train for this many epochs in all (when the run is not bounded by `max_steps`).
    pub epochs: Option<usize>,
    pub save_every: Option<u64>,
    pub save_minutes: Option<f64>,
    pub keep_checkpoints: Option<usize>,
    pub eval_every: Option<u64>,
    /// Continue on another device, or other devices.
    pub device: Option<crate::device::DeviceSpec>,
    pub devices: Option<Vec<crate::device::DeviceSpec>>,
    pub recompute: Option<bool>,
    pub recompute_layers: Option<bool>,
    /// Stop after this many updates in all, as if interrupted (tests).
    pub stop_after: Option<u64>,
    pub fast: FastPath,
}

impl ResumeChanges {
    /// The settings (by `run.json` key) that may change on resume.
    pub const KEYS: [&'static str; 10] = [
        "max_steps",
        "epochs",
        "save_every",
        "save_minutes",
        "keep_checkpoints",
        "eval_every",
        "device",
        "devices",
        "recompute",
        "recompute_layers",
    ];

    fn apply(&self, c: &mut TrainConfig) {
        if let Some(n) = self.max_steps {
            c.max_steps = Some(n);
        }
        if let Some(n) = self.epochs {
            c.epochs = n;
        }
        if let Some(n) = self.save_every {
            c.save_every = Some(n);
        }
        if let Some(m) = self.save_minutes {
            c.save_minutes = m;
        }
        if let Some(n) = self.keep_checkpoints {
            c.keep_checkpoints = n;
        }
        if let Some(n) = self.eval_every {
            c.eval_every = Some(n);
        }
        if let Some(d) = self.device {
            c.device = d;
            c.devices = None;
        }
        if let Some(d) = &self.devices {
            c.devices = Some(d.clone());
        }
        if let Some(r) = self.recompute {
            c.recompute = r;
        }
        if let Some(r) = self.recompute_layers {
            c.recompute_layers = r;
        }
        c.stop_after = self.stop_after;
        c.fast = self.fast;
    }
}

/// The settings of the run in `out`, from its `run.json`.
pub fn run_config(out: &Path) -> Result<TrainConfig> {
    let p = out.join("run.json");
    let saved = crate::checkpoint::read_json(&p)?;
    serde_json::from_value(saved["config"].clone())
        .map_err(|e| Error::bad_file(&p, format!("is not a run description: {e}")))
}

/// The run directory an adapter directory belongs to: the run itself, its `best/` or one of
/// its `checkpoints/step-N/`; None for an adapter outside a run.
pub fn run_of_adapter(adapter: &Path) -> Option<PathBuf> {
    let is_run = |d: &Path| d.join("run.json").is_file();
    let parent = adapter.parent();
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    if is_run(adapter) {
        return Some(adapter.to_path_buf());
    }
    let up = match name(adapter).as_deref() {
        Some("best") => parent,
        Some(n) if n.starts_with("step-") => parent
            .filter(|p| name(p).as_deref() == Some("checkpoints"))
            .and_then(Path::parent),
        _ => None,
    }?;
    is_run(up).then(|| up.to_path_buf())
}

/// Trains a fresh run into `out`: on one device, or data-parallel over `cfg.devices` (one
/// thread per device; a failure on any rank ends the run with its error). `overwrite`
/// replaces an existing run there.
pub fn train(
    cfg: TrainConfig,
    out: &Path,
    overwrite: bool,
    observer: Arc<dyn Observer>,
) -> Result<TrainSummary> {
    // one process of a launched group: rank 0 checks and creates the run directory
    let launch = crate::dist::launch::from_env()?;
    if let Some(l) = launch.clone().filter(|l| l.rank != 0) {
        return run_launched(cfg, out, Start::Fresh { overwrite }, observer, l);
    }
    if out.exists() && !overwrite {
        return Err(Error::msg(format!(
            "{} already exists; pass --resume to continue that run or --overwrite to replace it",
            out.display()
        )));
    }
    if cfg.model.as_os_str().is_empty() || cfg.train.as_os_str().is_empty() {
        return Err(Error::msg("a run needs --model and --train"));
    }
    let mut inputs = vec![("--model", cfg.model.as_path()), ("--train", &cfg.train)];
    inputs.extend(cfg.eval.as_deref().map(|e| ("--eval", e)));
    crate::atomic::check_disjoint(out, &inputs)?;
    crate::atomic::check_replaceable(out, overwrite)?;
    run(cfg, out, |_| Start::Fresh { overwrite }, observer, launch)
}

/// Resumes the run in `out` from its newest complete checkpoint, with the settings of its
/// `run.json` and `changes` applied.
pub fn resume(
    out: &Path,
    changes: &ResumeChanges,
    observer: Arc<dyn Observer>,
) -> Result<TrainSummary> {
    // one process of a launched group: rank 0 holds the run directory
    let launch = crate::dist::launch::from_env()?;
    if let Some(l) = launch.clone().filter(|l| l.rank != 0) {
        let mut cfg = run_config(out)?;
        changes.apply(&mut cfg);
        return run_launched(cfg, out, Start::Resume(None), observer, l);
    }
    let held = RunDir::resume(out)?;
    if !held.cleaned.is_empty() {
        observer.cleaned(&held.cleaned);
    }
    let mut cfg = run_config(out)?;
    changes.apply(&mut cfg);
    // rank 0 holds the run directory
    let mut held = Some(held);
    run(cfg, out, |_| Start::Resume(held.take()), observer, launch)
}

/// Runs the ranks; `start` gives each rank (in order, rank 0 first) how it starts. `launch`:
/// this process is rank 0 of a launched group.
fn run(
    cfg: TrainConfig,
    out: &Path,
    mut start: impl FnMut(usize) -> Start,
    observer: Arc<dyn Observer>,
    launch: Option<crate::dist::launch::Launch>,
) -> Result<TrainSummary> {
    if let Some(l) = launch {
        return run_launched(cfg, out, start(0), observer, l);
    }
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

/// How long the ranks of a launched group wait for each other to arrive (they load the model
/// first): `SINGLORA_RENDEZVOUS_TIMEOUT` seconds, default 600.
fn rendezvous_timeout() -> std::time::Duration {
    let s = std::env::var("SINGLORA_RENDEZVOUS_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(600);
    std::time::Duration::from_secs(s.max(1))
}

/// This process's rank of a group a launcher started (torchrun, srun, mpirun): the device its
/// local rank names (`--device cuda` becomes `cuda:LOCAL_RANK`, NCCL joined through rank 0's
/// TCP rendezvous) or the CPU (reductions over the rendezvous' connections).
fn run_launched(
    cfg: TrainConfig,
    out: &Path,
    start: Start,
    observer: Arc<dyn Observer>,
    l: crate::dist::launch::Launch,
) -> Result<TrainSummary> {
    use crate::device::DeviceSpec;
    if cfg.devices.is_some() {
        return Err(Error::msg(format!(
            "--devices with {}: a launched group runs one process per device; give --device cuda \
             (each process takes the GPU of its LOCAL_RANK) or cpu",
            l.launcher
        )));
    }
    if cfg.batch_size < l.world {
        return Err(Error::msg(format!(
            "--batch-size {} is smaller than the {} processes: it is the global batch, split over them",
            cfg.batch_size, l.world
        )));
    }
    let mut cfg = cfg;
    cfg.device = match cfg.device {
        DeviceSpec::Cpu => DeviceSpec::Cpu,
        DeviceSpec::Cuda(_) => DeviceSpec::Cuda(l.local_rank),
    };
    let (rank, world) = (l.rank, l.world);
    let timeout = rendezvous_timeout();
    let make: crate::dist::MakeCollective = if cfg.device.is_cpu() {
        Box::new(move |_| {
            let g = crate::dist::tcp::TcpGroup::join(&l, timeout)?;
            Ok(Box::new(g) as Box<dyn crate::dist::Collective>)
        })
    } else {
        crate::dist::launched_nccl(l, timeout, cfg.bucket_values)
    };
    let obs: Arc<dyn Observer> = if rank == 0 {
        observer
    } else {
        Arc::new(StopOnly(observer))
    };
    let ctx = RankCtx { rank, world, make };
    Trainer::start(cfg, out, start, Some(ctx), obs.as_ref())?.run()
}

/// The observer of ranks other than the first: they report nothing but hear a stop.
struct StopOnly(Arc<dyn Observer>);

impl Observer for StopOnly {
    fn stop_requested(&self) -> bool {
        self.0.stop_requested()
    }
}
