//! The affine norm's launchers (kernels in affine_norm.cu): a block per row.

use candle_core::{CudaStorage, DType, Layout, Shape};

use super::AffineNorm;
use crate::ops::cuda::{
    args, input_ptr, input_ptr_as, ptx_module, rows_cfg, tensor_ptr, Arg, Ctx, Module,
};

const MODULE: Module = ptx_module!("affine_norm");

/// Launches `kernel` on rows of `op.n`: the kernels' arguments are the input, the weight and
/// bias, then `ptrs` (the output; or the output gradient and the input gradient), then the
/// shape and the flags.
fn launch(
    cx: &Ctx,
    kernel: &str,
    x: u64,
    ptrs: &[u64],
    op: &AffineNorm,
    count: usize,
) -> candle_core::Result<()> {
    if op.n == 0 || count % op.n != 0 {
        candle_core::bail!("affine norm: {count} elements in rows of {}", op.n);
    }
    let mut a = vec![
        Arg::from(x),
        Arg::from(tensor_ptr(&op.w, "norm weight", &[DType::F32])?),
        Arg::from(tensor_ptr(&op.b, "norm bias", &[DType::F32])?),
    ];
    a.extend(ptrs.iter().map(|&p| Arg::from(p)));
    a.extend_from_slice(args![
        op.n as i32,
        op.groups as i32,
        op.cpr as i32,
        op.hw as i32,
        op.eps as f32,
        i32::from(op.silu)
    ]);
    let name = cx.kernel(kernel, false);
    // SAFETY: x and every pointer in ptrs hold `count` elements of the context's type, in rows
    // of n; w and b one f32 per channel (groups · cpr).
    unsafe { MODULE.launch(cx.dev, &name, rows_cfg(count / op.n), &a) }
}

/// The autograd op's forward.
pub(super) fn forward(
    (x, l): (&CudaStorage, &Layout),
    op: &AffineNorm,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let count = l.shape().elem_count();
    let (xp, bf16) = input_ptr(x, l, None, "affine norm")?;
    let cx = Ctx::scalar(&x.device, bf16);
    let (out, yp) = cx.fresh(count)?;
    launch(&cx, "affine_norm_fwd", xp, &[yp], op, count)?;
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
    let (xp, bf16) = input_ptr(x.0, l, None, "affine norm backward")?;
    let gp = input_ptr_as(g.0, g.1, bf16, "affine norm backward")?;
    if g.1.shape().elem_count() != count {
        candle_core::bail!("affine norm backward: gradient and input of different sizes");
    }
    let cx = Ctx::scalar(&x.0.device, bf16);
    let (out, dxp) = cx.fresh(count)?;
    launch(&cx, "affine_norm_bwd", xp, &[gp, dxp], op, count)?;
    Ok((out, l.shape().clone()))
}
