//! AdamW over adapter parameters, with LoRA+ learning-rate groups, gradient accumulation,
//! global-norm clipping, and the ramp clock advanced once per update.
//!
//! Decoupled weight decay as in PyTorch's AdamW: p ← p·(1 − lr·wd), then
//! p ← p − lr·m̂/(√v̂ + ε) with m̂, v̂ the bias-corrected moments. LoRA+ multiplies B's learning
//! rate by λ. Weight decay skips DoRA magnitudes and biases.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use singlora::adapter::{Param, ParamRole};
//! use singlora::optim::{AdamW, AdamWConfig, GradAccumulator};
//! let w = Var::new(&[1f32, -2.], &Device::Cpu)?;
//! let params = vec![Param { suffix: "w", var: w.clone(), role: ParamRole::A }];
//! let mut opt = AdamW::new(params, AdamWConfig { lr: 0.1, weight_decay: 0.0, ..Default::default() });
//! let mut acc = GradAccumulator::new(opt.vars());
//! acc.add(&w.sqr()?.sum_all()?.backward()?)?;
//! opt.step(&mut acc, 0.1, None)?;
//! // Adam's first step moves every coordinate by lr against its gradient's sign.
//! assert_eq!(w.to_vec1::<f32>()?, vec![0.9, -1.9]);
//! # Ok::<(), singlora::Error>(())
//! ```

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adapter::ramp::RampClock;
use crate::adapter::{Param, ParamRole};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// LoRA+: B's learning rate is λ times the base rate.
    pub lora_plus_ratio: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            lora_plus_ratio: None,
        }
    }
}

/// Sums gradients of several micro-batches (a GradStore per backward) for the tracked vars.
#[derive(Debug)]
pub struct GradAccumulator {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    micro_batches: usize,
}

impl GradAccumulator {
    pub fn new(vars: Vec<Var>) -> Self {
        let n = vars.len();
        Self {
            vars,
            sums: vec![None; n],
            micro_batches: 0,
        }
    }

    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (v, s) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = grads.get(v.as_tensor()) {
                // A gradient from candle's backward still records the ops that made it (and so
                // the whole forward graph): detach it, or the moments would chain every step's
                // activations together (a leak of a full step of memory per update).
                let g = g.detach().to_dtype(v.dtype())?;
                *s = Some(match s.take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// Multiplies every gradient by `c` (e.g. 1/micro-batches when losses were not scaled).
    pub fn scale(&mut self, c: f64) -> Result<()> {
        for s in self.sums.iter_mut().flatten() {
            *s = (&*s * c)?;
        }
        Ok(())
    }

    /// ‖g‖₂ over all gradients (one host sync).
    pub fn global_norm(&self) -> Result<f64> {
        let mut total: Option<Tensor> = None;
        for s in self.sums.iter().flatten() {
            let sq = s.to_dtype(DType::F32)?.sqr()?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + sq)?,
                None => sq,
            });
        }
        Ok(match total {
            Some(t) => (t.to_scalar::<f32>()? as f64).sqrt(),
            None => 0.0,
        })
    }

    pub fn grads(&self) -> &[Option<Tensor>] {
        &self.sums
    }

    pub fn clear(&mut self) {
        self.sums.iter_mut().for_each(|s| *s = None);
        self.micro_batches = 0;
    }
}

/// A slot's part of the one-launch CUDA update (`ops::adamw::AdamWJobs`), with its device;
/// None where that does not apply (not CUDA f32 and contiguous: the composed update runs).
#[cfg(feature = "cuda")]
fn cuda_job(
    slot: &Slot,
    g: &Tensor,
    lr: f64,
    decay: f64,
) -> Result<Option<(candle_core::CudaDevice, crate::ops::adamw::AdamWJob)>> {
    let p = slot.param.var.as_tensor();
    let fits = |t: &Tensor| {
        t.device().is_cuda() && t.dtype() == DType::F32 && t.is_contiguous() && t.dims() == p.dims()
    };
    if !(fits(p) && fits(&slot.m) && fits(&slot.v) && fits(g)) {
        return Ok(None);
    }
    let (candle_core::Device::Cuda(dev), true) = (p.device(), g.device().same_device(p.device()))
    else {
        return Ok(None);
    };
    let ptr = |t: &Tensor, what: &str| crate::ops::cuda::tensor_ptr(t, what, &[DType::F32]);
    Ok(Some((
        dev.clone(),
        crate::ops::adamw::AdamWJob {
            p: ptr(p, "parameter")?,
            m: ptr(&slot.m, "first moment")?,
            v: ptr(&slot.v, "second moment")?,
            g: ptr(g, "gradient")?,
            n: p.elem_count(),
            lr: lr as f32,
            decay: decay as f32,
        },
    )))
}

#[derive(Debug)]
struct Slot {
    param: Param,
    m: Tensor,
    v: Tensor,
}

/// AdamW with per-role learning rates.
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    cfg: AdamWConfig,
    t: u64,
    clock: Option<RampClock>,
}

/// The optimizer state for checkpoints: per parameter (m, v), and the update count.
#[derive(Debug, Clone)]
pub struct AdamWState {
    pub t: u64,
    pub moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(params: Vec<Param>, cfg: AdamWConfig) -> Self {
        let slots = params
            .into_iter()
            .map(|param| {
                // two buffers: the fused update writes the moments in place
                let z = || param.var.zeros_like().expect("zeros of an existing tensor");
                Slot {
                    m: z(),
                    v: z(),
                    param,
                }
            })
            .collect();
        Self {
            slots,
            cfg,
            t: 0,
            clock: None,
        }
    }

    /// Advance this clock after each update (SingLoRA's u(t) counts updates).
    pub fn with_clock(mut self, clock: RampClock) -> Self {
        self.clock = Some(clock);
        self
    }

    pub fn vars(&self) -> Vec<Var> {
        self.slots.iter().map(|s| s.param.var.clone()).collect()
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Updates applied so far.
    pub fn updates(&self) -> u64 {
        self.t
    }

    fn lr_mult(&self, role: ParamRole) -> f64 {
        match (role, self.cfg.lora_plus_ratio) {
            (ParamRole::B, Some(ratio)) => ratio,
            _ => 1.0,
        }
    }

    fn decays(role: ParamRole) -> bool {
        matches!(role, ParamRole::A | ParamRole::B | ParamRole::HeadWeight)
    }

    /// The error for a non-finite gradient norm before update `t + 1`.
    fn diverged(&self, n: f64) -> Error {
        Error::msg(format!(
            "the gradient norm is {n} at update {}: the loss diverged (try a lower learning rate)",
            self.t + 1
        ))
    }

    /// 1 − β₁ᵗ and 1 − β₂ᵗ for the update count `t`.
    fn bias_corrections(&self) -> (f64, f64) {
        let t = self.t as i32;
        (1.0 - self.cfg.beta1.powi(t), 1.0 - self.cfg.beta2.powi(t))
    }

    /// The CUDA update's shared hyper-parameters for the update count `t`.
    #[cfg(feature = "cuda")]
    fn step_h(&self) -> crate::ops::adamw::AdamWStep {
        let (bc1, bc2) = self.bias_corrections();
        crate::ops::adamw::AdamWStep {
            beta1: self.cfg.beta1 as f32,
            beta2: self.cfg.beta2 as f32,
            eps: self.cfg.eps as f32,
            bc1: bc1 as f32,
            bc2: bc2 as f32,
        }
    }

    /// Slot `i`'s learning rate and decay factor (1 − lr·wd, or 1) for the base rate `lr`.
    fn lr_decay(&self, i: usize, lr: f64) -> (f64, f64) {
        let role = self.slots[i].param.role;
        let lr_i = lr * self.lr_mult(role);
        let decay = if self.cfg.weight_decay > 0.0 && Self::decays(role) {
            1.0 - lr_i * self.cfg.weight_decay
        } else {
            1.0
        };
        (lr_i, decay)
    }

    /// [`Self::step`] where every parameter with a gradient is a CUDA f32 one on one device:
    /// the clipping norm's sum of squares in one launch and the clipped update in another,
    /// the norm read back once both are queued (a parameter is left as it was where the norm
    /// is not finite). `None`, having done nothing, elsewhere.
    #[cfg(feature = "cuda")]
    fn step_fused(
        &mut self,
        acc: &GradAccumulator,
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> Result<Option<Option<f64>>> {
        use candle_core::backend::BackendDevice;
        let mut dev: Option<candle_core::CudaDevice> = None;
        let mut jobs = vec![];
        for i in 0..self.slots.len() {
            let Some(g) = &acc.sums[i] else { continue };
            let (lr_i, decay) = self.lr_decay(i, lr);
            let Some((d, job)) = cuda_job(&self.slots[i], g, lr_i, decay)? else {
                return Ok(None);
            };
            match &dev {
                Some(first) if !first.same_device(&d) => return Ok(None),
                Some(_) => {}
                None => dev = Some(d),
            }
            jobs.push(job);
        }
        let Some(dev) = dev else {
            return Ok(None);
        };
        self.t += 1;
        let h = self.step_h();
        // SAFETY: each job is one slot's parameter, moments (ours alone: allocated apart,
        // handed out and taken in only as copies) and gradient, checked by `cuda_job`; the
        // tensors outlive the launches (they are freed in stream order).
        let table = unsafe { crate::ops::adamw::AdamWJobs::new(&dev, &jobs)? };
        let Some(max) = max_grad_norm else {
            // SAFETY: as above.
            unsafe { table.update(h, None)? };
            return Ok(Some(None));
        };
        let sumsq = Tensor::zeros((), DType::F32, &candle_core::Device::Cuda(dev))?;
        let sp = crate::ops::cuda::tensor_ptr(&sumsq, "gradient norm", &[DType::F32])?;
        // SAFETY: as above; sumsq is a live f32 on the device until both are queued.
        unsafe {
            table.sum_squares(sp)?;
            table.update(h, Some((sp, max as f32)))?;
        }
        let n = (sumsq.to_scalar::<f32>()? as f64).sqrt();
        if !n.is_finite() {
            // the update left every parameter and moment as it was
            self.t -= 1;
            return Err(self.diverged(n));
        }
        Ok(Some(Some(n)))
    }

    /// One update with learning rate `lr` from the accumulated gradients (clipped to
    /// `max_grad_norm` when given), then clears them and advances the clock. Returns the
    /// gradient norm before clipping when it was computed.
    pub fn step(
        &mut self,
        acc: &mut GradAccumulator,
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> Result<Option<f64>> {
        if acc.vars.len() != self.slots.len() {
            return Err(Error::msg(
                "gradient accumulator does not match the optimizer's parameters",
            ));
        }
        #[cfg(feature = "cuda")]
        if let Some(norm) = self.step_fused(acc, lr, max_grad_norm)? {
            acc.clear();
            if let Some(c) = &self.clock {
                c.advance();
            }
            return Ok(norm);
        }
        let norm = match max_grad_norm {
            Some(max) => {
                let n = acc.global_norm()?;
                if !n.is_finite() {
                    return Err(self.diverged(n));
                }
                if n > max {
                    acc.scale(max / (n + 1e-6))?;
                }
                Some(n)
            }
            None => None,
        };
        self.t += 1;
        let (bc1, bc2) = self.bias_corrections();
        // CUDA f32 parameters (where the others are not): one launch per device for all of
        // them, after the loop
        #[cfg(feature = "cuda")]
        let mut launches: Vec<(candle_core::CudaDevice, Vec<crate::ops::adamw::AdamWJob>)> = vec![];
        for i in 0..self.slots.len() {
            let Some(g) = &acc.sums[i] else { continue };
            let (lr_i, decay) = self.lr_decay(i, lr);
            let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
            let slot = &mut self.slots[i];
            #[cfg(feature = "cuda")]
            if let Some((dev, job)) = cuda_job(slot, g, lr_i, decay)? {
                use candle_core::backend::BackendDevice;
                match launches.iter_mut().find(|(d, _)| d.same_device(&dev)) {
                    Some((_, jobs)) => jobs.push(job),
                    None => launches.push((dev, vec![job])),
                }
                continue;
            }
            slot.m = ((&slot.m * b1)? + (g * (1.0 - b1))?)?.detach();
            slot.v = ((&slot.v * b2)? + (g.sqr()? * (1.0 - b2))?)?.detach();
            let mut p = slot.param.var.as_tensor().clone();
            if decay != 1.0 {
                p = (p * decay)?;
            }
            let denom = ((&slot.v / bc2)?.sqrt()? + self.cfg.eps)?;
            let upd = ((&slot.m / bc1)? / denom)?;
            slot.param.var.set(&(p - (upd * lr_i)?)?)?;
        }
        #[cfg(feature = "cuda")]
        for (dev, jobs) in &launches {
            // SAFETY: each job is one slot's parameter, moments (ours alone) and gradient,
            // checked by `cuda_job`; the tensors outlive the launch (freed in stream order).
            unsafe { crate::ops::adamw::AdamWJobs::new(dev, jobs)?.update(self.step_h(), None)? };
        }
        acc.clear();
        if let Some(c) = &self.clock {
            c.advance();
        }
        Ok(norm)
    }

    /// A copy of the state (the moments are copied: the CUDA update writes its own in place).
    pub fn state(&self) -> Result<AdamWState> {
        Ok(AdamWState {
            t: self.t,
            moments: self
                .slots
                .iter()
                .map(|s| Ok((s.m.copy()?, s.v.copy()?)))
                .collect::<Result<_>>()?,
        })
    }

    pub fn load_state(&mut self, state: AdamWState) -> Result<()> {
        if state.moments.len() != self.slots.len() {
            return Err(Error::msg(format!(
                "optimizer state holds {} parameters, the model has {}",
                state.moments.len(),
                self.slots.len()
            )));
        }
        for (slot, (m, v)) in self.slots.iter_mut().zip(state.moments) {
            if m.dims() != slot.m.dims() || v.dims() != slot.v.dims() {
                return Err(Error::msg(format!(
                    "optimizer state for a {:?} parameter has shape {:?}",
                    slot.m.dims(),
                    m.dims()
                )));
            }
            // copies, never the caller's buffers (see `state`)
            slot.m = m
                .to_device(slot.m.device())?
                .to_dtype(slot.m.dtype())?
                .copy()?;
            slot.v = v
                .to_device(slot.v.device())?
                .to_dtype(slot.v.dtype())?
                .copy()?;
        }
        self.t = state.t;
        Ok(())
    }
}
