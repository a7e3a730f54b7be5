//! A frozen 2-D convolution, `y = W ⋆ x + b`, whose backward computes the input gradient only.
//!
//! candle's `conv2d` backward also computes `∂L/∂W` (one more convolution of the forward's
//! size) whether or not anything asks for it. Here the forward runs on a detached input and
//! one op ties the result back to `x` with the input gradient alone:
//!
//! - stride 1: `∂L/∂x = W̃ ⋆ g` with padding k−1−p, W̃ the kernel with its two channel axes
//!   swapped and its taps reversed (a plain convolution, the fast path on every device);
//! - stride s: the same convolution of g with s − 1 zeros between neighbours, trimmed to x's
//!   size where x's side is odd (candle's transposed convolution where the kernel is not
//!   square or the padding not below its size).
//!
//! Every convolution here is [`crate::ops::conv::conv2d`] (on a GPU, cuDNN's where it is found,
//! else im2col and one GEMM); where cuDNN is found, the input gradient is its one call instead.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use singlora::diffusion::unet::conv::Conv2d;
//! let w = Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
//! let conv = Conv2d::new(w, None, 1, 1);
//! let x = Var::ones((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
//! let y = conv.forward(&x)?; // each output sums the 2×2 input
//! assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![4.0; 4]);
//! let g = y.sum_all()?.backward()?;
//! assert_eq!(g.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?, vec![4.0; 4]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use candle_core::Tensor;

use super::tie::{tie, tracked, InputGradient};
use crate::error::Result;
use crate::ops::conv::{conv2d, flipped};

#[derive(Debug, Clone)]
pub struct Conv2d {
    /// (c_out, c_in, k, k)
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Self {
            weight,
            bias,
            stride,
            padding,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_shifted(x, None)
    }

    /// The gradient of this convolution with respect to an input of side `hw`, for the output
    /// gradient `g` (the bias takes none).
    pub(crate) fn input_grad(&self, hw: (usize, usize), g: &Tensor) -> candle_core::Result<Tensor> {
        input_grad(&self.weight, self.padding, self.stride, hw, g)
    }

    /// `W ⋆ x + b + shift`, `shift` (b, c_out) added at every position (a ResNet block's time
    /// embedding). Where the shift needs no gradient it is added with the bias outside
    /// autograd, so the backward has no add to pass through (candle's gives each side of an add
    /// a zero-filled gradient and adds into it, a few full passes over the output).
    pub fn forward_shifted(&self, x: &Tensor, shift: Option<&Tensor>) -> Result<Tensor> {
        let per_channel = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(t.rank() - 1)?;
            let lead = t.elem_count() / c.max(1);
            Ok(t.reshape((lead, c, 1, 1))?)
        };
        let (inside, outside) = match shift {
            Some(t) if t.track_op() => (None, Some(t)),
            other => (other, None),
        };
        let add = match (&self.bias, inside) {
            (Some(b), Some(t)) => Some(per_channel(&t.broadcast_add(b)?)?),
            (Some(b), None) => Some(per_channel(b)?),
            (None, Some(t)) => Some(per_channel(t)?),
            (None, None) => None,
        };
        let y = frozen_conv2d_plus(x, &self.weight, self.padding, self.stride, add.as_ref())?;
        Ok(match outside {
            Some(t) => y.broadcast_add(&per_channel(t)?)?,
            None => y,
        })
    }
}

/// `W ⋆ x` (no bias) differentiable in `x` only.
pub fn frozen_conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    frozen_conv2d_plus(x, w, padding, stride, None)
}

/// [`frozen_conv2d`] plus `add` ((b or 1, c_out, 1, 1), broadcast), which takes no gradient.
fn frozen_conv2d_plus(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    add: Option<&Tensor>,
) -> Result<Tensor> {
    let mut y = conv2d(&x.detach(), w, padding, stride)?;
    if let Some(a) = add {
        y = y.broadcast_add(&a.detach())?;
    }
    if !tracked(x) {
        return Ok(y);
    }
    let grad = InputGrad {
        w: w.clone(),
        padding,
        stride,
    };
    Ok(tie(x, &y, grad)?)
}

/// A frozen convolution's input gradient.
struct InputGrad {
    w: Tensor,
    padding: usize,
    stride: usize,
}

impl InputGradient for InputGrad {
    const NAME: &'static str = "frozen-conv2d";
    const PROFILE_LABEL: &'static str = "backward: convolutions' input gradients";

    fn input_grad(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        input_grad(&self.w, self.padding, self.stride, (h, w), g)
    }
}

/// The gradient of `W ⋆ x` (zero padding `padding`, `stride`) with respect to an input of side
/// `(h, w)`, for the output gradient `g` (see the module's documentation).
pub(crate) fn input_grad(
    wt: &Tensor,
    padding: usize,
    stride: usize,
    (h, w): (usize, usize),
    g: &Tensor,
) -> candle_core::Result<Tensor> {
    let (_, _, kh, kw) = wt.dims4()?;
    let g = g.contiguous()?;
    if let Some(dx) = crate::ops::conv::input_grad(&g, wt, padding, stride, (h, w))? {
        return Ok(dx);
    }
    Ok(if stride == 1 && kh == kw && padding < kh {
        conv2d(&g, &flipped(wt)?, kh - 1 - padding, 1)?
    } else if kh == kw && padding < kh {
        // g with s − 1 zeros between neighbours (and, for an odd side, zeros past the end),
        // then the stride-1 case: one plain convolution, where candle's transposed one is
        // a direct loop on CUDA
        let out = |n: usize| (n - 1) * stride + kh - 2 * padding;
        let (gh, gw) = (g.dim(2)?, g.dim(3)?);
        let gd = dilate(&g, 2, stride, h.saturating_sub(out(gh)))?;
        let gd = dilate(&gd, 3, stride, w.saturating_sub(out(gw)))?;
        conv2d(&gd.contiguous()?, &flipped(wt)?, kh - 1 - padding, 1)?
            .narrow(2, 0, h)?
            .narrow(3, 0, w)?
    } else {
        // the largest output padding either side needs; the surplus row or column (an odd
        // side) lies past x's edge and is cut off
        let out = |n: usize, k: usize| (n - 1) * stride + k - 2 * padding;
        let (gh, gw) = (g.dim(2)?, g.dim(3)?);
        let pad = (h.saturating_sub(out(gh, kh))).max(w.saturating_sub(out(gw, kw)));
        g.conv_transpose2d(wt, padding, pad, stride, 1)?
            .narrow(2, 0, h)?
            .narrow(3, 0, w)?
    })
}

/// `g` along axis `dim` (2 or 3 of 4) with `s − 1` zeros between neighbours and `extra` zeros
/// after the last: n values become (n − 1)·s + 1 + extra.
fn dilate(g: &Tensor, dim: usize, s: usize, extra: usize) -> candle_core::Result<Tensor> {
    let n = g.dim(dim)?;
    let g = if s > 1 {
        let x = g.unsqueeze(dim + 1)?;
        let mut zshape = x.dims().to_vec();
        zshape[dim + 1] = s - 1;
        let z = Tensor::zeros(zshape, g.dtype(), g.device())?;
        let mut shape = g.dims().to_vec();
        shape[dim] = n * s;
        Tensor::cat(&[&x, &z], dim + 1)?
            .reshape(shape)?
            .narrow(dim, 0, (n - 1) * s + 1)?
    } else {
        g.clone()
    };
    if extra > 0 {
        g.pad_with_zeros(dim, 0, extra)
    } else {
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Against finite differences (exact here: the loss is linear in x), for each stride,
    /// padding and kernel the U-Net has, with odd and even sides.
    #[test]
    fn input_gradient_is_exact() {
        let dev = Device::Cpu;
        for (k, stride, padding) in [(3, 1, 1), (1, 1, 0), (3, 2, 1)] {
            for (h, w) in [(4, 4), (5, 3), (3, 4)] {
                let x = Var::randn(0f64, 1., (1, 2, h, w), &dev).unwrap();
                let wt = Tensor::randn(0f64, 1., (3, 2, k, k), &dev).unwrap();
                let y = frozen_conv2d(&x, &wt, padding, stride).unwrap();
                let y_ref = x.conv2d(&wt, padding, stride, 1, 1).unwrap();
                let g = Tensor::randn(0f64, 1., y_ref.dims(), &dev).unwrap();
                let loss = |x: &Tensor| -> f64 {
                    let y = x.conv2d(&wt, padding, stride, 1, 1).unwrap();
                    (y * &g).unwrap().sum_all().unwrap().to_scalar().unwrap()
                };
                let fwd = (&y - &y_ref).unwrap().abs().unwrap().max_all().unwrap();
                assert!(fwd.to_scalar::<f64>().unwrap() < 1e-12);
                let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = grads.get(&x).unwrap().flatten_all().unwrap();
                let dx = dx.to_vec1::<f64>().unwrap();
                let x0 = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                for i in 0..x0.len() {
                    let at = |d: f64| {
                        let mut v = x0.clone();
                        v[i] += d;
                        loss(&Tensor::from_vec(v, x.dims(), &dev).unwrap())
                    };
                    let fd = (at(0.5) - at(-0.5)) / 1.0;
                    assert!(
                        (fd - dx[i]).abs() < 1e-10,
                        "k {k} stride {stride} {h}×{w} entry {i}: {} vs {fd}",
                        dx[i]
                    );
                }
            }
        }
    }
}
