//! The BERT-family encoder layers' forward and backward on the CPU without candle's autograd.
//!
//! candle's engine starts every gradient edge from a zero tensor and adds into it; a BERT layer
//! has a dozen such (tokens × hidden)-sized edges, about a sixth of a MiniLM step (`perf`,
//! docs/benchmarks.md). Here every layer runs on buffers this code owns (kept between steps):
//! each linear layer is one GEMM over all tokens, q, k and v one of width 3h (the adapters'
//! products accumulated into the same output, the bias added by the parallel pass that reads
//! the output next: LayerNorm, GELU or the q/k/v pass), the attention runs per (row, head) with
//! P kept, the residual add is fused into the LayerNorm, and the backward accumulates where
//! gradients meet (the residual stream's gradient is the buffer the input gradients of the next
//! linear layers add into).
//!
//! The boundary with candle is the encoder's output: it becomes a leaf variable, candle's
//! autograd runs pooling, head and loss from it, and [`Tape::backward`] starts from the
//! gradient at that leaf. Adapter gradients go into the same `GradStore` under each adapter
//! variable, so the optimizer sees no difference; the embeddings are frozen, so the backward
//! stops at the lowest adapted layer. SingLoRA and LoRA/rsLoRA adapters (and none) on f32
//! weights with exact GELU take this path; DoRA, merged adapters, other activations, f64 and
//! non-CPU devices take the autograd path, and so does everything when the model's
//! [`crate::ops::FastPath::cpu_encoder`] is off.

use std::mem::MaybeUninit;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor, Var};
use rayon::prelude::*;

use super::{Bert, Norm};
use crate::adapter::{AdaptedLinear, Adapter};
use crate::data::Batch;
use crate::error::Result;
use crate::ops::attention::{attend_unit, attend_unit_backward, SharedMut};
use crate::ops::cpu_gemm::{gemm_at, View};
use crate::ops::gelu::Gelu;
use crate::ops::{filled_vec, host_vec, key_lens, sum_map, sum_map2, Activation};

/// An n-element buffer that `fill` writes in full (no zero-fill first).
///
/// # Safety
/// `fill` must write all n elements through the pointer it is given.
unsafe fn written(n: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    // SAFETY: the caller's contract.
    unsafe { filled_vec::<f32>(n, |v| fill(v.as_mut_ptr().cast())) }
}

/// Activation buffers of earlier steps, reused: a fresh buffer's pages are faulted in and
/// zeroed by the kernel on first touch (`clear_page_erms` was 4% of a MiniLM step).
#[derive(Default)]
pub(crate) struct Pool(Mutex<Vec<Vec<f32>>>);

impl Pool {
    /// Buffers kept at most (a step of MiniLM returns about 120).
    const MAX: usize = 1024;

    /// An empty buffer with room for n elements: the smallest kept one that fits, or a new one.
    fn take(&self, n: usize) -> Vec<f32> {
        let mut kept = self.0.lock().unwrap();
        let best = (0..kept.len())
            .filter(|&i| kept[i].capacity() >= n)
            .min_by_key(|&i| kept[i].capacity());
        match best {
            Some(i) => kept.swap_remove(i),
            None => Vec::with_capacity(n),
        }
    }

    fn give(&self, mut v: Vec<f32>) {
        v.clear();
        let mut kept = self.0.lock().unwrap();
        if kept.len() < Self::MAX {
            kept.push(v);
        }
    }

    /// [`written`] on a kept buffer.
    ///
    /// # Safety
    /// As for [`written`].
    unsafe fn written(&self, n: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
        let mut v = self.take(n);
        fill(v.as_mut_ptr());
        // SAFETY: the capacity is at least n, and the caller's contract: all n are written.
        unsafe { v.set_len(n) };
        v
    }

    /// A kept buffer that `fill` writes in full through the slice it is given.
    ///
    /// # Safety
    /// `fill` must write every element.
    unsafe fn filled(&self, n: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
        let mut v = self.take(n);
        fill(&mut v.spare_capacity_mut()[..n]);
        // SAFETY: the caller's contract.
        unsafe { v.set_len(n) };
        v
    }

    /// An f32 tensor's data in a kept buffer.
    fn copy_of(&self, t: &Tensor) -> Result<Vec<f32>> {
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(c) = &*storage else {
            return Err(crate::error::Error::msg("expected a CPU tensor"));
        };
        let src = crate::ops::cpu_slice::<f32>(c, layout, "encoder input")?;
        let mut v = self.take(src.len());
        v.extend_from_slice(src);
        Ok(v)
    }
}

/// A frozen f32 weight, row-major (d_out × d_in): the tensor kept alive, its data's address.
struct Frozen {
    _keep: Tensor,
    ptr: *const f32,
}

impl Frozen {
    fn of(t: &Tensor) -> Option<Self> {
        let ptr = {
            let (storage, layout) = t.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, _))) => v[a..].as_ptr(),
                _ => return None,
            }
        };
        // The address outlives the read guard: frozen weights are plain tensors, never
        // variables, so nothing writes their storage in place (a merge replaces the tensor),
        // and `_keep` holds this one alive as long as the pointer is used.
        Some(Frozen {
            _keep: t.clone(),
            ptr,
        })
    }
}

/// An adapter as factors of ΔW = c·U·Dᵀ (as [`Adapter::factors`] gives them), copied once.
struct Factors {
    /// D (d_in × r), row-major.
    d: Vec<f32>,
    /// U (d_out × r), row-major.
    u: Vec<f32>,
    r: usize,
    c: f32,
    /// The adapter, whose hooks turn dD and dU into its parameters' gradients.
    adapter: Adapter,
}

/// A linear layer of the step: frozen weight, bias, adapter.
struct Lin {
    w: Frozen,
    d_out: usize,
    d_in: usize,
    bias: Option<Vec<f32>>,
    ad: Option<Factors>,
}

/// Adapter gradients of one step, per variable.
type AdGrads = Vec<(Var, Tensor)>;

impl Lin {
    /// None where this path does not take the layer (merged, DoRA, not f32).
    fn of(l: &AdaptedLinear) -> Result<Option<Self>> {
        if l.is_merged() {
            return Ok(None);
        }
        let base = l.base();
        let (d_out, d_in) = l.dims();
        let Some(w) = base.dense_weight().and_then(Frozen::of) else {
            return Ok(None);
        };
        let bias = base.bias().map(host_vec::<f32>).transpose()?;
        let ad = match l.adapter() {
            None => None,
            Some(a) => {
                if a.rescales_output() || a.params().iter().any(|p| p.var.dtype() != DType::F32) {
                    return Ok(None);
                }
                let (d, u, c) = a.factors()?;
                Some(Factors {
                    d: host_vec::<f32>(&d)?,
                    u: host_vec::<f32>(&u)?,
                    r: a.rank(),
                    c: c as f32,
                    adapter: a.clone(),
                })
            }
        };
        Ok(Some(Lin {
            w,
            d_out,
            d_in,
            bias,
            ad,
        }))
    }

    /// out (m × d_out at row stride `ld`) = x·W0ᵀ + c·(x·D)·Uᵀ (the caller adds the bias);
    /// returns H = x·D (m × r) for an adapted layer.
    ///
    /// # Safety
    /// `x` must address m × d_in elements and `out` m × d_out writable ones (at their strides).
    unsafe fn forward(
        &self,
        pool: &Pool,
        x: View<f32>,
        m: usize,
        out: *mut f32,
        ld: usize,
    ) -> Option<Vec<f32>> {
        let (n, k) = (self.d_out, self.d_in);
        let w = View::rows(self.w.ptr, k);
        // SAFETY: the caller's contract; W0 is d_out × d_in.
        unsafe { gemm_at(out, ld, (m, n, k), x, w.t(), 1.0, false, true) };
        let ad = self.ad.as_ref()?;
        let r = ad.r;
        // SAFETY: h is m × r, written in full by the GEMM; D is d_in × r, U d_out × r.
        unsafe {
            let h = pool.written(m * r, |h| {
                gemm_at(
                    h,
                    r,
                    (m, r, k),
                    x,
                    View::rows(ad.d.as_ptr(), r),
                    1.0,
                    false,
                    true,
                )
            });
            let u = View::rows(ad.u.as_ptr(), r);
            gemm_at(
                out,
                ld,
                (m, n, r),
                View::rows(h.as_ptr(), r),
                u.t(),
                ad.c,
                true,
                true,
            );
            Some(h)
        }
    }

    /// The backward from g = ∂L/∂y (m × d_out): dx (m × d_in at row stride `ld`, added to
    /// when `accumulate`) = g·W0 + c·(g·U)·Dᵀ where `dx` is given, and the adapter's
    /// gradients dD = c·xᵀ·(g·U), dU = c·gᵀ·H pushed onto `grads` as its variables' gradients.
    ///
    /// # Safety
    /// `g` must address m × d_out elements, `x` m × d_in, `h` be what [`Lin::forward`]
    /// returned for `x`, and `dx` address m × d_in writable elements.
    unsafe fn backward(
        &self,
        g: View<f32>,
        x: View<f32>,
        h: Option<&[f32]>,
        m: usize,
        dx: Option<(*mut f32, usize, bool)>,
        grads: &mut AdGrads,
    ) -> Result<()> {
        let (n, k) = (self.d_out, self.d_in);
        let w = View::rows(self.w.ptr, k);
        if let Some((p, ld, acc)) = dx {
            // SAFETY: the caller's contract.
            unsafe { gemm_at(p, ld, (m, k, n), g, w, 1.0, acc, true) };
        }
        let (Some(ad), Some(h)) = (&self.ad, h) else {
            return Ok(());
        };
        let r = ad.r;
        let d = View::rows(ad.d.as_ptr(), r);
        let u = View::rows(ad.u.as_ptr(), r);
        // SAFETY: every buffer below is written in full by its GEMM; shapes as documented.
        let (dd, du) = unsafe {
            let gu = written(m * r, |p| gemm_at(p, r, (m, r, n), g, u, 1.0, false, true));
            let guv = View::rows(gu.as_ptr(), r);
            if let Some((p, ld, _)) = dx {
                gemm_at(p, ld, (m, k, r), guv, d.t(), ad.c, true, true);
            }
            let dd = written(k * r, |p| {
                gemm_at(p, r, (k, r, m), x.t(), guv, ad.c, false, true)
            });
            let hv = View::rows(h.as_ptr(), r);
            let du = written(n * r, |p| {
                gemm_at(p, r, (n, r, m), g.t(), hv, ad.c, false, true)
            });
            (dd, du)
        };
        ad.push_grads(&dd, &du, grads)
    }
}

impl Factors {
    /// The variables' gradients from dD (d_in × r) and dU (d_out × r), scale included.
    fn push_grads(&self, dd: &[f32], du: &[f32], grads: &mut AdGrads) -> Result<()> {
        grads.extend(self.adapter.fold_factor_grads(dd, du, &Device::Cpu)?);
        Ok(())
    }
}

/// q, k and v as one linear layer of width 3h: one GEMM over the stacked weights each way,
/// and the adapters' skinny products as one GEMM each over all three (one pass over x, g).
struct Qkv {
    /// W_q, W_k, W_v stacked (3h × h).
    w: Vec<f32>,
    h: usize,
    /// Per adapted member: (member, first column in the concatenation, rank).
    members: Vec<(usize, usize, usize)>,
    /// The adapters' total rank R.
    rank: usize,
    /// [D_q D_k D_v] (h × R), and with each block times its scale c.
    d: Vec<f32>,
    d_scaled: Vec<f32>,
    /// The U_jᵀ as blocks of an R × 3h matrix (row block of member j's columns, column block
    /// of its outputs), and with each block times its scale.
    u: Vec<f32>,
    u_scaled: Vec<f32>,
}

impl Qkv {
    fn of(lins: [&Lin; 3]) -> Self {
        let h = lins[0].d_in;
        let mut w = Vec::with_capacity(3 * h * h);
        for l in lins {
            // SAFETY: a frozen weight of d_out × d_in = h × h elements.
            w.extend_from_slice(unsafe { std::slice::from_raw_parts(l.w.ptr, h * h) });
        }
        let mut members = vec![];
        let mut rank = 0;
        for (j, l) in lins.iter().enumerate() {
            if let Some(ad) = &l.ad {
                members.push((j, rank, ad.r));
                rank += ad.r;
            }
        }
        let (mut d, mut d_scaled) = (vec![0f32; h * rank], vec![0f32; h * rank]);
        let (mut u, mut u_scaled) = (vec![0f32; rank * 3 * h], vec![0f32; rank * 3 * h]);
        for &(j, off, r) in &members {
            let ad = lins[j].ad.as_ref().unwrap();
            for i in 0..h {
                for l in 0..r {
                    d[i * rank + off + l] = ad.d[i * r + l];
                    d_scaled[i * rank + off + l] = ad.c * ad.d[i * r + l];
                    // U_jᵀ[l][i] = U_j[i][l]
                    u[(off + l) * 3 * h + j * h + i] = ad.u[i * r + l];
                    u_scaled[(off + l) * 3 * h + j * h + i] = ad.c * ad.u[i * r + l];
                }
            }
        }
        Qkv {
            w,
            h,
            members,
            rank,
            d,
            d_scaled,
            u,
            u_scaled,
        }
    }

    /// out (m × 3h) = x·[W_q W_k W_v]ᵀ + the adapters' products (no biases); returns
    /// H = x·[D_q D_k D_v] (m × R) when any member is adapted.
    ///
    /// # Safety
    /// `x` must address m × h elements and `out` m × 3h writable ones.
    unsafe fn forward(
        &self,
        pool: &Pool,
        x: View<f32>,
        m: usize,
        out: *mut f32,
    ) -> Option<Vec<f32>> {
        let (h, rank) = (self.h, self.rank);
        let w = View::rows(self.w.as_ptr(), h);
        // SAFETY: the caller's contract; W is 3h × h, D h × R, U R × 3h.
        unsafe {
            gemm_at(out, 3 * h, (m, 3 * h, h), x, w.t(), 1.0, false, true);
            if rank == 0 {
                return None;
            }
            let hc = pool.written(m * rank, |p| {
                gemm_at(
                    p,
                    rank,
                    (m, rank, h),
                    x,
                    View::rows(self.d.as_ptr(), rank),
                    1.0,
                    false,
                    true,
                )
            });
            let hv = View::rows(hc.as_ptr(), rank);
            let u = View::rows(self.u_scaled.as_ptr(), 3 * h);
            gemm_at(out, 3 * h, (m, 3 * h, rank), hv, u, 1.0, true, true);
            Some(hc)
        }
    }

    /// The backward from g = [dq dk dv] (m × 3h): dx (m × h, added to) = g·[W_q W_k W_v] +
    /// Σ c_j·(g_j·U_j)·D_jᵀ where given, and each adapter's dD_j = c_j·xᵀ·(g_j·U_j),
    /// dU_j = c_j·g_jᵀ·H_j.
    ///
    /// # Safety
    /// `g` must address m × 3h elements, `x` m × h, `hc` be what [`Qkv::forward`] returned,
    /// and `dx` m × h writable elements.
    #[allow(clippy::too_many_arguments)]
    unsafe fn backward(
        &self,
        lins: [&Lin; 3],
        pool: &Pool,
        g: View<f32>,
        x: View<f32>,
        hc: Option<&[f32]>,
        m: usize,
        dx: Option<*mut f32>,
        grads: &mut AdGrads,
    ) -> Result<()> {
        let (h, rank) = (self.h, self.rank);
        let w = View::rows(self.w.as_ptr(), h);
        if let Some(p) = dx {
            // SAFETY: the caller's contract.
            unsafe { gemm_at(p, h, (m, h, 3 * h), g, w, 1.0, true, true) };
        }
        let Some(hc) = hc else {
            return Ok(());
        };
        // SAFETY: each buffer is written in full by its GEMM; shapes as documented above.
        let (dd, du) = unsafe {
            let u = View::rows(self.u.as_ptr(), 3 * h);
            let gu = pool.written(m * rank, |p| {
                gemm_at(p, rank, (m, rank, 3 * h), g, u.t(), 1.0, false, true)
            });
            let guv = View::rows(gu.as_ptr(), rank);
            if let Some(p) = dx {
                let d = View::rows(self.d_scaled.as_ptr(), rank);
                gemm_at(p, h, (m, h, rank), guv, d.t(), 1.0, true, true);
            }
            let dd = written(h * rank, |p| {
                gemm_at(p, rank, (h, rank, m), x.t(), guv, 1.0, false, true)
            });
            pool.give(gu);
            let hv = View::rows(hc.as_ptr(), rank);
            let du = written(3 * h * rank, |p| {
                gemm_at(p, rank, (3 * h, rank, m), g.t(), hv, 1.0, false, true)
            });
            (dd, du)
        };
        for &(j, off, r) in &self.members {
            let ad = lins[j].ad.as_ref().unwrap();
            let mut ddj = vec![0f32; h * r];
            let mut duj = vec![0f32; h * r];
            for i in 0..h {
                for l in 0..r {
                    ddj[i * r + l] = ad.c * dd[i * rank + off + l];
                    duj[i * r + l] = ad.c * du[(j * h + i) * rank + off + l];
                }
            }
            ad.push_grads(&ddj, &duj, grads)?;
        }
        Ok(())
    }
}

/// A LayerNorm's frozen weight and bias.
struct Ln {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

impl Ln {
    fn of(n: &Norm, eps: f64) -> Result<Self> {
        Ok(Ln {
            w: host_vec::<f32>(&n.w)?,
            b: host_vec::<f32>(&n.b)?,
            eps: eps as f32,
        })
    }

    /// s ← x̂ of s + bias + res (row-wise, in place), returns y = x̂·w + b and 1/σ per row.
    fn forward(
        &self,
        pool: &Pool,
        s: &mut [f32],
        bias: Option<&[f32]>,
        res: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let h = self.w.len();
        let rows = s.len() / h;
        let mut inv = vec![0f32; rows];
        // SAFETY: every row of y is written in full.
        let y = unsafe {
            pool.filled(s.len(), |y| {
                y.par_chunks_mut(h)
                    .zip(s.par_chunks_mut(h))
                    .zip(res.par_chunks(h))
                    .zip(inv.par_iter_mut())
                    .for_each(|(((y, s), res), inv)| {
                        match bias {
                            Some(bias) => {
                                for ((a, &b), &r) in s.iter_mut().zip(bias).zip(res) {
                                    *a += b + r;
                                }
                            }
                            None => {
                                for (a, &r) in s.iter_mut().zip(res) {
                                    *a += r;
                                }
                            }
                        }
                        let n = h as f32;
                        let mean = sum_map(s, |v| v) / n;
                        let var = sum_map(s, |v| (v - mean) * (v - mean)) / n;
                        let is = 1.0 / (var + self.eps).sqrt();
                        *inv = is;
                        for j in 0..h {
                            let xh = (s[j] - mean) * is;
                            s[j] = xh;
                            y[j].write(xh * self.w[j] + self.b[j]);
                        }
                    })
            })
        };
        (y, inv)
    }

    /// g ← ∂L/∂(input) from g = ∂L/∂y, in place: (ĝ − mean ĝ − x̂·mean(ĝ⊙x̂))/σ, ĝ = g⊙w.
    fn backward(&self, g: &mut [f32], xhat: &[f32], inv: &[f32]) {
        let h = self.w.len();
        let n = h as f32;
        let w = &self.w;
        g.par_chunks_mut(h)
            .zip(xhat.par_chunks(h))
            .zip(inv.par_iter())
            .for_each(|((g, xh), &is)| {
                let mg = sum_map2(g, w, |g, w| g * w) / n;
                let mgx = crate::ops::sum_map3(g, w, xh, |g, w, x| g * w * x) / n;
                for j in 0..h {
                    g[j] = (g[j] * w[j] - mg - xh[j] * mgx) * is;
                }
            });
    }
}

/// One encoder layer's weights for the step.
struct LayerParams {
    /// q's, k's and v's biases side by side (zeros for a missing one), if any.
    qkv_bias: Option<Vec<f32>>,
    qkv: Qkv,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    ln1: Ln,
    inter: Lin,
    out: Lin,
    ln2: Ln,
}

impl LayerParams {
    fn adapted(&self) -> bool {
        [&self.q, &self.k, &self.v, &self.o, &self.inter, &self.out]
            .iter()
            .any(|l| l.ad.is_some())
    }
}

/// What one layer's backward needs from its forward.
struct Saved {
    /// The layer's input (m × h).
    x: Vec<f32>,
    /// q | k | v (m × 3h) and their adapters' H.
    qkv: Vec<f32>,
    h_qkv: Option<Vec<f32>>,
    /// P (b, heads, t, t).
    probs: Vec<f32>,
    /// The attention's output, merged heads (m × h), and the output projection's H.
    ctx: Vec<f32>,
    h_o: Option<Vec<f32>>,
    /// x̂ and 1/σ of the attention LayerNorm, and its output (m × h).
    xhat1: Vec<f32>,
    inv1: Vec<f32>,
    x1: Vec<f32>,
    /// The intermediate pre-activation and GELU output (m × intermediate), adapters' H.
    pre: Vec<f32>,
    act: Vec<f32>,
    h_inter: Option<Vec<f32>>,
    h_out: Option<Vec<f32>>,
    /// x̂ and 1/σ of the output LayerNorm.
    xhat2: Vec<f32>,
    inv2: Vec<f32>,
}

/// The encoder's forward, kept for its backward.
pub(crate) struct Tape<'a> {
    pool: &'a Pool,
    /// The encoder's output (b, t, h), a leaf variable: candle's autograd starts here.
    pub(crate) leaf: Var,
    params: Vec<LayerParams>,
    saved: Vec<Saved>,
    /// (b, t, h, heads, intermediate).
    dims: (usize, usize, usize, usize, usize),
    lens: Vec<usize>,
}

/// Attention over merged heads from q | k | v (m × 3h): per (row, head) S = QKᵀ/√hd over the
/// row's first `lens[row]` keys, P = softmax(S), out = P·V. Returns out (m × h) and P.
fn attention_forward(
    pool: &Pool,
    qkv: &[f32],
    lens: &[usize],
    (b, t, h, heads): (usize, usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let d = h / heads;
    let ld = 3 * h;
    let scale = 1.0 / (d as f32).sqrt();
    let mut probs = vec![];
    // SAFETY: every (row, head) unit writes its t × t block of P and its t × d block of the
    // output (at row stride h) in full, zeros where a row has no keys.
    let ctx = unsafe {
        pool.written(b * t * h, |o| {
            let o = SharedMut(o);
            probs = pool.filled(b * heads * t * t, |probs| {
                probs
                    .par_chunks_mut(t * t)
                    .enumerate()
                    .for_each(|(unit, p)| {
                        let (bi, hi) = (unit / heads, unit % heads);
                        let len = lens[bi].min(t);
                        let p: &mut [f32] = {
                            for x in p.iter_mut() {
                                x.write(0.0);
                            }
                            // SAFETY: just initialised.
                            std::slice::from_raw_parts_mut(p.as_mut_ptr().cast(), t * t)
                        };
                        let base = bi * t * ld + hi * d;
                        let ob = bi * t * h + hi * d;
                        if len == 0 {
                            for i in 0..t {
                                std::slice::from_raw_parts_mut(o.at(ob + i * h), d).fill(0.0);
                            }
                            return;
                        }
                        let views = (
                            View::rows(qkv[base..].as_ptr(), ld),
                            View::rows(qkv[base + h..].as_ptr(), ld),
                            View::rows(qkv[base + 2 * h..].as_ptr(), ld),
                        );
                        attend_unit(p, views, (o.at(ob), h), (t, d, len), scale, |_| len);
                    })
            })
        })
    };
    (ctx, probs)
}

/// The attention's backward from dO (m × h): dq | dk | dv (m × 3h), with dV = Pᵀ·dO,
/// dP = dO·Vᵀ, dS = P ⊙ (dP − Σⱼ P⊙dP)/√hd, dQ = dS·K, dK = dSᵀ·Q per (row, head).
fn attention_backward(
    pool: &Pool,
    d_out: &[f32],
    qkv: &[f32],
    probs: &[f32],
    lens: &[usize],
    (b, t, h, heads): (usize, usize, usize, usize),
) -> Vec<f32> {
    let d = h / heads;
    let ld = 3 * h;
    let scale = 1.0 / (d as f32).sqrt();
    // SAFETY: every unit writes its t × d blocks of dq, dk and dv in full (zeros for keys past
    // the row's length).
    unsafe {
        pool.written(b * t * ld, |dst| {
            let dst = SharedMut(dst);
            (0..b * heads).into_par_iter().for_each(|unit| {
                let (bi, hi) = (unit / heads, unit % heads);
                let len = lens[bi].min(t);
                let base = bi * t * ld + hi * d;
                // rows of dk, dv past the keys (and all of dq without keys) are zero
                for i in 0..t {
                    if len == 0 {
                        std::slice::from_raw_parts_mut(dst.at(base + i * ld), d).fill(0.0);
                    }
                    if i >= len {
                        std::slice::from_raw_parts_mut(dst.at(base + h + i * ld), d).fill(0.0);
                        std::slice::from_raw_parts_mut(dst.at(base + 2 * h + i * ld), d).fill(0.0);
                    }
                }
                if len == 0 {
                    return;
                }
                let p = &probs[unit * t * t..(unit + 1) * t * t];
                let views = (
                    View::rows(d_out[bi * t * h + hi * d..].as_ptr(), h),
                    View::rows(qkv[base..].as_ptr(), ld),
                    View::rows(qkv[base + h..].as_ptr(), ld),
                    View::rows(qkv[base + 2 * h..].as_ptr(), ld),
                );
                let out = (dst.at(base), dst.at(base + h), dst.at(base + 2 * h), ld);
                attend_unit_backward(p, views, out, (t, d, len), scale, |_| len);
            });
        })
    }
}

impl Bert {
    /// The encoder's forward on this path, or None where the autograd path must run (see the
    /// module's documentation).
    pub(crate) fn fast_forward(&self, batch: &Batch) -> Result<Option<Tape<'_>>> {
        if !batch.ids.device().is_cpu() || self.cfg.act != Activation::GeluErf {
            return Ok(None);
        }
        let mut params = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let lin = |a: &AdaptedLinear| Lin::of(a);
            let (Some(q), Some(k), Some(v), Some(o), Some(inter), Some(out)) = (
                lin(&l.query)?,
                lin(&l.key)?,
                lin(&l.value)?,
                lin(&l.attn_out)?,
                lin(&l.inter)?,
                lin(&l.out)?,
            ) else {
                return Ok(None);
            };
            let qkv_bias = [&q, &k, &v].iter().any(|l| l.bias.is_some()).then(|| {
                let zero = vec![0f32; q.d_out];
                [&q, &k, &v]
                    .iter()
                    .flat_map(|l| l.bias.clone().unwrap_or_else(|| zero.clone()))
                    .collect()
            });
            params.push(LayerParams {
                qkv_bias,
                qkv: Qkv::of([&q, &k, &v]),
                q,
                k,
                v,
                o,
                ln1: Ln::of(&l.attn_norm, self.cfg.eps)?,
                inter,
                out,
                ln2: Ln::of(&l.out_norm, self.cfg.eps)?,
            });
        }
        let emb = self.embed(batch)?;
        if emb.dtype() != DType::F32 {
            return Ok(None);
        }
        let (b, t, h) = emb.dims3()?;
        let (heads, inter) = (self.cfg.heads, self.cfg.intermediate);
        let lens = key_lens(&batch.mask)?;
        let m = b * t;
        let pool = &self.fast_pool;
        let mut x = pool.copy_of(&emb)?;
        let mut saved = Vec::with_capacity(params.len());
        for p in &params {
            let xv = View::rows(x.as_ptr(), h);
            // SAFETY (all blocks below): buffers are allocated for the shapes the calls
            // document, and each `written` buffer is filled in full by its call.
            let mut h_qkv = None;
            let mut qkv = unsafe {
                pool.written(m * 3 * h, |dst| {
                    h_qkv = p.qkv.forward(pool, xv, m, dst);
                })
            };
            if let Some(bias) = &p.qkv_bias {
                qkv.par_chunks_mut(3 * h).for_each(|row| {
                    for (y, &b) in row.iter_mut().zip(bias) {
                        *y += b;
                    }
                });
            }
            let (ctx, probs) = attention_forward(pool, &qkv, &lens, (b, t, h, heads));
            let mut h_o = None;
            let mut s1 = unsafe {
                pool.written(m * h, |dst| {
                    h_o = p.o.forward(pool, View::rows(ctx.as_ptr(), h), m, dst, h);
                })
            };
            let (x1, inv1) = p.ln1.forward(pool, &mut s1, p.o.bias.as_deref(), &x);
            let mut h_inter = None;
            let mut pre = unsafe {
                pool.written(m * inter, |dst| {
                    h_inter = p
                        .inter
                        .forward(pool, View::rows(x1.as_ptr(), h), m, dst, inter);
                })
            };
            // the bias and the GELU in one pass
            let zero = vec![0f32; inter];
            let bias = p.inter.bias.as_deref().unwrap_or(&zero);
            let act = unsafe {
                pool.filled(pre.len(), |a| {
                    a.par_chunks_mut(inter)
                        .zip(pre.par_chunks_mut(inter))
                        .for_each(|(a, p)| {
                            for ((a, p), &b) in a.iter_mut().zip(p).zip(bias) {
                                *p += b;
                                a.write(p.value());
                            }
                        })
                })
            };
            let mut h_out = None;
            let mut s2 = unsafe {
                pool.written(m * h, |dst| {
                    h_out = p
                        .out
                        .forward(pool, View::rows(act.as_ptr(), inter), m, dst, h);
                })
            };
            let (x2, inv2) = p.ln2.forward(pool, &mut s2, p.out.bias.as_deref(), &x1);
            let input = std::mem::replace(&mut x, x2);
            saved.push(Saved {
                x: input,
                qkv,
                h_qkv,
                probs,
                ctx,
                h_o,
                xhat1: s1,
                inv1,
                x1,
                pre,
                act,
                h_inter,
                h_out,
                xhat2: s2,
                inv2,
            });
        }
        let leaf = Var::from_tensor(&Tensor::from_vec(x, (b, t, h), &Device::Cpu)?)?;
        Ok(Some(Tape {
            pool,
            leaf,
            params,
            saved,
            dims: (b, t, h, heads, inter),
            lens,
        }))
    }
}

impl Drop for Tape<'_> {
    /// The buffers go back to the pool for the next step.
    fn drop(&mut self) {
        for s in self.saved.drain(..) {
            let optional = [s.h_qkv, s.h_o, s.h_inter, s.h_out];
            for v in [
                s.x, s.qkv, s.probs, s.ctx, s.xhat1, s.x1, s.pre, s.act, s.xhat2,
            ]
            .into_iter()
            .chain(optional.into_iter().flatten())
            {
                self.pool.give(v);
            }
        }
    }
}

impl Tape<'_> {
    /// The backward from the gradient at [`Tape::leaf`] (taken from `grads`): every adapter's
    /// gradient goes into `grads` under its variable.
    pub(crate) fn backward(self, grads: &mut GradStore) -> Result<()> {
        let Some(first) = self.params.iter().position(LayerParams::adapted) else {
            return Ok(());
        };
        let Some(d_leaf) = grads.remove(self.leaf.as_tensor()) else {
            return Ok(());
        };
        let (b, t, h, heads, inter) = self.dims;
        let m = b * t;
        let pool = self.pool;
        let mut dy = pool.copy_of(&d_leaf)?;
        let mut out: AdGrads = vec![];
        for (i, (p, s)) in self.params.iter().zip(&self.saved).enumerate().rev() {
            if i < first {
                break;
            }
            // dy: ∂L/∂(layer output) → ∂L/∂s2, the gradient of f and of x1 (residual)
            p.ln2.backward(&mut dy, &s.xhat2, &s.inv2);
            let g = View::rows(dy.as_ptr(), h);
            // SAFETY (all blocks below): shapes as the calls document; each `written` buffer
            // is filled in full; `dy` is m × h and only this thread touches it.
            let mut d_act = unsafe {
                let mut res = Ok(());
                let v = pool.written(m * inter, |dst| {
                    let x = View::rows(s.act.as_ptr(), inter);
                    let dx = Some((dst, inter, false));
                    res = p.out.backward(g, x, s.h_out.as_deref(), m, dx, &mut out);
                });
                res?;
                v
            };
            d_act
                .par_chunks_mut(4096)
                .zip(s.pre.par_chunks(4096))
                .for_each(|(g, x)| {
                    for (g, &v) in g.iter_mut().zip(x) {
                        *g *= v.grad();
                    }
                });
            // the residual's gradient (in dy) plus the intermediate layer's input gradient
            unsafe {
                let dx = Some((dy.as_mut_ptr(), h, true));
                let g = View::rows(d_act.as_ptr(), inter);
                let x = View::rows(s.x1.as_ptr(), h);
                p.inter
                    .backward(g, x, s.h_inter.as_deref(), m, dx, &mut out)?;
            }
            pool.give(d_act);
            p.ln1.backward(&mut dy, &s.xhat1, &s.inv1);
            let g = View::rows(dy.as_ptr(), h);
            let d_ctx = unsafe {
                let mut res = Ok(());
                let v = pool.written(m * h, |dst| {
                    let x = View::rows(s.ctx.as_ptr(), h);
                    res =
                        p.o.backward(g, x, s.h_o.as_deref(), m, Some((dst, h, false)), &mut out);
                });
                res?;
                v
            };
            let dims = (b, t, h, heads);
            let d_qkv = attention_backward(pool, &d_ctx, &s.qkv, &s.probs, &self.lens, dims);
            pool.give(d_ctx);
            // the residual's gradient plus q, k, v's input gradients (none below the lowest
            // adapted layer: the embeddings are frozen)
            let x = View::rows(s.x.as_ptr(), h);
            let g = View::rows(d_qkv.as_ptr(), 3 * h);
            let dx = (i > first).then_some(dy.as_mut_ptr());
            let lins = [&p.q, &p.k, &p.v];
            let hc = s.h_qkv.as_deref();
            unsafe { p.qkv.backward(lins, pool, g, x, hc, m, dx, &mut out)? };
            pool.give(d_qkv);
        }
        pool.give(dy);
        for (var, g) in out {
            let g = match grads.remove(var.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(var.as_tensor(), g);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::adapter::ramp::{RampClock, RampSchedule};
    use crate::adapter::target::TargetSpec;
    use crate::adapter::{AdapterKind, AdapterSpec};
    use crate::data::{collate, Encoded, Task};
    use crate::model::weights::{ConfigReader, Weights};
    use crate::model::{scaled, Body, Pooling, TaskModel};
    use crate::synthetic::BertShape;

    const SHAPE: BertShape = BertShape {
        hidden: 32,
        intermediate: 64,
        layers: 2,
        heads: 4,
        vocab: 50,
        max_positions: 32,
    };

    fn bert(dtype: DType, act: &str) -> Bert {
        let mut cfg_json = SHAPE.config();
        cfg_json["hidden_act"] = act.into();
        let path = Path::new("tiny-bert/config.json");
        let cfg = Bert::config(&ConfigReader {
            path,
            value: &cfg_json,
        })
        .unwrap();
        let weights = Weights::Memory(path.into(), SHAPE.tensors(7, dtype).unwrap());
        Bert::load(&weights, cfg, dtype, &Device::Cpu).unwrap()
    }

    /// A tiny classifier with adapters of `kind` on `targets`, every trainable tensor (LoRA's
    /// zero B and the head included) moved off its initial value so every path carries signal.
    fn model(body: Bert, kind: Option<AdapterKind>, targets: &str, pooling: Pooling) -> TaskModel {
        let dtype = body.word.dtype();
        let mut tm = TaskModel::new(
            Body::Bert(body),
            Task::Classify,
            Some(3),
            pooling,
            1,
            &Device::Cpu,
        )
        .unwrap();
        if let Some(kind) = kind {
            let mut spec = AdapterSpec::new(kind, 4, 8.0);
            spec.dtype = dtype;
            let clock = RampClock::new(RampSchedule::new(4), 1);
            clock.set_training(true);
            let targets = TargetSpec::parse(targets, None).unwrap();
            tm.inject(&spec, &targets, clock).unwrap();
        }
        for p in tm.params() {
            let noise = Tensor::randn(0f32, 0.3, p.var.dims(), &Device::Cpu).unwrap();
            let v = (p.var.as_tensor() + noise.to_dtype(p.var.dtype()).unwrap()).unwrap();
            p.var.set(&v).unwrap();
        }
        tm
    }

    /// Rows of the given lengths (random tokens, labels 0, 1, 2, …), right-padded.
    fn batch(lens: &[usize]) -> Batch {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let items: Vec<Encoded> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| Encoded {
                ids: (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        1 + (x % (SHAPE.vocab as u64 - 1)) as u32
                    })
                    .collect(),
                type_ids: (0..n).map(|j| (j >= n / 2) as u32).collect(),
                label: Some(i % 3),
                target_mask: vec![0; n],
            })
            .collect();
        let idx: Vec<usize> = (0..items.len()).collect();
        collate(&items, &idx, 0, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The f32 model of [`model`] and its f64 twin holding the same values (head included), for
    /// exact reference gradients.
    fn pair(kind: Option<AdapterKind>, targets: &str, pooling: Pooling) -> (TaskModel, TaskModel) {
        let tm = model(bert(DType::F32, "gelu"), kind, targets, pooling);
        let mut twin = model(bert(DType::F64, "gelu"), kind, targets, pooling);
        let h = twin.head.as_ref().unwrap();
        let (n, hidden) = h.weight.dims2().unwrap();
        let head = crate::model::ClassifierHead::init(
            &h.name,
            n,
            hidden,
            h.bias.is_some(),
            1,
            DType::F64,
            &Device::Cpu,
        );
        twin.head = Some(head.unwrap());
        let (a, b) = (tm.params(), twin.params());
        assert_eq!(a.len(), b.len());
        for (a, b) in a.iter().zip(&b) {
            b.var
                .set(&a.var.as_tensor().to_dtype(DType::F64).unwrap())
                .unwrap();
        }
        (tm, twin)
    }

    /// This path's loss and gradients (f32) are as close to the exact ones (the f64 twin through
    /// autograd) as candle's autograd path in f32 is: within twice its error plus 1e-4 of the
    /// largest entry (of the loss itself, for the loss). (Both f32 paths are ~1e-5 of the largest
    /// entry off the exact gradients of these tiny models, from summation order and cancellation
    /// alone, and the threads' summation order varies from run to run: one run in ~7 went over a
    /// 1e-5 floor, a gradient by 4e-5 of its largest entry with autograd's at 7e-6; a wrong term
    /// shows as 1e-3 or more.)
    fn check_against_autograd(tm: &TaskModel, twin: &TaskModel, batch: &Batch, what: &str) {
        let scale = 0.5;
        let (loss, grads) = tm
            .bert_fast_loss_and_grads(batch, scale)
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: the fast path refused the model"));
        let auto_loss = tm.loss(batch).unwrap();
        let auto_grads = scaled(&auto_loss, scale).unwrap().backward().unwrap();
        let exact_loss = twin.loss(batch).unwrap();
        let exact_grads = scaled(&exact_loss, scale).unwrap().backward().unwrap();
        let (l, al, el) = (
            values(&loss)[0],
            values(&auto_loss)[0],
            values(&exact_loss)[0],
        );
        assert!(
            (l - el).abs() <= 2.0 * (al - el).abs() + 1e-4 * el.abs(),
            "{what}: loss {l}, autograd {al}, exact {el}"
        );
        let (params, exact_params) = (tm.params(), twin.params());
        assert!(!params.is_empty());
        let max_diff =
            |a: &[f64], b: &[f64]| a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        for (p, ep) in params.iter().zip(&exact_params) {
            let got = values(
                grads
                    .get(p.var.as_tensor())
                    .unwrap_or_else(|| panic!("{what}: no gradient for a {:?} tensor", p.role)),
            );
            let auto = values(auto_grads.get(p.var.as_tensor()).unwrap());
            let exact = values(exact_grads.get(ep.var.as_tensor()).unwrap());
            assert_eq!(got.len(), exact.len());
            let largest = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(largest > 0.0, "{what}: a zero gradient ({:?})", p.role);
            let (err, auto_err) = (max_diff(&got, &exact), max_diff(&auto, &exact));
            assert!(
                err <= 2.0 * auto_err + 1e-4 * largest,
                "{what}: {:?} gradient off by {err}, autograd's by {auto_err} (largest entry {largest})",
                p.role
            );
        }
    }

    #[test]
    fn matches_autograd_for_singlora_and_lora_with_and_without_padding() {
        let full = batch(&[12, 12, 12, 12]);
        let padded = batch(&[12, 7, 3, 1, 9]);
        for kind in [AdapterKind::SingLora, AdapterKind::Lora] {
            // the paper's targets, and every linear layer (the MLP's tall and wide weights)
            for targets in ["query,key,value,attention.output.dense", "all-linear"] {
                for pooling in [Pooling::Mean, Pooling::Cls] {
                    let (tm, twin) = pair(Some(kind), targets, pooling);
                    for (b, name) in [(&full, "full"), (&padded, "padded")] {
                        let what = format!("{kind:?} {targets} {pooling} {name}");
                        check_against_autograd(&tm, &twin, b, &what);
                    }
                }
            }
        }
    }

    /// Buffers come back between steps with the previous step's contents (of another shape
    /// here): every one must be written in full again, so a repeated step is bit-identical.
    #[test]
    fn steps_on_reused_buffers_repeat_exactly() {
        let (tm, _) = pair(Some(AdapterKind::SingLora), "all-linear", Pooling::Mean);
        let (a, b) = (batch(&[12, 7, 3, 1, 9]), batch(&[5, 2]));
        let step = |bt: &Batch| {
            let (loss, grads) = tm.bert_fast_loss_and_grads(bt, 1.0).unwrap().unwrap();
            let mut all = vec![values(&loss)];
            for p in tm.params() {
                all.push(values(grads.get(p.var.as_tensor()).unwrap()));
            }
            all
        };
        let first = step(&a);
        let Body::Bert(body) = &tm.body else {
            unreachable!()
        };
        assert!(!body.fast_pool.0.lock().unwrap().is_empty());
        step(&b);
        assert_eq!(first, step(&a));
    }

    #[test]
    fn adapters_on_upper_layers_only_and_head_only_match_autograd() {
        let padded = batch(&[10, 4, 8]);
        // the backward stops at the lowest adapted layer
        let (tm, twin) = pair(
            Some(AdapterKind::SingLora),
            "re:encoder\\.layer\\.1\\..*(query|output\\.dense)$",
            Pooling::Mean,
        );
        assert!(tm.adapters().iter().all(|(n, _, _)| n.contains("layer.1.")));
        check_against_autograd(&tm, &twin, &padded, "layer 1 only");
        let (tm, twin) = pair(None, "", Pooling::Cls);
        check_against_autograd(&tm, &twin, &padded, "head only");
    }

    #[test]
    fn unsupported_models_take_the_autograd_path() {
        let b = batch(&[6, 3]);
        let refused = |tm: &TaskModel, what: &str| {
            let Body::Bert(bert) = &tm.body else {
                unreachable!()
            };
            assert!(bert.fast_forward(&b).unwrap().is_none(), "{what}");
            assert!(tm.bert_fast_loss_and_grads(&b, 1.0).unwrap().is_none());
            // and the public entry point still trains it, through autograd
            let (loss, grads) = tm.loss_and_grads(&b, 1.0).unwrap();
            assert!(values(&loss)[0].is_finite());
            for p in tm.params() {
                assert!(grads.get(p.var.as_tensor()).is_some(), "{what}");
            }
        };
        let targets = "query,value";
        let dora = model(
            bert(DType::F32, "gelu"),
            Some(AdapterKind::Dora),
            targets,
            Pooling::Mean,
        );
        refused(&dora, "DoRA");
        let mut merged = model(
            bert(DType::F32, "gelu"),
            Some(AdapterKind::SingLora),
            targets,
            Pooling::Mean,
        );
        for l in merged.body.linears_mut() {
            if l.name().ends_with("layer.0.attention.self.query") {
                l.merge().unwrap();
            }
        }
        let Body::Bert(merged_bert) = &merged.body else {
            unreachable!()
        };
        assert!(merged_bert.fast_forward(&b).unwrap().is_none(), "merged");
        let f64_model = model(
            bert(DType::F64, "gelu"),
            Some(AdapterKind::SingLora),
            targets,
            Pooling::Mean,
        );
        refused(&f64_model, "f64");
        let tanh = model(
            bert(DType::F32, "gelu_new"),
            Some(AdapterKind::Lora),
            targets,
            Pooling::Mean,
        );
        refused(&tanh, "tanh GELU");
        // the supported setting is taken
        let ok = model(
            bert(DType::F32, "gelu"),
            Some(AdapterKind::SingLora),
            targets,
            Pooling::Mean,
        );
        assert!(ok.bert_fast_loss_and_grads(&b, 1.0).unwrap().is_some());
    }
}
