//! The pre-registered SNLI comparison (protocol in `docs/results.md`): all-MiniLM-L6-v2 with
//! SingLoRA, LoRA, rsLoRA, LoRA+ and DoRA at rank 8 and SingLoRA at rank 16 (LoRA r = 8's
//! parameters), on `query` and `key`. Each configuration's learning rate is picked on a dev
//! split carved out of SNLI's training data (one seed per grid point); then five seeds per
//! configuration at the picked rate are scored on the SNLI test set, keeping every test
//! prediction so that methods can be compared pair by pair.
//!
//! Then, on the same runs' settings: learning-rate stability (multiples of each picked rate,
//! with the default clipping and warm-up, then with both off) and the ramp length without
//! warm-up. The decoder suite ([`Suite::Decoder`], SmolLM2 as a last-token classifier with
//! adapters on every linear layer) runs the selection and test stages only.
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
use singlora::quant::BaseDtype;
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
/// The decoder suite's configurations: equal rank, and SingLoRA at the rank whose parameter
/// count is nearest LoRA r = 8's on SmolLM2 (r = 12: 82,944 adapter parameters a layer against
/// LoRA's 81,408; SingLoRA's non-square adapter has max(in, out)·r, LoRA's (in + out)·r).
pub const DECODER_CONFIGS: [(&str, Method, usize); 3] = [
    ("singlora-r8", Method::SingLora, 8),
    ("lora-r8", Method::Lora, 8),
    ("singlora-r12", Method::SingLora, 12),
];
/// The decoder suite's adapted modules: every linear layer, the MLP's non-square ones included.
pub const DECODER_TARGETS: &str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";
/// The decoder suite's test seeds.
pub const DECODER_TEST_SEEDS: [u64; 3] = [1, 2, 3];

/// Which model family the comparison runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// all-MiniLM-L6-v2, adapters on `query` and `key`, every stage.
    Encoder,
    /// A LLaMA-family decoder (SmolLM2-135M) as a last-token classifier, adapters on every
    /// linear layer; selection and test stages.
    Decoder,
}

impl Suite {
    pub fn configs(self) -> &'static [(&'static str, Method, usize)] {
        match self {
            Suite::Encoder => &CONFIGS,
            Suite::Decoder => &DECODER_CONFIGS,
        }
    }
    pub fn targets(self) -> &'static str {
        match self {
            Suite::Encoder => TARGETS,
            Suite::Decoder => DECODER_TARGETS,
        }
    }
    pub fn test_seeds(self) -> &'static [u64] {
        match self {
            Suite::Encoder => &TEST_SEEDS,
            Suite::Decoder => &DECODER_TEST_SEEDS,
        }
    }
    /// The stages this suite runs, in order.
    pub fn stages(self) -> &'static [Stage] {
        match self {
            Suite::Encoder => &[
                Stage::Select,
                Stage::Test,
                Stage::Stability,
                Stage::Ramp,
                Stage::Plain,
            ],
            Suite::Decoder => &[Stage::Select, Stage::Test, Stage::Base],
        }
    }
    /// What plots and tables call the model.
    pub fn model_name(self) -> &'static str {
        match self {
            Suite::Encoder => "MiniLM",
            Suite::Decoder => "SmolLM2-135M",
        }
    }
}

impl std::str::FromStr for Suite {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "encoder" => Ok(Suite::Encoder),
            "decoder" => Ok(Suite::Decoder),
            _ => Err(Error::msg(format!(
                "unknown suite {s:?}: expected encoder or decoder"
            ))),
        }
    }
}

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
    pub suite: Suite,
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
    /// Ramp runs: the ramp's length as a fraction of the updates.
    pub ramp: Option<f64>,
    /// Frozen-base runs: how the base's linear weights are kept (else as loaded).
    pub base: Option<BaseDtype>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Select,
    Test,
    /// A test run at a multiple of the picked rate (learning-rate stability).
    Stability,
    /// A test run at the picked rate without warm-up, with a ramp of a given length.
    Ramp,
    /// A stability run (every multiple, ×1 included) without clipping and warm-up.
    Plain,
    /// A test run at the picked rate with the frozen base kept in fewer bits (FP8, NF4).
    Base,
}

impl Job {
    pub fn name(&self) -> String {
        let stage = match self.stage {
            Stage::Select => "select",
            Stage::Test => "test",
            Stage::Stability => "stab",
            Stage::Ramp => "ramp",
            Stage::Plain => "plain",
            Stage::Base => "base",
        };
        match self.stage {
            // multiples of the picked rate need more digits
            Stage::Stability | Stage::Plain => {
                format!("{stage}-{}-lr{:.3e}-s{}", self.config, self.lr, self.seed)
            }
            Stage::Ramp => format!(
                "{stage}-{}-T{}pct-s{}",
                self.config,
                (1000.0 * self.ramp.unwrap_or(0.0)).round() / 10.0,
                self.seed
            ),
            Stage::Base => format!(
                "{stage}-{}-{}-lr{:.0e}-s{}",
                self.base.unwrap_or_default(),
                self.config,
                self.lr,
                self.seed
            ),
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
    /// Ramp runs: the ramp's length as a fraction of the updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<f64>,
    /// Frozen-base runs: how the base's linear weights were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseDtype>,
}

/// The selection runs: every configuration at every grid rate, one seed.
pub fn select_jobs(suite: Suite) -> Vec<Job> {
    suite
        .configs()
        .iter()
        .flat_map(|&(config, method, rank)| {
            LR_GRID.iter().map(move |&lr| Job {
                stage: Stage::Select,
                config,
                method,
                rank,
                lr,
                seed: SELECT_SEED,
                ramp: None,
                base: None,
            })
        })
        .collect()
}

/// Each configuration's picked rate: the highest dev accuracy of its selection runs (a tie
/// goes to the lower rate); None until all of its grid has been run.
pub fn picked_rates(records: &[Record], suite: Suite) -> BTreeMap<&'static str, f64> {
    let mut out = BTreeMap::new();
    for &(config, _, _) in suite.configs() {
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
pub fn test_jobs(picked: &BTreeMap<&'static str, f64>, suite: Suite) -> Vec<Job> {
    suite
        .configs()
        .iter()
        .filter_map(|&(config, method, rank)| {
            picked.get(config).map(|&lr| (config, method, rank, lr))
        })
        .flat_map(|(config, method, rank, lr)| {
            suite.test_seeds().iter().map(move |&seed| Job {
                stage: Stage::Test,
                config,
                method,
                rank,
                lr,
                seed,
                ramp: None,
                base: None,
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

/// The stability runs of each configuration whose rate is picked, in [`STABILITY_ORDER`]:
/// with clipping and warm-up ([`Stage::Stability`]) every factor but 1 (×1 is the test runs),
/// without them ([`Stage::Plain`]) every factor.
pub fn stability_jobs(picked: &BTreeMap<&'static str, f64>, stage: Stage) -> Vec<Job> {
    let mut out = vec![];
    for name in STABILITY_ORDER {
        let Some(&(config, method, rank)) = CONFIGS.iter().find(|c| c.0 == name) else {
            continue;
        };
        let Some(&lr) = picked.get(config) else {
            continue;
        };
        for f in STABILITY_FACTORS
            .iter()
            .filter(|&&f| f != 1.0 || stage == Stage::Plain)
        {
            for &seed in &TEST_SEEDS {
                out.push(Job {
                    stage,
                    config,
                    method,
                    rank,
                    lr: lr * f,
                    seed,
                    ramp: None,
                    base: None,
                });
            }
        }
    }
    out
}

/// The ramp lengths tried without warm-up, as fractions of the updates.
pub const RAMP_FRACTIONS: [f64; 5] = [0.0, 0.005, 0.02, 0.10, 0.30];
/// The configuration whose ramp is varied.
pub const RAMP_CONFIG: &str = "singlora-r8";

/// The ramp runs: [`RAMP_CONFIG`] at its picked rate, no warm-up, each ramp length and test
/// seed.
pub fn ramp_jobs(picked: &BTreeMap<&'static str, f64>) -> Vec<Job> {
    let Some(&(config, method, rank)) = CONFIGS.iter().find(|c| c.0 == RAMP_CONFIG) else {
        return vec![];
    };
    let Some(&lr) = picked.get(config) else {
        return vec![];
    };
    RAMP_FRACTIONS
        .iter()
        .flat_map(|&t| {
            TEST_SEEDS.iter().map(move |&seed| Job {
                stage: Stage::Ramp,
                config,
                method,
                rank,
                lr,
                seed,
                ramp: Some(t),
                base: None,
            })
        })
        .collect()
}

/// The frozen-base stage (decoder suite): these configurations at their picked rates, with
/// the base's linear weights in each of these types, the test seeds.
pub const BASE_CONFIGS: [&str; 2] = ["singlora-r8", "lora-r8"];
pub const BASE_DTYPES: [BaseDtype; 2] = [BaseDtype::Fp8, BaseDtype::Nf4];

/// The frozen-base runs of `suite` (FP8 only where `gpu`: it runs on CUDA only).
pub fn base_jobs(picked: &BTreeMap<&'static str, f64>, suite: Suite, gpu: bool) -> Vec<Job> {
    let tests: Vec<Job> = test_jobs(picked, suite)
        .into_iter()
        .filter(|j| BASE_CONFIGS.contains(&j.config))
        .collect();
    BASE_DTYPES
        .iter()
        .filter(|&&b| gpu || b != BaseDtype::Fp8)
        .flat_map(|&base| {
            tests.iter().map(move |j| Job {
                stage: Stage::Base,
                base: Some(base),
                ..j.clone()
            })
        })
        .collect()
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

/// The training settings of `job`: the protocol's for its stage.
fn job_config(spec: &SnliSpec, train: &Path, job: &Job, device: &str) -> Result<TrainConfig> {
    let mut cfg = TrainConfig {
        model: spec.model.clone(),
        train: train.to_path_buf(),
        eval: Some(spec.data.join("dev.jsonl")),
        task: Task::Classify,
        method: job.method,
        rank: job.rank,
        alpha: job.rank as f64,
        targets: Some(spec.suite.targets().into()),
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
    match job.stage {
        Stage::Ramp => {
            cfg.warmup_ratio = 0.0;
            cfg.warmup_steps = None;
            cfg.ramp_steps = None;
            cfg.ramp_fraction = job.ramp.unwrap_or(0.0);
        }
        Stage::Plain => {
            cfg.warmup_ratio = 0.0;
            cfg.warmup_steps = None;
            cfg.max_grad_norm = 0.0;
        }
        Stage::Base => cfg.base_dtype = job.base.unwrap_or_default(),
        Stage::Select | Stage::Test | Stage::Stability => {}
    }
    Ok(cfg)
}

fn run_one(spec: &SnliSpec, train: &Path, job: &Job, device: &str) -> Result<Record> {
    let dir = spec.out.join("runs").join(job.name());
    let cfg = job_config(spec, train, job, device)?;
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
        // scored on the base as trained
        let base = job.base.unwrap_or_default();
        let session = singlora::session::Session::load_as(&spec.model, &dir, dev, base)?;
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
        ramp: job.ramp,
        base: job.base,
    })
}

/// Runs what is left of the protocol: the selection runs, then the test runs of each
/// configuration whose rate is picked, then the suite's later stages. Returns every record of
/// this training-set size.
pub fn run(
    spec: &SnliSpec,
    progress: impl Fn(&Record, usize, usize) + Sync,
) -> Result<Vec<Record>> {
    std::fs::create_dir_all(&spec.out).at(&spec.out)?;
    let train = train_file(spec)?;
    let workers = workers(&spec.devices, spec.jobs_per_device);
    let log = spec.out.join("runs.jsonl");
    for &stage in spec.suite.stages() {
        let records = records(spec)?;
        let done: HashSet<&str> = records.iter().map(|r| r.name.as_str()).collect();
        let picked = picked_rates(&records, spec.suite);
        let jobs = match stage {
            Stage::Select => select_jobs(spec.suite),
            Stage::Test => test_jobs(&picked, spec.suite),
            Stage::Stability | Stage::Plain => stability_jobs(&picked, stage),
            Stage::Ramp => ramp_jobs(&picked),
            Stage::Base => {
                let gpu = spec.devices.iter().all(|d| d.starts_with("cuda"));
                base_jobs(&picked, spec.suite, gpu)
            }
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

/// The table cells of the paired comparison of two sets of seed-matched test runs: the mean
/// difference in accuracy (`runs` − `reference`) with its 95% bootstrap interval over seeds
/// and rows and the number of pairs, and McNemar's exact p per pair; dashes without a pair.
fn paired(
    runs: &BTreeMap<u64, &Record>,
    reference: &BTreeMap<u64, &Record>,
    truth: &[u8],
) -> (String, String) {
    use super::stats::{bootstrap_mean, discordant, mcnemar_exact};
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = runs
        .iter()
        .filter_map(|(s, r)| reference.get(s).map(|q| (predictions(r), predictions(q))))
        .collect();
    if pairs.is_empty() {
        return none_paired();
    }
    let d: Vec<Vec<i8>> = pairs
        .iter()
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .zip(truth)
                .map(|((x, y), t)| (x == t) as i8 - (y == t) as i8)
                .collect()
        })
        .collect();
    let ps: Vec<String> = pairs
        .iter()
        .map(|(a, b)| {
            let (only_a, only_b) = discordant(a, b, truth);
            fmt_p(mcnemar_exact(only_a, only_b))
        })
        .collect();
    let i = bootstrap_mean(&d, 10_000, 0);
    (
        format!(
            "{:+.2} [{:+.2}, {:+.2}] ({} pairs)",
            100.0 * i.estimate,
            100.0 * i.lo,
            100.0 * i.hi,
            pairs.len()
        ),
        ps.join(", "),
    )
}

/// The cells of a row compared with nothing (the reference itself).
fn none_paired() -> (String, String) {
    ("–".to_string(), "–".to_string())
}

/// The training updates whose losses the frozen-base table compares.
pub const LOSS_UPDATES: usize = 50;

/// The largest relative difference between two runs' training losses over their first
/// [`LOSS_UPDATES`] updates (from each run directory's `metrics.jsonl`); None where either run's
/// file is missing or holds fewer updates.
fn loss_difference(run: &Path, reference: &Path) -> Option<f64> {
    let losses = |dir: &Path| -> Option<Vec<f64>> {
        let lines = singlora::metrics::read_metrics(&dir.join("metrics.jsonl")).ok()?;
        let v: Vec<f64> = lines
            .iter()
            .filter_map(|l| l.get("loss").and_then(|x| x.as_f64()))
            .take(LOSS_UPDATES)
            .collect();
        (v.len() == LOSS_UPDATES).then_some(v)
    };
    let (a, b) = (losses(run)?, losses(reference)?);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-12))
        .fold(None, |acc: Option<f64>, d| {
            Some(acc.map_or(d, |m| m.max(d)))
        })
}

/// Accuracies (%) as a table cell.
fn per_seed(accs: &[f64]) -> String {
    accs.iter()
        .map(|a| format!("{a:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `summary.md` and the plots in `out` from the records of one training-set size: the
/// selection grid on dev (`lr.svg`), the test table with intervals and the comparison with
/// [`REFERENCE`], then whichever later stages have runs: learning-rate stability with and
/// without clipping and warm-up (`stability.svg`, `stability-plain.svg`) and the ramp
/// (`ramp.svg`). Returns the markdown.
pub fn report(records: &[Record], data: &Path, out: &Path, suite: Suite) -> Result<String> {
    use super::stats::bootstrap_mean;
    use std::fmt::Write as _;
    let rows = records.first().map_or(0, |r| r.train_rows);
    let model = suite.model_name();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### Learning rate picked on dev ({model}, seed {SELECT_SEED}, {rows} training pairs)\n"
    );
    let _ = write!(md, "| configuration |");
    for lr in LR_GRID {
        let _ = write!(md, " {lr:.0e} |");
    }
    let _ = writeln!(md, " picked |\n|---|{}---|", "---|".repeat(LR_GRID.len()));
    let picked = picked_rates(records, suite);
    let mut series = vec![];
    for &(config, _, _) in suite.configs() {
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
            &format!("SNLI dev accuracy against learning rate ({model}, {rows} pairs, seed 0)"),
            "learning rate (LoRA+: of A)",
            "dev accuracy (%)",
            &series,
            true,
        )?;
    }

    let scored: Vec<&Record> = records
        .iter()
        .filter(|r| r.stage != Stage::Select)
        .collect();
    let Some(first) = scored.first() else {
        let _ = writeln!(md, "\nNo test runs yet.");
        singlora::atomic::write_file(&out.join("summary.md"), md.as_bytes())?;
        return Ok(md);
    };
    for r in &scored {
        if r.labels != first.labels {
            return Err(Error::msg(format!(
                "{}: label order {:?} differs from {:?}",
                r.name, r.labels, first.labels
            )));
        }
    }
    let truth = test_truth(data, &first.labels)?;
    let by_seed = |stage: Stage, keep: &dyn Fn(&Record) -> bool| -> BTreeMap<u64, &Record> {
        scored
            .iter()
            .filter(|r| r.stage == stage && keep(r))
            .map(|r| (r.seed, *r))
            .collect()
    };
    let accuracy_ci = |runs: &BTreeMap<u64, &Record>| {
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
        bootstrap_mean(&correct, 10_000, 0)
    };
    let accuracies = |runs: &BTreeMap<u64, &Record>| -> Vec<f64> {
        runs.values()
            .map(|r| 100.0 * r.test_accuracy.unwrap_or(f64::NAN))
            .collect()
    };
    let reference = by_seed(Stage::Test, &|r| r.config == REFERENCE);
    let seeds = suite.test_seeds();
    let _ = writeln!(
        md,
        "\n### Test accuracy ({} SNLI test pairs; seeds {}–{})\n",
        truth.len(),
        seeds[0],
        seeds[seeds.len() - 1]
    );
    let _ = writeln!(
        md,
        "| configuration | trainable params | lr | accuracy per seed (%) | mean ± std | mean, 95% interval | − {REFERENCE}, 95% interval | McNemar p per seed |\n|---|---|---|---|---|---|---|---|"
    );
    for &(config, _, _) in suite.configs() {
        let runs = by_seed(Stage::Test, &|r| r.config == config);
        let Some(first_run) = runs.values().next() else {
            continue;
        };
        let accs = accuracies(&runs);
        let (m, sd) = super::sweep::mean_std(&accs);
        let ci = accuracy_ci(&runs);
        let (diff, ps) = match config == REFERENCE {
            true => none_paired(),
            false => paired(&runs, &reference, &truth),
        };
        let _ = writeln!(
            md,
            "| {config} | {} | {:.0e} | {} | {m:.2} ± {sd:.2} | {:.2} [{:.2}, {:.2}] | {diff} | {ps} |",
            first_run.trainable_params,
            first_run.lr,
            per_seed(&accs),
            100.0 * ci.estimate,
            100.0 * ci.lo,
            100.0 * ci.hi,
        );
    }
    if records.iter().any(|r| r.stage == Stage::Base) {
        let _ = writeln!(
            md,
            "\n### Frozen base in fewer bits (test accuracy; against the same configuration on the \
             bf16 base, seed by seed)\n"
        );
        let _ = writeln!(
            md,
            "| base | configuration | accuracy per seed (%) | mean ± std | − bf16 base, 95% interval | McNemar p per seed | training loss, first {LOSS_UPDATES} updates: largest relative difference |\n|---|---|---|---|---|---|---|"
        );
        for base in BASE_DTYPES {
            for &(config, _, _) in suite.configs() {
                let runs = by_seed(Stage::Base, &|r| r.config == config && r.base == Some(base));
                if runs.is_empty() {
                    continue;
                }
                let bf16 = by_seed(Stage::Test, &|r| r.config == config);
                let accs = accuracies(&runs);
                let (m, sd) = super::sweep::mean_std(&accs);
                let (diff, ps) = paired(&runs, &bf16, &truth);
                let curves = runs
                    .iter()
                    .filter_map(|(seed, r)| {
                        let q = bf16.get(seed)?;
                        loss_difference(
                            &out.join("runs").join(&r.name),
                            &out.join("runs").join(&q.name),
                        )
                    })
                    .fold(None, |acc: Option<f64>, d| {
                        Some(acc.map_or(d, |a| a.max(d)))
                    });
                let _ = writeln!(
                    md,
                    "| {base} | {config} | {} | {m:.2} ± {sd:.2} | {diff} | {ps} | {} |",
                    per_seed(&accs),
                    curves.map_or("–".into(), |d| format!("{:.1}%", 100.0 * d)),
                );
            }
        }
    }
    if suite == Suite::Encoder {
        for stage in [Stage::Stability, Stage::Plain] {
            stability_table(&mut md, records, &picked, stage, out, rows)?;
        }
        // the ramp: each length against no ramp, seed by seed
        let ramp_runs = |t: f64| by_seed(Stage::Ramp, &|r| r.ramp == Some(t));
        if records.iter().any(|r| r.stage == Stage::Ramp) {
            let none = ramp_runs(0.0);
            let updates = records
                .iter()
                .find(|r| r.stage == Stage::Ramp)
                .map_or(0, |r| r.updates);
            let _ = writeln!(
                md,
                "\n### Ramp length without warm-up ({RAMP_CONFIG} at {}, {updates} updates, clipping at 1.0; collapsed: below {:.0}%)\n",
                picked.get(RAMP_CONFIG).map_or("–".into(), |lr| format!("{lr:.0e}")),
                100.0 * COLLAPSED_BELOW
            );
            let _ = writeln!(
                md,
                "| ramp T | accuracy per seed (%) | mean ± std | − no ramp, 95% interval | McNemar p per seed | collapsed |\n|---|---|---|---|---|---|"
            );
            let mut dots = vec![];
            for t in RAMP_FRACTIONS {
                let runs = ramp_runs(t);
                if runs.is_empty() {
                    continue;
                }
                let accs = accuracies(&runs);
                let (m, sd) = super::sweep::mean_std(&accs);
                let (diff, ps) = match t == 0.0 {
                    true => none_paired(),
                    false => paired(&runs, &none, &truth),
                };
                let collapsed = accs
                    .iter()
                    .filter(|&&a| a < 100.0 * COLLAPSED_BELOW)
                    .count();
                let steps = (t * updates as f64).round();
                let _ = writeln!(
                    md,
                    "| {}% ({steps} updates) | {} | {m:.2} ± {sd:.2} | {diff} | {ps} | {collapsed} of {} |",
                    100.0 * t,
                    per_seed(&accs),
                    accs.len()
                );
                dots.extend(accs.iter().map(|&a| (100.0 * t, a)));
            }
            crate::bands::write_dots(
                &out.join("ramp.svg"),
                &format!("SNLI test accuracy against ramp length ({RAMP_CONFIG}, no warm-up)"),
                "ramp T (% of updates)",
                "test accuracy (%)",
                &[crate::bands::DotSeries {
                    label: RAMP_CONFIG.into(),
                    points: dots,
                }],
                false,
            )?;
        }
    }
    singlora::atomic::write_file(&out.join("summary.md"), md.as_bytes())?;
    Ok(md)
}

/// A stability table: test accuracy at each multiple of the picked rate, the spread of the
/// means over the whole window and over the two 2× windows around the picked rate, and the
/// collapsed runs; with a plot of every run. [`Stage::Stability`]: with clipping and warm-up
/// (its ×1 column is the test runs); [`Stage::Plain`]: without either.
fn stability_table(
    md: &mut String,
    records: &[Record],
    picked: &BTreeMap<&'static str, f64>,
    stage: Stage,
    out: &Path,
    rows: usize,
) -> Result<()> {
    use std::fmt::Write as _;
    let runs_at = |config: &str, lr: f64| -> Vec<f64> {
        records
            .iter()
            .filter(|r| {
                r.config == config
                    && match stage {
                        Stage::Plain => r.stage == Stage::Plain,
                        _ => matches!(r.stage, Stage::Test | Stage::Stability),
                    }
                    && (r.lr - lr).abs() <= 1e-9 * lr
            })
            .filter_map(|r| r.test_accuracy)
            .map(|a| 100.0 * a)
            .collect()
    };
    if !records.iter().any(|r| r.stage == stage) {
        return Ok(());
    }
    let (what, file) = match stage {
        Stage::Plain => ("without clipping and warm-up", "stability-plain.svg"),
        _ => ("clipping at 1.0, 6% warm-up", "stability.svg"),
    };
    let _ = writeln!(
        md,
        "\n### Learning-rate stability, {what} (test accuracy, seeds {}–{}; collapsed: below {:.0}%)\n",
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
    let mut dots = vec![];
    for name in STABILITY_ORDER {
        let Some(&lr) = picked.get(name) else {
            continue;
        };
        // LoRA+'s B moves at 16 times the rate of A, which is the rate given
        let b_rate = |x: f64| {
            if name.starts_with("loraplus") {
                format!(" (B {:.2e})", 16.0 * x)
            } else {
                String::new()
            }
        };
        let mut means = vec![];
        let (mut collapsed, mut total) = (0, 0);
        let mut points = vec![];
        let _ = write!(md, "| {name} |");
        for f in STABILITY_FACTORS {
            let accs = runs_at(name, lr * f);
            total += accs.len();
            collapsed += accs
                .iter()
                .filter(|&&a| a < 100.0 * COLLAPSED_BELOW)
                .count();
            points.extend(accs.iter().map(|&a| (lr * f, a)));
            if accs.is_empty() {
                means.push(None);
                let _ = write!(md, " – |");
            } else {
                let (m, sd) = super::sweep::mean_std(&accs);
                means.push(Some(m));
                let _ = write!(
                    md,
                    " {m:.2} ± {sd:.2} ({}) at {:.2e}{} |",
                    accs.len(),
                    lr * f,
                    b_rate(lr * f)
                );
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
        if !points.is_empty() {
            dots.push(crate::bands::DotSeries {
                label: name.into(),
                points,
            });
        }
    }
    crate::bands::write_dots(
        &out.join(file),
        &format!("SNLI test accuracy against learning rate, {what} (MiniLM, {rows} pairs)"),
        "learning rate (LoRA+: of A)",
        "test accuracy (%)",
        &dots,
        true,
    )
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
            ramp: None,
            base: None,
        }
    }

    #[test]
    fn a_rate_is_picked_only_from_a_whole_grid_and_ties_go_low() {
        let mut rs: Vec<Record> = LR_GRID[..5]
            .iter()
            .map(|&lr| rec("lora-r8", lr, 0.5))
            .collect();
        assert!(picked_rates(&rs, Suite::Encoder).is_empty());
        rs.push(rec("lora-r8", LR_GRID[5], 0.4));
        rs[3].dev_accuracy = 0.7;
        rs[4].dev_accuracy = 0.7;
        let picked = picked_rates(&rs, Suite::Encoder);
        assert_eq!(picked.len(), 1);
        assert_eq!(picked["lora-r8"], LR_GRID[3]);
        let tests = test_jobs(&picked, Suite::Encoder);
        assert_eq!(tests.len(), TEST_SEEDS.len());
        assert!(tests
            .iter()
            .all(|j| j.lr == LR_GRID[3] && j.config == "lora-r8"));
    }

    #[test]
    fn every_run_has_its_own_name() {
        let picked: BTreeMap<&str, f64> = CONFIGS.iter().map(|c| (c.0, 1e-3)).collect();
        let jobs: Vec<Job> = select_jobs(Suite::Encoder)
            .into_iter()
            .chain(test_jobs(&picked, Suite::Encoder))
            .chain(stability_jobs(&picked, Stage::Stability))
            .chain(stability_jobs(&picked, Stage::Plain))
            .chain(ramp_jobs(&picked))
            .collect();
        let names: HashSet<String> = jobs.iter().map(Job::name).collect();
        assert_eq!(names.len(), jobs.len());
        let stability = (STABILITY_FACTORS.len() - 1) * TEST_SEEDS.len();
        let plain = STABILITY_FACTORS.len() * TEST_SEEDS.len();
        assert_eq!(
            jobs.len(),
            CONFIGS.len() * (LR_GRID.len() + TEST_SEEDS.len() + stability + plain)
                + RAMP_FRACTIONS.len() * TEST_SEEDS.len()
        );
        // a stability run sits at a multiple of the picked rate, never at the rate itself;
        // without clipping and warm-up the rate itself is run too
        let picked_one = BTreeMap::from([("lora-r8", 2e-3)]);
        let rates =
            |jobs: &[Job]| -> HashSet<u64> { jobs.iter().map(|j| j.lr.to_bits()).collect() };
        let want = |l: &[f64]| -> HashSet<u64> { l.iter().map(|l| l.to_bits()).collect() };
        let stab = stability_jobs(&picked_one, Stage::Stability);
        assert_eq!(rates(&stab), want(&[5e-4, 1e-3, 4e-3, 8e-3]));
        assert_eq!(stab.len(), stability);
        let plain_jobs = stability_jobs(&picked_one, Stage::Plain);
        assert_eq!(rates(&plain_jobs), want(&[5e-4, 1e-3, 2e-3, 4e-3, 8e-3]));
        assert!(plain_jobs.iter().all(|j| j.stage == Stage::Plain));
        // the ramp varies only the ramp, on its configuration at its picked rate
        assert!(ramp_jobs(&picked_one).is_empty());
        let ramps = ramp_jobs(&BTreeMap::from([(RAMP_CONFIG, 5e-3)]));
        assert_eq!(ramps.len(), RAMP_FRACTIONS.len() * TEST_SEEDS.len());
        assert!(ramps
            .iter()
            .all(|j| j.lr == 5e-3 && j.config == RAMP_CONFIG));
        assert_eq!(ramps[5].name(), "ramp-singlora-r8-T0.5pct-s1");
        assert_eq!(ramps[24].name(), "ramp-singlora-r8-T30pct-s5");
    }

    #[test]
    fn the_decoder_suite_runs_its_own_configurations_on_every_linear_layer() {
        let suite: Suite = "decoder".parse().unwrap();
        assert!("roberta".parse::<Suite>().is_err());
        assert_eq!(suite.stages(), [Stage::Select, Stage::Test, Stage::Base]);
        let select = select_jobs(suite);
        assert_eq!(select.len(), DECODER_CONFIGS.len() * LR_GRID.len());
        let picked: BTreeMap<&str, f64> = DECODER_CONFIGS.iter().map(|c| (c.0, 1e-3)).collect();
        let tests = test_jobs(&picked, suite);
        assert_eq!(
            tests.len(),
            DECODER_CONFIGS.len() * DECODER_TEST_SEEDS.len()
        );
        assert!(suite.targets().contains("gate_proj") && suite.targets().contains("down_proj"));
        // r = 12 is the SingLoRA rank whose count on SmolLM2's layer (hidden 576, key/value
        // 192, MLP 1536) is nearest LoRA r = 8's
        let lora = |i: usize, o: usize| (i + o) * 8;
        let sing = |i: usize, o: usize, r: usize| i.max(o) * r;
        let shapes = [
            (576, 576),
            (576, 192),
            (576, 192),
            (576, 576),
            (576, 1536),
            (576, 1536),
            (1536, 576),
        ];
        let lora_n: usize = shapes.iter().map(|&(i, o)| lora(i, o)).sum();
        let best = (1..=32)
            .min_by_key(|&r| {
                let n: usize = shapes.iter().map(|&(i, o)| sing(i, o, r)).sum();
                n.abs_diff(lora_n)
            })
            .unwrap();
        assert_eq!(best, 12);
        assert_eq!(DECODER_CONFIGS[2], ("singlora-r12", Method::SingLora, 12));
    }

    /// Test-stage records of one configuration with the given per-row correctness patterns
    /// against `truth` (all label 0): a run is right where its pattern has a 1.
    fn scored(
        stage: Stage,
        config: &str,
        lr: f64,
        ramp: Option<f64>,
        right: &[&[u8]],
    ) -> Vec<Record> {
        right
            .iter()
            .enumerate()
            .map(|(k, pattern)| {
                let preds: String = pattern
                    .iter()
                    .map(|&c| if c == 1 { '0' } else { '1' })
                    .collect();
                let acc = pattern.iter().map(|&c| c as f64).sum::<f64>() / pattern.len() as f64;
                Record {
                    name: format!("{config}-{lr}-{ramp:?}-{k}"),
                    stage,
                    seed: TEST_SEEDS[k],
                    test_accuracy: Some(acc),
                    test_predictions: Some(preds),
                    labels: vec!["entailment".into(), "neutral".into()],
                    ramp,
                    ..rec(config, lr, 0.7)
                }
            })
            .collect()
    }

    #[test]
    fn the_report_pairs_runs_by_seed_and_draws_every_stage() {
        let dir = tempfile::tempdir().unwrap();
        let rows = 10;
        let test: Vec<String> = (0..rows)
            .map(|i| serde_json::json!({"text": format!("p{i}"), "text_pair": "h", "label": "entailment"}).to_string())
            .collect();
        std::fs::write(dir.path().join("test.jsonl"), test.join("\n")).unwrap();
        let mut rs = vec![];
        for &(config, _, _) in &CONFIGS {
            for (i, &lr) in LR_GRID.iter().enumerate() {
                rs.push(rec(config, lr, if i == 2 { 0.8 } else { 0.5 }));
            }
        }
        let lr = LR_GRID[2];
        let all: &[u8] = &[1; 10];
        let nine: &[u8] = &[1, 1, 1, 1, 1, 1, 1, 1, 1, 0];
        let eight: &[u8] = &[1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
        rs.extend(scored(Stage::Test, "lora-r8", lr, None, &[all, all]));
        // SingLoRA r = 8 is one row behind on each of the two seeds: −10 points exactly
        rs.extend(scored(Stage::Test, "singlora-r8", lr, None, &[nine, nine]));
        rs.extend(scored(
            Stage::Stability,
            "singlora-r8",
            2.0 * lr,
            None,
            &[eight, eight],
        ));
        rs.extend(scored(Stage::Plain, "singlora-r8", lr, None, &[nine, all]));
        rs.extend(scored(
            Stage::Ramp,
            "singlora-r8",
            lr,
            Some(0.0),
            &[all, all],
        ));
        rs.extend(scored(
            Stage::Ramp,
            "singlora-r8",
            lr,
            Some(0.1),
            &[eight, nine],
        ));
        let md = report(&rs, dir.path(), dir.path(), Suite::Encoder).unwrap();
        assert!(
            md.contains("| singlora-r8 | 0 | 5e-4 | 90.00, 90.00 | 90.00 ± 0.00"),
            "{md}"
        );
        // the interval resamples test rows as well as seeds, so only the estimate is exact
        assert!(
            md.contains("| -10.00 [-30.00, +0.00] (2 pairs) | 1.00, 1.00 |"),
            "{md}"
        );
        // the ×2 point and the ×1 test runs give a spread of 10 points in the ×1…×2 window
        assert!(md.contains("| 80.00 ± 0.00 (2) at 1.00e-3 |"), "{md}");
        assert!(md.contains("without clipping and warm-up"), "{md}");
        assert!(md.contains("| 95.00 ± 7.07 (2) at 5.00e-4 |"), "{md}");
        // the ramp of 10% against none: −20 and −10 points on the two seeds
        assert!(
            md.contains("| 10% (0 updates) | 80.00, 90.00 | 85.00 ± 7.07 | -15.00"),
            "{md}"
        );
        for f in [
            "summary.md",
            "lr.svg",
            "stability.svg",
            "stability-plain.svg",
            "ramp.svg",
        ] {
            assert!(dir.path().join(f).exists(), "{f} missing");
        }
    }

    /// The decoder suite's frozen-base table: each base's runs against the bf16 test runs of
    /// the same configuration, seed by seed, with the training losses of the first updates
    /// compared from the runs' own files.
    #[test]
    fn the_frozen_base_table_pairs_each_base_with_the_bf16_runs() {
        let dir = tempfile::tempdir().unwrap();
        let test: Vec<String> = (0..10)
            .map(|i| serde_json::json!({"text": format!("p{i}"), "text_pair": "h", "label": "entailment"}).to_string())
            .collect();
        std::fs::write(dir.path().join("test.jsonl"), test.join("\n")).unwrap();
        let all: &[u8] = &[1; 10];
        let nine: &[u8] = &[1, 1, 1, 1, 1, 1, 1, 1, 1, 0];
        let mut rs = vec![];
        for &(config, _, _) in &DECODER_CONFIGS {
            for (i, &lr) in LR_GRID.iter().enumerate() {
                rs.push(rec(config, lr, if i == 3 { 0.8 } else { 0.5 }));
            }
        }
        let lr = LR_GRID[3];
        rs.extend(scored(Stage::Test, "lora-r8", lr, None, &[all, all]));
        rs.extend(scored(Stage::Test, "singlora-r8", lr, None, &[all, all]));
        let mut fp8 = scored(Stage::Base, "singlora-r8", lr, None, &[nine, all]);
        for r in &mut fp8 {
            r.base = Some(BaseDtype::Fp8);
            r.name = format!("fp8-{}", r.name);
        }
        rs.extend(fp8.clone());
        // training losses: the FP8 run 2% above the bf16 one at one update of seed 1
        let write = |name: &str, bump: f64| {
            let d = dir.path().join("runs").join(name);
            std::fs::create_dir_all(&d).unwrap();
            let lines: Vec<String> = (0..LOSS_UPDATES + 5)
                .map(|i| {
                    let l = 1.0 + if i == 7 { bump } else { 0.0 };
                    serde_json::json!({"step": i + 1, "loss": l}).to_string()
                })
                .collect();
            std::fs::write(d.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
        };
        let test_s1 = rs
            .iter()
            .find(|r| r.stage == Stage::Test && r.config == "singlora-r8" && r.seed == 1)
            .unwrap()
            .name
            .clone();
        write(&fp8[0].name, 0.02);
        write(&test_s1, 0.0);
        let md = report(&rs, dir.path(), dir.path(), Suite::Decoder).unwrap();
        assert!(md.contains("### Frozen base in fewer bits"), "{md}");
        // seed 1 one row behind, seed 2 level: −5 points on the mean; one seed's curves: 2.0%
        assert!(
            md.contains("| fp8 | singlora-r8 | 90.00, 100.00 | 95.00 ± 7.07 | -5.00 ["),
            "{md}"
        );
        assert!(md.contains("| 2.0% |"), "{md}");
        assert!(!md.contains("| nf4 |"), "{md}");
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

#[cfg(test)]
mod child_args {
    use super::*;
    use clap::Parser;

    /// `singlora train`'s command line as far as a run's settings go.
    #[derive(Parser)]
    struct TrainCli {
        #[command(flatten)]
        cfg: TrainConfig,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        overwrite: bool,
        #[arg(long)]
        quiet: bool,
    }

    /// A child `singlora train` (the GPU runs) gets every setting of each stage's protocol:
    /// its command line parses back into the configuration an in-process run trains with.
    #[test]
    fn child_processes_train_with_the_protocols_settings() {
        let spec = SnliSpec {
            suite: Suite::Encoder,
            model: "m".into(),
            data: "d".into(),
            train_rows: 100,
            batch_size: 32,
            max_length: 128,
            devices: vec!["cuda".into()],
            jobs_per_device: 1,
            out: "o".into(),
            exe: Some("singlora".into()),
            deadline: None,
        };
        let picked: BTreeMap<&'static str, f64> = CONFIGS.iter().map(|c| (c.0, 2e-3)).collect();
        let mut jobs = test_jobs(&picked, Suite::Encoder);
        jobs.extend(stability_jobs(&picked, Stage::Stability));
        jobs.extend(stability_jobs(&picked, Stage::Plain));
        jobs.extend(ramp_jobs(&picked));
        let mut stages = std::collections::BTreeSet::new();
        for job in &jobs {
            let cfg = job_config(&spec, Path::new("train.jsonl"), job, "cuda").unwrap();
            let args = crate::experiments::sweep::train_args(&cfg, Path::new("run"));
            assert_eq!(args[0], "train");
            let parsed = TrainCli::try_parse_from(
                std::iter::once("singlora".to_string()).chain(args[1..].iter().cloned()),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", job.name()));
            assert_eq!(
                serde_json::to_value(&parsed.cfg).unwrap(),
                serde_json::to_value(&cfg).unwrap(),
                "{}",
                job.name()
            );
            stages.insert(format!("{:?}", job.stage));
        }
        assert_eq!(stages.len(), 4, "{stages:?}");
        // the settings that tell the stages apart
        let plain = jobs.iter().find(|j| j.stage == Stage::Plain).unwrap();
        let cfg = job_config(&spec, Path::new("t"), plain, "cuda").unwrap();
        assert_eq!((cfg.warmup_ratio, cfg.max_grad_norm), (0.0, 0.0));
        let ramp = jobs.iter().find(|j| j.stage == Stage::Ramp).unwrap();
        let cfg = job_config(&spec, Path::new("t"), ramp, "cuda").unwrap();
        assert_eq!((cfg.warmup_ratio, cfg.max_grad_norm), (0.0, 1.0));
        // the decoder suite's frozen-base runs: the base travels to the child process too
        let spec = SnliSpec {
            suite: Suite::Decoder,
            ..spec
        };
        let picked: BTreeMap<&'static str, f64> =
            DECODER_CONFIGS.iter().map(|c| (c.0, 2e-3)).collect();
        for job in base_jobs(&picked, Suite::Decoder, true) {
            let cfg = job_config(&spec, Path::new("train.jsonl"), &job, "cuda").unwrap();
            assert_eq!(Some(cfg.base_dtype), job.base);
            let args = crate::experiments::sweep::train_args(&cfg, Path::new("run"));
            let parsed = TrainCli::try_parse_from(
                std::iter::once("singlora".to_string()).chain(args[1..].iter().cloned()),
            )
            .unwrap();
            assert_eq!(parsed.cfg.base_dtype, cfg.base_dtype, "{}", job.name());
            assert_eq!(
                serde_json::to_value(&parsed.cfg).unwrap(),
                serde_json::to_value(&cfg).unwrap()
            );
        }
    }

    #[test]
    fn the_decoder_suite_retrains_two_configurations_on_each_smaller_base() {
        let picked: BTreeMap<&'static str, f64> =
            DECODER_CONFIGS.iter().map(|c| (c.0, 1e-3)).collect();
        let gpu = base_jobs(&picked, Suite::Decoder, true);
        // FP8 and NF4 × SingLoRA r 8 and LoRA r 8 × 3 seeds
        assert_eq!(gpu.len(), 2 * 2 * DECODER_TEST_SEEDS.len());
        let names: HashSet<String> = gpu.iter().map(Job::name).collect();
        assert_eq!(names.len(), gpu.len());
        assert!(
            names.contains("base-fp8-singlora-r8-lr1e-3-s1"),
            "{names:?}"
        );
        assert!(gpu.iter().all(|j| j.stage == Stage::Base && j.lr == 1e-3));
        assert!(gpu.iter().all(|j| BASE_CONFIGS.contains(&j.config)));
        // FP8 needs CUDA: on the CPU only the NF4 runs
        let cpu = base_jobs(&picked, Suite::Decoder, false);
        assert_eq!(cpu.len(), 2 * DECODER_TEST_SEEDS.len());
        assert!(cpu.iter().all(|j| j.base == Some(BaseDtype::Nf4)));
        // nothing without a picked rate
        assert!(base_jobs(&BTreeMap::new(), Suite::Decoder, true).is_empty());
        assert_eq!(
            Suite::Decoder.stages(),
            [Stage::Select, Stage::Test, Stage::Base]
        );
    }
}
