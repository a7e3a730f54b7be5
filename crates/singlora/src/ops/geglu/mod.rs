//! GEGLU, the gate of Stable Diffusion's feed-forward: from the projection's output
//! h = [a | b] (last axis 2n), y = a · gelu(b) with the exact (erf) GELU, forward and backward
//! in one pass each on CUDA. candle's composed version takes two narrows (whose backward
//! builds a zero-padded copy each), the GELU (a backward of several element-wise kernels) and
//! the product, each a full pass over an (m, n) tensor. The CPU runs the composed version, the
//! reference. Kernels in `geglu.cu`.

use candle_core::{CustomOp1, CustomOp2, Tensor};

use crate::error::Result;

#[cfg(feature = "cuda")]
mod cuda;

struct Geglu;
struct GegluBackward;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    super::cpu_composed!(1, "geglu");

    super::cuda_fwd!(|self, h| cuda::forward(h));

    fn bwd(&self, h: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        super::mark_backward_start(h.device())?;
        let dh = h.apply_op2_no_bwd(&dy.contiguous()?, &GegluBackward)?;
        super::mark_on(h.device(), "backward: GEGLU").map_err(candle_core::Error::wrap)?;
        Ok(Some(dh))
    }
}

impl CustomOp2 for GegluBackward {
    fn name(&self) -> &'static str {
        "geglu-backward"
    }

    super::cpu_composed!(2, "geglu backward");

    super::cuda_fwd!(|self, h, dy| cuda::backward(h, dy));
}

/// The input gradient of [`geglu`] at `h` for the output gradient `dy`: one kernel on CUDA;
/// elsewhere the composed form's backward, by candle's autograd on a graph of its own.
pub fn geglu_backward(h: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if super::cuda_kernels_for(h) {
        return Ok(h
            .contiguous()?
            .apply_op2_no_bwd(&dy.contiguous()?, &GegluBackward)?);
    }
    super::input_grad_by_autograd(h, dy, "geglu", geglu)
}

/// a · gelu(b) for `h` = [a | b] along its last axis.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let last = h
        .rank()
        .checked_sub(1)
        .ok_or_else(|| crate::Error::msg("geglu of a scalar"))?;
    let n = h.dim(last)? / 2;
    if h.dim(last)? != 2 * n {
        return Err(crate::Error::msg(format!(
            "geglu: the last axis ({}) is not two halves",
            h.dim(last)?
        )));
    }
    if !super::cuda_kernels_for(h) {
        return Ok((h.narrow(last, 0, n)? * super::gelu_erf(&h.narrow(last, n, n)?)?)?);
    }
    Ok(h.contiguous()?.apply_op1(Geglu)?)
}
