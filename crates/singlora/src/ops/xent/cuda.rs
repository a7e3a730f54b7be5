//! The cross-entropy's launchers (kernels in xent.cu): on the autograd op's storages, and on
//! pointers for the fast path's SFT head. A block per row of logits.

use candle_core::{CudaStorage, Layout, Shape};

use crate::ops::cuda::{args, fresh, input_ptr, ptx_module, rows_cfg, u32_input_ptr, Ctx, Module};

const MODULE: Module = ptx_module!("xent");

/// Cross-entropy rows of logits (n, c) against u32 targets: (n, 2) f32 of (nll, lse).
pub(super) fn forward(
    z: (&CudaStorage, &Layout),
    t: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, c) = z.1.shape().dims2()?;
    let tp = u32_input_ptr(t.0, t.1, "cross-entropy targets")?;
    let (zp, bf16) = input_ptr(z.0, z.1, None, "cross-entropy logits")?;
    let cx = Ctx::scalar(&z.0.device, bf16);
    let (out, op) = fresh(cx.dev, false, 2 * n)?;
    let name = cx.kernel("xent_fwd", false);
    // SAFETY: z holds n rows of c, t n u32, out 2n f32.
    unsafe { MODULE.launch(cx.dev, &name, rows_cfg(n), args![zp, tp, op, c as i32])? };
    Ok((out, Shape::from((n, 2))))
}

/// Its backward: dz from the logits, targets and (n, 2) f32 of (row gradient, lse).
pub(super) fn backward(
    z: (&CudaStorage, &Layout),
    t: (&CudaStorage, &Layout),
    lg: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, c) = z.1.shape().dims2()?;
    let tp = u32_input_ptr(t.0, t.1, "cross-entropy targets")?;
    let (gp, g_bf16) = input_ptr(lg.0, lg.1, None, "cross-entropy gradient")?;
    if g_bf16 {
        candle_core::bail!("cross-entropy gradient: f32 expected");
    }
    let (zp, bf16) = input_ptr(z.0, z.1, None, "cross-entropy logits")?;
    let cx = Ctx::scalar(&z.0.device, bf16);
    let (dz, dzp) = cx.fresh(n * c)?;
    let name = cx.kernel("xent_bwd", false);
    // SAFETY: z and dz hold n rows of c, t n u32, the gradient 2n f32.
    unsafe { MODULE.launch(cx.dev, &name, rows_cfg(n), args![zp, tp, gp, dzp, c as i32])? };
    Ok((dz, z.1.shape().clone()))
}

/// Per row of logits z (n × c): out[i] = −log softmax(z_i)[t_i] (f32), and z overwritten by
/// its gradient g·(softmax(z_i) − onehot(t_i)). 8-wide only: c a multiple of 8, z 16-byte
/// aligned.
pub fn xent_grad_inplace(
    cx: &Ctx,
    (z, t, out): (u64, u64, u64),
    n: usize,
    c: usize,
    g: f32,
) -> candle_core::Result<()> {
    if c % 8 != 0 || z % 16 != 0 {
        candle_core::bail!("xent_grad_inplace: rows of a multiple of 8, 16-byte aligned");
    }
    let name = cx.kernel("xent_grad_inplace", true);
    // SAFETY: z holds n × c elements, t n u32, out n f32.
    unsafe { MODULE.launch(cx.dev, &name, rows_cfg(n), args![z, t, out, c as i32, g]) }
}
