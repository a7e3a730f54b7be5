//! Exact GELU, y = x·Φ(x), with dy/dx = Φ(x) + x·φ(x), element-wise in one pass each way.
//!
//! f64 uses libm's erf; f32 uses a rational approximation of erf (Abramowitz & Stegun 7.1.26,
//! |error| < 1.5e-7, below f32's resolution near 1) that the compiler can vectorise, where
//! libm's branchy erff takes 4% of a MiniLM training step. The CPU only (elsewhere candle's
//! `gelu_erf`, the reference); also the activations by their Hugging Face names.

use candle_core::{CustomOp1, CustomOp2, Tensor, WithDType};
use rayon::prelude::*;

use super::{cpu_slice, dispatch_float, filled_vec};
use crate::error::Result;

const CHUNK: usize = 4096;

/// erf for f32 inputs, computed in f32, given e = exp(−x²) (the gradient reuses it for φ).
#[inline(always)]
fn erf_f32_with(x: f32, e: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * e;
    y.copysign(x)
}

pub(crate) trait Gelu: Copy + Send + Sync {
    fn phi_cdf(self) -> Self;
    fn value(self) -> Self;
    fn grad(self) -> Self;
}

impl Gelu for f32 {
    #[inline(always)]
    fn phi_cdf(self) -> f32 {
        let z = self * std::f32::consts::FRAC_1_SQRT_2;
        0.5 * (1.0 + erf_f32_with(z, super::exp_f32(-z * z)))
    }
    #[inline(always)]
    fn value(self) -> f32 {
        self * self.phi_cdf()
    }
    #[inline(always)]
    fn grad(self) -> f32 {
        // exp(−z²) with z = x/√2 is exp(−x²/2): one exp serves Φ and φ
        let z = self * std::f32::consts::FRAC_1_SQRT_2;
        let e = super::exp_f32(-z * z);
        0.5 * (1.0 + erf_f32_with(z, e)) + self * e * 0.398_942_3
    }
}

impl Gelu for f64 {
    fn phi_cdf(self) -> f64 {
        0.5 * (1.0 + libm::erf(self * std::f64::consts::FRAC_1_SQRT_2))
    }
    fn value(self) -> f64 {
        self * self.phi_cdf()
    }
    fn grad(self) -> f64 {
        let pdf = (-0.5 * self * self).exp() / (2.0 * std::f64::consts::PI).sqrt();
        self.phi_cdf() + self * pdf
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    super::cpu_fwd!(|self, (s, l)| {
        dispatch_float!(s, "gelu", |T| {
            let x = cpu_slice::<T>(s, l, "gelu")?;
            let out = gelu_values(x);
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    });

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(gelu_backward(x, g)?))
    }
}

struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-erf-backward"
    }

    super::cpu_fwd!(|self, (s1, l1), (s2, l2)| {
        dispatch_float!(s1, "gelu backward", |T| {
            let x = cpu_slice::<T>(s1, l1, "gelu backward")?;
            let g = cpu_slice::<T>(s2, l2, "gelu backward")?;
            if g.len() != x.len() {
                candle_core::bail!(
                    "gelu backward: {} gradients for {} inputs",
                    g.len(),
                    x.len()
                );
            }
            let out = gelu_grads(x, g);
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    });
}

/// gelu(x) element-wise.
pub(super) fn gelu_values<T: Gelu>(x: &[T]) -> Vec<T> {
    // SAFETY: the chunks cover the output and every element of each is written.
    unsafe {
        filled_vec::<T>(x.len(), |out| {
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(o, i)| {
                    for (o, &v) in o.iter_mut().zip(i) {
                        o.write(v.value());
                    }
                })
        })
    }
}

/// g ⊙ gelu′(x) element-wise; `g` as long as `x`.
fn gelu_grads<T: Gelu + std::ops::Mul<Output = T>>(x: &[T], g: &[T]) -> Vec<T> {
    assert_eq!(x.len(), g.len());
    // SAFETY: as in `gelu_values`; g is as long as x.
    unsafe {
        filled_vec::<T>(x.len(), |out| {
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                .for_each(|(o, (xi, gi))| {
                    for ((o, &v), &gv) in o.iter_mut().zip(xi).zip(gi) {
                        o.write(gv * v.grad());
                    }
                })
        })
    }
}

/// g ⊙ gelu′(x) for CPU tensors of one shape (no gradient recorded).
pub(super) fn gelu_backward(x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(&g.contiguous()?, &GeluBackward)
}

/// Activation functions by their Hugging Face `hidden_act` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// exact GELU (erf), HF "gelu"
    GeluErf,
    /// tanh approximation, HF "gelu_new" / "gelu_pytorch_tanh"
    GeluTanh,
    Silu,
    Relu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "silu" | "swish" => Some(Activation::Silu),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::GeluErf => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Silu => x.silu()?,
            Activation::Relu => x.relu()?,
        })
    }
}

/// Exact (erf) GELU, fused on the CPU for f32/f64; candle's `gelu_erf` elsewhere.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu()
        || !matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
    {
        return Ok(x.gelu_erf()?);
    }
    Ok(x.contiguous()?.apply_op1(GeluErf)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::reference::tests::{check_grad, max_diff, randn};
    use candle_core::Device;

    #[test]
    fn matches_candle_and_differentiates() {
        let x = Tensor::randn(0f64, 2.0, (5, 9), &Device::Cpu).unwrap();
        assert!(max_diff(&gelu_erf(&x).unwrap(), &x.gelu_erf().unwrap()) < 1e-12);
        check_grad(&x, gelu_erf);
        // f32 approximation against f64 exact values
        let xs: Vec<f32> = (-80..=80).map(|i| i as f32 * 0.1).collect();
        for &v in &xs {
            let exact = (v as f64).value();
            assert!(
                ((v.value() as f64) - exact).abs() < 1e-6 * (1.0 + exact.abs()),
                "gelu({v})"
            );
            let exact_g = (v as f64).grad();
            assert!(((v.grad() as f64) - exact_g).abs() < 2e-6, "gelu'({v})");
        }
    }

    #[test]
    fn activations_grad() {
        for a in [Activation::GeluErf, Activation::GeluTanh, Activation::Silu] {
            check_grad(&randn(&[2, 5]), |x| a.apply(x));
        }
    }
}
