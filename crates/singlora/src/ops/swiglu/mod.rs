//! SwiGLU's gate, silu(g)·u, forward and backward in one pass each on CUDA (candle's composed
//! version runs silu, the product, and a backward of five elementwise kernels, each a full read
//! and write of an (m, ff) tensor). The CPU runs the composed version, the reference. CUDA
//! launchers in `cuda.rs`, kernels in `swiglu.cu`.

use candle_core::{CustomOp2, CustomOp3, Tensor};

use crate::error::Result;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

struct Swiglu;
struct SwigluBackward;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    super::cpu_composed!(2, "swiglu");

    super::cuda_fwd!(|self, g, u| cuda::forward(g, u));

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &dy.contiguous()?, &SwigluBackward)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

impl CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    super::cpu_composed!(3, "swiglu backward");

    super::cuda_fwd!(|self, g, u, dy| cuda::backward(g, u, dy));
}

/// silu(`gate`)·`up`, elementwise (same shapes).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fused =
        super::cuda_kernels_for(gate) && gate.dtype() == up.dtype() && gate.shape() == up.shape();
    if !fused {
        return super::reference::swiglu(gate, up);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)?)
}
