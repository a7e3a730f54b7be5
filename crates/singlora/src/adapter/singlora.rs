//! SingLoRA: ΔW = s·u(t)·A_out·A_inᵀ with one trainable A of shape (n, r), n = max(d_in, d_out).
//!
//! A_out = A[..d_out], A_in = A[..d_in]; for a square weight both are A and ΔW is symmetric
//! positive semi-definite. The forward is factored, y = y0 + s·u·(x·A_in)·A_outᵀ, costing
//! O(r·(d_in + d_out)) per token; rows of A below min(d_in, d_out) receive the gradient of both
//! factors, which candle's autograd accumulates through the two `narrow` views.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use super::{take_tensor, AdapterSpec, Param, ParamRole};
use crate::adapter::ramp::RampClock;
use crate::error::Result;
use crate::rng::rng_for;

#[derive(Debug, Clone)]
pub struct SingLoraAdapter {
    a: Var,
    d_out: usize,
    d_in: usize,
    scale: f64,
    clock: RampClock,
}

impl SingLoraAdapter {
    pub(super) fn init(
        spec: &AdapterSpec,
        name: &str,
        d_out: usize,
        d_in: usize,
        clock: RampClock,
        device: &Device,
    ) -> Result<Self> {
        let n = d_out.max(d_in);
        let mut rng = rng_for(spec.seed, name);
        let a = spec.init.sample(&mut rng, n, spec.r, spec.dtype, device)?;
        Ok(Self {
            a: Var::from_tensor(&a)?,
            d_out,
            d_in,
            scale: spec.scale(),
            clock,
        })
    }

    pub(super) fn from_tensors(
        name: &str,
        tensors: &BTreeMap<String, Tensor>,
        d_out: usize,
        d_in: usize,
        r: usize,
        scale: f64,
        clock: RampClock,
    ) -> Result<Self> {
        let a = take_tensor(name, tensors, "singlora_A.weight", &[d_out.max(d_in), r])?;
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            d_out,
            d_in,
            scale,
            clock,
        })
    }

    /// A, shape (max(d_in, d_out), r).
    pub fn a(&self) -> &Var {
        &self.a
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// (d_out, d_in).
    pub fn dims(&self) -> (usize, usize) {
        (self.d_out, self.d_in)
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    pub fn clock(&self) -> &RampClock {
        &self.clock
    }

    /// (A_in, A_out, s·u(t)) for the forward about to run.
    pub(super) fn factors(&self) -> Result<(Tensor, Tensor, f64)> {
        let a = self.a.as_tensor();
        Ok((
            a.narrow(0, 0, self.d_in)?,
            a.narrow(0, 0, self.d_out)?,
            self.scale * self.clock.u(),
        ))
    }

    pub(super) fn adapt(&self, x: &Tensor, y0: &Tensor) -> Result<Tensor> {
        let c = self.scale * self.clock.u();
        if c == 0.0 {
            // u = 0: exactly the pretrained layer.
            return Ok(y0.clone());
        }
        // half-precision activations stay half (A is cast, a d × r copy): an f32 copy of
        // every adapted layer's input and output would double a GPU step's memory
        let cd = super::compute_dtype(x, self.a.dtype());
        let a = self.a.as_tensor().to_dtype(cd)?;
        let a_in = a.narrow(0, 0, self.d_in)?;
        let a_out = a.narrow(0, 0, self.d_out)?;
        // the scale goes on the (m, r) product, not on the (m, d_out) one: a full-size
        // elementwise pass (and its backward) fewer
        let h = (x.to_dtype(cd)?.matmul(&a_in)? * c)?; // (m, r)
        let d = h.matmul(&a_out.t()?)?; // (m, d_out)
        Ok((y0 + d.to_dtype(y0.dtype())?)?)
    }

    /// ΔW = s·u·A_out·A_inᵀ in f64, with u of the updates applied so far.
    pub(super) fn delta_weight(&self) -> Result<Tensor> {
        let a = self.a.as_tensor().to_dtype(DType::F64)?;
        let a_in = a.narrow(0, 0, self.d_in)?;
        let a_out = a.narrow(0, 0, self.d_out)?;
        Ok((a_out.matmul(&a_in.t()?)? * (self.scale * self.clock.u_saved()))?)
    }

    pub(super) fn params(&self) -> Vec<Param> {
        vec![Param {
            suffix: "singlora_A.weight",
            var: self.a.clone(),
            role: ParamRole::A,
        }]
    }
}
