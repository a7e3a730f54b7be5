//! NF4 dequantisation on the GPU (kernels in nf4.cu): a weight kept as
//! [`Nf4Cuda`](crate::quant::nf4::Nf4Cuda) written out as f32 or bf16 where it is used, with
//! the same values as the CPU's [`Nf4Tensor::dequantize`](crate::quant::nf4::Nf4Tensor::dequantize).

use candle_core::CudaDevice;

use super::cuda::{args, elems_cfg, ptx_module, v8_cfg, Module};

const MODULE: Module = ptx_module!("nf4");

/// Device pointers of a weight's NF4 parts.
pub struct Nf4Parts {
    pub codes: u64,
    pub absmax_codes: u64,
    pub group_scales: u64,
    pub map: u64,
    pub offset: f32,
}

/// Writes the `n` dequantised values of `parts` to `y` (bf16 or f32).
///
/// # Safety
/// `parts` must address a weight of `n` values on `dev` (n/2 rounded up code bytes, one scale
/// code per 64 values, one group scale per 16,384, the 256-entry map) and `y` a buffer of `n`
/// elements of the type `bf16` says.
pub unsafe fn dequantize_into(
    dev: &CudaDevice,
    parts: &Nf4Parts,
    n: usize,
    bf16: bool,
    y: u64,
) -> candle_core::Result<()> {
    let suffix = if bf16 { "bf16" } else { "f32" };
    let vec = n % 8 == 0 && parts.codes % 4 == 0 && y % 16 == 0;
    let (name, cfg) = if vec {
        (format!("nf4_dequant_v8_{suffix}"), v8_cfg(n))
    } else {
        (format!("nf4_dequant_{suffix}"), elems_cfg(n))
    };
    // SAFETY: the caller's.
    unsafe {
        MODULE.launch(
            dev,
            &name,
            cfg,
            args![
                parts.codes,
                parts.absmax_codes,
                parts.group_scales,
                parts.map,
                parts.offset,
                n as i64,
                y
            ],
        )
    }
}
