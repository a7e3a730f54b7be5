//! The convolution's launchers (im2col and the kernel flip in conv.cu) and its GEMM.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{CudaStorage, Layout, Shape};

use super::cudnn::{self, ConvShape};
use crate::ops::cuda::{
    args, elems_cfg, gemm_batched, grid, input_ptr, input_ptr_as, ptx_module, Ctx, Mat, Module,
    STATIC_SMEM_BYTES,
};

const MODULE: Module = ptx_module!("conv");

/// Threads a block along a column row's pixels.
const THREADS: u32 = 256;

/// At most this many blocks (the grid-stride loop does the rest): 8 resident blocks of 256
/// threads on each of 132 SMs, a few times over. Blocks of one element a thread each, one per
/// col row, made the launching of blocks the kernel's cost at the U-Net's sizes.
const MAX_BLOCKS: usize = 4096;

/// The shared memory an im2col block asks for at most: one padded input plane (130 × 130 bf16
/// for SDXL's 128 × 128 latents), within what a block has without opting in. Larger planes
/// take the kernels that read through the cache.
const PLANE_SMEM_BYTES: usize = STATIC_SMEM_BYTES as usize;

/// y (b, c_out, h_out, w_out) = W ⋆ x for contiguous x (b, c_in, h, w) and W (c_out, c_in, k, k)
/// of one type (bf16 or f32).
pub(super) fn forward(
    (x, lx): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    padding: usize,
    stride: usize,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (b, c, h, wd) = lx.shape().dims4()?;
    let (co, ci, k, k2) = lw.shape().dims4()?;
    if ci != c || k != k2 || stride == 0 {
        candle_core::bail!(
            "conv2d: input {:?} and kernel {:?} (stride {stride})",
            lx.shape().dims(),
            lw.shape().dims()
        );
    }
    if h + 2 * padding < k || wd + 2 * padding < k {
        candle_core::bail!("conv2d: a {k}×{k} kernel is larger than the padded {h}×{wd} input");
    }
    let (ho, wo) = (
        (h + 2 * padding - k) / stride + 1,
        (wd + 2 * padding - k) / stride + 1,
    );
    let (xp, bf16) = input_ptr(x, lx, Some(b * c * h * wd), "conv2d input")?;
    let wp = input_ptr_as(w, lw, bf16, "conv2d kernel")?;
    let cx = Ctx::scalar(&x.device, bf16);
    let (m, kk) = (ho * wo, c * k * k);
    let (out, yp) = cx.fresh(b * co * m)?;
    // the GEMM's right operand: each image's input as it is (1×1, stride 1, no padding), or its
    // im2col matrix
    let col = if k == 1 && stride == 1 && padding == 0 {
        None
    } else {
        let rows = b * kk;
        let (s, colp) = cx.fresh(rows * m)?;
        let planes = b * c;
        let elem = if bf16 { 2 } else { 4 };
        let plane_bytes = (h + 2 * padding) * (wd + 2 * padding) * elem;
        // the col matrix's rows are whole groups of 8 and 16-byte aligned
        let rows_v8 = bf16 && wo % 8 == 0 && colp % 16 == 0;
        let a = args![
            xp,
            colp,
            c as i32,
            h as i32,
            wd as i32,
            k as i32,
            stride as i32,
            padding as i32,
            ho as i32,
            wo as i32,
            rows as i32
        ];
        let (kernel, cfg) = if plane_bytes <= PLANE_SMEM_BYTES {
            let cfg = LaunchConfig {
                grid_dim: (planes.clamp(1, MAX_BLOCKS) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: plane_bytes as u32,
            };
            match rows_v8 {
                true => ("im2col_plane_v8_bf16".to_string(), cfg),
                false => (cx.kernel("im2col_plane", false), cfg),
            }
        } else {
            // a thread writes 8 neighbours at once where it can (bf16, stride 1, output rows
            // of whole groups of 8, sizes its 32-bit indices hold)
            let v8 = rows_v8
                && stride == 1
                && rows * m / 8 < i32::MAX as usize
                && h * wd < i32::MAX as usize;
            let per_thread = if v8 { 8 } else { 1 };
            let blocks = (rows * m / per_thread)
                .div_ceil(THREADS as usize)
                .clamp(1, MAX_BLOCKS);
            let kernel = match v8 {
                true => "im2col_s1_v8_bf16".to_string(),
                false => cx.kernel("im2col", false),
            };
            (kernel, grid((blocks, 1), THREADS))
        };
        // SAFETY: x holds b·c·h·w elements, col b·c·k·k·ho·wo, both of the context's type; a
        // plane kernel's block gets the shared memory of one padded plane; the 8-wide kernels
        // are bf16 and their 16-byte stores aligned (col's start and its rows of m = ho·wo, a
        // multiple of 8, elements).
        unsafe { MODULE.launch(cx.dev, &kernel, cfg, a)? };
        Some((s, colp))
    };
    let colp = col.as_ref().map_or(xp, |c| c.1);
    // SAFETY: W (co × kk, shared by the batch: stride 0), col_i (kk × m), y_i (co × m), all of
    // the context's type, on its stream; col is freed in stream order after the GEMM.
    unsafe {
        gemm_batched(
            &cx,
            (co, m, kk),
            (Mat::new(wp, kk), 0),
            (Mat::new(colp, m), kk * m),
            (yp, co * m),
            b,
            1.0,
        )?
    };
    drop(col);
    Ok((out, Shape::from((b, co, ho, wo))))
}

/// W (co, ci, k, k) → (ci, co, k, k) with the taps reversed along both axes, in one pass.
pub(super) fn flip((w, l): (&CudaStorage, &Layout)) -> candle_core::Result<(CudaStorage, Shape)> {
    let (co, ci, k, k2) = l.shape().dims4()?;
    if k != k2 {
        candle_core::bail!("conv kernel flip: a {k}×{k2} kernel is not square");
    }
    let (wp, bf16) = input_ptr(w, l, None, "conv kernel")?;
    let cx = Ctx::scalar(&w.device, bf16);
    let n = co * ci * k * k;
    let (out, op) = cx.fresh(n)?;
    let a = args![wp, op, co as i32, ci as i32, k as i32];
    // SAFETY: w and out hold co·ci·k·k elements of the context's type.
    unsafe { MODULE.launch(cx.dev, &cx.kernel("flip_kernel", false), elems_cfg(n), a)? };
    Ok((out, Shape::from((ci, co, k, k))))
}

/// The input gradient dx (b, c, h, w) of y = W ⋆ x for the output gradient dy (b, co, ho, wo),
/// by cuDNN (where `cudnn::takes_input_grad`).
pub(super) fn input_grad_cudnn(
    (g, lg): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    shape: ConvShape,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let ConvShape { b, c, h, co, .. } = shape;
    let (ho, wo) = shape.out_hw();
    if lg.shape().dims4()? != (b, co, ho, wo) || lw.shape().dims4()? != (co, c, shape.k, shape.k) {
        candle_core::bail!(
            "conv2d input gradient: output gradient {:?} and kernel {:?} for input {:?}",
            lg.shape().dims(),
            lw.shape().dims(),
            (b, c, h, shape.w)
        );
    }
    let (gp, bf16) = input_ptr(g, lg, Some(b * co * ho * wo), "conv2d output gradient")?;
    let wp = input_ptr_as(w, lw, bf16, "conv2d kernel")?;
    let (out, dxp) = Ctx::scalar(&g.device, bf16).fresh(b * c * h * shape.w)?;
    // SAFETY: dy, W and dx hold the shape's elements of one type.
    if !unsafe { cudnn::input_grad(&g.device, bf16, shape, (gp, wp, dxp))? } {
        candle_core::bail!("conv2d input gradient: cuDNN has no plan for {shape:?}");
    }
    Ok((out, Shape::from((b, c, h, shape.w))))
}
