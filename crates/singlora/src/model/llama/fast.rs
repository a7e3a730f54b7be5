//! The decoder layers' forward and backward on CUDA without candle's autograd: every layer
//! runs its own kernels and cuBLAS GEMMs on buffers this code owns, keeps the activations its
//! backward needs, and the backward accumulates gradients where they meet (GEMMs with β = 1,
//! norm backward kernels that add into the residual stream's gradient). candle's engine pads
//! every gradient edge with a zero tensor and an add; a LLaMA layer has ~17 such edges on
//! (tokens × hidden)-sized tensors, about a fifth of a 7B-shape step.
//!
//! The boundary with candle is the residual stream after the last layer: it becomes a leaf
//! variable, and the gradient at that leaf starts this backward. For SFT with a frozen head
//! [`Tape::lm_loss`] computes the final norm, the logits, the loss and their backward here too;
//! otherwise candle's autograd does, from the leaf. Adapter gradients (f32, one packed buffer)
//! go into the same `GradStore` under each adapter variable, so the optimizer sees no
//! difference. Every adapter whose factor U is stored as rows takes this path (the adapter's
//! [`FactorLayout`] says where dD and dU go; DoRA's magnitude is handled by its own kernels);
//! merged adapters and non-CUDA devices take the autograd path. The device check compares the
//! two.
//!
//! An adapter's c·h·Uᵀ is not added to its projection's output by a GEMM of its own (a read and
//! a write of that output) where the kernel that reads the output next can add it: q, k and v
//! in the RoPE/split kernel, o and down in the residual adds, gate and up in the SwiGLU kernels
//! (forward, recompute and backward), and down's c·g_U·Dᵀ in the SwiGLU backward
//! ([`LowRank`]; the kernels in `ops/low_rank`, `ops/residual`, `ops/swiglu` and `ops/rope`).
//!
//! What the backward reads but the forward does not keep: the RMSNorm outputs (recomputed,
//! and only where an adapter's weight gradients read them), and with `Llama::recompute` the
//! SwiGLU output (otherwise kept when down has an adapter: about 1 GiB at TinyLlama shape for
//! 1 ms a step).

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{CudaDevice, CudaStorage, DType, Shape, Tensor, TensorId, Var};

use super::{Batch, Layer, Llama};
use crate::adapter::{AdaptedLinear, FactorLayout, FactorSource};
use crate::dist::GradSync;
use crate::error::{Error, Result};
use crate::ops::attention::cuda::{backward_raw, forward_raw, PackedRows, Saved};
use crate::ops::cuda::{
    self, geam_f32, gemm, gemm_out, gemm_out_ld, mat_of_tensor, upload_lens, Ctx, Mat,
};
use crate::ops::fp8;
use crate::ops::linear::cuda::{col_dot, col_scale, linear_output};
use crate::ops::low_rank::{g_pass, g_pass_ok, lr_ok, LowRank};
use crate::ops::norm::cuda::{rms_bwd_acc, rms_bwd_acc_rows, rms_fwd, rms_fwd_rows};
use crate::ops::residual::{add, add_lr};
use crate::ops::swiglu::cuda::{swiglu_bwd, swiglu_bwd_lr, swiglu_fwd, swiglu_fwd_lr};
use crate::ops::xent::cuda::xent_grad_inplace;
use crate::ops::{key_lens, rope_tables, FastPath};
use crate::quant::QuantWeight;

/// Forwards this process has run on the fast path (the device check tells from it that a
/// batch took this path).
static FAST_FORWARDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many forwards this process has run on the CUDA fast path.
pub fn fast_forwards_run() -> usize {
    FAST_FORWARDS.load(std::sync::atomic::Ordering::Relaxed)
}

fn to_tensor(s: CudaStorage, shape: impl Into<Shape>, like: &Tensor) -> Result<Tensor> {
    Ok(cuda::wrap_storage(s, shape, like)?)
}

/// The device pointer of a contiguous CUDA tensor (bf16 or f32).
fn tensor_ptr(t: &Tensor, what: &str) -> Result<u64> {
    Ok(cuda::tensor_ptr(t, what, &[DType::BF16, DType::F32])?)
}

/// The device pointer of a contiguous u32 CUDA tensor.
fn u32_ptr(t: &Tensor, what: &str) -> Result<u64> {
    Ok(cuda::tensor_ptr(t, what, &[DType::U32])?)
}

/// Where an adapter's gradients go in the packed f32 buffer: each of its parameters' offset
/// (in [`crate::adapter::Adapter::params`] order), and where its factors D and U sit among them.
struct GradSlot {
    params: Vec<(Var, usize)>,
    layout: FactorLayout,
}

impl GradSlot {
    /// The offset of the parameter that holds factor `src`.
    fn offset(&self, src: FactorSource) -> usize {
        self.params[src.param()].1
    }

    /// The GEMMs' β for a factor's gradient: 1 (add) where D and U share a parameter, so that
    /// the second adds to the first; 0 (write) where the factor is the parameter's only
    /// writer (the buffer starts zeroed either way).
    fn beta(&self) -> f32 {
        if self.layout.shared() {
            1.0
        } else {
            0.0
        }
    }
}

/// An adapter prepared for the step: factors D (k × r) and U (n × r) in the activations'
/// type, the scale c, its gradient slot, and DoRA's rescaling.
struct Factors {
    _d: Tensor,
    _u: Tensor,
    d: u64,
    u: u64,
    c: f32,
    r: usize,
    slot: GradSlot,
    dora: Option<DoraPrep>,
}

/// DoRA: y = (x·W0ᵀ + c·x·D·Uᵀ)·diag(m/‖W0 + ΔW‖) (+ b), the norm a constant; the magnitude's
/// gradient is Σ_i g_ij·y_pre_ij / ‖·‖_j.
struct DoraPrep {
    /// Kept alive for the pointers beside them.
    _scale: Tensor,
    scale_p: u64,
    _inv_norm: Tensor,
    inv_p: u64,
    /// The magnitude's offset in the packed gradient buffer.
    off: usize,
}

/// What a projection's backward needs beyond its input: h = x·D, and DoRA's unscaled output.
struct PSaved {
    h: Option<HSaved>,
    y_pre: Option<Buf>,
}

/// h = x·D (m × r) at `ptr` with row stride `ld`: its own buffer, or a column block of its
/// group's (see [`Group`]).
struct HSaved {
    _own: Option<CudaStorage>,
    ptr: u64,
    ld: usize,
}

/// The adapted projections of a layer that read one input (q, k and v; gate and up), with
/// one scale c and no DoRA: their D factors side by side (k × Σr), so that one GEMM gives
/// every h = x·D (the input read once, not three or two times) and, in the backward, one GEMM
/// adds every c·g_U·Dᵀ to the input's gradient (one pass over it, not three or two).
struct Group {
    _d: Tensor,
    d: u64,
    /// Σr, the row stride of the side-by-side factors and products.
    width: usize,
    /// Each member's first column.
    offs: Vec<usize>,
    c: f32,
}

/// The [`Group`] of `ps`, or None where they do not qualify.
fn group_of(ps: &[Proj]) -> Result<Option<Group>> {
    let mut ds = vec![];
    let mut offs = vec![];
    let mut width = 0;
    let mut c = None;
    for p in ps {
        let Some(f) = &p.ad else { return Ok(None) };
        if f.dora.is_some() || c.is_some_and(|c| c != f.c) || p.k != ps[0].k {
            return Ok(None);
        }
        c = Some(f.c);
        offs.push(width);
        width += f.r;
        ds.push(&f._d);
    }
    let Some(c) = c else { return Ok(None) };
    let d = Tensor::cat(&ds, 1)?.contiguous()?;
    Ok(Some(Group {
        d: tensor_ptr(&d, "grouped adapter factors")?,
        _d: d,
        width,
        offs,
        c,
    }))
}

/// h = x (m × k, row-major)·D (k × w, row-major, at `d`) into a fresh buffer: an adapter's
/// (or a group's side-by-side) first factor applied to its input.
fn x_times_d(cx: &Ctx, x: u64, (m, k): (usize, usize), (d, w): (u64, usize)) -> Result<Buf> {
    let (h, hp) = cx.fresh(m * w)?;
    // SAFETY: live buffers of the shapes given, one stream.
    unsafe { gemm(cx, (m, w, k), Mat::new(x, k), Mat::new(d, w), hp, 1.0, 0.0)? };
    cx.mark("adapter fwd: h = x·D")?;
    Ok((h, hp))
}

impl Group {
    /// h for every member: x (m × k)·D (k × Σr), a fresh buffer.
    fn forward(&self, cx: &Ctx, x: u64, m: usize, k: usize) -> Result<Buf> {
        x_times_d(cx, x, (m, k), (self.d, self.width))
    }

    /// Member i's block of a buffer of Σr columns.
    fn block(&self, buf: u64, i: usize, bf16: bool) -> (u64, usize) {
        let el = if bf16 { 2 } else { 4 };
        (buf + (el * self.offs[i]) as u64, self.width)
    }

    /// dx += c·g_U (m × Σr)·Dᵀ for every member at once.
    fn backward_dx(&self, cx: &Ctx, gu: u64, m: usize, k: usize, dx: u64) -> Result<()> {
        let (w, d) = (self.width, self.d);
        // SAFETY: live buffers of the shapes given, one stream.
        unsafe {
            gemm(
                cx,
                (m, k, w),
                Mat::new(gu, w),
                Mat::new(d, w).t(),
                dx,
                self.c,
                1.0,
            )?
        };
        cx.mark("adapter bwd: dx += c·gU·Dᵀ")?;
        Ok(())
    }

    /// Every member's D-side gradient from one GEMM over the shared input: G = c·xᵀ·g_U
    /// (k × Σr, f32), then member i's column block added to its slot: SingLoRA's dD into rows
    /// 0..k of dA, LoRA's dA = that block transposed (cuBLAS geam).
    #[allow(clippy::too_many_arguments)]
    fn backward_grads(
        &self,
        cx: &Ctx,
        ps: &[Proj],
        (gu, x): (u64, u64),
        m: usize,
        k: usize,
        grads: u64,
    ) -> Result<()> {
        let w = self.width;
        let tmp = cx.dev.alloc_zeros::<f32>(k * w)?;
        let tp = cuda::slice_ptr(&tmp);
        let (xt, gum) = (Mat::new(x, k).t(), Mat::new(gu, w));
        // SAFETY: live buffers of the shapes given, one stream (cuBLAS's, the device's).
        unsafe { gemm_out(cx, false, (k, w, m), xt, gum, tp, self.c, 0.0)? };
        for (i, p) in ps.iter().enumerate() {
            let Some(f) = &p.ad else { continue };
            let src = (tp + (4 * self.offs[i]) as u64, w);
            // cuBLAS is column-major: a row-major (rows × cols, ld) block is (cols × rows, ld)
            // SAFETY: live f32 buffers of the shapes given, one stream.
            let dst = grads + 4 * f.slot.offset(f.slot.layout.d) as u64;
            let beta = f.slot.beta();
            unsafe {
                match f.slot.layout.d {
                    // D is rows 0..k of its parameter: P[0..k, :] (k × r, ld r) (+)= G[:, block]
                    FactorSource::Rows(_) => geam_f32(cx, false, (f.r, k), src, beta, (dst, f.r))?,
                    // D = Pᵀ: P (r × k, ld k) (+)= G[:, block]ᵀ
                    FactorSource::Transposed(_) => {
                        geam_f32(cx, true, (k, f.r), src, beta, (dst, k))?
                    }
                }
            }
        }
        drop(tmp);
        cx.mark("adapter bwd: dD = c·xᵀ·gU")?;
        Ok(())
    }
}

/// A projection prepared for the step.
struct Proj {
    /// The frozen weight (n, k); for an NF4 or GGUF weight, the step's scratch buffer that
    /// [`Proj::materialise`] fills just before each product.
    w0: Mat,
    /// A quantised weight: NF4 or GGUF (dequantised into `w0` before each product) or FP8 (its
    /// products on the FP8 tensor cores, with the input (E4M3) or the output gradient (E5M2)
    /// quantised on the way in; `w0` is unused then).
    quant: Option<Arc<dyn QuantWeight>>,
    bias: Option<Tensor>,
    n: usize,
    k: usize,
    ad: Option<Factors>,
}

/// The activations a layer's backward needs.
struct LayerTape {
    /// The layer's input, owned here to keep it alive (None: the embedding, held by the
    /// tape).
    _x_in: Option<CudaStorage>,
    x_in_ptr: u64,
    h_qkv: [PSaved; 3],
    att: Saved,
    a: (CudaStorage, u64),
    h_o: PSaved,
    x_mid: (CudaStorage, u64),
    g: (CudaStorage, u64),
    u: (CudaStorage, u64),
    /// The SwiGLU output (down's input), unless the backward recomputes it.
    f: Option<Buf>,
    h_gu: [PSaved; 2],
    h_down: PSaved,
    /// The q/k/v and gate/up groups' h buffers (their members' `HSaved` point into them).
    _h_groups: [Option<Buf>; 2],
    /// gate's and up's terms where the SwiGLU kernels add them (`g` and `u` then hold the
    /// frozen products alone); their h buffers are the ones above or in `h_gu`.
    gu_terms: [Option<LowRank>; 2],
}

/// What the forward keeps of a layer for the backward: everything, or (layer checkpointing)
/// only its input, from which the backward runs the layer's forward again.
enum LayerRec {
    Kept(Box<LayerTape>),
    Checkpoint {
        /// The layer's input, owned here (None: the embedding, held by the tape).
        _x_in: Option<CudaStorage>,
        x_in_ptr: u64,
    },
}

/// A forward through the decoder layers, ready for its backward.
pub(crate) struct Tape {
    dev: CudaDevice,
    bf16: bool,
    /// The implementation choices this step runs with.
    fast: FastPath,
    dims: (usize, usize, usize, usize, usize),
    hidden: usize,
    ff: usize,
    eps: f64,
    tables: (Tensor, Tensor),
    projs: Vec<[Proj; 7]>,
    /// Per layer, the q/k/v and gate/up [`Group`]s where they qualify.
    groups: Vec<[Option<Group>; 2]>,
    norms: Vec<(u64, u64)>,
    layers: Vec<LayerRec>,
    /// The key lengths the attention kernels read (for layers run again in the backward).
    lens: Arc<CudaSlice<u32>>,
    /// `Llama::recompute`, for layers run again in the backward.
    recompute: bool,
    /// The embedded input (kept alive for layer 0's backward) and, when the benchmark asks
    /// for it, the variable whose gradient is the embeddings'.
    x0: Tensor,
    x0_var: Option<Var>,
    grad_len: usize,
    /// The packed buffer's length after each layer's adapters (layer i's gradients are
    /// `layer_ends[i - 1]..layer_ends[i]`).
    layer_ends: Vec<usize>,
    /// The residual stream after the last layer, a leaf variable: candle's part starts here.
    pub leaf: Var,
    /// Where NF4 and GGUF weights are dequantised, one at a time (None: none is kept so).
    _scratch: Option<CudaStorage>,
    /// Packed rows: attention runs on one example per row, gathered from and back to them.
    packed: Option<PackedRows>,
}

/// Whether [`prepare`] will take `al` (no device work).
fn fast_path_applies(al: &AdaptedLinear) -> Result<bool> {
    let unsupported = al
        .base()
        .quantized_weight()
        .is_some_and(|w| !w.dequantizes_on_gpu() && w.fp8_on_gpu().is_none());
    if al.is_merged() || unsupported {
        return Ok(false);
    }
    Ok(al
        .adapter()
        .is_none_or(|a| layout_supported(a.factor_layout())))
}

/// The backward below writes dU = c·gᵀ·h as rows of its parameter (one pass over g with g·U),
/// so U must be stored as rows; D may be either way.
fn layout_supported(layout: FactorLayout) -> bool {
    matches!(layout.u, FactorSource::Rows(_))
}

/// DoRA's magnitude and the row norms of its rescale (None for the other methods): a quantised
/// weight's norms from a dequantised copy, made only for DoRA.
fn magnitude_of(
    al: &AdaptedLinear,
    adapter: &crate::adapter::Adapter,
) -> Result<Option<(Var, Tensor)>> {
    if !adapter.rescales_output() {
        return Ok(None);
    }
    match al.base().dense_weight() {
        Some(w) => adapter.magnitude(w),
        None => adapter.magnitude(&al.base().weight()?),
    }
}

/// `scratch`: the buffer an NF4 or GGUF weight is dequantised into (of at least n·k elements of
/// the step's type), 0 when there is none.
fn prepare(
    al: &AdaptedLinear,
    bf16: bool,
    grad_len: &mut usize,
    scratch: u64,
) -> Result<Option<Proj>> {
    if al.is_merged() {
        return Ok(None);
    }
    let (n, k) = al.dims();
    let quant = al.base().quantized_weight().cloned();
    let w0 = match (al.base().dense_weight(), &quant) {
        (Some(w), _) => mat_of_tensor(w, al.name())?.0,
        (None, Some(q)) if q.dequantizes_on_gpu() && scratch != 0 => Mat::new(scratch, k),
        (None, Some(q)) if q.fp8_on_gpu().is_some() && bf16 => Mat::new(0, k),
        _ => return Ok(None),
    };
    let dt = if bf16 { DType::BF16 } else { DType::F32 };
    let ad = match al.adapter() {
        None => None,
        Some(adapter) => {
            if !layout_supported(adapter.factor_layout()) {
                return Ok(None);
            }
            let params: Vec<(Var, usize)> = adapter
                .params()
                .into_iter()
                .map(|p| {
                    let off = *grad_len;
                    *grad_len += p.var.elem_count();
                    (p.var, off)
                })
                .collect();
            let dora = match magnitude_of(al, adapter)? {
                None => None,
                Some((mag, norm)) => {
                    let scale = (mag.as_tensor().detach() / &norm)?
                        .to_dtype(DType::F32)?
                        .contiguous()?;
                    let inv_norm = norm.recip()?.to_dtype(DType::F32)?.contiguous()?;
                    let off = params
                        .iter()
                        .find(|(v, _)| v.id() == mag.id())
                        .map(|(_, off)| *off)
                        .ok_or_else(|| {
                            Error::msg("fast path: a magnitude outside the parameters")
                        })?;
                    Some(DoraPrep {
                        scale_p: tensor_ptr(&scale, "DoRA scale")?,
                        inv_p: tensor_ptr(&inv_norm, "DoRA norm")?,
                        _scale: scale,
                        _inv_norm: inv_norm,
                        off,
                    })
                }
            };
            let (d, u, c) = adapter.factors_in(dt)?;
            Some(Factors {
                d: tensor_ptr(&d, "adapter factor D")?,
                u: tensor_ptr(&u, "adapter factor U")?,
                _d: d,
                _u: u,
                c: c as f32,
                r: adapter.rank(),
                slot: GradSlot {
                    params,
                    layout: adapter.factor_layout(),
                },
                dora,
            })
        }
    };
    Ok(Some(Proj {
        w0,
        quant,
        bias: al.base().bias().cloned(),
        n,
        k,
        ad,
    }))
}

type Buf = (CudaStorage, u64);

impl Proj {
    /// The weight where it is an FP8 one.
    fn fp8(&self) -> Option<&crate::quant::fp8::Fp8Weight> {
        self.quant.as_ref().and_then(|w| w.fp8_on_gpu())
    }

    /// Writes an NF4 or GGUF weight into its scratch buffer (`w0`) for the product that
    /// follows on the same stream; nothing for a dense or FP8 weight.
    fn materialise(&self, cx: &Ctx) -> Result<()> {
        if let Some(w) = self.quant.as_ref().filter(|w| w.dequantizes_on_gpu()) {
            // SAFETY: w0 is the step's scratch, of at least n·k elements of the step's type.
            unsafe { w.dequantize_into(cx.bf16, self.w0.ptr)? };
            cx.mark("weight dequantisation (NF4, GGUF)")?;
        }
        Ok(())
    }
    /// y = x·W0ᵀ + b + c·(x·D)·Uᵀ; returns y and h = x·D (kept for the backward). `pre_h`:
    /// h already computed (by the projection's group) at this pointer and row stride.
    /// `defer`: where the consumer kernels can take it, the c·h·Uᵀ term is not added to y
    /// but returned, for the kernel that reads y next to add (one pass over y fewer).
    /// `xq`: for an FP8 weight, the input already in E4M3 (shared by a group's members).
    fn forward(
        &self,
        cx: &Ctx,
        x: u64,
        m: usize,
        pre_h: Option<(u64, usize)>,
        defer: bool,
        xq: Option<&fp8::Fp8Mat>,
    ) -> Result<(Buf, PSaved, Option<LowRank>)> {
        let dora = self.ad.as_ref().and_then(|f| f.dora.as_ref());
        // DoRA's bias comes after its rescaling
        let bias = if dora.is_some() {
            None
        } else {
            self.bias.as_ref()
        };
        let (y, yp, had_bias) = linear_output(cx.dev, cx.bf16, m, self.n, bias)?;
        let beta = if had_bias { 1.0 } else { 0.0 };
        let xm = Mat::new(x, self.k);
        if let Some(w) = self.fp8() {
            // the input in E4M3: shared by a group's members, else quantised here
            let own;
            let xq = match xq {
                Some(q) => q,
                None => {
                    own = fp8::quantize(cx, x, (m, self.k), false)?;
                    &own
                }
            };
            // SAFETY: x quantised (m × k), W (n × k), y an m × n bf16 buffer.
            unsafe {
                fp8::gemm_nt(
                    cx,
                    (m, self.n, self.k),
                    xq.operand(),
                    w.w.operand(),
                    yp,
                    had_bias,
                )?
            };
        } else {
            self.materialise(cx)?;
            // SAFETY (every GEMM here): live buffers of the shapes given, one stream.
            unsafe { gemm(cx, (m, self.n, self.k), xm, self.w0.t(), yp, 1.0, beta)? };
        }
        // The adapter's rank-r product is added to y afterwards (β = 1): accumulating the frozen
        // GEMM into the term written first instead costs that GEMM more (+5.7%) than it saves
        // the skinny one.
        cx.mark("frozen GEMM fwd")?;
        let mut deferred = None;
        let h = match &self.ad {
            None => None,
            Some(f) => {
                let (own, hp, ld) = match pre_h {
                    Some((p, ld)) => (None, p, ld),
                    None => {
                        let (h, hp) = x_times_d(cx, x, (m, self.k), (f.d, f.r))?;
                        (Some(h), hp, f.r)
                    }
                };
                let lr = LowRank {
                    h: hp,
                    ldh: ld,
                    u: f.u,
                    r: f.r,
                    c: f.c,
                };
                if defer && dora.is_none() && lr_ok(cx, &lr, self.n) {
                    deferred = Some(lr);
                } else {
                    let (hm, ut) = (Mat::new(hp, ld), Mat::new(f.u, f.r).t());
                    unsafe { gemm(cx, (m, self.n, f.r), hm, ut, yp, f.c, 1.0)? };
                    cx.mark("adapter fwd: y += c·h·Uᵀ")?;
                }
                Some(HSaved {
                    _own: own,
                    ptr: hp,
                    ld,
                })
            }
        };
        if let Some(dp) = dora {
            let (out, outp) = cx.fresh(m * self.n)?;
            let bp = match &self.bias {
                Some(b) => tensor_ptr(b, "bias")?,
                None => 0,
            };
            col_scale(cx, (yp, dp.scale_p, bp, outp), m, self.n)?;
            return Ok((
                (out, outp),
                PSaved {
                    h,
                    y_pre: Some((y, yp)),
                },
                None,
            ));
        }
        Ok(((y, yp), PSaved { h, y_pre: None }, deferred))
    }

    /// dx (+)= g·W0 + c·(g·U)·Dᵀ, and the adapter's gradients into `grads` (f32). `grouped`:
    /// g_U = g·U goes to this pointer and row stride (a block of the group's buffer), and the
    /// group adds c·g_U·Dᵀ to dx afterwards for all its members. `defer`: where the consumer
    /// kernels can take it, c·g_U·Dᵀ is not added to dx but returned with g_U's buffer, for
    /// the kernel that reads dx next to add.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        cx: &Ctx,
        g: u64,
        x: u64,
        saved: &PSaved,
        m: usize,
        (dx, accumulate): (u64, bool),
        grads: u64,
        grouped: Option<(u64, usize)>,
        defer: bool,
    ) -> Result<Option<(LowRank, CudaStorage)>> {
        let (n, k) = (self.n, self.k);
        let h = saved.h.as_ref().map(|h| (h.ptr, h.ld));
        // DoRA: the magnitude's gradient, then the gradient of the unscaled output
        let mut _scaled = None;
        let mut g = g;
        if let Some(dp) = self.ad.as_ref().and_then(|f| f.dora.as_ref()) {
            let yp = saved
                .y_pre
                .as_ref()
                .ok_or_else(|| Error::msg("fast path: DoRA without its saved output"))?
                .1;
            col_dot(cx, (g, yp, dp.inv_p, grads + 4 * dp.off as u64), m, n)?;
            let (gs, gsp) = cx.fresh(m * n)?;
            col_scale(cx, (g, dp.scale_p, 0, gsp), m, n)?;
            g = gsp;
            _scaled = Some(gs);
        }
        let gm = Mat::new(g, n);
        let beta = if accumulate { 1.0 } else { 0.0 };
        // dx (+)= g·W0, then the adapter's c·(g·U)·Dᵀ added to it (see `forward` on the order)
        if let Some(w) = self.fp8() {
            let gq = fp8::quantize(cx, g, (m, n), true)?;
            // SAFETY: g quantised (m × n), Wᵀ (k × n), dx an m × k bf16 buffer.
            unsafe { fp8::gemm_nt(cx, (m, k, n), gq.operand(), w.wt.operand(), dx, accumulate)? };
        } else {
            self.materialise(cx)?;
            unsafe { gemm(cx, (m, k, n), gm, self.w0, dx, 1.0, beta)? };
        }
        cx.mark("frozen GEMM bwd")?;
        let Some(f) = &self.ad else {
            return Ok(None);
        };
        let (h, h_ld) =
            h.ok_or_else(|| Error::msg("fast path: an adapter without its saved product"))?;
        let r = f.r;
        let (gu, (gup, gu_ld)) = match grouped {
            Some(block) => (None, block),
            None => {
                let (gu, gup) = cx.fresh(m * r)?;
                (Some(gu), (gup, r))
            }
        };
        let (xm, gum, hm) = (Mat::new(x, k), Mat::new(gup, gu_ld), Mat::new(h, h_ld));
        let mut deferred = None;
        // dU = c·gᵀ·h goes to SingLoRA's dA rows 0..n (added; the buffer starts zeroed) or is
        // LoRA's dB; with g_U = g·U in one pass over g where the kernel takes it
        let (du, du_beta) = (
            grads + 4 * f.slot.offset(f.slot.layout.u) as u64,
            f.slot.beta(),
        );
        let one_pass = g_pass_ok(cx, g, n, r);
        unsafe {
            if one_pass {
                g_pass(
                    cx.dev,
                    (g, m, n),
                    (f.u, h, h_ld, r),
                    (gup, gu_ld),
                    (du, f.c, du_beta),
                )?;
                cx.mark("adapter bwd: gU and dU in one pass over g")?;
            } else {
                let um = Mat::new(f.u, r);
                gemm_out_ld(cx, cx.bf16, (m, r, n), gm, um, (gup, gu_ld), 1.0, 0.0)?;
                cx.mark("adapter bwd: gU = g·U")?;
            }
            let lr = LowRank {
                h: gup,
                ldh: gu_ld,
                u: f.d,
                r,
                c: f.c,
            };
            if grouped.is_none() && defer && f.dora.is_none() && lr_ok(cx, &lr, k) {
                deferred = Some(lr);
            } else if grouped.is_none() {
                gemm(cx, (m, k, r), gum, Mat::new(f.d, r).t(), dx, f.c, 1.0)?;
                cx.mark("adapter bwd: dx += c·gU·Dᵀ")?;
            }
        }
        // the factors' gradients c·a·b into the f32 buffer where the slot says: dD = c·xᵀ·g_U
        // as rows of its parameter, or its transpose c·g_Uᵀ·x (r × k); dU = c·gᵀ·h (n × r);
        // grouped, the group gives the D side for all its members
        let d_off = grads + 4 * f.slot.offset(f.slot.layout.d) as u64;
        let d_job = grouped.is_none().then(|| match f.slot.layout.d {
            FactorSource::Rows(_) => ((k, r, m), xm.t(), gum, d_off, du_beta),
            FactorSource::Transposed(_) => ((r, k, m), gum.t(), xm, d_off, du_beta),
        });
        let du_job = (!one_pass).then_some(((n, r, m), gm.t(), hm, du, du_beta));
        let jobs = [d_job, du_job];
        let labels = ["adapter bwd: dD = c·xᵀ·gU", "adapter bwd: dU = c·gᵀ·h"];
        for (job, label) in jobs.into_iter().zip(labels) {
            let Some((dims, a, b, out, beta)) = job else {
                continue;
            };
            // SAFETY: live buffers of the shapes given, one stream.
            unsafe { gemm_out(cx, false, dims, a, b, out, f.c, beta)? };
            cx.mark(label)?;
        }
        Ok(match (deferred, gu) {
            (Some(lr), Some(gu)) => Some((lr, gu)),
            _ => None,
        })
    }
}

/// The backward of projections that read one input x (q, k, v, or gate and up) from their
/// output gradients `gs`: dx = Σ g_i·W0_i + c·g_U,i·D_iᵀ, the first writing dx; with their
/// [`Group`], the g_U go side by side into one buffer and one GEMM adds the adapter terms.
#[allow(clippy::too_many_arguments)]
fn backward_members(
    cx: &Ctx,
    (ps, saved, group): (&[Proj], &[PSaved], Option<&Group>),
    gs: &[u64],
    x: u64,
    m: usize,
    dx: u64,
    grads: u64,
) -> Result<()> {
    let gu = match group {
        Some(gr) => Some(cx.fresh(m * gr.width)?),
        None => None,
    };
    for (i, p) in ps.iter().enumerate() {
        let block = match (group, &gu) {
            (Some(gr), Some(b)) => Some(gr.block(b.1, i, cx.bf16)),
            _ => None,
        };
        p.backward(cx, gs[i], x, &saved[i], m, (dx, i > 0), grads, block, false)?;
    }
    if let (Some(gr), Some(b)) = (group, &gu) {
        gr.backward_dx(cx, b.1, m, ps[0].k, dx)?;
        gr.backward_grads(cx, ps, (b.1, x), m, ps[0].k, grads)?;
    }
    Ok(())
}

/// The RMSNorm output of x (with weight w) recomputed for the backward of the projections
/// `ps` that read it, when one has an adapter (whose weight gradients need it); frozen ones
/// need none.
fn norm_for(
    cx: &Ctx,
    (x, w): (u64, u64),
    (m, h, eps): (usize, usize, f64),
    ps: &[Proj],
) -> Result<Option<Buf>> {
    if ps.iter().all(|p| p.ad.is_none()) {
        return Ok(None);
    }
    let y = cx.fresh(m * h)?;
    rms_fwd(cx, (x, w, y.1), m, h, eps)?;
    cx.mark("RMSNorm recompute")?;
    Ok(Some(y))
}

/// q, k, v, o, gate, up, down; [`Llama::fast_forward`] takes only plain models, whose layers
/// have them (fused projections are not plain).
fn layer_projs(l: &Layer) -> [&AdaptedLinear; 7] {
    l.split_projs()
        .expect("a plain LLaMA layer has split projections")
}

impl Llama {
    /// The decoder layers' forward on CUDA, recorded for [`Tape::backward`]; None where this
    /// path does not apply (then the autograd path runs).
    pub(crate) fn fast_forward(&self, batch: &Batch, fast: &FastPath) -> Result<Option<Tape>> {
        let candle_core::Device::Cuda(dev) = batch.ids.device() else {
            return Ok(None);
        };
        let bf16 = match self.dtype {
            DType::BF16 => true,
            DType::F32 => false,
            _ => return Ok(None),
        };
        let cx = Ctx::new(dev, bf16, *fast);
        let c = &self.cfg;
        if c.heads % c.kv_heads != 0
            || c.head_dim % 2 != 0
            || c.heads * c.head_dim != c.hidden
            || !c.is_plain()
        {
            return Ok(None);
        }
        // whether every projection can take this path, without launching anything: each
        // layer's factors are prepared (cast, side by side) just before its forward, so the
        // device starts on layer 0 while the host prepares the rest
        for l in &self.layers {
            for al in layer_projs(l) {
                if !fast_path_applies(al)? {
                    return Ok(None);
                }
            }
        }
        // one scratch buffer for NF4 and GGUF weights, the size of the largest (each is
        // dequantised into it just before its product, in stream order)
        let largest = self
            .layers
            .iter()
            .flat_map(layer_projs)
            .filter(|al| {
                al.base()
                    .quantized_weight()
                    .is_some_and(|w| w.dequantizes_on_gpu())
            })
            .map(|al| al.dims().0 * al.dims().1)
            .max();
        let scratch = match largest {
            Some(n) => Some(Ctx::scalar(dev, bf16).fresh(n)?),
            None => None,
        };
        let scratch_ptr = scratch.as_ref().map_or(0, |s| s.1);
        let mut grad_len = 0;
        let mut projs = vec![];
        let mut groups = vec![];
        let mut layer_ends = vec![];
        let (b, t) = batch.ids.dims2()?;
        let (h, ff) = (c.hidden, c.intermediate);
        let dims = (b, t, c.heads, c.kv_heads, c.head_dim);
        let lens = upload_lens(dev, &key_lens(&batch.mask)?)?;
        // packed rows: each layer's attention gathers q, k, v into one example per row (keys
        // within the example, positions from 0 at its start) and its output back
        let packed = match &batch.segments {
            Some(s) => Some(PackedRows::new(dev, s, t)?),
            None => None,
        };
        let (cos, sin) = rope_tables(&c.inv_freq, t, DType::F32, batch.ids.device())?;
        let tables = (tensor_ptr(&cos, "rope cos")?, tensor_ptr(&sin, "rope sin")?);
        let x0 = self
            .embed
            .index_select(&batch.ids.flatten_all()?, 0)?
            .contiguous()?;
        let x0_var = if self.grad_from_embeddings {
            Some(Var::from_tensor(&x0)?)
        } else {
            None
        };
        let norms: Vec<(u64, u64)> = self
            .layers
            .iter()
            .map(|l| Ok((tensor_ptr(&l.ln1, "ln1")?, tensor_ptr(&l.ln2, "ln2")?)))
            .collect::<Result<_>>()?;
        let mut x_in: Option<CudaStorage> = None;
        let mut x_ptr = tensor_ptr(&x0, "embeddings")?;
        let mut tapes = vec![];
        for (li, l) in self.layers.iter().enumerate() {
            let mut ps = vec![];
            for al in layer_projs(l) {
                ps.push(
                    prepare(al, bf16, &mut grad_len, scratch_ptr)?.ok_or_else(|| {
                        Error::msg(format!("fast path: {} cannot be prepared", al.name()))
                    })?,
                );
            }
            let ps: [Proj; 7] = ps.try_into().map_err(|_| Error::msg("seven projections"))?;
            let grp = if fast.grouped {
                [group_of(&ps[0..3])?, group_of(&ps[4..6])?]
            } else {
                [None, None]
            };
            layer_ends.push(grad_len);
            let env = LayerEnv {
                cx: &cx,
                dims,
                eps: c.eps,
                ff,
                tables,
                lens: &lens,
                packed: packed.as_ref(),
                recompute: self.recompute,
            };
            let (tape, x_next) = layer_forward(&env, &ps, &grp, norms[li], x_ptr)?;
            let x_prev = x_in.take();
            tapes.push(if self.checkpoint_layers {
                // only the layer's input is kept; the backward runs the layer again
                LayerRec::Checkpoint {
                    _x_in: x_prev,
                    x_in_ptr: x_ptr,
                }
            } else {
                LayerRec::Kept(Box::new(LayerTape {
                    _x_in: x_prev,
                    ..tape
                }))
            });
            projs.push(ps);
            groups.push(grp);
            x_ptr = x_next.1;
            x_in = Some(x_next.0);
        }
        let last = x_in.ok_or_else(|| Error::msg("a model without layers"))?;
        let leaf = Var::from_tensor(&to_tensor(last, (b, t, h), &x0)?)?;
        FAST_FORWARDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(Tape {
            dev: dev.clone(),
            bf16,
            fast: *fast,
            dims,
            hidden: h,
            ff,
            eps: c.eps,
            tables: (cos, sin),
            projs,
            groups,
            norms,
            layers: tapes,
            lens,
            recompute: self.recompute,
            x0,
            x0_var,
            grad_len,
            layer_ends,
            leaf,
            _scratch: scratch.map(|s| s.0),
            packed,
        }))
    }
}

/// What every decoder layer's forward reads besides its own weights and input.
struct LayerEnv<'a> {
    cx: &'a Ctx<'a>,
    dims: (usize, usize, usize, usize, usize),
    eps: f64,
    ff: usize,
    tables: (u64, u64),
    lens: &'a Arc<CudaSlice<u32>>,
    packed: Option<&'a PackedRows>,
    recompute: bool,
}

/// One decoder layer's forward from the residual stream at `x_ptr`: what its backward reads
/// (the input itself left to the caller to keep) and the stream after it. The forward runs it
/// once per layer; with layer checkpointing the backward runs it again from the kept input.
fn layer_forward(
    env: &LayerEnv,
    ps: &[Proj; 7],
    grp: &[Option<Group>; 2],
    (ln1, ln2): (u64, u64),
    x_ptr: u64,
) -> Result<(LayerTape, Buf)> {
    let cx = env.cx;
    let (b, t, heads, kv_heads, head_dim) = env.dims;
    let (m, h, ff, nd) = (b * t, heads * head_dim, env.ff, heads * head_dim);
    let bf16 = cx.bf16;
    let fuse = cx.fast.fused_low_rank;
    let (tables, lens, dims) = (env.tables, env.lens, env.dims);
    let packed = env.packed;
    cx.mark("other")?;
    let hn1 = cx.fresh(m * h)?;
    rms_fwd(cx, (x_ptr, ln1, hn1.1), m, h, env.eps)?;
    cx.mark("RMSNorm fwd")?;
    let [g_qkv, g_gu] = &grp;
    let h_qkv = match g_qkv {
        Some(gr) => Some(gr.forward(cx, hn1.1, m, h)?),
        None => None,
    };
    let pre = |gr: &Option<Group>, buf: &Option<Buf>, i: usize| match (gr, buf) {
        (Some(gr), Some(b)) => Some(gr.block(b.1, i, bf16)),
        _ => None,
    };
    // q's, k's and v's terms go to the RoPE/split kernel (whole warps per half head)
    let qkv_fuse = fuse && head_dim % 64 == 0 && packed.is_none();
    // FP8 weights: q, k and v share one E4M3 copy of their input
    let shared_fp8 = |members: &[Proj], x: u64| -> Result<Option<fp8::Fp8Mat>> {
        if members.iter().all(|p| p.fp8().is_some()) {
            Ok(Some(fp8::quantize(cx, x, (m, h), false)?))
        } else {
            Ok(None)
        }
    };
    let xq = shared_fp8(&ps[0..3], hn1.1)?;
    let (q, hq, lq) = ps[0].forward(cx, hn1.1, m, pre(g_qkv, &h_qkv, 0), qkv_fuse, xq.as_ref())?;
    let (k, hk, lk) = ps[1].forward(cx, hn1.1, m, pre(g_qkv, &h_qkv, 1), qkv_fuse, xq.as_ref())?;
    let (v, hv, lv) = ps[2].forward(cx, hn1.1, m, pre(g_qkv, &h_qkv, 2), qkv_fuse, xq.as_ref())?;
    drop(xq);
    // the norms' outputs are recomputed in the backward (cheap, and 2·hidden values
    // per token fewer to keep); SwiGLU's too with `recompute`
    drop(hn1);
    let (a, ap, att) = match packed {
        None => forward_raw(
            cx,
            (q.1, k.1, v.1),
            tables,
            dims,
            lens,
            (true, env.recompute),
            [lq.as_ref(), lk.as_ref(), lv.as_ref()],
        )?,
        Some(pr) => {
            let kvd = kv_heads * head_dim;
            let rows = pr.rows();
            let qg = cx.fresh(rows * nd)?;
            let kg = cx.fresh(rows * kvd)?;
            let vg = cx.fresh(rows * kvd)?;
            pr.unpack(cx, (q.1, qg.1), nd)?;
            pr.unpack(cx, (k.1, kg.1), kvd)?;
            pr.unpack(cx, (v.1, vg.1), kvd)?;
            let dims_g = (pr.examples, pr.max_len, heads, kv_heads, head_dim);
            let (ag, agp, att) = forward_raw(
                cx,
                (qg.1, kg.1, vg.1),
                tables,
                dims_g,
                &pr.lens,
                (true, env.recompute),
                [None, None, None],
            )?;
            drop((qg, kg, vg));
            let (a, ap) = cx.fresh(m * nd)?;
            pr.pack(cx, (agp, ap), nd)?;
            drop(ag);
            (a, ap, att)
        }
    };
    cx.mark("attention fwd")?;
    drop((q, k, v));
    let (o, ho, lo) = ps[3].forward(cx, ap, m, None, fuse, None)?;
    let x_mid = cx.fresh(m * h)?;
    match &lo {
        Some(lr) => add_lr(cx, (x_ptr, o.1, x_mid.1), (m, h), lr)?,
        None => add(cx, (x_ptr, o.1, x_mid.1), m * h)?,
    }
    cx.mark("residual add")?;
    drop(o);
    let hn2 = cx.fresh(m * h)?;
    rms_fwd(cx, (x_mid.1, ln2, hn2.1), m, h, env.eps)?;
    cx.mark("RMSNorm fwd")?;
    let h_gu = match g_gu {
        Some(gr) => Some(gr.forward(cx, hn2.1, m, h)?),
        None => None,
    };
    // gate's and up's terms go to the SwiGLU kernel when both can (one rank)
    let gu_fuse = fuse
        && match (&ps[4].ad, &ps[5].ad) {
            (Some(a), Some(b)) => a.r == b.r,
            _ => true,
        };
    let xq = shared_fp8(&ps[4..6], hn2.1)?;
    let (g, hg, lg) = ps[4].forward(cx, hn2.1, m, pre(g_gu, &h_gu, 0), gu_fuse, xq.as_ref())?;
    let (u, hu, lu) = ps[5].forward(cx, hn2.1, m, pre(g_gu, &h_gu, 1), gu_fuse, xq.as_ref())?;
    drop(xq);
    drop(hn2);
    let f = cx.fresh(m * ff)?;
    if lg.is_some() || lu.is_some() {
        let terms = (lg.as_ref(), lu.as_ref());
        swiglu_fwd_lr(cx, (g.1, u.1, f.1), (m, ff), terms, false)?;
    } else {
        swiglu_fwd(cx, (g.1, u.1, f.1), m * ff)?;
    }
    cx.mark("SwiGLU fwd")?;
    let (dn, hdn, ldn) = ps[6].forward(cx, f.1, m, None, fuse, None)?;
    // kept for down's adapter gradients unless recomputed (a frozen down needs none)
    let f = (ps[6].ad.is_some() && !env.recompute).then_some(f);
    let x_next = cx.fresh(m * h)?;
    match &ldn {
        Some(lr) => add_lr(cx, (x_mid.1, dn.1, x_next.1), (m, h), lr)?,
        None => add(cx, (x_mid.1, dn.1, x_next.1), m * h)?,
    }
    cx.mark("residual add")?;
    drop(dn);
    debug_assert_eq!(nd, h);
    let tape = LayerTape {
        _x_in: None,
        x_in_ptr: x_ptr,
        h_qkv: [hq, hk, hv],
        att,
        a: (a, ap),
        h_o: ho,
        x_mid,
        g,
        u,
        f,
        h_gu: [hg, hu],
        h_down: hdn,
        _h_groups: [h_qkv, h_gu],
        gu_terms: [lg, lu],
    };
    Ok((tape, x_next))
}

impl Tape {
    /// The launch context of this step's kernels.
    fn cx(&self) -> Ctx<'_> {
        Ctx::new(&self.dev, self.bf16, self.fast)
    }

    /// The backward from the gradient at [`Tape::leaf`] (taken from `grads`): the adapter
    /// variables' gradients (and the embeddings' when asked) go into `grads`. With `sync`
    /// (data parallelism), each bucket of finished layers' adapter gradients is summed over
    /// the ranks while the layers below run; the variables so summed are returned.
    pub(crate) fn backward(
        self,
        grads: &mut GradStore,
        sync: Option<&dyn GradSync>,
    ) -> Result<HashSet<TensorId>> {
        let Some(d_last) = grads.remove(self.leaf.as_tensor()) else {
            // the loss does not depend on the layers: no gradients, nothing to sum (the same on
            // every rank)
            return Ok(HashSet::new());
        };
        let cx = self.cx();
        let dev = cx.dev;
        let (b, t, nh, kvh, hd) = self.dims;
        let (m, h, ff) = (b * t, self.hidden, self.ff);
        let el = cx.elem();
        let tables = (
            tensor_ptr(&self.tables.0, "rope cos")?,
            tensor_ptr(&self.tables.1, "rope sin")?,
        );
        // the residual stream's gradient, a buffer of our own
        let dxm = d_last.to_dtype(self.x0.dtype())?.copy()?.contiguous()?;
        let dxp = tensor_ptr(&dxm, "gradient")?;
        let packed = dev.alloc_zeros::<f32>(self.grad_len.max(1))?;
        let grads_ptr = cuda::slice_ptr(&packed);
        // the packed values not yet handed to `sync`: pending_start..pending_end
        let mut pending_end = self.grad_len;
        for (li, rec) in self.layers.iter().enumerate().rev() {
            let ps = &self.projs[li];
            let (ln1, ln2) = self.norms[li];
            // a checkpointed layer's forward again, from its kept input
            let again;
            let lt: &LayerTape = match rec {
                LayerRec::Kept(t) => t,
                LayerRec::Checkpoint { x_in_ptr, .. } => {
                    let env = LayerEnv {
                        cx: &cx,
                        dims: self.dims,
                        eps: self.eps,
                        ff,
                        tables,
                        lens: &self.lens,
                        packed: self.packed.as_ref(),
                        recompute: self.recompute,
                    };
                    let (tape, x_next) =
                        layer_forward(&env, ps, &self.groups[li], (ln1, ln2), *x_in_ptr)?;
                    drop(x_next);
                    cx.mark("layer recompute")?;
                    again = tape;
                    &again
                }
            };
            // MLP: down, SwiGLU, gate and up, norm 2 (adding into dxm)
            cx.mark("other")?;
            let [tg, tu] = lt.gu_terms.each_ref().map(|t| t.as_ref());
            // down's input, for its adapter's gradients: kept by the forward, or recomputed here
            let recomputed = match &lt.f {
                Some(_) => None,
                None if ps[6].ad.is_none() => None,
                None => {
                    let f = cx.fresh(m * ff)?;
                    if tg.is_some() || tu.is_some() {
                        swiglu_fwd_lr(&cx, (lt.g.1, lt.u.1, f.1), (m, ff), (tg, tu), false)?;
                    } else {
                        swiglu_fwd(&cx, (lt.g.1, lt.u.1, f.1), m * ff)?;
                    }
                    cx.mark("SwiGLU recompute")?;
                    Some(f)
                }
            };
            let f = lt.f.as_ref().or(recomputed.as_ref()).map_or(0, |f| f.1);
            let df = cx.fresh(m * ff)?;
            // down's c·g_U·Dᵀ to the SwiGLU backward, when of the gate's and up's rank
            let down_r = ps[6].ad.as_ref().map(|f| f.r);
            let defer =
                self.fast.fused_low_rank && [tg, tu].iter().flatten().all(|t| Some(t.r) == down_r);
            let td = ps[6].backward(
                &cx,
                dxp,
                f,
                &lt.h_down,
                m,
                (df.1, false),
                grads_ptr,
                None,
                defer,
            )?;
            let dgu = cx.fresh(2 * m * ff)?;
            if tg.is_some() || tu.is_some() || td.is_some() {
                let terms = [tg, tu, td.as_ref().map(|t| &t.0)];
                swiglu_bwd_lr(&cx, (lt.g.1, lt.u.1, df.1, dgu.1), (m, ff), terms)?;
            } else {
                swiglu_bwd(&cx, (lt.g.1, lt.u.1, df.1, dgu.1), m * ff)?;
            }
            cx.mark("SwiGLU bwd")?;
            drop((df, recomputed, td));
            let hn2 = norm_for(&cx, (lt.x_mid.1, ln2), (m, h, self.eps), &ps[4..6])?;
            let dhn2 = cx.fresh(m * h)?;
            let [g_qkv, g_gu] = &self.groups[li];
            let gate_up = [dgu.1, dgu.1 + el * (m * ff) as u64];
            backward_members(
                &cx,
                (&ps[4..6], &lt.h_gu, g_gu.as_ref()),
                &gate_up,
                hn2.as_ref().map_or(0, |b| b.1),
                m,
                dhn2.1,
                grads_ptr,
            )?;
            drop((dgu, hn2));
            rms_bwd_acc(&cx, (lt.x_mid.1, ln2, dhn2.1, dxp), m, h, self.eps)?;
            cx.mark("RMSNorm bwd")?;
            drop(dhn2);
            // attention: o, the attention block, q k v, norm 1
            let da = cx.fresh(m * nh * hd)?;
            let da_out = (da.1, false);
            ps[3].backward(&cx, dxp, lt.a.1, &lt.h_o, m, da_out, grads_ptr, None, false)?;
            let (pk, pkp) = match &self.packed {
                None => backward_raw(&cx, &lt.att, (da.1, lt.a.1), tables, self.dims)?,
                Some(pr) => {
                    // the output gradient and the output as example rows, the attention's
                    // backward there, and dq, dk, dv back to the packed rows
                    let (nd, kvd, rows) = (nh * hd, kvh * hd, pr.rows());
                    let dag = cx.fresh(rows * nd)?;
                    let og = cx.fresh(rows * nd)?;
                    pr.unpack(&cx, (da.1, dag.1), nd)?;
                    pr.unpack(&cx, (lt.a.1, og.1), nd)?;
                    let dims_g = (pr.examples, pr.max_len, nh, kvh, hd);
                    let (pkg, pkgp) = backward_raw(&cx, &lt.att, (dag.1, og.1), tables, dims_g)?;
                    drop((dag, og));
                    let (nqg, nkg) = ((rows * nd) as u64, (rows * kvd) as u64);
                    let (nq, nk) = ((m * nd) as u64, (m * kvd) as u64);
                    let out = cx.fresh(m * (nd + 2 * kvd))?;
                    pr.pack(&cx, (pkgp, out.1), nd)?;
                    pr.pack(&cx, (pkgp + el * nqg, out.1 + el * nq), kvd)?;
                    pr.pack(&cx, (pkgp + el * (nqg + nkg), out.1 + el * (nq + nk)), kvd)?;
                    drop(pkg);
                    out
                }
            };
            cx.mark("attention bwd")?;
            drop(da);
            let (nq, nk) = (m * nh * hd, m * kvh * hd);
            let hn1 = norm_for(&cx, (lt.x_in_ptr, ln1), (m, h, self.eps), &ps[0..3])?;
            let dhn1 = cx.fresh(m * h)?;
            let qkv = [pkp, pkp + el * nq as u64, pkp + el * (nq + nk) as u64];
            backward_members(
                &cx,
                (&ps[0..3], &lt.h_qkv, g_qkv.as_ref()),
                &qkv,
                hn1.as_ref().map_or(0, |b| b.1),
                m,
                dhn1.1,
                grads_ptr,
            )?;
            drop((pk, hn1));
            rms_bwd_acc(&cx, (lt.x_in_ptr, ln1, dhn1.1, dxp), m, h, self.eps)?;
            cx.mark("RMSNorm bwd")?;
            drop(dhn1);
            // layer li's adapter gradients are final: hand a full bucket over
            if let Some(sync) = sync {
                let start = if li == 0 { 0 } else { self.layer_ends[li - 1] };
                if pending_end > start && (pending_end - start >= sync.bucket_len() || li == 0) {
                    sync.reduce_async(grads_ptr + 4 * start as u64, pending_end - start)?;
                    pending_end = start;
                }
            }
        }
        if let Some(sync) = sync {
            sync.join()?;
        }
        let mut summed = HashSet::new();
        if let Some(v) = &self.x0_var {
            grads.insert(v.as_tensor(), dxm.reshape(self.x0.shape())?);
        }
        // the adapters' gradients, views of the packed buffer
        let flat = to_tensor(
            candle_core::cuda_backend::CudaStorage::wrap_cuda_slice(packed, dev.clone()),
            self.grad_len.max(1),
            &self.x0,
        )?;
        for ps in &self.projs {
            for p in ps {
                let Some(f) = &p.ad else { continue };
                if sync.is_some() {
                    summed.extend(f.slot.params.iter().map(|(v, _)| v.id()));
                }
                if f.c == 0.0 {
                    // u(t) = 0: the adapter does not enter the loss (as on the autograd path,
                    // no gradient at all, so no weight decay either)
                    continue;
                }
                for (var, off) in &f.slot.params {
                    let g = flat
                        .narrow(0, *off, var.elem_count())?
                        .reshape(var.shape())?;
                    grads.insert(var.as_tensor(), g);
                }
            }
        }
        Ok(summed)
    }
}

/// The device pointer of a contiguous u32 CUDA tensor.
impl Llama {
    /// The vocabulary projection's weight (vocab × hidden) where the SFT head can run on the
    /// fast path: frozen (no adapter, not merged) and without a bias; tied to the embeddings
    /// when the model has no head of its own.
    fn frozen_head_weight(&self) -> Option<&Tensor> {
        match &self.lm_head {
            None => Some(&self.embed),
            Some(al) if al.adapter().is_none() && !al.is_merged() && al.base().bias().is_none() => {
                al.base().dense_weight()
            }
            _ => None,
        }
    }
}

impl Tape {
    /// SFT's loss on the fast path, from the residual stream at [`Tape::leaf`]: the final norm
    /// of the rows that predict completion tokens, their logits through the frozen head, the
    /// cross-entropy and its gradient in one kernel (the gradient written over the logits), the
    /// gradient back through the head and the norm, scattered to those rows. Returns the mean
    /// loss and the gradient at the leaf for a loss scaled by `scale`; None where this path
    /// does not apply (a trained head, a vocabulary not a multiple of 8): the autograd head
    /// runs then. Candle's autograd kept the logits, their gradient and a zero-filled buffer
    /// of each as separate tensors and computed the two passes of the cross-entropy apart.
    pub(crate) fn lm_loss(
        &self,
        model: &Llama,
        rows: &[u32],
        targets: &[u32],
        scale: f64,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let Some(w) = model.frozen_head_weight() else {
            return Ok(None);
        };
        let cx = self.cx();
        let (vocab, h) = w.dims2()?;
        let x = self.leaf.as_tensor();
        let (b, t, _) = x.dims3()?;
        let n = rows.len();
        let wm = mat_of_tensor(w, "the vocabulary projection")?.0;
        if n == 0 || !x.is_contiguous() {
            return Ok(None);
        }
        let xp = tensor_ptr(x, "the residual stream")?;
        let normp = tensor_ptr(&model.norm, "final norm")?;
        // the 8-wide kernels only (none where the choices turn them off)
        if !cx.v8(&[xp, normp, wm.ptr], h) || !cx.v8(&[], vocab) {
            return Ok(None);
        }
        let device = x.device();
        let rows_t = Tensor::new(rows, device)?;
        let targets_t = Tensor::new(targets, device)?;
        let rows_p = u32_ptr(&rows_t, "head rows")?;
        let hn = cx.fresh(n * h)?;
        rms_fwd_rows(&cx, (xp, rows_p, normp, hn.1), n, h, self.eps)?;
        let z = cx.fresh(n * vocab)?;
        // SAFETY (both GEMMs): live buffers of the shapes given, one stream.
        unsafe { gemm(&cx, (n, vocab, h), Mat::new(hn.1, h), wm.t(), z.1, 1.0, 0.0)? };
        cx.mark("head: logits")?;
        let nll = Tensor::zeros(n, DType::F32, device)?;
        let g = (scale / n as f64) as f32;
        let nll_p = tensor_ptr(&nll, "losses")?;
        let targets_p = u32_ptr(&targets_t, "targets")?;
        xent_grad_inplace(&cx, (z.1, targets_p, nll_p), n, vocab, g)?;
        cx.mark("head: cross-entropy and its gradient")?;
        drop(hn);
        let dhn = cx.fresh(n * h)?;
        unsafe {
            gemm(
                &cx,
                (n, h, vocab),
                Mat::new(z.1, vocab),
                wm,
                dhn.1,
                1.0,
                0.0,
            )?
        };
        drop(z);
        cx.mark("head: gradient GEMM")?;
        let d_last = Tensor::zeros((b, t, h), x.dtype(), device)?;
        let d_last_p = tensor_ptr(&d_last, "head gradient")?;
        rms_bwd_acc_rows(&cx, (xp, rows_p, normp, dhn.1, d_last_p), n, h, self.eps)?;
        cx.mark("head: norm backward and scatter")?;
        Ok(Some((nll.mean_all()?, d_last)))
    }
}
