//! A frozen weight kept in the type its GGUF file stores it in (`--base-dtype same`: Q4_K,
//! Q8_0, …), dequantised where it is used, as [`super::nf4`] weights are.
//!
//! The stored tensor is llama.cpp's: (d_out, d_in) row-major, which is the layout a frozen
//! linear layer wants for every architecture (GPT-2's Conv1D weights included, which Hugging
//! Face stores transposed); only LLaMA's Q and K rows are in llama.cpp's RoPE order, which
//! [`GgmlWeight::to_tensor`] undoes after dequantising.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A GGUF tensor kept as stored.
#[derive(Debug)]
pub struct GgmlWeight {
    q: QTensor,
    /// Q/K rows to put back in Hugging Face's order: the number of heads.
    unpermute_heads: Option<usize>,
}

impl GgmlWeight {
    /// `q` as read from the file; `unpermute_heads`: the heads of a LLaMA Q or K weight.
    pub fn new(q: QTensor, unpermute_heads: Option<usize>) -> Result<Self> {
        if q.shape().rank() != 2 {
            return Err(Error::msg(format!(
                "a {:?} weight of shape {:?} is not a matrix",
                q.dtype(),
                q.shape().dims()
            )));
        }
        Ok(Self { q, unpermute_heads })
    }
}

impl super::QuantWeight for GgmlWeight {
    fn dims(&self) -> (usize, usize) {
        let d = self.q.shape().dims();
        (d[0], d[1])
    }

    fn storage_bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    /// The weight dequantised in Hugging Face's row order, as `dtype` on `device`.
    fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut t = self.q.dequantize(&Device::Cpu)?;
        if let Some(heads) = self.unpermute_heads {
            t = crate::gguf::unpermute_qk(&t, heads)?;
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// Whether GGUF type `t` is a quantised one (kept by `--base-dtype same`) rather than a float.
pub fn is_quantized_type(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}
