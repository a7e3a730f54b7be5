//! The trainer: `singlora train`.
//!
//! AdamW on the adapters (and a classification head), gradient accumulation, warm-up and a
//! decay schedule, global-norm clipping, evaluation, atomic checkpoints with the optimizer and
//! data position (so `--resume` continues exactly: on the CPU a resumed run ends with a
//! bit-identical adapter), a progress bar, `metrics.jsonl`, `curves.svg`, the final adapter and
//! the best one by eval loss. SingLoRA's ramp clock advances once per optimizer update.

pub mod dist;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod schedule;
pub mod state;

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::adapter::config::AdapterConfig;
use crate::adapter::file::AdapterFile;
use crate::adapter::init::SingLoraInit;
use crate::adapter::ramp::{RampClock, RampSchedule};
use crate::adapter::target::TargetSpec;
use crate::adapter::{AdapterSpec, Method};
use crate::atomic::StagedDir;
use crate::data::{self, Columns, Dataset, Encoded, LabelSet, Task};
use crate::error::{Error, IoContext, Result};
use crate::metrics::{ClassificationMetrics, MetricsLog};
use crate::model::{Pooling, Pretrained, TaskModel};
use crate::optim::{AdamW, AdamWConfig, GradAccumulator};
use dist::{Collective, LocalGroup};
use schedule::{lr_at, Schedule};
use state::TrainerState;

/// Every setting of a run; saved as `run.json` and read back by `--resume`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: PathBuf,
    pub train: PathBuf,
    pub eval: Option<PathBuf>,
    pub task: String,
    pub method: String,
    pub rank: usize,
    pub alpha: f64,
    /// None: the model family's default.
    pub targets: Option<String>,
    pub exclude: Option<String>,
    /// None: the method's default.
    pub lr: Option<f64>,
    pub epochs: usize,
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_length: usize,
    pub seed: u64,
    pub weight_decay: f64,
    pub lora_plus_ratio: f64,
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: f64,
    pub schedule: Schedule,
    pub max_grad_norm: Option<f64>,
    pub eval_every: Option<u64>,
    pub eval_fraction: Option<f64>,
    pub ramp_steps: Option<u64>,
    pub ramp_fraction: f64,
    pub init: String,
    pub rslora: bool,
    pub pooling: Option<String>,
    /// SFT: wrap prompts in the model's chat template when it has one.
    pub chat_template: bool,
    pub save_every: Option<u64>,
    pub keep_checkpoints: usize,
    pub device: String,
    /// Data parallelism: one rank per device (`cuda:0,cuda:1`, or `cpu,cpu` for a CPU test);
    /// `--batch-size` stays the global batch, split over the ranks.
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    /// f32 values per gradient bucket a GPU backward sums over the ranks while it goes on.
    #[serde(default = "default_bucket")]
    pub bucket_values: usize,
    /// LLaMA on CUDA: recompute activations in the backward instead of keeping them (the
    /// SwiGLU output; the attention probabilities where the fused attention kernels do not
    /// apply): less memory, a little more time.
    #[serde(default, alias = "recompute_attention")]
    pub recompute: bool,
    pub text_column: String,
    pub text_pair_column: Option<String>,
    pub label_column: String,
    pub prompt_column: String,
    pub completion_column: String,
    pub skip_bad_rows: bool,
    /// Train only the classification head (a linear probe of the frozen model).
    #[serde(default)]
    pub head_only: bool,
    /// Stop after this many updates as if interrupted (tests of `--resume`).
    #[serde(skip)]
    pub stop_after: Option<u64>,
    /// No progress bar or log lines.
    #[serde(skip)]
    pub quiet: bool,
}

/// 4 Mi f32 values (16 MiB) per bucket: at 7B shape with r = 8 a SingLoRA adapter's 50 MB of
/// gradients go in 3–4 reductions, the first started after the top 10 layers' backward.
pub fn default_bucket() -> usize {
    4 << 20
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            train: PathBuf::new(),
            eval: None,
            task: "classify".into(),
            method: "singlora".into(),
            rank: 8,
            alpha: 8.0,
            targets: None,
            exclude: None,
            lr: None,
            epochs: 3,
            max_steps: None,
            batch_size: 16,
            grad_accum: 1,
            max_length: 128,
            seed: 0,
            weight_decay: 0.0,
            lora_plus_ratio: 16.0,
            warmup_steps: None,
            warmup_ratio: 0.06,
            schedule: Schedule::Linear,
            max_grad_norm: Some(1.0),
            eval_every: None,
            eval_fraction: None,
            ramp_steps: None,
            ramp_fraction: 0.01,
            init: SingLoraInit::default().to_string(),
            rslora: false,
            pooling: None,
            chat_template: true,
            save_every: None,
            keep_checkpoints: 3,
            device: "cpu".into(),
            devices: None,
            bucket_values: default_bucket(),
            recompute: false,
            text_column: "text".into(),
            text_pair_column: None,
            label_column: "label".into(),
            prompt_column: "prompt".into(),
            completion_column: "completion".into(),
            skip_bad_rows: false,
            head_only: false,
            stop_after: None,
            quiet: false,
        }
    }
}

pub fn parse_task(s: &str) -> Result<Task> {
    match s {
        "classify" | "classification" => Ok(Task::Classify),
        "sft" => Ok(Task::Sft),
        _ => Err(Error::msg(format!(
            "unknown task `{s}`: expected classify or sft"
        ))),
    }
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => new_cuda(0).map_err(|e| cuda_error(s, e)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => new_cuda(i).map_err(|e| cuda_error(s, e)),
            _ => Err(Error::msg(format!(
                "unknown device `{s}`: expected cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// A CUDA device set up for training: one stream, so cudarc's per-buffer event tracking (an
/// event record and a stream wait per kernel argument, on the host) is switched off; and the
/// stream-ordered memory pool keeps what it has reserved across synchronisations (its default
/// release threshold of 0 hands freed memory back to the driver at every sync, so each step
/// would map its activations afresh).
fn new_cuda(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // SAFETY: the device has one stream (candle's) and no buffers allocated yet.
        unsafe { d.disable_event_tracking() };
        let ctx = d.cuda_stream().context().clone();
        // SAFETY: plain driver calls on this context's device with valid out-pointers.
        unsafe {
            ctx.bind_to_thread()
                .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
            let mut pool = std::mem::MaybeUninit::uninit();
            if sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device())
                == sys::CUresult::CUDA_SUCCESS
            {
                let mut keep = u64::MAX;
                sys::cuMemPoolSetAttribute(
                    pool.assume_init(),
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut keep as *mut u64).cast(),
                );
            }
        }
    }
    Ok(device)
}

fn cuda_error(s: &str, e: candle_core::Error) -> Error {
    Error::msg(format!(
        "device `{s}` is not available ({e}); this binary may be built without the `cuda` feature"
    ))
}

impl TrainConfig {
    pub fn columns(&self) -> Columns {
        Columns {
            text: self.text_column.clone(),
            text_pair: self.text_pair_column.clone(),
            label: self.label_column.clone(),
            prompt: self.prompt_column.clone(),
            completion: self.completion_column.clone(),
        }
    }

    pub fn method(&self) -> Result<Method> {
        self.method.parse()
    }

    pub fn learning_rate(&self) -> Result<f64> {
        Ok(self.lr.unwrap_or(self.method()?.default_lr()))
    }
}

/// Data, encoded and ready.
pub struct PreparedData {
    pub train: Dataset,
    pub eval: Option<Dataset>,
    pub labels: Option<LabelSet>,
    pub train_items: Vec<Encoded>,
    pub eval_items: Vec<Encoded>,
    pub pad_id: u32,
}

/// The model's chat template (from tokenizer_config.json or the GGUF metadata), compiled with
/// its bos/eos token strings; None when the model has none.
pub fn chat_template(pre: &Pretrained) -> Result<Option<crate::chat::ChatTemplate>> {
    let Some(src) = &pre.chat_template else {
        return Ok(None);
    };
    let special = crate::tokenize::special_tokens(&pre.tokenizer, Some(&pre.config));
    let name = |id: Option<u32>| id.and_then(|i| pre.tokenizer.id_to_token(i));
    Ok(Some(crate::chat::ChatTemplate::new(
        src,
        name(special.bos),
        name(special.eos),
    )?))
}

/// Loads and encodes the training (and evaluation) data.
pub fn prepare_data(cfg: &TrainConfig, task: Task, pre: &Pretrained) -> Result<PreparedData> {
    let cols = cfg.columns();
    let train = data::load_dataset(&cfg.train, task, &cols, cfg.skip_bad_rows)?;
    let (train, eval) = match (&cfg.eval, cfg.eval_fraction) {
        (Some(p), _) => (
            train,
            Some(data::load_dataset(p, task, &cols, cfg.skip_bad_rows)?),
        ),
        (None, Some(f)) if f > 0.0 => {
            let (t, e) = data::split_fraction(train, f, cfg.seed)?;
            (t, Some(e))
        }
        (None, _) => (train, None),
    };
    let labels = match task {
        Task::Classify => {
            let l = LabelSet::from_dataset(&train)?;
            if let Some(e) = &eval {
                l.check(e)?;
            }
            Some(l)
        }
        Task::Sft => None,
    };
    let special = crate::tokenize::special_tokens(&pre.tokenizer, Some(&pre.config));
    let eos = match task {
        Task::Sft => special.eos,
        Task::Classify => None,
    };
    let chat = match task {
        Task::Sft if cfg.chat_template => chat_template(pre)?,
        _ => None,
    };
    let enc = |ds: &Dataset| {
        data::encode_with(
            &pre.tokenizer,
            ds,
            labels.as_ref(),
            cfg.max_length,
            eos,
            chat.as_ref(),
        )
    };
    let train_items = enc(&train)?;
    let eval_items = match &eval {
        Some(e) => enc(e)?,
        None => vec![],
    };
    Ok(PreparedData {
        train,
        eval,
        labels,
        train_items,
        eval_items,
        pad_id: special.pad,
    })
}

/// The results of an evaluation pass.
#[derive(Debug, Clone)]
pub struct EvalResult {
    pub loss: f64,
    pub metrics: Option<ClassificationMetrics>,
    pub perplexity: Option<f64>,
    pub n: usize,
}

impl EvalResult {
    pub fn to_json(&self, step: u64) -> Value {
        let mut v = json!({"step": step, "eval_loss": self.loss});
        if let Some(m) = &self.metrics {
            v["eval_accuracy"] = json!(m.accuracy);
            v["eval_f1_macro"] = json!(m.f1_macro);
        }
        if let Some(p) = self.perplexity {
            v["eval_perplexity"] = json!(p);
        }
        v
    }

    pub fn summary(&self) -> String {
        match (&self.metrics, self.perplexity) {
            (Some(m), _) => format!(
                "eval loss {:.4}, accuracy {:.2}%, macro-F1 {:.4} ({} examples)",
                self.loss,
                100.0 * m.accuracy,
                m.f1_macro,
                self.n
            ),
            (None, Some(p)) => format!(
                "eval loss {:.4}, perplexity {:.3} ({} tokens)",
                self.loss, p, self.n
            ),
            _ => format!("eval loss {:.4}", self.loss),
        }
    }
}

/// Evaluates `model` on encoded items (no gradient, u of the updates applied so far).
pub fn evaluate(
    model: &TaskModel,
    items: &[Encoded],
    batch_size: usize,
    pad_id: u32,
    n_labels: Option<usize>,
    device: &Device,
) -> Result<EvalResult> {
    let was = model.clock.is_training();
    model.clock.set_training(false);
    let lengths: Vec<usize> = items.iter().map(|e| e.ids.len()).collect();
    let mut nll = 0.0;
    let mut count = 0usize;
    let mut preds = vec![];
    let mut labels = vec![];
    for idx in data::epoch_batches(&lengths, batch_size, 0, 0, false) {
        let batch = data::collate(items, &idx, pad_id, device)?;
        let s = model.eval_batch(&batch)?;
        nll += s.nll_sum;
        count += s.count;
        preds.extend(s.preds);
        labels.extend(s.labels);
    }
    model.clock.set_training(was);
    let loss = nll / count.max(1) as f64;
    Ok(match (model.task, n_labels) {
        (Task::Classify, Some(n)) => EvalResult {
            loss,
            metrics: Some(ClassificationMetrics::compute(&preds, &labels, n)),
            perplexity: None,
            n: count,
        },
        _ => EvalResult {
            loss,
            metrics: None,
            perplexity: Some(crate::metrics::perplexity(loss)),
            n: count,
        },
    })
}

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

/// The plan `--dry-run` prints and `run.json` records.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub family: String,
    pub adapted_modules: Vec<String>,
    pub adapter_params: usize,
    pub head_params: usize,
    pub base_params: usize,
    pub train_rows: usize,
    pub eval_rows: usize,
    pub labels: Option<Vec<String>>,
    pub updates_per_epoch: u64,
    pub total_updates: u64,
    pub warmup_updates: u64,
    pub ramp_steps: u64,
    pub lr: f64,
    pub pooling: Option<String>,
}

impl Plan {
    pub fn render(&self) -> String {
        let mut s = format!(
            "model family   {}\nadapted        {} modules\n",
            self.family,
            self.adapted_modules.len()
        );
        for m in &self.adapted_modules {
            s += &format!("  {m}\n");
        }
        s += &format!(
            "trainable      {} adapter + {} head parameters ({:.4}% of {} base parameters)\n",
            crate::inspect::thousands(self.adapter_params),
            crate::inspect::thousands(self.head_params),
            100.0 * (self.adapter_params + self.head_params) as f64
                / self.base_params.max(1) as f64,
            crate::inspect::thousands(self.base_params)
        );
        s += &format!(
            "data           {} train rows, {} eval rows\n",
            self.train_rows, self.eval_rows
        );
        if let Some(l) = &self.labels {
            s += &format!("labels         {}\n", l.join(", "));
        }
        if let Some(p) = &self.pooling {
            s += &format!("pooling        {p}\n");
        }
        s += &format!(
            "updates        {} per epoch, {} in total, {} warm-up, lr {:e}\nramp           T = {} updates\n",
            self.updates_per_epoch, self.total_updates, self.warmup_updates, self.lr, self.ramp_steps
        );
        s
    }
}

/// Everything needed to train, built from a config.
pub struct Setup {
    pub cfg: TrainConfig,
    pub task: Task,
    pub method: Method,
    pub device: Device,
    pub model: TaskModel,
    pub data: PreparedData,
    pub plan: Plan,
    pub adapter_config: AdapterConfig,
    pub tokenizer: tokenizers::Tokenizer,
    pub base_config: Value,
}

/// Loads model and data, injects adapters and computes the plan.
pub fn setup(cfg: TrainConfig) -> Result<Setup> {
    let task = parse_task(&cfg.task)?;
    let method = cfg.method()?;
    let init: SingLoraInit = cfg.init.parse()?;
    if cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.rank == 0 {
        return Err(Error::msg(
            "--batch-size, --grad-accum and --rank must be at least 1",
        ));
    }
    let device = parse_device(&cfg.device)?;
    // frozen weights: f32 on the CPU, bf16 on a GPU
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let pre = Pretrained::load(&cfg.model, dtype, &device)?;
    let family = pre.body.family();
    let data = prepare_data(&cfg, task, &pre)?;
    let pooling = match (&cfg.pooling, task) {
        (Some(p), _) => p.parse::<Pooling>()?,
        (None, _) => pre.default_pooling(),
    };
    let n_labels = data.labels.as_ref().map(|l| l.names.len());
    let tokenizer = pre.tokenizer.clone();
    let base_config = pre.config.clone();
    let base_params = pre.num_params;
    let mut model = TaskModel::new(pre.body, task, n_labels, pooling, cfg.seed, &device)?;
    if let crate::model::Body::Llama(l) = &mut model.body {
        l.recompute = cfg.recompute;
    }

    let batches_per_epoch = data.train_items.len().div_ceil(cfg.batch_size) as u64;
    let updates_per_epoch = batches_per_epoch.div_ceil(cfg.grad_accum as u64);
    let total = cfg
        .max_steps
        .unwrap_or(updates_per_epoch * cfg.epochs as u64)
        .max(1);
    let warmup = cfg
        .warmup_steps
        .unwrap_or((cfg.warmup_ratio * total as f64).round() as u64);
    let ramp = match (method.kind().ramps(), cfg.ramp_steps) {
        (true, Some(t)) => RampSchedule::new(t),
        (true, None) => RampSchedule::fraction_of(total, cfg.ramp_fraction),
        (false, _) => RampSchedule::none(),
    };
    let spec = AdapterSpec {
        kind: method.kind(),
        r: cfg.rank,
        alpha: cfg.alpha,
        rslora: cfg.rslora || method.uses_rslora(),
        init,
        seed: cfg.seed,
        dtype: DType::F32,
    };
    let targets = TargetSpec::parse(
        cfg.targets.as_deref().unwrap_or(family.default_targets()),
        cfg.exclude.as_deref(),
    )?;
    let clock = RampClock::new(ramp, 0);
    let adapted = if cfg.head_only {
        if task != Task::Classify {
            return Err(Error::msg("head-only training needs --task classify"));
        }
        model.clock = clock;
        vec![]
    } else {
        model.inject(&spec, &targets, clock)?
    };
    let mut adapter_config = AdapterConfig::for_spec(&spec, ramp, &targets);
    adapter_config.base_model_name_or_path = Some(cfg.model.to_string_lossy().into_owned());
    adapter_config.task_type = Some(match task {
        Task::Classify => "SEQ_CLS".into(),
        Task::Sft => "CAUSAL_LM".into(),
    });
    if let Some(h) = &model.head {
        adapter_config.modules_to_save = vec![h.name.clone()];
        adapter_config.labels = data.labels.as_ref().map(|l| l.names.clone());
        adapter_config.pooling = Some(pooling.to_string());
    }
    let adapter_params: usize = model
        .adapters()
        .iter()
        .map(|(_, _, a)| a.num_params())
        .sum();
    let head_params = model
        .head
        .as_ref()
        .map_or(0, |h| h.params().iter().map(|p| p.var.elem_count()).sum());
    let plan = Plan {
        family: format!("{family:?}"),
        adapted_modules: adapted,
        adapter_params,
        head_params,
        base_params,
        train_rows: data.train_items.len(),
        eval_rows: data.eval_items.len(),
        labels: data.labels.as_ref().map(|l| l.names.clone()),
        updates_per_epoch,
        total_updates: total,
        warmup_updates: warmup,
        ramp_steps: ramp.ramp_steps,
        lr: cfg.learning_rate()?,
        pooling: (task == Task::Classify).then(|| pooling.to_string()),
    };
    Ok(Setup {
        cfg,
        task,
        method,
        device,
        model,
        data,
        plan,
        adapter_config,
        tokenizer,
        base_config,
    })
}

impl Setup {
    /// The adapter (with head and labels) as it stands.
    pub fn adapter_file(&self) -> Result<AdapterFile> {
        let mut config = self.adapter_config.clone();
        config.step = self.model.clock.step();
        AdapterFile::from_adapters(config, self.model.adapters(), self.model.head_tensors())
    }

    pub fn evaluate(&self) -> Result<Option<EvalResult>> {
        if self.data.eval_items.is_empty() {
            return Ok(None);
        }
        let n_labels = self.data.labels.as_ref().map(|l| l.names.len());
        Ok(Some(evaluate(
            &self.model,
            &self.data.eval_items,
            self.cfg.batch_size * 2,
            self.data.pad_id,
            n_labels,
            &self.device,
        )?))
    }
}

/// Writes the adapter files into `dir` (created if needed), each atomically.
fn write_adapter_in_place(af: &AdapterFile, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).at(dir)?;
    let staged = StagedDir::new(&dir.join(".adapter"), true)?;
    af.write_into(staged.path())?;
    for f in [
        crate::adapter::config::CONFIG_FILE,
        crate::adapter::config::WEIGHTS_FILE,
    ] {
        std::fs::rename(staged.path().join(f), dir.join(f)).at(&dir.join(f))?;
    }
    Ok(())
}

fn file_fingerprint(path: &Path) -> Value {
    use sha2::{Digest, Sha256};
    match std::fs::read(path) {
        Ok(bytes) => json!({
            "path": path,
            "bytes": bytes.len(),
            "sha256": format!("{:x}", Sha256::digest(&bytes)),
        }),
        Err(_) => json!({"path": path}),
    }
}

/// Progress display: a bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    total: u64,
}

impl Progress {
    fn new(total: u64, start: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} updates ({eta} left) {msg}",
                )
                .unwrap()
                .progress_chars("=> "),
            );
            b.set_position(start);
            b
        });
        Self { bar, quiet, total }
    }

    fn update(&self, step: u64, msg: String) {
        match &self.bar {
            Some(b) => {
                b.set_position(step);
                b.set_message(msg);
            }
            None if !self.quiet && (step % 10 == 0 || step == self.total) => {
                eprintln!("step {step}/{} {msg}", self.total)
            }
            None => {}
        }
    }

    fn println(&self, s: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Runs (or resumes) training into `out`: on one device, or data-parallel over
/// `cfg.devices` (one thread per device; a failure on any rank ends the run with its error).
pub fn train(cfg: TrainConfig, out: &Path, resume: bool, overwrite: bool) -> Result<TrainSummary> {
    let cfg = if resume {
        let p = out.join("run.json");
        let saved = crate::checkpoint::read_json(&p)?;
        let mut c: TrainConfig = serde_json::from_value(saved["config"].clone())
            .map_err(|e| Error::bad_file(&p, format!("is not a run description: {e}")))?;
        c.stop_after = cfg.stop_after;
        c.quiet = cfg.quiet;
        c
    } else {
        if out.exists() && !overwrite {
            return Err(Error::msg(format!(
                "{} already exists; pass --resume to continue that run or --overwrite to replace it",
                out.display()
            )));
        }
        cfg
    };
    interrupted().store(false, Ordering::SeqCst);
    let devices = cfg.devices.clone().unwrap_or_default();
    if devices.len() <= 1 {
        let mut cfg = cfg;
        if let Some(d) = devices.first() {
            cfg.device = d.clone();
        }
        return train_rank(cfg, out, resume, None);
    }
    let world = devices.len();
    if cfg.batch_size < world {
        return Err(Error::msg(format!(
            "--batch-size {} is smaller than the {world} devices: it is the global batch, split over them",
            cfg.batch_size
        )));
    }
    let makers = group_makers(&devices, cfg.bucket_values)?;
    let (tx, rx) = std::sync::mpsc::channel();
    for (rank, (dev, make)) in devices.iter().zip(makers).enumerate() {
        let mut c = cfg.clone();
        c.device = dev.clone();
        c.quiet = cfg.quiet || rank > 0;
        let (tx, out) = (tx.clone(), out.to_path_buf());
        std::thread::Builder::new()
            .name(format!("rank {rank}"))
            .spawn(move || {
                let r = train_rank(c, &out, resume, Some(RankCtx { rank, world, make }));
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

/// Makes a rank's transport once its device exists (NCCL joins on the device).
pub type MakeCollective = Box<dyn FnOnce(&Device) -> Result<Box<dyn Collective>> + Send>;

/// A rank's place in a data-parallel run.
struct RankCtx {
    rank: usize,
    world: usize,
    make: MakeCollective,
}

/// The transports of a group over `devices` (one per rank, in order): threads on the CPU, NCCL on GPUs.
pub fn group_makers(devices: &[String], bucket: usize) -> Result<Vec<MakeCollective>> {
    let world = devices.len();
    if devices.iter().all(|d| d == "cpu") {
        return Ok(LocalGroup::new(world)
            .into_iter()
            .map(|g| {
                Box::new(move |_: &Device| Ok(Box::new(g) as Box<dyn Collective>)) as MakeCollective
            })
            .collect());
    }
    if !devices
        .iter()
        .all(|d| d == "cuda" || d == "gpu" || d.starts_with("cuda:"))
    {
        return Err(Error::msg(format!(
            "--devices {}: give all CUDA devices (cuda:0,cuda:1,...) or all cpu",
            devices.join(",")
        )));
    }
    let mut seen = HashSet::new();
    for d in devices {
        let d = if d == "cuda" || d == "gpu" {
            "cuda:0"
        } else {
            d.as_str()
        };
        if !seen.insert(d.to_string()) {
            return Err(Error::msg(format!(
                "--devices names {d} twice: NCCL takes one rank per GPU"
            )));
        }
    }
    nccl_makers(world, bucket)
}

#[cfg(feature = "nccl")]
fn nccl_makers(world: usize, bucket: usize) -> Result<Vec<MakeCollective>> {
    let id = nccl::GroupId::new()?;
    Ok((0..world)
        .map(|rank| {
            Box::new(move |d: &Device| {
                Ok(Box::new(nccl::NcclRank::new(id, rank, world, d, bucket)?)
                    as Box<dyn Collective>)
            }) as MakeCollective
        })
        .collect())
}

#[cfg(not(feature = "nccl"))]
fn nccl_makers(_world: usize, _bucket: usize) -> Result<Vec<MakeCollective>> {
    Err(Error::msg(
        "training on several GPUs needs NCCL: this binary is built without the `nccl` feature",
    ))
}

/// Set by Ctrl-C (one handler per process).
fn interrupted() -> &'static AtomicBool {
    static FLAG: AtomicBool = AtomicBool::new(false);
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let _ = ctrlc::set_handler(|| FLAG.store(true, Ordering::SeqCst));
    });
    &FLAG
}

/// What a rank's share of the global mean loss counts: rows (classification) or target tokens
/// (SFT, whose loss is the mean over completion tokens).
fn loss_count(item: &Encoded, task: Task) -> usize {
    match task {
        Task::Classify => 1,
        Task::Sft => item.target_mask.iter().skip(1).filter(|&&m| m > 0).count(),
    }
}

/// One rank's training (the only one without `dist`): rank 0 writes every output.
fn train_rank(
    cfg: TrainConfig,
    out: &Path,
    resume: bool,
    dist: Option<RankCtx>,
) -> Result<TrainSummary> {
    let mut s = setup(cfg)?;
    let cfg = s.cfg.clone();
    let quiet = cfg.quiet;
    let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank, d.world));
    let lead = rank == 0;
    let group = match dist {
        Some(d) => Some((d.make)(&s.device)?),
        None => None,
    };
    let say = |m: &str| {
        if !quiet {
            eprintln!("{m}");
        }
    };

    // resume: the newest checkpoint
    let mut st = TrainerState {
        step: 0,
        epoch: 0,
        next_batch: 0,
        seed: cfg.seed,
        best_eval_loss: None,
        tokens_seen: 0,
        elapsed_s: 0.0,
    };
    let params = s.model.params();
    let opt_cfg = AdamWConfig {
        lr: cfg.learning_rate()?,
        weight_decay: cfg.weight_decay,
        lora_plus_ratio: s.method.b_lr_ratio(cfg.lora_plus_ratio),
        ..Default::default()
    };
    let mut opt = AdamW::new(params, opt_cfg);
    if resume {
        let (step, dir) = state::list(out)?.pop().ok_or_else(|| {
            Error::msg(format!("{}: no checkpoint to resume from", out.display()))
        })?;
        let (af, opt_state, saved) = state::load(&dir, &s.device)?;
        s.model.load_adapter(&af)?;
        opt = AdamW::new(s.model.params(), opt_cfg);
        opt.load_state(opt_state)?;
        st = saved;
        say(&format!("resuming {} from update {step}", out.display()));
    } else if lead {
        if out.exists() {
            std::fs::remove_dir_all(out).at(out)?;
        }
        std::fs::create_dir_all(out).at(out)?;
        let run = json!({
            "config": cfg,
            "plan": s.plan,
            "seed": cfg.seed,
            "data": {
                "train": file_fingerprint(&cfg.train),
                "eval": cfg.eval.as_ref().map(|p| file_fingerprint(p)),
            },
            "versions": {"singlora": env!("CARGO_PKG_VERSION"), "candle": "0.11.1"},
            "world_size": world,
            "started": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        });
        crate::atomic::write_file(
            &out.join("run.json"),
            serde_json::to_string_pretty(&run).unwrap().as_bytes(),
        )?;
    }
    let mut opt = opt.with_clock(s.model.clock.clone());
    let mut log = if lead {
        Some(MetricsLog::append_to(
            &out.join("metrics.jsonl"),
            Some(st.step),
        )?)
    } else {
        None
    };
    let mut log_write = |v: &Value| match log.as_mut() {
        Some(l) => l.write(v),
        None => Ok(()),
    };

    let baseline_eval = if st.step == 0 && lead {
        s.evaluate()?
    } else {
        None
    };
    if let Some(e) = &baseline_eval {
        say(&format!("before training: {}", e.summary()));
        log_write(&e.to_json(0))?;
    }

    let total = s.plan.total_updates;
    let warmup = s.plan.warmup_updates;
    let base_lr = s.plan.lr;
    let lengths: Vec<usize> = s.data.train_items.iter().map(|e| e.ids.len()).collect();
    let progress = Progress::new(total, st.step, quiet);
    let mut acc = GradAccumulator::new(opt.vars());
    let dp_vars = opt.vars();
    let started = Instant::now();
    let elapsed0 = st.elapsed_s;
    let mut final_eval = None;
    let mut last_loss = None;
    let mut window_tokens = 0usize;
    let mut window_start = Instant::now();
    let mut stopped_early = false;

    'outer: while st.step < total {
        let batches = data::epoch_batches(&lengths, cfg.batch_size, cfg.seed, st.epoch, true);
        let n_batches = batches.len();
        let epoch = st.epoch;
        while st.epoch == epoch && st.next_batch < n_batches && st.step < total {
            // one optimizer update from up to grad_accum micro-batches
            let end = (st.next_batch + cfg.grad_accum).min(n_batches);
            let micro = end - st.next_batch;
            s.model.clock.set_training(true);
            let mut loss_sum = 0.0;
            let mut tokens = 0usize;
            for idx in &batches[st.next_batch..end] {
                let Some(g) = &group else {
                    let batch = data::collate(&s.data.train_items, idx, s.data.pad_id, &s.device)?;
                    let (loss, grads) = s.model.loss_and_grads(&batch, 1.0 / micro as f64)?;
                    loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    acc.add(&grads)?;
                    tokens += batch.n_tokens;
                    continue;
                };
                // this rank's shard, weighted by its share of the global batch's loss; a rank
                // left without rows (or without completion tokens) runs one row at weight 0,
                // so every rank makes the same reductions
                let items = &s.data.train_items;
                let count = |rows: &[usize]| -> usize {
                    rows.iter().map(|&i| loss_count(&items[i], s.task)).sum()
                };
                let total_count = count(idx);
                let mine = dist::shard(idx, rank, world);
                let mine_count = count(mine);
                let (rows, weight) = if mine_count > 0 {
                    (mine, dist::shard_weight(mine_count, total_count))
                } else {
                    let any = idx
                        .iter()
                        .position(|&i| loss_count(&items[i], s.task) > 0)
                        .unwrap_or(0);
                    (&idx[any..any + 1], 0.0)
                };
                let batch = data::collate(items, rows, s.data.pad_id, &s.device)?;
                let (loss, mut grads, summed) = s.model.loss_and_grads_synced(
                    &batch,
                    weight / micro as f64,
                    g.as_grad_sync(),
                )?;
                dist::all_reduce_grads(&dp_vars, &mut grads, &summed, g.as_ref())?;
                acc.add(&grads)?;
                loss_sum += weight * loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if weight > 0.0 {
                    tokens += batch.n_tokens;
                }
            }
            // the ranks agree on the loss, the tokens and whether to stop
            let mut stop_flag = interrupted().load(Ordering::SeqCst);
            if let Some(g) = &group {
                let v = Tensor::new(
                    &[
                        loss_sum as f32,
                        tokens as f32,
                        f32::from(u8::from(stop_flag)),
                    ],
                    &s.device,
                )?;
                let v = g.all_reduce_sum(&v)?.to_vec1::<f32>()?;
                loss_sum = v[0] as f64;
                tokens = v[1].round() as usize;
                stop_flag = v[2] > 0.0;
            }
            if !loss_sum.is_finite() {
                return Err(Error::msg(format!(
                    "the training loss is {loss_sum} at update {}: the run diverged (try a lower --lr)",
                    st.step + 1
                )));
            }
            window_tokens += tokens;
            st.tokens_seen += tokens as u64;
            let lr = lr_at(base_lr, cfg.schedule, warmup, total, st.step + 1);
            let u = s.model.clock.u();
            let grad_norm = opt.step(&mut acc, lr, cfg.max_grad_norm)?;
            s.model.clock.set_training(false);
            st.step += 1;
            st.next_batch = end;
            let loss = loss_sum / micro as f64;
            last_loss = Some(loss);
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let tps = window_tokens as f64 / secs;
            window_tokens = 0;
            window_start = Instant::now();
            let epoch_f = st.epoch as f64 + st.next_batch as f64 / n_batches as f64;
            let mut line = json!({"step": st.step, "epoch": epoch_f, "loss": loss, "lr": lr, "u": u, "tokens_per_s": tps});
            if let Some(g) = grad_norm {
                line["grad_norm"] = json!(g);
            }
            log_write(&line)?;
            progress.update(
                st.step,
                format!("loss {loss:.4} lr {lr:.2e} u {u:.3} {:.0} tok/s", tps),
            );

            let at_epoch_end = st.next_batch >= n_batches;
            let is_last = st.step >= total;
            let eval_now = match cfg.eval_every {
                Some(n) if n > 0 => st.step % n == 0 || is_last,
                _ => at_epoch_end || is_last,
            };
            if eval_now && lead {
                if let Some(e) = s.evaluate()? {
                    progress.println(&format!("update {}: {}", st.step, e.summary()));
                    log_write(&e.to_json(st.step))?;
                    if st.best_eval_loss.is_none_or(|b| e.loss < b) {
                        st.best_eval_loss = Some(e.loss);
                        let best = out.join("best");
                        let staged = StagedDir::new(&best, true)?;
                        s.adapter_file()?.write_into(staged.path())?;
                        staged.commit()?;
                    }
                    if is_last {
                        final_eval = Some(e);
                    }
                }
            }
            if at_epoch_end {
                st.epoch += 1;
                st.next_batch = 0;
            }
            st.elapsed_s = elapsed0 + started.elapsed().as_secs_f64();
            let save_now = cfg.save_every.is_some_and(|n| n > 0 && st.step % n == 0);
            let stop = stop_flag || cfg.stop_after.is_some_and(|n| st.step >= n);
            if lead && (save_now || stop || is_last) {
                state::save(
                    out,
                    &s.adapter_file()?,
                    &opt.state()?,
                    &st,
                    cfg.keep_checkpoints.max(1),
                )?;
            }
            if stop && !is_last {
                stopped_early = true;
                break 'outer;
            }
        }
    }
    progress.finish();

    let summary_final = final_eval.clone();
    if !lead {
    } else if !stopped_early {
        write_adapter_in_place(&s.adapter_file()?, out)?;
        let lines = crate::metrics::read_metrics(&out.join("metrics.jsonl"))?;
        let title = format!("{} r={} on {}", s.method, cfg.rank, cfg.model.display());
        crate::plot::write_curves(&out.join("curves.svg"), &lines, &title)?;
        if let (Some(e), Some(labels)) = (&final_eval, &s.data.labels) {
            if let Some(m) = &e.metrics {
                let report = m.render(&labels.names);
                crate::atomic::write_file(&out.join("eval_report.txt"), report.as_bytes())?;
                if !quiet {
                    eprintln!("{report}");
                }
            }
        }
    } else if !quiet {
        eprintln!(
            "stopped at update {} of {}; the checkpoint is saved: resume with --resume {}",
            st.step,
            total,
            out.display()
        );
    }
    Ok(TrainSummary {
        run_dir: out.to_path_buf(),
        steps: st.step,
        total_steps: total,
        interrupted: stopped_early,
        final_eval: summary_final,
        baseline_eval,
        trainable_params: s.plan.adapter_params + s.plan.head_params,
        adapted: s.plan.adapted_modules.clone(),
        train_loss: last_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::TrainConfig;

    /// A run.json written before `recompute_attention` became `recompute` still resumes, with
    /// the setting it had; the current name round-trips.
    #[test]
    fn config_reads_the_old_name_of_recompute() {
        let mut v = serde_json::to_value(TrainConfig::default()).unwrap();
        let obj = v.as_object_mut().unwrap();
        assert_eq!(
            obj.remove("recompute"),
            Some(serde_json::Value::Bool(false))
        );
        obj.insert("recompute_attention".into(), true.into());
        let old: TrainConfig = serde_json::from_value(v).unwrap();
        assert!(old.recompute);
        let again: TrainConfig =
            serde_json::from_value(serde_json::to_value(&old).unwrap()).unwrap();
        assert!(again.recompute);
    }
}
