//! RMSNorm's launchers (kernels in norm.cu): on pointers, for the fast path, and on the autograd
//! op's storages. Rows of `d` with an f32 weight `w` (d), a block per row.

use candle_core::{CudaStorage, DType, Layout, Shape, Tensor};

use crate::ops::cuda::{
    args, input_ptr, input_ptr_as, ptx_module, rows_cfg, tensor_ptr, Ctx, Module,
};

const MODULE: Module = ptx_module!("norm");

/// y = RMSNorm(x)·w over rows of d.
pub fn rms_fwd(
    cx: &Ctx,
    (x, w, y): (u64, u64, u64),
    rows: usize,
    d: usize,
    eps: f64,
) -> candle_core::Result<()> {
    let name = cx.kernel("rms_norm_fwd", cx.v8(&[x, w, y], d));
    // SAFETY: x and y hold rows × d elements, w d f32.
    unsafe {
        MODULE.launch(
            cx.dev,
            &name,
            rows_cfg(rows),
            args![x, w, y, d as i32, eps as f32],
        )
    }
}

/// dx += RMSNorm backward(x, g): the residual stream's gradient.
pub fn rms_bwd_acc(
    cx: &Ctx,
    (x, w, g, dx): (u64, u64, u64, u64),
    rows: usize,
    d: usize,
    eps: f64,
) -> candle_core::Result<()> {
    let name = cx.kernel("rms_norm_bwd_acc", cx.v8(&[x, w, g, dx], d));
    let a = args![x, w, g, dx, d as i32, eps as f32];
    // SAFETY: x, g and dx hold rows × d elements, w d f32.
    unsafe { MODULE.launch(cx.dev, &name, rows_cfg(rows), a) }
}

/// y[i] = RMSNorm(x[rows[i]])·w for the n rows listed (u32 indices): a gather and the norm in
/// one pass. 8-wide only: d a multiple of 8, pointers 16-byte aligned.
#[allow(clippy::too_many_arguments)]
pub fn rms_fwd_rows(
    cx: &Ctx,
    (x, rows, w, y): (u64, u64, u64, u64),
    n: usize,
    d: usize,
    eps: f64,
) -> candle_core::Result<()> {
    if !cx.v8(&[x, w, y], d) {
        candle_core::bail!("rms_fwd_rows: rows of a multiple of 8, 16-byte aligned");
    }
    let name = cx.kernel("rms_norm_fwd_rows", true);
    let a = args![x, rows, w, y, d as i32, eps as f32];
    // SAFETY: x holds every listed row of d; rows n u32; y n × d; w d f32.
    unsafe { MODULE.launch(cx.dev, &name, rows_cfg(n), a) }
}

/// dx[rows[i]] += RMSNorm backward(x[rows[i]], g[i]) for the n rows listed (distinct): the
/// norm's backward and a scatter in one pass. As [`rms_fwd_rows`] on sizes.
#[allow(clippy::too_many_arguments)]
pub fn rms_bwd_acc_rows(
    cx: &Ctx,
    (x, rows, w, g, dx): (u64, u64, u64, u64, u64),
    n: usize,
    d: usize,
    eps: f64,
) -> candle_core::Result<()> {
    if !cx.v8(&[x, w, g, dx], d) {
        candle_core::bail!("rms_bwd_acc_rows: rows of a multiple of 8, 16-byte aligned");
    }
    let name = cx.kernel("rms_norm_bwd_acc_rows", true);
    let a = args![x, rows, w, g, dx, d as i32, eps as f32];
    // SAFETY: as rms_fwd_rows, g n × d, dx as x.
    unsafe { MODULE.launch(cx.dev, &name, rows_cfg(n), a) }
}

/// The autograd op's forward, with the frozen weight `w` (f32, on the device).
pub(super) fn forward(
    (x, l): (&CudaStorage, &Layout),
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let d = *l.dims().last().unwrap();
    let n = l.shape().elem_count();
    let (xp, bf16) = input_ptr(x, l, None, "rms norm")?;
    let wp = tensor_ptr(w, "norm weight", &[DType::F32])?;
    let cx = Ctx::scalar(&x.device, bf16);
    let (out, yp) = cx.fresh(n)?;
    rms_fwd(&cx, (xp, wp, yp), n / d, d, eps)?;
    Ok((out, l.shape().clone()))
}

/// The autograd op's backward: dx from x and the output gradient g.
pub(super) fn backward(
    x: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let l = x.1;
    let d = *l.dims().last().unwrap();
    let n = l.shape().elem_count();
    let (xp, bf16) = input_ptr(x.0, l, None, "rms norm backward")?;
    let gp = input_ptr_as(g.0, g.1, bf16, "rms norm backward")?;
    let wp = tensor_ptr(w, "norm weight", &[DType::F32])?;
    let cx = Ctx::scalar(&x.0.device, bf16);
    let (out, dxp) = cx.fresh(n)?;
    let name = cx.kernel("rms_norm_bwd", false);
    let a = args![xp, wp, gp, dxp, d as i32, eps as f32];
    // SAFETY: x, g and dx hold n elements in rows of d, w d f32.
    unsafe { MODULE.launch(cx.dev, &name, rows_cfg(n / d), a)? };
    Ok((out, l.shape().clone()))
}
