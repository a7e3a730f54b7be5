//! A frozen linear layer, `y = x·W0ᵀ + b`, whose backward computes the input gradient only.
//!
//! candle's `x.matmul(&w.t())` computes and stores `∂L/∂W` in backward even when `w` is not a
//! variable: one wasted GEMM of the forward's size per frozen weight. [`frozen_matmul`] is a
//! custom op whose backward returns `∂L/∂x = g·W0` and nothing for `W0`.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use singlora::linear::FrozenLinear;
//! let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu)?; // (d_out 3, d_in 2)
//! let lin = FrozenLinear::new(w, None);
//! let x = Var::new(&[[1f32, 1.]], &Device::Cpu)?;
//! let y = lin.forward(&x)?;
//! assert_eq!(y.to_vec2::<f32>()?, vec![vec![3., 7., 11.]]);
//! let grads = y.sum_all()?.backward()?;
//! assert_eq!(grads.get(&x).unwrap().to_vec2::<f32>()?, vec![vec![9., 12.]]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use crate::quant::nf4::Nf4Tensor;
use crate::quant::QuantWeight;

/// `x (m, k) · W (n, k)ᵀ` with a backward for `x` only.
struct FrozenMatmul;

fn frozen_matmul_fwd<S: BackendStorage>(
    x: &S,
    lx: &Layout,
    w: &S,
    lw: &Layout,
) -> candle_core::Result<(S, Shape)> {
    let (m, k) = lx.shape().dims2()?;
    let (n, k2) = lw.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("frozen linear: input has {k} features, the weight expects {k2}");
    }
    if x.dtype() != w.dtype() {
        candle_core::bail!(
            "frozen linear: input is {:?} but the weight is {:?}",
            x.dtype(),
            w.dtype()
        );
    }
    let wt = lw.transpose(0, 1)?;
    let y = x.matmul(w, (1, m, n, k), lx, &wt)?;
    Ok((y, Shape::from((m, n))))
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        frozen_matmul_fwd(s1, l1, s2, l2)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        frozen_matmul_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The frozen weight gets no gradient: that GEMM is never run.
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `x (…, k) · W (n, k)ᵀ → (…, n)`, differentiable in `x` only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().unwrap_or(&0);
    let m = x.elem_count() / k.max(1);
    let (n, _) = w.dims2()?;
    let y = x.reshape((m, k))?.apply_op2(w, FrozenMatmul)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = n;
    y.reshape(out_dims)
}

/// `x (m, k) · W (n, k)ᵀ` for a weight kept quantised (NF4, a GGUF type): dequantised for the
/// forward and again for the backward's `g·W`, so no dense copy outlives either.
struct QuantMatmul {
    w: Arc<dyn QuantWeight>,
}

impl QuantMatmul {
    fn dense(&self, dtype: DType, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        self.w
            .to_tensor(dtype, device)
            .map_err(candle_core::Error::wrap)
    }
}

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "quant-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = self.dense(s.dtype(), &candle_core::Device::Cpu)?;
        let (ws, wl) = w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("quantised matmul: the dequantised weight is not on the CPU");
        };
        frozen_matmul_fwd(s, l, ws, wl)
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = candle_core::Device::Cuda(s.device().clone());
        let w = self.dense(s.dtype(), &device)?;
        let (ws, wl) = w.storage_and_layout();
        let candle_core::Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("quantised matmul: the dequantised weight is not on the GPU");
        };
        frozen_matmul_fwd(s, l, ws, wl)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.matmul(&self.dense(grad.dtype(), grad.device())?)?,
        ))
    }
}

/// An NF4 weight kept where it is used: in host memory for the CPU, in the GPU's memory for a
/// GPU (dequantised there by a kernel).
pub fn nf4_on(q: Nf4Tensor, device: &candle_core::Device) -> crate::Result<Arc<dyn QuantWeight>> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => Ok(Arc::new(q.upload(dev)?)),
        candle_core::Device::Cpu => Ok(Arc::new(q)),
        #[allow(unreachable_patterns)]
        other => Err(crate::Error::msg(format!(
            "an NF4 base runs on the CPU or a CUDA GPU, not on {other:?}"
        ))),
    }
}

/// A frozen weight: dense, or quantised (`--base-dtype nf4` or `same`) with the dtype and
/// device its dequantised form takes.
#[derive(Debug, Clone)]
enum Stored {
    Dense(Tensor),
    Quant {
        w: Arc<dyn QuantWeight>,
        dtype: DType,
        device: candle_core::Device,
    },
}

/// A frozen `nn.Linear`: weight (d_out, d_in) and optional bias (d_out).
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Stored,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Stored::Dense(weight),
            bias,
        }
    }

    /// A frozen layer whose weight is kept quantised, dequantised to `dtype` on `device` where
    /// it is used.
    pub fn quantized(
        w: Arc<dyn QuantWeight>,
        bias: Option<Tensor>,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Self {
        Self {
            weight: Stored::Quant {
                w,
                dtype,
                device: device.clone(),
            },
            bias,
        }
    }

    /// The weight (d_out, d_in); a quantised weight dequantised (a new tensor each call, which
    /// can fail where the device has no room for it).
    pub fn weight(&self) -> crate::error::Result<Tensor> {
        match &self.weight {
            Stored::Dense(w) => Ok(w.clone()),
            Stored::Quant { w, dtype, device } => w.to_tensor(*dtype, device),
        }
    }

    /// The dense weight, None when it is kept quantised.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Stored::Dense(w) => Some(w),
            Stored::Quant { .. } => None,
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = Stored::Dense(weight);
    }

    /// Keeps the weight in NF4 from now on (dequantised to its current dtype and device where
    /// it is used).
    pub fn quantize_nf4(&mut self) -> crate::Result<()> {
        if let Stored::Dense(t) = &self.weight {
            self.weight = Stored::Quant {
                w: nf4_on(Nf4Tensor::from_tensor(t)?, t.device())?,
                dtype: t.dtype(),
                device: t.device().clone(),
            };
        }
        Ok(())
    }

    /// Keeps the weight in FP8 from now on (a CUDA weight; both orientations, see
    /// [`crate::quant::fp8`]).
    #[cfg(feature = "cuda")]
    pub fn quantize_fp8(&mut self) -> crate::Result<()> {
        if let Stored::Dense(t) = &self.weight {
            self.weight = Stored::Quant {
                w: Arc::new(crate::quant::fp8::Fp8Weight::from_tensor(t)?),
                dtype: t.dtype(),
                device: t.device().clone(),
            };
        }
        Ok(())
    }

    /// The weight where it is kept quantised (any kind; the CUDA fast path asks it whether it
    /// is an NF4 or FP8 weight it can multiply); None for a dense weight.
    #[cfg(feature = "cuda")]
    pub(crate) fn quantized_weight(&self) -> Option<&Arc<dyn QuantWeight>> {
        match &self.weight {
            Stored::Quant { w, .. } => Some(w),
            Stored::Dense(_) => None,
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Stored::Quant { .. })
    }

    /// Bytes the weight holds where it is kept.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Stored::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Stored::Quant { w, .. } => w.storage_bytes(),
        }
    }

    /// (d_out, d_in).
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Stored::Dense(w) => (w.dims()[0], w.dims()[1]),
            Stored::Quant { w, .. } => w.dims(),
        }
    }

    /// `x·W0ᵀ` without the bias.
    pub fn forward_no_bias(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            Stored::Dense(w) => frozen_matmul(x, w),
            Stored::Quant { w, .. } => {
                let dims = x.dims();
                let (n, k) = self.dims();
                let m = x.elem_count() / k.max(1);
                let y = x
                    .reshape((m, k))?
                    .apply_op1(QuantMatmul { w: Arc::clone(w) })?;
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().unwrap() = n;
                y.reshape(out_dims)
            }
        }
    }

    pub fn add_bias(&self, y: &Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y.clone()),
        }
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dense = self.dense_weight();
        if let Some(w) = dense.filter(|w| crate::ops::fused_available(x, w)) {
            // the op takes x's leading dimensions as rows: no recorded reshapes
            return crate::ops::frozen_linear(x, w, self.bias.as_ref())
                .map_err(candle_core::Error::wrap);
        }
        self.add_bias(&self.forward_no_bias(x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn matches_plain_matmul_and_skips_weight_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f64, 1., (2, 3, 5), &dev)?;
        let w = Tensor::randn(0f64, 1., (4, 5), &dev)?;
        let y = frozen_matmul(&x, &w)?;
        let reference = x.broadcast_matmul(&w.t()?)?;
        let diff = (y.clone() - reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-12, "forward differs by {diff}");
        let g = Tensor::randn(0f64, 1., (2, 3, 4), &dev)?;
        let grads = (y * &g)?.sum_all()?.backward()?;
        let dx = grads.get(&x).expect("input gradient");
        let expected = g.broadcast_matmul(&w)?;
        let diff = (dx - expected)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "input gradient differs by {diff}");
        assert!(
            grads.get(&w).is_none(),
            "a frozen weight must get no gradient"
        );
        Ok(())
    }

    #[test]
    fn refuses_mixed_dtypes() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((4, 3), DType::F64, &dev).unwrap();
        let err = frozen_matmul(&x, &w).unwrap_err().to_string();
        assert!(err.contains("F32") && err.contains("F64"), "{err}");
    }
}
