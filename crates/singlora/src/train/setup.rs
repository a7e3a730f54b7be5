//! Everything a run needs before its first update, built from a [`TrainConfig`]: the device,
//! the model with its adapters (or, for a linear probe, none), the encoded data, the adapter
//! config the files will carry, and the [`Plan`] that `--dry-run` prints and `run.json`
//! records.

use candle_core::{DType, Device};
use serde::Serialize;
use serde_json::Value;

use crate::adapter::config::AdapterConfig;
use crate::adapter::file::AdapterFile;
use crate::adapter::ramp::{RampClock, RampSchedule};
use crate::adapter::target::TargetSpec;
use crate::adapter::AdapterSpec;
use crate::data::{self, Dataset, EncodeOptions, Encoded, LabelSet, RowReport, Task};
use crate::error::{Error, Result};
use crate::eval::{evaluate, EvalResult};
use crate::model::{Pretrained, TaskModel};

use super::TrainConfig;

/// Data, encoded and ready.
pub struct PreparedData {
    pub train: Dataset,
    pub eval: Option<Dataset>,
    pub labels: Option<LabelSet>,
    pub train_items: Vec<Encoded>,
    /// The rows of training batches, as indices into `train_items`: one example each, or
    /// several end to end with `--packing`.
    pub train_rows: Vec<Vec<usize>>,
    pub eval_items: Vec<Encoded>,
    pub pad_id: u32,
    /// The rows left out or cut, of both files.
    pub report: RowReport,
}

/// Loads and encodes the training (and evaluation) data.
pub fn prepare_data(cfg: &TrainConfig, pre: &Pretrained) -> Result<PreparedData> {
    let task = cfg.task;
    let settings = &cfg.data;
    let load = |p: &std::path::Path| {
        data::load_dataset(p, task, &settings.columns, settings.skip_bad_rows)
    };
    let train = load(&cfg.train)?;
    let (train, eval) = match (&cfg.eval, cfg.eval_fraction) {
        (Some(p), _) => (train, Some(load(p)?)),
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
    let chat = match task {
        Task::Sft if settings.chat_template => pre.chat_template()?,
        _ => None,
    };
    let opts = EncodeOptions {
        max_length: settings.max_length,
        eos: special.eos.filter(|_| task == Task::Sft),
        chat: chat.as_ref(),
        truncation: settings.truncation,
    };
    let mut report = RowReport {
        max_length: settings.max_length,
        truncation: settings.truncation,
        ..Default::default()
    };
    let mut enc = |ds: &Dataset| -> Result<Vec<Encoded>> {
        let rows = data::encode_with(&pre.tokenizer, ds, labels.as_ref(), &opts)?;
        report.add(ds, &rows);
        Ok(rows.items)
    };
    let train_items = enc(&train)?;
    let eval_items = match &eval {
        Some(e) => enc(e)?,
        None => vec![],
    };
    let train_rows = if cfg.packing {
        let lengths: Vec<usize> = train_items.iter().map(Encoded::len).collect();
        data::pack_rows(&lengths, settings.max_length, cfg.seed)
    } else {
        (0..train_items.len()).map(|i| vec![i]).collect()
    };
    Ok(PreparedData {
        train,
        eval,
        labels,
        train_items,
        train_rows,
        eval_items,
        pad_id: special.pad,
        report,
    })
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
    /// `--packing`: the rows the training examples were packed into.
    pub packed_rows: Option<usize>,
    /// How the quantised linear weights are kept, their bytes and their bytes dense.
    pub quantized_bytes: Option<(crate::quant::BaseDtype, usize, usize)>,
    pub eval_rows: usize,
    /// Malformed rows left out (`--skip-bad-rows`).
    pub skipped_rows: usize,
    /// Rows cut to `--max-length` tokens.
    pub truncated_rows: usize,
    /// Rows longer than `--max-length` left out (`--truncation drop`).
    pub dropped_rows: usize,
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
        if let Some(p) = self.packed_rows {
            s += &format!(
                "packing        {} train rows in {p} rows of up to --max-length tokens\n",
                self.train_rows
            );
        }
        if self.skipped_rows + self.truncated_rows + self.dropped_rows > 0 {
            s += &format!(
                "               ({} malformed rows left out, {} cut to --max-length, {} longer left out)\n",
                self.skipped_rows, self.truncated_rows, self.dropped_rows
            );
        }
        if let Some((how, after, before)) = self.quantized_bytes {
            let mb = |b: usize| b as f64 / 1e6;
            let how = match how {
                crate::quant::BaseDtype::Nf4 => "in NF4",
                crate::quant::BaseDtype::Fp8 => "in FP8, both orientations",
                _ => "kept quantised as the GGUF file stores them",
            };
            s += &format!(
                "base           linear weights {how}: {:.1} MB (from {:.1} MB)\n",
                mb(after),
                mb(before)
            );
        }
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
    pub device: Device,
    pub model: TaskModel,
    pub data: PreparedData,
    pub plan: Plan,
    pub adapter_config: AdapterConfig,
    pub tokenizer: tokenizers::Tokenizer,
    pub base_config: Value,
    /// Settings that are allowed but probably not meant, in words.
    pub warnings: Vec<String>,
    /// The chat template given with `--chat-template`, kept with the adapter.
    pub chat_template: Option<String>,
}

/// Loads model and data, injects adapters and computes the plan.
pub fn setup(cfg: TrainConfig) -> Result<Setup> {
    cfg.validate()?;
    let (task, method) = (cfg.task, cfg.method);
    let device = cfg.device.open()?;
    // frozen weights: f32 on the CPU, bf16 on a GPU
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let mut pre = Pretrained::load_as(&cfg.model, dtype, &device, cfg.base_dtype)?;
    let chat_template = match &cfg.data.chat_template_file {
        Some(p) if task == Task::Sft => Some(crate::data::read_chat_template_file(p)?),
        _ => None,
    };
    if let Some(t) = &chat_template {
        pre.chat_template = Some(t.clone());
    }
    let quantized = pre
        .body
        .quantized_bytes(dtype)
        .map(|(kept, dense)| (cfg.base_dtype, kept, dense));
    let family = pre.body.family();
    let default_targets = pre.body.default_targets();
    let data = prepare_data(&cfg, &pre)?;
    let pooling = cfg.pooling.unwrap_or_else(|| pre.default_pooling());
    let n_labels = data.labels.as_ref().map(|l| l.names.len());
    let tokenizer = pre.tokenizer.clone();
    let base_config = pre.config.clone();
    let base_params = pre.num_params;
    let mut model = TaskModel::new(pre.body, task, n_labels, pooling, cfg.seed, &device)?;
    model.fast = cfg.fast;
    if let crate::model::Body::Llama(l) = &mut model.body {
        l.recompute = cfg.recompute;
        l.checkpoint_layers = cfg.recompute_layers;
    }

    let batches_per_epoch = data.train_rows.len().div_ceil(cfg.batch_size) as u64;
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
    let mut warnings = vec![];
    if warmup > total {
        warnings.push(format!(
            "the warm-up of {warmup} updates is longer than the run's {total}: the learning rate \
             ends at {:.3} of --lr",
            total as f64 / warmup as f64
        ));
    }
    if ramp.ramp_steps > total {
        warnings.push(format!(
            "SingLoRA's ramp of {} updates is longer than the run's {total}: u ends at {:.3}, so \
             the adapter never acts in full",
            ramp.ramp_steps,
            ramp.u(total)
        ));
    }
    let spec = AdapterSpec {
        kind: method.kind(),
        r: cfg.rank,
        alpha: cfg.alpha,
        rslora: cfg.rslora || method.uses_rslora(),
        init: cfg.init,
        seed: cfg.seed,
        dtype: DType::F32,
    };
    let targets = TargetSpec::parse(
        cfg.targets.as_deref().unwrap_or(default_targets),
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
    adapter_config.fan_in_fan_out = family.transposed_weights();
    // a multimodal checkpoint's language model: by name, or PEFT would put adapters on the
    // vision tower's projections of the same names too
    if adapted
        .iter()
        .any(|n| n.starts_with("model.language_model."))
    {
        adapter_config.target_modules = serde_json::json!(adapted);
    }
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
        packed_rows: cfg.packing.then_some(data.train_rows.len()),
        quantized_bytes: quantized,
        eval_rows: data.eval_items.len(),
        skipped_rows: data.report.skipped.len(),
        truncated_rows: data.report.truncated.len(),
        dropped_rows: data.report.dropped.len(),
        labels: data.labels.as_ref().map(|l| l.names.clone()),
        updates_per_epoch,
        total_updates: total,
        warmup_updates: warmup,
        ramp_steps: ramp.ramp_steps,
        lr: cfg.learning_rate(),
        pooling: (task == Task::Classify).then(|| pooling.to_string()),
    };
    Ok(Setup {
        cfg,
        device,
        model,
        data,
        plan,
        adapter_config,
        tokenizer,
        base_config,
        warnings,
        chat_template,
    })
}

impl Setup {
    /// The adapter (with head and labels) as it stands.
    pub fn adapter_file(&self) -> Result<AdapterFile> {
        let mut config = self.adapter_config.clone();
        config.step = self.model.clock.step();
        let mut af =
            AdapterFile::from_adapters(config, self.model.adapters(), self.model.head_tensors())?;
        af.chat_template = self.chat_template.clone();
        Ok(af)
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
