//! CUDA launches of the fused kernels in `kernels.cu` (compiled to PTX by build.rs): masked
//! softmax and RMSNorm, forward and backward, for bf16 and f32 storage with f32 arithmetic.
//! Their CPU references are the CPU paths of the same ops; `singlora-lab gpu-check` compares them.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, Storage, Tensor};

pub mod attention;
pub mod prof;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "singlora_kernels";
const THREADS: u32 = 256;

static VECTORISED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether the pointer launchers may use the 8-wide kernels (on by default; the device check
/// turns them off to compare against the scalar ones).
pub fn set_vectorised(on: bool) {
    VECTORISED.store(on, std::sync::atomic::Ordering::Relaxed);
}

static LOW_RANK_EPILOGUE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether the CUDA fast path may add adapters' rank-r terms in the kernels that consume the
/// projections' outputs (`raw::add_lr`, `raw::swiglu_fwd_lr`) instead of in a GEMM of their
/// own (on by default; the device check compares).
pub fn set_low_rank_epilogue(on: bool) {
    LOW_RANK_EPILOGUE.store(on, std::sync::atomic::Ordering::Relaxed);
}

static G_PASS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether the CUDA fast path may compute an adapter's g·U and gᵀ·h in one pass over the
/// output gradient g (`raw::g_pass`) instead of two GEMMs (on by default; the device check
/// compares).
pub fn set_g_pass(on: bool) {
    G_PASS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The 8-wide variant applies: 16-byte aligned pointers and a length (or row width) that is
/// a multiple of 8.
fn v8(ptrs: &[u64], n: usize) -> bool {
    VECTORISED.load(std::sync::atomic::Ordering::Relaxed)
        && n % 8 == 0
        && ptrs.iter().all(|p| p % 16 == 0)
}

/// The kernel name, with `_v8` when the 8-wide variant applies.
fn pick(name: &str, vec: bool, bf16: bool) -> String {
    let suf = if bf16 { "bf16" } else { "f32" };
    if vec {
        format!("{name}_v8_{suf}")
    } else {
        format!("{name}_{suf}")
    }
}

/// Launch shape of an 8-wide grid-stride kernel over n elements.
fn v8_cfg(n: usize) -> LaunchConfig {
    elems_cfg(n / 8)
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Per lane, the values a warp-per-row kernel holds in registers (rows up to 32 × this).
const WARP_ROW_MAX: usize = 32;

/// Blocks of 8 warps, a warp per row.
fn warp_rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn contiguous<'a, T>(
    s: &'a CudaSlice<T>,
    l: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

/// The kernel-name suffix and storage for a float storage.
macro_rules! float_slice {
    ($s:expr, $what:expr, |$sl:ident, $suf:ident, $t:ident| $body:expr) => {
        match $s {
            CudaStorageSlice::BF16($sl) => {
                type $t = half::bf16;
                let $suf = "bf16";
                $body
            }
            CudaStorageSlice::F32($sl) => {
                type $t = f32;
                let $suf = "f32";
                $body
            }
            _ => candle_core::bail!("{}: bf16 or f32 expected", $what),
        }
    };
}

fn wrap<T: candle_core::cuda_backend::CudaDType>(
    dst: CudaSlice<T>,
    dev: &CudaDevice,
) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(dst, dev.clone())
}

fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel that follows.
    unsafe { dev.alloc::<T>(n) }
}

pub fn masked_softmax_fwd(
    s: &CudaStorage,
    l: &Layout,
    key_lens: &[usize],
    causal: bool,
    scale: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dims = l.dims();
    let (b, h, tq, tk) = (dims[0], dims[1], dims[2], dims[3]);
    if key_lens.len() != b {
        candle_core::bail!(
            "masked softmax: {} key lengths for a batch of {b}",
            key_lens.len()
        );
    }
    let dev = &s.device;
    let lens: Vec<u32> = key_lens.iter().map(|&x| x as u32).collect();
    let lens = dev.clone_htod(&lens)?;
    let n = l.shape().elem_count();
    float_slice!(&s.slice, "masked softmax", |src, suf, T| {
        let src = contiguous(src, l, "masked softmax")?;
        let dst = alloc::<T>(dev, n)?;
        let rows = b * h * tq;
        if tk <= 32 * WARP_ROW_MAX {
            let f = dev.get_or_load_custom_func(
                &format!("masked_softmax_fwd_warp_{suf}"),
                MODULE,
                PTX,
            )?;
            let mut bld = f.builder();
            bld.arg(&src);
            bld.arg(&dst);
            bld.arg(&lens);
            candle_core::builder_arg!(
                bld,
                rows as i64,
                h as i32,
                tq as i32,
                tk as i32,
                scale as f32,
                i32::from(causal)
            );
            // SAFETY: the arguments match the kernel's signature; a warp per row.
            unsafe { bld.launch(warp_rows_cfg(rows)) }.w()?;
        } else {
            let f =
                dev.get_or_load_custom_func(&format!("masked_softmax_fwd_{suf}"), MODULE, PTX)?;
            let mut bld = f.builder();
            bld.arg(&src);
            bld.arg(&dst);
            bld.arg(&lens);
            candle_core::builder_arg!(
                bld,
                h as i32,
                tq as i32,
                tk as i32,
                scale as f32,
                i32::from(causal)
            );
            // SAFETY: the arguments match the kernel's signature; grids cover b·h·tq rows.
            unsafe { bld.launch(rows_cfg(rows)) }.w()?;
        }
        Ok((wrap(dst, dev), l.shape().clone()))
    })
}

pub fn masked_softmax_bwd(
    p: &CudaStorage,
    lp: &Layout,
    dp: &CudaStorage,
    ldp: &Layout,
    scale: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let tk = *lp.dims().last().unwrap();
    let n = lp.shape().elem_count();
    let dev = &p.device;
    float_slice!(&p.slice, "softmax backward", |ps, suf, T| {
        let pv = contiguous(ps, lp, "softmax backward")?;
        let dps = dp.as_cuda_slice::<T>()?;
        let dpv = contiguous(dps, ldp, "softmax backward")?;
        let dst = alloc::<T>(dev, n)?;
        let rows = n / tk;
        let warp = tk <= 32 * WARP_ROW_MAX;
        let name = if warp {
            format!("masked_softmax_bwd_warp_{suf}")
        } else {
            format!("masked_softmax_bwd_{suf}")
        };
        let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&pv);
        bld.arg(&dpv);
        bld.arg(&dst);
        if warp {
            candle_core::builder_arg!(bld, rows as i64, tk as i32, scale as f32);
            // SAFETY: as above; a warp per row.
            unsafe { bld.launch(warp_rows_cfg(rows)) }.w()?;
        } else {
            candle_core::builder_arg!(bld, tk as i32, scale as f32);
            // SAFETY: as above.
            unsafe { bld.launch(rows_cfg(rows)) }.w()?;
        }
        Ok((wrap(dst, dev), lp.shape().clone()))
    })
}

/// Runs `f` with a view of an f32 CUDA tensor (a frozen norm weight).
fn with_f32_view<R>(
    t: &Tensor,
    f: impl FnOnce(CudaView<'_, f32>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(c) => f(contiguous(
            c.as_cuda_slice::<f32>()?,
            layout,
            "norm weight",
        )?),
        _ => candle_core::bail!("norm weight: expected a CUDA tensor"),
    }
}

pub fn rms_norm_fwd(
    x: &CudaStorage,
    l: &Layout,
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    with_f32_view(w, |wd| rms_norm_fwd_with(x, l, wd, eps))
}

fn rms_norm_fwd_with(
    x: &CudaStorage,
    l: &Layout,
    wd: CudaView<'_, f32>,
    eps: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let d = *l.dims().last().unwrap();
    let n = l.shape().elem_count();
    let dev = &x.device;
    float_slice!(&x.slice, "rms norm", |xs, suf, T| {
        let xv = contiguous(xs, l, "rms norm")?;
        let dst = alloc::<T>(dev, n)?;
        let f = dev.get_or_load_custom_func(&format!("rms_norm_fwd_{suf}"), MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&xv);
        bld.arg(&wd);
        bld.arg(&dst);
        candle_core::builder_arg!(bld, d as i32, eps as f32);
        // SAFETY: as above.
        unsafe { bld.launch(rows_cfg(n / d)) }.w()?;
        Ok((wrap(dst, dev), l.shape().clone()))
    })
}

pub fn rms_norm_bwd(
    x: &CudaStorage,
    lx: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    with_f32_view(w, |wd| rms_norm_bwd_with(x, lx, g, lg, wd, eps))
}

fn rms_norm_bwd_with(
    x: &CudaStorage,
    lx: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    wd: CudaView<'_, f32>,
    eps: f64,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let d = *lx.dims().last().unwrap();
    let n = lx.shape().elem_count();
    let dev = &x.device;
    float_slice!(&x.slice, "rms norm backward", |xs, suf, T| {
        let xv = contiguous(xs, lx, "rms norm backward")?;
        let gs = g.as_cuda_slice::<T>()?;
        let gv = contiguous(gs, lg, "rms norm backward")?;
        let dst = alloc::<T>(dev, n)?;
        let f = dev.get_or_load_custom_func(&format!("rms_norm_bwd_{suf}"), MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&xv);
        bld.arg(&wd);
        bld.arg(&gv);
        bld.arg(&dst);
        candle_core::builder_arg!(bld, d as i32, eps as f32);
        // SAFETY: as above.
        unsafe { bld.launch(rows_cfg(n / d)) }.w()?;
        Ok((wrap(dst, dev), lx.shape().clone()))
    })
}

/// A grid-stride launch over `n` elements.
fn elems_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 16);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The head split with RoPE (see `rope_split` in kernels.cu): forward from (b, t, n·hd) to
/// (b, n, t, hd); `inverse` from (b, n, t, hd) back to (b, t, n·hd) with the opposite rotation.
#[allow(clippy::too_many_arguments)]
pub fn rope_split(
    src: &CudaStorage,
    l: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    (b, t, n, hd): (usize, usize, usize, usize),
    rotate: bool,
    inverse: bool,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = &src.device;
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
    with_f32_view(cos, |cs| {
        with_f32_view(sin, |sn| {
            float_slice!(&src.slice, "rope split", |xs, suf, T| {
                let xv = contiguous(xs, l, "rope split")?;
                let dst = alloc::<T>(dev, total)?;
                let f = dev.get_or_load_custom_func(&format!("rope_split_{suf}"), MODULE, PTX)?;
                let mut bld = f.builder();
                bld.arg(&xv);
                bld.arg(&dst);
                bld.arg(&cs);
                bld.arg(&sn);
                candle_core::builder_arg!(
                    bld,
                    b as i32,
                    t as i32,
                    n as i32,
                    hd as i32,
                    i32::from(rotate),
                    i32::from(inverse)
                );
                // SAFETY: the arguments match the kernel's signature; the grid strides over
                // every pair.
                unsafe { bld.launch(elems_cfg(total / 2)) }.w()?;
                Ok((wrap(dst, dev), out_shape.clone()))
            })
        })
    })
}

/// silu(g)·u.
pub fn swiglu_fwd(
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let n = lg.shape().elem_count();
    let dev = &g.device;
    float_slice!(&g.slice, "swiglu", |gs, suf, T| {
        let gv = contiguous(gs, lg, "swiglu")?;
        let us = u.as_cuda_slice::<T>()?;
        let uv = contiguous(us, lu, "swiglu")?;
        let dst = alloc::<T>(dev, n)?;
        let f = dev.get_or_load_custom_func(&format!("swiglu_fwd_{suf}"), MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&gv);
        bld.arg(&uv);
        bld.arg(&dst);
        candle_core::builder_arg!(bld, n as i64);
        // SAFETY: as above.
        unsafe { bld.launch(elems_cfg(n)) }.w()?;
        Ok((wrap(dst, dev), lg.shape().clone()))
    })
}

/// (dg, du) of silu(g)·u stacked into one (2, …) buffer.
pub fn swiglu_bwd(
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let n = lg.shape().elem_count();
    let dev = &g.device;
    let mut dims = vec![2];
    dims.extend_from_slice(lg.dims());
    float_slice!(&g.slice, "swiglu backward", |gs, suf, T| {
        let gv = contiguous(gs, lg, "swiglu backward")?;
        let us = u.as_cuda_slice::<T>()?;
        let uv = contiguous(us, lu, "swiglu backward")?;
        let dys = dy.as_cuda_slice::<T>()?;
        let dyv = contiguous(dys, ldy, "swiglu backward")?;
        let dst = alloc::<T>(dev, 2 * n)?;
        let f = dev.get_or_load_custom_func(&format!("swiglu_bwd_{suf}"), MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&gv);
        bld.arg(&uv);
        bld.arg(&dyv);
        bld.arg(&dst);
        candle_core::builder_arg!(bld, n as i64);
        // SAFETY: as above.
        unsafe { bld.launch(elems_cfg(n)) }.w()?;
        Ok((wrap(dst, dev), Shape::from(dims)))
    })
}

/// A row-major matrix operand for [`gemm`]: device pointer, leading (row) stride, and whether
/// the operand is the transpose of the matrix stored there.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: u64,
    pub ld: usize,
    pub trans: bool,
}

/// C (m × n, row-major, contiguous) ← alpha·A·B + beta·C through cuBLAS (f32 accumulation),
/// all operands of one storage type (bf16 or f32). Row-major C = A·B is column-major
/// Cᵀ = Bᵀ·Aᵀ, so the operands go to cuBLAS swapped.
///
/// # Safety
/// The pointers must address live device buffers of the given shapes, on `dev`'s stream.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    dev: &CudaDevice,
    bf16: bool,
    mnk: (usize, usize, usize),
    a: Mat,
    b: Mat,
    c: u64,
    alpha: f32,
    beta: f32,
) -> candle_core::Result<()> {
    gemm_out(dev, bf16, bf16, mnk, a, b, c, alpha, beta)
}

/// cuBLAS's operation flag for an operand given transposed (`t`) or not.
pub(crate) fn cublas_op(
    t: bool,
) -> candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t {
    use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t as Op;
    if t {
        Op::CUBLAS_OP_T
    } else {
        Op::CUBLAS_OP_N
    }
}

/// cuBLAS's type for bf16 (`true`) or f32 storage.
pub(crate) fn cublas_type(
    bf16: bool,
) -> candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType_t {
    use candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType_t as T;
    if bf16 {
        T::CUDA_R_16BF
    } else {
        T::CUDA_R_32F
    }
}

/// [`gemm`] with C stored as bf16 (`c_bf16`) or f32 whatever A and B are (an f32 gradient of
/// an f32 parameter from bf16 activations).
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_out(
    dev: &CudaDevice,
    bf16: bool,
    c_bf16: bool,
    (m, n, k): (usize, usize, usize),
    a: Mat,
    b: Mat,
    c: u64,
    alpha: f32,
    beta: f32,
) -> candle_core::Result<()> {
    gemm_out_ld(dev, bf16, c_bf16, (m, n, k), a, b, (c, n), alpha, beta)
}

/// [`gemm_out`] with C's row stride given (`c` = pointer and stride): C a column block of a
/// wider matrix.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_out_ld(
    dev: &CudaDevice,
    bf16: bool,
    c_bf16: bool,
    (m, n, k): (usize, usize, usize),
    a: Mat,
    b: Mat,
    (c, ldc): (u64, usize),
    alpha: f32,
    beta: f32,
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::{result, sys};
    let dt = cublas_type(bf16);
    let blas = dev.cublas_handle();
    result::gemm_ex(
        *blas.handle(),
        cublas_op(b.trans),
        cublas_op(a.trans),
        n as i32,
        m as i32,
        k as i32,
        (&alpha) as *const f32 as *const _,
        b.ptr as *const _,
        dt,
        b.ld as i32,
        a.ptr as *const _,
        dt,
        a.ld as i32,
        (&beta) as *const f32 as *const _,
        c as *mut _,
        cublas_type(c_bf16),
        ldc as i32,
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .map_err(|e| candle_core::Error::Cuda(Box::new(e)))
}

/// C ← A (or Aᵀ with `trans`) + beta·C for f32 matrices in cuBLAS's column-major terms:
/// C is m × n with stride `ldc`, A is m × n (n × m transposed) with stride `lda` (cuBLAS geam,
/// C in place).
///
/// # Safety
/// The pointers must address live f32 device buffers of those shapes, on `dev`'s stream.
pub unsafe fn geam_f32(
    dev: &CudaDevice,
    trans: bool,
    (m, n): (usize, usize),
    (a, lda): (u64, usize),
    beta: f32,
    (c, ldc): (u64, usize),
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::sys;
    let blas = dev.cublas_handle();
    let one = 1f32;
    let status = sys::cublasSgeam(
        *blas.handle(),
        cublas_op(trans),
        cublas_op(false),
        m as i32,
        n as i32,
        &one,
        a as *const f32,
        lda as i32,
        &beta,
        c as *const f32,
        ldc as i32,
        c as *mut f32,
        ldc as i32,
    );
    if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        candle_core::bail!("cublasSgeam failed: {status:?}");
    }
    Ok(())
}

/// A 2-D operand of a fused linear op on the device: pointer and row stride (unit column
/// stride required), with whether it is stored as bf16.
pub fn mat_of(s: &CudaStorage, l: &Layout, what: &str) -> candle_core::Result<(Mat, bool)> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let st = l.stride();
    if st.len() != 2 || st[1] != 1 {
        candle_core::bail!(
            "{what}: a 2-D operand with unit column stride expected, got strides {st:?}"
        );
    }
    let stream = s.device.cuda_stream();
    let (ptr, bf16) = match &s.slice {
        CudaStorageSlice::BF16(x) => {
            let v = x.slice(l.start_offset()..);
            let p = v.device_ptr(&stream).0;
            (p, true)
        }
        CudaStorageSlice::F32(x) => {
            let v = x.slice(l.start_offset()..);
            let p = v.device_ptr(&stream).0;
            (p, false)
        }
        _ => candle_core::bail!("{what}: bf16 or f32 expected"),
    };
    Ok((
        Mat {
            ptr,
            ld: st[0],
            trans: false,
        },
        bf16,
    ))
}

/// [`mat_of`] for a tensor (a frozen weight held by the op).
pub fn mat_of_tensor(t: &Tensor, what: &str) -> candle_core::Result<(Mat, bool)> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(c) => mat_of(c, layout, what),
        _ => candle_core::bail!("{what}: expected a CUDA tensor"),
    }
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
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let stream = dev.cuda_stream();
    macro_rules! make {
        ($t:ty, $suf:expr) => {{
            let dst = alloc::<$t>(dev, m * n)?;
            let ptr = dst.device_ptr(&stream).0;
            let had = if let Some(b) = bias {
                let b = b.contiguous()?;
                let (bs, bl) = b.storage_and_layout();
                let Storage::Cuda(bs) = &*bs else {
                    candle_core::bail!("linear bias: expected a CUDA tensor")
                };
                let bv = contiguous(bs.as_cuda_slice::<$t>()?, bl, "linear bias")?;
                let f = dev.get_or_load_custom_func(&format!("bias_rows_{}", $suf), MODULE, PTX)?;
                let mut bld = f.builder();
                bld.arg(&bv);
                bld.arg(&dst);
                candle_core::builder_arg!(bld, m as i64, n as i32);
                // SAFETY: the arguments match the kernel's signature.
                unsafe { bld.launch(elems_cfg(m * n)) }.w()?;
                true
            } else {
                false
            };
            (wrap(dst, dev), ptr, had)
        }};
    }
    Ok(if bf16 {
        make!(half::bf16, "bf16")
    } else {
        make!(f32, "f32")
    })
}

/// A fresh buffer of `n` elements of the given type (bf16 or f32) and its pointer.
pub fn fresh(dev: &CudaDevice, bf16: bool, n: usize) -> candle_core::Result<(CudaStorage, u64)> {
    let s = if bf16 {
        wrap(alloc::<half::bf16>(dev, n)?, dev)
    } else {
        wrap(alloc::<f32>(dev, n)?, dev)
    };
    let p = ptr_of(&s)?;
    Ok((s, p))
}

/// The device pointer of a bf16 or f32 storage (its start).
pub fn ptr_of(s: &CudaStorage) -> candle_core::Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let stream = s.device.cuda_stream();
    let p = match &s.slice {
        CudaStorageSlice::BF16(x) => x.device_ptr(&stream).0,
        CudaStorageSlice::F32(x) => x.device_ptr(&stream).0,
        _ => candle_core::bail!("bf16 or f32 storage expected"),
    };
    Ok(p)
}

/// The device pointer of a contiguous CUDA tensor of one of `dtypes` (bf16, f32 or u32), at
/// its first element.
pub fn tensor_ptr(t: &Tensor, what: &str, dtypes: &[DType]) -> candle_core::Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(c) = &*st else {
        candle_core::bail!("{what}: expected a CUDA tensor")
    };
    if !l.is_contiguous() {
        candle_core::bail!("{what}: expected a contiguous tensor");
    }
    if !dtypes.contains(&t.dtype()) {
        candle_core::bail!("{what}: {dtypes:?} expected, got {:?}", t.dtype());
    }
    let stream = c.device.cuda_stream();
    let p = match &c.slice {
        CudaStorageSlice::BF16(x) => x.device_ptr(&stream).0,
        CudaStorageSlice::F32(x) => x.device_ptr(&stream).0,
        CudaStorageSlice::U32(x) => x.device_ptr(&stream).0,
        _ => candle_core::bail!("{what}: bf16, f32 or u32 expected"),
    };
    Ok(p + (t.dtype().size_in_bytes() * l.start_offset()) as u64)
}

/// [`tensor_ptr`] of a bf16 tensor, and its device.
fn bf16_ptr(t: &Tensor, what: &str) -> candle_core::Result<(u64, CudaDevice)> {
    let p = tensor_ptr(t, what, &[DType::BF16])?;
    match t.device() {
        candle_core::Device::Cuda(d) => Ok((p, d.clone())),
        _ => candle_core::bail!("{what}: expected a CUDA tensor"),
    }
}

/// One adapter's term for [`add_low_rank`] and [`swiglu_low_rank`]: h = columns
/// `off..off + r` of `h` (m × w), U (n × r), the scale c.
pub type Term<'a> = (&'a Tensor, usize, &'a Tensor, f32);

fn term(t: &Term, n: usize) -> candle_core::Result<raw::LowRank> {
    let (h, off, u, c) = *t;
    let (_, w) = h.dims2()?;
    let (un, r) = u.dims2()?;
    if un != n || off + r > w {
        candle_core::bail!("low-rank term: U {un} × {r} for {n} columns, h {w} wide at {off}");
    }
    Ok(raw::LowRank {
        h: bf16_ptr(h, "h")?.0 + 2 * off as u64,
        ldh: w,
        u: bf16_ptr(u, "U")?.0,
        r,
        c,
    })
}

/// a + (b + c·h·Uᵀ) (bf16, m × n) through the low-rank epilogue kernel: the device check's
/// entry to it (the fast path calls `raw::add_lr` on its own buffers).
pub fn add_low_rank(a: &Tensor, b: &Tensor, t: Term) -> candle_core::Result<Tensor> {
    let (m, n) = a.dims2()?;
    let y = a.zeros_like()?;
    let (ap, dev) = bf16_ptr(a, "a")?;
    let lr = term(&t, n)?;
    raw::add_lr(
        &dev,
        (ap, bf16_ptr(b, "b")?.0, bf16_ptr(&y, "y")?.0),
        (m, n),
        &lr,
    )?;
    Ok(y)
}

/// (g·U (bf16, m × r), out + c·gᵀ·h (f32, n × r)) for g (m × n), U (n × r) and h (m × r),
/// all bf16, through the one-pass kernel (`raw::g_pass`): the device check's entry to it.
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
    if !raw::g_pass_ok(true, gp, n, r) {
        candle_core::bail!("g_pass: not for r = {r}, {n} columns (or switched off)");
    }
    let gu = Tensor::zeros((m, r), DType::BF16, g.device())?;
    let out = out.to_dtype(DType::F32)?.copy()?;
    raw::g_pass(
        &dev,
        (gp, m, n),
        (bf16_ptr(u, "U")?.0, bf16_ptr(h, "h")?.0, r, r),
        (bf16_ptr(&gu, "g_U")?.0, r),
        (tensor_ptr(&out, "out", &[DType::F32])?, c, 1.0),
    )?;
    Ok((gu, out))
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
    raw::swiglu_fwd_lr(
        &dev,
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
    raw::swiglu_bwd_lr(
        &dev,
        (
            gp,
            bf16_ptr(u, "u")?.0,
            bf16_ptr(dy, "dy")?.0,
            bf16_ptr(&out, "out")?.0,
        ),
        (m, n),
        [terms[0].as_ref(), terms[1].as_ref(), terms[2].as_ref()],
    )?;
    Ok((out.get(0)?, out.get(1)?))
}

/// RoPE and the head split of x (b, t, n·hd, bf16) with the term added to x first (`rotate`
/// false: the split alone), through the low-rank epilogue kernel: (b, n, t, hd). cos and sin
/// f32 (t, hd), as `rope_split` takes them.
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
    raw::rope_split_lr(
        &dev,
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

/// The AdamW hyper-parameters of one update shared by every parameter (each [`AdamWJob`] has
/// its own learning rate and decay), as the kernel takes them.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub bc1: f32,
    pub bc2: f32,
}

/// One parameter's part of [`adamw_multi`]: the f32 parameter, its moments and its gradient
/// (contiguous, `n` elements each, on one device), its learning rate and decay factor
/// (1 − lr·wd).
#[derive(Clone, Copy, Debug)]
pub struct AdamWJob {
    pub p: u64,
    pub m: u64,
    pub v: u64,
    pub g: u64,
    pub n: usize,
    pub lr: f32,
    pub decay: f32,
}

/// Every job's AdamW update in one launch (`adamw_multi_f32`).
///
/// # Safety
/// Each job's pointers must be live f32 buffers of its n elements on `dev`, p, m and v owned
/// by the caller for the update, and no two jobs may share a p, m or v.
pub unsafe fn adamw_multi(
    dev: &CudaDevice,
    jobs: &[AdamWJob],
    h: AdamWStep,
) -> candle_core::Result<()> {
    let Some(most) = jobs.iter().map(|j| j.n).max() else {
        return Ok(());
    };
    if jobs.len() > 65535 {
        candle_core::bail!("adamw_multi: {} parameters in one launch", jobs.len());
    }
    // the kernel's AdamWJob: four pointers, the length, lr and decay (48 bytes)
    let table: Vec<u64> = jobs
        .iter()
        .flat_map(|j| {
            let scal = u64::from(j.lr.to_bits()) | (u64::from(j.decay.to_bits()) << 32);
            [j.p, j.m, j.v, j.g, j.n as u64, scal]
        })
        .collect();
    let table = dev.clone_htod(&table)?;
    let f = dev.get_or_load_custom_func("adamw_multi_f32", MODULE, PTX)?;
    let mut bld = f.builder();
    bld.arg(&table);
    candle_core::builder_arg!(bld, h.beta1, h.beta2, h.eps, h.bc1, h.bc2);
    let cfg = LaunchConfig {
        grid_dim: (
            most.div_ceil(THREADS as usize).min(64) as u32,
            jobs.len() as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the caller's, for the jobs; the table lives until the launch is queued and is
    // freed in stream order.
    unsafe { bld.launch(cfg) }.w()?;
    Ok(())
}

/// Row-wise and elementwise kernels on raw pointers, for code that drives whole layers (the
/// LLaMA fast path): `suf` picks the storage type.
pub mod raw {
    use super::*;

    fn suf(bf16: bool) -> &'static str {
        if bf16 {
            "bf16"
        } else {
            "f32"
        }
    }

    /// y = RMSNorm(x)·w over rows of d.
    pub fn rms_fwd(
        dev: &CudaDevice,
        bf16: bool,
        (x, w, y): (u64, u64, u64),
        rows: usize,
        d: usize,
        eps: f64,
    ) -> candle_core::Result<()> {
        let vec = super::v8(&[x, w, y], d);
        let f =
            dev.get_or_load_custom_func(&super::pick("rms_norm_fwd", vec, bf16), MODULE, PTX)?;
        let mut bld = f.builder();
        candle_core::builder_arg!(bld, x, w, y, d as i32, eps as f32);
        // SAFETY: live buffers of rows × d (w: d f32).
        unsafe { bld.launch(rows_cfg(rows)) }.w()?;
        Ok(())
    }

    /// dx += RMSNorm backward(x, g).
    pub fn rms_bwd_acc(
        dev: &CudaDevice,
        bf16: bool,
        (x, w, g, dx): (u64, u64, u64, u64),
        rows: usize,
        d: usize,
        eps: f64,
    ) -> candle_core::Result<()> {
        let vec = super::v8(&[x, w, g, dx], d);
        let f =
            dev.get_or_load_custom_func(&super::pick("rms_norm_bwd_acc", vec, bf16), MODULE, PTX)?;
        let mut bld = f.builder();
        candle_core::builder_arg!(bld, x, w, g, dx, d as i32, eps as f32);
        // SAFETY: as above.
        unsafe { bld.launch(rows_cfg(rows)) }.w()?;
        Ok(())
    }

    /// y = silu(g)·u over n elements.
    pub fn swiglu_fwd(
        dev: &CudaDevice,
        bf16: bool,
        (g, u, y): (u64, u64, u64),
        n: usize,
    ) -> candle_core::Result<()> {
        let vec = super::v8(&[g, u, y], n);
        let f = dev.get_or_load_custom_func(&super::pick("swiglu_fwd", vec, bf16), MODULE, PTX)?;
        let mut bld = f.builder();
        candle_core::builder_arg!(bld, g, u, y, n as i64);
        let cfg = if vec { super::v8_cfg(n) } else { elems_cfg(n) };
        // SAFETY: live buffers of n elements.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(())
    }

    /// out[0..n) = dg, out[n..2n) = du.
    pub fn swiglu_bwd(
        dev: &CudaDevice,
        bf16: bool,
        (g, u, dy, out): (u64, u64, u64, u64),
        n: usize,
    ) -> candle_core::Result<()> {
        let el = if bf16 { 2 } else { 4 };
        let vec = super::v8(&[g, u, dy, out, out + (el * n) as u64], n);
        let f = dev.get_or_load_custom_func(&super::pick("swiglu_bwd", vec, bf16), MODULE, PTX)?;
        let mut bld = f.builder();
        candle_core::builder_arg!(bld, g, u, dy, out, n as i64);
        let cfg = if vec { super::v8_cfg(n) } else { elems_cfg(n) };
        // SAFETY: live buffers of n (out: 2n) elements.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(())
    }

    /// y = x·diag(s) (+ b), x (m, n), s f32 (n); `b` 0 for none.
    pub fn col_scale(
        dev: &CudaDevice,
        bf16: bool,
        (x, s, b, y): (u64, u64, u64, u64),
        m: usize,
        n: usize,
    ) -> candle_core::Result<()> {
        let f = dev.get_or_load_custom_func(&format!("col_scale_{}", suf(bf16)), MODULE, PTX)?;
        let mut bld = f.builder();
        candle_core::builder_arg!(bld, x, s, b, y, m as i64, n as i32);
        // SAFETY: live buffers of m × n (s, b: n).
        unsafe { bld.launch(elems_cfg(m * n)) }.w()?;
        Ok(())
    }

    /// out[j] += w[j]·Σ_i a[i, j]·b[i, j] (out, w f32 (n)).
    pub fn col_dot(
        dev: &CudaDevice,
        bf16: bool,
        (a, b, w, out): (u64, u64, u64, u64),
        m: usize,
        n: usize,
    ) -> candle_core::Result<()> {
        let f = dev.get_or_load_custom_func(&format!("col_dot_{}", suf(bf16)), MODULE, PTX)?;
        let rows_per = 64usize;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256) as u32, m.div_ceil(rows_per) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut bld = f.builder();
        candle_core::builder_arg!(bld, a, b, w, out, m as i64, n as i32, rows_per as i32);
        // SAFETY: live buffers of m × n (w, out: n).
        unsafe { bld.launch(cfg) }.w()?;
        Ok(())
    }

    /// Whether the 8-wide kernels take rows of `d` at these pointers (see `v8`).
    pub fn v8_ok(ptrs: &[u64], d: usize) -> bool {
        super::v8(ptrs, d)
    }

    /// y[i] = RMSNorm(x[rows[i]])·w for the n rows listed (u32 indices): a gather and the
    /// norm in one pass. d a multiple of 8, pointers 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_fwd_rows(
        dev: &CudaDevice,
        bf16: bool,
        (x, rows, w, y): (u64, u64, u64, u64),
        n: usize,
        d: usize,
        eps: f64,
    ) -> candle_core::Result<()> {
        if !super::v8(&[x, w, y], d) {
            candle_core::bail!("rms_fwd_rows: rows of a multiple of 8, 16-byte aligned");
        }
        let f = dev.get_or_load_custom_func(
            &super::pick("rms_norm_fwd_rows", true, bf16),
            MODULE,
            PTX,
        )?;
        let mut bld = f.builder();
        candle_core::builder_arg!(bld, x, rows, w, y, d as i32, eps as f32);
        // SAFETY: x holds every listed row of d; rows n u32; y n × d; w d f32.
        unsafe { bld.launch(rows_cfg(n)) }.w()?;
        Ok(())
    }

    /// dx[rows[i]] += RMSNorm backward(x[rows[i]], g[i]) for the n rows listed (distinct): the
    /// norm's backward and a scatter in one pass. As [`rms_fwd_rows`] on sizes.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_bwd_acc_rows(
        dev: &CudaDevice,
        bf16: bool,
        (x, rows, w, g, dx): (u64, u64, u64, u64, u64),
        n: usize,
        d: usize,
        eps: f64,
    ) -> candle_core::Result<()> {
        if !super::v8(&[x, w, g, dx], d) {
            candle_core::bail!("rms_bwd_acc_rows: rows of a multiple of 8, 16-byte aligned");
        }
        let f = dev.get_or_load_custom_func(
            &super::pick("rms_norm_bwd_acc_rows", true, bf16),
            MODULE,
            PTX,
        )?;
        let mut bld = f.builder();
        candle_core::builder_arg!(bld, x, rows, w, g, dx, d as i32, eps as f32);
        // SAFETY: as rms_fwd_rows, g n × d, dx as x.
        unsafe { bld.launch(rows_cfg(n)) }.w()?;
        Ok(())
    }

    /// Per row of logits z (n × c): out[i] = −log softmax(z_i)[t_i] (f32), and z overwritten
    /// by its gradient g·(softmax(z_i) − onehot(t_i)). c a multiple of 8, z 16-byte aligned.
    pub fn xent_grad_inplace(
        dev: &CudaDevice,
        bf16: bool,
        (z, t, out): (u64, u64, u64),
        n: usize,
        c: usize,
        g: f32,
    ) -> candle_core::Result<()> {
        if c % 8 != 0 || z % 16 != 0 {
            candle_core::bail!("xent_grad_inplace: rows of a multiple of 8, 16-byte aligned");
        }
        let f = dev.get_or_load_custom_func(
            &super::pick("xent_grad_inplace", true, bf16),
            MODULE,
            PTX,
        )?;
        let mut bld = f.builder();
        candle_core::builder_arg!(bld, z, t, out, c as i32, g);
        // SAFETY: live buffers of n × c (z), n (t: u32, out: f32) elements.
        unsafe { bld.launch(rows_cfg(n)) }.w()?;
        Ok(())
    }

    /// One adapter's rank-r term c·h·Uᵀ, for a kernel that consumes the projection's output
    /// to add (see `Lr` in kernels.cu): h (m × r) at row stride `ldh`, U (n × r) contiguous.
    #[derive(Clone, Copy, Debug)]
    pub struct LowRank {
        pub h: u64,
        pub ldh: usize,
        pub u: u64,
        pub r: usize,
        pub c: f32,
    }

    /// Rows each warp of the low-rank kernels walks (LR_ROWS in kernels.cu).
    const LR_ROWS: usize = 64;

    /// Whether the consumer kernels take this term for outputs of n columns: bf16, r 8 or
    /// 16, the 8-wide kernels and the epilogue on, 16-byte aligned rows of h and U.
    pub fn lr_ok(lr: &LowRank, bf16: bool, n: usize) -> bool {
        bf16 && LOW_RANK_EPILOGUE.load(std::sync::atomic::Ordering::Relaxed)
            && matches!(lr.r, 8 | 16)
            && super::v8(&[lr.h, lr.u], n)
            && (lr.ldh * 2) % 16 == 0
    }

    /// Warps of 32 columns, 4 to a block; LR_ROWS rows each.
    fn lr_cfg(m: usize, n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(128) as u32, m.div_ceil(LR_ROWS) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A term as the kernels take it: h, ldh, U, c.
    type KernelTerm = (u64, i64, u64, f32);

    /// The terms as the kernels take them, (h, ldh, U, c) each with a null h for an absent
    /// one, and their one rank; checked for `lr_ok` and the 8-wide kernels' `ptrs` and width.
    fn kernel_terms<const N: usize>(
        what: &str,
        terms: [Option<&LowRank>; N],
        ptrs: &[u64],
        n: usize,
    ) -> candle_core::Result<(usize, [KernelTerm; N])> {
        let present: Vec<&LowRank> = terms.iter().flatten().copied().collect();
        let Some(r) = present.first().map(|l| l.r) else {
            candle_core::bail!("{what}: no low-rank term");
        };
        if !super::v8(ptrs, n) || present.iter().any(|l| !lr_ok(l, true, n) || l.r != r) {
            candle_core::bail!("{what}: unsupported rank, width or alignment");
        }
        Ok((
            r,
            terms.map(|t| t.map_or((0, 0, 0, 0.0), |l| (l.h, l.ldh as i64, l.u, l.c))),
        ))
    }

    /// Launches `{name}{r}_bf16` with the arguments in the kernels' order: pointers, the row
    /// count (when given), int sizes, the terms, and `tail`.
    ///
    /// # Safety
    /// The arguments must match the kernel's signature and describe live buffers.
    unsafe fn launch_lr<const N: usize>(
        dev: &CudaDevice,
        name: &str,
        (r, terms): (usize, [KernelTerm; N]),
        (ptrs, rows, sizes): (&[u64], Option<i64>, &[i32]),
        tail: &[i32],
        cfg: LaunchConfig,
    ) -> candle_core::Result<()> {
        let f = dev.get_or_load_custom_func(&format!("{name}{r}_bf16"), MODULE, PTX)?;
        let mut bld = f.builder();
        for p in ptrs {
            bld.arg(p);
        }
        if let Some(m) = &rows {
            bld.arg(m);
        }
        for a in sizes {
            bld.arg(a);
        }
        for t in &terms {
            bld.arg(&t.0);
            bld.arg(&t.1);
            bld.arg(&t.2);
            bld.arg(&t.3);
        }
        for a in tail {
            bld.arg(a);
        }
        // SAFETY: the caller's.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(())
    }

    /// y = a + (b + c·h·Uᵀ) over m × n (the residual add after an adapted projection b).
    pub fn add_lr(
        dev: &CudaDevice,
        (a, b, y): (u64, u64, u64),
        (m, n): (usize, usize),
        lr: &LowRank,
    ) -> candle_core::Result<()> {
        let terms = kernel_terms("add_lr", [Some(lr)], &[a, b, y], n)?;
        // SAFETY: live buffers of m × n (h: m rows of ldh, U: n × r), checked above.
        unsafe {
            launch_lr(
                dev,
                "add_lr",
                terms,
                (&[a, b, y], Some(m as i64), &[n as i32]),
                &[],
                lr_cfg(m, n),
            )
        }
    }

    /// y = silu(g')·u' over m × n, g' = g + (its term) and u' likewise; with `writeback`,
    /// g' and u' written over g and u. At least one term; both of one rank.
    pub fn swiglu_fwd_lr(
        dev: &CudaDevice,
        (g, u, y): (u64, u64, u64),
        (m, n): (usize, usize),
        (lg, lu): (Option<&LowRank>, Option<&LowRank>),
        writeback: bool,
    ) -> candle_core::Result<()> {
        let terms = kernel_terms("swiglu_fwd_lr", [lg, lu], &[g, u, y], n)?;
        // SAFETY: as add_lr, for both terms (a null h: none).
        unsafe {
            launch_lr(
                dev,
                "swiglu_fwd_lr",
                terms,
                (&[g, u, y], Some(m as i64), &[n as i32]),
                &[i32::from(writeback)],
                lr_cfg(m, n),
            )
        }
    }

    /// SwiGLU's backward over m × n into out (2·m·n: dg, then du) with terms on g and u (as
    /// [`swiglu_fwd_lr`] without writeback) and on dy. At least one term; all of one rank.
    pub fn swiglu_bwd_lr(
        dev: &CudaDevice,
        (g, u, dy, out): (u64, u64, u64, u64),
        (m, n): (usize, usize),
        terms: [Option<&LowRank>; 3],
    ) -> candle_core::Result<()> {
        let ptrs = [g, u, dy, out, out + (2 * m * n) as u64];
        let terms = kernel_terms("swiglu_bwd_lr", terms, &ptrs, n)?;
        // SAFETY: as add_lr, for the three terms (a null h: none); out 2·m·n.
        unsafe {
            launch_lr(
                dev,
                "swiglu_bwd_lr",
                terms,
                (&[g, u, dy, out], Some(m as i64), &[n as i32]),
                &[],
                lr_cfg(m, n),
            )
        }
    }

    /// RoPE and the head split of x (b, t, n·hd) into (b, n, t, hd), with the projection's
    /// term added to x on the way in (`rotate` false: the split alone, for v). hd a multiple
    /// of 64 (a warp takes 32 columns of each half of a head).
    pub fn rope_split_lr(
        dev: &CudaDevice,
        (src, dst): (u64, u64),
        (cos, sin): (u64, u64),
        (b, t, n, hd): (usize, usize, usize, usize),
        rotate: bool,
        lr: &LowRank,
    ) -> candle_core::Result<()> {
        let terms = kernel_terms("rope_split_lr", [Some(lr)], &[src, dst, cos, sin], n * hd)?;
        if hd % 64 != 0 {
            candle_core::bail!("rope_split_lr: head size {hd} is not a multiple of 64");
        }
        let warps = n * hd / 64;
        let cfg = LaunchConfig {
            grid_dim: (
                warps.div_ceil(4) as u32,
                (b * t).div_ceil(LR_ROWS) as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let sizes = [b, t, n, hd, usize::from(rotate)].map(|v| v as i32);
        // SAFETY: src and dst of b·t·n·hd, the tables (t, hd) f32, the term as `add_lr`.
        unsafe {
            launch_lr(
                dev,
                "rope_split_lr",
                terms,
                (&[src, dst, cos, sin], None, &sizes),
                &[],
                cfg,
            )
        }
    }

    /// y = a + b over n elements.
    pub fn add(
        dev: &CudaDevice,
        bf16: bool,
        (a, b, y): (u64, u64, u64),
        n: usize,
    ) -> candle_core::Result<()> {
        let vec = super::v8(&[a, b, y], n);
        let f = dev.get_or_load_custom_func(&super::pick("add2", vec, bf16), MODULE, PTX)?;
        let mut bld = f.builder();
        candle_core::builder_arg!(bld, a, b, y, n as i64);
        let cfg = if vec { super::v8_cfg(n) } else { elems_cfg(n) };
        // SAFETY: live buffers of n elements.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(())
    }

    /// Whether [`g_pass`] takes an output gradient g of n columns with a rank-r adapter: bf16,
    /// r 8 or 16, whole 16-byte chunks of g's rows, and not switched off (by
    /// [`super::set_g_pass`], or `SINGLORA_UNFUSED_GPASS` read once).
    pub fn g_pass_ok(bf16: bool, g: u64, n: usize, r: usize) -> bool {
        static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        bf16 && matches!(r, 8 | 16)
            && n % 8 == 0
            && g % 16 == 0
            && super::G_PASS.load(std::sync::atomic::Ordering::Relaxed)
            && *ENV.get_or_init(|| std::env::var_os("SINGLORA_UNFUSED_GPASS").is_none())
    }

    /// An adapter's two products with its projection's output gradient g (m × n) in one pass
    /// over g (see `gpass` in kernels.cu): g_U = g·U (bf16, m × r at row stride `ldgu`) and
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
        let (pg, pgp) = fresh(dev, false, ng * m * r)?;
        let (pu, pup) = fresh(dev, false, nu * n * r)?;
        let f = dev.get_or_load_custom_func(&format!("gpass{r}"), MODULE, PTX)?;
        let mut bld = f.builder();
        candle_core::builder_arg!(bld, g, m as i64, n as i32, u, h, ldh as i64, pgp, pup);
        let cfg = LaunchConfig {
            grid_dim: (ng as u32, nu as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: g m × n, U n × r, h m rows of ldh, the partials ng·m·r and nu·n·r f32.
        unsafe { bld.launch(cfg) }.w()?;
        let f = dev.get_or_load_custom_func(&format!("gpass_sum{r}"), MODULE, PTX)?;
        let mut bld = f.builder();
        candle_core::builder_arg!(
            bld,
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
        );
        let mut cfg = elems_cfg(m.max(n) * r);
        cfg.grid_dim.1 = 2;
        // SAFETY: the partials above; g_U m rows of ldgu, out n × r f32.
        unsafe { bld.launch(cfg) }.w()?;
        drop((pg, pu));
        Ok(())
    }
}

/// Cross-entropy rows of logits (n, c) against u32 targets: (n, 2) f32 of (nll, lse).
pub fn xent_fwd(
    z: &CudaStorage,
    lz: &Layout,
    t: &CudaStorage,
    lt: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, c) = lz.shape().dims2()?;
    let dev = &z.device;
    let tv = contiguous(t.as_cuda_slice::<u32>()?, lt, "cross-entropy targets")?;
    float_slice!(&z.slice, "cross-entropy", |zs, suf, _T| {
        let zv = contiguous(zs, lz, "cross-entropy logits")?;
        let dst = alloc::<f32>(dev, 2 * n)?;
        let f = dev.get_or_load_custom_func(&format!("xent_fwd_{suf}"), MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&zv);
        bld.arg(&tv);
        bld.arg(&dst);
        candle_core::builder_arg!(bld, c as i32);
        // SAFETY: the kernel's signature; a block per row of live buffers.
        unsafe { bld.launch(rows_cfg(n)) }.w()?;
        Ok((wrap(dst, dev), Shape::from((n, 2))))
    })
}

/// Its backward: dz from the logits, targets and (n, 2) f32 of (row gradient, lse).
pub fn xent_bwd(
    z: &CudaStorage,
    lz: &Layout,
    t: &CudaStorage,
    lt: &Layout,
    lg: &CudaStorage,
    llg: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, c) = lz.shape().dims2()?;
    let dev = &z.device;
    let tv = contiguous(t.as_cuda_slice::<u32>()?, lt, "cross-entropy targets")?;
    let gv = contiguous(lg.as_cuda_slice::<f32>()?, llg, "cross-entropy gradient")?;
    float_slice!(&z.slice, "cross-entropy backward", |zs, suf, T| {
        let zv = contiguous(zs, lz, "cross-entropy logits")?;
        let dst = alloc::<T>(dev, n * c)?;
        let f = dev.get_or_load_custom_func(&format!("xent_bwd_{suf}"), MODULE, PTX)?;
        let mut bld = f.builder();
        bld.arg(&zv);
        bld.arg(&tv);
        bld.arg(&gv);
        bld.arg(&dst);
        candle_core::builder_arg!(bld, c as i32);
        // SAFETY: as above.
        unsafe { bld.launch(rows_cfg(n)) }.w()?;
        Ok((wrap(dst, dev), lz.shape().clone()))
    })
}
