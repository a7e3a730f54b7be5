//! Fused, differentiable operations: one pass over memory where candle's composed ops take
//! several, each with its own backward (also fused). Each op lives in its own folder
//! (`ops/<op>/`): the candle op and its CPU code in `mod.rs`, its CUDA launchers in `cuda.rs`,
//! its kernels in `<op>.cu`; the CUDA plumbing they share (launch context and helper, cuBLAS
//! GEMMs, buffers) is in `ops/cuda/`. Every op has a composed reference in
//! [`reference`](mod@reference), which calls no fused op, and tests against it (values and
//! finite-difference gradients).
//!
//! | op | forward | backward |
//! |---|---|---|
//! | [`masked_softmax`] | P = softmax(scale·S) over valid keys (padding, causal) | dS = scale·P ⊙ (dP − Σ P⊙dP) |
//! | [`layer_norm`] | (x − μ)/σ·w + b | (ĝ − mean ĝ − x̂·mean(ĝ⊙x̂))/σ, ĝ = g⊙w |
//! | [`rms_norm`] | x/rms·w | (ĝ − x̂·mean(ĝ⊙x̂))/rms |
//! | [`gelu_erf`] | x·Φ(x) | g·(Φ(x) + x·φ(x)) |
//! | [`attention_block`] (CUDA) | RoPE, head split, softmax(QKᵀ/√d)·V with GQA, head merge | all of it, P kept |
//! | [`heads_attention`] (CPU) | softmax(QKᵀ/√d)·V per (row, head) in the merged layout | all of it, P kept |
//! | [`rope_split`] (CUDA) | heads split (b, t, n·hd) → (b, n, t, hd), rotated | inverse rotation, back to (b, t, n·hd) |
//! | [`swiglu`] (CUDA) | silu(g)·u | dg = dy·u·silu′(g), du = dy·silu(g) |
//! | [`xent_rows`] (CUDA) | per-row −log softmax(z)[t], lse kept | dz = g·(softmax(z) − onehot(t)) |
//! | [`adapted_linear`] | x·W0ᵀ + b + c·(x·D)·Uᵀ, one output buffer | dx = g·W0 + c·(g·U)·Dᵀ; dD, dU |
//!
//! Norm weights are frozen constants here (only the input gets a gradient). The CPU kernels
//! run rows in parallel with rayon; tensors must be contiguous f32 or f64.
//!
//! On CUDA (feature `cuda`; f32 arithmetic on bf16 or f32 storage) the same ops run as single
//! kernels, each replacing several composed ops that read and write the whole tensor once
//! each, forward and backward. The CUDA fast path of the LLaMA layers
//! (`model/llama/fast.rs`) drives the same kernels on its own buffers, and adds the
//! adapters' low-rank terms inside them (`low_rank/`, with the residual add in `residual/`);
//! [`FastPath`] holds its choices among kernels that compute the same function. AdamW's
//! one-launch update is in `adamw/`.

#[cfg(feature = "cuda")]
pub(crate) mod adamw;
pub mod affine_norm;
pub(crate) mod attention;
pub mod conv;
pub(crate) mod cpu_gemm;
pub mod cross_attention;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
/// Timing events between the stages of the CUDA fast path's step, for the lab's kernel profile.
#[cfg(feature = "cuda")]
pub use cuda::prof;

/// [`prof::mark`] on a CUDA device: the work queued since the previous mark belongs to
/// `label`. Nothing on other devices or without the `cuda` feature.
pub(crate) fn mark_on(
    device: &candle_core::Device,
    label: &'static str,
) -> crate::error::Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        cuda::prof::mark(d, label)?;
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (device, label);
    Ok(())
}

/// [`mark_on`] at the start of a custom op's backward, which candle's autograd calls: the work
/// autograd queued since the previous mark (the backward of ops that do not mark themselves)
/// is filed as [`prof::OTHER_BACKWARD`]. The op marks its own work after it.
pub(crate) fn mark_backward_start(device: &candle_core::Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    let label = cuda::prof::OTHER_BACKWARD;
    #[cfg(not(feature = "cuda"))]
    let label = "";
    mark_on(device, label).map_err(candle_core::Error::wrap)
}
/// The gradient of `f` at `x` for the output gradient `g` (the vector–Jacobian product), by
/// candle's autograd on a graph of its own: the reference and CPU path of the ops whose fused
/// backward is a kernel. `what` names the op in the error.
pub(crate) fn input_grad_by_autograd(
    x: &Tensor,
    g: &Tensor,
    what: &str,
    f: impl FnOnce(&Tensor) -> crate::error::Result<Tensor>,
) -> crate::error::Result<Tensor> {
    let v = candle_core::Var::from_tensor(&x.detach())?;
    let y = f(v.as_tensor())?;
    let grads = (y * g.detach().to_dtype(x.dtype())?)?
        .sum_all()?
        .backward()?;
    grads
        .get(v.as_tensor())
        .cloned()
        .ok_or_else(|| crate::Error::msg(format!("{what} backward: no gradient for the input")))
}

/// `x` itself, or, while the CUDA kernel profile records, `x` through an identity op whose
/// backward marks `label` when `x`'s gradient is complete: the backward of candle's own ops
/// queued since the previous mark (the ops between this point and the next mark of the
/// forward) is filed under `label` instead of [`prof::OTHER_BACKWARD`]. Costs one copy of `x`
/// while recording, nothing otherwise.
pub(crate) fn probe(x: &Tensor, label: &'static str) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.track_op() && cuda::prof::on() {
        let x = x.contiguous()?;
        let x = match x.layout().start_offset() {
            0 => x,
            _ => x.copy()?,
        };
        return x.apply_op1(Probe(label));
    }
    let _ = label;
    Ok(x.clone())
}

/// A copy of the storage `s` with layout `l`, which must be contiguous and whole (start at 0):
/// the forward of an identity-like op whose input its caller made so.
pub(crate) fn pass_through<S: candle_core::backend::BackendStorage>(
    s: &S,
    l: &Layout,
) -> candle_core::Result<(S, candle_core::Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("an identity op's input is not a whole contiguous tensor");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

#[cfg(feature = "cuda")]
struct Probe(&'static str);

#[cfg(feature = "cuda")]
impl candle_core::CustomOp1 for Probe {
    fn name(&self) -> &'static str {
        "profile-probe"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        pass_through(s, l)
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        pass_through(s, l)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        mark_on(x.device(), self.0).map_err(candle_core::Error::wrap)?;
        Ok(Some(g.clone()))
    }
}
#[cfg(feature = "cuda")]
pub mod fp8;
pub mod geglu;
pub(crate) mod gelu;
pub(crate) mod linear;
#[cfg(feature = "cuda")]
pub(crate) mod low_rank;
#[cfg(feature = "cuda")]
pub(crate) mod nf4;
pub(crate) mod norm;
pub mod reference;
#[cfg(feature = "cuda")]
pub(crate) mod residual;
pub(crate) mod rope;
pub mod rows;
pub(crate) mod softmax;
pub(crate) mod swiglu;
pub(crate) mod xent;

pub use attention::{attention_block, heads_attention, masked_attention, Segments};
pub use gelu::{gelu_erf, Activation};
pub use linear::{
    adapted_linear, adapted_linear_grads, adapted_linear_input_grad, factor_grads, frozen_linear,
    frozen_linear_gelu, fused_available, GradSlot,
};
pub use norm::{layer_norm, rms_norm};
pub use rope::{rope_split, rope_tables, rope_tables_at};
pub use softmax::{key_lens, masked_softmax};
pub use swiglu::swiglu;
pub use xent::{cross_entropy, nll_rows, xent_fused, xent_rows};
/// The low-rank epilogue and one-pass kernels on tensors, for the device check's comparisons
/// with composed ops.
#[cfg(feature = "cuda")]
pub use {
    low_rank::{g_pass_products, Term},
    residual::add_low_rank,
    rope::cuda::rope_low_rank,
    swiglu::cuda::{swiglu_bwd_low_rank, swiglu_low_rank},
};

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, WithDType};

/// Which implementations the fast training paths use. Every choice computes the same function
/// (to rounding); the default, everything on, is the fastest, and the device check and the
/// benchmarks turn parts off to compare. A model holds one ([`crate::model::TaskModel::fast`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPath {
    /// CPU, BERT-family encoders: the layers' own forward and backward (off: candle's
    /// autograd through the whole model).
    pub cpu_encoder: bool,
    /// CUDA, LLaMA: the adapters of projections that read one input (q, k, v; gate, up) share
    /// one GEMM each way.
    pub grouped: bool,
    /// CUDA, LLaMA: an adapter's rank-r term added by the kernel that reads the projection's
    /// output (or input gradient) next, instead of by a GEMM of its own (`low_rank/`; bf16
    /// and the 8-wide kernels only).
    pub fused_low_rank: bool,
    /// CUDA, LLaMA: an adapter's g·U and gᵀ·h in one pass over the output gradient g, instead
    /// of two GEMMs.
    pub g_pass: bool,
    /// CUDA: the fused (flash) attention kernels where they apply (bf16, head size 64 or
    /// 128), instead of GEMMs and a softmax; on the LLaMA fast path and in the autograd path's
    /// [`attention_block`].
    pub flash_attention: bool,
    /// CUDA: query heads per block of the fused attention's dK/dV kernel (a divisor of the
    /// query heads per KV head); None: the kernel's default.
    pub flash_heads: Option<usize>,
    /// CUDA: the 8-wide element-wise and row-wise kernels where pointers and sizes allow,
    /// instead of the scalar ones (off, also what only has 8-wide kernels: the low-rank
    /// epilogue and the SFT head's loss on the LLaMA fast path).
    pub vectorised: bool,
    /// CUDA, FP8 base: the forward's GEMMs (E4M3 by E4M3) accumulate in the tensor cores'
    /// fast mode, as Transformer Engine's forward does; the gradients' GEMMs keep the exact
    /// one. Off by default, unlike the choices above: it changes the FP8 step's rounding, and
    /// the measured quality is the exact mode's.
    pub fp8_fast_accum: bool,
    /// CUDA: heads of 48 on the fused attention kernels too (the U-Net pads its heads of 40 to
    /// 48 instead of 64: a quarter less attention work at Stable Diffusion 1.5's first level).
    pub flash_48: bool,
    /// CUDA: heads of 80 on the fused attention kernels too (instead of padded to 128: Stable
    /// Diffusion 1.5's second level; 1 to 1.5 ms of the SD 1.5-shaped step at batch 4).
    pub flash_80: bool,
}

impl Default for FastPath {
    fn default() -> Self {
        Self {
            cpu_encoder: true,
            grouped: true,
            fused_low_rank: true,
            g_pass: true,
            flash_attention: true,
            flash_heads: None,
            vectorised: true,
            fp8_fast_accum: false,
            flash_48: true,
            flash_80: true,
        }
    }
}

/// The float types the CPU kernels handle.
pub(crate) trait Real:
    WithDType + num_traits::Float + std::ops::AddAssign + std::ops::MulAssign + Send + Sync
{
    /// e^x; for f32 a branch-free polynomial the compiler can vectorise (≤ 2 ulp).
    fn fast_exp(self) -> Self;
}

impl Real for f32 {
    #[inline]
    fn fast_exp(self) -> f32 {
        exp_f32(self)
    }
}

impl Real for f64 {
    #[inline]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
}

/// e^x in f32 without a libm call: x = n·ln2 + r, e^r by Cephes' degree-6 polynomial, 2^n
/// through the exponent bits. Inputs below −80 give e^−80 ≈ 1.8e−35 instead of smaller values:
/// results stay normal numbers, because denormal arithmetic costs ~100 cycles an operation
/// (it made the GELU backward 15% of a MiniLM step).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer without a call
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-80.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // n sits in the low mantissa bits of n + ROUND: integer arithmetic from here, which
    // vectorises (a float-to-int cast does not, for its saturation rules)
    let ni = ((n + ROUND).to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e * f32::from_bits((ni.wrapping_add(127) as u32) << 23)
}

/// Lanes of the row reductions below: independent partial results, so that the compiler can
/// vectorise them (one running sum is a serial chain of dependent adds).
const LANES: usize = 16;

/// Σᵢ f(aᵢ, bᵢ, cᵢ) over equal-length rows.
#[inline(always)]
pub(crate) fn sum_map3<T: Real>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) -> T {
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let mut tail = T::zero();
    for ((&x, &y), &z) in ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
    {
        tail += f(x, y, z);
    }
    let mut acc = [T::zero(); LANES];
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for i in 0..LANES {
            acc[i] += f(x[i], y[i], z[i]);
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

/// Σᵢ f(aᵢ, bᵢ).
#[inline(always)]
pub(crate) fn sum_map2<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    sum_map3(a, b, b, |x, y, _| f(x, y))
}

/// Σᵢ f(xᵢ).
#[inline(always)]
pub(crate) fn sum_map<T: Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    sum_map2(x, x, |v, _| f(v))
}

/// maxᵢ xᵢ (−∞ for an empty row).
#[inline(always)]
pub(crate) fn max_of<T: Real>(x: &[T]) -> T {
    let c = x.chunks_exact(LANES);
    let tail = c
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m });
    let mut acc = [T::neg_infinity(); LANES];
    for v in c {
        for i in 0..LANES {
            if v[i] > acc[i] {
                acc[i] = v[i];
            }
        }
    }
    acc.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

/// A vector of `n` elements that `fill` writes, without zero-filling it first (a memset of
/// every activation-sized output costs ~4% of a MiniLM step).
///
/// # Safety
/// `fill` must write every element of the slice it is given.
pub(crate) unsafe fn filled_vec<T: Copy>(
    n: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>]),
) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the caller's contract: all n elements are initialised.
    unsafe { v.set_len(n) };
    v
}

/// candle's CPU thread count, read once: `candle_core::utils::get_num_threads` parses
/// /proc/cpuinfo on every call, which cost more than the small attention GEMMs it sized.
pub(crate) fn cpu_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// The contiguous slice of `s` that `l` describes.
pub(crate) fn cpu_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let v = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

/// A constant tensor's data on the CPU, as `T` (copied when the dtype differs).
pub(crate) fn host_vec<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    let t = t.to_dtype(T::DTYPE)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok(cpu_slice::<T>(s, layout, "constant")?.to_vec()),
        _ => candle_core::bail!("expected a CPU tensor"),
    }
}

/// Runs `$f::<T>` on the CPU storage's float type.
macro_rules! dispatch_float {
    ($s:expr, $what:expr, |$t:ident| $body:expr) => {
        match $s {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!(
                "{}: f32 or f64 expected, got {:?}",
                $what,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}
pub(crate) use dispatch_float;

/// Whether the fused kernels take `x`'s device and dtype: f32/f64 on the CPU, f32/bf16 on CUDA
/// (with the `cuda` feature); elsewhere the composed candle ops run.
pub(crate) fn fused_kernels_for(x: &Tensor) -> bool {
    match x.device() {
        candle_core::Device::Cpu => matches!(x.dtype(), DType::F32 | DType::F64),
        _ => cuda_kernels_for(x),
    }
}

/// Whether the CUDA kernels take `x`: f32 or bf16 on a CUDA device, with the `cuda` feature.
pub(crate) fn cuda_kernels_for(x: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16)
}

/// A CustomOp's `cpu_fwd` for the ops whose CPU path is composed instead (the op is built for
/// CUDA tensors only, so it is never called): `N` inputs, the op's name for the error.
macro_rules! cpu_composed {
    (@fn $what:literal, $($s:ident $l:ident),+) => {
        fn cpu_fwd(
            &self,
            $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let _ = ($($s, $l),+);
            candle_core::bail!(concat!($what, ": the CPU takes the composed path"))
        }
    };
    (1, $what:literal) => { $crate::ops::cpu_composed!(@fn $what, s1 l1); };
    (2, $what:literal) => { $crate::ops::cpu_composed!(@fn $what, s1 l1, s2 l2); };
    (3, $what:literal) => { $crate::ops::cpu_composed!(@fn $what, s1 l1, s2 l2, s3 l3); };
}
pub(crate) use cpu_composed;

/// A CustomOp's `cpu_fwd`: `|self, (storage, layout), …| body`, one pair per input.
macro_rules! cpu_fwd {
    (|$self:ident $(, ($s:ident, $l:ident))+| $body:expr) => {
        fn cpu_fwd(
            &$self,
            $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $body
        }
    };
}
pub(crate) use cpu_fwd;

/// A CustomOp's `cuda_fwd` (with the `cuda` feature): `|self, a, …| body` with each input a
/// (storage, layout) pair.
macro_rules! cuda_fwd {
    (@fn $self:ident, $body:expr, $($a:ident $s:ident $l:ident),+) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &$self,
            $($s: &candle_core::CudaStorage, $l: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $(let $a = ($s, $l);)+
            $body
        }
    };
    (|$self:ident, $a:ident| $body:expr) => {
        $crate::ops::cuda_fwd!(@fn $self, $body, $a s1 l1);
    };
    (|$self:ident, $a:ident, $b:ident| $body:expr) => {
        $crate::ops::cuda_fwd!(@fn $self, $body, $a s1 l1, $b s2 l2);
    };
    (|$self:ident, $a:ident, $b:ident, $c:ident| $body:expr) => {
        $crate::ops::cuda_fwd!(@fn $self, $body, $a s1 l1, $b s2 l2, $c s3 l3);
    };
}
pub(crate) use cuda_fwd;

#[cfg(test)]
mod tests {
    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0f64;
        for i in -8000..=8800 {
            let x = i as f32 * 0.01;
            let e = super::exp_f32(x) as f64;
            let exact = (x as f64).exp();
            worst = worst.max(((e - exact) / exact).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
    }
}
