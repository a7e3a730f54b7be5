//! Multi-head attention without RoPE on the CPU as one op per direction, in the (b, t, h·hd)
//! layout: each (row, head) pair runs S = QKᵀ/√hd, the masked softmax and P·V in place, so no
//! head transposes, score tensors or their gradients pass through autograd. The (row, head)
//! units are also the BERT encoder's own forward and backward (`model/bert/fast.rs`).

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType,
};

use crate::error::Result;
use crate::ops::cpu_gemm::{gemm_at, View};
use crate::ops::{cpu_slice, dispatch_float, filled_vec, max_of, sum_map, sum_map2, Real};

/// Multi-head attention without RoPE from `q`, `k`, `v` (b, t, heads·hd), heads merged:
/// (b, t, heads·hd); batch row i attends to its first `key_lens[i]` keys (and only to earlier
/// ones when `causal`). On the CPU (f32/f64) one op per direction: each (row, head) pair runs
/// S = QKᵀ/√hd, the masked softmax and P·V in place in the (b, t, h·hd) layout, so no head
/// transposes, score tensors or their gradients pass through autograd; P is kept for the
/// backward. Elsewhere [`super::masked_attention`] on split heads.
pub fn heads_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_lens: &[usize],
    causal: bool,
) -> Result<Tensor> {
    let (b, t, width) = q.dims3()?;
    let hd = width / heads;
    let native = q.device().is_cpu()
        && matches!(q.dtype(), DType::F32 | DType::F64)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && k.dims() == q.dims()
        && v.dims() == q.dims()
        && width % heads == 0
        && key_lens.len() == b;
    if !native {
        let split =
            |x: &Tensor| -> Result<Tensor> { Ok(x.reshape((b, t, heads, hd))?.transpose(1, 2)?) };
        let a = super::masked_attention(&split(q)?, &split(k)?, &split(v)?, key_lens, causal)?;
        return Ok(a.transpose(1, 2)?.reshape((b, t, width))?);
    }
    let op = HeadsAttention {
        heads,
        key_lens: Arc::new(key_lens.to_vec()),
        causal,
        probs: Arc::new(Mutex::new(None)),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

#[derive(Clone)]
struct HeadsAttention {
    heads: usize,
    key_lens: Arc<Vec<usize>>,
    causal: bool,
    /// P (b, heads, t, t), written by the forward, taken by the backward.
    probs: Arc<Mutex<Option<CpuStorage>>>,
}

/// A raw pointer the parallel loops share; every unit writes its own elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: only used for disjoint writes from the units of one parallel loop.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub(crate) fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// One (row, head) unit of the attention's forward, for `len` > 0 keys: P (t × t) holds, in row
/// i, the softmax of scale·q_i·Kᵀ over the first `limit(i)` keys and zeros after them, and O
/// (t × d at row stride `o_ld`) = P·V over the `len` keys. Serial (units run in parallel).
///
/// # Safety
/// `o` must address this unit's t × d block at row stride `o_ld` alone; q, k and v t × d
/// readable elements at their strides.
pub(crate) unsafe fn attend_unit<T: Real + 'static>(
    p: &mut [T],
    (q, k, v): (View<T>, View<T>, View<T>),
    (o, o_ld): (*mut T, usize),
    (t, d, len): (usize, usize, usize),
    scale: T,
    limit: impl Fn(usize) -> usize,
) {
    // SAFETY: p is t × t; the views and the output block are the caller's.
    unsafe {
        gemm_at(
            p.as_mut_ptr(),
            t,
            (t, len, d),
            q,
            k.t(),
            scale,
            false,
            false,
        )
    };
    for (i, row) in p.chunks_mut(t).enumerate() {
        let n = limit(i);
        if n > 0 {
            let max = max_of(&row[..n]);
            for x in &mut row[..n] {
                *x = (*x - max).fast_exp();
            }
            let inv = T::one() / sum_map(&row[..n], |x| x);
            for x in &mut row[..n] {
                *x *= inv;
            }
        }
        row[n..].iter_mut().for_each(|x| *x = T::zero());
    }
    let pv = View::rows(p.as_ptr(), t);
    unsafe { gemm_at(o, o_ld, (t, d, len), pv, v, T::one(), false, false) };
}

/// The backward of [`attend_unit`] from P (as it left it) and dO (t × d): dV = Pᵀ·dO,
/// dS = scale·P ⊙ (dP − Σⱼ P⊙dP) over each row's first `limit(i)` keys (zeros after) with
/// dP = dO·Vᵀ, dQ = dS·K (t × d) and dK = dSᵀ·Q; dK and dV only over the `len` keys.
///
/// # Safety
/// dq (t × d), dk and dv (len × d) at row stride `ld` must be this unit's alone; q, k, v and
/// dO t × d readable elements at their strides.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attend_unit_backward<T: Real + 'static>(
    p: &[T],
    (g, q, k, v): (View<T>, View<T>, View<T>, View<T>),
    (dq, dk, dv, ld): (*mut T, *mut T, *mut T, usize),
    (t, d, len): (usize, usize, usize),
    scale: T,
    limit: impl Fn(usize) -> usize,
) {
    let pv = View::rows(p.as_ptr(), t);
    // SAFETY (every GEMM): the caller's blocks; ds is this unit's t × len scratch, written in
    // full by its GEMM.
    unsafe {
        gemm_at(dv, ld, (len, d, t), pv.t(), g, T::one(), false, false);
        let mut ds = filled_vec::<T>(t * len, |s| {
            gemm_at(
                s.as_mut_ptr().cast(),
                len,
                (t, len, d),
                g,
                v.t(),
                T::one(),
                false,
                false,
            )
        });
        for (i, row) in ds.chunks_mut(len).enumerate() {
            let lim = limit(i);
            let pr = &p[i * t..i * t + lim];
            let dot = sum_map2(pr, &row[..lim], |x, y| x * y);
            for (x, &pj) in row[..lim].iter_mut().zip(pr) {
                *x = scale * pj * (*x - dot);
            }
            row[lim..].iter_mut().for_each(|x| *x = T::zero());
        }
        let dsv = View::rows(ds.as_ptr(), len);
        gemm_at(dq, ld, (t, d, len), dsv, k, T::one(), false, false);
        gemm_at(dk, ld, (len, d, t), dsv.t(), q, T::one(), false, false);
    }
}

impl HeadsAttention {
    /// (b, t, heads, hd) of a (b, t, heads·hd) input.
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, t, w) = l.shape().dims3()?;
        if w % self.heads != 0 || b != self.key_lens.len() {
            candle_core::bail!(
                "heads attention: input {:?} does not fit {} heads and {} key lengths",
                l.dims(),
                self.heads,
                self.key_lens.len()
            );
        }
        Ok((b, t, self.heads, w / self.heads))
    }

    /// Keys a query row `i` of batch row `bi` sees: a prefix of the row.
    fn limit(&self, bi: usize, i: usize, t: usize) -> usize {
        let len = self.key_lens[bi].min(t);
        if self.causal {
            len.min(i + 1)
        } else {
            len
        }
    }

    fn fwd<T: Real + 'static>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        (b, t, h, d): (usize, usize, usize, usize),
    ) -> (Vec<T>, Vec<T>) {
        use rayon::prelude::*;
        let w = h * d;
        let scale = T::from(1.0 / (d as f64).sqrt()).unwrap();
        let mut out = vec![T::zero(); b * t * w];
        let mut probs = vec![T::zero(); b * h * t * t];
        let o = SharedMut(out.as_mut_ptr());
        probs
            .par_chunks_mut(t * t)
            .enumerate()
            .for_each(|(unit, p)| {
                let (bi, hi) = (unit / h, unit % h);
                let len = self.key_lens[bi].min(t);
                if len == 0 {
                    return;
                }
                let base = bi * t * w + hi * d;
                let views = (
                    View::rows(q[base..].as_ptr(), w),
                    View::rows(k[base..].as_ptr(), w),
                    View::rows(v[base..].as_ptr(), w),
                );
                // SAFETY: the views stay inside q, k, v; the output block (t × d at row stride
                // w) belongs to this (row, head) alone.
                unsafe {
                    attend_unit(p, views, (o.at(base), w), (t, d, len), scale, |i| {
                        self.limit(bi, i, t)
                    })
                };
            });
        (out, probs)
    }
}

fn cpu_data<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    cpu_slice::<T>(s, l, "heads attention")
}

impl CustomOp3 for HeadsAttention {
    fn name(&self) -> &'static str {
        "heads-attention"
    }

    crate::ops::cpu_fwd!(|self, (q, lq), (k, lk), (v, lv)| {
        let dims = self.dims(lq)?;
        if lk.dims() != lq.dims() || lv.dims() != lq.dims() {
            candle_core::bail!(
                "heads attention: q {:?}, k {:?}, v {:?} differ",
                lq.dims(),
                lk.dims(),
                lv.dims()
            );
        }
        dispatch_float!(q, "heads attention", |T| {
            let (out, probs) =
                self.fwd::<T>(cpu_data(q, lq)?, cpu_data(k, lk)?, cpu_data(v, lv)?, dims);
            *self.probs.lock().unwrap() = Some(T::to_cpu_storage_owned(probs));
            Ok((T::to_cpu_storage_owned(out), lq.shape().clone()))
        })
    });

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, w) = q.dims3()?;
        let packed = g.contiguous()?.apply_op1_no_bwd(&HeadsAttentionBackward {
            op: self.clone(),
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
        })?;
        let (dq, dk, dv) = super::unpack_qkv(&packed, (b, t, w), (b, t, w))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward as an op on the output's gradient dO, giving [dq | dk | dv] flat:
/// dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − Σⱼ P⊙dP)/√hd, dQ = dS·K, dK = dSᵀ·Q per (row, head).
struct HeadsAttentionBackward {
    op: HeadsAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

impl HeadsAttentionBackward {
    #[allow(clippy::too_many_arguments)]
    fn run<T: Real + 'static>(
        &self,
        g: &[T],
        q: &[T],
        k: &[T],
        v: &[T],
        probs: &[T],
        (b, t, h, d): (usize, usize, usize, usize),
    ) -> Vec<T> {
        use rayon::prelude::*;
        let w = h * d;
        let n = b * t * w;
        let scale = T::from(1.0 / (d as f64).sqrt()).unwrap();
        let mut grads = vec![T::zero(); 3 * n];
        let dst = SharedMut(grads.as_mut_ptr());
        (0..b * h).into_par_iter().for_each(|unit| {
            let (bi, hi) = (unit / h, unit % h);
            let len = self.op.key_lens[bi].min(t);
            if len == 0 {
                return;
            }
            let base = bi * t * w + hi * d;
            let p = &probs[unit * t * t..(unit + 1) * t * t];
            let views = (
                View::rows(g[base..].as_ptr(), w),
                View::rows(q[base..].as_ptr(), w),
                View::rows(k[base..].as_ptr(), w),
                View::rows(v[base..].as_ptr(), w),
            );
            let out = (dst.at(base), dst.at(n + base), dst.at(2 * n + base), w);
            // SAFETY: the dq, dk, dv blocks (at row stride w in their thirds of `grads`)
            // belong to this (row, head) alone; the views stay inside g, q, k, v.
            unsafe {
                attend_unit_backward(p, views, out, (t, d, len), scale, |i| {
                    self.op.limit(bi, i, t)
                })
            };
        });
        grads
    }
}

impl CustomOp1 for HeadsAttentionBackward {
    fn name(&self) -> &'static str {
        "heads-attention-backward"
    }

    crate::ops::cpu_fwd!(|self, (g, lg)| {
        let dims = self.op.dims(lg)?;
        let probs = self.op.probs.lock().unwrap().take().ok_or_else(|| {
            candle_core::Error::Msg("heads attention: backward without a forward (or twice)".into())
        })?;
        let (qs, ql) = self.q.storage_and_layout();
        let (ks, kl) = self.k.storage_and_layout();
        let (vs, vl) = self.v.storage_and_layout();
        let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
            candle_core::bail!("heads attention backward: CPU tensors expected");
        };
        dispatch_float!(g, "heads attention backward", |T| {
            let grads = self.run::<T>(
                cpu_data(g, lg)?,
                cpu_data(qs, ql)?,
                cpu_data(ks, kl)?,
                cpu_data(vs, vl)?,
                T::cpu_storage_as_slice(&probs)?,
                dims,
            );
            let len = grads.len();
            Ok((T::to_cpu_storage_owned(grads), Shape::from(len)))
        })
    });
}
