//! `singlora train-diffusion` and `generate`: argument parsing and printing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use singlora::device::DeviceSpec;
use singlora::diffusion::config::DiffusionConfig;
use singlora::diffusion::pipeline::{GenerateRequest, Pipeline};
use singlora::diffusion::schedule::SamplerKind;
use singlora::diffusion::train::{
    resume, train, DiffusionObserver, DiffusionPlan, DiffusionResume, DiffusionSummary,
    DiffusionUpdate,
};

use crate::train_cmd::Signals;

#[derive(Args, Debug)]
pub struct TrainDiffusionArgs {
    #[command(flatten)]
    config: DiffusionConfig,
    /// The run directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in RUN_DIR (or --out) from its newest checkpoint, with the settings in
    /// its run.json; only --max-steps and --device may change.
    #[arg(long, value_name = "RUN_DIR", num_args = 0..=1)]
    resume: Option<Option<PathBuf>>,
    /// Replace an existing --out (only a run directory singlora wrote).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

pub fn train_diffusion(args: TrainDiffusionArgs, given: &[String]) -> Result<()> {
    let obs = Progress::new(args.quiet)?;
    let summary = match &args.resume {
        Some(dir) => {
            let dir = match (dir, &args.out) {
                (Some(r), Some(o)) if r != o => bail!(
                    "--resume {} and --out {} name different runs",
                    r.display(),
                    o.display()
                ),
                (Some(r), _) => r.clone(),
                (None, Some(o)) => o.clone(),
                (None, None) => bail!("--resume needs a run directory (--resume RUN_DIR)"),
            };
            let allowed = ["max_steps", "device", "resume", "out", "quiet"];
            if let Some(k) = given.iter().find(|k| !allowed.contains(&k.as_str())) {
                bail!(
                    "--{} cannot change when a run resumes (its run.json holds the settings); only --max-steps and --device can",
                    k.replace('_', "-")
                );
            }
            let changes = DiffusionResume {
                max_steps: given
                    .iter()
                    .any(|k| k == "max_steps")
                    .then_some(args.config.max_steps),
                device: given
                    .iter()
                    .any(|k| k == "device")
                    .then_some(args.config.device),
                stop_after: None,
            };
            resume(&dir, &changes, &obs)?
        }
        None => {
            let Some(out) = &args.out else {
                bail!("train-diffusion needs --out RUN_DIR");
            };
            train(args.config.clone(), out, args.overwrite, &obs)?
        }
    };
    if summary.interrupted {
        if let Some(code) = obs.signals.exit_code() {
            std::process::exit(code);
        }
        return Ok(());
    }
    let dir = &summary.run_dir;
    let kohya = dir.join(singlora::diffusion::files::KOHYA_FILE);
    println!(
        "trained {} updates; adapter in {}: adapter_model.safetensors (singlora), {} (diffusers){}",
        summary.steps,
        dir.display(),
        singlora::diffusion::files::DIFFUSERS_FILE,
        if kohya.is_file() {
            format!(
                ", {} (ComfyUI, A1111)",
                singlora::diffusion::files::KOHYA_FILE
            )
        } else {
            String::new()
        }
    );
    if let Some(last) = summary.samples.last() {
        println!("samples: {}", last.display());
    }
    Ok(())
}

/// Progress on stderr (see [`crate::progress`]) and Ctrl-C as a stop.
struct Progress {
    line: crate::progress::Progress,
    signals: &'static Signals,
}

impl Progress {
    fn new(quiet: bool) -> Result<Self> {
        let signals = Signals::get()?;
        signals.reset();
        Ok(Self {
            line: crate::progress::Progress::new(quiet),
            signals,
        })
    }

    fn say(&self, text: &str) {
        self.line.say(text);
    }
}

impl DiffusionObserver for Progress {
    fn warning(&self, text: &str) {
        self.say(&format!("warning: {text}"));
    }

    fn generating_class_images(&self, n: usize) {
        self.say(&format!(
            "generating {n} class images with the base model for prior preservation"
        ));
    }

    fn started(&self, plan: &DiffusionPlan, from_step: u64) {
        self.say(&format!(
            "{} layers adapted ({} trainable parameters, {:.3}% of the U-Net); {} subject images{} at {}px; {} updates at lr {:.2e}; {} prediction",
            plan.adapted_modules.len(),
            plan.adapter_params,
            100.0 * plan.adapter_params as f64 / plan.base_params.max(1) as f64,
            plan.instance_images,
            if plan.class_images > 0 {
                format!(", {} class images", plan.class_images)
            } else {
                String::new()
            },
            plan.resolution,
            plan.total_updates,
            plan.lr,
            plan.prediction_type,
        ));
        self.line.start(plan.total_updates, from_step);
    }

    fn resumed(&self, run_dir: &Path, step: u64) {
        self.line.resumed(run_dir, step);
    }

    fn skipped_checkpoint(&self, dir: &Path, why: &str) {
        self.line.skipped_checkpoint(dir, why);
    }

    fn updated(&self, r: &DiffusionUpdate) {
        let prior = r
            .prior_loss
            .map(|p| format!(" (prior {p:.4})"))
            .unwrap_or_default();
        let msg = format!(
            "loss {:.4}{prior} lr {:.2e} u {:.3} {:.2} img/s",
            r.loss, r.lr, r.u, r.images_per_s
        );
        self.line.update(r.step, r.total, msg);
    }

    fn sampled(&self, step: u64, path: &Path) {
        self.say(&format!("update {step}: samples in {}", path.display()));
    }

    fn finished(&self, s: &DiffusionSummary) {
        self.line.finish();
        if s.interrupted {
            self.say(&format!(
                "stopped at update {} of {}; the checkpoint is saved: resume with singlora train-diffusion --resume {}",
                s.steps,
                s.total_steps,
                s.run_dir.display()
            ));
        }
    }

    fn stop_requested(&self) -> bool {
        self.signals.exit_code().is_some()
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A Stable Diffusion model as a diffusers folder.
    #[arg(long)]
    model: PathBuf,
    /// An adapter directory (a train-diffusion run, or one of its checkpoints).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt; repeat for several.
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// What the images should not look like (the unconditional side of guidance).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// The first image's seed; image k of a prompt uses seed + k.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampler steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (1 turns it off).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// ddim or euler.
    #[arg(long, default_value = "ddim")]
    sampler: SamplerKind,
    /// Image side in pixels (default: the model's).
    #[arg(long)]
    size: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// The PNG to write (a grid with one row per prompt).
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    overwrite: bool,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    if args.num_images == 0 || args.steps == 0 {
        bail!("--num-images and --steps must be at least 1");
    }
    if args.out.exists() && !args.overwrite {
        bail!(
            "{} already exists; pass --overwrite to replace it",
            args.out.display()
        );
    }
    let mut inputs = vec![("--model", args.model.as_path())];
    inputs.extend(args.adapter.as_deref().map(|a| ("--adapter", a)));
    singlora::atomic::check_disjoint(&args.out, &inputs)?;
    let device = args.device.open()?;
    let dtype = if device.is_cpu() {
        candle_core::DType::F32
    } else {
        candle_core::DType::BF16
    };
    let mut pipe = Pipeline::load(&args.model, dtype, &device)?;
    if let Some(a) = &args.adapter {
        pipe.load_adapter(a)?;
    }
    let k = args.num_images;
    let req = GenerateRequest {
        prompts: args
            .prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), k))
            .collect(),
        negative: args.negative_prompt.clone(),
        seeds: (0..args.prompts.len())
            .flat_map(|_| (0..k as u64).map(|i| args.seed + i))
            .collect(),
        steps: args.steps,
        guidance: args.guidance,
        sampler: args.sampler,
        size: args.size.unwrap_or_else(|| pipe.default_size()),
    };
    let images = pipe.generate(&req)?;
    singlora::diffusion::images::save_grid(&images, k, &args.out)?;
    println!(
        "wrote {} ({} images)",
        args.out.display(),
        req.prompts.len()
    );
    Ok(())
}
