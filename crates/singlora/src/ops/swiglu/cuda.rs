//! SwiGLU's launchers (kernels in swiglu.cu): on pointers, for the fast path (also with the
//! gate's, up's and the output gradient's low-rank terms, see `ops/low_rank`), on the autograd
//! op's storages, and the low-rank kernels' tensor entries for the device check.

use candle_core::{CudaStorage, DType, Layout, Shape, Tensor};

use crate::ops::cuda::{
    args, bf16_ptr, elems_or_v8_cfg, input_ptr, input_ptr_as, ptx_module, Ctx, Module,
};
use crate::ops::low_rank::{entry_ctx, kernel_terms, launch_lr, lr_cfg, term, LowRank, Term};

const MODULE: Module = ptx_module!("swiglu");

/// y = silu(g)·u over n elements.
pub fn swiglu_fwd(cx: &Ctx, (g, u, y): (u64, u64, u64), n: usize) -> candle_core::Result<()> {
    let vec = cx.v8(&[g, u, y], n);
    let name = cx.kernel("swiglu_fwd", vec);
    // SAFETY: g, u and y hold n elements.
    unsafe {
        MODULE.launch(
            cx.dev,
            &name,
            elems_or_v8_cfg(n, vec),
            args![g, u, y, n as i64],
        )
    }
}

/// Its backward over n elements: out[0..n) = dg, out[n..2n) = du.
pub fn swiglu_bwd(
    cx: &Ctx,
    (g, u, dy, out): (u64, u64, u64, u64),
    n: usize,
) -> candle_core::Result<()> {
    let vec = cx.v8(&[g, u, dy, out, out + cx.elem() * n as u64], n);
    let name = cx.kernel("swiglu_bwd", vec);
    let a = args![g, u, dy, out, n as i64];
    // SAFETY: g, u and dy hold n elements, out 2n.
    unsafe { MODULE.launch(cx.dev, &name, elems_or_v8_cfg(n, vec), a) }
}

/// y = silu(g')·u' over m × n, g' = g + (its term) and u' likewise; with `writeback`, g' and
/// u' written over g and u. At least one term; both of one rank.
pub fn swiglu_fwd_lr(
    cx: &Ctx,
    (g, u, y): (u64, u64, u64),
    (m, n): (usize, usize),
    (lg, lu): (Option<&LowRank>, Option<&LowRank>),
    writeback: bool,
) -> candle_core::Result<()> {
    let terms = kernel_terms(cx, "swiglu_fwd_lr", [lg, lu], &[g, u, y], n)?;
    let lead = args![g, u, y, m as i64, n as i32];
    let tail = args![i32::from(writeback)];
    // SAFETY: g, u and y hold m × n elements, the terms (a null h: none) as checked.
    unsafe {
        launch_lr(
            cx,
            &MODULE,
            "swiglu_fwd_lr",
            terms,
            (lead, tail),
            lr_cfg(m, n),
        )
    }
}

/// SwiGLU's backward over m × n into out (2·m·n: dg, then du) with terms on g and u (as
/// [`swiglu_fwd_lr`] without writeback) and on dy. At least one term; all of one rank.
pub fn swiglu_bwd_lr(
    cx: &Ctx,
    (g, u, dy, out): (u64, u64, u64, u64),
    (m, n): (usize, usize),
    terms: [Option<&LowRank>; 3],
) -> candle_core::Result<()> {
    let ptrs = [g, u, dy, out, out + (2 * m * n) as u64];
    let terms = kernel_terms(cx, "swiglu_bwd_lr", terms, &ptrs, n)?;
    let lead = args![g, u, dy, out, m as i64, n as i32];
    // SAFETY: g, u and dy hold m × n elements, out 2·m·n, the terms as checked.
    unsafe {
        launch_lr(
            cx,
            &MODULE,
            "swiglu_bwd_lr",
            terms,
            (lead, &[]),
            lr_cfg(m, n),
        )
    }
}

/// The autograd op's forward.
pub(super) fn forward(
    g: (&CudaStorage, &Layout),
    u: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let n = g.1.shape().elem_count();
    let (gp, bf16) = input_ptr(g.0, g.1, None, "swiglu")?;
    let up = input_ptr_as(u.0, u.1, bf16, "swiglu")?;
    let cx = Ctx::scalar(&g.0.device, bf16);
    let (y, yp) = cx.fresh(n)?;
    swiglu_fwd(&cx, (gp, up, yp), n)?;
    Ok((y, g.1.shape().clone()))
}

/// The autograd op's backward: (dg, du) stacked into one (2, …) buffer.
pub(super) fn backward(
    g: (&CudaStorage, &Layout),
    u: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let n = g.1.shape().elem_count();
    let mut dims = vec![2];
    dims.extend_from_slice(g.1.dims());
    let (gp, bf16) = input_ptr(g.0, g.1, None, "swiglu backward")?;
    let up = input_ptr_as(u.0, u.1, bf16, "swiglu backward")?;
    let dyp = input_ptr_as(dy.0, dy.1, bf16, "swiglu backward")?;
    let cx = Ctx::scalar(&g.0.device, bf16);
    let (out, op) = cx.fresh(2 * n)?;
    swiglu_bwd(&cx, (gp, up, dyp, op), n)?;
    Ok((out, Shape::from(dims)))
}

/// (silu(g')·u', g', u') with g' = g + c_g·h_g·U_gᵀ and u' likewise (bf16, m × n), through
/// the SwiGLU low-rank epilogue kernel (which, with `writeback`, writes g' and u' over copies
/// of g and u; without, the copies come back unchanged).
pub fn swiglu_low_rank(
    g: &Tensor,
    u: &Tensor,
    (tg, tu): (Option<Term>, Option<Term>),
    writeback: bool,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (m, n) = g.dims2()?;
    let (g, u) = (g.copy()?, u.copy()?);
    let y = g.zeros_like()?;
    let (gp, dev) = bf16_ptr(&g, "g")?;
    let lg = tg.map(|t| term(&t, n)).transpose()?;
    let lu = tu.map(|t| term(&t, n)).transpose()?;
    swiglu_fwd_lr(
        &entry_ctx(&dev),
        (gp, bf16_ptr(&u, "u")?.0, bf16_ptr(&y, "y")?.0),
        (m, n),
        (lg.as_ref(), lu.as_ref()),
        writeback,
    )?;
    Ok((y, g, u))
}

/// SwiGLU's backward (dg, du) at g' = g + (g's term), u' likewise, for the output gradient
/// dy' = dy + (dy's term) (bf16, m × n), through the backward's low-rank epilogue kernel.
pub fn swiglu_bwd_low_rank(
    (g, u, dy): (&Tensor, &Tensor, &Tensor),
    [tg, tu, td]: [Option<Term>; 3],
) -> candle_core::Result<(Tensor, Tensor)> {
    let (m, n) = g.dims2()?;
    let out = Tensor::zeros((2, m, n), DType::BF16, g.device())?;
    let (gp, dev) = bf16_ptr(g, "g")?;
    let terms = [
        tg.map(|t| term(&t, n)).transpose()?,
        tu.map(|t| term(&t, n)).transpose()?,
        td.map(|t| term(&t, n)).transpose()?,
    ];
    let ptrs = (
        gp,
        bf16_ptr(u, "u")?.0,
        bf16_ptr(dy, "dy")?.0,
        bf16_ptr(&out, "out")?.0,
    );
    let terms = [terms[0].as_ref(), terms[1].as_ref(), terms[2].as_ref()];
    swiglu_bwd_lr(&entry_ctx(&dev), ptrs, (m, n), terms)?;
    Ok((out.get(0)?, out.get(1)?))
}
