//! The attention block from the projections to the merged heads: RoPE and the head split of
//! q, k, v (b, t, n·hd), causal/padded softmax attention with grouped-query heads, and the
//! merge back to (b, t, h·hd). On CUDA one op does all of it, forward and backward (see
//! `ops/cuda/attention.rs`); elsewhere it is composed from [`rope_split`](super::rope_split)
//! and [`crate::nn::attention`], which is also the reference the device check compares with.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};

use crate::error::Result;

#[cfg(feature = "cuda")]
type Saved = super::cuda::attention::Saved;
#[cfg(not(feature = "cuda"))]
type Saved = ();

#[derive(Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Block {
    cos: Tensor,
    sin: Tensor,
    /// (b, t, heads, kv_heads, hd).
    dims: (usize, usize, usize, usize, usize),
    key_lens: Vec<usize>,
    causal: bool,
    /// Filled by the forward, taken by the backward.
    saved: Arc<Mutex<Option<Saved>>>,
}

impl CustomOp3 for Block {
    fn name(&self) -> &'static str {
        "attention-block"
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
        candle_core::bail!("attention block: the CPU takes the composed path")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (out, shape, saved) = super::cuda::attention::forward(
            (q, lq),
            (k, lk),
            (v, lv),
            (&self.cos, &self.sin),
            self.dims,
            &self.key_lens,
            self.causal,
        )?;
        *self.saved.lock().unwrap() = Some(saved);
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, h, kvh, d) = self.dims;
        let packed = g
            .contiguous()?
            .apply_op1_no_bwd(&BlockBackward(self.clone()))?;
        let (nq, nk) = (b * t * h * d, b * t * kvh * d);
        let dq = packed.narrow(0, 0, nq)?.reshape((b, t, h * d))?;
        let dk = packed.narrow(0, nq, nk)?.reshape((b, t, kvh * d))?;
        let dv = packed.narrow(0, nq + nk, nk)?.reshape((b, t, kvh * d))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward as an op on the output's gradient, giving [dq | dk | dv] flat.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct BlockBackward(Block);

impl CustomOp1 for BlockBackward {
    fn name(&self) -> &'static str {
        "attention-block-backward"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("attention block backward: the CPU takes the composed path")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let saved = self.0.saved.lock().unwrap().take().ok_or_else(|| {
            candle_core::Error::Msg("attention block: backward without a forward (or twice)".into())
        })?;
        super::cuda::attention::backward(&saved, (g, l), (&self.0.cos, &self.0.sin), self.0.dims)
    }
}

/// Attention from the projections' outputs `q` (b, t, heads·hd), `k`, `v` (b, t, kv_heads·hd)
/// with RoPE tables `cos`, `sin` (t, hd): softmax(QKᵀ/√hd) V over the first `key_lens[i]` keys
/// of each row (and only earlier positions when `causal`), heads merged: (b, t, heads·hd).
#[allow(clippy::too_many_arguments)]
pub fn attention_block(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
    key_lens: &[usize],
    causal: bool,
) -> Result<Tensor> {
    let (b, t, width) = q.dims3()?;
    let hd = width / heads;
    let fused = matches!(q.device(), candle_core::Device::Cuda(_))
        && matches!(q.dtype(), DType::F32 | DType::BF16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && heads % kv_heads == 0
        && hd % 2 == 0
        && cfg!(feature = "cuda");
    if !fused {
        let qh = super::rope_split(q, cos, sin, heads, true)?;
        let kh = super::rope_split(k, cos, sin, kv_heads, true)?;
        let vh = super::rope_split(v, cos, sin, kv_heads, false)?;
        let a = crate::nn::attention(&qh, &kh, &vh, key_lens, causal)?;
        return Ok(a.transpose(1, 2)?.reshape((b, t, width))?);
    }
    let op = Block {
        cos: cos.to_dtype(DType::F32)?.contiguous()?,
        sin: sin.to_dtype(DType::F32)?.contiguous()?,
        dims: (b, t, heads, kv_heads, hd),
        key_lens: key_lens.to_vec(),
        causal,
        saved: Arc::new(Mutex::new(None)),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}
