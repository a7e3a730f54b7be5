//! FP8 frozen weights (`--base-dtype fp8`, CUDA only): E4M3 with one scale per weight, kept in
//! both orientations, W (n, k) for the forward x·Wᵀ and Wᵀ (k, n) for the backward g·W, since
//! the FP8 tensor cores take only operands contiguous along the reduced dimension. Two bytes a
//! value, as bf16: the point is the GEMMs' speed (about 1.7× bf16's on Hopper), not memory.
//! The CUDA fast path multiplies them with FP8 activations (E4M3) and gradients (E5M2), one
//! scale per tensor; elsewhere they are dequantised where used.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::ops::fp8::{self, Fp8Mat};

/// A frozen weight in FP8 on a GPU, both orientations.
pub struct Fp8Weight {
    /// (n, k), E4M3.
    pub w: Fp8Mat,
    /// (k, n), E4M3, the same scale.
    pub wt: Fp8Mat,
    dev: candle_core::CudaDevice,
}

impl std::fmt::Debug for Fp8Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fp8Weight")
            .field("dims", &(self.w.rows, self.w.cols))
            .finish()
    }
}

impl Fp8Weight {
    /// Quantises a 2-D bf16 or f32 weight on a CUDA device.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let Device::Cuda(dev) = t.device() else {
            return Err(Error::msg("an FP8 base runs on a CUDA GPU only"));
        };
        let (n, k) = t.dims2()?;
        // the FP8 GEMMs' leading dimensions must be multiples of 16 elements
        if n % 16 != 0 || k % 16 != 0 {
            return Err(Error::msg(format!(
                "is {n} × {k}; FP8 needs both dimensions multiples of 16"
            )));
        }
        let w = fp8::quantize_tensor(t, false)?;
        let wt = fp8::transpose_tensor(&w, t)?;
        Ok(Self {
            w,
            wt,
            dev: dev.clone(),
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.w.rows, self.w.cols)
    }

    /// Bytes held (both orientations).
    pub fn storage_bytes(&self) -> usize {
        2 * self.w.rows * self.w.cols
    }

    /// The dequantised weight (n, k) as `dtype` on `device` (written by the kernel in that type
    /// where it is bf16 or f32).
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let here = Device::Cuda(self.dev.clone());
        let kernel_dtype = if dtype == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        let like = Tensor::zeros((), kernel_dtype, &here)?;
        let t = fp8::dequantize_tensor(&self.w, &like)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}
