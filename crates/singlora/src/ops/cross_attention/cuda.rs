//! The cross-attention kernels' launchers (cross_attention.cu).

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{CudaStorage, Layout, Shape, Tensor};

use crate::ops::cuda::{args, bf16_ptr, elems_cfg, input_ptr, ptx_module, slice_ptr, Ctx, Module};

const MODULE: Module = ptx_module!("cross_attention");

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// (b, t, inner, s): images, queries, features, keys.
type Sizes = (usize, usize, usize, usize);

/// (b, t, inner) of q and s of k, v, each checked contiguous bf16 with those sizes, and their
/// pointers.
fn operands(q: Arg, k: Arg, v: Arg, what: &str) -> candle_core::Result<(Sizes, [u64; 3])> {
    let (b, t, inner) = q.1.shape().dims3()?;
    let (_, s, _) = k.1.shape().dims3()?;
    let mut ptrs = [0u64; 3];
    for (i, (x, n)) in [(q, t), (k, s), (v, s)].into_iter().enumerate() {
        let (p, bf16) = input_ptr(x.0, x.1, Some(b * n * inner), what)?;
        if !bf16 {
            candle_core::bail!("{what}: bf16 operands expected");
        }
        ptrs[i] = p;
    }
    Ok(((b, t, inner, s), ptrs))
}

/// The kernels' query rows a tile (16 for each of XT_WARPS warps) and keys padded to.
const ROWS: usize = 80;
const KEYS: usize = 80;

/// A launch of `blocks` blocks per (head, image), each of XT_WARPS warps, with the shared
/// `tiles` (rows, bf16 columns; each row 8 columns longer: padding).
fn launch_cfg(blocks: usize, heads: usize, b: usize, tiles: &[(usize, usize)]) -> LaunchConfig {
    let elems: usize = tiles.iter().map(|&(rows, cols)| rows * (cols + 8)).sum();
    LaunchConfig {
        grid_dim: (blocks as u32, heads as u32, b as u32),
        block_dim: (160, 1, 1),
        shared_mem_bytes: (2 * elems) as u32,
    }
}

/// Blocks per (head, image): about `per_sm` blocks an SM in all,
/// at most one per query tile.
fn blocks_per_head(t: usize, heads: usize, b: usize, per_sm: usize) -> usize {
    (per_sm * 132)
        .div_ceil(b * heads)
        .min(t.div_ceil(ROWS))
        .max(1)
}

/// The kernels load 16 bytes at a time: every operand's start 16-byte aligned (rows of
/// heads·d bf16 are whole 16-byte units for every width in HEAD_DIMS); the op's callers make
/// them so.
fn aligned(ptrs: &[u64]) -> candle_core::Result<()> {
    if ptrs.iter().any(|p| p % 16 != 0) {
        candle_core::bail!("cross-attention: an operand is not 16-byte aligned");
    }
    Ok(())
}

/// The head width the kernels pad `d` to (a multiple of 16).
fn padded(d: usize) -> usize {
    d.next_multiple_of(16)
}

pub(super) fn forward(
    q: Arg,
    k: Arg,
    v: Arg,
    heads: usize,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let ((b, t, inner, s), [qp, kp, vp]) = operands(q, k, v, "cross-attention")?;
    let d = inner / heads;
    let cx = Ctx::scalar(&q.0.device, true);
    let (out, op) = cx.fresh(b * t * inner)?;
    let scale = 1.0 / (d as f32).sqrt();
    let a = args![qp, kp, vp, op, t as i32, s as i32, heads as i32, scale];
    aligned(&[qp, kp, vp])?;
    let dp = padded(d);
    let tiles = [(KEYS, dp), (KEYS, dp), (ROWS, dp)];
    let launch = launch_cfg(blocks_per_head(t, heads, b, 4), heads, b, &tiles);
    // SAFETY: q and the output hold b·t·inner bf16, k and v b·s·inner, all 16-byte aligned;
    // s ≤ MAX_KEYS and d one of HEAD_DIMS (checked by the caller), the dynamic shared memory
    // the tiles of those.
    unsafe { MODULE.launch(cx.dev, &format!("xattn_fwd_{d}"), launch, a)? };
    Ok((out, Shape::from((b, t, inner))))
}

/// [dq | dk | dv] flat (bf16) for the output gradient g and q, k, v.
pub(super) fn backward(
    g: Arg,
    q: Arg,
    (k, v): (&Tensor, &Tensor),
    heads: usize,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (b, t, inner) = q.1.shape().dims3()?;
    let s = k.dim(1)?;
    let (gp, gb) = input_ptr(
        g.0,
        g.1,
        Some(b * t * inner),
        "cross-attention backward gradient",
    )?;
    let (qp, qb) = input_ptr(q.0, q.1, Some(b * t * inner), "cross-attention backward q")?;
    if !(gb && qb) || k.dims() != [b, s, inner] || v.dims() != [b, s, inner] {
        candle_core::bail!(
            "cross-attention backward: bf16 g, q (b, t, inner), k, v (b, s, inner) expected"
        );
    }
    let (kp, _) = bf16_ptr(k, "cross-attention backward k")?;
    let (vp, _) = bf16_ptr(v, "cross-attention backward v")?;
    let d = inner / heads;
    let dev = &q.0.device;
    let cx = Ctx::scalar(dev, true);
    let (nq, nk) = (b * t * inner, b * s * inner);
    let (out, outp) = cx.fresh(nq + 2 * nk)?;
    let sums = dev.alloc_zeros::<f32>(2 * nk)?;
    let sp = slice_ptr(&sums);
    let scale = 1.0 / (d as f32).sqrt();
    let a = args![
        qp,
        kp,
        vp,
        gp,
        outp,
        sp,
        sp + 4 * nk as u64,
        t as i32,
        s as i32,
        heads as i32,
        scale
    ];
    aligned(&[qp, kp, vp, gp])?;
    let dp = padded(d);
    let tiles = [
        (KEYS, dp),
        (KEYS, dp),
        (ROWS, dp),
        (ROWS, dp),
        (KEYS, ROWS),
        (KEYS, ROWS),
    ];
    let launch = launch_cfg(blocks_per_head(t, heads, b, 2), heads, b, &tiles);
    // SAFETY: q, g and dq hold b·t·inner bf16, k, v b·s·inner, the sums 2·b·s·inner f32, the
    // bf16 operands 16-byte aligned; s, d and the shared memory as the forward's.
    unsafe { MODULE.launch(dev, &format!("xattn_bwd_{d}"), launch, a)? };
    let a = args![sp, outp + 2 * nq as u64, (2 * nk) as i64];
    // SAFETY: the sums (2·nk f32) into dk and dv, the output's last 2·nk bf16.
    unsafe { MODULE.launch(dev, "xattn_cast", elems_cfg(2 * nk), a)? };
    drop(sums);
    Ok((out, Shape::from(nq + 2 * nk)))
}
