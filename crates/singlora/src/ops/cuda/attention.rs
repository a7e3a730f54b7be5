//! The attention block as one op on CUDA: from the q, k, v projections' outputs (b, t, n·hd)
//! to the heads-merged output (b, t, h·hd), through RoPE and the head split, S = QKᵀ, the
//! masked softmax, O = PV and the head merge, forward and backward. Grouped-query attention
//! needs no copies of K and V: the `rep` query heads that share a KV head are contiguous, so
//! each (batch, KV head) pair is one GEMM of rep·t rows against t keys (strided-batched cuBLAS).
//! Inside the op no gradient edges exist for candle's autograd to pad with zero tensors; the
//! probabilities P (bf16 or f32, as the inputs) and the rotated Q, K, V are kept for backward.
//!
//! For bf16 with head size 64 or 128 the scores go through the fused kernels of `flash.cu`
//! instead (S, P and their gradients only ever in registers, tile by tile): the forward keeps the
//! rows' log-sum-exps in place of P and writes O straight into the merged layout; the backward
//! recomputes P from them. `SINGLORA_UNFUSED_ATTENTION=1` (or [`set_flash_attention`]) takes
//! the GEMM-and-softmax path for comparison.

use super::prof::mark;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Shape, Tensor};

use super::raw::{self, LowRank};
use super::{
    elems_cfg, fresh, mat_of_tensor, ptr_of, rows_cfg, warp_rows_cfg, Mat, MODULE, PTX,
    WARP_ROW_MAX,
};

const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash.ptx"));
const FLASH_MODULE: &str = "singlora_flash";

static FLASH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether bf16 attention of head size 64 or 128 may take the fused (flash) kernels (on by
/// default; the device check compares with the GEMM-and-softmax path).
pub fn set_flash_attention(on: bool) {
    FLASH.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The fused kernels apply: bf16, a head size they are built for, b·h (query heads) blocks
/// within a grid's second dimension, not switched off (by [`set_flash_attention`], or
/// `SINGLORA_UNFUSED_ATTENTION` read once).
fn flash_applies(bf16: bool, d: usize, b: usize, h: usize) -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    bf16 && matches!(d, 64 | 128)
        && b * h <= 65535
        && FLASH.load(std::sync::atomic::Ordering::Relaxed)
        && *ENV.get_or_init(|| std::env::var_os("SINGLORA_UNFUSED_ATTENTION").is_none())
}

/// How many of a KV head's `rep` query heads one dK/dV block takes: 2 where they divide.
/// Measured at TinyLlama (rep 8; SingLoRA step, two runs each): 1 head 44.9/45.1 ms, 2
/// 44.6/45.1, 4 45.2/45.2, 8 45.8/45.3 (fewer partials to write and sum, but fewer blocks and
/// longer causal ones); the device check then covers both the partial sums (its 4 heads on a
/// KV head) and the direct stores (2). `SINGLORA_FLASH_HEADS` overrides it (a divisor of rep).
fn heads_per_block(rep: usize) -> usize {
    static ENV: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let set = *ENV.get_or_init(|| {
        std::env::var("SINGLORA_FLASH_HEADS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    match set {
        Some(n) if n >= 1 && rep % n == 0 => n,
        _ if rep % 2 == 0 => 2,
        _ => 1,
    }
}

/// A block of 4 warps per 64 rows (query or key) and (batch row, query head).
fn flash_cfg(b: usize, t: usize, h: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (t.div_ceil(64) as u32, (b * h) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
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
    lens: std::sync::Arc<CudaSlice<u32>>,
    causal: bool,
}

/// Key lengths (one per batch row) uploaded for [`forward_raw`]: once per step, shared.
pub fn upload_lens(
    dev: &CudaDevice,
    key_lens: &[usize],
) -> candle_core::Result<std::sync::Arc<CudaSlice<u32>>> {
    let lens: Vec<u32> = key_lens.iter().map(|&x| x as u32).collect();
    Ok(std::sync::Arc::new(dev.clone_htod(&lens)?))
}

/// P = masked softmax(Q·Kᵀ / √d) for the heads-layout Q (b, h, t, d) and K (b, kvh, t, d).
fn probabilities(
    dev: &CudaDevice,
    bf16: bool,
    (qsp, ksp): (u64, u64),
    lens: &CudaSlice<u32>,
    (b, t, h, kvh, d): Dims,
    causal: bool,
) -> candle_core::Result<(CudaStorage, u64)> {
    let rep = h / kvh;
    let groups = b * kvh;
    let (s, sp) = fresh(dev, bf16, b * h * t * t)?;
    // SAFETY: the pointers address live buffers of the shapes given; one stream orders them.
    unsafe {
        gemm_batched(
            dev,
            bf16,
            (rep * t, t, d),
            (mat(qsp, d, false), rep * t * d),
            (mat(ksp, d, true), t * d),
            (sp, rep * t * t),
            groups,
            1.0,
        )?;
    }
    mark(dev, "attention: QKᵀ GEMM")?;
    let (p, pp) = fresh(dev, bf16, b * h * t * t)?;
    softmax_fwd_raw(
        dev,
        bf16,
        (sp, pp),
        lens,
        (b * h * t, h, t),
        1.0 / (d as f64).sqrt(),
        causal,
    )?;
    mark(dev, "attention: softmax fwd")?;
    drop(s);
    Ok((p, pp))
}

fn suffix(bf16: bool) -> &'static str {
    if bf16 {
        "bf16"
    } else {
        "f32"
    }
}

/// The `rope_split` kernel on raw pointers (see kernels.cu).
#[allow(clippy::too_many_arguments)]
fn rope_raw(
    dev: &CudaDevice,
    bf16: bool,
    src: u64,
    dst: u64,
    (cos, sin): (u64, u64),
    (b, t, n, hd): (usize, usize, usize, usize),
    rotate: bool,
    inverse: bool,
) -> candle_core::Result<()> {
    let vec = super::v8(&[src, dst, cos, sin], hd / 2);
    let f = dev.get_or_load_custom_func(&super::pick("rope_split", vec, bf16), MODULE, PTX)?;
    let mut bld = f.builder();
    candle_core::builder_arg!(
        bld,
        src,
        dst,
        cos,
        sin,
        b as i32,
        t as i32,
        n as i32,
        hd as i32,
        i32::from(rotate),
        i32::from(inverse)
    );
    let cfg = if vec {
        // a block per token row, a thread per 8 of each head's half
        let per_row = (n * hd / 16).div_ceil(32) * 32;
        LaunchConfig {
            grid_dim: ((b * t) as u32, 1, 1),
            block_dim: (per_row.min(1024) as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    } else {
        elems_cfg(b * t * n * hd / 2)
    };
    // SAFETY: the pointers address live buffers of b·t·n·hd elements (and (t, hd) tables).
    unsafe { bld.launch(cfg) }.w()?;
    Ok(())
}

/// C_i = α·A_i·B_i + β·C_i (row-major, contiguous C of ld n) for `batch` equally strided
/// operands (strides in elements).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_batched(
    dev: &CudaDevice,
    bf16: bool,
    (m, n, k): (usize, usize, usize),
    (a, sa): (Mat, usize),
    (b, sb): (Mat, usize),
    (c, sc): (u64, usize),
    batch: usize,
    alpha: f32,
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::{result, sys};
    let dt = super::cublas_type(bf16);
    let beta = 0f32;
    let blas = dev.cublas_handle();
    result::gemm_strided_batched_ex(
        *blas.handle(),
        super::cublas_op(b.trans),
        super::cublas_op(a.trans),
        n as i32,
        m as i32,
        k as i32,
        (&alpha) as *const f32 as *const _,
        b.ptr as *const _,
        dt,
        b.ld as i32,
        sb as i64,
        a.ptr as *const _,
        dt,
        a.ld as i32,
        sa as i64,
        (&beta) as *const f32 as *const _,
        c as *mut _,
        dt,
        n as i32,
        sc as i64,
        batch as i32,
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .map_err(|e| candle_core::Error::Cuda(Box::new(e)))
}

fn mat(ptr: u64, ld: usize, trans: bool) -> Mat {
    Mat { ptr, ld, trans }
}

fn input_ptr(
    s: &CudaStorage,
    l: &Layout,
    n: usize,
    what: &str,
) -> candle_core::Result<(u64, bool)> {
    match l.contiguous_offsets() {
        Some((a, b)) if b - a == n => {}
        _ => candle_core::bail!("attention: {what} must be contiguous with {n} elements"),
    }
    let stream = s.device.cuda_stream();
    let o = l.start_offset();
    let r = match &s.slice {
        CudaStorageSlice::BF16(x) => {
            let v = x.slice(o..);
            let p = v.device_ptr(&stream).0;
            (p, true)
        }
        CudaStorageSlice::F32(x) => {
            let v = x.slice(o..);
            let p = v.device_ptr(&stream).0;
            (p, false)
        }
        _ => candle_core::bail!("attention: {what} must be bf16 or f32"),
    };
    Ok(r)
}

/// The forward: returns the merged output (b, t, h·hd) and what the backward needs.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    (cos, sin): (&Tensor, &Tensor),
    (b, t, h, kvh, d): Dims,
    key_lens: &[usize],
    causal: bool,
) -> candle_core::Result<(CudaStorage, Shape, Saved)> {
    let dev = &q.0.device;
    let (qp, bf16) = input_ptr(q.0, q.1, b * t * h * d, "q")?;
    let (kp, kb) = input_ptr(k.0, k.1, b * t * kvh * d, "k")?;
    let (vp, vb) = input_ptr(v.0, v.1, b * t * kvh * d, "v")?;
    if kb != bf16 || vb != bf16 {
        candle_core::bail!("attention: q, k, v of different types");
    }
    if key_lens.len() != b {
        candle_core::bail!(
            "attention: {} key lengths for a batch of {b}",
            key_lens.len()
        );
    }
    let tables = (
        mat_of_tensor(cos, "rope cos")?.0.ptr,
        mat_of_tensor(sin, "rope sin")?.0.ptr,
    );
    let (out, _, saved) = forward_raw(
        dev,
        bf16,
        (qp, kp, vp),
        tables,
        (b, t, h, kvh, d),
        &upload_lens(dev, key_lens)?,
        (causal, false),
        [None; 3],
    )?;
    Ok((out, Shape::from((b, t, h * d)), saved))
}

/// [`forward`] on raw pointers to contiguous q, k, v; returns the output, its pointer and the
/// saved tensors.
#[allow(clippy::too_many_arguments)]
pub fn forward_raw(
    dev: &CudaDevice,
    bf16: bool,
    (qp, kp, vp): (u64, u64, u64),
    tables: (u64, u64),
    (b, t, h, kvh, d): Dims,
    lens: &std::sync::Arc<CudaSlice<u32>>,
    (causal, recompute): (bool, bool),
    terms: [Option<&LowRank>; 3],
) -> candle_core::Result<(CudaStorage, u64, Saved)> {
    let rep = h / kvh;
    let (qs, qsp) = fresh(dev, bf16, b * h * t * d)?;
    let (ks, ksp) = fresh(dev, bf16, b * kvh * t * d)?;
    let (vs, vsp) = fresh(dev, bf16, b * kvh * t * d)?;
    // q, k, v with their projections' low-rank terms added here when the fast path defers them
    for ((src, dst, n, rotate), term) in [
        (qp, qsp, h, true),
        (kp, ksp, kvh, true),
        (vp, vsp, kvh, false),
    ]
    .into_iter()
    .zip(terms)
    {
        match term {
            Some(lr) => raw::rope_split_lr(dev, (src, dst), tables, (b, t, n, d), rotate, lr)?,
            None => rope_raw(dev, bf16, src, dst, tables, (b, t, n, d), rotate, false)?,
        }
    }
    mark(dev, "attention: RoPE and split")?;
    if flash_applies(bf16, d, b, h) {
        let (out, outp) = fresh(dev, bf16, b * t * h * d)?;
        let (lse, lsep) = fresh(dev, false, b * h * t)?;
        let f = dev.get_or_load_custom_func(&format!("flash_fwd{d}"), FLASH_MODULE, FLASH_PTX)?;
        let mut bld = f.builder();
        candle_core::builder_arg!(bld, qsp, ksp, vsp, outp, lsep);
        bld.arg(lens.as_ref());
        let scale = 1.0 / (d as f32).sqrt();
        candle_core::builder_arg!(
            bld,
            h as i32,
            kvh as i32,
            t as i32,
            scale,
            i32::from(causal)
        );
        // SAFETY: the kernel's signature; q (b, h, t, d), k and v (b, kvh, t, d), out
        // (b, t, h·d) and lse (b, h, t) are live buffers of those sizes, lens has b entries.
        unsafe { bld.launch(flash_cfg(b, t, h)) }.w()?;
        mark(dev, "attention: fused forward")?;
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
    let (p, pp) = probabilities(dev, bf16, (qsp, ksp), lens, (b, t, h, kvh, d), causal)?;
    let (o, op) = fresh(dev, bf16, b * h * t * d)?;
    unsafe {
        gemm_batched(
            dev,
            bf16,
            (rep * t, d, t),
            (mat(pp, t, false), rep * t * t),
            (mat(vsp, d, false), t * d),
            (op, rep * t * d),
            groups,
            1.0,
        )?;
    }
    mark(dev, "attention: PV GEMM")?;
    let (out, outp) = fresh(dev, bf16, b * t * h * d)?;
    rope_raw(dev, bf16, op, outp, tables, (b, t, h, d), false, true)?;
    mark(dev, "attention: RoPE and split")?;
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
    (cos, sin): (&Tensor, &Tensor),
    (b, t, h, kvh, d): Dims,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = &g.0.device;
    let (gp, bf16) = input_ptr(g.0, g.1, b * t * h * d, "output gradient")?;
    let (op, _) = input_ptr(o.0, o.1, b * t * h * d, "output")?;
    let tables = (
        mat_of_tensor(cos, "rope cos")?.0.ptr,
        mat_of_tensor(sin, "rope sin")?.0.ptr,
    );
    let (out, _) = backward_raw(dev, bf16, saved, (gp, op), tables, (b, t, h, kvh, d))?;
    Ok((out, Shape::from(b * t * (h + 2 * kvh) * d)))
}

/// [`backward`] on raw pointers to the contiguous output gradient and the forward's output;
/// returns the packed [dq | dk | dv] buffer and its pointer.
pub fn backward_raw(
    dev: &CudaDevice,
    bf16: bool,
    saved: &Saved,
    (gp, op): (u64, u64),
    tables: (u64, u64),
    (b, t, h, kvh, d): Dims,
) -> candle_core::Result<(CudaStorage, u64)> {
    let dims = (b, t, h, kvh, d);
    if let Some(lse) = &saved.lse {
        return flash_backward(dev, saved, ptr_of(lse)?, (gp, op), tables, dims);
    }
    let [(dqs, dqp), (dks, dkp), (dvs, dvp)] = gemm_backward(dev, bf16, saved, gp, tables, dims)?;
    // back through RoPE and the split, into one buffer [dq | dk | dv]
    let (nq, nk) = (b * t * h * d, b * t * kvh * d);
    let (out, outp) = fresh(dev, bf16, nq + 2 * nk)?;
    let el = if bf16 { 2 } else { 4 } as u64;
    rope_raw(dev, bf16, dqp, outp, tables, (b, t, h, d), true, true)?;
    rope_raw(
        dev,
        bf16,
        dkp,
        outp + el * nq as u64,
        tables,
        (b, t, kvh, d),
        true,
        true,
    )?;
    rope_raw(
        dev,
        bf16,
        dvp,
        outp + el * (nq + nk) as u64,
        tables,
        (b, t, kvh, d),
        false,
        true,
    )?;
    mark(dev, "attention: RoPE and split")?;
    drop((dvs, dqs, dks));
    Ok((out, outp))
}

/// The backward through the kept (or recomputed) P with cuBLAS GEMMs and the softmax kernels:
/// dq (b, h, t, hd), dk and dv (b, kvh, t, hd), each with its pointer.
fn gemm_backward(
    dev: &CudaDevice,
    bf16: bool,
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
            dev,
            bf16,
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
    let (d_o, dop) = fresh(dev, bf16, b * h * t * d)?;
    rope_raw(dev, bf16, gp, dop, tables, (b, t, h, d), false, false)?;
    mark(dev, "attention: RoPE and split")?;
    // dP = dO·Vᵀ, then dS = scale·P ⊙ (dP − Σ P ⊙ dP) in place
    let (dpb, dpp) = fresh(dev, bf16, b * h * t * t)?;
    // SAFETY (all GEMMs below): as in the forward.
    unsafe {
        gemm_batched(
            dev,
            bf16,
            (rep * t, t, d),
            (mat(dop, d, false), rep * t * d),
            (mat(vsp, d, true), t * d),
            (dpp, rep * t * t),
            groups,
            1.0,
        )?;
    }
    mark(dev, "attention: dP GEMM")?;
    softmax_bwd_raw(
        dev,
        bf16,
        (pp, dpp, dpp),
        (b * h * t, t),
        1.0 / (d as f64).sqrt(),
    )?;
    mark(dev, "attention: softmax bwd")?;
    let (dvs, dvp) = fresh(dev, bf16, b * kvh * t * d)?;
    let (dqs, dqp) = fresh(dev, bf16, b * h * t * d)?;
    let (dks, dkp) = fresh(dev, bf16, b * kvh * t * d)?;
    unsafe {
        // dV = Pᵀ·dO (summed over the group's query heads)
        gemm_batched(
            dev,
            bf16,
            (t, d, rep * t),
            (mat(pp, t, true), rep * t * t),
            (mat(dop, d, false), rep * t * d),
            (dvp, t * d),
            groups,
            1.0,
        )?;
        // dQ = dS·K
        gemm_batched(
            dev,
            bf16,
            (rep * t, d, t),
            (mat(dpp, t, false), rep * t * t),
            (mat(ksp, d, false), t * d),
            (dqp, rep * t * d),
            groups,
            1.0,
        )?;
        // dK = dSᵀ·Q
        gemm_batched(
            dev,
            bf16,
            (t, d, rep * t),
            (mat(dpp, t, true), rep * t * t),
            (mat(qsp, d, false), rep * t * d),
            (dkp, t * d),
            groups,
            1.0,
        )?;
    }
    mark(dev, "attention: dV dQ dK GEMMs")?;
    drop((d_o, dpb));
    Ok([(dqs, dqp), (dks, dkp), (dvs, dvp)])
}

/// The backward through the fused kernels (see flash.cu): Δ = rowsum(dO ⊙ O) and dQ per 64
/// queries, then dK and dV per 64 keys and query head (summed over each KV head's query
/// heads), each written through the inverse rotation into the packed [dq | dk | dv] it returns.
fn flash_backward(
    dev: &CudaDevice,
    saved: &Saved,
    lsep: u64,
    (gp, op): (u64, u64),
    (cs, sn): (u64, u64),
    (b, t, h, kvh, d): Dims,
) -> candle_core::Result<(CudaStorage, u64)> {
    let rep = h / kvh;
    let (qsp, ksp, vsp) = (ptr_of(&saved.q)?, ptr_of(&saved.k)?, ptr_of(&saved.v)?);
    let scale = 1.0 / (d as f32).sqrt();
    let causal = i32::from(saved.causal);
    let (nq, nk) = (b * t * h * d, b * t * kvh * d);
    let (out, outp) = fresh(dev, true, nq + 2 * nk)?;
    let (delta, dsp) = fresh(dev, false, b * h * t)?;
    let f = dev.get_or_load_custom_func(&format!("flash_bwd_q{d}"), FLASH_MODULE, FLASH_PTX)?;
    let mut bld = f.builder();
    candle_core::builder_arg!(bld, qsp, ksp, vsp, op, gp, lsep, dsp, outp, cs, sn);
    bld.arg(saved.lens.as_ref());
    candle_core::builder_arg!(bld, h as i32, kvh as i32, t as i32, scale, causal);
    // SAFETY: the kernel's signature; q (b, h, t, d), k and v (b, kvh, t, d), O and dO
    // (b, t, h·d), lse and Δ (b, h, t), out nq + 2·nk elements, the tables (t, d).
    unsafe { bld.launch(flash_cfg(b, t, h)) }.w()?;
    mark(dev, "attention: fused backward, Δ and dQ")?;
    // query heads per dK/dV block; partial sums of dK and dV (per block) when a block takes
    // fewer than all of a KV head's query heads
    let hpc = heads_per_block(rep);
    let parts = if hpc < rep {
        Some((
            fresh(dev, false, b * h / hpc * t * d)?,
            fresh(dev, false, b * h / hpc * t * d)?,
        ))
    } else {
        None
    };
    let (pkp, pvp) = parts.as_ref().map_or((0, 0), |(k, v)| (k.1, v.1));
    let (nq64, nk64) = (nq as i64, nk as i64);
    let f = dev.get_or_load_custom_func(&format!("flash_bwd_kv{d}"), FLASH_MODULE, FLASH_PTX)?;
    let mut bld = f.builder();
    candle_core::builder_arg!(
        bld, qsp, ksp, vsp, gp, lsep, dsp, pkp, pvp, outp, nq64, nk64, cs, sn
    );
    bld.arg(saved.lens.as_ref());
    candle_core::builder_arg!(bld, h as i32, kvh as i32, t as i32, scale, causal, hpc as i32);
    // SAFETY: as above (the partials only when hpc < rep).
    unsafe { bld.launch(flash_cfg(b, t, h / hpc)) }.w()?;
    if let Some(((_, pkp), (_, pvp))) = &parts {
        let f = dev.get_or_load_custom_func(&format!("kv_sum{d}"), FLASH_MODULE, FLASH_PTX)?;
        let mut bld = f.builder();
        let n_parts = (rep / hpc) as i32;
        candle_core::builder_arg!(
            bld, *pkp, *pvp, outp, nq64, nk64, cs, sn, kvh as i32, t as i32, n_parts
        );
        let mut cfg = elems_cfg(nk / 8);
        cfg.grid_dim.1 = 2;
        // SAFETY: partials (b, kvh, rep / hpc, t, d) f32 into out's dk and dv blocks; d/8
        // threads per row.
        unsafe { bld.launch(cfg) }.w()?;
    }
    drop(parts);
    drop(delta);
    mark(dev, "attention: fused backward, dK dV")?;
    Ok((out, outp))
}

/// The masked softmax forward on raw pointers: (s → p), rows = b·h·tq of tk = tq keys.
fn softmax_fwd_raw(
    dev: &CudaDevice,
    bf16: bool,
    (s, p): (u64, u64),
    lens: &CudaSlice<u32>,
    (rows, h, t): (usize, usize, usize),
    scale: f64,
    causal: bool,
) -> candle_core::Result<()> {
    let warp = t <= 32 * WARP_ROW_MAX;
    let name = if warp && super::v8(&[s, p], t) {
        "masked_softmax_fwd_warp_v8"
    } else if warp {
        "masked_softmax_fwd_warp"
    } else {
        "masked_softmax_fwd"
    };
    let f = dev.get_or_load_custom_func(&format!("{name}_{}", suffix(bf16)), MODULE, PTX)?;
    let mut bld = f.builder();
    candle_core::builder_arg!(bld, s, p);
    bld.arg(lens);
    if warp {
        candle_core::builder_arg!(
            bld,
            rows as i64,
            h as i32,
            t as i32,
            t as i32,
            scale as f32,
            i32::from(causal)
        );
        // SAFETY: the kernel's signature; a warp per row of live (rows, t) buffers.
        unsafe { bld.launch(warp_rows_cfg(rows)) }.w()?;
    } else {
        candle_core::builder_arg!(
            bld,
            h as i32,
            t as i32,
            t as i32,
            scale as f32,
            i32::from(causal)
        );
        // SAFETY: as above, a block per row.
        unsafe { bld.launch(rows_cfg(rows)) }.w()?;
    }
    Ok(())
}

/// The softmax backward on raw pointers: (p, dp → ds), ds may be dp (each row is read whole
/// before it is written).
fn softmax_bwd_raw(
    dev: &CudaDevice,
    bf16: bool,
    (p, dp, ds): (u64, u64, u64),
    (rows, t): (usize, usize),
    scale: f64,
) -> candle_core::Result<()> {
    let warp = t <= 32 * WARP_ROW_MAX;
    let name = if warp && super::v8(&[p, dp, ds], t) {
        "masked_softmax_bwd_warp_v8"
    } else if warp {
        "masked_softmax_bwd_warp"
    } else {
        "masked_softmax_bwd"
    };
    let f = dev.get_or_load_custom_func(&format!("{name}_{}", suffix(bf16)), MODULE, PTX)?;
    let mut bld = f.builder();
    candle_core::builder_arg!(bld, p, dp, ds);
    if warp {
        candle_core::builder_arg!(bld, rows as i64, t as i32, scale as f32);
        // SAFETY: as above.
        unsafe { bld.launch(warp_rows_cfg(rows)) }.w()?;
    } else {
        candle_core::builder_arg!(bld, t as i32, scale as f32);
        // SAFETY: as above.
        unsafe { bld.launch(rows_cfg(rows)) }.w()?;
    }
    Ok(())
}
