//! Frozen base weights in fewer bits: [`nf4`] (QLoRA's 4-bit NormalFloat with double
//! quantisation) or [`ggml`] (a GGUF file's own types, kept as loaded), chosen by [`BaseDtype`].

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

pub mod ggml;
pub mod nf4;

/// A frozen weight kept quantised: dequantised (in Hugging Face's layout, (d_out, d_in)) where it
/// is used.
pub trait QuantWeight: std::fmt::Debug + Send + Sync {
    /// (d_out, d_in).
    fn dims(&self) -> (usize, usize);
    /// Bytes the quantised weight holds.
    fn storage_bytes(&self) -> usize;
    /// The weight dequantised, as `dtype` on `device`.
    fn to_tensor(
        &self,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor>;
    /// The weight as an NF4 weight held on a GPU, whose kernel can write it into a buffer of
    /// the CUDA fast path; None for any other kind.
    #[cfg(feature = "cuda")]
    fn nf4_on_gpu(&self) -> Option<&nf4::Nf4Cuda> {
        None
    }
}

impl QuantWeight for nf4::Nf4Tensor {
    fn dims(&self) -> (usize, usize) {
        let d = nf4::Nf4Tensor::dims(self);
        (d[0], d[1])
    }
    fn storage_bytes(&self) -> usize {
        nf4::Nf4Tensor::storage_bytes(self)
    }
    fn to_tensor(
        &self,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        nf4::Nf4Tensor::to_tensor(self, dtype, device)
    }
}

#[cfg(feature = "cuda")]
impl QuantWeight for nf4::Nf4Cuda {
    fn dims(&self) -> (usize, usize) {
        let d = nf4::Nf4Cuda::dims(self);
        (d[0], d[1])
    }
    fn storage_bytes(&self) -> usize {
        nf4::Nf4Cuda::storage_bytes(self)
    }
    fn to_tensor(
        &self,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        nf4::Nf4Cuda::to_tensor(self, dtype, device)
    }
    fn nf4_on_gpu(&self) -> Option<&nf4::Nf4Cuda> {
        Some(self)
    }
}

/// How the frozen base's linear weights are kept during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseDtype {
    /// f32 on the CPU, bf16 on a GPU.
    #[default]
    Auto,
    /// NF4 with double quantisation (QLoRA), dequantised layer by layer where used.
    Nf4,
    /// A GGUF file's linear weights in the types the file stores them (Q4_K, Q8_0, …),
    /// dequantised layer by layer where used; float ones as `auto`.
    Same,
}

impl fmt::Display for BaseDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BaseDtype::Auto => "auto",
            BaseDtype::Nf4 => "nf4",
            BaseDtype::Same => "same",
        })
    }
}

impl FromStr for BaseDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(BaseDtype::Auto),
            "nf4" => Ok(BaseDtype::Nf4),
            "same" => Ok(BaseDtype::Same),
            _ => Err(Error::msg(format!(
                "unknown base dtype `{s}`: expected auto, nf4 or same"
            ))),
        }
    }
}

crate::serde_via_str!(BaseDtype);
