//! DreamBooth: `singlora train-diffusion`.
//!
//! Each update draws a batch of subject latents (and, with prior preservation, as many class
//! latents), t ~ U{0, …, T−1} and ε ~ N(0, I) per image, forms x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε,
//! and regresses the U-Net's output on the schedule's target (ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0):
//!
//!   L = mean_i w_i·‖f(x_t, t, c) − target‖²  (subject)  +  λ_prior · (the same over class rows)
//!
//! with w_i = 1, or min-SNR's min(SNR_t, γ)/SNR_t (ε) and min(SNR_t, γ)/(SNR_t + 1) (v). The
//! images go through the VAE once, before training: each update samples x_0 = μ + σ·z from the
//! cached posterior. Every random draw of update k comes from (seed, k), so a resumed run sees
//! the same batches, timesteps and noise as an uninterrupted one.
//!
//! The run directory holds `run.json`, `metrics.jsonl`, `curves.svg`, `samples/step-N.png`
//! (a grid of the sample prompts at fixed seeds, before training and every `--sample-every`
//! updates), `checkpoints/step-N/` (adapter, optimizer, trainer state), and at the end the
//! adapter in three layouts: ours (`adapter_config.json` + `adapter_model.safetensors`),
//! diffusers' (`pytorch_lora_weights.safetensors`) and kohya's (`lora_kohya.safetensors`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;
use serde_json::json;

use super::config::DiffusionConfig;
use super::images::{list_images, load_square, save_grid};
use super::pipeline::{Conditioning, GenerateRequest, Pipeline};
use crate::adapter::config::AdapterConfig;
use crate::adapter::file::AdapterFile;
use crate::adapter::ramp::{RampClock, RampSchedule};
use crate::adapter::target::TargetSpec;
use crate::adapter::{inject, AdapterSpec};
use crate::error::{Error, Result};
use crate::metrics::MetricsLog;
use crate::optim::{AdamW, AdamWConfig, GradAccumulator};
use crate::rng::{normal, rng_for};
use crate::train::rundir::RunDir;
use crate::train::schedule::lr_at;
use crate::train::state::{self, TrainerState};

/// What a run is about to do.
#[derive(Debug, Clone, Serialize)]
pub struct DiffusionPlan {
    pub adapted_modules: Vec<String>,
    pub adapter_params: usize,
    pub base_params: usize,
    pub instance_images: usize,
    pub class_images: usize,
    pub total_updates: u64,
    pub lr: f64,
    pub ramp_steps: u64,
    pub resolution: usize,
    pub prediction_type: String,
    pub xl: bool,
}

/// The figures of one update (its line of `metrics.jsonl`).
#[derive(Debug, Clone)]
pub struct DiffusionUpdate {
    pub step: u64,
    pub total: u64,
    /// The subject loss plus λ_prior times the class loss.
    pub loss: f64,
    pub instance_loss: f64,
    pub prior_loss: Option<f64>,
    pub lr: f64,
    pub u: f64,
    pub images_per_s: f64,
    pub grad_norm: Option<f64>,
}

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone)]
pub struct DiffusionSummary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub total_steps: u64,
    pub interrupted: bool,
    pub adapted: Vec<String>,
    pub trainable_params: usize,
    pub last_loss: Option<f64>,
    /// The sample grids written, oldest first.
    pub samples: Vec<PathBuf>,
}

/// Receives a run's events; every method has an empty default. The library never prints.
pub trait DiffusionObserver: Send + Sync {
    fn warning(&self, _text: &str) {}
    /// Class images are being generated (`n` of them) for prior preservation.
    fn generating_class_images(&self, _n: usize) {}
    fn started(&self, _plan: &DiffusionPlan, _from_step: u64) {}
    fn resumed(&self, _run_dir: &Path, _step: u64) {}
    fn skipped_checkpoint(&self, _dir: &Path, _why: &str) {}
    fn updated(&self, _report: &DiffusionUpdate) {}
    fn sampled(&self, _step: u64, _path: &Path) {}
    fn finished(&self, _summary: &DiffusionSummary) {}
    /// Asked after every update: true stops the run there, with a checkpoint.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// An observer that reports nothing.
pub struct QuietDiffusion;
impl DiffusionObserver for QuietDiffusion {}

/// What may change when a run resumes.
#[derive(Debug, Clone, Default)]
pub struct DiffusionResume {
    pub max_steps: Option<u64>,
    pub device: Option<crate::device::DeviceSpec>,
    pub stop_after: Option<u64>,
}

/// Trains a fresh run into `out`.
pub fn train(
    cfg: DiffusionConfig,
    out: &Path,
    overwrite: bool,
    obs: &dyn DiffusionObserver,
) -> Result<DiffusionSummary> {
    cfg.validate()?;
    if out.exists() && !overwrite {
        return Err(Error::msg(format!(
            "{} already exists; pass --resume to continue that run or --overwrite to replace it",
            out.display()
        )));
    }
    let mut inputs = vec![
        ("--model", cfg.model.as_path()),
        ("--instance-images", cfg.instance_images.as_path()),
    ];
    inputs.extend(cfg.class_images.as_deref().map(|p| ("--class-images", p)));
    crate::atomic::check_disjoint(out, &inputs)?;
    crate::atomic::check_replaceable(out, overwrite)?;
    // load the model before the directory exists: a bad model leaves nothing behind
    let dtype_dev = open_device(&cfg)?;
    let pipe = Pipeline::load(&cfg.model, dtype_dev.0, &dtype_dev.1)?;
    let held = RunDir::create(out, overwrite, &inputs)?;
    match Trainer::new(cfg, out, pipe, held, None, obs) {
        Ok(t) => t.run(),
        Err(e) => {
            // a run that never started (an unreadable image, say) leaves nothing behind
            let _ = std::fs::remove_dir_all(out);
            Err(e)
        }
    }
}

/// Resumes the run in `out` from its newest readable checkpoint.
pub fn resume(
    out: &Path,
    changes: &DiffusionResume,
    obs: &dyn DiffusionObserver,
) -> Result<DiffusionSummary> {
    let held = RunDir::resume(out)?;
    let p = out.join("run.json");
    let saved = crate::checkpoint::read_json(&p)?;
    let mut cfg: DiffusionConfig = serde_json::from_value(saved["config"].clone())
        .map_err(|e| Error::bad_file(&p, format!("is not a train-diffusion run: {e}")))?;
    if let Some(n) = changes.max_steps {
        cfg.max_steps = n;
    }
    if let Some(d) = changes.device {
        cfg.device = d;
    }
    cfg.stop_after = changes.stop_after;
    cfg.validate()?;
    let (dtype, device) = open_device(&cfg)?;
    let pipe = Pipeline::load(&cfg.model, dtype, &device)?;
    let found = state::list(out)?;
    if found.is_empty() {
        return Err(Error::msg(format!(
            "{}: no checkpoint to resume from",
            out.display()
        )));
    }
    Trainer::new(cfg, out, pipe, held, Some(found), obs)?.run()
}

/// bf16 on a GPU, f32 on the CPU.
fn open_device(cfg: &DiffusionConfig) -> Result<(DType, Device)> {
    let device = cfg.device.open()?;
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    Ok((dtype, device))
}

/// A latent posterior N(μ, σ²) of one image, cached.
struct Latent {
    mean: Tensor,
    std: Tensor,
}

struct Trainer<'a> {
    cfg: DiffusionConfig,
    out: PathBuf,
    pipe: Pipeline,
    _held: RunDir,
    obs: &'a dyn DiffusionObserver,
    /// Subject latents; with --flip, entry i + n is image i mirrored.
    instance: Vec<Latent>,
    class: Vec<Latent>,
    instance_cond: Conditioning,
    class_cond: Option<Conditioning>,
    clock: RampClock,
    opt: AdamW,
    acc: GradAccumulator,
    st: TrainerState,
    adapter_config: AdapterConfig,
    plan: DiffusionPlan,
    log: MetricsLog,
    samples: Vec<PathBuf>,
}

impl<'a> Trainer<'a> {
    fn new(
        cfg: DiffusionConfig,
        out: &Path,
        mut pipe: Pipeline,
        held: RunDir,
        checkpoints: Option<Vec<(u64, PathBuf)>>,
        obs: &'a dyn DiffusionObserver,
    ) -> Result<Self> {
        let size = cfg.resolution.unwrap_or_else(|| pipe.default_size());
        pipe.check_size(size)
            .map_err(|e| Error::msg(format!("--resolution: {e}")))?;
        let total = cfg.max_steps;
        let ramp = match (cfg.method.kind().ramps(), cfg.ramp_steps) {
            (true, Some(t)) => RampSchedule::new(t),
            (true, None) => RampSchedule::fraction_of(total, 0.01),
            (false, _) => RampSchedule::none(),
        };
        let spec = AdapterSpec {
            kind: cfg.method.kind(),
            r: cfg.rank,
            alpha: cfg.alpha,
            rslora: cfg.rslora || cfg.method.uses_rslora(),
            init: cfg.init,
            seed: cfg.seed,
            dtype: DType::F32,
        };
        let targets = TargetSpec::parse(cfg.target_spec(), cfg.exclude.as_deref())?;
        let base_params = pipe.unet.num_params();
        let clock = RampClock::new(ramp, 0);
        let adapted = inject::inject(pipe.unet.linears_mut(), &[], &spec, &targets, &clock)?;
        let mut adapter_config = AdapterConfig::for_spec(&spec, ramp, &targets);
        adapter_config.base_model_name_or_path = Some(cfg.model.to_string_lossy().into_owned());

        // the images, through the VAE once
        let device = pipe.device.clone();
        let files = list_images(&cfg.instance_images)?;
        let mut images = vec![];
        for f in &files {
            images.push(load_square(f, size)?);
        }
        if cfg.flip {
            let flipped: Vec<Tensor> = images
                .iter()
                .map(|t| t.flip(&[2]))
                .collect::<candle_core::Result<_>>()?;
            images.extend(flipped);
        }
        let instance = encode_all(&pipe, &images)?;
        let instance_cond = pipe.encode(std::slice::from_ref(&cfg.instance_prompt), size)?;
        let (class, class_cond) = if cfg.prior_preservation {
            let prompt = cfg.class_prompt.clone().unwrap_or_default();
            let paths = class_images(&cfg, out, &pipe, size, obs)?;
            let mut imgs = vec![];
            for p in &paths {
                imgs.push(load_square(p, size)?);
            }
            (
                encode_all(&pipe, &imgs)?,
                Some(pipe.encode(&[prompt], size)?),
            )
        } else {
            (vec![], None)
        };

        let lr = cfg.learning_rate();
        let opt_cfg = AdamWConfig {
            lr,
            weight_decay: cfg.weight_decay,
            lora_plus_ratio: cfg.method.b_lr_ratio(cfg.lora_plus_ratio),
            ..Default::default()
        };
        let mut opt = AdamW::new(adapter_params(&pipe.unet), opt_cfg);
        let mut st = TrainerState {
            step: 0,
            epoch: 0,
            next_batch: 0,
            seed: cfg.seed,
            best_eval_loss: None,
            tokens_seen: 0,
            elapsed_s: 0.0,
        };
        if let Some(found) = checkpoints {
            let mut loaded = None;
            for (step, dir) in found.iter().rev() {
                let attempt = state::load(dir, &device).and_then(|(af, o, saved)| {
                    inject::load(pipe.unet.linears_mut(), &af, &clock)?;
                    let mut fresh = AdamW::new(adapter_params(&pipe.unet), opt_cfg);
                    fresh.load_state(o)?;
                    Ok((fresh, saved))
                });
                match attempt {
                    Ok(x) => {
                        loaded = Some((*step, x));
                        break;
                    }
                    Err(e) => obs.skipped_checkpoint(dir, &e.to_string()),
                }
            }
            let (step, (o, saved)) = loaded.ok_or_else(|| {
                Error::msg(format!(
                    "{}: none of its {} checkpoints can be read",
                    out.display(),
                    found.len()
                ))
            })?;
            opt = o;
            st = saved;
            clock.set_step(st.step);
            obs.resumed(out, step);
        }
        let acc = GradAccumulator::new(opt.vars());
        let opt = opt.with_clock(clock.clone());
        let adapter_params = adapter_params(&pipe.unet)
            .iter()
            .map(|p| p.var.elem_count())
            .sum();
        let plan = DiffusionPlan {
            adapted_modules: adapted,
            adapter_params,
            base_params,
            instance_images: files.len(),
            class_images: class.len(),
            total_updates: total,
            lr,
            ramp_steps: ramp.ramp_steps,
            resolution: size,
            prediction_type: match pipe.schedule.prediction_type {
                super::schedule::PredictionType::Epsilon => "epsilon",
                super::schedule::PredictionType::VPrediction => "v_prediction",
            }
            .to_string(),
            xl: pipe.is_xl(),
        };
        if st.step == 0 {
            write_run_json(&cfg, &plan, out)?;
        }
        let log = MetricsLog::append_to(&out.join("metrics.jsonl"), Some(st.step))?;
        Ok(Self {
            cfg,
            out: out.to_path_buf(),
            pipe,
            _held: held,
            obs,
            instance,
            class,
            instance_cond,
            class_cond,
            clock,
            opt,
            acc,
            st,
            adapter_config,
            plan,
            log,
            samples: vec![],
        })
    }

    fn run(mut self) -> Result<DiffusionSummary> {
        let total = self.cfg.max_steps;
        self.obs.started(&self.plan, self.st.step);
        if self.st.step == 0 {
            self.sample()?;
        }
        let mut last_loss = None;
        let mut interrupted = false;
        let started = Instant::now();
        let elapsed0 = self.st.elapsed_s;
        while self.st.step < total {
            let t0 = Instant::now();
            self.clock.set_training(true);
            let (loss, inst, prior, n_images) = self.loss_and_grads()?;
            let lr = lr_at(
                self.plan.lr,
                self.cfg.schedule,
                self.cfg.warmup_steps,
                total,
                self.st.step + 1,
            );
            let u = self.clock.u();
            let grad_norm = self.opt.step(&mut self.acc, lr, self.cfg.clip())?;
            self.clock.set_training(false);
            self.st.step += 1;
            self.st.tokens_seen += n_images as u64;
            self.st.elapsed_s = elapsed0 + started.elapsed().as_secs_f64();
            last_loss = Some(loss);
            let report = DiffusionUpdate {
                step: self.st.step,
                total,
                loss,
                instance_loss: inst,
                prior_loss: prior,
                lr,
                u,
                images_per_s: n_images as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                grad_norm,
            };
            self.log.write(&json!({
                "step": report.step,
                "loss": report.loss,
                "instance_loss": report.instance_loss,
                "prior_loss": report.prior_loss,
                "lr": report.lr,
                "u": report.u,
                "images_per_s": report.images_per_s,
                "grad_norm": report.grad_norm,
                "elapsed_s": self.st.elapsed_s,
            }))?;
            self.obs.updated(&report);
            let last = self.st.step >= total;
            let every = self.cfg.sample_every;
            if last || (every > 0 && self.st.step % every == 0) {
                self.sample()?;
            }
            let stop =
                self.obs.stop_requested() || self.cfg.stop_after.is_some_and(|n| self.st.step >= n);
            let save_now = last
                || stop
                || (self.cfg.save_every > 0 && self.st.step % self.cfg.save_every == 0);
            if save_now {
                state::save(
                    &self.out,
                    &self.adapter_file()?,
                    &self.opt.state()?,
                    &self.st,
                    self.cfg.keep_checkpoints.max(1),
                )?;
            }
            if stop && !last {
                interrupted = true;
                break;
            }
        }
        if !interrupted {
            self.write_outputs()?;
        }
        let summary = DiffusionSummary {
            run_dir: self.out.clone(),
            steps: self.st.step,
            total_steps: total,
            interrupted,
            adapted: self.plan.adapted_modules.clone(),
            trainable_params: self.plan.adapter_params,
            last_loss,
            samples: self.samples.clone(),
        };
        self.obs.finished(&summary);
        Ok(summary)
    }

    /// Instance indices of update `step`: consecutive slices of per-epoch permutations.
    fn batch_indices(&self, step: u64, n: usize) -> Vec<usize> {
        let bs = self.cfg.batch_size;
        (0..bs)
            .map(|j| {
                let pos = step as usize * bs + j;
                let (epoch, k) = (pos / n, pos % n);
                let mut perm: Vec<usize> = (0..n).collect();
                perm.shuffle(&mut rng_for(
                    self.cfg.seed,
                    &format!("diffusion-epoch-{epoch}"),
                ));
                perm[k]
            })
            .collect()
    }

    /// The loss of update `st.step + 1` and its gradients in the accumulator; returns
    /// (loss, subject loss, class loss, images).
    fn loss_and_grads(&mut self) -> Result<(f64, f64, Option<f64>, usize)> {
        let step = self.st.step;
        let n_src = files_count(&self.instance, self.cfg.flip);
        let idx = self.batch_indices(step, n_src);
        let mut rng = rng_for(self.cfg.seed, &format!("diffusion-step-{step}"));
        let mut latents = vec![];
        for &i in &idx {
            let flip = self.cfg.flip && rng.random::<bool>();
            latents.push(&self.instance[if flip { i + n_src } else { i }]);
        }
        let bs = idx.len();
        let mut class_rows = 0;
        if !self.class.is_empty() {
            for _ in 0..bs {
                let j = rng.random_range(0..self.class.len());
                latents.push(&self.class[j]);
                class_rows += 1;
            }
        }
        let rows = latents.len();
        let t_max = self.pipe.schedule.num_train_timesteps();
        let ts: Vec<usize> = (0..rows).map(|_| rng.random_range(0..t_max)).collect();
        let shape = latents[0].mean.dims().to_vec();
        let dev = self.pipe.device.clone();
        let mut x0 = vec![];
        let mut noise = vec![];
        for l in &latents {
            let z = normal(&mut rng, 1.0, shape.clone(), DType::F32, &Device::Cpu)?;
            x0.push((&l.mean + l.std.mul(&z.to_device(&dev)?)?)?);
            noise.push(normal(
                &mut rng,
                1.0,
                shape.clone(),
                DType::F32,
                &Device::Cpu,
            )?);
        }
        let x0 = Tensor::stack(&x0, 0)?;
        let noise = Tensor::stack(&noise, 0)?.to_device(&dev)?;
        let sched = &self.pipe.schedule;
        let noisy = sched.add_noise(&x0, &noise, &ts)?;
        let target = sched.target(&x0, &noise, &ts)?;
        let mut rows_idx = vec![0usize; bs];
        let mut cond = self.instance_cond.select(&rows_idx)?;
        if let Some(cc) = &self.class_cond {
            rows_idx = vec![0usize; class_rows];
            cond = cond.cat(&cc.select(&rows_idx)?)?;
        }
        let t = Tensor::new(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), &dev)?;
        let weights: Vec<f32> = ts
            .iter()
            .map(|&t| match self.cfg.snr_gamma {
                Some(g) => Ok(sched.min_snr_weight(t, g)? as f32),
                None => Ok(1.0),
            })
            .collect::<Result<_>>()?;
        let prior_weight = self.cfg.prior_loss_weight;
        // the instance rows' loss, and the class rows' under prior preservation
        let loss_of = |pred: &Tensor| -> Result<(Tensor, (Tensor, Option<Tensor>))> {
            let per_row = (pred.to_dtype(DType::F32)? - &target)?
                .sqr()?
                .flatten_from(1)?
                .mean(1)?;
            let per_row = per_row.mul(&Tensor::new(weights, &dev)?)?;
            let inst = per_row.narrow(0, 0, bs)?.mean_all()?;
            Ok(if class_rows > 0 {
                let p = per_row.narrow(0, bs, class_rows)?.mean_all()?;
                ((&inst + (&p * prior_weight)?)?, (inst, Some(p)))
            } else {
                (inst.clone(), (inst, None))
            })
        };
        let inputs = (
            &noisy.to_dtype(self.pipe.dtype)?,
            &t,
            &cond.context,
            cond.added.as_ref(),
        );
        let ((loss, (inst, prior)), grads) = self.pipe.unet.taped_step(inputs, loss_of)?;
        self.acc.add(&grads)?;
        let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
        let l = scalar(&loss)?;
        if !l.is_finite() {
            return Err(Error::msg(format!(
                "the training loss is {l} at update {}: the run diverged (try a lower --lr)",
                step + 1
            )));
        }
        Ok((
            l,
            scalar(&inst)?,
            prior.as_ref().map(scalar).transpose()?,
            rows,
        ))
    }

    /// The adapter as it stands, as a file image.
    fn adapter_file(&self) -> Result<AdapterFile> {
        let mut config = self.adapter_config.clone();
        config.step = self.clock.step();
        AdapterFile::from_adapters(
            config,
            self.pipe
                .unet
                .linears()
                .into_iter()
                .filter_map(|l| l.adapter().map(|a| (l.name(), l.dims(), a))),
            Default::default(),
        )
    }

    /// A grid of the sample prompts at seeds 0..k, written to samples/step-N.png.
    fn sample(&mut self) -> Result<()> {
        let prompts = self.cfg.sample_prompts();
        let k = self.cfg.samples_per_prompt;
        let req = GenerateRequest {
            prompts: prompts
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.clone(), k))
                .collect(),
            negative: String::new(),
            seeds: (0..prompts.len()).flat_map(|_| 0..k as u64).collect(),
            steps: self.cfg.sample_steps,
            guidance: self.cfg.guidance,
            sampler: self.cfg.sampler,
            size: self.plan.resolution,
        };
        let images = self.pipe.generate(&req)?;
        let dir = self.out.join("samples");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let p = dir.join(format!("step-{:06}.png", self.st.step));
        save_grid(&images, k, &p)?;
        self.obs.sampled(self.st.step, &p);
        self.samples.push(p);
        Ok(())
    }

    /// The final adapter in our layout, diffusers' and kohya's, and curves.svg.
    fn write_outputs(&self) -> Result<()> {
        let af = self.adapter_file()?;
        crate::train::write_adapter_in_place(&af, &self.out)?;
        super::files::write_diffusers_into(&af, &self.out)?;
        if af.config.kind != crate::adapter::AdapterKind::Dora {
            super::files::write_kohya_into(&af, &self.out)?;
        }
        let lines = crate::metrics::read_metrics(&self.out.join("metrics.jsonl"))?;
        let title = format!(
            "DreamBooth {} r={} on {}",
            self.cfg.method,
            self.cfg.rank,
            self.cfg.model.display()
        );
        crate::plot::write_curves(&self.out.join("curves.svg"), &lines, &title)
    }
}

/// The trainable tensors of the U-Net's adapters, in model order.
fn adapter_params(unet: &super::unet::UNet) -> Vec<crate::adapter::Param> {
    crate::adapter::params_of(unet.linears())
}

/// Source images of the subject (the mirrored copies excluded).
fn files_count(instance: &[Latent], flip: bool) -> usize {
    if flip {
        instance.len() / 2
    } else {
        instance.len()
    }
}

/// The VAE posterior of each (3, s, s) image.
fn encode_all(pipe: &Pipeline, images: &[Tensor]) -> Result<Vec<Latent>> {
    images
        .iter()
        .map(|img| {
            let x = img.unsqueeze(0)?.to_device(&pipe.device)?;
            let (mean, std) = pipe.latent_moments(&x.to_dtype(pipe.dtype)?)?;
            Ok(Latent {
                mean: mean.squeeze(0)?.to_dtype(DType::F32)?,
                std: std.squeeze(0)?.to_dtype(DType::F32)?,
            })
        })
        .collect()
}

/// The class images of a prior-preservation run: those of --class-images, then images the
/// base model generates into RUN_DIR/class_images until there are --num-class-images (kept
/// there, so a resumed run reuses them).
fn class_images(
    cfg: &DiffusionConfig,
    out: &Path,
    pipe: &Pipeline,
    size: usize,
    obs: &dyn DiffusionObserver,
) -> Result<Vec<PathBuf>> {
    let mut have = match &cfg.class_images {
        Some(d) => list_images(d)?,
        None => vec![],
    };
    have.truncate(cfg.num_class_images);
    let gen_dir = out.join("class_images");
    if gen_dir.is_dir() {
        for p in list_images(&gen_dir).unwrap_or_default() {
            if have.len() < cfg.num_class_images {
                have.push(p);
            }
        }
    }
    let missing = cfg.num_class_images.saturating_sub(have.len());
    if missing == 0 {
        return Ok(have);
    }
    obs.generating_class_images(missing);
    std::fs::create_dir_all(&gen_dir).map_err(|e| Error::io(&gen_dir, e))?;
    let prompt = cfg.class_prompt.clone().unwrap_or_default();
    let start = have.len();
    for i in start..cfg.num_class_images {
        let img = pipe.generate(&GenerateRequest {
            prompts: vec![prompt.clone()],
            negative: String::new(),
            seeds: vec![cfg.seed.wrapping_add(1_000_000 + i as u64)],
            steps: cfg.sample_steps,
            guidance: cfg.guidance,
            sampler: cfg.sampler,
            size,
        })?;
        let p = gen_dir.join(format!("class-{i:04}.png"));
        save_grid(&img, 1, &p)?;
        have.push(p);
    }
    Ok(have)
}

fn write_run_json(cfg: &DiffusionConfig, plan: &DiffusionPlan, out: &Path) -> Result<()> {
    crate::train::rundir::write_run_json(
        out,
        json!({
            "kind": "train-diffusion",
            "config": cfg,
            "plan": plan,
            "seed": cfg.seed,
        }),
    )
}
