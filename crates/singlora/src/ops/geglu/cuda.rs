//! GEGLU's launchers (kernels in geglu.cu).

use candle_core::{CudaStorage, Layout, Shape};

use crate::ops::cuda::{args, elems_cfg, input_ptr, input_ptr_as, ptx_module, v8_cfg, Ctx, Module};
use crate::ops::FastPath;

const MODULE: Module = ptx_module!("geglu");

/// Rows and half-width of h's layout.
fn rows(l: &Layout) -> candle_core::Result<(usize, usize)> {
    let dims = l.shape().dims();
    let two_n = *dims.last().unwrap_or(&0);
    if two_n == 0 || two_n % 2 != 0 {
        candle_core::bail!("geglu: last axis {two_n} is not two halves");
    }
    Ok((l.shape().elem_count() / two_n, two_n / 2))
}

/// The 8-wide kernels' arguments where they apply: halves of whole groups of 8, 16-byte
/// aligned pointers, group counts within 32 bits; the context's choice of vectorised kernels.
fn v8_groups(cx: &Ctx, ptrs: &[u64], m: usize, n: usize) -> Option<(i32, i32)> {
    let total = i32::try_from(m * n / 8).ok()?;
    (cx.v8(ptrs, n) && n > 0).then_some((total, (n / 8) as i32))
}

pub(super) fn forward(
    (h, l): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (m, n) = rows(l)?;
    let (hp, bf16) = input_ptr(h, l, None, "geglu input")?;
    let cx = Ctx::new(&h.device, bf16, FastPath::default());
    let (out, yp) = cx.fresh(m * n)?;
    // SAFETY: h holds m·2n elements, y m·n, of the context's type; the 8-wide kernel's
    // accesses are 16-byte aligned (checked).
    unsafe {
        match v8_groups(&cx, &[hp, yp], m, n) {
            Some((total, n8)) => MODULE.launch(
                cx.dev,
                &cx.kernel("geglu_fwd", true),
                v8_cfg(m * n),
                args![hp, yp, total, n8],
            )?,
            None => MODULE.launch(
                cx.dev,
                &cx.kernel("geglu_fwd", false),
                elems_cfg(m * n),
                args![hp, yp, m as i64, n as i64],
            )?,
        }
    };
    let mut dims = l.shape().dims().to_vec();
    *dims.last_mut().unwrap() = n;
    Ok((out, Shape::from(dims)))
}

pub(super) fn backward(
    (h, l): (&CudaStorage, &Layout),
    (dy, ldy): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (m, n) = rows(l)?;
    let (hp, bf16) = input_ptr(h, l, None, "geglu backward input")?;
    let dyp = input_ptr_as(dy, ldy, bf16, "geglu backward gradient")?;
    if ldy.shape().elem_count() != m * n {
        candle_core::bail!(
            "geglu backward: gradient of {:?} for {:?}",
            ldy.shape(),
            l.shape()
        );
    }
    let cx = Ctx::new(&h.device, bf16, FastPath::default());
    let (out, dhp) = cx.fresh(2 * m * n)?;
    // SAFETY: h and dh hold m·2n elements, dy m·n, of the context's type; the 8-wide
    // kernel's accesses are 16-byte aligned (checked).
    unsafe {
        match v8_groups(&cx, &[hp, dyp, dhp], m, n) {
            Some((total, n8)) => MODULE.launch(
                cx.dev,
                &cx.kernel("geglu_bwd", true),
                v8_cfg(m * n),
                args![hp, dyp, dhp, total, n8],
            )?,
            None => MODULE.launch(
                cx.dev,
                &cx.kernel("geglu_bwd", false),
                elems_cfg(m * n),
                args![hp, dyp, dhp, m as i64, n as i64],
            )?,
        }
    };
    Ok((out, l.shape().clone()))
}
