//! Differentiable transformer building blocks, composed from candle ops that record a backward.
//!
//! candle's fused `rms_norm`, `layer_norm`, `softmax_last_dim` and `rope` record no gradient
//! (every parameter upstream silently gets none), so training goes through these instead; each
//! has a finite-difference test below.
//!
//! - RMSNorm: y = x / √(mean(x²) + ε) · w
//! - LayerNorm: y = (x − μ) / √(σ² + ε) · w + b
//! - softmax over the last axis with the row maximum subtracted (as a constant)
//! - RoPE, rotate-half layout (Hugging Face's): y = x·cos + rot(x)·sin, rot(x) = [−x₂, x₁]
//! - cross-entropy with per-row weights: Σ wᵢ·(logsumexp(zᵢ) − zᵢ[yᵢ]) / Σ wᵢ
//!
//! Norms and softmax compute in f32 (or f64) whatever the input dtype, and return the input's.

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

/// cos and sin tables (t, head_dim) for positions 0..t, rotate-half layout.
pub fn rope_tables(
    inv_freq: &[f64],
    t: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(t * 2 * half);
    let mut sin = Vec::with_capacity(t * 2 * half);
    for p in 0..t {
        for _ in 0..2 {
            for f in inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let cos = Tensor::from_vec(cos, (t, 2 * half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (t, 2 * half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// RoPE on (b, h, t, d) with tables (t, d).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// Weighted mean cross-entropy of `logits` (n, C) against `targets` (n) u32; `weights` (n)
/// (1 for rows that count, 0 for padding) or None for all rows. Computed in f32 at least.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let nll = if crate::ops::xent_fused(logits) {
        crate::ops::xent_rows(logits, targets)?
    } else {
        let z = upcast(logits)?;
        let max = z.max_keepdim(D::Minus1)?.detach();
        let shifted = z.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (n, 1)
        let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?; // (n, 1)
        (lse - picked)?.squeeze(1)? // (n)
    };
    Ok(match weights {
        Some(w) => {
            let w = w.to_dtype(nll.dtype())?;
            (nll * &w)?
                .sum_all()?
                .broadcast_div(&w.sum_all()?.maximum(1e-12)?)?
        }
        None => nll.mean_all()?,
    })
}

/// Per-row negative log-likelihoods (n), without a graph (for evaluation).
pub fn nll_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let z = upcast(&logits.detach())?;
    let max = z.max_keepdim(D::Minus1)?;
    let shifted = z.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    Ok((lse - picked)?.squeeze(1)?)
}

/// Activation functions by their Hugging Face `hidden_act` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// exact GELU (erf), HF "gelu"
    GeluErf,
    /// tanh approximation, HF "gelu_new" / "gelu_pytorch_tanh"
    GeluTanh,
    Silu,
    Relu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "silu" | "swish" => Some(Activation::Silu),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::GeluErf => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Silu => x.silu()?,
            Activation::Relu => x.relu()?,
        })
    }
}

/// Scaled dot-product attention on (b, h, t, d) tensors; batch row i attends to its first
/// `key_lens[i]` keys (right padding), and only to earlier ones when `causal`. K and V may have
/// fewer heads (grouped-query attention): each is shared by h / h_kv query heads. The softmax
/// is [`crate::ops::masked_softmax`] (fused on the CPU).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_lens: &[usize],
    causal: bool,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let h_kv = k.dim(1)?;
    let (k, v) = if h_kv != h {
        let rep = h / h_kv;
        let expand = |x: &Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(2)?
                .broadcast_as((b, h_kv, rep, t, d))?
                .reshape((b, h, t, d))?)
        };
        (expand(k)?, expand(v)?)
    } else {
        (k.clone(), v.clone())
    };
    // Kᵀ as a strided view: the batched GEMM takes it transposed, no copy
    let scores = q.contiguous()?.matmul(&k.contiguous()?.t()?)?;
    let p = crate::ops::masked_softmax(&scores, 1.0 / (d as f64).sqrt(), key_lens, causal)?;
    Ok(p.matmul(&v.contiguous()?)?)
}

/// Real-token counts per row of a (b, t) 1/0 mask (one host read).
pub fn key_lens(mask: &Tensor) -> Result<Vec<usize>> {
    Ok(mask
        .to_dtype(DType::F32)?
        .sum(1)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|x| x.round() as usize)
        .collect())
}

/// The composed reference of [`attention`] with an additive mask broadcastable to (b, h, t, t).
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let h_kv = k.dim(1)?;
    let (k, v) = if h_kv != h {
        let rep = h / h_kv;
        let expand = |x: &Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(2)?
                .broadcast_as((b, h_kv, rep, t, d))?
                .reshape((b, h, t, d))?)
        };
        (expand(k)?, expand(v)?)
    } else {
        (k.clone(), v.clone())
    };
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    let p = softmax_last(&scores)?;
    Ok(p.matmul(&v.contiguous()?)?)
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

    /// Checks the gradient of sum(f(x) ⊙ g) w.r.t. x against central differences in f64.
    pub fn check_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) {
        let var = candle_core::Var::from_tensor(x).unwrap();
        let y = f(var.as_tensor()).unwrap();
        let g = Tensor::randn(0f64, 1.0, y.dims(), &Device::Cpu).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let analytic = grads
            .get(var.as_tensor())
            .expect("no gradient recorded: the op drops the backward")
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let flat = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
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

    fn randn(shape: &[usize]) -> Tensor {
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
        let y = layer_norm(&x, &ones, &zeros, 0.0)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let s = 1.25f64.sqrt();
        for (a, e) in y[0].iter().zip([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]) {
            assert!((a - e).abs() < 1e-12);
        }
    }

    #[test]
    fn softmax_grad_and_sum() {
        check_grad(&randn(&[2, 7]), softmax_last);
        let y = softmax_last(&randn(&[3, 4]))
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(y.iter().all(|s| (s - 1.0).abs() < 1e-12));
    }

    #[test]
    fn rope_grad_and_rotation() {
        let inv: Vec<f64> = (0..3)
            .map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / 6.0))
            .collect();
        let (cos, sin) = rope_tables(&inv, 4, DType::F64, &Device::Cpu).unwrap();
        check_grad(&randn(&[1, 2, 4, 6]), |x| rope(x, &cos, &sin));
        // position 0 is the identity; rotations keep norms
        let x = randn(&[1, 1, 4, 6]);
        let y = rope(&x, &cos, &sin).unwrap();
        let x0 = x
            .narrow(2, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let y0 = y
            .narrow(2, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(x0, y0);
        let nx = x
            .sqr()
            .unwrap()
            .sum(3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let ny = y
            .sqr()
            .unwrap()
            .sum(3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (a, b) in nx.iter().zip(&ny) {
            assert!((a - b).abs() < 1e-10);
        }
        // hand case: d = 2, position 1, frequency 1: a rotation by 1 radian
        let (c, s) = rope_tables(&[1.0], 2, DType::F64, &Device::Cpu).unwrap();
        let v = Tensor::new(&[[[[1f64, 0.], [1., 0.]]]], &Device::Cpu).unwrap();
        let r = rope(&v, &c, &s)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
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
        let rows = nll_rows(&z, &targets).unwrap().to_vec1::<f64>().unwrap();
        assert!(rows.iter().all(|r| (r - 4f64.ln()).abs() < 1e-12));
    }

    #[test]
    fn activations_grad() {
        for a in [Activation::GeluErf, Activation::GeluTanh, Activation::Silu] {
            check_grad(&randn(&[2, 5]), |x| a.apply(x));
        }
    }

    #[test]
    fn attention_grad_gqa_and_mask() {
        let (b, h, hkv, t, d) = (2, 4, 2, 3, 2);
        let k = randn(&[b, hkv, t, d]);
        let v = randn(&[b, hkv, t, d]);
        let pad = Tensor::new(&[[1f32, 1., 1.], [1., 1., 0.]], &Device::Cpu).unwrap();
        let mask = additive_mask(&pad, true, DType::F64).unwrap();
        let lens = [3usize, 2];
        check_grad(&randn(&[b, h, t, d]), |q| attention(q, &k, &v, &lens, true));
        let q = randn(&[b, h, t, d]);
        check_grad(&k, |k| attention(&q, k, &v, &lens, true));
        check_grad(&v, |v| attention(&q, &k, v, &lens, true));
        check_grad(&q, |q| attention_reference(q, &k, &v, &mask));
        let fused = attention(&q, &k, &v, &lens, true).unwrap();
        let composed = attention_reference(&q, &k, &v, &mask).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-12);
        // causal: the first query sees only the first key, so its output is v[0]
        let o = fused;
        let first = o
            .narrow(2, 0, 1)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let v0 = v
            .narrow(2, 0, 1)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (a, e) in first.iter().zip(&v0[..d]) {
            assert!((a - e).abs() < 1e-9);
        }
    }
}
