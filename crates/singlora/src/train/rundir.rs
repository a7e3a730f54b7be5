//! The run directory, held for the run's life.
//!
//! - An exclusive OS file lock on `RUN_DIR/.lock` (released by the OS however the process
//!   ends), so two processes never train into one directory; the holder's process id is in
//!   the file, for the message the second one gets.
//! - It never is, contains or sits inside the model or the data.
//! - An existing directory is replaced only with `--overwrite` and only when it is a run
//!   (`run.json`): it is moved aside, the new one made, and only then the old one deleted.
//! - Temporary names that interrupted writes left (`checkpoints/.step-N.partial-…`, an old run
//!   moved aside) are removed when a run starts or resumes.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::atomic::{check_disjoint, check_replaceable, clean_stale, temp_sibling};
use crate::error::{Error, IoContext, Result};

/// The lock file inside a run directory.
pub const LOCK_FILE: &str = ".lock";

/// A run directory this process holds.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: File,
    /// What interrupted writes had left and was removed.
    pub cleaned: Vec<PathBuf>,
}

impl RunDir {
    /// A directory for a fresh run at `out`, made from `inputs` (role, path).
    pub fn create(out: &Path, overwrite: bool, inputs: &[(&str, &Path)]) -> Result<Self> {
        check_disjoint(out, inputs)?;
        check_replaceable(out, overwrite)?;
        let mut cleaned = vec![];
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).at(parent)?;
            cleaned = clean_stale(parent)?;
        }
        let old = if out.exists() {
            // the old run must not be in use, and stays whole until the new one exists
            let _held = lock(out)?;
            let aside = temp_sibling(out, "old");
            std::fs::rename(out, &aside).at(out)?;
            Some(aside)
        } else {
            None
        };
        std::fs::create_dir(out).at(out)?;
        let lock = lock(out)?;
        if let Some(old) = old {
            std::fs::remove_dir_all(&old).at(&old)?;
        }
        Ok(Self {
            path: out.to_path_buf(),
            _lock: lock,
            cleaned,
        })
    }

    /// The run at `out`, to resume.
    pub fn resume(out: &Path) -> Result<Self> {
        if !out.join("run.json").is_file() {
            return Err(Error::msg(format!(
                "{}: not a run directory (no run.json): nothing to resume",
                out.display()
            )));
        }
        let lock = lock(out)?;
        let mut cleaned = clean_stale(out)?;
        cleaned.extend(clean_stale(&out.join("checkpoints"))?);
        Ok(Self {
            path: out.to_path_buf(),
            _lock: lock,
            cleaned,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes `dir`'s lock without waiting, writing this process's id into it; refuses a directory
/// another process holds.
fn lock(dir: &Path) -> Result<File> {
    let p = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .at(&p)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another process".to_string()
            } else {
                format!("process {holder}")
            };
            return Err(Error::msg(format!(
                "run {} is in use by {who}; wait for it to end (or stop it) before training into it",
                dir.display()
            )));
        }
        Err(TryLockError::Error(e)) => return Err(Error::io(&p, e)),
    }
    f.set_len(0).at(&p)?;
    f.rewind().at(&p)?;
    write!(f, "{}", std::process::id()).at(&p)?;
    f.flush().at(&p)?;
    Ok(f)
}

/// Writes `RUN_DIR/run.json` atomically: `fields` (the run's settings and plan) with the
/// versions and start time every run records.
/// The short name of a model path for titles: its directory's name, or the file's stem.
pub fn model_name(model: &Path) -> String {
    let name = if model.is_file() {
        model.file_stem()
    } else {
        model.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.display().to_string())
}

/// Records in run.json when the run ended and what it ended with (`final`).
pub fn finish_run_json(out: &Path, last: serde_json::Value) -> Result<()> {
    let p = out.join("run.json");
    let text = std::fs::read_to_string(&p).at(&p)?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&p, format!("not JSON: {e}")))?;
    v["finished"] = serde_json::json!(now_secs());
    v["final"] = last;
    crate::atomic::write_file(
        &p,
        serde_json::to_string_pretty(&v)
            .expect("JSON values serialise")
            .as_bytes(),
    )
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn write_run_json(out: &Path, mut fields: serde_json::Value) -> Result<()> {
    fields["versions"] =
        serde_json::json!({"singlora": env!("CARGO_PKG_VERSION"), "candle": "0.11.1"});
    fields["started"] = serde_json::json!(now_secs());
    crate::atomic::write_file(
        &out.join("run.json"),
        serde_json::to_string_pretty(&fields)
            .expect("JSON values serialise")
            .as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_run_is_refused_and_freed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let held = RunDir::create(&out, false, &[]).unwrap();
        std::fs::write(out.join("run.json"), "{}").unwrap();
        let e = RunDir::resume(&out).unwrap_err().to_string();
        assert!(
            e.contains("is in use by process") && e.contains(&std::process::id().to_string()),
            "{e}"
        );
        let e = RunDir::create(&out, true, &[]).unwrap_err().to_string();
        assert!(e.contains("is in use"), "{e}");
        drop(held);
        RunDir::resume(&out).unwrap();
    }

    #[test]
    fn overwrite_replaces_only_a_run_and_never_an_input() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("train.jsonl"), "{}").unwrap();
        let train = data.join("train.jsonl");
        // the data's folder, the folder above it, the data file itself
        for out in [data.clone(), tmp.path().to_path_buf(), train.clone()] {
            let e = RunDir::create(&out, true, &[("--train", &train)])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--train"), "{e}");
        }
        assert!(train.exists());
        // a folder singlora did not write
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("keep.txt"), "mine").unwrap();
        let e = RunDir::create(&other, true, &[]).unwrap_err().to_string();
        assert!(e.contains("not written by singlora"), "{e}");
        assert!(other.join("keep.txt").exists());
        // a run: replaced, with nothing left beside it
        let run = tmp.path().join("run");
        drop(RunDir::create(&run, false, &[]).unwrap());
        std::fs::write(run.join("run.json"), "{}").unwrap();
        assert!(RunDir::create(&run, false, &[]).is_err());
        drop(RunDir::create(&run, true, &[]).unwrap());
        assert!(!run.join("run.json").exists());
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn stale_partials_of_dead_processes_are_removed_on_resume() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let ck = run.join("checkpoints");
        std::fs::create_dir_all(&ck).unwrap();
        std::fs::write(run.join("run.json"), "{}").unwrap();
        // a process id that cannot be running (above the kernel's limit)
        let dead = ck.join(".step-4.partial-4294967290-12345");
        std::fs::create_dir(&dead).unwrap();
        let live = ck.join(format!(".step-6.partial-{}-1", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        let user = ck.join(".my-notes");
        std::fs::write(&user, "x").unwrap();
        let held = RunDir::resume(&run).unwrap();
        assert_eq!(held.cleaned, vec![dead.clone()]);
        assert!(!dead.exists() && live.exists() && user.exists());
    }
}
