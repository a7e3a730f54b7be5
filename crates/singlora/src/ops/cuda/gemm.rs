//! cuBLAS GEMMs on raw device pointers, f32 accumulation on bf16 or f32 storage (the context's
//! type). Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ, so the operands go to cuBLAS swapped.

use candle_core::cuda_backend::cudarc::cublas::{result, sys};

use super::Ctx;

/// A row-major matrix operand: device pointer, leading (row) stride, and whether the operand
/// is the transpose of the matrix stored there.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: u64,
    pub ld: usize,
    pub trans: bool,
}

impl Mat {
    /// The matrix stored at `ptr` with row stride `ld`.
    pub fn new(ptr: u64, ld: usize) -> Self {
        Self {
            ptr,
            ld,
            trans: false,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            trans: !self.trans,
            ..self
        }
    }
}

/// cuBLAS's operation flag for an operand given transposed (`t`) or not.
fn cublas_op(t: bool) -> sys::cublasOperation_t {
    if t {
        sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        sys::cublasOperation_t::CUBLAS_OP_N
    }
}

/// cuBLAS's type for bf16 (`true`) or f32 storage.
fn cublas_type(bf16: bool) -> sys::cudaDataType_t {
    if bf16 {
        sys::cudaDataType_t::CUDA_R_16BF
    } else {
        sys::cudaDataType_t::CUDA_R_32F
    }
}

/// C (m × n, row-major, contiguous) ← alpha·A·B + beta·C, all three of the context's type.
///
/// # Safety
/// The pointers must address live device buffers of the given shapes, on the context's stream.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    cx: &Ctx,
    mnk: (usize, usize, usize),
    a: Mat,
    b: Mat,
    c: u64,
    alpha: f32,
    beta: f32,
) -> candle_core::Result<()> {
    // SAFETY: the caller's.
    unsafe { gemm_out(cx, cx.bf16, mnk, a, b, c, alpha, beta) }
}

/// [`gemm`] with C stored as bf16 (`c_bf16`) or f32 whatever A and B are (an f32 gradient of
/// an f32 parameter from bf16 activations).
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_out(
    cx: &Ctx,
    c_bf16: bool,
    (m, n, k): (usize, usize, usize),
    a: Mat,
    b: Mat,
    c: u64,
    alpha: f32,
    beta: f32,
) -> candle_core::Result<()> {
    // SAFETY: the caller's.
    unsafe { gemm_out_ld(cx, c_bf16, (m, n, k), a, b, (c, n), alpha, beta) }
}

/// [`gemm_out`] with C's row stride given (`c` = pointer and stride): C a column block of a
/// wider matrix.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_out_ld(
    cx: &Ctx,
    c_bf16: bool,
    mnk: (usize, usize, usize),
    a: Mat,
    b: Mat,
    c: (u64, usize),
    alpha: f32,
    beta: f32,
) -> candle_core::Result<()> {
    // SAFETY: the caller's.
    unsafe { call(cx, c_bf16, mnk, (a, b, c), (alpha, beta), None) }
}

/// C_i = α·A_i·B_i (row-major, contiguous C of ld n) for `batch` equally strided operands
/// (strides in elements), all of the context's type.
///
/// # Safety
/// As [`gemm`], for every one of the batch.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_batched(
    cx: &Ctx,
    (m, n, k): (usize, usize, usize),
    (a, sa): (Mat, usize),
    (b, sb): (Mat, usize),
    (c, sc): (u64, usize),
    batch: usize,
    alpha: f32,
) -> candle_core::Result<()> {
    let strided = Strided {
        a: sa as i64,
        b: sb as i64,
        c: sc as i64,
        batch: batch as i32,
    };
    let operands = (a, b, (c, n));
    // SAFETY: the caller's.
    unsafe {
        call(
            cx,
            cx.bf16,
            (m, n, k),
            operands,
            (alpha, 0.0),
            Some(strided),
        )
    }
}

/// The element strides between a batch's operands, and its size.
struct Strided {
    a: i64,
    b: i64,
    c: i64,
    batch: i32,
}

/// cuBLAS's GEMM (strided-batched with `strided`) of row-major C = alpha·A·B + beta·C with A,
/// B of the context's type: cuBLAS is column-major, so it computes Cᵀ = Bᵀ·Aᵀ, B first.
///
/// # Safety
/// As [`gemm`].
unsafe fn call(
    cx: &Ctx,
    c_bf16: bool,
    (m, n, k): (usize, usize, usize),
    (a, b, (c, ldc)): (Mat, Mat, (u64, usize)),
    (alpha, beta): (f32, f32),
    strided: Option<Strided>,
) -> candle_core::Result<()> {
    let (dt, ct) = (cublas_type(cx.bf16), cublas_type(c_bf16));
    let (tb, ta) = (cublas_op(b.trans), cublas_op(a.trans));
    let (n, m, k) = (n as i32, m as i32, k as i32);
    let (bp, ldb, ap, lda) = (
        b.ptr as *const _,
        b.ld as i32,
        a.ptr as *const _,
        a.ld as i32,
    );
    let (alpha, beta) = (
        (&alpha) as *const f32 as *const _,
        (&beta) as *const f32 as *const _,
    );
    let (cp, ldc) = (c as *mut _, ldc as i32);
    let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
    let blas = cx.dev.cublas_handle();
    let h = *blas.handle();
    // SAFETY: the caller's.
    unsafe {
        match strided {
            None => result::gemm_ex(
                h, tb, ta, n, m, k, alpha, bp, dt, ldb, ap, dt, lda, beta, cp, ct, ldc, compute,
                algo,
            ),
            Some(s) => result::gemm_strided_batched_ex(
                h, tb, ta, n, m, k, alpha, bp, dt, ldb, s.b, ap, dt, lda, s.a, beta, cp, ct, ldc,
                s.c, s.batch, compute, algo,
            ),
        }
    }
    .map_err(|e| candle_core::Error::Cuda(Box::new(e)))
}

/// C ← A (or Aᵀ with `trans`) + beta·C for f32 matrices in cuBLAS's column-major terms:
/// C is m × n with stride `ldc`, A is m × n (n × m transposed) with stride `lda` (cuBLAS geam,
/// C in place).
///
/// # Safety
/// The pointers must address live f32 device buffers of those shapes, on the context's stream.
pub unsafe fn geam_f32(
    cx: &Ctx,
    trans: bool,
    (m, n): (usize, usize),
    (a, lda): (u64, usize),
    beta: f32,
    (c, ldc): (u64, usize),
) -> candle_core::Result<()> {
    let blas = cx.dev.cublas_handle();
    let one = 1f32;
    // SAFETY: the caller's.
    let status = unsafe {
        sys::cublasSgeam(
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
        )
    };
    if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        candle_core::bail!("cublasSgeam failed: {status:?}");
    }
    Ok(())
}
