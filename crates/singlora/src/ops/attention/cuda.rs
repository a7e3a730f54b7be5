//! The attention block as one op on CUDA: from the q, k, v projections' outputs (b, t, n·hd)
//! to the heads-merged output (b, t, h·hd), through RoPE and the head split, S = QKᵀ, the
//! masked softmax, O = PV and the head merge, forward and backward. Grouped-query attention
//! needs no copies of K and V: the `rep` query heads that share a KV head are contiguous, so
//! each (batch, KV head) pair is one GEMM of rep·t rows against t keys (strided-batched cuBLAS).
//! Inside the op no gradient edges exist for candle's autograd to pad with zero tensors; the
//! probabilities P (bf16 or f32, as the inputs) and the rotated Q, K, V are kept for backward.
//!
//! For bf16 with head size 64 or 128 the scores go through the fused kernels of `flash.cu`
//! instead (S, P and their gradients only ever in registers, tile by tile), unless the fast
//! path's choices say otherwise ([`FastPath::flash_attention`]): the forward keeps the rows'
//! log-sum-exps in place of P and writes O straight into the merged layout; the backward
//! recomputes P from them.
//!
//! [`FastPath::flash_attention`]: crate::ops::FastPath::flash_attention

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig};
use candle_core::{CudaStorage, DType, Layout, Shape, Tensor};

use crate::ops::cuda::{
    args, elems_cfg, gemm_batched, grid, input_ptr, ptr_of, ptx_module, slice_ptr, tensor_ptr,
    upload_lens, Ctx, Mat, Module,
};
use crate::ops::low_rank::LowRank;
use crate::ops::rope::cuda::{rope_split, rope_split_lr};
use crate::ops::softmax::cuda::{softmax_bwd, softmax_fwd};
use crate::ops::FastPath;

const FLASH: Module = ptx_module!("flash");
const ROWS: Module = ptx_module!("rows");

/// Packed rows (b, t), each laying several examples end to end, seen as one example per row
/// (n, max_len) on the device: the row maps both ways and the examples' lengths, for the fast
/// path's attention (the autograd path gathers tensors with [`super::Segments`] instead; the
/// same layout).
pub struct PackedRows {
    /// Per example row position (n · max_len): the packed row it reads, −1 past the example's
    /// end.
    unpack: CudaSlice<i32>,
    /// Per packed row (b · t): its example row, −1 for a packed row's padding.
    pack: CudaSlice<i32>,
    /// The examples' lengths (the key lengths of the example rows).
    pub lens: Arc<CudaSlice<u32>>,
    pub examples: usize,
    pub max_len: usize,
}

impl PackedRows {
    /// `segments[r]`: the lengths of row r's examples, in order; rows of `t` positions.
    pub fn new(
        dev: &candle_core::CudaDevice,
        segments: &[Vec<usize>],
        t: usize,
    ) -> candle_core::Result<Self> {
        let maps = super::RowMaps::new(segments, t).map_err(candle_core::Error::wrap)?;
        let lens32: Vec<u32> = maps.lens.iter().map(|&l| l as u32).collect();
        Ok(Self {
            unpack: dev.clone_htod(&maps.unpack)?,
            pack: dev.clone_htod(&maps.pack)?,
            lens: Arc::new(dev.clone_htod(&lens32)?),
            examples: maps.lens.len(),
            max_len: maps.max_len,
        })
    }

    /// Rows of the example layout.
    pub fn rows(&self) -> usize {
        self.examples * self.max_len
    }

    fn gather(
        cx: &Ctx,
        map: &CudaSlice<i32>,
        (src, dst): (u64, u64),
        rows: usize,
        width: usize,
    ) -> candle_core::Result<()> {
        let name = format!("rows_gather_{}", cx.suffix());
        // SAFETY: map holds `rows` indices of rows of the source buffer (or −1), dst `rows` rows
        // of `width` elements of the step's type.
        unsafe {
            ROWS.launch(
                cx.dev,
                &name,
                elems_cfg(rows * width),
                args![src, slice_ptr(map), dst, rows as i64, width as i32],
            )
        }
    }

    /// Packed rows (b·t, width) at `src` → example rows (n·max_len, width) at `dst`, zeros past
    /// each example's end.
    pub fn unpack(&self, cx: &Ctx, bufs: (u64, u64), width: usize) -> candle_core::Result<()> {
        Self::gather(cx, &self.unpack, bufs, self.rows(), width)
    }

    /// Example rows at `src` → packed rows (b·t, width) at `dst`, zeros in the rows' padding.
    pub fn pack(&self, cx: &Ctx, bufs: (u64, u64), width: usize) -> candle_core::Result<()> {
        Self::gather(cx, &self.pack, bufs, self.pack.len(), width)
    }
}

/// Whether the fused kernels apply: chosen, bf16, a head size they are built for (48 and 80
/// where chosen too), and b·h (query heads) blocks within a grid's second dimension.
fn flash_applies(cx: &Ctx, d: usize, b: usize, h: usize) -> bool {
    let size =
        matches!(d, 64 | 128) || (d == 48 && cx.fast.flash_48) || (d == 80 && cx.fast.flash_80);
    cx.fast.flash_attention && cx.bf16 && size && b * h <= 65535
}

/// How many of a KV head's `rep` query heads one dK/dV block takes: the fast path's choice
/// where it divides `rep`, else 2 where that does, else 1. Two heads a block writes fewer
/// partial sums than one and keeps more (and shorter causal) blocks than four or eight
/// (TinyLlama, rep 8: 44.6 ms a SingLoRA step against 44.9 to 45.8); the device check covers
/// both the partial sums (its 4 heads on a KV head) and the direct stores (2).
fn heads_per_block(fast: &FastPath, rep: usize) -> usize {
    match fast.flash_heads {
        Some(n) if n >= 1 && rep % n == 0 => n,
        _ if rep % 2 == 0 => 2,
        _ => 1,
    }
}

/// A block of 4 warps per 64 rows (query or key) and (batch row, query head).
fn flash_cfg(b: usize, t: usize, h: usize) -> LaunchConfig {
    grid((t.div_ceil(64), b * h), 128)
}

/// (b, t, heads, kv_heads, hd).
pub type Dims = (usize, usize, usize, usize, usize);

/// What the forward keeps for the backward: rotated Q (b, h, t, hd), K and V (b, kvh, t, hd),
/// and P (b, h, t, t), or with the fused kernels the rows' log-sum-exps.
pub struct Saved {
    q: CudaStorage,
    k: CudaStorage,
    v: CudaStorage,
    /// The probabilities, or None when the backward recomputes them (activation
    /// recomputation: b·h·t² values fewer to keep, one more QKᵀ GEMM and softmax).
    p: Option<CudaStorage>,
    /// The fused kernels' log-sum-exp of each row's scaled scores (b, h, t) f32; when present,
    /// the backward takes the fused kernels (and P is never formed).
    lse: Option<CudaStorage>,
    /// The key lengths on the device (one upload per step, shared by its layers).
    lens: Arc<CudaSlice<u32>>,
    causal: bool,
}

/// P = masked softmax(Q·Kᵀ / √d) for the heads-layout Q (b, h, t, d) and K (b, kvh, t, d).
fn probabilities(
    cx: &Ctx,
    (qsp, ksp): (u64, u64),
    lens: &CudaSlice<u32>,
    (b, t, h, kvh, d): Dims,
    causal: bool,
) -> candle_core::Result<(CudaStorage, u64)> {
    let rep = h / kvh;
    let groups = b * kvh;
    let (s, sp) = cx.fresh(b * h * t * t)?;
    // SAFETY: the pointers address live buffers of the shapes given; one stream orders them.
    unsafe {
        gemm_batched(
            cx,
            (rep * t, t, d),
            (Mat::new(qsp, d), rep * t * d),
            (Mat::new(ksp, d).t(), t * d),
            (sp, rep * t * t),
            groups,
            1.0,
        )?;
    }
    cx.mark("attention: QKᵀ GEMM")?;
    let (p, pp) = cx.fresh(b * h * t * t)?;
    let scale = 1.0 / (d as f64).sqrt();
    softmax_fwd(
        cx,
        (sp, pp),
        slice_ptr(lens),
        (b * h * t, h, t, t),
        scale,
        causal,
    )?;
    cx.mark("attention: softmax fwd")?;
    drop(s);
    Ok((p, pp))
}

/// The op's input: a contiguous (bf16 or f32) buffer of `n` elements, its pointer and type.
fn input(s: &CudaStorage, l: &Layout, n: usize, what: &str) -> candle_core::Result<(u64, bool)> {
    input_ptr(s, l, Some(n), &format!("attention: {what}"))
}

/// The RoPE tables' pointers (f32 (t, hd) each).
fn tables((cos, sin): (&Tensor, &Tensor)) -> candle_core::Result<(u64, u64)> {
    Ok((
        tensor_ptr(cos, "rope cos", &[DType::F32])?,
        tensor_ptr(sin, "rope sin", &[DType::F32])?,
    ))
}

/// The forward: returns the merged output (b, t, h·hd) and what the backward needs.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    rope: (&Tensor, &Tensor),
    (b, t, h, kvh, d): Dims,
    key_lens: &[usize],
    causal: bool,
    fast: FastPath,
) -> candle_core::Result<(CudaStorage, Shape, Saved)> {
    let (qp, bf16) = input(q.0, q.1, b * t * h * d, "q")?;
    let (kp, kb) = input(k.0, k.1, b * t * kvh * d, "k")?;
    let (vp, vb) = input(v.0, v.1, b * t * kvh * d, "v")?;
    if kb != bf16 || vb != bf16 {
        candle_core::bail!("attention: q, k, v of different types");
    }
    if key_lens.len() != b {
        candle_core::bail!(
            "attention: {} key lengths for a batch of {b}",
            key_lens.len()
        );
    }
    let cx = Ctx::new(&q.0.device, bf16, fast);
    let (out, _, saved) = forward_raw(
        &cx,
        (qp, kp, vp),
        tables(rope)?,
        (b, t, h, kvh, d),
        &upload_lens(cx.dev, key_lens)?,
        (causal, false),
        [None; 3],
    )?;
    Ok((out, Shape::from((b, t, h * d)), saved))
}

/// [`forward`] on raw pointers to contiguous q, k, v, with their projections' low-rank terms
/// added on the way in where given; returns the output, its pointer and the saved tensors.
#[allow(clippy::too_many_arguments)]
pub fn forward_raw(
    cx: &Ctx,
    (qp, kp, vp): (u64, u64, u64),
    tables: (u64, u64),
    (b, t, h, kvh, d): Dims,
    lens: &Arc<CudaSlice<u32>>,
    (causal, recompute): (bool, bool),
    terms: [Option<&LowRank>; 3],
) -> candle_core::Result<(CudaStorage, u64, Saved)> {
    let rep = h / kvh;
    let (qs, qsp) = cx.fresh(b * h * t * d)?;
    let (ks, ksp) = cx.fresh(b * kvh * t * d)?;
    let (vs, vsp) = cx.fresh(b * kvh * t * d)?;
    for ((src, dst, n, rotate), term) in [
        (qp, qsp, h, true),
        (kp, ksp, kvh, true),
        (vp, vsp, kvh, false),
    ]
    .into_iter()
    .zip(terms)
    {
        match term {
            Some(lr) => rope_split_lr(cx, (src, dst), tables, (b, t, n, d), rotate, lr)?,
            None => rope_split(cx, (src, dst), tables, (b, t, n, d), rotate, false)?,
        }
    }
    cx.mark("attention: RoPE and split")?;
    if flash_applies(cx, d, b, h) {
        let (out, outp) = cx.fresh(b * t * h * d)?;
        let (lse, lsep) = crate::ops::cuda::fresh(cx.dev, false, b * h * t)?;
        let scale = 1.0 / (d as f32).sqrt();
        let a = args![
            qsp,
            ksp,
            vsp,
            outp,
            lsep,
            slice_ptr(lens),
            h as i32,
            kvh as i32,
            t as i32,
            scale,
            i32::from(causal)
        ];
        // SAFETY: q (b, h, t, d), k and v (b, kvh, t, d), out (b, t, h·d) and lse (b, h, t)
        // are live buffers of those sizes, lens has b entries.
        unsafe { FLASH.launch(cx.dev, &format!("flash_fwd{d}"), flash_cfg(b, t, h), a)? };
        cx.mark("attention: fused forward")?;
        return Ok((
            out,
            outp,
            Saved {
                q: qs,
                k: ks,
                v: vs,
                p: None,
                lse: Some(lse),
                lens: lens.clone(),
                causal,
            },
        ));
    }
    let groups = b * kvh;
    let (p, pp) = probabilities(cx, (qsp, ksp), lens, (b, t, h, kvh, d), causal)?;
    let (o, op) = cx.fresh(b * h * t * d)?;
    // SAFETY: as in `probabilities`.
    unsafe {
        gemm_batched(
            cx,
            (rep * t, d, t),
            (Mat::new(pp, t), rep * t * t),
            (Mat::new(vsp, d), t * d),
            (op, rep * t * d),
            groups,
            1.0,
        )?;
    }
    cx.mark("attention: PV GEMM")?;
    let (out, outp) = cx.fresh(b * t * h * d)?;
    rope_split(cx, (op, outp), tables, (b, t, h, d), false, true)?;
    cx.mark("attention: RoPE and split")?;
    drop(o);
    Ok((
        out,
        outp,
        Saved {
            q: qs,
            k: ks,
            v: vs,
            p: (!recompute).then_some(p),
            lse: None,
            lens: lens.clone(),
            causal,
        },
    ))
}

/// The backward from the output's gradient (b, t, h·hd), given the forward's output `o` (the
/// same layout): dq, dk, dv in the inputs' layouts, packed one after the other in a flat buffer.
pub fn backward(
    saved: &Saved,
    g: (&CudaStorage, &Layout),
    o: (&CudaStorage, &Layout),
    rope: (&Tensor, &Tensor),
    (b, t, h, kvh, d): Dims,
    fast: FastPath,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (gp, bf16) = input(g.0, g.1, b * t * h * d, "output gradient")?;
    let (op, _) = input(o.0, o.1, b * t * h * d, "output")?;
    let cx = Ctx::new(&g.0.device, bf16, fast);
    // called from candle's autograd (see ops::mark_backward_start)
    cx.mark(crate::ops::cuda::prof::OTHER_BACKWARD)?;
    let (out, _) = backward_raw(&cx, saved, (gp, op), tables(rope)?, (b, t, h, kvh, d))?;
    Ok((out, Shape::from(b * t * (h + 2 * kvh) * d)))
}

/// [`backward`] on raw pointers to the contiguous output gradient and the forward's output;
/// returns the packed [dq | dk | dv] buffer and its pointer.
pub fn backward_raw(
    cx: &Ctx,
    saved: &Saved,
    (gp, op): (u64, u64),
    tables: (u64, u64),
    (b, t, h, kvh, d): Dims,
) -> candle_core::Result<(CudaStorage, u64)> {
    let dims = (b, t, h, kvh, d);
    if let Some(lse) = &saved.lse {
        return flash_backward(cx, saved, ptr_of(lse)?, (gp, op), tables, dims);
    }
    let [(dqs, dqp), (dks, dkp), (dvs, dvp)] = gemm_backward(cx, saved, gp, tables, dims)?;
    // back through RoPE and the split, into one buffer [dq | dk | dv]
    let (nq, nk) = (b * t * h * d, b * t * kvh * d);
    let (out, outp) = cx.fresh(nq + 2 * nk)?;
    let el = cx.elem();
    rope_split(cx, (dqp, outp), tables, (b, t, h, d), true, true)?;
    let dk_at = outp + el * nq as u64;
    rope_split(cx, (dkp, dk_at), tables, (b, t, kvh, d), true, true)?;
    let dv_at = outp + el * (nq + nk) as u64;
    rope_split(cx, (dvp, dv_at), tables, (b, t, kvh, d), false, true)?;
    cx.mark("attention: RoPE and split")?;
    drop((dvs, dqs, dks));
    Ok((out, outp))
}

/// The backward through the kept (or recomputed) P with cuBLAS GEMMs and the softmax kernels:
/// dq (b, h, t, hd), dk and dv (b, kvh, t, hd), each with its pointer.
fn gemm_backward(
    cx: &Ctx,
    saved: &Saved,
    gp: u64,
    tables: (u64, u64),
    (b, t, h, kvh, d): Dims,
) -> candle_core::Result<[(CudaStorage, u64); 3]> {
    let rep = h / kvh;
    let groups = b * kvh;
    let (qsp, ksp, vsp) = (ptr_of(&saved.q)?, ptr_of(&saved.k)?, ptr_of(&saved.v)?);
    let recomputed = match &saved.p {
        Some(_) => None,
        None => Some(probabilities(
            cx,
            (qsp, ksp),
            &saved.lens,
            (b, t, h, kvh, d),
            saved.causal,
        )?),
    };
    let pp = match (&saved.p, &recomputed) {
        (Some(p), _) => ptr_of(p)?,
        (None, Some((_, pp))) => *pp,
        (None, None) => unreachable!("recomputed above"),
    };
    // dO in the heads layout
    let (d_o, dop) = cx.fresh(b * h * t * d)?;
    rope_split(cx, (gp, dop), tables, (b, t, h, d), false, false)?;
    cx.mark("attention: RoPE and split")?;
    // dP = dO·Vᵀ, then dS = scale·P ⊙ (dP − Σ P ⊙ dP) in place
    let (dpb, dpp) = cx.fresh(b * h * t * t)?;
    // the batched GEMMs' operands: (Q or dO or dS by query rows of its group, K or V by keys)
    let by_query = |p: u64, ld: usize, trans: bool| {
        let m = Mat::new(p, ld);
        (if trans { m.t() } else { m }, rep * t * ld)
    };
    let by_key = |p: u64, trans: bool| {
        let m = Mat::new(p, d);
        (if trans { m.t() } else { m }, t * d)
    };
    // SAFETY (all GEMMs below): as in the forward.
    unsafe {
        gemm_batched(
            cx,
            (rep * t, t, d),
            by_query(dop, d, false),
            by_key(vsp, true),
            (dpp, rep * t * t),
            groups,
            1.0,
        )?;
    }
    cx.mark("attention: dP GEMM")?;
    softmax_bwd(cx, (pp, dpp, dpp), (b * h * t, t), 1.0 / (d as f64).sqrt())?;
    cx.mark("attention: softmax bwd")?;
    let (dvs, dvp) = cx.fresh(b * kvh * t * d)?;
    let (dqs, dqp) = cx.fresh(b * h * t * d)?;
    let (dks, dkp) = cx.fresh(b * kvh * t * d)?;
    unsafe {
        // dV = Pᵀ·dO (summed over the group's query heads)
        let (p_t, dout) = (by_query(pp, t, true), by_query(dop, d, false));
        gemm_batched(cx, (t, d, rep * t), p_t, dout, (dvp, t * d), groups, 1.0)?;
        // dQ = dS·K
        let (ds, k) = (by_query(dpp, t, false), by_key(ksp, false));
        gemm_batched(cx, (rep * t, d, t), ds, k, (dqp, rep * t * d), groups, 1.0)?;
        // dK = dSᵀ·Q
        let (ds_t, q) = (by_query(dpp, t, true), by_query(qsp, d, false));
        gemm_batched(cx, (t, d, rep * t), ds_t, q, (dkp, t * d), groups, 1.0)?;
    }
    cx.mark("attention: dV dQ dK GEMMs")?;
    drop((d_o, dpb));
    Ok([(dqs, dqp), (dks, dkp), (dvs, dvp)])
}

/// The backward through the fused kernels (see flash.cu): Δ = rowsum(dO ⊙ O) and dQ per 64
/// queries, then dK and dV per 64 keys and query head (summed over each KV head's query
/// heads), each written through the inverse rotation into the packed [dq | dk | dv] it returns.
fn flash_backward(
    cx: &Ctx,
    saved: &Saved,
    lsep: u64,
    (gp, op): (u64, u64),
    (cs, sn): (u64, u64),
    (b, t, h, kvh, d): Dims,
) -> candle_core::Result<(CudaStorage, u64)> {
    let dev = cx.dev;
    let rep = h / kvh;
    let (qsp, ksp, vsp) = (ptr_of(&saved.q)?, ptr_of(&saved.k)?, ptr_of(&saved.v)?);
    let scale = 1.0 / (d as f32).sqrt();
    let causal = i32::from(saved.causal);
    let lens = slice_ptr(&saved.lens);
    let (nq, nk) = (b * t * h * d, b * t * kvh * d);
    let f32_buf = |n| crate::ops::cuda::fresh(dev, false, n);
    let (out, outp) = crate::ops::cuda::fresh(dev, true, nq + 2 * nk)?;
    let (delta, dsp) = f32_buf(b * h * t)?;
    let (h32, kvh32, t32) = (h as i32, kvh as i32, t as i32);
    let a =
        args![qsp, ksp, vsp, op, gp, lsep, dsp, outp, cs, sn, lens, h32, kvh32, t32, scale, causal];
    // SAFETY: q (b, h, t, d), k and v (b, kvh, t, d), O and dO (b, t, h·d), lse and Δ
    // (b, h, t), out nq + 2·nk elements, the tables (t, d).
    unsafe { FLASH.launch(dev, &format!("flash_bwd_q{d}"), flash_cfg(b, t, h), a)? };
    cx.mark("attention: fused backward, Δ and dQ")?;
    // query heads per dK/dV block; partial sums of dK and dV (per block) when a block takes
    // fewer than all of a KV head's query heads
    let hpc = heads_per_block(&cx.fast, rep);
    let parts = if hpc < rep {
        Some((f32_buf(b * h / hpc * t * d)?, f32_buf(b * h / hpc * t * d)?))
    } else {
        None
    };
    let (pkp, pvp) = parts.as_ref().map_or((0, 0), |(k, v)| (k.1, v.1));
    let (nq64, nk64) = (nq as i64, nk as i64);
    let a = args![
        qsp, ksp, vsp, gp, lsep, dsp, pkp, pvp, outp, nq64, nk64, cs, sn, lens, h32, kvh32, t32,
        scale, causal, hpc as i32
    ];
    // SAFETY: as above (the partials only when hpc < rep).
    unsafe {
        FLASH.launch(
            dev,
            &format!("flash_bwd_kv{d}"),
            flash_cfg(b, t, h / hpc),
            a,
        )?
    };
    if parts.is_some() {
        let n_parts = (rep / hpc) as i32;
        let a = args![pkp, pvp, outp, nq64, nk64, cs, sn, kvh32, t32, n_parts];
        let mut cfg = elems_cfg(nk / 8);
        cfg.grid_dim.1 = 2;
        // SAFETY: partials (b, kvh, rep / hpc, t, d) f32 into out's dk and dv blocks; d/8
        // threads per row.
        unsafe { FLASH.launch(dev, &format!("kv_sum{d}"), cfg, a)? };
    }
    drop(parts);
    drop(delta);
    cx.mark("attention: fused backward, dK dV")?;
    Ok((out, outp))
}
