//! Training sweeps on a real model and data set (the paper's experiments 1–4 on MiniLM +
//! Rotten Tomatoes): every run is a full `singlora train` in this process, several at once
//! per device, each recorded as one JSON line in `runs.jsonl` (so an interrupted sweep resumes
//! where it stopped), then summarised per configuration (mean ± std over seeds) in
//! `summary.md`, `summary.json` and a plot.
//!
//! - `lr`: learning-rate stability (the paper's figure 2): SingLoRA, LoRA, LoRA+ and DoRA over a
//!   log-spaced sweep of learning rates.
//! - `rank`: equal rank and equal parameter budget (tables 1–2): SingLoRA and LoRA at r = 4, 8,
//!   16 (SingLoRA 2r has LoRA r's parameters on square weights).
//! - `init`: width-scaled kaiming (ours), kaiming over r (the public implementations'), a small
//!   Gaussian; each with the default ramp and without one.
//! - `ramp`: the ramp length T as 0, 0.5, 1, 2, 4, 8% of the updates.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::bands::{BandPoint, BandSeries};
use singlora::error::{Error, IoContext, Result};
use singlora::train::{train, TrainConfig};

/// The experiments this module knows.
pub const KINDS: [&str; 4] = ["lr", "rank", "init", "ramp"];

/// What a sweep trains on and how.
#[derive(Debug, Clone)]
pub struct SweepSpec {
    pub kind: String,
    pub model: PathBuf,
    pub train: PathBuf,
    pub eval: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    pub max_length: usize,
    pub seeds: Vec<u64>,
    /// Learning rates of the `lr` sweep (other sweeps use each method's default).
    pub lrs: Vec<f64>,
    pub devices: Vec<String>,
    pub jobs_per_device: usize,
    pub out: PathBuf,
    /// Keep every run's adapter and checkpoints (by default only run.json and metrics.jsonl).
    pub keep_runs: bool,
    /// Run each training as a child process of this `singlora` binary (on a GPU, runs in
    /// threads of one process serialise on the CUDA driver's locks); None: in this process.
    pub exe: Option<PathBuf>,
}

/// One training run of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The series it belongs to (a plot line or table row) and its x value.
    pub series: String,
    pub x: f64,
    pub method: String,
    pub rank: usize,
    pub lr: Option<f64>,
    pub init: String,
    /// Some(T) fixes the ramp; None takes `ramp_fraction` of the updates.
    pub ramp_steps: Option<u64>,
    pub ramp_fraction: f64,
    pub seed: u64,
}

impl Job {
    /// The run's directory name (unique within a sweep).
    pub fn name(&self) -> String {
        let lr = self
            .lr
            .map_or("default".to_string(), |l| format!("{l:.2e}"));
        let ramp = self
            .ramp_steps
            .map_or(format!("f{}", self.ramp_fraction), |t| format!("T{t}"));
        format!(
            "{}-r{}-lr{lr}-{}-{ramp}-s{}",
            self.method,
            self.rank,
            self.init.replace(':', "_"),
            self.seed
        )
    }
}

/// One finished run, as `runs.jsonl` holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub experiment: String,
    pub name: String,
    pub series: String,
    pub x: f64,
    pub method: String,
    pub rank: usize,
    pub lr: f64,
    pub init: String,
    pub ramp_steps: u64,
    pub seed: u64,
    pub eval_accuracy: f64,
    pub eval_loss: f64,
    pub eval_f1_macro: f64,
    pub adapter_params: usize,
    pub updates: u64,
    pub seconds: f64,
    pub device: String,
}

/// `n` learning rates from `lo` to `hi`, evenly spaced on a log scale.
pub fn log_space(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if n < 2 {
        return vec![lo];
    }
    (0..n)
        .map(|i| lo * (hi / lo).powf(i as f64 / (n - 1) as f64))
        .collect()
}

/// The runs of sweep `kind`.
pub fn jobs(kind: &str, seeds: &[u64], lrs: &[f64]) -> Result<Vec<Job>> {
    let base = |series: &str, x: f64, method: &str, rank: usize, seed: u64| Job {
        series: series.to_string(),
        x,
        method: method.to_string(),
        rank,
        lr: None,
        init: "kaiming_width".into(),
        ramp_steps: None,
        ramp_fraction: 0.01,
        seed,
    };
    let mut out = vec![];
    for &seed in seeds {
        match kind {
            "lr" => {
                for method in ["singlora", "lora", "lora-plus", "dora"] {
                    for &lr in lrs {
                        out.push(Job {
                            lr: Some(lr),
                            ..base(method, lr, method, 8, seed)
                        });
                    }
                }
            }
            "rank" => {
                for (method, r) in [
                    ("singlora", 4),
                    ("singlora", 8),
                    ("singlora", 16),
                    ("lora", 4),
                    ("lora", 8),
                    ("lora", 16),
                ] {
                    out.push(base(method, r as f64, method, r, seed));
                }
            }
            "init" => {
                for init in ["kaiming_width", "kaiming_rank", "gaussian:0.01"] {
                    for (ramp, x) in [(None, 1.0), (Some(0), 0.0)] {
                        out.push(Job {
                            init: init.into(),
                            ramp_steps: ramp,
                            ..base(init, x, "singlora", 8, seed)
                        });
                    }
                }
            }
            "ramp" => {
                for f in [0.0, 0.005, 0.01, 0.02, 0.04, 0.08] {
                    let mut j = base("singlora", f, "singlora", 8, seed);
                    if f == 0.0 {
                        j.ramp_steps = Some(0);
                    } else {
                        j.ramp_fraction = f;
                    }
                    out.push(j);
                }
            }
            other => {
                return Err(Error::msg(format!(
                    "unknown sweep `{other}`: expected one of {}",
                    KINDS.join(", ")
                )))
            }
        }
    }
    Ok(out)
}

/// The records of `runs.jsonl` in `dir` (none if it does not exist).
pub fn read_records(dir: &Path) -> Result<Vec<Record>> {
    read_jsonl(&dir.join("runs.jsonl"))
}

/// The JSON lines of `path` as `T`s (none if the file does not exist), blank lines skipped.
pub(crate) fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(path).at(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::bad_file(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// One worker per run at once: each device repeated `jobs_per_device` times (at least once).
pub(crate) fn workers(devices: &[String], jobs_per_device: usize) -> Vec<String> {
    devices
        .iter()
        .flat_map(|d| std::iter::repeat_n(d.clone(), jobs_per_device.max(1)))
        .collect()
}

fn train_config(spec: &SweepSpec, job: &Job, device: &str) -> Result<TrainConfig> {
    Ok(TrainConfig {
        model: spec.model.clone(),
        train: spec.train.clone(),
        eval: Some(spec.eval.clone()),
        task: singlora::data::Task::Classify,
        method: job.method.parse()?,
        rank: job.rank,
        alpha: job.rank as f64,
        lr: job.lr,
        epochs: spec.epochs,
        batch_size: spec.batch_size,
        data: singlora::data::DataSettings {
            max_length: spec.max_length,
            ..Default::default()
        },
        seed: job.seed,
        init: job.init.parse()?,
        ramp_steps: job.ramp_steps,
        ramp_fraction: job.ramp_fraction,
        device: device.parse()?,
        ..TrainConfig::default()
    })
}

/// `singlora train` arguments for `cfg` (the settings a sweep changes).
pub(crate) fn train_args(cfg: &TrainConfig, dir: &Path) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "train".into(),
        "--model".into(),
        cfg.model.display().to_string(),
        "--train".into(),
        cfg.train.display().to_string(),
        "--task".into(),
        cfg.task.to_string(),
        "--method".into(),
        cfg.method.to_string(),
        "--rank".into(),
        cfg.rank.to_string(),
        "--alpha".into(),
        cfg.alpha.to_string(),
        "--epochs".into(),
        cfg.epochs.to_string(),
        "--batch-size".into(),
        cfg.batch_size.to_string(),
        "--max-length".into(),
        cfg.data.max_length.to_string(),
        "--seed".into(),
        cfg.seed.to_string(),
        "--init".into(),
        cfg.init.to_string(),
        "--ramp-fraction".into(),
        cfg.ramp_fraction.to_string(),
        "--device".into(),
        cfg.device.to_string(),
        "--out".into(),
        dir.display().to_string(),
        "--overwrite".into(),
        "--quiet".into(),
    ];
    if let Some(e) = &cfg.eval {
        a.extend(["--eval".into(), e.display().to_string()]);
    }
    if let Some(lr) = cfg.lr {
        a.extend(["--lr".into(), lr.to_string()]);
    }
    if let Some(t) = cfg.ramp_steps {
        a.extend(["--ramp-steps".into(), t.to_string()]);
    }
    a.extend([
        "--warmup-ratio".into(),
        cfg.warmup_ratio.to_string(),
        "--max-grad-norm".into(),
        cfg.max_grad_norm.to_string(),
    ]);
    if let Some(t) = cfg.warmup_steps {
        a.extend(["--warmup-steps".into(), t.to_string()]);
    }
    if let Some(t) = &cfg.targets {
        a.extend(["--targets".into(), t.clone()]);
    }
    a.extend(["--base-dtype".into(), cfg.base_dtype.to_string()]);
    a
}

/// Trains `cfg` into `dir` (replacing an earlier attempt): in this process, or as a
/// `singlora train` child process of `exe`.
pub(crate) fn train_run(cfg: TrainConfig, dir: &Path, exe: Option<&Path>) -> Result<()> {
    match exe {
        None => {
            train(cfg, dir, true, std::sync::Arc::new(singlora::train::Silent))?;
        }
        Some(exe) => {
            let o = std::process::Command::new(exe)
                .args(train_args(&cfg, dir))
                .output()
                .map_err(|e| Error::msg(format!("{}: {e}", exe.display())))?;
            if !o.status.success() {
                let err = String::from_utf8_lossy(&o.stderr);
                return Err(Error::msg(format!(
                    "singlora train exited with {}: {}",
                    o.status,
                    err.trim()
                )));
            }
        }
    }
    Ok(())
}

/// The run's last evaluation line and its number of updates, from its metrics.jsonl.
pub(crate) fn final_eval(dir: &Path) -> Result<(serde_json::Value, u64)> {
    let lines = singlora::metrics::read_metrics(&dir.join("metrics.jsonl"))?;
    let ev = lines
        .iter()
        .rev()
        .find(|l| l.get("eval_accuracy").is_some())
        .cloned()
        .ok_or_else(|| {
            Error::msg(format!(
                "{}: no eval accuracy in metrics.jsonl",
                dir.display()
            ))
        })?;
    let updates = lines
        .iter()
        .rev()
        .find(|l| l.get("loss").is_some())
        .and_then(|l| l["step"].as_u64())
        .unwrap_or(0);
    Ok((ev, updates))
}

/// Removes everything of a finished run but run.json and metrics.jsonl.
pub(crate) fn prune_run(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).at(dir)? {
        let p = entry.at(dir)?.path();
        let keep = p
            .file_name()
            .is_some_and(|n| n == "run.json" || n == "metrics.jsonl");
        if !keep {
            if p.is_dir() {
                std::fs::remove_dir_all(&p).at(&p)?;
            } else {
                std::fs::remove_file(&p).at(&p)?;
            }
        }
    }
    Ok(())
}

/// Runs `jobs` with one worker thread per entry of `workers` (a device name each), appending
/// each result to the JSON-lines file `log` as it finishes. No job starts after `deadline`. A
/// job that fails is reported on stderr and left out (a rerun retries it). Returns how many
/// finished.
pub(crate) fn run_queue<J: Send, R: Serialize>(
    jobs: Vec<J>,
    workers: &[String],
    log: &Path,
    deadline: Option<Instant>,
    name: impl Fn(&J) -> String + Sync,
    run_one: impl Fn(&J, &str) -> Result<R> + Sync,
    progress: impl Fn(&R, usize, usize) + Sync,
) -> Result<usize> {
    let total = jobs.len();
    let queue = Mutex::new(jobs.into_iter().rev().collect::<Vec<_>>());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .at(log)?;
    let log_state = Mutex::new((file, 0usize));
    std::thread::scope(|s| {
        for device in workers {
            let (queue, log_state, progress, name, run_one) =
                (&queue, &log_state, &progress, &name, &run_one);
            s.spawn(move || loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let Some(job) = queue.lock().unwrap().pop() else {
                    break;
                };
                match run_one(&job, device) {
                    Ok(rec) => {
                        use std::io::Write;
                        let mut l = log_state.lock().unwrap();
                        let line = serde_json::to_string(&rec).unwrap_or_default();
                        if let Err(e) = writeln!(l.0, "{line}") {
                            eprintln!("{}: {e}", log.display());
                        }
                        l.1 += 1;
                        progress(&rec, l.1, total);
                    }
                    Err(e) => eprintln!("{} on {device} failed: {e}", name(&job)),
                }
            });
        }
    });
    let done = log_state.lock().unwrap().1;
    Ok(done)
}

fn run_one(spec: &SweepSpec, job: &Job, device: &str) -> Result<Record> {
    let dir = spec.out.join("runs").join(job.name());
    let cfg = train_config(spec, job, device)?;
    let lr = cfg.learning_rate();
    let t0 = Instant::now();
    train_run(cfg, &dir, spec.exe.as_deref())?;
    let seconds = t0.elapsed().as_secs_f64();
    // the final evaluation and the plan, from the run's own files
    let (ev, updates) = final_eval(&dir)?;
    let f = |k: &str| ev[k].as_f64().unwrap_or(f64::NAN);
    let run: serde_json::Value = singlora::checkpoint::read_json(&dir.join("run.json"))?;
    let plan = &run["plan"];
    let params =
        plan["adapter_params"].as_u64().unwrap_or(0) + plan["head_params"].as_u64().unwrap_or(0);
    if !spec.keep_runs {
        prune_run(&dir)?;
    }
    Ok(Record {
        experiment: spec.kind.clone(),
        name: job.name(),
        series: job.series.clone(),
        x: job.x,
        method: job.method.clone(),
        rank: job.rank,
        lr,
        init: job.init.clone(),
        ramp_steps: run["plan"]["ramp_steps"].as_u64().unwrap_or(0),
        seed: job.seed,
        eval_accuracy: f("eval_accuracy"),
        eval_loss: f("eval_loss"),
        eval_f1_macro: f("eval_f1_macro"),
        adapter_params: params as usize,
        updates,
        seconds,
        device: device.to_string(),
    })
}

/// Runs every job of the sweep not yet in `runs.jsonl`, `jobs_per_device` at a time on each
/// device, appending each record as it finishes; returns all records of this sweep. A run
/// that fails is reported on stderr and left out (a rerun retries it).
pub fn run(
    spec: &SweepSpec,
    progress: impl Fn(&Record, usize, usize) + Sync,
) -> Result<Vec<Record>> {
    std::fs::create_dir_all(&spec.out).at(&spec.out)?;
    let all = jobs(&spec.kind, &spec.seeds, &spec.lrs)?;
    let done: HashSet<String> = read_records(&spec.out)?
        .into_iter()
        .filter(|r| r.experiment == spec.kind)
        .map(|r| r.name)
        .collect();
    let todo: Vec<Job> = all
        .iter()
        .filter(|j| !done.contains(&j.name()))
        .cloned()
        .collect();
    let workers = workers(&spec.devices, spec.jobs_per_device);
    run_queue(
        todo,
        &workers,
        &spec.out.join("runs.jsonl"),
        None,
        Job::name,
        |job, device| run_one(spec, job, device),
        progress,
    )?;
    records(spec)
}

/// The records in `spec.out` that belong to this sweep (its kind and its runs' names).
pub fn records(spec: &SweepSpec) -> Result<Vec<Record>> {
    let names: HashSet<String> = jobs(&spec.kind, &spec.seeds, &spec.lrs)?
        .iter()
        .map(Job::name)
        .collect();
    Ok(read_records(&spec.out)?
        .into_iter()
        .filter(|r| r.experiment == spec.kind && names.contains(&r.name))
        .collect())
}

/// Mean and sample standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// Per series and x: the runs' accuracies (in %), in order of x.
fn grouped(records: &[Record]) -> BTreeMap<String, Vec<(f64, Vec<f64>)>> {
    let mut g: BTreeMap<String, BTreeMap<u64, (f64, Vec<f64>)>> = BTreeMap::new();
    for r in records {
        g.entry(r.series.clone())
            .or_default()
            .entry(r.x.to_bits())
            .or_insert((r.x, vec![]))
            .1
            .push(100.0 * r.eval_accuracy);
    }
    g.into_iter()
        .map(|(k, v)| {
            let mut pts: Vec<(f64, Vec<f64>)> = v.into_values().collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (k, pts)
        })
        .collect()
}

fn fmt_x(kind: &str, x: f64) -> String {
    match kind {
        "lr" => format!("{x:.1e}"),
        "rank" => format!("r = {x}"),
        "init" => (if x == 0.0 { "no ramp" } else { "ramp 1%" }).to_string(),
        "ramp" => {
            if x == 0.0 {
                "T = 0".into()
            } else {
                format!("{}%", 100.0 * x)
            }
        }
        _ => format!("{x}"),
    }
}

/// The summary table (markdown): one row per series, one column per x, mean ± std of the
/// eval accuracy (%) over seeds; for `lr` also each method's best, worst and spread.
pub fn summary_markdown(kind: &str, records: &[Record]) -> String {
    let g = grouped(records);
    let mut xs: Vec<f64> = records.iter().map(|r| r.x).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let mut s = String::new();
    let head: Vec<String> = xs.iter().map(|&x| fmt_x(kind, x)).collect();
    s += &format!("| {} | {} |", kind_series(kind), head.join(" | "));
    if kind == "lr" {
        s += " best | worst | spread (best − worst) | std of the means |";
    }
    s += "\n|---|";
    s += &"---|".repeat(xs.len() + if kind == "lr" { 4 } else { 0 });
    s += "\n";
    for (series, pts) in &g {
        let mut cells = vec![];
        let mut means = vec![];
        for &x in &xs {
            match pts.iter().find(|(px, _)| *px == x) {
                Some((_, v)) => {
                    let (m, sd) = mean_std(v);
                    means.push(m);
                    cells.push(format!("{m:.2} ± {sd:.2} ({})", v.len()));
                }
                None => cells.push("–".into()),
            }
        }
        s += &format!("| {series} | {} |", cells.join(" | "));
        if kind == "lr" && !means.is_empty() {
            let best = means.iter().cloned().fold(f64::MIN, f64::max);
            let worst = means.iter().cloned().fold(f64::MAX, f64::min);
            let (_, sd) = mean_std(&means);
            s += &format!(" {best:.2} | {worst:.2} | {:.2} | {sd:.2} |", best - worst);
        }
        s += "\n";
    }
    s
}

fn kind_series(kind: &str) -> &'static str {
    if kind == "init" {
        "init"
    } else {
        "method"
    }
}

/// The plot: eval accuracy against x per series (mean line, a ±1 std band clipped to the
/// min–max band, and that band); x on a log scale for `lr`.
pub fn write_plot(kind: &str, records: &[Record], path: &Path, title: &str) -> Result<()> {
    let series: Vec<BandSeries> = grouped(records)
        .into_iter()
        .map(|(label, pts)| BandSeries {
            label,
            points: pts
                .into_iter()
                .map(|(x, v)| {
                    let (m, sd) = mean_std(&v);
                    let lo = v.iter().cloned().fold(f64::MAX, f64::min);
                    let hi = v.iter().cloned().fold(f64::MIN, f64::max);
                    BandPoint {
                        x,
                        lo,
                        q1: (m - sd).max(lo),
                        median: m,
                        q3: (m + sd).min(hi),
                        hi,
                    }
                })
                .collect(),
        })
        .collect();
    let x_desc = match kind {
        "lr" => "learning rate",
        "rank" => "rank r",
        "init" => "ramp (0 = none, 1 = 1% of updates)",
        "ramp" => "ramp length T (fraction of the updates)",
        _ => "x",
    };
    crate::bands::write_linear_bands(
        path,
        title,
        x_desc,
        "eval accuracy (%)",
        &series,
        kind == "lr",
    )
}

/// Writes `summary.md`, `summary.json` and `KIND.svg` into `out` from `records`.
pub fn report(kind: &str, records: &[Record], out: &Path, title: &str) -> Result<String> {
    let md = summary_markdown(kind, records);
    singlora::atomic::write_file(&out.join("summary.md"), md.as_bytes())?;
    let g = grouped(records);
    let v: Vec<_> = g
        .iter()
        .flat_map(|(series, pts)| {
            pts.iter().map(move |(x, accs)| {
                let (m, sd) = mean_std(accs);
                json!({"series": series, "x": x, "mean_accuracy": m, "std": sd, "n": accs.len(), "accuracies": accs})
            })
        })
        .collect();
    singlora::atomic::write_file(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&v).unwrap().as_bytes(),
    )?;
    write_plot(kind, records, &out.join(format!("{kind}.svg")), title)?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_have_unique_runs_and_the_right_sizes() {
        let lrs = log_space(1e-4, 1e-2, 6);
        assert!((lrs[5] - 1e-2).abs() < 1e-15 && (lrs[0] - 1e-4).abs() < 1e-18);
        assert!((lrs[1] / lrs[0] - lrs[2] / lrs[1]).abs() < 1e-12);
        for (kind, per_seed) in [("lr", 24), ("rank", 6), ("init", 6), ("ramp", 6)] {
            let j = jobs(kind, &[0, 1, 2], &lrs).unwrap();
            assert_eq!(j.len(), 3 * per_seed, "{kind}");
            let names: HashSet<String> = j.iter().map(Job::name).collect();
            assert_eq!(names.len(), j.len(), "{kind}: run names collide");
        }
        assert!(jobs("nope", &[0], &lrs)
            .unwrap_err()
            .to_string()
            .contains("lr, rank"));
    }

    #[test]
    fn summary_means_and_spreads_by_hand() {
        let rec = |series: &str, x: f64, acc: f64, seed: u64| Record {
            experiment: "lr".into(),
            name: format!("{series}-{x}-{seed}"),
            series: series.into(),
            x,
            method: series.into(),
            rank: 8,
            lr: x,
            init: "kaiming_width".into(),
            ramp_steps: 3,
            seed,
            eval_accuracy: acc,
            eval_loss: 0.5,
            eval_f1_macro: acc,
            adapter_params: 10,
            updates: 5,
            seconds: 1.0,
            device: "cpu".into(),
        };
        let r = vec![
            rec("a", 1e-3, 0.80, 0),
            rec("a", 1e-3, 0.82, 1),
            rec("a", 1e-2, 0.70, 0),
            rec("a", 1e-2, 0.70, 1),
            rec("b", 1e-3, 0.75, 0),
        ];
        let md = summary_markdown("lr", &r);
        // a at 1e-3: mean 81, sample std sqrt(2) = 1.41; spread 81 - 70 = 11
        assert!(
            md.contains(
                "| a | 81.00 ± 1.41 (2) | 70.00 ± 0.00 (2) | 81.00 | 70.00 | 11.00 | 7.78 |"
            ),
            "{md}"
        );
        assert!(md.contains("| b | 75.00 ± 0.00 (1) | – |"), "{md}");
        let dir = tempfile::tempdir().unwrap();
        let out = report("lr", &r, dir.path(), "test sweep").unwrap();
        assert_eq!(out, md);
        let svg = std::fs::read_to_string(dir.path().join("lr.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("test sweep"));
        let j: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(j.as_array().unwrap().len(), 3);
    }
}
