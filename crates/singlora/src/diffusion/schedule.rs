//! The noise schedule of a diffusion model (diffusers' `scheduler/scheduler_config.json`), the
//! training quantities it defines, and two samplers over it.
//!
//! Betas over T training steps (`num_train_timesteps`), t = 0…T−1:
//! - `linear`: βₜ = linspace(β_start, β_end, T)
//! - `scaled_linear`: βₜ = linspace(√β_start, √β_end, T)²
//! - `squaredcos_cap_v2`: βₜ = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999), ᾱ(s) = cos²((s + 0.008)/1.008 · π/2)
//! - `trained_betas`: the list given.
//!
//! With `rescale_betas_zero_snr`, √ᾱₜ is shifted and scaled so that √ᾱ₀ keeps its value and
//! √ᾱ_{T−1} = 0 (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
//! Flawed"). Then ᾱₜ = Πₛ≤ₜ(1 − βₛ), kept in f64.
//!
//! Training, for clean latents x₀, noise ε and timestep t:
//! - xₜ = √ᾱₜ·x₀ + √(1−ᾱₜ)·ε ([`NoiseSchedule::add_noise`])
//! - v = √ᾱₜ·ε − √(1−ᾱₜ)·x₀ ([`NoiseSchedule::velocity`]); the target is ε or v by
//!   `prediction_type` ([`NoiseSchedule::target`])
//! - SNR(t) = ᾱₜ/(1−ᾱₜ); the Min-SNR-γ loss weight (Hang et al. 2023) is min(SNR, γ)/SNR for
//!   ε-prediction and min(SNR, γ)/(SNR + 1) for v-prediction.
//!
//! Sampling over n steps picks n timesteps τ₀ > … > τₙ₋₁ by `timestep_spacing` (r = T/n):
//! `leading` τ = ⌊r⌋·(n−1−i) + `steps_offset`, `trailing` τ = round(T − i·r) − 1, `linspace`
//! τ = linspace(0, T−1, n) reversed (rounded for DDIM, fractional for Euler). Then
//! - DDIM (η = 0): x̂₀ = (xₜ − √(1−ᾱₜ)·ε̂)/√ᾱₜ, x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε̂, with
//!   prev = t − ⌊T/n⌋ and ᾱ of a negative prev equal to 1 (`set_alpha_to_one`) or ᾱ₀; with
//!   v-prediction x̂₀ = √ᾱₜ·xₜ − √(1−ᾱₜ)·v̂ and ε̂ = √ᾱₜ·v̂ + √(1−ᾱₜ)·xₜ; `clip_sample` clamps x̂₀.
//! - Euler: σ(t) = √((1−ᾱₜ)/ᾱₜ) interpolated linearly at the τᵢ, σₙ = 0; the sample starts as
//!   σ-scaled noise (`init_noise_sigma` = σ_max, or √(σ_max² + 1) for `leading`), the model sees
//!   x/√(σᵢ² + 1), and x ← x + (σᵢ₊₁ − σᵢ)·(x − x̂₀)/σᵢ with x̂₀ = x − σᵢ·ε̂ or
//!   x̂₀ = x/(σᵢ² + 1) − σᵢ/√(σᵢ² + 1)·v̂.
//!
//! Classifier-free guidance mixes the two predictions: ε̂ = ε̂_uncond + s·(ε̂_cond − ε̂_uncond).
//!
//! A field the file leaves out takes the default of the diffusers class that uses it, as
//! `DDIMScheduler.from_config(config)` does: DDIM spaces `leading`, Euler `linspace`.
//!
//! ```
//! use singlora::diffusion::schedule::{sampler, NoiseSchedule, SamplerKind};
//! let config = serde_json::json!({
//!     "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
//!     "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": false,
//!     "clip_sample": false,
//! });
//! let schedule = NoiseSchedule::from_config(&config, "scheduler_config.json".as_ref()).unwrap();
//! assert!((schedule.alphas_cumprod()[0] - (1.0 - 0.00085)).abs() < 1e-12);
//! let ddim = sampler(SamplerKind::Ddim, &schedule, 4).unwrap();
//! assert_eq!(ddim.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Tensor};
use serde_json::Value;

use crate::checkpoint::read_json;
use crate::error::{Error, Result};
use crate::model::weights::ConfigReader;

pub const SCHEDULER_CONFIG: &str = "scheduler_config.json";

/// diffusers' schedulers that share the DDPM forward process: their files give the betas that
/// the U-Net was trained with, whichever sampler they were saved for.
const DDPM_FAMILY: &[&str] = &[
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
];

/// What the model predicts from a noisy sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise ε.
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀.
    VPrediction,
}

/// How n sampling timesteps are chosen among the T training ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// A DDPM forward process: ᾱₜ and the settings samplers read.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    path: PathBuf,
    alphas_cumprod: Vec<f64>,
    pub prediction_type: PredictionType,
    /// None when the file leaves it out: each sampler then uses its diffusers default.
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    /// DDIM's ᾱ before the first training step: 1, or ᾱ₀.
    pub set_alpha_to_one: bool,
    /// DDIM clamps x̂₀ to ±this; None: no clamp.
    pub clip_sample: Option<f64>,
    pub rescale_betas_zero_snr: bool,
    /// A setting of the file that the Euler sampler does not implement: (field, hint).
    euler_unsupported: Option<(String, String, String)>,
}

impl NoiseSchedule {
    /// Reads `scheduler_dir/scheduler_config.json` (or the file itself when given one).
    pub fn from_dir(scheduler_dir: &Path) -> Result<Self> {
        let path = if scheduler_dir.is_dir() {
            scheduler_dir.join(SCHEDULER_CONFIG)
        } else {
            scheduler_dir.to_path_buf()
        };
        Self::from_config(&read_json(&path)?, &path)
    }

    /// Reads a parsed scheduler config; `path` names it in errors.
    pub fn from_config(value: &Value, path: &Path) -> Result<Self> {
        let c = ConfigReader { path, value };
        if let Some(class) = c.str_opt("_class_name")? {
            if !DDPM_FAMILY.contains(&class) {
                return Err(c.unsupported(
                    "_class_name",
                    format!(
                        "singlora trains with the DDPM noise schedule, which {} share; flow-matching and other processes are not implemented",
                        DDPM_FAMILY.join(", ")
                    ),
                ));
            }
        }
        let n = c.usize_or("num_train_timesteps", Some(1000))?;
        if n < 2 {
            return Err(Error::bad_field(
                path,
                "num_train_timesteps",
                format!("must be at least 2, found {n}"),
            ));
        }
        let mut betas = match c.get("trained_betas") {
            Some(v) => trained_betas(&c, v, n)?,
            None => {
                let start = c.f64_or("beta_start", 0.0001)?;
                let end = c.f64_or("beta_end", 0.02)?;
                match c.str_or("beta_schedule", "linear")? {
                    "linear" => linspace(start, end, n),
                    "scaled_linear" => linspace(start.sqrt(), end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect(),
                    "squaredcos_cap_v2" => cosine_betas(n),
                    _ => {
                        return Err(c.unsupported(
                            "beta_schedule",
                            "expected linear, scaled_linear or squaredcos_cap_v2",
                        ))
                    }
                }
            }
        };
        if let Some((t, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(**b > 0.0 && **b < 1.0))
        {
            return Err(Error::bad_field(
                path,
                "beta_schedule",
                format!("gives β_{t} = {b}; every β must lie in (0, 1)"),
            ));
        }
        let rescale_betas_zero_snr = c.bool_or("rescale_betas_zero_snr", false)?;
        if rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas_cumprod = betas
            .iter()
            .scan(1.0, |acc, b| {
                *acc *= 1.0 - b;
                Some(*acc)
            })
            .collect();
        let prediction_type = match c.str_or("prediction_type", "epsilon")? {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            _ => return Err(c.unsupported("prediction_type", "expected epsilon or v_prediction")),
        };
        let timestep_spacing = match c.str_opt("timestep_spacing")? {
            None => None,
            Some("leading") => Some(TimestepSpacing::Leading),
            Some("trailing") => Some(TimestepSpacing::Trailing),
            Some("linspace") => Some(TimestepSpacing::Linspace),
            Some(_) => {
                return Err(
                    c.unsupported("timestep_spacing", "expected leading, trailing or linspace")
                )
            }
        };
        c.refuse_unless(
            "thresholding",
            |v| v == &Value::Bool(false),
            "dynamic thresholding is not implemented; set it to false",
        )?;
        // DDIMScheduler's defaults: diffusers fills absent fields from the class that reads them.
        let clip_sample = c
            .bool_or("clip_sample", true)?
            .then(|| c.f64_or("clip_sample_range", 1.0))
            .transpose()?;
        let euler_unsupported = [
            ("interpolation_type", Value::from("linear")),
            ("use_karras_sigmas", Value::Bool(false)),
            ("use_exponential_sigmas", Value::Bool(false)),
            ("use_beta_sigmas", Value::Bool(false)),
            ("timestep_type", Value::from("discrete")),
            ("final_sigmas_type", Value::from("zero")),
        ]
        .into_iter()
        .find_map(|(field, plain)| {
            let v = c.get(field)?;
            (v != &plain).then(|| {
                (
                    field.to_string(),
                    v.to_string(),
                    format!("the Euler sampler implements only {field} = {plain}; use --sampler ddim or set it"),
                )
            })
        });
        Ok(Self {
            path: path.to_path_buf(),
            alphas_cumprod,
            prediction_type,
            timestep_spacing,
            steps_offset: c.usize_or("steps_offset", Some(0))?,
            set_alpha_to_one: c.bool_or("set_alpha_to_one", true)?,
            clip_sample,
            rescale_betas_zero_snr,
            euler_unsupported,
        })
    }

    /// The file the schedule came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// ᾱₜ for t = 0…T−1.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    fn alpha_bar(&self, t: usize) -> Result<f64> {
        self.alphas_cumprod.get(t).copied().ok_or_else(|| {
            Error::msg(format!(
                "timestep {t} is out of range: {} has {} training timesteps",
                self.path.display(),
                self.alphas_cumprod.len()
            ))
        })
    }

    /// a·x + b·y with one (a, b) per batch row: `coef(ᾱₜ)` for row i's timestep t[i].
    fn mix(
        &self,
        x: &Tensor,
        y: &Tensor,
        t: &[usize],
        coef: impl Fn(f64) -> (f64, f64),
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        if t.len() != b {
            return Err(Error::msg(format!(
                "{} timesteps given for a batch of {b}",
                t.len()
            )));
        }
        let mut shape = vec![1; x.rank()];
        shape[0] = b;
        let (mut a, mut c) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for &ti in t {
            let (ai, ci) = coef(self.alpha_bar(ti)?);
            a.push(ai as f32);
            c.push(ci as f32);
        }
        let column = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape.as_slice(), x.device())?.to_dtype(x.dtype())?)
        };
        Ok((x.broadcast_mul(&column(a)?)? + y.broadcast_mul(&column(c)?)?)?)
    }

    /// xₜ = √ᾱₜ·x₀ + √(1−ᾱₜ)·ε, one timestep per batch row.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        self.mix(x0, noise, t, |ab| (ab.sqrt(), (1.0 - ab).sqrt()))
    }

    /// v = √ᾱₜ·ε − √(1−ᾱₜ)·x₀.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        self.mix(noise, x0, t, |ab| (ab.sqrt(), -(1.0 - ab).sqrt()))
    }

    /// What the model learns to output: ε, or v for v-prediction.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        match self.prediction_type {
            PredictionType::Epsilon => Ok(noise.clone()),
            PredictionType::VPrediction => self.velocity(x0, noise, t),
        }
    }

    /// SNR(t) = ᾱₜ/(1−ᾱₜ).
    pub fn snr(&self, t: usize) -> Result<f64> {
        let ab = self.alpha_bar(t)?;
        Ok(ab / (1.0 - ab))
    }

    /// The Min-SNR-γ loss weight of timestep t: min(SNR, γ)/SNR (ε) or min(SNR, γ)/(SNR + 1)
    /// (v). A zero-SNR timestep gets weight 1 under ε-prediction, where the ratio is 0/0.
    pub fn min_snr_weight(&self, t: usize, gamma: f64) -> Result<f64> {
        let snr = self.snr(t)?;
        let clipped = snr.min(gamma);
        Ok(match self.prediction_type {
            PredictionType::Epsilon if snr == 0.0 => 1.0,
            PredictionType::Epsilon => clipped / snr,
            PredictionType::VPrediction => clipped / (snr + 1.0),
        })
    }

    fn spacing_or(&self, default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(default)
    }
}

fn trained_betas(c: &ConfigReader, v: &Value, n: usize) -> Result<Vec<f64>> {
    let betas = v
        .as_array()
        .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
        .ok_or_else(|| Error::bad_field(c.path, "trained_betas", "must be a list of numbers"))?;
    if betas.len() != n {
        return Err(Error::bad_field(
            c.path,
            "trained_betas",
            format!("has {} entries but num_train_timesteps is {n}", betas.len()),
        ));
    }
    Ok(betas)
}

/// numpy's `linspace(start, end, n)`: start + i·(end − start)/(n − 1), the last exactly `end`.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            if i + 1 == n {
                end
            } else {
                start + i as f64 * step
            }
        })
        .collect()
}

fn cosine_betas(n: usize) -> Vec<f64> {
    let alpha_bar = |s: f64| {
        ((s + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    let sqrt_ab: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc.sqrt()
        })
        .collect();
    let (first, last) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
    let ab: Vec<f64> = sqrt_ab
        .iter()
        .map(|s| ((s - last) * first / (first - last)).powi(2))
        .collect();
    (0..ab.len())
        .map(|i| {
            if i == 0 {
                1.0 - ab[0]
            } else {
                1.0 - ab[i] / ab[i - 1]
            }
        })
        .collect()
}

/// n timesteps among `total`, descending, as diffusers' schedulers space them: integers for
/// `leading` and `trailing`; `linspace` keeps fractions (Euler) or rounds them (`round`, DDIM).
/// Rounding is numpy's, half to even.
fn spaced_timesteps(
    spacing: TimestepSpacing,
    total: usize,
    n: usize,
    offset: usize,
    round: bool,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = total / n;
            (0..n).rev().map(|i| (i * ratio + offset) as f64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = total as f64 / n as f64;
            (0..n)
                .map(|i| (total as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                .collect()
        }
        TimestepSpacing::Linspace => linspace(0.0, (total - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| {
                if round {
                    t.round_ties_even()
                } else {
                    // Euler keeps numpy's float32 timesteps
                    t as f32 as f64
                }
            })
            .collect(),
    }
}

/// Which sampler generates images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    Ddim,
    Euler,
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Euler => "euler",
        })
    }
}

impl FromStr for SamplerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ddim" => Ok(SamplerKind::Ddim),
            "euler" => Ok(SamplerKind::Euler),
            _ => Err(Error::msg(format!(
                "unknown sampler `{s}`: expected ddim or euler"
            ))),
        }
    }
}

/// A reverse process over a fixed list of timesteps: start from `init_noise_sigma()`·noise,
/// then for each i feed `scale_input(x, i)` and `timesteps()[i]` to the model and replace x with
/// `step(model_out, i, x)`.
pub trait Sampler {
    /// The timesteps the model sees, descending.
    fn timesteps(&self) -> &[f64];
    /// The standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f64;
    /// The model's input at step i.
    fn scale_input(&self, x: &Tensor, i: usize) -> Result<Tensor>;
    /// The sample after step i, from the model's output at step i.
    fn step(&mut self, model_out: &Tensor, i: usize, x: &Tensor) -> Result<Tensor>;
}

/// A sampler of `kind` over `steps` timesteps of `schedule`.
pub fn sampler(
    kind: SamplerKind,
    schedule: &NoiseSchedule,
    steps: usize,
) -> Result<Box<dyn Sampler>> {
    let total = schedule.num_train_timesteps();
    if steps == 0 || steps > total {
        return Err(Error::msg(format!(
            "{steps} sampling steps asked for; {} allows 1 to {total}",
            schedule.path.display()
        )));
    }
    Ok(match kind {
        SamplerKind::Ddim => Box::new(Ddim::new(schedule, steps)),
        SamplerKind::Euler => Box::new(EulerDiscrete::new(schedule, steps)?),
    })
}

/// x̂₀ and ε̂ from the model's output, in f32.
fn predictions(
    prediction: PredictionType,
    x: &Tensor,
    out: &Tensor,
    alpha_bar: f64,
) -> Result<(Tensor, Tensor)> {
    let (a, s) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
    Ok(match prediction {
        PredictionType::Epsilon => (((x - (out * s)?)? / a)?, out.clone()),
        PredictionType::VPrediction => (((x * a)? - (out * s)?)?, ((out * a)? + (x * s)?)?),
    })
}

/// DDIM with η = 0: deterministic.
#[derive(Debug, Clone)]
pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    /// diffusers steps back by ⌊T/n⌋ whatever the spacing.
    stride: usize,
    prediction: PredictionType,
    clip: Option<f64>,
}

impl Ddim {
    pub fn new(schedule: &NoiseSchedule, steps: usize) -> Self {
        let total = schedule.num_train_timesteps();
        let acp = schedule.alphas_cumprod().to_vec();
        let spacing = schedule.spacing_or(TimestepSpacing::Leading);
        Self {
            timesteps: spaced_timesteps(spacing, total, steps, schedule.steps_offset, true),
            final_alpha_cumprod: if schedule.set_alpha_to_one {
                1.0
            } else {
                acp[0]
            },
            alphas_cumprod: acp,
            stride: total / steps,
            prediction: schedule.prediction_type,
            clip: schedule.clip_sample,
        }
    }

    fn alpha_bar(&self, t: f64) -> Result<f64> {
        // leading spacing with steps_offset can reach T; diffusers would fail there too
        self.alphas_cumprod
            .get(t as usize)
            .copied()
            .ok_or_else(|| Error::msg(format!("timestep {t} is past the schedule's end")))
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_input(&self, x: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn step(&mut self, model_out: &Tensor, i: usize, x: &Tensor) -> Result<Tensor> {
        let t = self.timesteps[i];
        let prev = t as i64 - self.stride as i64;
        let ab = self.alpha_bar(t)?;
        let ab_prev = if prev >= 0 {
            self.alpha_bar(prev as f64)?
        } else {
            self.final_alpha_cumprod
        };
        let dtype = x.dtype();
        let (x, out) = (x.to_dtype(DType::F32)?, model_out.to_dtype(DType::F32)?);
        let (mut x0, eps) = predictions(self.prediction, &x, &out, ab)?;
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        let prev_x = ((x0 * ab_prev.sqrt())? + (eps * (1.0 - ab_prev).sqrt())?)?;
        Ok(prev_x.to_dtype(dtype)?)
    }
}

/// diffusers' `EulerDiscreteScheduler` without churn: the first-order solver of the
/// probability-flow ODE in σ.
#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    timesteps: Vec<f64>,
    /// σ at each timestep, then 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: PredictionType,
}

impl EulerDiscrete {
    pub fn new(schedule: &NoiseSchedule, steps: usize) -> Result<Self> {
        if let Some((field, value, hint)) = &schedule.euler_unsupported {
            return Err(Error::Unsupported {
                path: schedule.path.clone(),
                field: field.clone(),
                value: value.clone(),
                hint: hint.clone(),
            });
        }
        let total = schedule.num_train_timesteps();
        let spacing = schedule.spacing_or(TimestepSpacing::Linspace);
        let timesteps = spaced_timesteps(spacing, total, steps, schedule.steps_offset, false);
        let mut acp = schedule.alphas_cumprod().to_vec();
        if schedule.rescale_betas_zero_snr {
            // σ would be infinite at ᾱ = 0; diffusers puts ᾱ at 2⁻²⁴ (f32's epsilon/2) instead
            acp[total - 1] = 2f64.powi(-24);
        }
        let all: Vec<f64> = acp.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let mut sigmas = timesteps
            .iter()
            .map(|&t| {
                let t = t.clamp(0.0, (total - 1) as f64);
                let lo = (t.floor() as usize).min(total - 2);
                let w = t - lo as f64;
                Ok(all[lo] * (1.0 - w) + all[lo + 1] * w)
            })
            .collect::<Result<Vec<f64>>>()?;
        sigmas.push(0.0);
        let max = sigmas.iter().copied().fold(0.0, f64::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: schedule.prediction_type,
        })
    }

    /// σ at each timestep, then 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Sampler for EulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i];
        Ok((x / (s * s + 1.0).sqrt())?)
    }

    fn step(&mut self, model_out: &Tensor, i: usize, x: &Tensor) -> Result<Tensor> {
        let (s, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let dtype = x.dtype();
        let (x, out) = (x.to_dtype(DType::F32)?, model_out.to_dtype(DType::F32)?);
        let dt = s_next - s;
        // (x − x̂₀)/σ written out, so that x (of size σ_max) is not subtracted from x̂₀ in f32
        let next = match self.prediction {
            PredictionType::Epsilon => (&x + (&out * dt)?)?,
            PredictionType::VPrediction => {
                let keep = 1.0 + dt * s / (s * s + 1.0);
                ((&x * keep)? + (&out * (dt / (s * s + 1.0).sqrt()))?)?
            }
        };
        Ok(next.to_dtype(dtype)?)
    }
}

/// Classifier-free guidance: uncond + scale·(cond − uncond).
pub fn guide(uncond: &Tensor, cond: &Tensor, scale: f64) -> Result<Tensor> {
    Ok((uncond + ((cond - uncond)? * scale)?)?)
}
