//! The U-Net's stages: down blocks, the mid block, up blocks.
//!
//! - Down block i (`CrossAttnDownBlock2D` / `DownBlock2D`): n resnets, each followed by a
//!   transformer in the cross-attention kind; every resnet's output is kept as a skip, and
//!   all but the last block end in a 3×3 stride-2 conv (`downsamplers.0.conv`, padding 1)
//!   whose output is a skip too.
//! - Mid block (`UNetMidBlock2DCrossAttn`): resnet, transformer, resnet.
//! - Up block i (`CrossAttnUpBlock2D` / `UpBlock2D`): n + 1 resnets, each on its input
//!   concatenated (channels) with the latest skip, each followed by a transformer in the
//!   cross-attention kind; all but the last block end in a nearest-neighbour ×2 upsampling and
//!   a 3×3 conv (`upsamplers.0.conv`).

use candle_core::Tensor;

use super::attention::{Transformer2d, TransformerShape};
use super::conv::Conv2d;
use super::load::Loader;
use super::resnet::ResnetBlock;
use crate::adapter::AdaptedLinear;
use crate::error::Result;
use crate::ops::{mark_on, probe};

/// Resnets, each optionally followed by a transformer.
#[derive(Debug, Clone)]
pub(crate) struct Layers {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2d>,
}

impl Layers {
    /// Resnet `i` then, in a cross-attention block, transformer `i`.
    fn step(&self, i: usize, h: &Tensor, emb_act: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let h = self.resnets[i].forward(h, emb_act)?;
        mark_on(h.device(), "unet: resnet")?;
        match self.attentions.get(i) {
            Some(a) => a.forward(&h, ctx),
            None => Ok(h),
        }
    }

    /// Whether every transformer here can run on a U-Net tape ([`super::UNet::tape_ready`]).
    pub(crate) fn tape_ready(&self, dtype: candle_core::DType) -> bool {
        self.attentions.iter().all(|a| a.tape_ready(dtype))
    }

    /// The transformers' adaptable linear layers.
    pub(crate) fn linears<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        for a in &self.attentions {
            a.linears(out);
        }
    }

    pub(crate) fn linears_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        for a in &mut self.attentions {
            a.linears_mut(out);
        }
    }
}

/// Transformers `{p}.attentions.{i}` for i < n when `shape` is given.
fn transformers(
    ld: &mut Loader,
    p: &str,
    n: usize,
    shape: Option<TransformerShape>,
) -> Result<Vec<Transformer2d>> {
    match shape {
        Some(s) => (0..n)
            .map(|i| Transformer2d::load(ld, &format!("{p}.attentions.{i}"), s))
            .collect(),
        None => Ok(vec![]),
    }
}

#[derive(Debug, Clone)]
pub struct DownBlock {
    pub(crate) layers: Layers,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    /// `attn`: the transformers' shape in a cross-attention block.
    pub(crate) fn load(
        ld: &mut Loader,
        p: &str,
        (c_in, c_out, temb): (usize, usize, usize),
        n: usize,
        attn: Option<TransformerShape>,
        downsample: bool,
    ) -> Result<Self> {
        let resnets = (0..n)
            .map(|i| {
                let c = if i == 0 { c_in } else { c_out };
                ResnetBlock::load(ld, &format!("{p}.resnets.{i}"), c, c_out, temb)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers: Layers {
                resnets,
                attentions: transformers(ld, p, n, attn)?,
            },
            downsample: downsample
                .then(|| ld.conv(&format!("{p}.downsamplers.0.conv"), c_out, c_out, 3, 2, 1))
                .transpose()?,
        })
    }

    /// Pushes each skip on `skips`; returns the block's output.
    pub fn forward(
        &self,
        x: &Tensor,
        emb_act: &Tensor,
        ctx: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for i in 0..self.layers.resnets.len() {
            h = self.layers.step(i, &h, emb_act, ctx)?;
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsample {
            h = d.forward(&h)?;
            mark_on(h.device(), "unet: resample")?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

#[derive(Debug, Clone)]
pub struct MidBlock {
    pub(crate) layers: Layers,
}

impl MidBlock {
    pub(crate) fn load(
        ld: &mut Loader,
        p: &str,
        c: usize,
        temb: usize,
        attn: TransformerShape,
    ) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| ResnetBlock::load(ld, &format!("{p}.resnets.{i}"), c, c, temb))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers: Layers {
                resnets,
                attentions: transformers(ld, p, 1, Some(attn))?,
            },
        })
    }

    pub fn forward(&self, x: &Tensor, emb_act: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let h = self.layers.step(0, x, emb_act, ctx)?;
        let h = self.layers.resnets[1].forward(&h, emb_act)?;
        mark_on(h.device(), "unet: resnet")?;
        Ok(h)
    }
}

/// An up block's channels: its output, the previous block's output (its input), and the
/// skips' channels, last-taken first.
pub(crate) struct UpChannels {
    pub c_out: usize,
    pub c_prev: usize,
    pub skips: Vec<usize>,
    pub temb: usize,
}

#[derive(Debug, Clone)]
pub struct UpBlock {
    pub(crate) layers: Layers,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    pub(crate) fn load(
        ld: &mut Loader,
        p: &str,
        ch: &UpChannels,
        attn: Option<TransformerShape>,
        upsample: bool,
    ) -> Result<Self> {
        let n = ch.skips.len();
        let resnets = (0..n)
            .map(|i| {
                let c_in = if i == 0 { ch.c_prev } else { ch.c_out };
                let name = format!("{p}.resnets.{i}");
                ResnetBlock::load(ld, &name, c_in + ch.skips[i], ch.c_out, ch.temb)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers: Layers {
                resnets,
                attentions: transformers(ld, p, n, attn)?,
            },
            upsample: upsample
                .then(|| {
                    ld.conv(
                        &format!("{p}.upsamplers.0.conv"),
                        ch.c_out,
                        ch.c_out,
                        3,
                        1,
                        1,
                    )
                })
                .transpose()?,
        })
    }

    /// Takes one skip from `skips` per resnet (the latest first).
    pub fn forward(
        &self,
        x: &Tensor,
        emb_act: &Tensor,
        ctx: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for i in 0..self.layers.resnets.len() {
            let skip = skips
                .pop()
                .ok_or_else(|| crate::error::Error::msg("U-Net: an up block ran out of skips"))?;
            let h_in = probe(&h, "backward: autograd, skip concatenation")?;
            h = super::tie::cat(&[&h_in, &skip], 1)?;
            mark_on(h.device(), "unet: resample")?;
            h = self.layers.step(i, &h, emb_act, ctx)?;
        }
        if let Some(u) = &self.upsample {
            let h_in = probe(&h, "backward: autograd, upsampling")?;
            h = u.forward(&super::tie::upsample2(&h_in)?)?;
            mark_on(h.device(), "unet: resample")?;
        }
        Ok(h)
    }
}

/// Nearest-neighbour ×2 upsampling of (b, c, h, w), as a broadcast: its backward sums each
/// 2×2 block (candle's `upsample_nearest2d` backward is a grouped convolution, which it runs
/// as one convolution per channel).
pub fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((b, c, 2 * h, 2 * w))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn upsample2_is_nearest_neighbour_and_its_gradient_sums_blocks() {
        let dev = Device::Cpu;
        let x = Var::randn(0f64, 1.0, (2, 3, 4, 5), &dev).unwrap();
        let y = upsample2(&x).unwrap();
        let r = x.upsample_nearest2d(8, 10).unwrap();
        let d = (&y - &r).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f64>().unwrap(), 0.0);
        let g = Tensor::randn(0f64, 1.0, (2, 3, 8, 10), &dev).unwrap();
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(&x).unwrap();
        let want = g
            .reshape((2, 3, 4, 2, 5, 2))
            .unwrap()
            .sum(5)
            .unwrap()
            .sum(3)
            .unwrap();
        let d = (dx - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f64>().unwrap() < 1e-12);
    }
}
