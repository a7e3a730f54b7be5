//! The time embedding and SDXL's added conditioning.
//!
//! Sinusoid of a timestep t (DDPM's positional embedding) in d = 2·h dimensions:
//! fᵢ = exp(−ln(10000)·i / (h − shift)) for i < h, e(t) = [sin(t·f), cos(t·f)], halves swapped
//! (cos first) with `flip_sin_to_cos`. t may be fractional. Computed in f32, then cast.
//!
//! Time embedding: emb = linear_2(silu(linear_1(e(t)))) (`time_embedding`).
//! SDXL (`text_time`): each of the six `time_ids` (original size, crop offset, target size)
//! gets its own sinusoid of `addition_time_embed_dim`; with the pooled text embedding in front,
//! the same MLP shape (`add_embedding`) maps them to a term added to emb.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::linear::FrozenLinear;

/// The sinusoid's settings (diffusers' `Timesteps`).
#[derive(Debug, Clone, Copy)]
pub struct Sinusoid {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub shift: f64,
}

impl Sinusoid {
    /// `t` (n,) any float dtype → (n, dim) f32.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let half = self.dim / 2;
        let n = t.dim(0)?;
        // diffusers' arithmetic, in its order and in f32
        let denom = half as f32 - self.shift as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| ((-(10000f64.ln() as f32)) * i as f32 / denom).exp())
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
        let args = t
            .to_dtype(DType::F32)?
            .reshape((n, 1))?
            .broadcast_mul(&freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let mut e = if self.flip_sin_to_cos {
            Tensor::cat(&[&cos, &sin], 1)?
        } else {
            Tensor::cat(&[&sin, &cos], 1)?
        };
        if self.dim % 2 == 1 {
            e = Tensor::cat(&[&e, &Tensor::zeros((n, 1), DType::F32, t.device())?], 1)?;
        }
        Ok(e)
    }
}

/// linear_2(silu(linear_1(x))), frozen.
#[derive(Debug, Clone)]
pub struct TimestepMlp {
    pub linear_1: FrozenLinear,
    pub linear_2: FrozenLinear,
}

impl TimestepMlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)?)
    }
}

/// Timesteps as the (b,) f32 vector the sinusoid takes: `t` (b,) or one value (shape () or
/// (1,)) for every row.
pub fn timesteps_for(t: &Tensor, b: usize, device: &Device) -> Result<Tensor> {
    let t = t.to_device(device)?.to_dtype(DType::F32)?;
    let t = match t.dims() {
        [] => t.reshape(1)?,
        _ => t.flatten_all()?,
    };
    match t.dim(0)? {
        n if n == b => Ok(t),
        1 => Ok(t.broadcast_as(b)?.contiguous()?),
        n => Err(crate::error::Error::msg(format!(
            "U-Net: {n} timesteps for a batch of {b} samples (give one per sample, or one for all)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoid_layout() {
        let t = Tensor::new(&[0f32, 2.0], &Device::Cpu).unwrap();
        let s = Sinusoid {
            dim: 5,
            flip_sin_to_cos: true,
            shift: 0.0,
        };
        let e = s.forward(&t).unwrap().to_vec2::<f32>().unwrap();
        // t = 0: cos = 1, sin = 0, then the odd dimension's zero pad
        assert_eq!(e[0], vec![1.0, 1.0, 0.0, 0.0, 0.0]);
        // frequencies 1 and 10000^(-1/2) = 0.01
        let expect = [2f32.cos(), 0.02f32.cos(), 2f32.sin(), 0.02f32.sin(), 0.0];
        for (a, b) in e[1].iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{:?}", e[1]);
        }
    }
}
