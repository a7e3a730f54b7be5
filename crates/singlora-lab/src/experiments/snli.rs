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

use super::sweep::{final_eval, prune_run, run_queue, train_run};
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
}

impl Job {
    pub fn name(&self) -> String {
        let stage = match self.stage {
            Stage::Select => "select",
            Stage::Test => "test",
        };
        format!("{stage}-{}-lr{:.0e}-s{}", self.config, self.lr, self.seed)
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

/// The records in `out/runs.jsonl` (none if it does not exist).
pub fn read_records(out: &Path) -> Result<Vec<Record>> {
    let p = out.join("runs.jsonl");
    if !p.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(&p).at(&p)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::bad_file(&p, format!("line {}: {e}", i + 1)))
        })
        .collect()
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
    if job.stage == Stage::Test {
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
    let workers: Vec<String> = spec
        .devices
        .iter()
        .flat_map(|d| std::iter::repeat_n(d.clone(), spec.jobs_per_device.max(1)))
        .collect();
    let log = spec.out.join("runs.jsonl");
    for stage in [Stage::Select, Stage::Test] {
        let records = records(spec)?;
        let done: HashSet<&str> = records.iter().map(|r| r.name.as_str()).collect();
        let jobs = match stage {
            Stage::Select => select_jobs(),
            Stage::Test => test_jobs(&picked_rates(&records)),
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
            .collect();
        let names: HashSet<String> = jobs.iter().map(Job::name).collect();
        assert_eq!(names.len(), jobs.len());
        assert_eq!(
            jobs.len(),
            CONFIGS.len() * (LR_GRID.len() + TEST_SEEDS.len())
        );
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
