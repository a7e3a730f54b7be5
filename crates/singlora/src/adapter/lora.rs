//! LoRA, rsLoRA and DoRA: ΔW = s·B·A, A (r × d_in), B (d_out × r).
//!
//! A is Kaiming-uniform (a = √5, fan_in = d_in), i.e. U(−1/√d_in, 1/√d_in); B starts at zero.
//! DoRA adds a magnitude m (d_out), initialised to the row norms of W0, and uses
//! W' = m ⊙ V / ‖V‖_row with V = W0 + s·B·A and the norm treated as a constant in backprop
//! (as PEFT does). The forward is y = (m / ‖V‖) ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ). The row norm is
//! computed without forming V: ‖V_i‖² = ‖W0_i‖² + 2s·B_i·(W0·Aᵀ)_i + s²·B_i·(A·Aᵀ)·B_iᵀ,
//! one skinny (d_out × d_in × r) product instead of a d_out × d_in temporary.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::{take_tensor, AdapterSpec, Param, ParamRole};
use crate::error::{Error, Result};
use crate::linear::frozen_matmul;
use crate::rng::{rng_for, uniform};

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Var,
    b: Var,
    scale: f64,
    /// DoRA only: the magnitude m and the cached ‖W0_i‖² (f32).
    dora: Option<Dora>,
}

#[derive(Debug, Clone)]
struct Dora {
    magnitude: Var,
    w0_row_sq: Tensor,
}

/// ‖W0_i‖² per row, summed in f64, returned in `dtype`.
fn row_sq_norms(w0: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(w0.to_dtype(DType::F64)?.sqr()?.sum(1)?.to_dtype(dtype)?)
}

impl LoraAdapter {
    pub(super) fn init(spec: &AdapterSpec, name: &str, w0: &Tensor, dora: bool) -> Result<Self> {
        let (d_out, d_in) = w0.dims2()?;
        let device = w0.device();
        let mut rng = rng_for(spec.seed, name);
        let a = uniform(
            &mut rng,
            1.0 / (d_in as f64).sqrt(),
            (spec.r, d_in),
            spec.dtype,
            device,
        )?;
        let b = Tensor::zeros((d_out, spec.r), spec.dtype, device)?;
        let dora = if dora {
            let w0_row_sq = row_sq_norms(w0, spec.dtype)?;
            let magnitude = w0_row_sq.sqrt()?;
            Some(Dora {
                magnitude: Var::from_tensor(&magnitude)?,
                w0_row_sq,
            })
        } else {
            None
        };
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: spec.scale(),
            dora,
        })
    }

    pub(super) fn from_tensors(
        name: &str,
        tensors: &BTreeMap<String, Tensor>,
        w0: &Tensor,
        r: usize,
        scale: f64,
        dora: bool,
    ) -> Result<Self> {
        let (d_out, d_in) = w0.dims2()?;
        let a = take_tensor(name, tensors, "lora_A.weight", &[r, d_in])?;
        let b = take_tensor(name, tensors, "lora_B.weight", &[d_out, r])?;
        let dora = if dora {
            let m = take_tensor(name, tensors, "lora_magnitude_vector", &[d_out])?;
            Some(Dora {
                magnitude: Var::from_tensor(&m.to_dtype(DType::F32)?)?,
                w0_row_sq: row_sq_norms(w0, DType::F32)?,
            })
        } else if tensors.contains_key("lora_magnitude_vector") {
            return Err(Error::bad_tensor(
                format!("{name}.lora_magnitude_vector"),
                "is a DoRA tensor but the adapter config does not set use_dora",
            ));
        } else {
            None
        };
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            scale,
            dora,
        })
    }

    pub fn is_dora(&self) -> bool {
        self.dora.is_some()
    }

    pub fn a(&self) -> &Var {
        &self.a
    }

    pub fn b(&self) -> &Var {
        &self.b
    }

    pub fn magnitude(&self) -> Option<&Var> {
        self.dora.as_ref().map(|d| &d.magnitude)
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// (d_out, d_in).
    pub fn dims(&self) -> (usize, usize) {
        (self.b.dims()[0], self.a.dims()[1])
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// ‖W0 + s·B·A‖ per output row, detached, in the adapter's dtype (d_out).
    fn dora_row_norm(&self, dora: &Dora, w0: &Tensor) -> Result<Tensor> {
        let dt = self.a.dtype();
        let a = self.a.as_tensor().detach();
        let b = self.b.as_tensor().detach();
        let s = self.scale;
        // P = W0·Aᵀ (d_out × r), with the frozen weight in its own dtype.
        let p = frozen_matmul(&a.to_dtype(w0.dtype())?, w0)?
            .t()?
            .to_dtype(dt)?;
        let g = a.matmul(&a.t()?)?; // (r × r)
        let cross = (b.clone() * p)?.sum(1)?;
        let quad = (b.matmul(&g)? * &b)?.sum(1)?;
        let sq = ((dora.w0_row_sq.to_dtype(dt)? + (cross * (2.0 * s))?)? + (quad * (s * s))?)?;
        Ok(sq.relu()?.sqrt()?.detach())
    }

    /// The magnitude variable and the detached row norms.
    pub(super) fn dora_parts(&self, w0: &Tensor) -> Result<(Var, Tensor)> {
        let dora = self
            .dora
            .as_ref()
            .ok_or_else(|| Error::msg("dora_parts on a LoRA adapter without DoRA"))?;
        Ok((dora.magnitude.clone(), self.dora_row_norm(dora, w0)?))
    }

    /// m / ‖W0 + s·B·A‖ per output row (the norm detached), in the adapter's dtype.
    pub(super) fn dora_scale(&self, w0: &Tensor) -> Result<Tensor> {
        let dora = self
            .dora
            .as_ref()
            .ok_or_else(|| Error::msg("dora_scale on a LoRA adapter without DoRA"))?;
        let norm = self.dora_row_norm(dora, w0)?;
        Ok((dora.magnitude.as_tensor() / norm)?)
    }

    /// `w0`: the base weight, which only DoRA reads.
    pub(super) fn adapt(&self, x: &Tensor, w0: Option<&Tensor>, y0: &Tensor) -> Result<Tensor> {
        let dt = super::compute_dtype(x, self.a.dtype());
        // scaled at rank r rather than at d_out (one full-size pass fewer)
        let h = (x.to_dtype(dt)?.matmul(&self.a.to_dtype(dt)?.t()?)? * self.scale)?; // (m, r)
        let lora = h.matmul(&self.b.to_dtype(dt)?.t()?)?; // (m, d_out)
        match &self.dora {
            None => Ok((y0 + lora.to_dtype(y0.dtype())?)?),
            Some(dora) => {
                let w0 = w0.ok_or_else(|| Error::msg("DoRA's forward needs the base weight"))?;
                let norm = self.dora_row_norm(dora, w0)?;
                let mag = (dora.magnitude.as_tensor() / norm)?
                    .unsqueeze(0)?
                    .to_dtype(dt)?;
                let y = (y0.to_dtype(dt)? + lora)?.broadcast_mul(&mag)?;
                Ok(y.to_dtype(y0.dtype())?)
            }
        }
    }

    /// s·B·A in f64.
    pub(super) fn delta_weight(&self) -> Result<Tensor> {
        let a = self.a.as_tensor().to_dtype(DType::F64)?;
        let b = self.b.as_tensor().to_dtype(DType::F64)?;
        Ok((b.matmul(&a)? * self.scale)?)
    }

    /// `w0` in f64; returns the merged weight and, for DoRA, ‖V‖ per row.
    pub(super) fn merged_weight(&self, w0: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let v = (w0 + self.delta_weight()?)?;
        match &self.dora {
            None => Ok((v, None)),
            Some(dora) => {
                let norm = v.sqr()?.sum_keepdim(1)?.sqrt()?;
                let m = dora
                    .magnitude
                    .as_tensor()
                    .to_dtype(DType::F64)?
                    .unsqueeze(1)?;
                let w = v.broadcast_mul(&m.broadcast_div(&norm)?)?;
                Ok((w, Some(norm)))
            }
        }
    }

    pub(super) fn unmerged_weight(&self, w: &Tensor, norm: Option<&Tensor>) -> Result<Tensor> {
        let v = match (&self.dora, norm) {
            (None, _) => w.clone(),
            (Some(dora), Some(norm)) => {
                let m = dora
                    .magnitude
                    .as_tensor()
                    .to_dtype(DType::F64)?
                    .unsqueeze(1)?;
                w.broadcast_mul(&norm.broadcast_div(&m)?)?
            }
            (Some(_), None) => {
                return Err(Error::msg(
                    "cannot unmerge a DoRA weight without the row norms recorded at merge",
                ))
            }
        };
        Ok((v - self.delta_weight()?)?)
    }

    pub(super) fn params(&self) -> Vec<Param> {
        let mut p = vec![
            Param {
                suffix: "lora_A.weight",
                var: self.a.clone(),
                role: ParamRole::A,
            },
            Param {
                suffix: "lora_B.weight",
                var: self.b.clone(),
                role: ParamRole::B,
            },
        ];
        if let Some(d) = &self.dora {
            p.push(Param {
                suffix: "lora_magnitude_vector",
                var: d.magnitude.clone(),
                role: ParamRole::Magnitude,
            });
        }
        p
    }

    #[cfg(test)]
    pub(crate) fn set_b(&mut self, b: Tensor) -> Result<()> {
        self.b.set(&b)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::AdapterKind;
    use candle_core::Device;

    #[test]
    fn factored_row_norm_equals_materialised() -> Result<()> {
        let dev = Device::Cpu;
        let w0 = Tensor::randn(0f64, 1.0, (6, 9), &dev)?;
        let mut spec = AdapterSpec::new(AdapterKind::Dora, 3, 6.0);
        spec.dtype = DType::F64;
        let mut l = LoraAdapter::init(&spec, "m", &w0, true)?;
        l.set_b(Tensor::randn(0f64, 1.0, (6, 3), &dev)?)?;
        let norm = l.dora_row_norm(l.dora.as_ref().unwrap(), &w0)?;
        let (_, reference) = l.merged_weight(&w0)?;
        let diff = (norm - reference.unwrap().squeeze(1)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-10, "factored norm differs by {diff}");
        Ok(())
    }
}
