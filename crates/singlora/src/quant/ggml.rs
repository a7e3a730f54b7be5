//! A frozen weight kept in the type its GGUF file stores it in (`--base-dtype same`: Q4_K,
//! Q8_0, …), dequantised where it is used, as [`super::nf4`] weights are.
//!
//! The stored tensor is llama.cpp's: (d_out, d_in) row-major, which is the layout a frozen
//! linear layer wants for every architecture (GPT-2's Conv1D weights included, which Hugging
//! Face stores transposed); only LLaMA's Q and K rows are in llama.cpp's RoPE order. Each row
//! is whole quantisation blocks, so [`GgmlWeight::new`] puts those rows back in Hugging Face's
//! order by moving their bytes, once, and a weight dequantises straight to the layer's layout.
//!
//! On a CUDA device the blocks live in the GPU's memory and candle's kernels dequantise them
//! there ([`GgmlWeight::to_device`]); the CUDA fast path has each one written into its scratch
//! buffer just before its product, as it does NF4 weights.

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A GGUF tensor kept as stored (LLaMA's Q/K rows in Hugging Face's order).
#[derive(Debug)]
pub struct GgmlWeight {
    q: QTensor,
}

impl GgmlWeight {
    /// `q` as read from the file; `unpermute_heads`: the heads of a LLaMA Q or K weight, whose
    /// rows are put back in Hugging Face's order.
    pub fn new(q: QTensor, unpermute_heads: Option<usize>) -> Result<Self> {
        if q.shape().rank() != 2 {
            return Err(Error::msg(format!(
                "a {:?} weight of shape {:?} is not a matrix",
                q.dtype(),
                q.shape().dims()
            )));
        }
        let q = match unpermute_heads {
            Some(heads) => unpermute_rows(&q, heads)?,
            None => q,
        };
        Ok(Self { q })
    }

    /// The same blocks on `device` (a copy of the bytes; dequantised there where used).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let q = QTensor::new(
            QStorage::from_data(self.q.data()?, device, self.q.dtype())?,
            self.q.shape().clone(),
        )?;
        Ok(Self { q })
    }
}

/// Undoes llama.cpp's Q/K row permutation on the quantised bytes: within each head of `2·half`
/// rows, Hugging Face's row `j·half + i` (j ∈ {0, 1}) is llama.cpp's row `2i + j` (see
/// [`crate::gguf::unpermute_qk`], which does the same to a dense tensor).
fn unpermute_rows(q: &QTensor, heads: usize) -> Result<QTensor> {
    let dims = q.shape().dims();
    let (rows, cols) = (dims[0], dims[1]);
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(Error::msg(format!(
            "Q/K permutation: {rows} rows do not split into {heads} heads of an even size"
        )));
    }
    let data = q.data()?;
    let row_bytes = data.len() / rows;
    if row_bytes * rows != data.len() || cols % q.dtype().block_size() != 0 {
        return Err(Error::msg(format!(
            "a {:?} weight of shape {:?}: its rows are not whole blocks",
            q.dtype(),
            dims
        )));
    }
    let half = rows / heads / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let src = h * 2 * half + 2 * i + j;
                out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(QTensor::new(
        QStorage::from_data(std::borrow::Cow::Owned(out), &q.device(), q.dtype())?,
        q.shape().clone(),
    )?)
}

impl super::QuantWeight for GgmlWeight {
    fn dims(&self) -> (usize, usize) {
        let d = self.q.shape().dims();
        (d[0], d[1])
    }

    fn storage_bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    /// The weight dequantised (where its blocks are: the CPU, or by candle's kernels on a GPU),
    /// as `dtype` on `device`.
    fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.q.dequantize(&self.q.device())?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    #[cfg(feature = "cuda")]
    fn dequantizes_on_gpu(&self) -> bool {
        self.q.device().is_cuda()
    }

    #[cfg(feature = "cuda")]
    unsafe fn dequantize_into(&self, bf16: bool, y: u64) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::result;
        let Device::Cuda(dev) = self.q.device() else {
            return Err(Error::msg(
                "a GGUF weight dequantised into a GPU buffer lives on the CPU",
            ));
        };
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        // candle's kernel writes f32 (a fresh buffer), converted to the step's type
        let t = super::QuantWeight::to_tensor(self, dtype, &self.q.device())?;
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*storage else {
            return Err(Error::msg("the dequantised weight is not on the GPU"));
        };
        let src =
            crate::ops::cuda::ptr_of(s)? + (layout.start_offset() * dtype.size_in_bytes()) as u64;
        let bytes = t.elem_count() * dtype.size_in_bytes();
        // SAFETY: y holds the weight's elements of this type (the caller's contract); src is the
        // contiguous tensor just made; the copy runs on candle's stream, which frees the
        // source's buffer in stream order after it.
        unsafe {
            result::memcpy_dtod_async(y, src, bytes, dev.cuda_stream().cu_stream())
                .map_err(|e| Error::msg(format!("copying a dequantised GGUF weight: {e}")))?
        };
        Ok(())
    }
}

/// Whether GGUF type `t` is a quantised one (kept by `--base-dtype same`) rather than a float.
pub fn is_quantized_type(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}
