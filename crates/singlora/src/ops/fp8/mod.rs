//! FP8 on the GPU: tensors with one scale each (E4M3 for weights and activations, E5M2 for
//! gradients; kernels in fp8.cu) and their GEMMs through cuBLASLt,
//! C (bf16) = s_a·s_b·A·Bᵀ with A (m, k) and B (n, k) both k-contiguous, the one operand layout
//! Hopper's FP8 tensor cores take. A frozen weight W (n, k) thus serves the forward x·Wᵀ as it
//! is stored, and the backward g·W through its transpose (k, n), kept beside it.

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::CudaDevice;

use super::cuda::{args, elems_cfg, elems_or_v8_cfg, ptx_module, slice_ptr, Ctx, Module};
use super::FastPath;

const MODULE: Module = ptx_module!("fp8");

/// The largest finite value of E4M3 and of E5M2.
pub const E4M3_MAX: f32 = 448.0;
pub const E5M2_MAX: f32 = 57344.0;

/// An FP8 matrix (rows × cols, row-major) on the device with its scale: value = scale · code.
pub struct Fp8Mat {
    pub codes: CudaSlice<u8>,
    /// One f32 on the device (cuBLASLt reads it there).
    pub scale: CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
    /// E5M2 (else E4M3).
    pub e5: bool,
}

impl Fp8Mat {
    /// The operand of [`gemm_nt`]: codes, scale and kind.
    pub fn operand(&self) -> Operand {
        Operand {
            ptr: slice_ptr(&self.codes),
            scale: slice_ptr(&self.scale),
            e5: self.e5,
        }
    }
}

/// An FP8 operand of [`gemm_nt`] by pointer.
#[derive(Clone, Copy)]
pub struct Operand {
    pub ptr: u64,
    pub scale: u64,
    pub e5: bool,
}

/// Quantises the bf16 or f32 (the context's type) matrix at `x` (rows × cols) to FP8 with one
/// scale: its largest magnitude maps to the format's largest value.
pub fn quantize(
    cx: &Ctx,
    x: u64,
    (rows, cols): (usize, usize),
    e5: bool,
) -> candle_core::Result<Fp8Mat> {
    let n = rows * cols;
    // for the kernel profile: the quantisation is a stage of its own (whatever was queued
    // since the last stage mark counts as "other")
    cx.mark("other")?;
    let amax = cx.dev.alloc_zeros::<f32>(1)?;
    let scale = cx.dev.alloc_zeros::<f32>(1)?;
    // SAFETY: every element is written by the kernel below.
    let codes = unsafe { cx.dev.alloc::<u8>(n.max(1))? };
    // 8 values per access where the input allows (the codes are a fresh, aligned buffer)
    let vec = cx.v8(&[x], n);
    let cfg = elems_or_v8_cfg(n, vec);
    // SAFETY: x holds n elements of the context's type; amax one f32.
    unsafe {
        MODULE.launch(
            cx.dev,
            &cx.kernel("fp8_amax", vec),
            cfg,
            args![x, n as i64, slice_ptr(&amax)],
        )?;
        MODULE.launch(
            cx.dev,
            &cx.kernel("fp8_quant", vec),
            cfg,
            args![
                x,
                n as i64,
                slice_ptr(&amax),
                i32::from(e5),
                slice_ptr(&codes),
                slice_ptr(&scale)
            ],
        )?;
    }
    cx.mark("FP8 quantisation")?;
    Ok(Fp8Mat {
        codes,
        scale,
        rows,
        cols,
        e5,
    })
}

/// The values of `q` (scale · code) written to `y` in the context's type.
///
/// # Safety
/// `y` must address rows·cols elements of the context's type on its device.
pub unsafe fn dequantize_into(cx: &Ctx, q: &Fp8Mat, y: u64) -> candle_core::Result<()> {
    let n = q.rows * q.cols;
    // SAFETY: the caller's, and q's own buffers.
    unsafe {
        MODULE.launch(
            cx.dev,
            &format!("fp8_dequant_{}", cx.suffix()),
            elems_cfg(n),
            args![
                slice_ptr(&q.codes),
                n as i64,
                slice_ptr(&q.scale),
                i32::from(q.e5),
                y
            ],
        )
    }
}

/// `q` transposed (cols × rows), with the same scale.
pub fn transpose(cx: &Ctx, q: &Fp8Mat) -> candle_core::Result<Fp8Mat> {
    let n = q.rows * q.cols;
    // SAFETY: every element is written by the kernel below.
    let codes = unsafe { cx.dev.alloc::<u8>(n.max(1))? };
    let mut scale = cx.dev.alloc_zeros::<f32>(1)?;
    cx.dev.memcpy_dtod(&q.scale, &mut scale)?;
    // SAFETY: both buffers hold n bytes.
    unsafe {
        MODULE.launch(
            cx.dev,
            "fp8_transpose",
            elems_cfg(n),
            args![
                slice_ptr(&q.codes),
                slice_ptr(&codes),
                q.rows as i64,
                q.cols as i64
            ],
        )?;
    }
    Ok(Fp8Mat {
        codes,
        scale,
        rows: q.cols,
        cols: q.rows,
        e5: q.e5,
    })
}

/// A cuBLASLt handle and its workspace, one per device.
struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

// SAFETY: the handle is only used on its device's one stream, behind the Arc.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

/// Hopper's recommended cuBLASLt workspace.
const WORKSPACE: usize = 32 << 20;

static HANDLES: Mutex<Vec<(candle_core::Device, Arc<Lt>)>> = Mutex::new(Vec::new());

fn lt_for(dev: &CudaDevice) -> candle_core::Result<Arc<Lt>> {
    let here = candle_core::Device::Cuda(dev.clone());
    let mut all = HANDLES.lock().unwrap();
    if let Some((_, lt)) = all.iter().find(|(d, _)| d.same_device(&here)) {
        return Ok(lt.clone());
    }
    let handle = lt::create_handle().map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    // SAFETY: cuBLASLt only uses it as scratch.
    let workspace = unsafe { dev.alloc::<u8>(WORKSPACE)? };
    let lt = Arc::new(Lt { handle, workspace });
    all.push((here, lt.clone()));
    Ok(lt)
}

fn cublas_err(e: lt::CublasError) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

fn fp8_type(e5: bool) -> sys::cudaDataType {
    if e5 {
        sys::cudaDataType::CUDA_R_8F_E5M2
    } else {
        sys::cudaDataType::CUDA_R_8F_E4M3
    }
}

/// FP8 GEMMs run by this process so far (the device check tells from it that a path used them).
static GEMMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many FP8 GEMMs this process has launched.
pub fn gemms_run() -> usize {
    GEMMS.load(std::sync::atomic::Ordering::Relaxed)
}

/// C (m × n, bf16, row-major) = s_a·s_b·A·Bᵀ, plus C with `accumulate`: A (m × k) and B (n × k)
/// FP8, row-major (k contiguous); not both E5M2. In cuBLASLt's column-major terms this is
/// Cᵀ (n × m) = B'ᵀ·A' with B' = B seen as k × n and A' = A seen as k × m: the "TN" layout.
///
/// # Safety
/// The operands must address live device buffers of those shapes on `cx`'s device and stream,
/// and C an m × n bf16 buffer.
pub unsafe fn gemm_nt(
    cx: &Ctx,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: u64,
    accumulate: bool,
) -> candle_core::Result<()> {
    if a.e5 && b.e5 {
        candle_core::bail!("FP8 GEMM: E5M2 by E5M2 is not supported");
    }
    let lt = lt_for(cx.dev)?;
    let mut g = Descriptors::default();
    g.desc = Some(
        lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(cublas_err)?,
    );
    let layout = |t, rows: usize, cols: usize| {
        lt::create_matrix_layout(t, rows as u64, cols as u64, rows as i64).map_err(cublas_err)
    };
    let la = layout(fp8_type(b.e5), k, n)?;
    g.layouts.push(la);
    let lb = layout(fp8_type(a.e5), k, m)?;
    g.layouts.push(lb);
    let lc = layout(sys::cudaDataType::CUDA_R_16BF, n, m)?;
    g.layouts.push(lc);
    let pref = lt::create_matmul_pref().map_err(cublas_err)?;
    g.pref = Some(pref);
    let desc = g.desc.unwrap();
    let (t, nn) = (
        cublasOperation_t::CUBLAS_OP_T,
        cublasOperation_t::CUBLAS_OP_N,
    );
    let ws = WORKSPACE as u64;
    let op_size = std::mem::size_of::<cublasOperation_t>();
    let ptr_size = std::mem::size_of::<u64>();
    let stream = cx.dev.cuda_stream().cu_stream() as sys::cudaStream_t;
    use sys::cublasLtMatmulDescAttributes_t as D;
    // SAFETY: each attribute's buffer is a live value of the type cuBLASLt reads for it; the
    // operands are the caller's.
    unsafe {
        let set = |attr, buf: *const std::ffi::c_void, size| {
            lt::set_matmul_desc_attribute(desc, attr, buf, size).map_err(cublas_err)
        };
        set(
            D::CUBLASLT_MATMUL_DESC_TRANSA,
            (&t) as *const _ as *const _,
            op_size,
        )?;
        set(
            D::CUBLASLT_MATMUL_DESC_TRANSB,
            (&nn) as *const _ as *const _,
            op_size,
        )?;
        // cuBLASLt's A is our B and its B our A
        set(
            D::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
            (&b.scale) as *const u64 as *const _,
            ptr_size,
        )?;
        set(
            D::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
            (&a.scale) as *const u64 as *const _,
            ptr_size,
        )?;
        // the forward's products (E4M3 by E4M3) in the fast accumulation mode when asked
        let fast_accum = i8::from(cx.fast.fp8_fast_accum && !a.e5 && !b.e5);
        set(
            D::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
            (&fast_accum) as *const i8 as *const _,
            std::mem::size_of::<i8>(),
        )?;
        lt::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&ws) as *const u64 as *const _,
            ptr_size,
        )
        .map_err(cublas_err)?;
        let heuristic = lt::get_matmul_algo_heuristic(lt.handle, desc, la, lb, lc, lc, pref)
            .map_err(cublas_err)?;
        let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
        GEMMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lt::matmul(
            lt.handle,
            desc,
            (&alpha) as *const f32 as *const _,
            (&beta) as *const f32 as *const _,
            b.ptr as *const _,
            la,
            a.ptr as *const _,
            lb,
            c as *const _,
            lc,
            c as *mut _,
            lc,
            &heuristic.algo,
            slice_ptr(&lt.workspace) as *mut _,
            WORKSPACE,
            stream,
        )
        .map_err(cublas_err)
    }
}

/// The descriptors of one cuBLASLt call, destroyed when it returns (or fails).
#[derive(Default)]
struct Descriptors {
    desc: Option<sys::cublasLtMatmulDesc_t>,
    layouts: Vec<sys::cublasLtMatrixLayout_t>,
    pref: Option<sys::cublasLtMatmulPreference_t>,
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each was created by cuBLASLt and is destroyed once, here.
        unsafe {
            for l in self.layouts.drain(..) {
                let _ = lt::destroy_matrix_layout(l);
            }
            if let Some(p) = self.pref.take() {
                let _ = lt::destroy_matmul_pref(p);
            }
            if let Some(d) = self.desc.take() {
                let _ = lt::destroy_matmul_desc(d);
            }
        }
    }
}

/// The context of the tensor-level functions below: bf16 or f32 storage on `dev`.
fn ctx_of(t: &candle_core::Tensor) -> candle_core::Result<(CudaDevice, bool)> {
    let candle_core::Device::Cuda(dev) = t.device() else {
        candle_core::bail!("FP8: a CUDA tensor expected");
    };
    let bf16 = match t.dtype() {
        candle_core::DType::BF16 => true,
        candle_core::DType::F32 => false,
        other => candle_core::bail!("FP8: a bf16 or f32 tensor expected, got {other:?}"),
    };
    Ok((dev.clone(), bf16))
}

/// [`quantize`] of a 2-D bf16 or f32 CUDA tensor.
pub fn quantize_tensor(x: &candle_core::Tensor, e5: bool) -> candle_core::Result<Fp8Mat> {
    quantize_tensor_with(x, e5, false)
}

/// [`quantize_tensor`] with the 8-wide kernels when `vectorised` (where the input allows them),
/// as the fast path runs it.
pub fn quantize_tensor_with(
    x: &candle_core::Tensor,
    e5: bool,
    vectorised: bool,
) -> candle_core::Result<Fp8Mat> {
    let (dev, bf16) = ctx_of(x)?;
    let x = x.contiguous()?;
    let (rows, cols) = x.dims2()?;
    let p = super::cuda::tensor_ptr(
        &x,
        "FP8 input",
        &[candle_core::DType::BF16, candle_core::DType::F32],
    )?;
    let fast = FastPath {
        vectorised,
        ..FastPath::default()
    };
    quantize(&Ctx::new(&dev, bf16, fast), p, (rows, cols), e5)
}

/// The values of `q` as a (rows, cols) tensor of `like`'s type on its device.
pub fn dequantize_tensor(
    q: &Fp8Mat,
    like: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let (dev, bf16) = ctx_of(like)?;
    let cx = Ctx::scalar(&dev, bf16);
    let (s, y) = cx.fresh(q.rows * q.cols)?;
    // SAFETY: y holds rows·cols elements of the context's type.
    unsafe { dequantize_into(&cx, q, y)? };
    super::cuda::wrap_storage(s, (q.rows, q.cols), like)
}

/// [`transpose`] on `like`'s device.
pub fn transpose_tensor(q: &Fp8Mat, like: &candle_core::Tensor) -> candle_core::Result<Fp8Mat> {
    let (dev, bf16) = ctx_of(like)?;
    transpose(&Ctx::scalar(&dev, bf16), q)
}

/// s_a·s_b·A·Bᵀ as an (m, n) bf16 tensor ([`gemm_nt`]); `like` gives the device.
pub fn matmul_nt(
    a: &Fp8Mat,
    b: &Fp8Mat,
    like: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    if a.cols != b.cols {
        candle_core::bail!("FP8 GEMM: A has {} columns, B {}", a.cols, b.cols);
    }
    let (dev, _) = ctx_of(like)?;
    let cx = Ctx::scalar(&dev, true);
    let (s, c) = cx.fresh(a.rows * b.rows)?;
    // SAFETY: the operands are live FP8 matrices of these shapes, c an m × n bf16 buffer.
    unsafe {
        gemm_nt(
            &cx,
            (a.rows, b.rows, a.cols),
            a.operand(),
            b.operand(),
            c,
            false,
        )?
    };
    let like = like.to_dtype(candle_core::DType::BF16)?;
    super::cuda::wrap_storage(s, (a.rows, b.rows), &like)
}
