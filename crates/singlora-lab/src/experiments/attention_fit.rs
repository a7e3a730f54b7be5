//! The synthetic attention fit of the paper's figure 1: adapt the query and key weights Wq, Wk
//! (128 × 128) so that a frozen attention layer reproduces a target attention pattern, with
//! SingLoRA and LoRA at equal parameter count, AdamW at lr 1e-4 (the paper: 15k iterations,
//! final loss ≈ 1e-5 for SingLoRA against ≈ 1e-2 for LoRA).
//!
//! The paper gives no more than that; the rest of the setting is ours:
//! - frozen Wq0, Wk0 (d × d, entries N(0, 1/d)) and inputs X (n tokens × d, entries N(0, 1)),
//!   so the attention logits X·Wq0ᵀ·(X·Wk0ᵀ)ᵀ/√d have unit scale;
//! - the target P* = softmax(X·Wq*ᵀ·(X·Wk*ᵀ)ᵀ/√d) (rows over keys) of a perturbed pair
//!   Wq* = Wq0 + c·Uq·Vqᵀ, Wk* = Wk0 + c·Uk·Vkᵀ with U, V (d × k) entries N(0, 1/d): a generic,
//!   non-symmetric update of rank k (default k = d, full rank: neither method can represent
//!   it; with k ≤ r LoRA can represent it exactly and SingLoRA's symmetric A·Aᵀ cannot), of
//!   the size of Wq0 itself for c = 1;
//! - loss = mean squared error between the adapted attention matrix and P* (n × n), full batch;
//! - every method uses α = r (scale 1), the library's default initialisations (SingLoRA
//!   `kaiming_width`, LoRA Kaiming-uniform A and zero B) and, for SingLoRA, the ramp
//!   T = 1% of the steps counted by the library's clock;
//! - AdamW with PyTorch's defaults (β = (0.9, 0.999), ε = 1e-8, weight decay 0.01);
//! - each seed draws its own problem (Wq0, Wk0, X, the perturbation) and its adapters' init;
//!   all methods of one seed see the same problem, so the comparison is paired.
//!
//! The adapted layers are the library's [`AdaptedLinear`] around a [`FrozenLinear`], trained
//! through candle's autograd with [`AdamW`] and [`GradAccumulator`]: the product code paths.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;
use serde_json::{json, Value};

use crate::bands::{BandPoint, BandSeries};
use singlora::adapter::init::SingLoraInit;
use singlora::adapter::ramp::{RampClock, RampSchedule};
use singlora::adapter::{AdaptedLinear, Adapter, AdapterSpec, Method, Param};
use singlora::error::{Error, Result};
use singlora::linear::FrozenLinear;
use singlora::optim::{AdamW, AdamWConfig, GradAccumulator};
use singlora::rng::{normal, rng_for};

/// The paper's numbers for this experiment (final loss after 15k iterations).
pub const PAPER_SINGLORA_LOSS: f64 = 1e-5;
pub const PAPER_LORA_LOSS: f64 = 1e-2;
pub const PAPER_STEPS: usize = 15_000;

/// The setting shared by every run.
#[derive(Debug, Clone, PartialEq)]
pub struct FitConfig {
    /// Width of Wq, Wk (d × d).
    pub d: usize,
    /// Tokens n in X (n × d); the attention matrix is n × n.
    pub tokens: usize,
    /// Rank k of the target's perturbation of Wq0 and Wk0.
    pub target_rank: usize,
    /// Size c of the perturbation (its k singular values are ≈ c).
    pub target_scale: f64,
    /// Optimizer updates per run.
    pub steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// SingLoRA's ramp T as a fraction of `steps` (the paper: 1%).
    pub ramp_fraction: f64,
    /// The training loss is recorded every this many updates.
    pub record_every: usize,
    pub init: SingLoraInit,
    /// f32 (the training dtype) or f64.
    pub dtype: DType,
    /// Keep the adapters' weights in bf16: computed in `dtype`, rounded to bf16 at the init
    /// and after every update, as a trainer with bf16 weights and no f32 master copy does.
    pub store_bf16: bool,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            d: 128,
            tokens: 64,
            target_rank: 128,
            target_scale: 1.0,
            steps: PAPER_STEPS,
            lr: 1e-4,
            weight_decay: 0.01,
            ramp_fraction: 0.01,
            record_every: 100,
            init: SingLoraInit::default(),
            dtype: DType::F32,
            store_bf16: false,
        }
    }
}

impl FitConfig {
    /// SingLoRA's ramp T in optimizer updates.
    pub fn ramp_steps(&self) -> u64 {
        RampSchedule::fraction_of(self.steps as u64, self.ramp_fraction).ramp_steps
    }

    fn check(&self) -> Result<()> {
        if self.d == 0 || self.tokens == 0 || self.target_rank == 0 {
            return Err(Error::msg(
                "d, tokens and the target rank must be at least 1",
            ));
        }
        if self.steps == 0 || self.record_every == 0 {
            return Err(Error::msg("steps and record_every must be at least 1"));
        }
        if !matches!(self.dtype, DType::F32 | DType::F64) {
            return Err(Error::msg("the attention fit runs in f32 or f64"));
        }
        Ok(())
    }

    /// Every setting, for the record.
    pub fn to_json(&self) -> Value {
        json!({
            "d": self.d,
            "tokens": self.tokens,
            "target_rank": self.target_rank,
            "target_scale": self.target_scale,
            "steps": self.steps,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "adam_betas": [0.9, 0.999],
            "adam_eps": 1e-8,
            "ramp_steps": self.ramp_steps(),
            "record_every": self.record_every,
            "singlora_init": self.init.to_string(),
            "dtype": format!("{:?}", self.dtype).to_lowercase(),
            "adapter_weights": if self.store_bf16 { "bf16".to_string() } else { format!("{:?}", self.dtype).to_lowercase() },
            "alpha": "r (scale 1)",
            "loss": "MSE between n x n attention matrices",
        })
    }
}

/// One method at one rank, e.g. `singlora:16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arm {
    pub method: Method,
    pub rank: usize,
}

impl Arm {
    pub fn new(method: Method, rank: usize) -> Self {
        Self { method, rank }
    }

    /// Trainable parameters for Wq and Wk together (d × d each).
    pub fn params(&self, d: usize) -> usize {
        2 * self.method.kind().param_count(d, d, self.rank)
    }
}

impl fmt::Display for Arm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} r={}", self.method, self.rank)
    }
}

impl FromStr for Arm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (m, r) = s
            .split_once(':')
            .ok_or_else(|| Error::msg(format!("`{s}`: expected METHOD:RANK, e.g. singlora:16")))?;
        let rank: usize = r
            .trim()
            .parse()
            .ok()
            .filter(|r| *r >= 1)
            .ok_or_else(|| Error::msg(format!("`{s}`: the rank must be an integer ≥ 1")))?;
        Ok(Self::new(m.trim().parse()?, rank))
    }
}

/// A comma-separated list of arms (`singlora:16,lora:8`).
pub fn parse_arms(s: &str) -> Result<Vec<Arm>> {
    let arms = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(Arm::from_str)
        .collect::<Result<Vec<_>>>()?;
    if arms.is_empty() {
        return Err(Error::msg("no arms given"));
    }
    Ok(arms)
}

/// The comparison at equal parameter count for square weights: SingLoRA at rank 2r has
/// n·2r = r·(n + n) parameters, as many as LoRA at rank r.
pub fn equal_param_arms(lora_rank: usize) -> Vec<Arm> {
    vec![
        Arm::new(Method::SingLora, 2 * lora_rank),
        Arm::new(Method::Lora, lora_rank),
    ]
}

/// Row-wise softmax of a 2-D tensor (over the last dimension), differentiable.
pub fn softmax_rows(s: &Tensor) -> Result<Tensor> {
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// softmax(Q·Kᵀ/√d) for Q, K of shape (n, d).
fn attention_of(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let d = q.dim(1)?;
    softmax_rows(&(q.matmul(&k.t()?)? / (d as f64).sqrt())?)
}

fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.mean_all()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// One seed's problem: the frozen weights, the inputs and the target attention.
#[derive(Debug, Clone)]
pub struct Problem {
    pub x: Tensor,
    pub wq0: Tensor,
    pub wk0: Tensor,
    pub target: Tensor,
    /// The loss of the unadapted layer (what every method starts from).
    pub initial_loss: f64,
}

impl Problem {
    /// Draws the problem of `seed` (computed in f64, stored in `cfg.dtype`).
    pub fn generate(cfg: &FitConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.check()?;
        let (d, n, k) = (cfg.d, cfg.tokens, cfg.target_rank);
        let w_std = 1.0 / (d as f64).sqrt();
        let draw = |name: &str, std: f64, shape: (usize, usize)| {
            normal(
                &mut rng_for(seed, &format!("attention_fit/{name}")),
                std,
                shape,
                DType::F64,
                device,
            )
        };
        let x = draw("x", 1.0, (n, d))?;
        let wq0 = draw("wq0", w_std, (d, d))?;
        let wk0 = draw("wk0", w_std, (d, d))?;
        let perturb = |which: &str| -> Result<Tensor> {
            let u = draw(&format!("{which}_u"), w_std, (d, k))?;
            let v = draw(&format!("{which}_v"), w_std, (d, k))?;
            Ok((u.matmul(&v.t()?)? * cfg.target_scale)?)
        };
        let wq = (&wq0 + perturb("q")?)?;
        let wk = (&wk0 + perturb("k")?)?;
        let target = attention_of(&x.matmul(&wq.t()?)?, &x.matmul(&wk.t()?)?)?;
        let base = attention_of(&x.matmul(&wq0.t()?)?, &x.matmul(&wk0.t()?)?)?;
        let initial_loss = scalar(&mse(&base, &target)?)?;
        let dt = cfg.dtype;
        Ok(Self {
            x: x.to_dtype(dt)?,
            wq0: wq0.to_dtype(dt)?,
            wk0: wk0.to_dtype(dt)?,
            target: target.to_dtype(dt)?,
            initial_loss,
        })
    }
}

/// The frozen attention layer with adapters on Wq and Wk.
#[derive(Debug, Clone)]
pub struct FitModel {
    pub q: AdaptedLinear,
    pub k: AdaptedLinear,
    pub clock: RampClock,
}

impl FitModel {
    /// Fresh adapters of `arm` (α = r) on the problem's Wq0 and Wk0; the init is drawn from
    /// `seed`. SingLoRA's ramp is `cfg.ramp_steps()`.
    pub fn new(problem: &Problem, arm: Arm, cfg: &FitConfig, seed: u64) -> Result<Self> {
        let schedule = match arm.method {
            Method::SingLora => RampSchedule::new(cfg.ramp_steps()),
            _ => RampSchedule::none(),
        };
        let clock = RampClock::new(schedule, 0);
        let mut spec = AdapterSpec::new(arm.method.kind(), arm.rank, arm.rank as f64);
        spec.rslora = arm.method.uses_rslora();
        spec.init = cfg.init;
        spec.seed = seed;
        spec.dtype = problem.wq0.dtype();
        let layer = |name: &str, w0: &Tensor| -> Result<AdaptedLinear> {
            let adapter = Adapter::init(&spec, name, w0, &clock)?;
            Ok(AdaptedLinear::new(name, FrozenLinear::new(w0.clone(), None)).with_adapter(adapter))
        };
        Ok(Self {
            q: layer("attn.q_proj", &problem.wq0)?,
            k: layer("attn.k_proj", &problem.wk0)?,
            clock,
        })
    }

    /// The adapted attention matrix softmax(Q·Kᵀ/√d), Q = X·Wqᵀ, K = X·Wkᵀ.
    pub fn attention(&self, x: &Tensor) -> Result<Tensor> {
        attention_of(&self.q.forward(x)?, &self.k.forward(x)?)
    }

    /// MSE between the adapted attention and the target (a scalar tensor).
    pub fn loss(&self, problem: &Problem) -> Result<Tensor> {
        mse(&self.attention(&problem.x)?, &problem.target)
    }

    /// The trainable tensors of both adapters.
    pub fn params(&self) -> Vec<Param> {
        singlora::adapter::params_of([&self.q, &self.k])
    }

    pub fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.var.elem_count()).sum()
    }
}

/// The record of one run (one seed, one arm).
#[derive(Debug, Clone, Serialize)]
pub struct FitRun {
    pub arm: String,
    pub method: String,
    pub rank: usize,
    pub params: usize,
    pub seed: u64,
    pub initial_loss: f64,
    /// The loss after the last update (evaluated with u of the updates applied).
    pub final_loss: f64,
    /// `final_loss / initial_loss`.
    pub relative_final_loss: f64,
    /// (updates applied, loss): the unadapted loss at 0, the training loss every
    /// `record_every` updates, the final loss at `steps`.
    pub curve: Vec<(usize, f64)>,
    /// (update, fraction): at each recorded update, the fraction of the adapters' entries that
    /// the update left exactly as they were.
    pub unchanged: Vec<(usize, f64)>,
    /// The loss became NaN or infinite (the run stopped there).
    pub diverged: bool,
    pub seconds: f64,
}

/// Trains `arm` on `problem` for `cfg.steps` full-batch AdamW updates.
pub fn fit(problem: &Problem, arm: Arm, cfg: &FitConfig, seed: u64) -> Result<FitRun> {
    cfg.check()?;
    let start = Instant::now();
    let model = FitModel::new(problem, arm, cfg, seed)?;
    let opt_cfg = AdamWConfig {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        lora_plus_ratio: (arm.method == Method::LoraPlus).then_some(16.0),
        ..Default::default()
    };
    let params = model.params();
    let store = |params: &[Param]| -> Result<()> {
        if cfg.store_bf16 {
            for p in params {
                let t = p.var.as_tensor();
                p.var.set(&t.to_dtype(DType::BF16)?.to_dtype(t.dtype())?)?;
            }
        }
        Ok(())
    };
    store(&params)?;
    let mut opt = AdamW::new(params.clone(), opt_cfg).with_clock(model.clock.clone());
    let mut acc = GradAccumulator::new(opt.vars());
    let mut curve = vec![(0, problem.initial_loss)];
    let mut unchanged = vec![];
    let mut diverged = false;
    model.clock.set_training(true);
    for applied in 0..cfg.steps {
        let loss = model.loss(problem)?;
        if applied > 0 && applied % cfg.record_every == 0 {
            let v = scalar(&loss)?;
            curve.push((applied, v));
            if !v.is_finite() {
                diverged = true;
                break;
            }
        }
        let recorded = (applied + 1) % cfg.record_every == 0;
        let before: Vec<Tensor> = if recorded {
            params
                .iter()
                .map(|p| p.var.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?
        } else {
            vec![]
        };
        acc.add(&loss.backward()?)?;
        opt.step(&mut acc, cfg.lr, None)?;
        store(&params)?;
        if recorded {
            let (mut same, mut total) = (0.0, 0usize);
            for (p, b) in params.iter().zip(&before) {
                same += scalar(&p.var.as_tensor().eq(b)?.to_dtype(DType::F64)?.sum_all()?)?;
                total += b.elem_count();
            }
            unchanged.push((applied + 1, same / total.max(1) as f64));
        }
    }
    model.clock.set_training(false);
    let final_loss = if diverged {
        f64::NAN
    } else {
        scalar(&model.loss(problem)?)?
    };
    if !diverged {
        diverged = !final_loss.is_finite();
        curve.push((cfg.steps, final_loss));
    }
    Ok(FitRun {
        arm: arm.to_string(),
        method: arm.method.to_string(),
        rank: arm.rank,
        params: model.num_params(),
        seed,
        initial_loss: problem.initial_loss,
        final_loss,
        relative_final_loss: final_loss / problem.initial_loss,
        curve,
        unchanged,
        diverged,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Runs every (seed, arm) pair on `jobs` threads, calling `on_done` as each finishes; the
/// result is ordered by seed, then arm.
pub fn run_all(
    cfg: &FitConfig,
    seeds: &[u64],
    arms: &[Arm],
    jobs: usize,
    device: &Device,
    on_done: &(dyn Fn(&FitRun) + Sync),
) -> Result<Vec<FitRun>> {
    cfg.check()?;
    let work: Vec<(u64, Arm)> = seeds
        .iter()
        .flat_map(|&s| arms.iter().map(move |&a| (s, a)))
        .collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<FitRun>>> = Mutex::new(vec![None; work.len()]);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, work.len().max(1)) {
            scope.spawn(|| loop {
                if first_error.lock().unwrap().is_some() {
                    return;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&(seed, arm)) = work.get(i) else {
                    return;
                };
                let run =
                    Problem::generate(cfg, seed, device).and_then(|p| fit(&p, arm, cfg, seed));
                match run {
                    Ok(run) => {
                        on_done(&run);
                        results.lock().unwrap()[i] = Some(run);
                    }
                    Err(e) => {
                        first_error.lock().unwrap().get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .unwrap()
        .into_iter()
        .flatten()
        .collect())
}

/// The q-quantile (0 ≤ q ≤ 1) of sorted values, linearly interpolated.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos.fract());
    if i + 1 < sorted.len() {
        sorted[i] * (1.0 - f) + sorted[i + 1] * f
    } else {
        sorted[i]
    }
}

fn sorted_finite(v: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Final losses of one arm across seeds.
#[derive(Debug, Clone, Serialize)]
pub struct ArmSummary {
    pub arm: String,
    pub params: usize,
    pub seeds: usize,
    pub diverged: usize,
    pub median_final: f64,
    pub mean_final: f64,
    pub std_final: f64,
    pub min_final: f64,
    pub max_final: f64,
    /// Geometric mean of the final losses.
    pub geomean_final: f64,
    /// Median of final / initial loss.
    pub median_relative: f64,
}

/// One summary per arm, in the order of `arms`, over the runs that did not diverge.
pub fn summarize(runs: &[FitRun], arms: &[Arm]) -> Vec<ArmSummary> {
    arms.iter()
        .map(|arm| {
            let label = arm.to_string();
            let mine: Vec<&FitRun> = runs.iter().filter(|r| r.arm == label).collect();
            let finals = sorted_finite(mine.iter().map(|r| r.final_loss));
            let rel = sorted_finite(mine.iter().map(|r| r.relative_final_loss));
            let n = finals.len() as f64;
            let mean = finals.iter().sum::<f64>() / n;
            let var = finals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
            let geo = (finals.iter().map(|x| x.ln()).sum::<f64>() / n).exp();
            ArmSummary {
                arm: label,
                params: mine.first().map_or(0, |r| r.params),
                seeds: mine.len(),
                diverged: mine.iter().filter(|r| r.diverged).count(),
                median_final: quantile(&finals, 0.5),
                mean_final: mean,
                std_final: var.sqrt(),
                min_final: finals.first().copied().unwrap_or(f64::NAN),
                max_final: finals.last().copied().unwrap_or(f64::NAN),
                geomean_final: geo,
                median_relative: quantile(&rel, 0.5),
            }
        })
        .collect()
}

/// Seeds on which arm `a` ends with a lower loss than arm `b`, and the seeds both finished.
pub fn paired_wins(runs: &[FitRun], a: &Arm, b: &Arm) -> (usize, usize) {
    let (la, lb) = (a.to_string(), b.to_string());
    let mut wins = 0;
    let mut total = 0;
    for ra in runs.iter().filter(|r| r.arm == la) {
        if let Some(rb) = runs.iter().find(|r| r.arm == lb && r.seed == ra.seed) {
            if ra.final_loss.is_finite() && rb.final_loss.is_finite() {
                total += 1;
                wins += usize::from(ra.final_loss < rb.final_loss);
            }
        }
    }
    (wins, total)
}

/// The summary as a Markdown table.
pub fn render_table(summaries: &[ArmSummary]) -> String {
    let mut s = String::from(
        "| method | params (Wq+Wk) | seeds | median final loss | mean ± std final loss | min … max | median final/initial |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for a in summaries {
        let diverged = if a.diverged > 0 {
            format!(" ({} diverged)", a.diverged)
        } else {
            String::new()
        };
        s.push_str(&format!(
            "| {} | {} | {}{} | {:.3e} | {:.3e} ± {:.2e} | {:.2e} … {:.2e} | {:.3e} |\n",
            a.arm,
            singlora::inspect::thousands(a.params),
            a.seeds,
            diverged,
            a.median_final,
            a.mean_final,
            a.std_final,
            a.min_final,
            a.max_final,
            a.median_relative
        ));
    }
    s
}

/// One JSON line per run (losses rounded to f32 precision to keep the file small).
pub fn run_json(run: &FitRun) -> Value {
    let r = |v: f64| -> Value {
        if v.is_finite() {
            json!(v as f32)
        } else {
            Value::Null
        }
    };
    json!({
        "arm": run.arm,
        "method": run.method,
        "rank": run.rank,
        "params": run.params,
        "seed": run.seed,
        "initial_loss": run.initial_loss,
        "final_loss": run.final_loss,
        "relative_final_loss": run.relative_final_loss,
        "diverged": run.diverged,
        "seconds": (run.seconds * 100.0).round() / 100.0,
        "curve": run.curve.iter().map(|&(s, l)| json!([s, r(l)])).collect::<Vec<_>>(),
        "unchanged": run.unchanged.iter().map(|&(s, f)| json!([s, r(f)])).collect::<Vec<_>>(),
    })
}

/// Writes the runs as JSONL (atomically).
pub fn write_jsonl(path: &Path, runs: &[FitRun]) -> Result<()> {
    let mut s = String::new();
    for run in runs {
        s.push_str(&run_json(run).to_string());
        s.push('\n');
    }
    singlora::atomic::write_file(path, s.as_bytes())
}

/// Per arm, the median, quartiles and range of the loss over seeds at each recorded step.
pub fn bands(runs: &[FitRun], arms: &[Arm]) -> Vec<BandSeries> {
    arms.iter()
        .map(|arm| {
            let label = arm.to_string();
            let mine: Vec<&FitRun> = runs.iter().filter(|r| r.arm == label).collect();
            let mut steps: Vec<usize> = mine
                .iter()
                .flat_map(|r| r.curve.iter().map(|p| p.0))
                .collect();
            steps.sort_unstable();
            steps.dedup();
            let points = steps
                .into_iter()
                .filter_map(|s| {
                    let v = sorted_finite(
                        mine.iter()
                            .filter_map(|r| r.curve.iter().find(|p| p.0 == s).map(|p| p.1)),
                    );
                    (!v.is_empty()).then(|| BandPoint {
                        x: s as f64,
                        lo: v[0],
                        q1: quantile(&v, 0.25),
                        median: quantile(&v, 0.5),
                        q3: quantile(&v, 0.75),
                        hi: v[v.len() - 1],
                    })
                })
                .collect();
            BandSeries {
                label: format!("{label} ({} params)", arm_params(&mine)),
                points,
            }
        })
        .collect()
}

fn arm_params(runs: &[&FitRun]) -> String {
    runs.first()
        .map_or("?".into(), |r| singlora::inspect::thousands(r.params))
}

/// Draws the loss curves (median line, quartile band, min–max band, log y) as an SVG.
pub fn write_plot(path: &Path, runs: &[FitRun], arms: &[Arm], cfg: &FitConfig) -> Result<()> {
    let seeds = runs
        .iter()
        .map(|r| r.seed)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let title = format!(
        "Attention fit: Wq, Wk {d}x{d}, n = {n} tokens, target rank {k}, AdamW lr {lr:e}, {seeds} seeds (median, quartiles, min-max)",
        d = cfg.d,
        n = cfg.tokens,
        k = cfg.target_rank,
        lr = cfg.lr,
    );
    crate::bands::write_bands(
        path,
        &title,
        "optimizer updates",
        "MSE between attention matrices (log scale)",
        &bands(runs, arms),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> FitConfig {
        FitConfig {
            d: 32,
            tokens: 16,
            target_rank: 2,
            steps: 300,
            lr: 1e-2,
            record_every: 50,
            ..Default::default()
        }
    }

    #[test]
    fn equal_parameter_arms_have_equal_counts() -> Result<()> {
        let cfg = FitConfig::default();
        let p = Problem::generate(&cfg, 0, &Device::Cpu)?;
        let arms = equal_param_arms(8);
        let counts: Vec<usize> = arms
            .iter()
            .map(|a| FitModel::new(&p, *a, &cfg, 0).map(|m| m.num_params()))
            .collect::<Result<_>>()?;
        // SingLoRA r = 16: 2·128·16; LoRA r = 8: 2·8·(128 + 128)
        assert_eq!(counts, vec![4096, 4096]);
        assert_eq!(arms[0].params(128), 4096);
        assert_eq!(arms[1].params(128), 4096);
        Ok(())
    }

    #[test]
    fn problem_is_reproducible_and_starts_off_target() -> Result<()> {
        let cfg = small();
        let a = Problem::generate(&cfg, 3, &Device::Cpu)?;
        let b = Problem::generate(&cfg, 3, &Device::Cpu)?;
        let c = Problem::generate(&cfg, 4, &Device::Cpu)?;
        assert_eq!(a.initial_loss, b.initial_loss);
        assert_ne!(a.initial_loss, c.initial_loss);
        assert!(a.initial_loss > 0.0 && a.initial_loss.is_finite());
        // rows of the target attention are distributions
        let sums = a.target.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        Ok(())
    }

    #[test]
    fn unadapted_model_gives_the_initial_loss() -> Result<()> {
        let mut cfg = small();
        cfg.dtype = DType::F64;
        let p = Problem::generate(&cfg, 1, &Device::Cpu)?;
        for arm in equal_param_arms(2) {
            // before any update: SingLoRA has u = 0, LoRA has B = 0
            let m = FitModel::new(&p, arm, &cfg, 1)?;
            let l = scalar(&m.loss(&p)?)?;
            assert!(
                (l - p.initial_loss).abs() <= 1e-12 * p.initial_loss,
                "{arm}: {l} vs {}",
                p.initial_loss
            );
        }
        Ok(())
    }

    #[test]
    fn gradients_reach_both_adapters() -> Result<()> {
        let cfg = small();
        let p = Problem::generate(&cfg, 2, &Device::Cpu)?;
        for arm in equal_param_arms(2) {
            let m = FitModel::new(&p, arm, &cfg, 2)?;
            m.clock.set_training(true);
            let params = m.params();
            assert_eq!(
                params.len(),
                if arm.method == Method::SingLora { 2 } else { 4 }
            );
            let mut opt =
                AdamW::new(params.clone(), AdamWConfig::default()).with_clock(m.clock.clone());
            let mut acc = GradAccumulator::new(opt.vars());
            // LoRA's A has no gradient while B = 0: look after one update as well
            for round in 0..2 {
                let grads = m.loss(&p)?.backward()?;
                for prm in &params {
                    let g = grads.get(prm.var.as_tensor());
                    let norm = match g {
                        Some(g) => scalar(&g.sqr()?.sum_all()?)?.sqrt(),
                        None => 0.0,
                    };
                    let zero_ok =
                        round == 0 && arm.method == Method::Lora && prm.suffix == "lora_A.weight";
                    assert!(
                        norm > 0.0 || zero_ok,
                        "{arm} round {round}: no gradient for {}",
                        prm.suffix
                    );
                }
                acc.add(&grads)?;
                opt.step(&mut acc, 1e-2, None)?;
            }
            assert_eq!(m.clock.step(), 2, "the optimizer advances the ramp clock");
        }
        Ok(())
    }

    #[test]
    fn short_fit_lowers_the_loss_for_both_methods() -> Result<()> {
        let cfg = small();
        let arms = equal_param_arms(2);
        let runs = run_all(&cfg, &[0, 1], &arms, 2, &Device::Cpu, &|_| {})?;
        assert_eq!(runs.len(), 4);
        for r in &runs {
            assert!(!r.diverged, "{} seed {} diverged", r.arm, r.seed);
            assert!(
                r.final_loss < 0.5 * r.initial_loss,
                "{} seed {}: {} → {}",
                r.arm,
                r.seed,
                r.initial_loss,
                r.final_loss
            );
            assert_eq!(r.curve.first().unwrap().0, 0);
            assert_eq!(r.curve.last().unwrap(), &(cfg.steps, r.final_loss));
            // 0, 50, …, 250 and the final point
            assert_eq!(r.curve.len(), 7);
        }
        // ordered by seed, then arm
        assert_eq!(runs[0].arm, "singlora r=4");
        assert_eq!(runs[1].arm, "lora r=2");
        assert_eq!(runs[2].seed, 1);
        let s = summarize(&runs, &arms);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].seeds, 2);
        assert_eq!(s[0].params, 2 * 32 * 4);
        assert_eq!(s[1].params, 2 * 2 * 64);
        assert!(s
            .iter()
            .all(|a| a.min_final <= a.median_final && a.median_final <= a.max_final));
        let (w, t) = paired_wins(&runs, &arms[0], &arms[1]);
        assert!(w <= t && t == 2);
        let table = render_table(&s);
        assert!(table.contains("singlora r=4") && table.contains("lora r=2"));

        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("runs.jsonl");
        write_jsonl(&jsonl, &runs)?;
        let text = std::fs::read_to_string(&jsonl).unwrap();
        assert_eq!(text.lines().count(), 4);
        let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(line["curve"].as_array().unwrap().len(), 7);
        // the fraction of entries each recorded update left unchanged, at 50, 100, …, 300
        assert_eq!(line["unchanged"].as_array().unwrap().len(), 6);
        let svg = dir.path().join("fit.svg");
        write_plot(&svg, &runs, &arms, &cfg)?;
        let svg = std::fs::read_to_string(&svg).unwrap();
        assert!(svg.contains("singlora r=4") && svg.contains("<polygon"));
        Ok(())
    }

    #[test]
    fn bf16_weights_drop_updates_smaller_than_their_rounding_step() -> Result<()> {
        // SingLoRA's entries are about 1/√32 here, so bf16's rounding step near them is about
        // 1e-3; AdamW's updates are about lr = 1e-5: in f32 every entry moves, in bf16 none
        // but the few near zero
        let cfg = FitConfig {
            steps: 20,
            lr: 1e-5,
            record_every: 10,
            ..small()
        };
        let arm = Arm::new(Method::SingLora, 4);
        let p = Problem::generate(&cfg, 0, &Device::Cpu)?;
        let f32_run = fit(&p, arm, &cfg, 0)?;
        let bf16_cfg = FitConfig {
            store_bf16: true,
            ..cfg.clone()
        };
        let bf16_run = fit(&p, arm, &bf16_cfg, 0)?;
        assert_eq!(f32_run.unchanged.len(), 2);
        assert_eq!(f32_run.unchanged[0].0, 10);
        for (&(_, a), &(_, b)) in f32_run.unchanged.iter().zip(&bf16_run.unchanged) {
            assert!(a < 0.01, "f32: {a} of the entries unchanged");
            assert!(b > 0.9, "bf16: only {b} of the entries unchanged");
        }
        // and the f32 fit makes progress that the bf16 one cannot keep
        assert!(f32_run.final_loss < bf16_run.final_loss);
        assert_eq!(bf16_cfg.to_json()["adapter_weights"], "bf16");
        Ok(())
    }

    #[test]
    fn arms_parse() -> Result<()> {
        let arms = parse_arms("singlora:16, lora:8,rslora:4")?;
        assert_eq!(arms[0], Arm::new(Method::SingLora, 16));
        assert_eq!(arms[2], Arm::new(Method::RsLora, 4));
        assert_eq!(arms[1].to_string(), "lora r=8");
        assert!(parse_arms("singlora").is_err());
        assert!(parse_arms("singlora:0").is_err());
        assert!(parse_arms("bogus:4").is_err());
        assert!(parse_arms("").is_err());
        Ok(())
    }

    #[test]
    fn quantiles() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert_eq!(quantile(&v, 0.5), 2.5);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
