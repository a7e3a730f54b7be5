//! An adapter's rank-r products fused into the CUDA fast path's kernels around its projection.
//!
//! Forward (and the input gradient's backward), the term c·h·Uᵀ is added by the kernel that
//! reads the projection's output next, instead of by a β = 1 GEMM that reads and writes that
//! output once more: the residual add (`ops/residual`), the SwiGLU kernels (`ops/swiglu`), and
//! the RoPE/split kernel (`ops/rope`). They share the tensor-core tile in `low_rank.cuh`, and
//! [`LowRank`] here describes a term as they take it. Backward, [`g_pass`] computes an
//! adapter's g·U and gᵀ·h in one pass over the output gradient g instead of two GEMMs that each
//! read it (kernels in `low_rank.cu`).
//!
//! The tensor entries ([`g_pass_products`] here, and those of the consumer ops) run the kernels
//! on candle tensors for the device check, which compares them with composed ops.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{CudaDevice, DType, Tensor};

use super::cuda::{args, bf16_ptr, elems_cfg, grid, ptx_module, tensor_ptr, Arg, Ctx, Module};
use super::FastPath;

const MODULE: Module = ptx_module!("low_rank");

/// One adapter's rank-r term c·h·Uᵀ for a kernel that consumes the projection's output to add
/// (see `LrTile` in low_rank.cuh): h (m × r) at row stride `ldh`, U (n × r) contiguous.
#[derive(Clone, Copy, Debug)]
pub struct LowRank {
    pub h: u64,
    pub ldh: usize,
    pub u: u64,
    pub r: usize,
    pub c: f32,
}

/// Rows each warp of the low-rank kernels walks (LR_ROWS in low_rank.cuh).
pub const LR_ROWS: usize = 64;

/// Whether the consumer kernels take this term for outputs of n columns: bf16, r 8 or 16, the
/// epilogue and the 8-wide kernels chosen, 16-byte aligned rows of h and U.
pub fn lr_ok(cx: &Ctx, lr: &LowRank, n: usize) -> bool {
    cx.bf16
        && cx.fast.fused_low_rank
        && matches!(lr.r, 8 | 16)
        && cx.v8(&[lr.h, lr.u], n)
        && (lr.ldh * 2) % 16 == 0
}

/// Warps of 32 columns, 4 to a block; LR_ROWS rows each.
pub fn lr_cfg(m: usize, n: usize) -> LaunchConfig {
    grid((n.div_ceil(128), m.div_ceil(LR_ROWS)), 128)
}

/// The terms as the kernels take them, (h, ldh, U, c) each with a null h for an absent one,
/// and their one rank; checked for [`lr_ok`] and the 8-wide kernels' `ptrs` and width.
pub fn kernel_terms<const N: usize>(
    cx: &Ctx,
    what: &str,
    terms: [Option<&LowRank>; N],
    ptrs: &[u64],
    n: usize,
) -> candle_core::Result<(usize, Vec<Arg>)> {
    let present: Vec<&LowRank> = terms.iter().flatten().copied().collect();
    let Some(r) = present.first().map(|l| l.r) else {
        candle_core::bail!("{what}: no low-rank term");
    };
    if !cx.v8(ptrs, n) || present.iter().any(|l| !lr_ok(cx, l, n) || l.r != r) {
        candle_core::bail!("{what}: unsupported rank, width or alignment");
    }
    let args = terms
        .iter()
        .flat_map(|t| {
            let (h, ldh, u, c) = t.map_or((0, 0, 0, 0.0), |l| (l.h, l.ldh as i64, l.u, l.c));
            [Arg::from(h), Arg::from(ldh), Arg::from(u), Arg::from(c)]
        })
        .collect();
    Ok((r, args))
}

/// Launches `{name}{r}_bf16` of `module` with the arguments in the kernels' order: `lead`
/// (pointers and sizes), the terms (see [`kernel_terms`]), and `tail`.
///
/// # Safety
/// As [`Module::launch`].
pub unsafe fn launch_lr(
    cx: &Ctx,
    module: &Module,
    name: &str,
    (r, terms): (usize, Vec<Arg>),
    (lead, tail): (&[Arg], &[Arg]),
    cfg: LaunchConfig,
) -> candle_core::Result<()> {
    let all: Vec<Arg> = [lead, &terms, tail].concat();
    // SAFETY: the caller's.
    unsafe { module.launch(cx.dev, &format!("{name}{r}_bf16"), cfg, &all) }
}

/// Whether [`g_pass`] takes an output gradient g of n columns with a rank-r adapter: chosen,
/// bf16, r 8 or 16, and whole 16-byte chunks of g's rows.
pub fn g_pass_ok(cx: &Ctx, g: u64, n: usize, r: usize) -> bool {
    cx.fast.g_pass && cx.bf16 && matches!(r, 8 | 16) && n % 8 == 0 && g % 16 == 0
}

/// An adapter's two products with its projection's output gradient g (m × n) in one pass over
/// g (see `gpass` in low_rank.cu): g_U = g·U (bf16, m × r at row stride `ldgu`) and
/// out = β·out + c·gᵀ·h (f32, n × r contiguous), for U (n × r, contiguous) and h (m × r at
/// row stride `ldh`). [`g_pass_ok`] first.
#[allow(clippy::too_many_arguments)]
pub fn g_pass(
    dev: &CudaDevice,
    (g, m, n): (u64, usize, usize),
    (u, h, ldh, r): (u64, u64, usize, usize),
    (gu, ldgu): (u64, usize),
    (out, c, beta): (u64, f32, f32),
) -> candle_core::Result<()> {
    let (ng, nu) = (n.div_ceil(128), m.div_ceil(128));
    let (pg, pgp) = super::cuda::fresh(dev, false, ng * m * r)?;
    let (pu, pup) = super::cuda::fresh(dev, false, nu * n * r)?;
    let a = args![g, m as i64, n as i32, u, h, ldh as i64, pgp, pup];
    // SAFETY: g m × n, U n × r, h m rows of ldh, the partials ng·m·r and nu·n·r f32.
    unsafe { MODULE.launch(dev, &format!("gpass{r}"), grid((ng, nu), 128), a)? };
    let a = args![
        pgp,
        ng as i32,
        m as i64,
        gu,
        ldgu as i64,
        pup,
        nu as i32,
        n as i32,
        out,
        c,
        beta
    ];
    let mut cfg = elems_cfg(m.max(n) * r);
    cfg.grid_dim.1 = 2;
    // SAFETY: the partials above; g_U m rows of ldgu, out n × r f32.
    unsafe { MODULE.launch(dev, &format!("gpass_sum{r}"), cfg, a)? };
    drop((pg, pu));
    Ok(())
}

/// One adapter's term for the tensor entries of the consumer kernels: h = columns
/// `off..off + r` of `h` (m × w), U (n × r), the scale c.
pub type Term<'a> = (&'a Tensor, usize, &'a Tensor, f32);

/// A [`Term`] as the kernels take it, for outputs of n columns.
pub fn term(t: &Term, n: usize) -> candle_core::Result<LowRank> {
    let (h, off, u, c) = *t;
    let (_, w) = h.dims2()?;
    let (un, r) = u.dims2()?;
    if un != n || off + r > w {
        candle_core::bail!("low-rank term: U {un} × {r} for {n} columns, h {w} wide at {off}");
    }
    Ok(LowRank {
        h: bf16_ptr(h, "h")?.0 + 2 * off as u64,
        ldh: w,
        u: bf16_ptr(u, "U")?.0,
        r,
        c,
    })
}

/// The context of the tensor entries: bf16, every kernel choice on.
pub fn entry_ctx(dev: &CudaDevice) -> Ctx<'_> {
    Ctx::new(dev, true, FastPath::default())
}

/// (g·U (bf16, m × r), out + c·gᵀ·h (f32, n × r)) for g (m × n), U (n × r) and h (m × r),
/// all bf16, through the one-pass kernel ([`g_pass`]): the device check's entry to it.
pub fn g_pass_products(
    g: &Tensor,
    u: &Tensor,
    h: &Tensor,
    out: &Tensor,
    c: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (m, n) = g.dims2()?;
    let (_, r) = u.dims2()?;
    let (gp, dev) = bf16_ptr(g, "g")?;
    if u.dims2()? != (n, r) || h.dims2()? != (m, r) || out.dims2()? != (n, r) {
        candle_core::bail!("g_pass: g {m} × {n} needs U {n} × {r}, h {m} × {r}, out {n} × {r}");
    }
    if !g_pass_ok(&entry_ctx(&dev), gp, n, r) {
        candle_core::bail!("g_pass: not for r = {r}, {n} columns");
    }
    let gu = Tensor::zeros((m, r), DType::BF16, g.device())?;
    let out = out.to_dtype(DType::F32)?.copy()?;
    g_pass(
        &dev,
        (gp, m, n),
        (bf16_ptr(u, "U")?.0, bf16_ptr(h, "h")?.0, r, r),
        (bf16_ptr(&gu, "g_U")?.0, r),
        (tensor_ptr(&out, "out", &[DType::F32])?, c, 1.0),
    )?;
    Ok((gu, out))
}
