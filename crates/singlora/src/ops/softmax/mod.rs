//! Attention softmax in one pass: P = softmax(scale·S) over the valid keys of each row, zero
//! elsewhere. A key j of batch row b is valid when j < key_len[b] (right padding) and, when
//! causal, j ≤ i + (t_k − t_q). Backward: dS = scale·P ⊙ (dP − Σⱼ P⊙dP), one pass. CPU code
//! here (rows in parallel), CUDA launchers in `cuda.rs`, kernels in `softmax.cu`.

use std::sync::Arc;

use candle_core::{CustomOp1, CustomOp2, DType, Tensor, WithDType};
use rayon::prelude::*;

use super::{cpu_slice, dispatch_float, Real};
use crate::error::Result;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

/// Real-token counts per row of a (b, t) 1/0 mask (one host read): the key lengths the masked
/// softmax and the attention ops take.
pub fn key_lens(mask: &Tensor) -> Result<Vec<usize>> {
    Ok(mask
        .to_dtype(DType::F32)?
        .sum(1)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|x| x.round() as usize)
        .collect())
}

#[derive(Clone)]
struct MaskedSoftmax {
    scale: f64,
    key_lens: Arc<Vec<usize>>,
    causal: bool,
}

impl MaskedSoftmax {
    /// (batch index, query index) of row `r` of a (b, h, tq, tk) tensor.
    fn row_limit(&self, r: usize, h: usize, tq: usize, tk: usize) -> usize {
        let b = r / (h * tq);
        let i = r % tq;
        let len = self.key_lens[b].min(tk);
        if self.causal {
            len.min(i + 1 + tk - tq)
        } else {
            len
        }
    }

    fn fwd<T: Real>(&self, s: &[T], dims: &[usize]) -> Vec<T> {
        let (h, tq, tk) = (dims[1], dims[2], dims[3]);
        let scale = T::from(self.scale).unwrap();
        let mut out = vec![T::zero(); s.len()];
        out.par_chunks_mut(tk).enumerate().for_each(|(r, o)| {
            let row = &s[r * tk..(r + 1) * tk];
            let n = self.row_limit(r, h, tq, tk);
            if n == 0 {
                return;
            }
            let max = row[..n]
                .iter()
                .fold(T::neg_infinity(), |m, &x| num_traits::Float::max(m, x));
            for j in 0..n {
                o[j] = ((row[j] - max) * scale).fast_exp();
            }
            let sum = o[..n].iter().fold(T::zero(), |a, &e| a + e);
            let inv = T::one() / sum;
            for v in &mut o[..n] {
                *v *= inv;
            }
        });
        out
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    super::cpu_fwd!(|self, (s, l)| {
        let dims = l.dims();
        if dims.len() != 4 || dims[0] != self.key_lens.len() {
            candle_core::bail!(
                "masked softmax: scores {dims:?} do not match {} key lengths",
                self.key_lens.len()
            );
        }
        dispatch_float!(s, "masked softmax", |T| {
            let x = cpu_slice::<T>(s, l, "masked softmax")?;
            Ok((
                T::to_cpu_storage_owned(self.fwd(x, dims)),
                l.shape().clone(),
            ))
        })
    });

    super::cuda_fwd!(|self, s| cuda::forward(s, &self.key_lens, self.causal, self.scale));

    fn bwd(&self, _s: &Tensor, p: &Tensor, dp: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dp = dp.contiguous()?;
        Ok(Some(p.apply_op2_no_bwd(
            &dp,
            &SoftmaxBackward { scale: self.scale },
        )?))
    }
}

struct SoftmaxBackward {
    scale: f64,
}

impl SoftmaxBackward {
    fn run<T: Real>(&self, p: &[T], g: &[T], tk: usize) -> Vec<T> {
        let scale = T::from(self.scale).unwrap();
        let mut out = vec![T::zero(); p.len()];
        out.par_chunks_mut(tk).enumerate().for_each(|(r, o)| {
            let (pr, gr) = (&p[r * tk..(r + 1) * tk], &g[r * tk..(r + 1) * tk]);
            let dot = pr.iter().zip(gr).fold(T::zero(), |a, (&x, &y)| a + x * y);
            for j in 0..tk {
                o[j] = scale * pr[j] * (gr[j] - dot);
            }
        });
        out
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "masked-softmax-backward"
    }

    super::cuda_fwd!(|self, p, dp| cuda::backward(p, dp, self.scale));

    super::cpu_fwd!(|self, (s1, l1), (s2, l2)| {
        let tk = *l1.dims().last().unwrap();
        dispatch_float!(s1, "masked softmax backward", |T| {
            let p = cpu_slice::<T>(s1, l1, "softmax backward")?;
            let g = cpu_slice::<T>(s2, l2, "softmax backward")?;
            Ok((
                T::to_cpu_storage_owned(self.run(p, g, tk)),
                l1.shape().clone(),
            ))
        })
    });
}

type MaskKey = (Vec<usize>, bool, usize, usize, candle_core::DType);

/// The additive mask (b, 1, t_q, t_k) for the composed path, kept for the next call with the
/// same lengths (every layer of a forward asks for the same one).
fn additive_mask(scores: &Tensor, key_lens: &[usize], causal: bool) -> Result<Tensor> {
    static LAST: std::sync::Mutex<Option<(MaskKey, Tensor)>> = std::sync::Mutex::new(None);
    let (b, _, tq, tk) = scores.dims4()?;
    let key: MaskKey = (key_lens.to_vec(), causal, tq, tk, scores.dtype());
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((k, m)) = last.as_ref() {
        if *k == key && m.device().same_device(scores.device()) {
            return Ok(m.clone());
        }
    }
    let mut m = vec![0f32; b * tq * tk];
    for (bi, &len) in key_lens.iter().enumerate() {
        for i in 0..tq {
            for j in 0..tk {
                let ok = j < len && (!causal || j <= i + tk - tq);
                m[(bi * tq + i) * tk + j] = if ok { 0.0 } else { -1e9 };
            }
        }
    }
    let mask = Tensor::from_vec(m, (b, 1, tq, tk), scores.device())?.to_dtype(scores.dtype())?;
    *last = Some((key, mask.clone()));
    Ok(mask)
}

/// The same from candle ops and an additive mask (devices without the fused kernel).
fn composed(scores: &Tensor, scale: f64, key_lens: &[usize], causal: bool) -> Result<Tensor> {
    let mask = additive_mask(scores, key_lens, causal)?;
    super::reference::softmax_last(&(scores * scale)?.broadcast_add(&mask)?)
}

/// softmax(scale·S) over valid keys for scores S (b, h, t_q, t_k); `key_lens` has b entries.
pub fn masked_softmax(
    scores: &Tensor,
    scale: f64,
    key_lens: &[usize],
    causal: bool,
) -> Result<Tensor> {
    if !super::fused_kernels_for(scores) {
        return composed(scores, scale, key_lens, causal);
    }
    let op = MaskedSoftmax {
        scale,
        key_lens: Arc::new(key_lens.to_vec()),
        causal,
    };
    Ok(scores.contiguous()?.apply_op1(op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::reference::tests::{check_grad, max_diff, values};
    use candle_core::Device;

    #[test]
    fn matches_reference_and_differentiates() {
        let (b, h, t) = (2, 3, 5);
        let s = Tensor::randn(0f64, 2.0, (b, h, t, t), &Device::Cpu).unwrap();
        for causal in [false, true] {
            let lens = [5usize, 3];
            let fused = masked_softmax(&s, 0.5, &lens, causal).unwrap();
            let reference = crate::ops::reference::masked_softmax(&s, 0.5, &lens, causal).unwrap();
            assert!(max_diff(&fused, &reference) < 1e-12);
            check_grad(&s, |x| masked_softmax(x, 0.5, &lens, causal));
            // the composed path (other devices), twice to go through its mask cache
            for _ in 0..2 {
                let c = composed(&s, 0.5, &lens, causal).unwrap();
                assert!(max_diff(&c, &reference) < 1e-12);
            }
        }
    }

    #[test]
    fn f32_rows_sum_to_one() {
        let s = Tensor::randn(0f32, 3.0, (1, 2, 4, 4), &Device::Cpu).unwrap();
        let p = masked_softmax(&s, 1.0, &[4], true).unwrap();
        let sums = values(&p.sum(3).unwrap());
        assert!(sums.iter().all(|x| (x - 1.0).abs() < 1e-6));
    }

    #[test]
    fn key_lens_count_real_tokens() {
        let mask = Tensor::new(&[[1f32, 1., 0.], [1., 1., 1.]], &Device::Cpu).unwrap();
        assert_eq!(key_lens(&mask).unwrap(), [2, 3]);
    }
}
