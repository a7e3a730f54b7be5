//! Per-row cross-entropy of logits (n, C) against class indices, forward and backward in one
//! pass over the logits each on CUDA (the composed version upcasts to f32 and runs max, sub,
//! exp, sum, log and gather, each a pass over an (n, C) tensor and each with a backward). The
//! CPU runs the composed version in [`crate::nn::cross_entropy`], the reference.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use crate::error::Result;

struct Xent;
struct XentBackward;

impl CustomOp2 for Xent {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cross-entropy: the CPU takes the composed path")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        lz: &Layout,
        t: &candle_core::CudaStorage,
        lt: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::xent_fwd(z, lz, t, lt)
    }

    fn bwd(
        &self,
        z: &Tensor,
        t: &Tensor,
        out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // (row gradient, lse) side by side for the kernel
        let lg = Tensor::cat(&[&g.narrow(1, 0, 1)?, &out.narrow(1, 1, 1)?], 1)?.contiguous()?;
        Ok((Some(z.apply_op3_no_bwd(t, &lg, &XentBackward)?), None))
    }
}

impl CustomOp3 for XentBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cross-entropy backward: the CPU takes the composed path")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        lz: &Layout,
        t: &candle_core::CudaStorage,
        lt: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::xent_bwd(z, lz, t, lt, g, lg)
    }
}

/// Whether [`xent_rows`] runs fused for these logits.
pub fn xent_fused(logits: &Tensor) -> bool {
    matches!(logits.device(), candle_core::Device::Cuda(_))
        && matches!(logits.dtype(), DType::F32 | DType::BF16)
        && logits.rank() == 2
        && cfg!(feature = "cuda")
}

/// −log softmax(logits)[target] per row (n) in f32, fused (CUDA only: see [`xent_fused`]).
pub fn xent_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let out = logits
        .contiguous()?
        .apply_op2(&targets.to_dtype(DType::U32)?.contiguous()?, Xent)?;
    Ok(out.narrow(1, 0, 1)?.squeeze(1)?)
}
