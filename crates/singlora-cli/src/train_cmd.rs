//! `singlora train`, `eval` and `predict`: argument parsing and printing.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use singlora::data::Columns;
use singlora::session::Session;
use singlora::train::{parse_device, setup, train as run_training, TrainConfig};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Base model: a Hugging Face directory (config.json, *.safetensors, tokenizer.json) or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Training data (.jsonl or .csv).
    #[arg(long)]
    train: PathBuf,
    /// Evaluation data (same format).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Hold out this fraction of --train for evaluation when no --eval is given.
    #[arg(long)]
    eval_fraction: Option<f64>,
    /// classify or sft.
    #[arg(long, default_value = "classify")]
    task: String,
    /// singlora, lora, rslora, lora-plus or dora.
    #[arg(long, default_value = "singlora")]
    method: String,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 8.0)]
    alpha: f64,
    /// Comma-separated module names or suffixes, re:REGEX, or all-linear (default: the paper's
    /// targets for the model family).
    #[arg(long)]
    targets: Option<String>,
    /// Modules to leave alone (same syntax as --targets).
    #[arg(long)]
    exclude: Option<String>,
    /// Learning rate (default: 1e-3; 2e-4 for lora-plus, whose B gets 16x).
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Stop after this many optimizer updates (overrides --epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Micro-batches per optimizer update.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// LoRA+: B's learning rate as a multiple of A's.
    #[arg(long, default_value_t = 16.0)]
    lora_plus_ratio: f64,
    #[arg(long)]
    warmup_steps: Option<u64>,
    #[arg(long, default_value_t = 0.06)]
    warmup_ratio: f64,
    /// linear, cosine or constant.
    #[arg(long, default_value = "linear")]
    schedule: String,
    /// Clip the gradient norm (0 to disable).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Evaluate every N updates (default: each epoch) and at the end.
    #[arg(long)]
    eval_every: Option<u64>,
    /// SingLoRA ramp length T in updates (default: 1% of the updates; 0 = no ramp).
    #[arg(long)]
    ramp_steps: Option<u64>,
    /// SingLoRA's ramp T as a fraction of the optimizer updates, when --ramp-steps is not given.
    #[arg(long, default_value_t = 0.01)]
    ramp_fraction: f64,
    /// SingLoRA init: kaiming_width, gaussian_width, kaiming_rank or gaussian:STD.
    #[arg(long, default_value = "kaiming_width")]
    init: String,
    /// Scale by alpha/sqrt(r) instead of alpha/r.
    #[arg(long)]
    rslora: bool,
    /// SFT: do not wrap prompts in the model's chat template (used by default when the
    /// model has one; `predict` must then be given the same flag).
    #[arg(long)]
    no_chat_template: bool,
    /// Classification pooling: cls, mean or last (default: by model).
    #[arg(long)]
    pooling: Option<String>,
    /// Checkpoint every N updates (a final one is always written).
    #[arg(long)]
    save_every: Option<u64>,
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Data-parallel training, one rank per device: cuda:0,cuda:1,... (NCCL), or cpu,cpu,...
    /// (threads; for tests). --batch-size is the global batch, split over the ranks.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["device", "gpus"])]
    devices: Option<Vec<String>>,
    /// LLaMA on a GPU: recompute activations in the backward instead of keeping them (a few %
    /// slower): the SwiGLU output (b·len·intermediate values less per layer) and, for f32 or
    /// head sizes other than 64 and 128, the attention probabilities (b·heads·len²; the fused
    /// bf16 attention kernels never keep them).
    #[arg(long, alias = "recompute-attention")]
    recompute: bool,
    /// Shorthand for --devices cuda:0,...,cuda:N-1.
    #[arg(long, conflicts_with = "device")]
    gpus: Option<usize>,
    #[arg(long, default_value = "text")]
    text_column: String,
    #[arg(long)]
    text_pair_column: Option<String>,
    #[arg(long, default_value = "label")]
    label_column: String,
    #[arg(long, default_value = "prompt")]
    prompt_column: String,
    #[arg(long, default_value = "completion")]
    completion_column: String,
    /// Drop malformed rows (reported) instead of refusing to start.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Print the modules that match, the parameter count and the plan; train nothing.
    #[arg(long)]
    dry_run: bool,
    /// The run directory.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its newest checkpoint (with its saved settings).
    #[arg(long)]
    resume: bool,
    /// Replace an existing --out.
    #[arg(long)]
    overwrite: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        Ok(TrainConfig {
            model: self.model.clone(),
            train: self.train.clone(),
            eval: self.eval.clone(),
            task: self.task.clone(),
            method: self.method.clone(),
            rank: self.rank,
            alpha: self.alpha,
            targets: self.targets.clone(),
            exclude: self.exclude.clone(),
            lr: self.lr,
            epochs: self.epochs,
            max_steps: self.max_steps,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            max_length: self.max_length,
            seed: self.seed,
            weight_decay: self.weight_decay,
            lora_plus_ratio: self.lora_plus_ratio,
            warmup_steps: self.warmup_steps,
            warmup_ratio: self.warmup_ratio,
            schedule: self.schedule.parse()?,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            eval_every: self.eval_every,
            eval_fraction: self.eval_fraction,
            ramp_steps: self.ramp_steps,
            ramp_fraction: self.ramp_fraction,
            init: self.init.clone(),
            rslora: self.rslora,
            pooling: self.pooling.clone(),
            chat_template: !self.no_chat_template,
            save_every: self.save_every,
            keep_checkpoints: self.keep_checkpoints,
            device: self.device.clone(),
            devices: match (&self.devices, self.gpus) {
                (Some(d), _) => Some(d.clone()),
                (None, Some(0)) => return Err(anyhow::anyhow!("--gpus must be at least 1")),
                (None, Some(n)) => Some((0..n).map(|i| format!("cuda:{i}")).collect()),
                (None, None) => None,
            },
            recompute: self.recompute,
            text_column: self.text_column.clone(),
            text_pair_column: self.text_pair_column.clone(),
            label_column: self.label_column.clone(),
            prompt_column: self.prompt_column.clone(),
            completion_column: self.completion_column.clone(),
            skip_bad_rows: self.skip_bad_rows,
            quiet: self.quiet,
            ..TrainConfig::default()
        })
    }
}

pub fn train(args: TrainArgs) -> Result<()> {
    let cfg = args.config()?;
    if args.dry_run {
        let s = setup(cfg)?;
        print!("{}", s.plan.render());
        println!("(dry run: nothing trained)");
        return Ok(());
    }
    let summary = run_training(cfg, &args.out, args.resume, args.overwrite)?;
    if summary.interrupted {
        println!(
            "interrupted after {} of {} updates; resume with: singlora train --resume --out {} (other flags are read from run.json)",
            summary.steps,
            summary.total_steps,
            summary.run_dir.display()
        );
        return Ok(());
    }
    println!(
        "trained {} updates, {} trainable parameters on {} modules",
        summary.steps,
        summary.trainable_params,
        summary.adapted.len()
    );
    if let Some(e) = &summary.baseline_eval {
        println!("before: {}", e.summary());
    }
    if let Some(e) = &summary.final_eval {
        println!("after:  {}", e.summary());
    }
    println!(
        "adapter: {0}/adapter_model.safetensors; metrics: {0}/metrics.jsonl; curves: {0}/curves.svg",
        summary.run_dir.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    /// An adapter directory (a run directory, or its best/ or a checkpoint).
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "text")]
    text_column: String,
    #[arg(long)]
    text_pair_column: Option<String>,
    #[arg(long, default_value = "label")]
    label_column: String,
    #[arg(long, default_value = "prompt")]
    prompt_column: String,
    #[arg(long, default_value = "completion")]
    completion_column: String,
    #[arg(long)]
    skip_bad_rows: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// SFT: score prompts as they are, not in the model's chat template (match training).
    #[arg(long)]
    no_chat_template: bool,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let mut s = Session::load(&a.model, &a.adapter, parse_device(&a.device)?)?;
    if a.no_chat_template {
        s.chat = None;
    }
    let cols = Columns {
        text: a.text_column,
        text_pair: a.text_pair_column,
        label: a.label_column,
        prompt: a.prompt_column,
        completion: a.completion_column,
    };
    let r = s.eval_file(&a.data, &cols, a.max_length, a.batch_size, a.skip_bad_rows)?;
    if a.json {
        let mut v = r.to_json(s.adapter.config.step);
        if let (Some(m), Some(l)) = (&r.metrics, &s.labels) {
            v["per_class"] = serde_json::json!(l
                .names
                .iter()
                .zip(&m.per_class)
                .map(|(n, c)| serde_json::json!({"label": n, "precision": c.precision, "recall": c.recall, "f1": c.f1, "support": c.support}))
                .collect::<Vec<_>>());
            v["confusion"] = serde_json::json!(m.confusion);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", r.summary());
        if let (Some(m), Some(l)) = (&r.metrics, &s.labels) {
            print!("{}", m.render(&l.names));
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
    /// Texts (classification) or prompts (SFT); read from stdin, one per line, when none given.
    texts: Vec<String>,
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    /// SFT: most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print JSON lines.
    #[arg(long)]
    json: bool,
    /// SFT: send prompts as they are, not in the model's chat template (match training).
    #[arg(long)]
    no_chat_template: bool,
}

pub fn predict(a: PredictArgs) -> Result<()> {
    let mut s = Session::load(&a.model, &a.adapter, parse_device(&a.device)?)?;
    if a.no_chat_template {
        s.chat = None;
    }
    let texts = if a.texts.is_empty() {
        if std::io::stdin().is_terminal() {
            eprintln!("(reading texts from stdin, one per line; end with Ctrl-D)");
        }
        std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<Vec<_>>>()?
    } else {
        a.texts.clone()
    };
    let texts: Vec<String> = texts.into_iter().filter(|t| !t.trim().is_empty()).collect();
    if texts.is_empty() {
        bail!("no texts to predict");
    }
    if s.labels.is_some() {
        for (t, p) in texts.iter().zip(s.classify(&texts, a.max_length)?) {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"text": t, "label": p.label, "probabilities": p.probabilities.iter().map(|(l, x)| (l.clone(), serde_json::json!(x))).collect::<serde_json::Map<_, _>>()})
                );
            } else {
                let probs: Vec<String> = p
                    .probabilities
                    .iter()
                    .map(|(l, x)| format!("{l} {x:.3}"))
                    .collect();
                println!("{}\t{}\t{}", p.label, probs.join(", "), t);
            }
        }
    } else {
        for t in &texts {
            let c = s.generate(t, a.max_new_tokens)?;
            if a.json {
                println!("{}", serde_json::json!({"prompt": t, "completion": c}));
            } else {
                println!("{t}{c}");
            }
        }
    }
    Ok(())
}
