//! [`TrainConfig`]: every setting of a run, typed. It is the `singlora train` command line
//! (the CLI flattens it into its arguments, so each flag and its default are declared once,
//! here) and it is saved as the `config` of `run.json`, which `--resume` reads back.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::adapter::init::SingLoraInit;
use crate::adapter::Method;
use crate::data::{Columns, Task};
use crate::device::DeviceSpec;
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
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
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
    #[arg(long, default_value_t = 128)]
    pub max_length: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// LoRA+: B's learning rate as a multiple of A's.
    #[arg(long, default_value_t = 16.0)]
    pub lora_plus_ratio: f64,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
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
    /// SingLoRA's ramp T as a fraction of the optimizer updates, when --ramp-steps is not given.
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
    /// SFT: do not wrap prompts in the model's chat template (used by default when the
    /// model has one; `predict` must then be given the same flag).
    #[arg(long = "no-chat-template", action = clap::ArgAction::SetFalse)]
    pub chat_template: bool,
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
    #[command(flatten)]
    #[serde(flatten)]
    pub columns: Columns,
    /// Drop malformed rows (reported) instead of refusing to start.
    #[arg(long)]
    pub skip_bad_rows: bool,
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
fn any_path(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

impl TrainConfig {
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
        assert!(c.recompute && !c.chat_template && c.skip_bad_rows);
        assert_eq!(c.columns.text, "sentence");
        assert_eq!(c.columns.label, "y");
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
        keys.sort();
        old_keys.sort();
        assert_eq!(keys, old_keys);
        assert_eq!(v["method"], "lora-plus");
        assert_eq!(v["device"], "cuda:0");
        assert_eq!(v["max_grad_norm"], Value::Null);
        assert_eq!(v["text_column"], "sentence");
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
        assert!(c.chat_template && !c.recompute);
        assert_eq!(c.columns, Columns::default());
        assert_eq!(c.bucket_values, crate::dist::default_bucket());
        assert_eq!(c.rank_devices(), vec![DeviceSpec::Cpu]);
        let bad = serde_json::from_value::<TrainConfig>(json!({"method": "lorax"}));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("unknown method `lorax`"));
    }
}
