//! The residual block of the U-Net (diffusers' `ResnetBlock2D`, time embedding added):
//!
//! h = conv1(silu(norm1(x))) + time_emb_proj(silu(emb))[:, :, None, None]
//! (silu(emb) is the same for every block: the caller computes it once)
//! y = shortcut(x) + conv2(silu(norm2(h)))
//!
//! convs 3×3 (padding 1), norms GroupNorm, shortcut a 1×1 conv where the channels change.

use candle_core::Tensor;

use super::conv::Conv2d;
use super::load::Loader;
use super::norm::GroupNorm;
use crate::error::Result;
use crate::linear::FrozenLinear;

#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: FrozenLinear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub(crate) fn load(
        ld: &mut Loader,
        p: &str,
        c_in: usize,
        c_out: usize,
        temb: usize,
    ) -> Result<Self> {
        let (groups, eps) = (ld.cfg_groups, ld.cfg_eps);
        Ok(Self {
            norm1: ld.group_norm(&format!("{p}.norm1"), c_in, groups, eps)?,
            conv1: ld.conv(&format!("{p}.conv1"), c_out, c_in, 3, 1, 1)?,
            time_emb_proj: ld.frozen_linear(&format!("{p}.time_emb_proj"), c_out, temb)?,
            norm2: ld.group_norm(&format!("{p}.norm2"), c_out, groups, eps)?,
            conv2: ld.conv(&format!("{p}.conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut: if c_in != c_out {
                Some(ld.conv(&format!("{p}.conv_shortcut"), c_out, c_in, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    /// `x` (b, c_in, h, w), `emb_act` = silu(emb) (b, temb) → (b, c_out, h, w).
    pub fn forward(&self, x: &Tensor, emb_act: &Tensor) -> Result<Tensor> {
        let t = self.time_emb_proj.forward(emb_act)?;
        let h = self
            .conv1
            .forward_shifted(&self.norm1.forward_silu(x)?, Some(&t))?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}
