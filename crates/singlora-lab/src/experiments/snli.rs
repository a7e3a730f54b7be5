//! The pre-registered SNLI comparison (protocol in `docs/results.md`): all-MiniLM-L6-v2 with
//! SingLoRA, LoRA, rsLoRA, LoRA+ and DoRA at rank 8 and SingLoRA at rank 16 (LoRA r = 8's
//! parameters), on `query` and `key`. Each configuration's learning rate is picked on a dev
//! split carved out of SNLI's training data (one seed per grid point); then five seeds per
//! configuration at the picked rate are scored on the SNLI test set, keeping every test
//! prediction so that methods can be compared pair by pair.
//!
//! Every finished run is one JSON line in `OUT/runs.jsonl`; a rerun skips what is there, so
//! the protocol can be run over several sessions.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::sweep::{final_eval, prune_run, read_jsonl, run_queue, train_run, workers};
use singlora::adapter::Method;
use singlora::data::{DataSettings, Task};
use singlora::error::{Error, IoContext, Result};
use singlora::train::TrainConfig;

/// The adapted configurations: name, method, rank.
pub const CONFIGS: [(&str, Method, usize); 6] = [
    ("singlora-r8", Method::SingLora, 8),
    ("lora-r8", Method::Lora, 8),
    ("rslora-r8", Method::RsLora, 8),
    ("loraplus-r8", Method::LoraPlus, 8),
    ("dora-r8", Method::Dora, 8),
    ("singlora-r16", Method::SingLora, 16),
];
/// The configuration every other is compared with.
pub const REFERENCE: &str = "lora-r8";
/// The learning-rate grid (LoRA+: the rate of A; B's is 16 times it).
pub const LR_GRID: [f64; 6] = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3];
/// The seed of the learning-rate selection runs.
pub const SELECT_SEED: u64 = 0;
/// The seeds scored on the test set.
pub const TEST_SEEDS: [u64; 5] = [1, 2, 3, 4, 5];
/// The adapted modules (the paper's RoBERTa setting).
pub const TARGETS: &str = "query,key";
/// One labelled training row in this many goes to the dev split.
pub const DEV_EVERY: usize = 20;

/// What the comparison trains on and where.
#[derive(Debug, Clone)]
pub struct SnliSpec {
    pub model: PathBuf,
    /// The prepared data ([`prepare`]): train.jsonl, dev.jsonl, test.jsonl.
    pub data: PathBuf,
    /// The first this many rows of train.jsonl are trained on (one epoch).
    pub train_rows: usize,
    pub batch_size: usize,
    pub max_length: usize,
    pub devices: Vec<String>,
    pub jobs_per_device: usize,
    pub out: PathBuf,
    /// `singlora train` child processes of this binary (GPUs); None: in this process.
    pub exe: Option<PathBuf>,
    /// No run starts after this.
    pub deadline: Option<Instant>,
}

/// One run: a selection run (dev accuracy) or a test run (dev and test accuracy).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub stage: Stage,
    pub config: &'static str,
    pub method: Method,
    pub rank: usize,
    pub lr: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Select,
    Test,
    /// A test run at a multiple of the picked rate (learning-rate stability).
    Stability,
}

impl Job {
    pub fn name(&self) -> String {
        let stage = match self.stage {
            Stage::Select => "select",
            Stage::Test => "test",
            Stage::Stability => "stab",
        };
        match self.stage {
            // multiples of the picked rate need more digits
            Stage::Stability => format!("{stage}-{}-lr{:.3e}-s{}", self.config, self.lr, self.seed),
            _ => format!("{stage}-{}-lr{:.0e}-s{}", self.config, self.lr, self.seed),
        }
    }
}

/// One finished run, as `runs.jsonl` holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub name: String,
    pub stage: Stage,
    pub config: String,
    pub method: String,
    pub rank: usize,
    pub lr: f64,
    pub seed: u64,
    pub train_rows: usize,
    pub updates: u64,
    pub dev_accuracy: f64,
    pub dev_loss: f64,
    pub test_accuracy: Option<f64>,
    /// Test runs: the predicted label of each test row, one character each (the index into
    /// `labels`), in the file's order.
    pub test_predictions: Option<String>,
    pub labels: Vec<String>,
    pub trainable_params: u64,
    pub seconds: f64,
    pub device: String,
}

/// The selection runs: every configuration at every grid rate, one seed.
pub fn select_jobs() -> Vec<Job> {
    CONFIGS
        .iter()
        .flat_map(|&(config, method, rank)| {
            LR_GRID.iter().map(move |&lr| Job {
                stage: Stage::Select,
                config,
                method,
                rank,
                lr,
                seed: SELECT_SEED,
            })
        })
        .collect()
}

/// Each configuration's picked rate: the highest dev accuracy of its selection runs (a tie
/// goes to the lower rate); None until all of its grid has been run.
pub fn picked_rates(records: &[Record]) -> BTreeMap<&'static str, f64> {
    let mut out = BTreeMap::new();
    for &(config, _, _) in &CONFIGS {
        let runs: Vec<&Record> = records
            .iter()
            .filter(|r| r.stage == Stage::Select && r.config == config)
            .collect();
        let have: HashSet<u64> = runs.iter().map(|r| r.lr.to_bits()).collect();
        if LR_GRID.iter().any(|lr| !have.contains(&lr.to_bits())) {
            continue;
        }
        let mut best: Option<(f64, f64)> = None;
        for lr in LR_GRID {
            let acc = runs
                .iter()
                .find(|r| r.lr == lr)
                .map_or(f64::NEG_INFINITY, |r| r.dev_accuracy);
            if best.is_none_or(|(_, b)| acc > b) {
                best = Some((lr, acc));
            }
        }
        if let Some((lr, _)) = best {
            out.insert(config, lr);
        }
    }
    out
}

/// The test runs of every configuration whose rate has been picked.
pub fn test_jobs(picked: &BTreeMap<&'static str, f64>) -> Vec<Job> {
    CONFIGS
        .iter()
        .filter_map(|&(config, method, rank)| {
            picked.get(config).map(|&lr| (config, method, rank, lr))
        })
        .flat_map(|(config, method, rank, lr)| {
            TEST_SEEDS.iter().map(move |&seed| Job {
                stage: Stage::Test,
                config,
                method,
                rank,
                lr,
                seed,
            })
        })
        .collect()
}

/// Learning-rate stability: the picked rate times these (×1 is the test runs themselves).
pub const STABILITY_FACTORS: [f64; 5] = [0.25, 0.5, 1.0, 2.0, 4.0];
/// The order in which the configurations' stability runs are made.
pub const STABILITY_ORDER: [&str; 6] = [
    "singlora-r8",
    "lora-r8",
    "singlora-r16",
    "loraplus-r8",
    "rslora-r8",
    "dora-r8",
];
/// A run whose test accuracy is below this has collapsed (chance is about 0.34).
pub const COLLAPSED_BELOW: f64 = 0.40;

/// The stability runs (every factor but 1, every test seed) of each configuration whose rate
/// is picked, in [`STABILITY_ORDER`].
pub fn stability_jobs(picked: &BTreeMap<&'static str, f64>) -> Vec<Job> {
    let mut out = vec![];
    for name in STABILITY_ORDER {
        let Some(&(config, method, rank)) = CONFIGS.iter().find(|c| c.0 == name) else {
            continue;
        };
        let Some(&lr) = picked.get(config) else {
            continue;
        };
        for f in STABILITY_FACTORS.iter().filter(|&&f| f != 1.0) {
            for &seed in &TEST_SEEDS {
                out.push(Job {
                    stage: Stage::Stability,
                    config,
                    method,
                    rank,
                    lr: lr * f,
                    seed,
                });
            }
        }
    }
    out
}

/// The records in `out/runs.jsonl` (none if it does not exist).
pub fn read_records(out: &Path) -> Result<Vec<Record>> {
    read_jsonl(&out.join("runs.jsonl"))
}

/// The training file of the first `rows` rows of `data/train.jsonl`, written once.
fn train_file(spec: &SnliSpec) -> Result<PathBuf> {
    let all = spec.data.join("train.jsonl");
    let path = spec.data.join(format!("train-{}.jsonl", spec.train_rows));
    if path.exists() {
        return Ok(path);
    }
    let f = std::fs::File::open(&all).at(&all)?;
    let mut lines = vec![];
    for line in std::io::BufReader::new(f).lines().take(spec.train_rows) {
        lines.push(line.at(&all)?);
    }
    if lines.len() < spec.train_rows {
        return Err(Error::bad_file(
            &all,
            format!(
                "has {} rows, fewer than the {} asked for",
                lines.len(),
                spec.train_rows
            ),
        ));
    }
    singlora::atomic::write_file(&path, (lines.join("\n") + "\n").as_bytes())?;
    Ok(path)
}

fn run_one(spec: &SnliSpec, train: &Path, job: &Job, device: &str) -> Result<Record> {
    let dir = spec.out.join("runs").join(job.name());
    let cfg = TrainConfig {
        model: spec.model.clone(),
        train: train.to_path_buf(),
        eval: Some(spec.data.join("dev.jsonl")),
        task: Task::Classify,
        method: job.method,
        rank: job.rank,
        alpha: job.rank as f64,
        targets: Some(TARGETS.into()),
        lr: Some(job.lr),
        epochs: 1,
        batch_size: spec.batch_size,
        data: DataSettings {
            max_length: spec.max_length,
            ..DataSettings::default()
        },
        seed: job.seed,
        device: device.parse()?,
        ..TrainConfig::default()
    };
    let t0 = Instant::now();
    train_run(cfg, &dir, spec.exe.as_deref())?;
    let (ev, updates) = final_eval(&dir)?;
    let run = singlora::checkpoint::read_json(&dir.join("run.json"))?;
    let plan = &run["plan"];
    let trainable_params =
        plan["adapter_params"].as_u64().unwrap_or(0) + plan["head_params"].as_u64().unwrap_or(0);
    let (mut test_accuracy, mut test_predictions, mut labels) = (None, None, vec![]);
    if job.stage != Stage::Select {
        let dev = device.parse::<singlora::device::DeviceSpec>()?.open()?;
        let session = singlora::session::Session::load(&spec.model, &dir, dev)?;
        let settings = DataSettings {
            max_length: spec.max_length,
            ..DataSettings::default()
        };
        let (res, _) = session.eval_file(&spec.data.join("test.jsonl"), &settings, 128)?;
        test_accuracy = res.metrics.as_ref().map(|m| m.accuracy);
        test_predictions = Some(
            res.predictions
                .iter()
                .map(|&p| char::from_digit(p as u32, 36).unwrap_or('?'))
                .collect(),
        );
        labels = session.labels.map(|l| l.names).unwrap_or_default();
    }
    let seconds = t0.elapsed().as_secs_f64();
    prune_run(&dir)?;
    Ok(Record {
        name: job.name(),
        stage: job.stage,
        config: job.config.into(),
        method: job.method.to_string(),
        rank: job.rank,
        lr: job.lr,
        seed: job.seed,
        train_rows: spec.train_rows,
        updates,
        dev_accuracy: ev["eval_accuracy"].as_f64().unwrap_or(f64::NAN),
        dev_loss: ev["eval_loss"].as_f64().unwrap_or(f64::NAN),
        test_accuracy,
        test_predictions,
        labels,
        trainable_params,
        seconds,
        device: device.into(),
    })
}

/// Runs what is left of the protocol: the selection runs, then the test runs of each
/// configuration whose rate is picked. Returns every record of this training-set size.
pub fn run(
    spec: &SnliSpec,
    progress: impl Fn(&Record, usize, usize) + Sync,
) -> Result<Vec<Record>> {
    std::fs::create_dir_all(&spec.out).at(&spec.out)?;
    let train = train_file(spec)?;
    let workers = workers(&spec.devices, spec.jobs_per_device);
    let log = spec.out.join("runs.jsonl");
    for stage in [Stage::Select, Stage::Test, Stage::Stability] {
        let records = records(spec)?;
        let done: HashSet<&str> = records.iter().map(|r| r.name.as_str()).collect();
        let jobs = match stage {
            Stage::Select => select_jobs(),
            Stage::Test => test_jobs(&picked_rates(&records)),
            Stage::Stability => stability_jobs(&picked_rates(&records)),
        };
        let todo: Vec<Job> = jobs
            .into_iter()
            .filter(|j| !done.contains(j.name().as_str()))
            .collect();
        run_queue(
            todo,
            &workers,
            &log,
            spec.deadline,
            Job::name,
            |job, device| run_one(spec, &train, job, device),
            &progress,
        )?;
    }
    records(spec)
}

/// The records of `spec.out` at this training-set size.
pub fn records(spec: &SnliSpec) -> Result<Vec<Record>> {
    Ok(read_records(&spec.out)?
        .into_iter()
        .filter(|r| r.train_rows == spec.train_rows)
        .collect())
}

/// Writes `dir/train.jsonl`, `dev.jsonl` and `test.jsonl` (fields `text`, `text_pair`,
/// `label`) from SNLI's `snli_1.0_train_subset.jsonl` and `snli_1.0_test.jsonl` in `src`:
/// rows without a gold label (`-`) dropped; of the labelled training rows in file order,
/// every [`DEV_EVERY`]th (index 0, 20, 40, …) to dev and the rest to train; the test set whole.
/// Returns the three row counts.
pub fn prepare(src: &Path, dir: &Path) -> Result<[usize; 3]> {
    let read = |name: &str| -> Result<Vec<String>> {
        let p = src.join(name);
        let f = std::fs::File::open(&p).at(&p)?;
        let mut rows = vec![];
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.at(&p)?;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| Error::bad_file(&p, format!("line {}: {e}", i + 1)))?;
            let field = |k: &str| {
                v[k].as_str().ok_or_else(|| {
                    Error::bad_file(&p, format!("line {}: no string field {k}", i + 1))
                })
            };
            let label = field("gold_label")?;
            if label == "-" {
                continue;
            }
            rows.push(
                serde_json::json!({
                    "text": field("sentence1")?,
                    "text_pair": field("sentence2")?,
                    "label": label,
                })
                .to_string(),
            );
        }
        Ok(rows)
    };
    let pool = read("snli_1.0_train_subset.jsonl")?;
    let test = read("snli_1.0_test.jsonl")?;
    let (mut train, mut dev) = (vec![], vec![]);
    for (i, row) in pool.into_iter().enumerate() {
        if i % DEV_EVERY == 0 {
            dev.push(row);
        } else {
            train.push(row);
        }
    }
    std::fs::create_dir_all(dir).at(dir)?;
    for (name, rows) in [
        ("train.jsonl", &train),
        ("dev.jsonl", &dev),
        ("test.jsonl", &test),
    ] {
        let mut text = Vec::new();
        for r in rows.iter() {
            writeln!(text, "{r}").expect("writing to memory");
        }
        singlora::atomic::write_file(&dir.join(name), &text)?;
    }
    Ok([train.len(), dev.len(), test.len()])
}

/// The gold label of each test row, as indices into `labels`.
fn test_truth(data: &Path, labels: &[String]) -> Result<Vec<u8>> {
    let p = data.join("test.jsonl");
    let text = std::fs::read_to_string(&p).at(&p)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l)
                .map_err(|e| Error::bad_file(&p, format!("line {}: {e}", i + 1)))?;
            let name = v["label"].as_str().unwrap_or_default();
            labels
                .iter()
                .position(|n| n == name)
                .map(|k| k as u8)
                .ok_or_else(|| {
                    Error::bad_file(&p, format!("line {}: label {name:?} unknown", i + 1))
                })
        })
        .collect()
}

/// A p-value: two decimals, or one significant digit below 0.01.
fn fmt_p(p: f64) -> String {
    if p >= 0.01 {
        format!("{p:.2}")
    } else {
        format!("{p:.0e}")
    }
}

fn predictions(r: &Record) -> Vec<u8> {
    r.test_predictions
        .as_deref()
        .unwrap_or_default()
        .chars()
        .map(|c| c.to_digit(36).map_or(u8::MAX, |d| d as u8))
        .collect()
}

/// `summary.md` and `lr.svg` in `out` from the records of one training-set size: the
/// selection grid on dev, then the test table with intervals and the comparison with
/// [`REFERENCE`]. Returns the markdown.
pub fn report(records: &[Record], data: &Path, out: &Path) -> Result<String> {
    use super::stats::{bootstrap_mean, discordant, mcnemar_exact};
    use std::fmt::Write as _;
    let rows = records.first().map_or(0, |r| r.train_rows);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### Learning rate picked on dev (seed {SELECT_SEED}, {rows} training pairs)\n"
    );
    let _ = write!(md, "| configuration |");
    for lr in LR_GRID {
        let _ = write!(md, " {lr:.0e} |");
    }
    let _ = writeln!(md, " picked |\n|---|{}---|", "---|".repeat(LR_GRID.len()));
    let picked = picked_rates(records);
    let mut series = vec![];
    for &(config, _, _) in &CONFIGS {
        let _ = write!(md, "| {config} |");
        let mut points = vec![];
        for lr in LR_GRID {
            match records
                .iter()
                .find(|r| r.stage == Stage::Select && r.config == config && r.lr == lr)
            {
                Some(r) => {
                    let acc = 100.0 * r.dev_accuracy;
                    let _ = write!(md, " {acc:.2} |");
                    points.push(crate::bands::BandPoint {
                        x: lr,
                        lo: acc,
                        q1: acc,
                        median: acc,
                        q3: acc,
                        hi: acc,
                    });
                }
                None => {
                    let _ = write!(md, " – |");
                }
            }
        }
        let _ = writeln!(
            md,
            " {} |",
            picked
                .get(config)
                .map_or("–".into(), |lr| format!("{lr:.0e}"))
        );
        if !points.is_empty() {
            series.push(crate::bands::BandSeries {
                label: config.into(),
                points,
            });
        }
    }
    if !series.is_empty() {
        crate::bands::write_linear_bands(
            &out.join("lr.svg"),
            &format!("SNLI dev accuracy against learning rate (MiniLM, {rows} pairs, seed 0)"),
            "learning rate (LoRA+: of A)",
            "dev accuracy (%)",
            &series,
            true,
        )?;
    }

    let tests: Vec<&Record> = records.iter().filter(|r| r.stage == Stage::Test).collect();
    let Some(first) = tests.first() else {
        let _ = writeln!(md, "\nNo test runs yet.");
        singlora::atomic::write_file(&out.join("summary.md"), md.as_bytes())?;
        return Ok(md);
    };
    let truth = test_truth(data, &first.labels)?;
    let by_seed = |config: &str| -> BTreeMap<u64, &Record> {
        tests
            .iter()
            .filter(|r| r.config == config)
            .map(|r| (r.seed, *r))
            .collect()
    };
    let reference = by_seed(REFERENCE);
    let _ = writeln!(
        md,
        "\n### Test accuracy (9,824 SNLI test pairs; seeds {}–{})\n",
        TEST_SEEDS[0],
        TEST_SEEDS[TEST_SEEDS.len() - 1]
    );
    let _ = writeln!(
        md,
        "| configuration | trainable params | lr | accuracy per seed (%) | mean ± std | mean, 95% interval | − {REFERENCE}, 95% interval | McNemar p per seed |\n|---|---|---|---|---|---|---|---|"
    );
    for &(config, _, _) in &CONFIGS {
        let runs = by_seed(config);
        if runs.is_empty() {
            continue;
        }
        for r in runs.values() {
            if r.labels != first.labels {
                return Err(Error::msg(format!(
                    "{}: label order {:?} differs from {:?}",
                    r.name, r.labels, first.labels
                )));
            }
        }
        let accs: Vec<f64> = runs
            .values()
            .map(|r| 100.0 * r.test_accuracy.unwrap_or(f64::NAN))
            .collect();
        let (m, sd) = super::sweep::mean_std(&accs);
        let correct: Vec<Vec<i8>> = runs
            .values()
            .map(|r| {
                predictions(r)
                    .iter()
                    .zip(&truth)
                    .map(|(p, t)| (p == t) as i8)
                    .collect()
            })
            .collect();
        let ci = bootstrap_mean(&correct, 10_000, 0);
        let paired: Vec<(&Record, &Record)> = runs
            .iter()
            .filter_map(|(s, r)| reference.get(s).map(|q| (*r, *q)))
            .collect();
        let (diff, ps) = if config == REFERENCE || paired.is_empty() {
            ("–".to_string(), "–".to_string())
        } else {
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = paired
                .iter()
                .map(|(a, b)| (predictions(a), predictions(b)))
                .collect();
            let d: Vec<Vec<i8>> = pairs
                .iter()
                .map(|(a, b)| {
                    a.iter()
                        .zip(b)
                        .zip(&truth)
                        .map(|((x, y), t)| (x == t) as i8 - (y == t) as i8)
                        .collect()
                })
                .collect();
            let di = bootstrap_mean(&d, 10_000, 0);
            let ps: Vec<String> = pairs
                .iter()
                .map(|(a, b)| {
                    let (only_a, only_b) = discordant(a, b, &truth);
                    fmt_p(mcnemar_exact(only_a, only_b))
                })
                .collect();
            (
                format!(
                    "{:+.2} [{:+.2}, {:+.2}] ({} pairs)",
                    100.0 * di.estimate,
                    100.0 * di.lo,
                    100.0 * di.hi,
                    paired.len()
                ),
                ps.join(", "),
            )
        };
        let first_run = runs.values().next().expect("non-empty");
        let _ = writeln!(
            md,
            "| {config} | {} | {:.0e} | {} | {m:.2} ± {sd:.2} | {:.2} [{:.2}, {:.2}] | {diff} | {ps} |",
            first_run.trainable_params,
            first_run.lr,
            accs.iter()
                .map(|a| format!("{a:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            100.0 * ci.estimate,
            100.0 * ci.lo,
            100.0 * ci.hi,
        );
    }
    stability_table(&mut md, records, &picked);
    singlora::atomic::write_file(&out.join("summary.md"), md.as_bytes())?;
    Ok(md)
}

/// The stability table: test accuracy at each multiple of the picked rate (the ×1 column is
/// the test runs), the spread of the means over the whole window and over the two 2× windows
/// around the picked rate, and the collapsed runs.
fn stability_table(md: &mut String, records: &[Record], picked: &BTreeMap<&'static str, f64>) {
    use std::fmt::Write as _;
    let runs_at = |config: &str, lr: f64| -> Vec<f64> {
        records
            .iter()
            .filter(|r| {
                r.config == config
                    && matches!(r.stage, Stage::Test | Stage::Stability)
                    && (r.lr - lr).abs() <= 1e-9 * lr
            })
            .filter_map(|r| r.test_accuracy)
            .map(|a| 100.0 * a)
            .collect()
    };
    if !records.iter().any(|r| r.stage == Stage::Stability) {
        return;
    }
    let _ = writeln!(
        md,
        "\n### Learning-rate stability (test accuracy, seeds {}–{}; collapsed: below {:.0}%)\n",
        TEST_SEEDS[0],
        TEST_SEEDS[TEST_SEEDS.len() - 1],
        100.0 * COLLAPSED_BELOW
    );
    let _ = write!(md, "| configuration |");
    for f in STABILITY_FACTORS {
        let _ = write!(md, " ×{f} |");
    }
    let _ = writeln!(
        md,
        " spread ×0.25…×4 | spread ×0.5…×1 | spread ×1…×2 | collapsed |\n|---|{}---|---|---|---|",
        "---|".repeat(STABILITY_FACTORS.len())
    );
    for name in STABILITY_ORDER {
        let Some(&lr) = picked.get(name) else {
            continue;
        };
        let mut means = vec![];
        let (mut collapsed, mut total) = (0, 0);
        let _ = write!(md, "| {name} |");
        for f in STABILITY_FACTORS {
            let accs = runs_at(name, lr * f);
            total += accs.len();
            collapsed += accs
                .iter()
                .filter(|&&a| a < 100.0 * COLLAPSED_BELOW)
                .count();
            if accs.is_empty() {
                means.push(None);
                let _ = write!(md, " – |");
            } else {
                let (m, sd) = super::sweep::mean_std(&accs);
                means.push(Some(m));
                let _ = write!(md, " {m:.2} ± {sd:.2} ({}) at {:.2e} |", accs.len(), lr * f);
            }
        }
        let spread = |lo: usize, hi: usize| -> String {
            let w: Option<Vec<f64>> = means[lo..=hi].iter().copied().collect();
            match w {
                Some(w) => {
                    let max = w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let min = w.iter().copied().fold(f64::INFINITY, f64::min);
                    format!("{:.2}", max - min)
                }
                None => "–".into(),
            }
        };
        let _ = writeln!(
            md,
            " {} | {} | {} | {collapsed} of {total} |",
            spread(0, 4),
            spread(1, 2),
            spread(2, 3)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(config: &str, lr: f64, acc: f64) -> Record {
        Record {
            name: String::new(),
            stage: Stage::Select,
            config: config.into(),
            method: String::new(),
            rank: 8,
            lr,
            seed: SELECT_SEED,
            train_rows: 10,
            updates: 1,
            dev_accuracy: acc,
            dev_loss: 1.0,
            test_accuracy: None,
            test_predictions: None,
            labels: vec![],
            trainable_params: 0,
            seconds: 0.0,
            device: "cpu".into(),
        }
    }

    #[test]
    fn a_rate_is_picked_only_from_a_whole_grid_and_ties_go_low() {
        let mut rs: Vec<Record> = LR_GRID[..5]
            .iter()
            .map(|&lr| rec("lora-r8", lr, 0.5))
            .collect();
        assert!(picked_rates(&rs).is_empty());
        rs.push(rec("lora-r8", LR_GRID[5], 0.4));
        rs[3].dev_accuracy = 0.7;
        rs[4].dev_accuracy = 0.7;
        let picked = picked_rates(&rs);
        assert_eq!(picked.len(), 1);
        assert_eq!(picked["lora-r8"], LR_GRID[3]);
        let tests = test_jobs(&picked);
        assert_eq!(tests.len(), TEST_SEEDS.len());
        assert!(tests
            .iter()
            .all(|j| j.lr == LR_GRID[3] && j.config == "lora-r8"));
    }

    #[test]
    fn every_run_has_its_own_name() {
        let picked: BTreeMap<&str, f64> = CONFIGS.iter().map(|c| (c.0, 1e-3)).collect();
        let jobs: Vec<Job> = select_jobs()
            .into_iter()
            .chain(test_jobs(&picked))
            .chain(stability_jobs(&picked))
            .collect();
        let names: HashSet<String> = jobs.iter().map(Job::name).collect();
        assert_eq!(names.len(), jobs.len());
        let stability = (STABILITY_FACTORS.len() - 1) * TEST_SEEDS.len();
        assert_eq!(
            jobs.len(),
            CONFIGS.len() * (LR_GRID.len() + TEST_SEEDS.len() + stability)
        );
        // a stability run sits at a multiple of the picked rate, never at the rate itself
        let stab = stability_jobs(&BTreeMap::from([("lora-r8", 2e-3)]));
        let lrs: HashSet<u64> = stab.iter().map(|j| j.lr.to_bits()).collect();
        let want: HashSet<u64> = [5e-4, 1e-3, 4e-3, 8e-3]
            .iter()
            .map(|l: &f64| l.to_bits())
            .collect();
        assert_eq!(lrs, want);
        assert_eq!(stab.len(), stability);
    }

    #[test]
    fn the_dev_split_takes_every_twentieth_labelled_row() {
        let src = tempfile::tempdir().unwrap();
        let row = |i: usize, label: &str| {
            serde_json::json!({"sentence1": format!("p{i}"), "sentence2": "h", "gold_label": label})
                .to_string()
        };
        let train: Vec<String> = (0..45)
            .map(|i| row(i, if i == 3 { "-" } else { "neutral" }))
            .collect();
        std::fs::write(
            src.path().join("snli_1.0_train_subset.jsonl"),
            train.join("\n"),
        )
        .unwrap();
        std::fs::write(
            src.path().join("snli_1.0_test.jsonl"),
            [row(0, "entailment"), row(1, "-")].join("\n"),
        )
        .unwrap();
        let out = src.path().join("out");
        let counts = prepare(src.path(), &out).unwrap();
        assert_eq!(counts, [41, 3, 1]);
        let dev = std::fs::read_to_string(out.join("dev.jsonl")).unwrap();
        // labelled rows 0, 20, 40 are original rows 0, 21, 41 (row 3 has no label)
        let texts: Vec<String> = dev
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(texts, ["p0", "p21", "p41"]);
    }
}
