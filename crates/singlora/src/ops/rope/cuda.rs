//! The head split with RoPE's launchers (kernels in rope.cu): on pointers, for the attention
//! block and the fast path (also with a projection's low-rank term, see `ops/low_rank`), on the
//! autograd op's storages, and the low-rank kernel's tensor entry for the device check.

use candle_core::{CudaStorage, DType, Layout, Shape, Tensor};

use crate::ops::cuda::{
    args, bf16_ptr, elems_cfg, grid, input_ptr, mat_of_tensor, ptx_module, tensor_ptr, Ctx, Module,
};
use crate::ops::low_rank::{entry_ctx, kernel_terms, launch_lr, term, LowRank, Term, LR_ROWS};

const MODULE: Module = ptx_module!("rope");

/// (b, t, heads, head size).
pub type Dims = (usize, usize, usize, usize);

/// The head split of src (b, t, n·hd) into dst (b, n, t, hd), each head's halves rotated by
/// the position's angles when `rotate` (tables cos, sin: f32 (t, hd)); `inverse`: the
/// transpose of that map (the backward), from (b, n, t, hd) to (b, t, n·hd).
#[allow(clippy::too_many_arguments)]
pub fn rope_split(
    cx: &Ctx,
    (src, dst): (u64, u64),
    (cos, sin): (u64, u64),
    (b, t, n, hd): Dims,
    rotate: bool,
    inverse: bool,
) -> candle_core::Result<()> {
    let vec = cx.v8(&[src, dst, cos, sin], hd / 2);
    let cfg = if vec {
        // a block per token row, a thread per 8 of each head's half
        let per_row = (n * hd / 16).div_ceil(32) * 32;
        grid((b * t, 1), per_row.min(1024) as u32)
    } else {
        elems_cfg(b * t * n * hd / 2)
    };
    let (rotate, inverse) = (i32::from(rotate), i32::from(inverse));
    let sizes = [b, t, n, hd].map(|v| v as i32);
    let a = args![src, dst, cos, sin, sizes[0], sizes[1], sizes[2], sizes[3], rotate, inverse];
    // SAFETY: src and dst hold b·t·n·hd elements, the tables (t, hd) f32.
    unsafe { MODULE.launch(cx.dev, &cx.kernel("rope_split", vec), cfg, a) }
}

/// [`rope_split`] forward with the projection's term added to src on the way in (`rotate`
/// false: the split alone, for v). hd a multiple of 64 (a warp takes 32 columns of each half
/// of a head).
pub fn rope_split_lr(
    cx: &Ctx,
    (src, dst): (u64, u64),
    (cos, sin): (u64, u64),
    (b, t, n, hd): Dims,
    rotate: bool,
    lr: &LowRank,
) -> candle_core::Result<()> {
    let terms = kernel_terms(
        cx,
        "rope_split_lr",
        [Some(lr)],
        &[src, dst, cos, sin],
        n * hd,
    )?;
    if hd % 64 != 0 {
        candle_core::bail!("rope_split_lr: head size {hd} is not a multiple of 64");
    }
    let warps = n * hd / 64;
    let cfg = grid((warps.div_ceil(4), (b * t).div_ceil(LR_ROWS)), 128);
    let sizes = [b, t, n, hd, usize::from(rotate)].map(|v| v as i32);
    let lead = args![src, dst, cos, sin, sizes[0], sizes[1], sizes[2], sizes[3], sizes[4]];
    // SAFETY: src and dst of b·t·n·hd, the tables (t, hd) f32, the term as checked.
    unsafe { launch_lr(cx, &MODULE, "rope_split_lr", terms, (lead, &[]), cfg) }
}

/// The autograd op's forward (and, `inverse`, its backward): the output in (b, n, t, hd), or
/// (b, t, n·hd) for the inverse.
pub(super) fn forward(
    (src, l): (&CudaStorage, &Layout),
    (cos, sin): (&Tensor, &Tensor),
    (b, t, n, hd): Dims,
    rotate: bool,
    inverse: bool,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let total = b * t * n * hd;
    if l.shape().elem_count() != total || hd % 2 != 0 {
        candle_core::bail!(
            "rope split: {:?} is not (b, t, n, hd) = ({b}, {t}, {n}, {hd})",
            l.dims()
        );
    }
    let out_shape = if inverse {
        Shape::from((b, t, n * hd))
    } else {
        Shape::from((b, n, t, hd))
    };
    let (xp, bf16) = input_ptr(src, l, None, "rope split")?;
    let tables = (
        tensor_ptr(cos, "rope cos", &[DType::F32])?,
        tensor_ptr(sin, "rope sin", &[DType::F32])?,
    );
    let cx = Ctx::scalar(&src.device, bf16);
    let (out, op) = cx.fresh(total)?;
    rope_split(&cx, (xp, op), tables, (b, t, n, hd), rotate, inverse)?;
    Ok((out, out_shape))
}

/// RoPE and the head split of x (b, t, n·hd, bf16) with the term added to x first (`rotate`
/// false: the split alone), through the low-rank epilogue kernel: (b, n, t, hd). cos and sin
/// (t, hd), as [`super::rope_split`] takes them.
pub fn rope_low_rank(
    x: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    n: usize,
    rotate: bool,
    t_: Term,
) -> candle_core::Result<Tensor> {
    let (b, t, w) = x.dims3()?;
    let hd = w / n;
    let y = x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?;
    let (xp, dev) = bf16_ptr(x, "x")?;
    let lr = term(&t_, w)?;
    let cs = cos.to_dtype(DType::F32)?.contiguous()?;
    let sn = sin.to_dtype(DType::F32)?.contiguous()?;
    rope_split_lr(
        &entry_ctx(&dev),
        (xp, bf16_ptr(&y, "y")?.0),
        (
            mat_of_tensor(&cs, "cos")?.0.ptr,
            mat_of_tensor(&sn, "sin")?.0.ptr,
        ),
        (b, t, n, hd),
        rotate,
        &lr,
    )?;
    Ok(y)
}
