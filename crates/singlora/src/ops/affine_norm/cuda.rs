//! The affine norm's launchers (kernels in affine_norm.cu): a block per row, or per chunk of a
//! row where the rows are too few to fill the GPU (GroupNorm of a few images).

use candle_core::{CudaStorage, DType, Layout, Shape};

use super::AffineNorm;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig};

use crate::ops::cuda::{
    args, input_ptr, input_ptr_as, ptx_module, rows_cfg, slice_ptr, tensor_ptr, Arg, Ctx, Module,
    THREADS,
};

const MODULE: Module = ptx_module!("affine_norm");

/// Blocks the split kernels aim for: about 8 an SM.
const SPLIT_BLOCKS: usize = 8 * 132;

/// Rows shorter than this take a block each.
const SPLIT_MIN_ROW: usize = 4096;

/// A chunk holds at least this many elements.
const MIN_CHUNK: usize = 1024;

/// Elements a chunk and chunks a row for `rows` rows of `n`, or None where a block per row
/// keeps the GPU busy (or the rows are short).
fn split(rows: usize, n: usize) -> Option<(usize, usize)> {
    if n < SPLIT_MIN_ROW || rows >= SPLIT_BLOCKS / 2 {
        return None;
    }
    let want = SPLIT_BLOCKS.div_ceil(rows).min(n / MIN_CHUNK).max(1);
    let chunk = n.div_ceil(want);
    Some((chunk, n.div_ceil(chunk)))
}

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
    let rows = rows_of(op, count)?;
    let mut a = affine_args(x, op)?;
    a.extend(ptrs.iter().map(|&p| Arg::from(p)));
    a.extend_from_slice(args![op.n as i32]);
    a.extend(shape_args(op));
    let name = cx.kernel(kernel, false);
    // SAFETY: x and every pointer in ptrs hold `count` elements of the context's type, in rows
    // of n; w and b one f32 per channel (groups · cpr).
    unsafe { MODULE.launch(cx.dev, &name, rows_cfg(rows), &a) }
}

fn rows_of(op: &AffineNorm, count: usize) -> candle_core::Result<usize> {
    if op.n == 0 || count % op.n != 0 {
        candle_core::bail!("affine norm: {count} elements in rows of {}", op.n);
    }
    Ok(count / op.n)
}

/// The input, the weight and the bias.
fn affine_args(x: u64, op: &AffineNorm) -> candle_core::Result<Vec<Arg>> {
    Ok(vec![
        Arg::from(x),
        Arg::from(tensor_ptr(&op.w, "norm weight", &[DType::F32])?),
        Arg::from(tensor_ptr(&op.b, "norm bias", &[DType::F32])?),
    ])
}

/// groups, channels a row, elements a channel, eps and the SiLU flag.
fn shape_args(op: &AffineNorm) -> Vec<Arg> {
    args![
        op.groups as i32,
        op.cpr as i32,
        op.hw as i32,
        op.eps as f32,
        i32::from(op.silu)
    ]
    .to_vec()
}

/// The split kernels' statistics of x: each chunk's mean and M2, (rows × chunks) f32 pairs.
fn chunk_stats(
    cx: &Ctx,
    x: u64,
    (rows, n): (usize, usize),
    (chunk, chunks): (usize, usize),
) -> candle_core::Result<CudaSlice<f32>> {
    let part = cx.dev.alloc_zeros::<f32>(2 * rows * chunks)?;
    let a = args![x, slice_ptr(&part), n as i32, chunk as i32];
    // SAFETY: x holds rows·n elements of the context's type; part rows·chunks f32 pairs.
    unsafe {
        MODULE.launch(
            cx.dev,
            &cx.kernel("norm_chunk_stats", false),
            split_cfg(rows, chunks),
            a,
        )?
    };
    Ok(part)
}

fn split_cfg(rows: usize, chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (chunks as u32, rows as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
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
    let rows = rows_of(op, count)?;
    let Some((chunk, chunks)) = split(rows, op.n) else {
        launch(&cx, "affine_norm_fwd", xp, &[yp], op, count)?;
        return Ok((out, l.shape().clone()));
    };
    let part = chunk_stats(&cx, xp, (rows, op.n), (chunk, chunks))?;
    let mut a = affine_args(xp, op)?;
    a.extend_from_slice(args![slice_ptr(&part), yp, op.n as i32, chunk as i32]);
    a.extend(shape_args(op));
    // SAFETY: x and y hold rows·n elements of the context's type, part the chunks' statistics
    // (rows·chunks f32 pairs), w and b one f32 per channel.
    unsafe {
        MODULE.launch(
            cx.dev,
            &cx.kernel("affine_norm_fwd_split", false),
            split_cfg(rows, chunks),
            &a,
        )?
    };
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
    let rows = rows_of(op, count)?;
    let Some((chunk, chunks)) = split(rows, op.n) else {
        launch(&cx, "affine_norm_bwd", xp, &[gp, dxp], op, count)?;
        return Ok((out, l.shape().clone()));
    };
    let part = chunk_stats(&cx, xp, (rows, op.n), (chunk, chunks))?;
    let sums = cx.dev.alloc_zeros::<f32>(2 * rows * chunks)?;
    let (pp, sp) = (slice_ptr(&part), slice_ptr(&sums));
    for (kernel, out) in [
        ("affine_norm_bwd_sums", None),
        ("affine_norm_bwd_split", Some(dxp)),
    ] {
        let mut a = affine_args(xp, op)?;
        a.extend_from_slice(args![gp, pp, sp]);
        a.extend(out.map(Arg::from));
        a.extend_from_slice(args![op.n as i32, chunk as i32]);
        a.extend(shape_args(op));
        // SAFETY: x, g and dx hold rows·n elements of the context's type, part and sums
        // rows·chunks f32 pairs (the sums written by the first kernel, read by the second),
        // w and b one f32 per channel.
        unsafe {
            MODULE.launch(
                cx.dev,
                &cx.kernel(kernel, false),
                split_cfg(rows, chunks),
                &a,
            )?
        };
    }
    Ok((out, l.shape().clone()))
}
