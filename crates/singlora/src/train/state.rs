//! Training checkpoints: `RUN_DIR/checkpoints/step-N/` holds the adapter (with its head), the
//! optimizer moments and the trainer state (update count, data position, best eval loss),
//! written under a temporary name and renamed, so a crash never leaves a half checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapter::file::AdapterFile;
use crate::atomic::StagedDir;
use crate::checkpoint::{read_json, write_safetensors, TensorFile};
use crate::error::{Error, IoContext, Result};
use crate::optim::AdamWState;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIM_FILE: &str = "optimizer.safetensors";

/// Where the trainer stands; with the seed, this fixes every later batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer updates applied.
    pub step: u64,
    /// The epoch and the index of the next micro-batch in that epoch's batch order.
    pub epoch: u64,
    pub next_batch: usize,
    pub seed: u64,
    pub best_eval_loss: Option<f64>,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
}

pub fn checkpoint_dir(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step}"))
}

/// Writes one checkpoint atomically and prunes all but the newest `keep`.
pub fn save(
    run: &Path,
    adapter: &AdapterFile,
    optim: &AdamWState,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(run, state.step);
    let staged = StagedDir::new(&dir, true)?;
    adapter.write_into(staged.path())?;
    let mut tensors = BTreeMap::new();
    for (i, (m, v)) in optim.moments.iter().enumerate() {
        tensors.insert(format!("m.{i:05}"), m.clone());
        tensors.insert(format!("v.{i:05}"), v.clone());
    }
    let meta: HashMap<String, String> = [("t".to_string(), optim.t.to_string())].into();
    write_safetensors(&staged.path().join(OPTIM_FILE), &tensors, Some(&meta))?;
    let p = staged.path().join(STATE_FILE);
    std::fs::write(&p, serde_json::to_string_pretty(state).unwrap()).at(&p)?;
    let out = staged.commit()?;
    prune(run, keep)?;
    Ok(out)
}

/// Checkpoints present, oldest first.
pub fn list(run: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = run.join("checkpoints");
    if !root.is_dir() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for e in std::fs::read_dir(&root).at(&root)? {
        let e = e.at(&root)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join(STATE_FILE).exists() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn prune(run: &Path, keep: usize) -> Result<()> {
    let all = list(run)?;
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(p).at(p)?;
        }
    }
    Ok(())
}

/// Reads a checkpoint: adapter file, optimizer state, trainer state.
pub fn load(dir: &Path, device: &Device) -> Result<(AdapterFile, AdamWState, TrainerState)> {
    let adapter = AdapterFile::read(dir, device)?;
    let f = TensorFile::open(&dir.join(OPTIM_FILE))?;
    let t = f
        .metadata()
        .and_then(|m| m.get("t"))
        .and_then(|t| t.parse::<u64>().ok())
        .ok_or_else(|| Error::bad_file(f.path(), "has no update count `t` in its metadata"))?;
    let n = f.names().count() / 2;
    let mut moments = vec![];
    for i in 0..n {
        let m: Tensor = f.load(&format!("m.{i:05}"), device)?;
        let v: Tensor = f.load(&format!("v.{i:05}"), device)?;
        moments.push((m, v));
    }
    let state_path = dir.join(STATE_FILE);
    let state: TrainerState = serde_json::from_value(read_json(&state_path)?)
        .map_err(|e| Error::bad_file(&state_path, format!("is not a trainer state: {e}")))?;
    Ok((adapter, AdamWState { t, moments }, state))
}
