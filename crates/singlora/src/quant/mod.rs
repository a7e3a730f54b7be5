//! Frozen base weights in fewer bits: [`nf4`] (QLoRA's 4-bit NormalFloat with double
//! quantisation), [`ggml`] (a GGUF file's own types, kept as loaded) or, on CUDA, `fp8` (E4M3
//! for the FP8 tensor cores), chosen by [`BaseDtype`].

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

#[cfg(feature = "cuda")]
pub mod fp8;
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
    /// Whether the weight lives on a GPU and can be written, dequantised, into a buffer of the
    /// CUDA fast path ([`QuantWeight::dequantize_into`]): NF4 and GGUF weights on a GPU.
    #[cfg(feature = "cuda")]
    fn dequantizes_on_gpu(&self) -> bool {
        false
    }
    /// Writes the weight, dequantised (row-major, bf16 or f32 as `bf16` says), into the device
    /// buffer at `y`, in the order of the device's stream.
    ///
    /// # Safety
    /// `y` must address d_out·d_in elements of that type on the weight's device.
    #[cfg(feature = "cuda")]
    unsafe fn dequantize_into(&self, _bf16: bool, _y: u64) -> Result<()> {
        Err(Error::msg(
            "this kind of weight is not dequantised on a GPU",
        ))
    }
    /// The weight as an FP8 weight, whose GEMMs the CUDA fast path runs in FP8; None for any
    /// other kind.
    #[cfg(feature = "cuda")]
    fn fp8_on_gpu(&self) -> Option<&fp8::Fp8Weight> {
        None
    }
}

#[cfg(feature = "cuda")]
impl QuantWeight for fp8::Fp8Weight {
    fn dims(&self) -> (usize, usize) {
        fp8::Fp8Weight::dims(self)
    }
    fn storage_bytes(&self) -> usize {
        fp8::Fp8Weight::storage_bytes(self)
    }
    fn to_tensor(
        &self,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        fp8::Fp8Weight::to_tensor(self, dtype, device)
    }
    fn fp8_on_gpu(&self) -> Option<&fp8::Fp8Weight> {
        Some(self)
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
    fn dequantizes_on_gpu(&self) -> bool {
        true
    }
    unsafe fn dequantize_into(&self, bf16: bool, y: u64) -> Result<()> {
        // SAFETY: the caller's contract is this one's.
        unsafe { nf4::Nf4Cuda::dequantize_into(self, bf16, y) }
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
    /// FP8 E4M3 with one scale per weight, multiplied on the FP8 tensor cores (CUDA, bf16).
    Fp8,
}

impl fmt::Display for BaseDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BaseDtype::Auto => "auto",
            BaseDtype::Nf4 => "nf4",
            BaseDtype::Same => "same",
            BaseDtype::Fp8 => "fp8",
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
            "fp8" => Ok(BaseDtype::Fp8),
            _ => Err(Error::msg(format!(
                "unknown base dtype `{s}`: expected auto, nf4, same or fp8"
            ))),
        }
    }
}

crate::serde_via_str!(BaseDtype);
