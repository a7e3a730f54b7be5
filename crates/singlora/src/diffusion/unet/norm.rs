//! The U-Net's norms, with frozen affine parameters.
//!
//! - GroupNorm over (b, c, h, w): the c channels in g groups, each group normalised over its
//!   channels and all positions, y = (x − μ)/√(σ² + ε)·w_c + b_c. On CUDA one fused op each
//!   way ([`crate::ops::affine_norm`], with the ResNet blocks' SiLU folded in); elsewhere
//!   composed of candle's elementary ops (each records its backward), in f32 for half-precision
//!   inputs.
//! - LayerNorm over the last axis: the same fused op on CUDA, [`crate::ops::layer_norm`]
//!   elsewhere (fused forward and backward on the CPU).

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::ops::affine_norm as ops;

#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Self {
        Self {
            weight,
            bias,
            groups,
            eps,
        }
    }

    /// `x` (b, c, h, w): one fused op on CUDA, else [`Self::forward_composed`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fused = ops::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false)?;
        match fused {
            Some(y) => Ok(y),
            None => self.forward_composed(x),
        }
    }

    /// SiLU(GroupNorm(x)), as the ResNet blocks take it: one fused op on CUDA.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        let fused = ops::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true)?;
        match fused {
            Some(y) => Ok(y),
            None => Ok(self.forward_composed(x)?.silu()?),
        }
    }

    /// The input gradient of [`Self::forward_silu`] at `x` for the output gradient `g`: the
    /// fused backward kernel on CUDA; elsewhere the composed forward's backward, by candle's
    /// autograd on a graph of its own.
    pub fn backward_silu(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        self.input_grad(x, g, true)
    }

    /// The input gradient of [`Self::forward`], as [`Self::backward_silu`] computes its own.
    pub fn backward(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        self.input_grad(x, g, false)
    }

    fn input_grad(&self, x: &Tensor, g: &Tensor, silu: bool) -> Result<Tensor> {
        let (w, b) = (&self.weight, &self.bias);
        if let Some(dx) = ops::group_norm_backward(x, g, w, b, self.groups, self.eps, silu)? {
            return Ok(dx);
        }
        crate::ops::input_grad_by_autograd(x, g, "group norm", |x| {
            let y = self.forward_composed(x)?;
            Ok(if silu { y.silu()? } else { y })
        })
    }

    /// Composed of candle's elementary ops (the CPU's path, and the fused op's reference).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let dt = x.dtype();
        let xf = match dt {
            DType::F32 | DType::F64 => x.clone(),
            _ => x.to_dtype(DType::F32)?,
        };
        let xg = xf.reshape((b, self.groups, (c / self.groups) * h * w))?;
        let mean = xg.mean_keepdim(2)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let ct = y.dtype();
        let y = y
            .reshape((b, c, h, w))?
            .broadcast_mul(&self.weight.to_dtype(ct)?.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.bias.to_dtype(ct)?.reshape((1, c, 1, 1))?)?;
        Ok(y.to_dtype(dt)?)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// One fused op on CUDA, else [`crate::ops::layer_norm`] (fused on the CPU, composed
    /// elsewhere).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match ops::layer_norm(x, &self.weight, &self.bias, self.eps)? {
            Some(y) => Ok(y),
            None => crate::ops::layer_norm(x, &self.weight, &self.bias, self.eps),
        }
    }

    /// The input gradient of [`Self::forward`] at `x` for the output gradient `g`: the fused
    /// backward kernel on CUDA; elsewhere the forward's backward, by candle's autograd on a
    /// graph of its own.
    pub fn backward(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (w, b) = (&self.weight, &self.bias);
        if let Some(dx) = ops::layer_norm_backward(x, g, w, b, self.eps)? {
            return Ok(dx);
        }
        crate::ops::input_grad_by_autograd(x, g, "layer norm", |x| {
            crate::ops::layer_norm(x, w, b, self.eps)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::reference::tests::check_grad;
    use candle_core::Device;

    #[test]
    fn group_norm_normalises_each_group_and_differentiates() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f64, 2.0, (2, 6, 3, 2), &dev).unwrap() + 1.0).unwrap();
        let ones = Tensor::ones(6, DType::F64, &dev).unwrap();
        let zeros = Tensor::zeros(6, DType::F64, &dev).unwrap();
        let y = GroupNorm::new(ones, zeros, 3, 0.0).forward(&x).unwrap();
        let g = y.reshape((2, 3, 12)).unwrap();
        let mean = g.mean(2).unwrap().abs().unwrap().max_all().unwrap();
        let var = g.sqr().unwrap().mean(2).unwrap();
        assert!(mean.to_scalar::<f64>().unwrap() < 1e-12);
        for v in var.flatten_all().unwrap().to_vec1::<f64>().unwrap() {
            assert!((v - 1.0).abs() < 1e-12);
        }
        let w = Tensor::randn(1f64, 0.3, 6, &dev).unwrap();
        let b = Tensor::randn(0f64, 0.3, 6, &dev).unwrap();
        let gn = GroupNorm::new(w, b, 2, 1e-5);
        check_grad(&x, |x| gn.forward(x));
    }
}
