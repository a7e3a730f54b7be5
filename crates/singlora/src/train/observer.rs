//! How a run reports what it does. The library never prints: the trainer calls an
//! [`Observer`], which the CLI implements with a progress bar and messages (a library user
//! may pass [`Silent`]). The observer is also where a run hears that it should stop.

use std::path::Path;

use super::setup::Plan;
use super::TrainSummary;
use crate::data::RowReport;
use crate::eval::EvalResult;

/// The figures of one optimizer update (the same as its line of `metrics.jsonl`).
#[derive(Debug, Clone)]
pub struct UpdateReport {
    /// Updates applied, this one included.
    pub step: u64,
    pub total: u64,
    /// Epochs done, as a fraction.
    pub epoch: f64,
    /// The mean training loss of the update's batch.
    pub loss: f64,
    pub lr: f64,
    /// SingLoRA's ramp u(t) of this update.
    pub u: f64,
    /// The real (non-padding) tokens of the update's batches, and their rate.
    pub tokens: usize,
    pub tokens_per_s: f64,
    /// The gradient norm before clipping, where clipping is on.
    pub grad_norm: Option<f64>,
}

/// Receives a run's events (on the first rank only in data-parallel runs). Every method has
/// an empty default.
pub trait Observer: Send + Sync {
    /// A setting is allowed but probably not meant (`text` says which and why); before
    /// training.
    fn warning(&self, _text: &str) {}
    /// Rows of the data were left out or cut at `max_length` (the report is not empty);
    /// before training.
    fn rows_report(&self, _report: &RowReport) {}
    /// Training starts, or resumes after update `from_step`.
    fn started(&self, _plan: &Plan, _from_step: u64) {}
    /// The run in `run_dir` resumes from its checkpoint at update `step`.
    fn resumed(&self, _run_dir: &Path, _step: u64) {}
    /// Temporary files and directories that interrupted runs had left were removed.
    fn cleaned(&self, _paths: &[std::path::PathBuf]) {}
    /// A checkpoint could not be read (`why`) and an older one is tried.
    fn skipped_checkpoint(&self, _dir: &Path, _why: &str) {}
    /// After each optimizer update.
    fn updated(&self, _report: &UpdateReport) {}
    /// An evaluation on `n` examples starts; `step` 0 is the model before training.
    fn evaluating(&self, _step: u64, _n: usize) {}
    /// After each evaluation; `step` 0 is the model before training.
    fn evaluated(&self, _step: u64, _result: &EvalResult) {}
    /// The per-class report of the final evaluation (classification).
    fn class_report(&self, _text: &str) {}
    /// The run ended, trained to the end or stopped with a checkpoint (`summary.interrupted`).
    fn finished(&self, _summary: &TrainSummary) {}
    /// Asked after every update, on every rank: true stops the run there, with a checkpoint
    /// to resume from (Ctrl-C in the CLI).
    fn stop_requested(&self) -> bool {
        false
    }
}

/// An observer that reports nothing and never stops a run.
pub struct Silent;

impl Observer for Silent {}
