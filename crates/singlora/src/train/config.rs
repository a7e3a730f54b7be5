//! [`TrainConfig`]: every setting of a run, typed. It is the `singlora train` command line
//! (the CLI flattens it into its arguments, so each flag and its default are declared once,
//! here) and it is saved as the `config` of `run.json`, which `--resume` reads back.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::adapter::init::SingLoraInit;
use crate::adapter::{Method, MAX_SCALE};
use crate::data::{DataSettings, Task};
use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use crate::model::Pooling;
use crate::ops::FastPath;

use super::schedule::Schedule;

/// Every setting of a run.
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct TrainConfig {
    /// Base model: a Hugging Face directory (config.json, *.safetensors, tokenizer.json) or a GGUF file.
    #[arg(long, default_value = "", hide_default_value = true, value_parser = any_path)]
    pub model: PathBuf,
    /// Training data (.jsonl or .csv).
    #[arg(long, default_value = "", hide_default_value = true, value_parser = any_path)]
    pub train: PathBuf,
    /// Evaluation data (same format).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Hold out this fraction of --train for evaluation when no --eval is given.
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// classify or sft.
    #[arg(long, default_value = "classify")]
    pub task: Task,
    /// singlora, lora, rslora, lora-plus or dora.
    #[arg(long, default_value = "singlora")]
    pub method: Method,
    /// The adapter's rank r (SingLoRA: A is max(d_in, d_out) × r; LoRA: B·A with inner size r).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// The update's scale is alpha / r (alpha / √r with rslora).
    #[arg(long, default_value_t = 8.0)]
    pub alpha: f64,
    /// Comma-separated module names or suffixes, re:REGEX, or all-linear (default: the paper's
    /// targets for the model family).
    #[arg(long)]
    pub targets: Option<String>,
    /// Modules to leave alone (same syntax as --targets).
    #[arg(long)]
    pub exclude: Option<String>,
    /// Learning rate (default: 1e-3; 2e-4 for lora-plus, whose B gets 16x).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Passes over the training data (--max-steps, when given, decides instead).
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Stop after this many optimizer updates (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// The global batch (split over the devices with --devices).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Micro-batches per optimizer update.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Seeds the adapter's initialisation, the data order and the eval split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// AdamW's decoupled weight decay on the trained tensors.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// LoRA+: B's learning rate as a multiple of A's.
    #[arg(long, default_value_t = 16.0)]
    pub lora_plus_ratio: f64,
    /// Updates over which the learning rate rises linearly from 0; when given, --warmup-ratio
    /// is not used.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// The warm-up as a share of all updates, where --warmup-steps is not given.
    #[arg(long, default_value_t = 0.06)]
    pub warmup_ratio: f64,
    /// linear, cosine or constant.
    #[arg(long, default_value = "linear")]
    pub schedule: Schedule,
    /// Clip the gradient norm (0 to disable).
    #[arg(long, default_value_t = 1.0)]
    #[serde(with = "zero_is_null")]
    pub max_grad_norm: f64,
    /// Evaluate every N updates (default: each epoch) and at the end.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// SingLoRA ramp length T in updates (default: 1% of the updates; 0 = no ramp).
    #[arg(long)]
    pub ramp_steps: Option<u64>,
    /// SingLoRA's ramp T as a fraction of the optimizer updates, when --ramp-steps is not given
    /// (0 = no ramp).
    #[arg(long, default_value_t = 0.01)]
    pub ramp_fraction: f64,
    /// SingLoRA init: kaiming_width, gaussian_width, kaiming_rank or gaussian:STD.
    #[arg(long, default_value = "kaiming_width")]
    pub init: SingLoraInit,
    /// Scale by alpha/sqrt(r) instead of alpha/r.
    #[arg(long)]
    pub rslora: bool,
    /// Classification pooling: cls, mean or last (default: by model).
    #[arg(long)]
    pub pooling: Option<Pooling>,
    /// Checkpoint every N updates (a final one is always written).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Also checkpoint when this many minutes have passed since the last one (0: only by
    /// --save-every, at the end and on a stop).
    #[arg(long, default_value_t = 30.0)]
    pub save_minutes: f64,
    /// Checkpoints to keep (the newest).
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Data-parallel training, one rank per device: cuda:0,cuda:1,... (NCCL), or cpu,cpu,...
    /// (threads; for tests). --batch-size is the global batch, split over the ranks.
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    pub devices: Option<Vec<DeviceSpec>>,
    /// f32 values per gradient bucket a GPU backward sums over the ranks while it goes on.
    #[arg(skip = crate::dist::default_bucket())]
    pub bucket_values: usize,
    /// LLaMA on a GPU: recompute activations in the backward instead of keeping them (a few %
    /// slower): the SwiGLU output (b·len·intermediate values less per layer) and, for f32 or
    /// head sizes other than 64 and 128, the attention probabilities (b·heads·len²; the fused
    /// bf16 attention kernels never keep them).
    #[arg(long, alias = "recompute-attention")]
    #[serde(alias = "recompute_attention")]
    pub recompute: bool,
    /// LLaMA on a GPU: keep only each layer's input and run the layer's forward again in the
    /// backward (activation checkpointing): the activations of one layer in memory instead of
    /// all of them, for about one more forward's time.
    #[arg(long)]
    #[serde(default)]
    pub recompute_layers: bool,
    /// SFT: lay several examples end to end in each row of up to --max-length tokens (attention
    /// and positions stay within each example; the loss is per token as without packing);
    /// --batch-size then counts packed rows.
    #[arg(long)]
    pub packing: bool,
    /// How the frozen base's linear layers are kept: auto (f32 on the CPU, bf16 on a GPU), nf4
    /// (QLoRA's 4-bit NormalFloat with double quantisation; embeddings, norms and the vocabulary
    /// projection stay as they are; CPU or GPU), same (a GGUF model's quantised weights as the
    /// file stores them, Q4_K, Q8_0 and so on, the output projection included; CPU or GPU) or
    /// fp8 (E4M3 with one scale per weight, multiplied on the FP8 tensor cores with FP8
    /// activations; CUDA GPUs only). nf4 and same dequantise layer by layer where used.
    #[arg(long, default_value = "auto")]
    pub base_dtype: crate::quant::BaseDtype,
    /// How the data files are read and tokenized.
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DataSettings,
    /// Train only the classification head (a linear probe of the frozen model).
    #[arg(skip)]
    pub head_only: bool,
    /// Stop after this many updates as if interrupted (tests of `--resume`).
    #[arg(skip)]
    #[serde(skip)]
    pub stop_after: Option<u64>,
    /// Which fast-path implementations the model uses (all on unless a comparison says
    /// otherwise).
    #[arg(skip)]
    #[serde(skip)]
    pub fast: FastPath,
}

impl Default for TrainConfig {
    /// The command line's defaults, with empty model and data paths.
    fn default() -> Self {
        crate::cli_defaults(&[])
    }
}

/// A path as given (empty when not given: a resumed run takes its paths from `run.json`).
fn any_path(s: &str) -> std::result::Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// `value` unless it is NaN or infinite.
fn finite(flag: &str, value: f64) -> Result<f64> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Error::msg(format!(
            "{flag} {value}: must be a finite number"
        )))
    }
}

impl TrainConfig {
    /// Refuses settings no run can mean, naming the flag: zero counts, a non-finite or
    /// non-positive learning rate or alpha, an alpha whose scale exceeds [`MAX_SCALE`], a
    /// negative weight decay, fractions outside [0, 1]. [`super::setup`] calls it.
    pub fn validate(&self) -> Result<()> {
        let refuse = |flag: &str, value: &dyn std::fmt::Display, why: &str| {
            Err(Error::msg(format!("{flag} {value}: {why}")))
        };
        for (flag, n) in [
            ("--rank", self.rank),
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--max-length", self.data.max_length),
        ] {
            if n == 0 {
                return refuse(flag, &n, "must be at least 1");
            }
        }
        match self.max_steps {
            Some(0) => {
                return refuse(
                    "--max-steps",
                    &0,
                    "trains nothing; give at least 1 (or leave it out to train --epochs)",
                )
            }
            None if self.epochs == 0 => {
                return refuse("--epochs", &0, "trains nothing; give at least 1")
            }
            _ => {}
        }
        let alpha = finite("--alpha", self.alpha)?;
        if alpha <= 0.0 {
            return refuse(
                "--alpha",
                &alpha,
                "must be positive (the adapter's update is scaled by alpha/rank)",
            );
        }
        let rslora = self.rslora || self.method.uses_rslora();
        let s = crate::adapter::scale(alpha, self.rank, rslora);
        if s > MAX_SCALE {
            return refuse(
                "--alpha",
                &alpha,
                &format!(
                    "scales the update by {s:e} at rank {}; scales above {MAX_SCALE} are taken for a mistake (alpha is usually 1 to 2 times the rank)",
                    self.rank
                ),
            );
        }
        if let Some(lr) = self.lr {
            if finite("--lr", lr)? <= 0.0 {
                return refuse("--lr", &lr, "must be positive");
            }
        }
        if finite("--weight-decay", self.weight_decay)? < 0.0 {
            return refuse("--weight-decay", &self.weight_decay, "must be 0 or more");
        }
        for (flag, f) in [
            ("--warmup-ratio", self.warmup_ratio),
            ("--ramp-fraction", self.ramp_fraction),
        ] {
            if !(0.0..=1.0).contains(&finite(flag, f)?) {
                return refuse(flag, &f, "must be in [0, 1]");
            }
        }
        if self.packing && self.task != Task::Sft {
            return refuse(
                "--packing",
                &"",
                "is for --task sft (a classification example needs a row of its own)",
            );
        }
        if let Some(f) = self.eval_fraction {
            if !(0.0..1.0).contains(&finite("--eval-fraction", f)?) {
                return refuse("--eval-fraction", &f, "must be in [0, 1)");
            }
        }
        if finite("--lora-plus-ratio", self.lora_plus_ratio)? <= 0.0 {
            return refuse(
                "--lora-plus-ratio",
                &self.lora_plus_ratio,
                "must be positive",
            );
        }
        if finite("--max-grad-norm", self.max_grad_norm)? < 0.0 {
            return refuse(
                "--max-grad-norm",
                &self.max_grad_norm,
                "must be 0 (no clipping) or more",
            );
        }
        if finite("--save-minutes", self.save_minutes)? < 0.0 {
            return refuse(
                "--save-minutes",
                &self.save_minutes,
                "must be 0 (no timed checkpoints) or more",
            );
        }
        Ok(())
    }

    /// The learning rate: the given one, or the method's default.
    pub fn learning_rate(&self) -> f64 {
        self.lr.unwrap_or(self.method.default_lr())
    }

    /// The gradient-norm limit, None when clipping is off.
    pub fn clip(&self) -> Option<f64> {
        (self.max_grad_norm > 0.0).then_some(self.max_grad_norm)
    }

    /// The devices of the ranks: `devices`, or `device` alone.
    pub fn rank_devices(&self) -> Vec<DeviceSpec> {
        match &self.devices {
            Some(d) if !d.is_empty() => d.clone(),
            _ => vec![self.device],
        }
    }
}

/// `max_grad_norm` in `run.json`: a number, or null for no clipping (0 on the command line).
mod zero_is_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if *v > 0.0 {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Columns, Truncation};
    use serde_json::{json, Value};

    /// The `config` of a `run.json` written before the settings were typed (strings for the
    /// method, task, init, device and pooling; `recompute_attention`; a null clip), as the
    /// trainer then wrote it.
    fn old_run_config() -> Value {
        let text = r#"{
            "model": "/m", "train": "/d/train.jsonl", "eval": null, "task": "classify",
            "method": "lora_plus", "rank": 4, "alpha": 8.0, "targets": "q_proj", "exclude": null,
            "lr": null, "epochs": 2, "max_steps": 7, "batch_size": 8, "grad_accum": 2,
            "max_length": 64, "seed": 3, "weight_decay": 0.01, "lora_plus_ratio": 16.0,
            "warmup_steps": null, "warmup_ratio": 0.06, "schedule": "cosine",
            "max_grad_norm": null, "eval_every": 5, "eval_fraction": 0.1, "ramp_steps": null,
            "ramp_fraction": 0.01, "init": "gaussian:0.02", "rslora": false, "pooling": "mean",
            "chat_template": false, "save_every": null, "keep_checkpoints": 3,
            "device": "cuda", "devices": ["cuda:0", "cuda:1"], "bucket_values": 1024,
            "recompute_attention": true, "text_column": "sentence", "text_pair_column": null,
            "label_column": "y", "prompt_column": "prompt", "completion_column": "completion",
            "skip_bad_rows": true, "head_only": false
        }"#;
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn an_old_run_json_resumes_with_its_settings() {
        let c: TrainConfig = serde_json::from_value(old_run_config()).unwrap();
        assert_eq!(c.method, Method::LoraPlus);
        assert_eq!(c.task, Task::Classify);
        assert_eq!(c.init, SingLoraInit::Gaussian(0.02));
        assert_eq!(c.device, DeviceSpec::Cuda(0));
        assert_eq!(
            c.devices,
            Some(vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)])
        );
        assert_eq!(c.pooling, Some(Pooling::Mean));
        assert_eq!(c.schedule, Schedule::Cosine);
        assert_eq!(c.clip(), None);
        assert!(c.recompute && !c.data.chat_template && c.data.skip_bad_rows);
        assert!(!c.recompute_layers);
        assert_eq!(c.data.columns.text, "sentence");
        assert_eq!(c.data.columns.label, "y");
        assert_eq!(c.data.max_length, 64);
        assert_eq!(c.data.truncation, Truncation::Right);
        assert_eq!((c.rank, c.grad_accum, c.bucket_values), (4, 2, 1024));
        assert_eq!(c.learning_rate(), 2e-4);
    }

    /// What is written reads back the same, under the same keys as before (other tools and
    /// older singlora versions read run.json).
    #[test]
    fn run_json_round_trips_under_the_same_keys() {
        let c: TrainConfig = serde_json::from_value(old_run_config()).unwrap();
        let v = serde_json::to_value(&c).unwrap();
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        let mut old_keys: Vec<String> = old_run_config()
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.replace("recompute_attention", "recompute"))
            .collect();
        // settings added since
        old_keys.push("save_minutes".into());
        old_keys.push("truncation".into());
        old_keys.push("packing".into());
        old_keys.push("base_dtype".into());
        old_keys.push("chat_template_file".into());
        old_keys.push("recompute_layers".into());
        keys.sort();
        old_keys.sort();
        assert_eq!(keys, old_keys);
        assert_eq!(v["method"], "lora-plus");
        assert_eq!(v["device"], "cuda:0");
        assert_eq!(v["max_grad_norm"], Value::Null);
        assert_eq!(v["text_column"], "sentence");
        // an older run.json without them reads as neither packed nor quantised
        assert_eq!(
            (v["packing"].clone(), v["base_dtype"].clone()),
            (false.into(), "auto".into())
        );
        let again: TrainConfig = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&again).unwrap(), v);
    }

    /// Missing keys (a run.json from before a setting existed) take the defaults, which are
    /// the command line's.
    #[test]
    fn defaults_are_the_command_lines() {
        let c: TrainConfig = serde_json::from_value(json!({"model": "m", "train": "t"})).unwrap();
        let d = TrainConfig::default();
        assert_eq!(serde_json::to_value(&d).unwrap()["model"], "");
        assert_eq!((c.rank, c.alpha, c.epochs, c.batch_size), (8, 8.0, 3, 16));
        assert_eq!(c.method, Method::SingLora);
        assert_eq!(c.init, SingLoraInit::KaimingWidth);
        assert_eq!(c.clip(), Some(1.0));
        assert!(c.data.chat_template && !c.recompute);
        assert_eq!(c.data, DataSettings::default());
        assert_eq!(c.data.columns, Columns::default());
        assert_eq!(c.bucket_values, crate::dist::default_bucket());
        assert_eq!(c.rank_devices(), vec![DeviceSpec::Cpu]);
        let bad = serde_json::from_value::<TrainConfig>(json!({"method": "lorax"}));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("unknown method `lorax`"));
    }

    /// Each refusal names its flag and says why; the defaults pass.
    #[test]
    fn validate_names_the_flag_at_fault() {
        TrainConfig::default().validate().unwrap();
        type Edit = fn(&mut TrainConfig);
        let cases: [(Edit, &str); 14] = [
            (|c| c.alpha = 0.0, "--alpha 0: must be positive"),
            (
                |c| c.alpha = f64::NAN,
                "--alpha NaN: must be a finite number",
            ),
            (
                |c| c.alpha = 1e6,
                "--alpha 1000000: scales the update by 1.25e5",
            ),
            (|c| c.lr = Some(-1e-3), "--lr -0.001: must be positive"),
            (
                |c| c.lr = Some(f64::INFINITY),
                "--lr inf: must be a finite number",
            ),
            (|c| c.weight_decay = f64::NAN, "--weight-decay NaN"),
            (
                |c| c.weight_decay = -0.01,
                "--weight-decay -0.01: must be 0 or more",
            ),
            (
                |c| c.warmup_ratio = 2.0,
                "--warmup-ratio 2: must be in [0, 1]",
            ),
            (|c| c.max_steps = Some(0), "--max-steps 0: trains nothing"),
            (|c| c.epochs = 0, "--epochs 0: trains nothing"),
            (|c| c.rank = 0, "--rank 0: must be at least 1"),
            (|c| c.data.max_length = 0, "--max-length 0"),
            (
                |c| c.eval_fraction = Some(1.0),
                "--eval-fraction 1: must be in [0, 1)",
            ),
            (|c| c.max_grad_norm = -1.0, "--max-grad-norm -1"),
        ];
        for (edit, want) in cases {
            let mut c = TrainConfig::default();
            edit(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.starts_with(want), "{err}");
        }
        // --max-steps given: --epochs is not used
        let c = TrainConfig {
            epochs: 0,
            max_steps: Some(5),
            ..TrainConfig::default()
        };
        c.validate().unwrap();
        // the scale, not alpha alone: rsLoRA divides by sqrt(r)
        let c = TrainConfig {
            alpha: 8000.0,
            rank: 16,
            ..TrainConfig::default()
        };
        c.validate().unwrap();
        let c = TrainConfig { rslora: true, ..c };
        assert!(c.validate().is_err());
    }
}
