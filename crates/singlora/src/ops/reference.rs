//! The fused ops' references: each computed from candle's elementary ops, which record a
//! backward, and none calling a fused op. Every fused op's tests compare its values and
//! gradients with these (and finite differences check these), and the ops fall back to them on
//! devices their kernels do not cover. (candle's own fused `rms_norm`, `layer_norm`,
//! `softmax_last_dim` and `rope` record no gradient.)
//!
//! - RMSNorm: y = x / √(mean(x²) + ε) · w
//! - LayerNorm: y = (x − μ) / √(σ² + ε) · w + b
//! - softmax over the last axis with the row maximum subtracted (as a constant)
//! - RoPE, rotate-half layout (Hugging Face's): y = x·cos + rot(x)·sin, rot(x) = [−x₂, x₁]
//! - cross-entropy with per-row weights: Σ wᵢ·(logsumexp(zᵢ) − zᵢ[yᵢ]) / Σ wᵢ
//! - attention with an additive mask, grouped-query heads expanded
//! - SwiGLU silu(g)·u, the adapted linear x·W0ᵀ + b + c·(x·D)·Uᵀ
//!
//! Norms, softmax and the cross-entropy compute in f32 (or f64) whatever the input dtype.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;

fn upcast(x: &Tensor) -> Result<Tensor> {
    Ok(match x.dtype() {
        DType::F64 | DType::F32 => x.clone(),
        _ => x.to_dtype(DType::F32)?,
    })
}

/// RMSNorm over the last axis; `w` has the last axis' size.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = upcast(x)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(&w.to_dtype(y.dtype())?)?
        .to_dtype(x.dtype())?)
}

/// LayerNorm over the last axis.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = upcast(x)?;
    let mu = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let dt = y.dtype();
    Ok(y.broadcast_mul(&w.to_dtype(dt)?)?
        .broadcast_add(&b.to_dtype(dt)?)?
        .to_dtype(x.dtype())?)
}

/// Softmax over the last axis.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let xf = upcast(x)?;
    // the maximum only stabilises; as a constant it needs no backward
    let max = xf.max_keepdim(D::Minus1)?.detach();
    let e = xf.broadcast_sub(&max)?.exp()?;
    let y = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// RoPE on (b, h, t, d) with tables (t, d).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// `x` (b, t, heads·hd) split into heads (b, heads, t, hd), rotated by [`rope`] with tables
/// (t, hd) in x's dtype when `rotate`.
pub fn rope_split(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    rotate: bool,
) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let y = x.reshape((b, t, heads, width / heads))?.transpose(1, 2)?;
    if !rotate {
        return Ok(y);
    }
    let dt = x.dtype();
    rope(&y, &cos.to_dtype(dt)?, &sin.to_dtype(dt)?)
}

/// Per-row −log softmax(`logits`)[target] (n) of logits (n, C) against u32 `targets` (n),
/// in f32 at least.
pub fn nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let z = upcast(logits)?;
    let max = z.max_keepdim(D::Minus1)?.detach();
    let shifted = z.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (n, 1)
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?; // (n, 1)
    Ok((lse - picked)?.squeeze(1)?)
}

/// The mean of per-row losses (n), weighted by `weights` (n) (1 for rows that count, 0 for
/// padding) or over all rows.
pub fn weighted_mean(rows: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    Ok(match weights {
        Some(w) => {
            let w = w.to_dtype(rows.dtype())?;
            (rows * &w)?
                .sum_all()?
                .broadcast_div(&w.sum_all()?.maximum(1e-12)?)?
        }
        None => rows.mean_all()?,
    })
}

/// Weighted mean cross-entropy of `logits` (n, C) against `targets` (n) u32.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    weighted_mean(&nll(logits, targets)?, weights)
}

/// K or V (b, h_kv, t, d) with each head repeated for the `h / h_kv` query heads that share it.
fn expand_kv(x: &Tensor, h: usize) -> Result<Tensor> {
    let (b, h_kv, t, d) = x.dims4()?;
    if h_kv == h {
        return Ok(x.clone());
    }
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, h_kv, h / h_kv, t, d))?
        .reshape((b, h, t, d))?)
}

/// Scaled dot-product attention on (b, h, t, d) queries and (b, h_kv, t, d) keys and values
/// (grouped-query attention: each KV head shared by h / h_kv query heads) with an additive
/// mask broadcastable to (b, h, t, t).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (_, h, _, d) = q.dims4()?;
    let (k, v) = (expand_kv(k, h)?, expand_kv(v, h)?);
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    let p = softmax_last(&scores)?;
    Ok(p.matmul(&v.contiguous()?)?)
}

/// The (b, t) 1/0 mask of rows whose first `key_lens[i]` positions are real tokens.
pub fn lens_mask(key_lens: &[usize], t: usize, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = key_lens
        .iter()
        .flat_map(|&len| (0..t).map(move |j| if j < len { 1.0 } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (key_lens.len(), t), device)?)
}

/// The additive mask for padded keys (b, 1, 1, t) from a (b, t) 1/0 mask, optionally combined
/// with a causal mask (b, 1, t, t).
pub fn additive_mask(mask: &Tensor, causal: bool, dtype: DType) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    const NEG: f64 = -1e9;
    let keys = ((mask.to_dtype(DType::F32)? - 1.0)? * -NEG)?.reshape((b, 1, 1, t))?;
    let m = if causal {
        let tri: Vec<f32> = (0..t * t)
            .map(|i| if i % t > i / t { NEG as f32 } else { 0.0 })
            .collect();
        let tri = Tensor::from_vec(tri, (1, 1, t, t), mask.device())?;
        keys.broadcast_add(&tri)?
    } else {
        keys
    };
    Ok(m.to_dtype(dtype)?)
}

/// softmax(scale·S) over the first `key_lens[i]` keys of batch row i (and with `causal` only
/// keys j ≤ i), for square scores S (b, h, t, t).
pub fn masked_softmax(
    scores: &Tensor,
    scale: f64,
    key_lens: &[usize],
    causal: bool,
) -> Result<Tensor> {
    let t = scores.dim(D::Minus1)?;
    let mask = additive_mask(
        &lens_mask(key_lens, t, scores.device())?,
        causal,
        scores.dtype(),
    )?;
    softmax_last(&(scores * scale)?.broadcast_add(&mask)?)
}

/// silu(`gate`)·`up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// x·W0ᵀ + b + c·(x·D)·Uᵀ for 2-D x.
pub fn linear(
    x: &Tensor,
    w0: &Tensor,
    b: Option<&Tensor>,
    (d, u, c): (&Tensor, &Tensor, f64),
) -> Result<Tensor> {
    let mut y = x.matmul(&w0.t()?)?;
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    Ok((y + (x.matmul(d)?.matmul(&u.t()?)? * c)?)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// max |a − b| over all elements, in f64 (for f32 tensors too).
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// A tensor's values, flattened, in f64.
    pub fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    /// Checks the gradient of sum(f(x) ⊙ g) w.r.t. x against central differences in f64.
    pub fn check_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) {
        let var = candle_core::Var::from_tensor(x).unwrap();
        let y = f(var.as_tensor()).unwrap();
        let g = Tensor::randn(0f64, 1.0, y.dims(), &Device::Cpu).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let analytic = values(
            grads
                .get(var.as_tensor())
                .expect("no gradient recorded: the op drops the backward"),
        );
        let flat = values(x);
        let loss = |v: Vec<f64>| -> f64 {
            let t = Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap();
            (f(&t).unwrap() * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let eps = 1e-6;
        for j in 0..flat.len() {
            let mut p = flat.clone();
            p[j] += eps;
            let mut m = flat.clone();
            m[j] -= eps;
            let numeric = (loss(p) - loss(m)) / (2.0 * eps);
            let err = (numeric - analytic[j]).abs() / (1.0 + numeric.abs());
            assert!(
                err < 1e-6,
                "elem {j}: autograd {} vs finite differences {numeric}",
                analytic[j]
            );
        }
    }

    pub fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn rms_norm_grad() {
        let w = (randn(&[5]) + 1.0).unwrap();
        check_grad(&randn(&[2, 3, 5]), |x| rms_norm(x, &w, 1e-6));
        // and the weight's gradient when it were trained
        let x = randn(&[4, 5]);
        check_grad(&w, |w| rms_norm(&x, w, 1e-6));
    }

    #[test]
    fn layer_norm_grad_and_value() {
        let w = (randn(&[6]) + 1.0).unwrap();
        let b = randn(&[6]);
        check_grad(&randn(&[3, 6]), |x| layer_norm(x, &w, &b, 1e-5));
        let x = Tensor::new(&[[1f64, 2., 3., 4.]], &Device::Cpu).unwrap();
        let ones = Tensor::ones(4, DType::F64, &Device::Cpu).unwrap();
        let zeros = Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap();
        let y = values(&layer_norm(&x, &ones, &zeros, 0.0).unwrap());
        let s = 1.25f64.sqrt();
        for (a, e) in y.iter().zip([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]) {
            assert!((a - e).abs() < 1e-12);
        }
    }

    #[test]
    fn softmax_grad_and_sum() {
        check_grad(&randn(&[2, 7]), softmax_last);
        let y = values(&softmax_last(&randn(&[3, 4])).unwrap().sum(1).unwrap());
        assert!(y.iter().all(|s| (s - 1.0).abs() < 1e-12));
    }

    #[test]
    fn rope_grad_and_rotation() {
        use crate::ops::rope_tables;
        let inv: Vec<f64> = (0..3)
            .map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / 6.0))
            .collect();
        let (cos, sin) = rope_tables(&inv, 4, DType::F64, &Device::Cpu).unwrap();
        check_grad(&randn(&[1, 2, 4, 6]), |x| rope(x, &cos, &sin));
        // position 0 is the identity; rotations keep norms
        let x = randn(&[1, 1, 4, 6]);
        let y = rope(&x, &cos, &sin).unwrap();
        let first = |t: &Tensor| values(&t.narrow(2, 0, 1).unwrap());
        assert_eq!(first(&x), first(&y));
        let norms = |t: &Tensor| values(&t.sqr().unwrap().sum(3).unwrap());
        for (a, b) in norms(&x).iter().zip(&norms(&y)) {
            assert!((a - b).abs() < 1e-10);
        }
        // hand case: d = 2, position 1, frequency 1: a rotation by 1 radian
        let (c, s) = rope_tables(&[1.0], 2, DType::F64, &Device::Cpu).unwrap();
        let v = Tensor::new(&[[[[1f64, 0.], [1., 0.]]]], &Device::Cpu).unwrap();
        let r = values(&rope(&v, &c, &s).unwrap());
        assert!((r[2] - 1f64.cos()).abs() < 1e-12 && (r[3] - 1f64.sin()).abs() < 1e-12);
    }

    #[test]
    fn cross_entropy_grad_and_value() {
        let targets = Tensor::new(&[2u32, 0, 1], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f64, 0., 1.], &Device::Cpu).unwrap();
        check_grad(&randn(&[3, 4]), |z| cross_entropy(z, &targets, Some(&w)));
        check_grad(&randn(&[3, 4]), |z| cross_entropy(z, &targets, None));
        // uniform logits over 4 classes: ln 4
        let z = Tensor::zeros((3, 4), DType::F64, &Device::Cpu).unwrap();
        let l = cross_entropy(&z, &targets, None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l - 4f64.ln()).abs() < 1e-12);
        let rows = values(&nll(&z, &targets).unwrap());
        assert!(rows.iter().all(|r| (r - 4f64.ln()).abs() < 1e-12));
    }

    #[test]
    fn attention_grad_gqa_and_mask() {
        let (b, h, hkv, t, d) = (2, 4, 2, 3, 2);
        let k = randn(&[b, hkv, t, d]);
        let v = randn(&[b, hkv, t, d]);
        let mask = additive_mask(
            &lens_mask(&[3, 2], t, &Device::Cpu).unwrap(),
            true,
            DType::F64,
        )
        .unwrap();
        let q = randn(&[b, h, t, d]);
        check_grad(&q, |q| attention(q, &k, &v, &mask));
        check_grad(&k, |k| attention(&q, k, &v, &mask));
        check_grad(&v, |v| attention(&q, &k, v, &mask));
        // causal: the first query sees only the first key, so its output is v[0]
        let o = attention(&q, &k, &v, &mask).unwrap();
        let first = values(&o.narrow(2, 0, 1).unwrap().narrow(1, 0, 1).unwrap());
        let v0 = values(&v.narrow(2, 0, 1).unwrap().narrow(1, 0, 1).unwrap());
        for (a, e) in first.iter().zip(&v0[..d]) {
            assert!((a - e).abs() < 1e-9);
        }
    }
}
