//! The split of a projection's output into heads, with rotary position embedding: x (b, t, n·hd)
//! → (b, n, t, hd), each head's halves rotated by the position's angles. On CUDA one kernel
//! does the transpose and the rotation (and the backward, the inverse rotation back into the
//! (b, t, n·hd) layout), where candle's composed version takes a strided copy, two narrows, a
//! negation, a concatenation and three broadcast products, each with its own backward pass.
//! The CPU runs the composed version, which is the reference the device check compares with.
//! CUDA launchers in `cuda.rs`, kernels in `rope.cu`.

use candle_core::{CustomOp1, DType, Device, Tensor};

use crate::error::Result;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

/// cos and sin tables (t, head_dim) for positions 0..t, rotate-half layout.
pub fn rope_tables(
    inv_freq: &[f64],
    t: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    rope_tables_at(inv_freq, 0, t, dtype, device)
}

/// [`rope_tables`] of the `t` positions from `start` on.
pub fn rope_tables_at(
    inv_freq: &[f64],
    start: usize,
    t: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(t * 2 * half);
    let mut sin = Vec::with_capacity(t * 2 * half);
    for p in start..start + t {
        for _ in 0..2 {
            for f in inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let cos = Tensor::from_vec(cos, (t, 2 * half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (t, 2 * half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

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

    super::cpu_composed!(1, "rope split");

    super::cuda_fwd!(|self, x| {
        let tables = (&self.cos, &self.sin);
        cuda::forward(x, tables, self.dims, self.rotate, self.inverse)
    });

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
    if !super::cuda_kernels_for(x) {
        return super::reference::rope_split(x, cos, sin, heads, rotate);
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
