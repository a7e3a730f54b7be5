//! Cross-attention to a short context (Stable Diffusion's 77 text tokens) as one op each way on
//! CUDA: softmax(q·kᵀ/√d)·v per head for q (b, t, h·d) and k, v (b, s, h·d), bf16, with at
//! most [`MAX_KEYS`] keys and heads of [`HEAD_DIMS`] wide, products on the tensor cores. The
//! scores stay in registers and shared memory, forward and backward, and the heads are read
//! and written in place; the composed path (`diffusion::unet::attention::attend`) splits the
//! heads into copies, materialises the (b·h, t, s) scores, and its backward gives every one of
//! those tensors a zero-filled gradient to add into. Kernels in `cross_attention.cu`.

use candle_core::{CustomOp2, CustomOp3, DType, Tensor};

use crate::error::Result;

#[cfg(feature = "cuda")]
mod cuda;

/// Whether the U-Net's attention (`diffusion::unet::attention::attend`) takes these kernels
/// (`singlora-lab gpu-check`'s rows for them call [`cross_attention`] directly, so they check
/// the kernels whichever way this is set).
pub const IN_USE: bool = true;

/// The most keys the kernels take.
pub const MAX_KEYS: usize = 80;
/// The head widths the kernels are built for.
pub const HEAD_DIMS: [usize; 3] = [40, 64, 80];

/// Attention of `q` (b, t, heads·d) to `k`, `v` (b, s, heads·d) through the fused kernels, or
/// None where they do not apply (not CUDA bf16, more than [`MAX_KEYS`] keys, a head width not
/// in [`HEAD_DIMS`]): the caller takes the composed path.
pub fn cross_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Option<Tensor>> {
    let (b, _, inner) = q.dims3()?;
    let (bk, s, kw) = k.dims3()?;
    if heads == 0 || inner % heads != 0 {
        return Err(crate::Error::msg(format!(
            "cross-attention: {inner} query features in {heads} heads"
        )));
    }
    if v.dims3()? != (bk, s, kw) || bk != b || kw != inner {
        return Err(crate::Error::msg(format!(
            "cross-attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let d = inner / heads;
    let fused = cfg!(feature = "cuda")
        && q.device().is_cuda()
        && [q, k, v].iter().all(|x| x.dtype() == DType::BF16)
        && (1..=MAX_KEYS).contains(&s)
        && HEAD_DIMS.contains(&d);
    if !fused {
        return Ok(None);
    }
    let op = CrossAttention { heads };
    Ok(Some(aligned(q)?.apply_op3(
        &aligned(k)?,
        &aligned(v)?,
        op,
    )?))
}

/// (dq, dk, dv) of [`cross_attention`] at `q`, `k`, `v` for the output gradient `g`, outside
/// autograd: the op's own backward, and a backward its caller writes out where
/// [`cross_attention`] ran on the kernels.
pub fn cross_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, inner) = q.dims3()?;
    let s = k.dim(1)?;
    let op = CrossAttentionBackward {
        heads,
        k: aligned(&k.detach())?,
        v: aligned(&v.detach())?,
    };
    let packed = aligned(g)?.apply_op2_no_bwd(&aligned(&q.detach())?, &op)?;
    Ok(super::attention::unpack_qkv(
        &packed,
        (b, t, inner),
        (b, s, inner),
    )?)
}

/// `x` contiguous from an element offset a multiple of 8 (the kernels load 16 bytes at a
/// time; a row of heads·d bf16 is whole 16-byte units for every width in [`HEAD_DIMS`]),
/// copied where it is not.
fn aligned(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(match x.layout().start_offset() % 8 {
        0 => x,
        _ => x.copy()?,
    })
}

#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct CrossAttention {
    heads: usize,
}

impl CustomOp3 for CrossAttention {
    fn name(&self) -> &'static str {
        "cross-attention"
    }

    super::cpu_composed!(3, "cross-attention");

    super::cuda_fwd!(|self, q, k, v| cuda::forward(q, k, v, self.heads));

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        super::mark_backward_start(q.device())?;
        let (dq, dk, dv) =
            cross_attention_backward(q, k, v, self.heads, g).map_err(candle_core::Error::wrap)?;
        super::mark_on(q.device(), "backward: cross-attention")
            .map_err(candle_core::Error::wrap)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward as an op on the output's gradient and q (k and v held): [dq | dk | dv] flat.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct CrossAttentionBackward {
    heads: usize,
    k: Tensor,
    v: Tensor,
}

impl CustomOp2 for CrossAttentionBackward {
    fn name(&self) -> &'static str {
        "cross-attention-backward"
    }

    super::cpu_composed!(2, "cross-attention backward");

    super::cuda_fwd!(|self, g, q| cuda::backward(g, q, (&self.k, &self.v), self.heads));
}
