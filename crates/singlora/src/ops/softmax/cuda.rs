//! The masked softmax's launchers (kernels in softmax.cu): on pointers, for the attention's
//! scores, and on the autograd op's storages.

use candle_core::{CudaStorage, Layout, Shape};

use crate::ops::cuda::{
    args, input_ptr, input_ptr_as, ptx_module, rows_cfg, slice_ptr, upload_lens, warp_rows_cfg,
    Ctx, Module, WARP_ROW_MAX,
};

const MODULE: Module = ptx_module!("softmax");

/// P = masked softmax(scale·S) over rows of `tk` keys (s → p): `rows` = b·h·tq rows of
/// (b, h, tq, tk) scores, `lens` the device key lengths (b u32).
#[allow(clippy::too_many_arguments)]
pub fn softmax_fwd(
    cx: &Ctx,
    (s, p): (u64, u64),
    lens: u64,
    (rows, h, tq, tk): (usize, usize, usize, usize),
    scale: f64,
    causal: bool,
) -> candle_core::Result<()> {
    let (h, tq, tk32, scale, causal) = (
        h as i32,
        tq as i32,
        tk as i32,
        scale as f32,
        i32::from(causal),
    );
    // SAFETY (both launches): s and p hold `rows` rows of tk elements, lens b u32.
    unsafe {
        if tk > 32 * WARP_ROW_MAX {
            let name = cx.kernel("masked_softmax_fwd", false);
            let a = args![s, p, lens, h, tq, tk32, scale, causal];
            return MODULE.launch(cx.dev, &name, rows_cfg(rows), a);
        }
        let name = cx.kernel("masked_softmax_fwd_warp", cx.v8(&[s, p], tk));
        let a = args![s, p, lens, rows as i64, h, tq, tk32, scale, causal];
        MODULE.launch(cx.dev, &name, warp_rows_cfg(rows), a)
    }
}

/// Its backward: dS = scale·P ⊙ (dP − Σ P⊙dP) over rows of `tk` (p, dp → ds); ds may be dp
/// (each row is read whole before it is written).
pub fn softmax_bwd(
    cx: &Ctx,
    (p, dp, ds): (u64, u64, u64),
    (rows, tk): (usize, usize),
    scale: f64,
) -> candle_core::Result<()> {
    let scale = scale as f32;
    // SAFETY (both): p, dp and ds hold `rows` rows of tk elements.
    unsafe {
        if tk > 32 * WARP_ROW_MAX {
            let name = cx.kernel("masked_softmax_bwd", false);
            let a = args![p, dp, ds, tk as i32, scale];
            return MODULE.launch(cx.dev, &name, rows_cfg(rows), a);
        }
        let name = cx.kernel("masked_softmax_bwd_warp", cx.v8(&[p, dp, ds], tk));
        let a = args![p, dp, ds, rows as i64, tk as i32, scale];
        MODULE.launch(cx.dev, &name, warp_rows_cfg(rows), a)
    }
}

/// The autograd op's forward on scores (b, h, tq, tk).
pub(super) fn forward(
    (s, l): (&CudaStorage, &Layout),
    key_lens: &[usize],
    causal: bool,
    scale: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (b, h, tq, tk) = l.shape().dims4()?;
    if key_lens.len() != b {
        candle_core::bail!(
            "masked softmax: {} key lengths for a batch of {b}",
            key_lens.len()
        );
    }
    let (sp, bf16) = input_ptr(s, l, None, "masked softmax")?;
    let cx = Ctx::scalar(&s.device, bf16);
    let lens = upload_lens(cx.dev, key_lens)?;
    let (out, op) = cx.fresh(l.shape().elem_count())?;
    let dims = (b * h * tq, h, tq, tk);
    softmax_fwd(&cx, (sp, op), slice_ptr(&lens), dims, scale, causal)?;
    Ok((out, l.shape().clone()))
}

/// The autograd op's backward from P and dP.
pub(super) fn backward(
    p: (&CudaStorage, &Layout),
    dp: (&CudaStorage, &Layout),
    scale: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let l = p.1;
    let tk = *l.dims().last().unwrap();
    let n = l.shape().elem_count();
    let (pp, bf16) = input_ptr(p.0, l, None, "softmax backward")?;
    let dpp = input_ptr_as(dp.0, dp.1, bf16, "softmax backward")?;
    let cx = Ctx::scalar(&p.0.device, bf16);
    let (out, op) = cx.fresh(n)?;
    softmax_bwd(&cx, (pp, dpp, op), (n / tk, tk), scale)?;
    Ok((out, l.shape().clone()))
}
