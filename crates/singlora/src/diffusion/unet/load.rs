//! Loading the U-Net's layers by their diffusers names, shapes checked, every tensor read
//! recorded (so that [`refuse_unread`](crate::model::weights::refuse_unread) can refuse the
//! ones the config gives no place).

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor};

use super::conv::Conv2d;
use super::norm::{GroupNorm, LayerNorm};
use crate::adapter::AdaptedLinear;
use crate::error::Result;
use crate::linear::FrozenLinear;
use crate::model::weights::Weights;

/// The prefix of adapter-facing names: `unet.` + the diffusers module path.
pub const NAME_PREFIX: &str = "unet.";

pub(crate) struct Loader<'a> {
    w: &'a Weights,
    dtype: DType,
    device: &'a Device,
    pub read: BTreeSet<String>,
    /// Elements loaded.
    pub count: usize,
    /// The resnets' GroupNorm settings (`norm_num_groups`, `norm_eps`).
    pub cfg_groups: usize,
    pub cfg_eps: f64,
}

impl<'a> Loader<'a> {
    pub fn new(
        w: &'a Weights,
        dtype: DType,
        device: &'a Device,
        cfg_groups: usize,
        cfg_eps: f64,
    ) -> Self {
        Self {
            w,
            dtype,
            device,
            read: BTreeSet::new(),
            count: 0,
            cfg_groups,
            cfg_eps,
        }
    }

    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.w.get_shaped(name, shape, self.dtype, self.device)?;
        self.read.insert(name.to_string());
        self.count += t.elem_count();
        Ok(t)
    }

    pub fn conv(
        &mut self,
        p: &str,
        c_out: usize,
        c_in: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Conv2d> {
        Ok(Conv2d::new(
            self.tensor(&format!("{p}.weight"), &[c_out, c_in, k, k])?,
            Some(self.tensor(&format!("{p}.bias"), &[c_out])?),
            stride,
            padding,
        ))
    }

    /// A norm's weight and bias, kept in f32 for a half-precision model: the form both the
    /// fused norms and the composed ones compute in, converted once here instead of at every
    /// call.
    fn norm_affine(&mut self, p: &str, c: usize) -> Result<(Tensor, Tensor)> {
        let f32_of = |t: Tensor| -> Result<Tensor> {
            Ok(match t.dtype() {
                DType::BF16 | DType::F16 => t.to_dtype(DType::F32)?,
                _ => t,
            })
        };
        Ok((
            f32_of(self.tensor(&format!("{p}.weight"), &[c])?)?,
            f32_of(self.tensor(&format!("{p}.bias"), &[c])?)?,
        ))
    }

    pub fn group_norm(&mut self, p: &str, c: usize, groups: usize, eps: f64) -> Result<GroupNorm> {
        let (w, b) = self.norm_affine(p, c)?;
        Ok(GroupNorm::new(w, b, groups, eps))
    }

    pub fn layer_norm(&mut self, p: &str, d: usize, eps: f64) -> Result<LayerNorm> {
        let (w, b) = self.norm_affine(p, d)?;
        Ok(LayerNorm::new(w, b, eps))
    }

    pub fn frozen_linear(&mut self, p: &str, d_out: usize, d_in: usize) -> Result<FrozenLinear> {
        Ok(FrozenLinear::new(
            self.tensor(&format!("{p}.weight"), &[d_out, d_in])?,
            Some(self.tensor(&format!("{p}.bias"), &[d_out])?),
        ))
    }

    /// A 1×1 convolution (d_out, d_in, 1, 1) as the linear layer it is on (…, d_in) rows.
    pub fn pointwise_conv(&mut self, p: &str, d_out: usize, d_in: usize) -> Result<FrozenLinear> {
        let w = self.tensor(&format!("{p}.weight"), &[d_out, d_in, 1, 1])?;
        Ok(FrozenLinear::new(
            w.reshape((d_out, d_in))?,
            Some(self.tensor(&format!("{p}.bias"), &[d_out])?),
        ))
    }

    /// A linear layer adapters can go on, named [`NAME_PREFIX`] + `p`.
    pub fn adapted(
        &mut self,
        p: &str,
        d_out: usize,
        d_in: usize,
        bias: bool,
    ) -> Result<AdaptedLinear> {
        let weight = self.tensor(&format!("{p}.weight"), &[d_out, d_in])?;
        let bias = if bias {
            Some(self.tensor(&format!("{p}.bias"), &[d_out])?)
        } else {
            None
        };
        Ok(AdaptedLinear::new(
            format!("{NAME_PREFIX}{p}"),
            FrozenLinear::new(weight, bias),
        ))
    }
}
