//! The split of a projection's output into heads, with rotary position embedding: x (b, t, n·hd)
//! → (b, n, t, hd), each head's halves rotated by the position's angles. On CUDA one kernel
//! does the transpose and the rotation (and the backward, the inverse rotation back into the
//! (b, t, n·hd) layout), where candle's composed version takes a strided copy, two narrows, a
//! negation, a concatenation and three broadcast products, each with its own backward pass.
//! The CPU runs the composed version, which is the reference the device check compares with.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::error::Result;

#[derive(Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct RopeSplit {
    /// f32 (t, hd) tables on the input's device.
    cos: Tensor,
    sin: Tensor,
    dims: (usize, usize, usize, usize),
    rotate: bool,
    inverse: bool,
}

impl CustomOp1 for RopeSplit {
    fn name(&self) -> &'static str {
        "rope-split"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("rope split: the CPU takes the composed path")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::rope_split(
            s,
            l,
            &self.cos,
            &self.sin,
            self.dims,
            self.rotate,
            self.inverse,
        )
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inv = RopeSplit {
            inverse: !self.inverse,
            ..self.clone()
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inv)?))
    }
}

/// `x` (b, t, heads·hd) split into heads (b, heads, t, hd), rotated by RoPE tables `cos`, `sin`
/// (t, hd) when `rotate` (queries and keys) or not (values). The result may be a strided view.
pub fn rope_split(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    rotate: bool,
) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let hd = width / heads;
    let fused = matches!(x.device(), candle_core::Device::Cuda(_))
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && cfg!(feature = "cuda");
    if !fused {
        let y = x.reshape((b, t, heads, hd))?.transpose(1, 2)?;
        if !rotate {
            return Ok(y);
        }
        let dt = x.dtype();
        return crate::nn::rope(&y, &cos.to_dtype(dt)?, &sin.to_dtype(dt)?);
    }
    let op = RopeSplit {
        cos: cos.to_dtype(DType::F32)?.contiguous()?,
        sin: sin.to_dtype(DType::F32)?.contiguous()?,
        dims: (b, t, heads, hd),
        rotate,
        inverse: false,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}
