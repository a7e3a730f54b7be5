//! LayerNorm and RMSNorm over the last axis with frozen weights, fused forward and backward.
//!
//! LayerNorm: y = x̂·w + b, x̂ = (x − μ)/σ, σ = √(var + ε); dx = (ĝ − mean ĝ − x̂·mean(ĝ⊙x̂))/σ.
//! RMSNorm:  y = x̂·w, x̂ = x/r, r = √(mean x² + ε);       dx = (ĝ − x̂·mean(ĝ⊙x̂))/r.
//! (ĝ = g⊙w.) The backward recomputes the row statistics from x instead of storing them. CPU
//! code here (rows in parallel), CUDA launchers (RMSNorm) in `cuda.rs`, kernels in `norm.cu`.

use std::sync::Arc;

use candle_core::{CustomOp1, CustomOp2, Tensor, WithDType};
use rayon::prelude::*;

use super::{cpu_slice, dispatch_float, filled_vec, host_vec, sum_map, sum_map2, sum_map3, Real};
use crate::error::Result;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

#[derive(Clone)]
struct Norm {
    /// Weight and (LayerNorm) bias on the host, in f64 (CPU inputs).
    w: Arc<Vec<f64>>,
    b: Option<Arc<Vec<f64>>>,
    /// The weight as an f32 tensor on the input's device (CUDA inputs).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    w_dev: Option<Tensor>,
    eps: f64,
    /// RMSNorm (no centring, no bias).
    rms: bool,
}

impl Norm {
    /// The weight on the device (RMSNorm's: LayerNorm has no CUDA kernel).
    #[cfg(feature = "cuda")]
    fn device_weight(&self) -> candle_core::Result<&Tensor> {
        if !self.rms {
            candle_core::bail!("layer norm has no CUDA kernel yet");
        }
        self.w_dev
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("rms norm: no device weight".into()))
    }

    /// (mean, 1/σ) of a row.
    fn stats<T: Real>(&self, x: &[T]) -> (T, T) {
        let n = T::from(x.len()).unwrap();
        let mean = if self.rms {
            T::zero()
        } else {
            sum_map(x, |v| v) / n
        };
        let var = sum_map(x, |v| (v - mean) * (v - mean)) / n;
        (mean, T::one() / (var + T::from(self.eps).unwrap()).sqrt())
    }

    fn fwd<T: Real>(&self, x: &[T], d: usize) -> Vec<T> {
        let w: Vec<T> = self.w.iter().map(|v| T::from(*v).unwrap()).collect();
        let b: Option<Vec<T>> = self
            .b
            .as_ref()
            .map(|b| b.iter().map(|v| T::from(*v).unwrap()).collect());
        // SAFETY: every row of the output is written in full.
        unsafe {
            filled_vec(x.len(), |out| {
                out.par_chunks_mut(d)
                    .zip(x.par_chunks(d))
                    .for_each(|(o, row)| {
                        let (mean, inv) = self.stats(row);
                        for j in 0..d {
                            let y = (row[j] - mean) * inv * w[j];
                            o[j].write(match &b {
                                Some(b) => y + b[j],
                                None => y,
                            });
                        }
                    })
            })
        }
    }

    fn bwd<T: Real>(&self, x: &[T], g: &[T], d: usize) -> Vec<T> {
        let w: Vec<T> = self.w.iter().map(|v| T::from(*v).unwrap()).collect();
        let n = T::from(d).unwrap();
        // SAFETY: every row of the output is written in full (g is as long as x: the caller
        // checks).
        unsafe {
            filled_vec(x.len(), |out| {
                out.par_chunks_mut(d)
                    .zip(x.par_chunks(d).zip(g.par_chunks(d)))
                    .for_each(|(o, (row, gr))| {
                        let (mean, inv) = self.stats(row);
                        let sg = sum_map2(gr, &w, |g, w| g * w);
                        let sgx = sum_map3(row, gr, &w, |x, g, w| g * w * (x - mean)) * inv;
                        let (mg, mgx) = (sg / n, sgx / n);
                        for j in 0..d {
                            let xh = (row[j] - mean) * inv;
                            let gh = gr[j] * w[j];
                            o[j].write(if self.rms {
                                (gh - xh * mgx) * inv
                            } else {
                                (gh - mg - xh * mgx) * inv
                            });
                        }
                    })
            })
        }
    }
}

impl CustomOp1 for Norm {
    fn name(&self) -> &'static str {
        if self.rms {
            "rms-norm"
        } else {
            "layer-norm"
        }
    }

    super::cpu_fwd!(|self, (s, l)| {
        let d = *l.dims().last().unwrap();
        if d != self.w.len() {
            candle_core::bail!("{}: {d} features but {} weights", self.name(), self.w.len());
        }
        dispatch_float!(s, self.name(), |T| {
            let x = cpu_slice::<T>(s, l, self.name())?;
            Ok((T::to_cpu_storage_owned(self.fwd(x, d)), l.shape().clone()))
        })
    });

    super::cuda_fwd!(|self, x| cuda::forward(x, self.device_weight()?, self.eps));

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &g.contiguous()?,
            &NormBackward(self.clone()),
        )?))
    }
}

struct NormBackward(Norm);

impl CustomOp2 for NormBackward {
    fn name(&self) -> &'static str {
        "norm-backward"
    }

    super::cuda_fwd!(|self, x, g| cuda::backward(x, g, self.0.device_weight()?, self.0.eps));

    super::cpu_fwd!(|self, (s1, l1), (s2, l2)| {
        let d = *l1.dims().last().unwrap();
        dispatch_float!(s1, "norm backward", |T| {
            let x = cpu_slice::<T>(s1, l1, "norm backward")?;
            let g = cpu_slice::<T>(s2, l2, "norm backward")?;
            if g.len() != x.len() {
                candle_core::bail!(
                    "norm backward: {} gradients for {} inputs",
                    g.len(),
                    x.len()
                );
            }
            Ok((
                T::to_cpu_storage_owned(self.0.bwd(x, g, d)),
                l1.shape().clone(),
            ))
        })
    });
}

fn apply(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let op = if x.device().is_cpu() {
        Norm {
            w: Arc::new(host_vec::<f64>(w)?),
            b: b.map(|b| host_vec::<f64>(b).map(Arc::new)).transpose()?,
            w_dev: None,
            eps,
            rms: b.is_none(),
        }
    } else {
        // stays on the device: no copy to the host (which would synchronise) per call
        Norm {
            w: Arc::new(vec![]),
            b: None,
            w_dev: Some(w.to_dtype(candle_core::DType::F32)?.contiguous()?),
            eps,
            rms: b.is_none(),
        }
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// LayerNorm with frozen `w`, `b` (fused on the CPU; composed elsewhere).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if !x.device().is_cpu()
        || !matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
    {
        return super::reference::layer_norm(x, w, b, eps);
    }
    apply(x, w, Some(b), eps)
}

/// RMSNorm with a frozen `w` (fused on the CPU; composed elsewhere).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !super::fused_kernels_for(x) {
        return super::reference::rms_norm(x, w, eps);
    }
    apply(x, w, None, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::reference::tests::{check_grad, max_diff};
    use candle_core::Device;

    #[test]
    fn match_reference_and_differentiate() {
        let x = Tensor::randn(0f64, 2.0, (3, 4, 7), &Device::Cpu).unwrap();
        let w = (Tensor::randn(0f64, 0.5, 7, &Device::Cpu).unwrap() + 1.0).unwrap();
        let b = Tensor::randn(0f64, 0.5, 7, &Device::Cpu).unwrap();
        let f = layer_norm(&x, &w, &b, 1e-5).unwrap();
        assert!(
            max_diff(
                &f,
                &crate::ops::reference::layer_norm(&x, &w, &b, 1e-5).unwrap()
            ) < 1e-12
        );
        let f = rms_norm(&x, &w, 1e-6).unwrap();
        assert!(max_diff(&f, &crate::ops::reference::rms_norm(&x, &w, 1e-6).unwrap()) < 1e-12);
        check_grad(&x, |x| layer_norm(x, &w, &b, 1e-5));
        check_grad(&x, |x| rms_norm(x, &w, 1e-6));
    }
}
