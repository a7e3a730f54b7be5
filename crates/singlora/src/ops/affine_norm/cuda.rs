//! The affine norm's launchers (kernels in affine_norm.cu): a block per row.

use candle_core::{CudaStorage, DType, Layout, Shape};

use super::AffineNorm;
use crate::ops::cuda::{
    args, input_ptr, input_ptr_as, ptx_module, rows_cfg, tensor_ptr, Ctx, Module,
};

const MODULE: Module = ptx_module!("affine_norm");

fn weights(op: &AffineNorm) -> candle_core::Result<(u64, u64)> {
    Ok((
        tensor_ptr(&op.w, "norm weight", &[DType::F32])?,
        tensor_ptr(&op.b, "norm bias", &[DType::F32])?,
    ))
}

fn rows(count: usize, op: &AffineNorm) -> candle_core::Result<usize> {
    if op.n == 0 || count % op.n != 0 {
        candle_core::bail!("affine norm: {count} elements in rows of {}", op.n);
    }
    Ok(count / op.n)
}

/// The autograd op's forward.
pub(super) fn forward(
    (x, l): (&CudaStorage, &Layout),
    op: &AffineNorm,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let count = l.shape().elem_count();
    let rows = rows(count, op)?;
    let (xp, bf16) = input_ptr(x, l, None, "affine norm")?;
    let (wp, bp) = weights(op)?;
    let cx = Ctx::scalar(&x.device, bf16);
    let (out, yp) = cx.fresh(count)?;
    let name = cx.kernel("affine_norm_fwd", false);
    let a = args![
        xp,
        wp,
        bp,
        yp,
        op.n as i32,
        op.groups as i32,
        op.cpr as i32,
        op.hw as i32,
        op.eps as f32,
        i32::from(op.silu)
    ];
    // SAFETY: x and y hold rows × n elements; w and b one f32 per channel (groups · cpr).
    unsafe { MODULE.launch(cx.dev, &name, rows_cfg(rows), a)? };
    Ok((out, l.shape().clone()))
}

/// The autograd op's backward: dx from x and the output gradient g.
pub(super) fn backward(
    x: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    op: &AffineNorm,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let l = x.1;
    let count = l.shape().elem_count();
    let rows = rows(count, op)?;
    let (xp, bf16) = input_ptr(x.0, l, None, "affine norm backward")?;
    let gp = input_ptr_as(g.0, g.1, bf16, "affine norm backward")?;
    if g.1.shape().elem_count() != count {
        candle_core::bail!("affine norm backward: gradient and input of different sizes");
    }
    let (wp, bp) = weights(op)?;
    let cx = Ctx::scalar(&x.0.device, bf16);
    let (out, dxp) = cx.fresh(count)?;
    let name = cx.kernel("affine_norm_bwd", false);
    let a = args![
        xp,
        wp,
        bp,
        gp,
        dxp,
        op.n as i32,
        op.groups as i32,
        op.cpr as i32,
        op.hw as i32,
        op.eps as f32,
        i32::from(op.silu)
    ];
    // SAFETY: x, g and dx hold rows × n elements; w and b one f32 per channel.
    unsafe { MODULE.launch(cx.dev, &name, rows_cfg(rows), a)? };
    Ok((out, l.shape().clone()))
}
