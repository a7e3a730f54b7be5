//! The linear layers' CUDA forms (kernels in linear.cu): the same products as the CPU code
//! through cuBLAS GEMMs that accumulate into one output (β = 1), the bias-initialised output
//! they accumulate into, and DoRA's output scaling and magnitude gradient for the fast path.

use candle_core::{CudaDevice, CudaStorage, Layout, Shape, Storage, Tensor};

use super::{AdaptedMatmul, FactorGrads, InputGrad, Second};
use crate::ops::cuda::{
    args, elems_cfg, gemm, gemm_out, grid, input_ptr_as, mat_of, mat_of_tensor, ptr_of, ptx_module,
    Ctx, Mat, Module,
};

const MODULE: Module = ptx_module!("linear");

type Arg<'a> = (&'a CudaStorage, &'a Layout);

fn same_type(what: &str, a: bool, b: bool) -> candle_core::Result<()> {
    if a != b {
        candle_core::bail!("{what}: operands of different types (bf16 and f32)");
    }
    Ok(())
}

/// A fresh (m, n) output on `dev` in the given type, holding the bias rows if there is one.
/// Returns the storage, its pointer and whether the bias was written (then accumulate).
pub fn linear_output(
    dev: &CudaDevice,
    bf16: bool,
    m: usize,
    n: usize,
    bias: Option<&Tensor>,
) -> candle_core::Result<(CudaStorage, u64, bool)> {
    let cx = Ctx::scalar(dev, bf16);
    let (y, yp) = cx.fresh(m * n)?;
    let Some(b) = bias else {
        return Ok((y, yp, false));
    };
    let b = b.contiguous()?;
    let (bs, bl) = b.storage_and_layout();
    let Storage::Cuda(bs) = &*bs else {
        candle_core::bail!("linear bias: expected a CUDA tensor")
    };
    let bp = input_ptr_as(bs, bl, bf16, "linear bias")?;
    let name = cx.kernel("bias_rows", false);
    // SAFETY: b holds n elements, y m × n.
    unsafe {
        MODULE.launch(
            dev,
            &name,
            elems_cfg(m * n),
            args![bp, yp, m as i64, n as i32],
        )?
    };
    Ok((y, yp, true))
}

/// y = x·diag(s) (+ b), x (m, n), s f32 (n); `b` 0 for none: DoRA's output scaling.
pub fn col_scale(
    cx: &Ctx,
    (x, s, b, y): (u64, u64, u64, u64),
    m: usize,
    n: usize,
) -> candle_core::Result<()> {
    let name = cx.kernel("col_scale", false);
    let a = args![x, s, b, y, m as i64, n as i32];
    // SAFETY: x and y hold m × n elements, s n f32 and b (when not null) n elements.
    unsafe { MODULE.launch(cx.dev, &name, elems_cfg(m * n), a) }
}

/// out[j] += w[j]·Σ_i a[i, j]·b[i, j] (out, w f32 (n)): DoRA's magnitude gradient.
pub fn col_dot(
    cx: &Ctx,
    (a, b, w, out): (u64, u64, u64, u64),
    m: usize,
    n: usize,
) -> candle_core::Result<()> {
    let rows_per = 64usize;
    let cfg = grid((n.div_ceil(256), m.div_ceil(rows_per)), 256);
    let name = cx.kernel("col_dot", false);
    let args = args![a, b, w, out, m as i64, n as i32, rows_per as i32];
    // SAFETY: a and b hold m × n elements, w and out n f32.
    unsafe { MODULE.launch(cx.dev, &name, cfg, args) }
}

/// y = x·W0ᵀ + b [+ c·(x·D)·Uᵀ].
pub(super) fn adapted_fwd(
    op: &AdaptedMatmul,
    x: Arg<'_>,
    factors: Option<(Arg<'_>, Arg<'_>)>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = &x.0.device;
    let (m, k) = x.1.shape().dims2()?;
    let (n, k2) = op.w0.dims2()?;
    if k != k2 {
        candle_core::bail!(
            "fused linear: x {:?} does not fit W0 {:?}",
            x.1.dims(),
            op.w0.dims()
        );
    }
    let (xm, bf16) = mat_of(x.0, x.1, "fused linear input")?;
    let (wm, wb) = mat_of_tensor(&op.w0, "fused linear weight")?;
    same_type("fused linear", bf16, wb)?;
    let cx = Ctx::scalar(dev, bf16);
    let (y, yp, had_bias) = linear_output(dev, bf16, m, n, op.bias.as_ref())?;
    let beta = if had_bias { 1.0 } else { 0.0 };
    // SAFETY: every pointer addresses a live buffer of the shape given; one stream.
    unsafe { gemm(&cx, (m, n, k), xm, wm.t(), yp, 1.0, beta)? };
    if let (Some((d, u)), true) = (factors, op.c != 0.0) {
        let r = d.1.dims()[1];
        if d.1.dims() != [k, r] || u.1.dims() != [n, r] {
            candle_core::bail!(
                "fused linear: D {:?}, U {:?} do not fit ({k}, r), ({n}, r)",
                d.1.dims(),
                u.1.dims()
            );
        }
        let (dm, db) = mat_of(d.0, d.1, "adapter factor D")?;
        let (um, ub) = mat_of(u.0, u.1, "adapter factor U")?;
        same_type("fused linear factor D", bf16, db)?;
        same_type("fused linear factor U", bf16, ub)?;
        let (h, hp) = cx.fresh(m * r)?;
        // SAFETY: as above; h lives until the end of this scope, after both launches.
        unsafe {
            gemm(&cx, (m, r, k), xm, dm, hp, 1.0, 0.0)?;
            gemm(
                &cx,
                (m, n, r),
                Mat::new(hp, r),
                um.t(),
                yp,
                op.c as f32,
                1.0,
            )?;
        }
        drop(h);
    }
    Ok((y, Shape::from((m, n))))
}

/// dx = g·W0 + c·g_U·Dᵀ, g_U given or formed from U.
pub(super) fn input_grad(
    InputGrad { op, second }: &InputGrad,
    g: Arg<'_>,
    s: Arg<'_>,
    d: Arg<'_>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = &g.0.device;
    let (m, n) = g.1.shape().dims2()?;
    let (n2, k) = op.w0.dims2()?;
    let r = s.1.dims()[1];
    let s_rows = if *second == Second::U { n } else { m };
    if n != n2 || d.1.dims() != [k, r] || s.1.dims() != [s_rows, r] {
        candle_core::bail!(
            "fused linear backward: g {:?}, W0 {:?}, D {:?}, second operand {:?} do not fit",
            g.1.dims(),
            op.w0.dims(),
            d.1.dims(),
            s.1.dims()
        );
    }
    let (gm, bf16) = mat_of(g.0, g.1, "fused linear gradient")?;
    let (wm, wb) = mat_of_tensor(&op.w0, "fused linear weight")?;
    let (sm, sb) = mat_of(s.0, s.1, "fused linear g·U or U")?;
    let (dm, db) = mat_of(d.0, d.1, "adapter factor D")?;
    same_type("fused linear backward", bf16, wb)?;
    same_type("fused linear backward", bf16, sb)?;
    same_type("fused linear backward", bf16, db)?;
    let cx = Ctx::scalar(dev, bf16);
    let (dx, dxp, _) = linear_output(dev, bf16, m, k, None)?;
    // SAFETY: as above; g·U's buffer lives until the end of this scope, after the launches.
    unsafe {
        gemm(&cx, (m, k, n), gm, wm, dxp, 1.0, 0.0)?;
        if op.c != 0.0 {
            let formed = match second {
                Second::GU => None,
                Second::U => {
                    let (gu, gup) = cx.fresh(m * r)?;
                    gemm(&cx, (m, r, n), gm, sm, gup, 1.0, 0.0)?;
                    Some((gu, gup))
                }
            };
            let gum = formed.as_ref().map_or(sm, |(_, p)| Mat::new(*p, r));
            gemm(&cx, (m, k, r), gum, dm.t(), dxp, op.c as f32, 1.0)?;
        }
    }
    Ok((dx, Shape::from((m, k))))
}

/// The adapter factors' gradients into one zero-initialised f32 buffer ([`FactorGrads`]).
pub(super) fn factor_grads(
    op: &FactorGrads,
    x: Arg<'_>,
    g: Arg<'_>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = &x.0.device;
    let (m, k, n, r) = op.dims(x.1, g.1)?;
    let (xm, bf16) = mat_of(x.0, x.1, "adapter gradients: input")?;
    let (gm, gb) = mat_of(g.0, g.1, "adapter gradients: output gradient")?;
    let (dm, db) = mat_of_tensor(&op.d, "adapter factor D")?;
    let (um, ub) = mat_of_tensor(&op.u, "adapter factor U")?;
    same_type("adapter gradients", bf16, gb)?;
    same_type("adapter gradients", bf16, db)?;
    same_type("adapter gradients", bf16, ub)?;
    let cx = Ctx::scalar(dev, bf16);
    let out = CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<f32>(op.len)?, dev.clone());
    let outp = ptr_of(&out)?;
    let (gu, gup) = cx.fresh(m * r)?;
    let (h, hp) = cx.fresh(m * r)?;
    let c = op.c as f32;
    // SAFETY: every pointer addresses a live buffer of the shape given (`dims` checked that
    // each slot lies in `out`); g·U and x·D live until the end of this scope, after the
    // launches; one stream.
    unsafe {
        gemm(&cx, (m, r, n), gm, um, gup, 1.0, 0.0)?;
        gemm(&cx, (m, r, k), xm, dm, hp, 1.0, 0.0)?;
        let factors = [
            (op.slots[0], k, xm, Mat::new(gup, r)),
            (op.slots[1], n, gm, Mat::new(hp, r)),
        ];
        for (slot, rows, act, small) in factors {
            let dst = outp + 4 * slot.offset as u64;
            if slot.transposed {
                gemm_out(&cx, false, (r, rows, m), small.t(), act, dst, c, 1.0)?;
            } else {
                gemm_out(&cx, false, (rows, r, m), act.t(), small, dst, c, 1.0)?;
            }
        }
    }
    drop((gu, h));
    Ok((out, Shape::from(op.len)))
}
