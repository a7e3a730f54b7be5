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
use super::tie::{tie, tracked, InputGradient};
use crate::error::Result;
use crate::linear::FrozenLinear;
use crate::ops::mark_on;

/// What the kernel profile files the blocks' norms and convolutions under (forward, backward).
const NORMS: [&str; 2] = [
    "unet: resnet, GroupNorm + SiLU",
    "backward: ResNet blocks, GroupNorm + SiLU",
];
const CONVS: [&str; 2] = [
    "unet: resnet, convolutions",
    "backward: ResNet blocks, convolutions",
];

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
        if tracked(x) && !t.track_op() {
            return self.forward_one_op(x, &t);
        }
        let h = self
            .conv1
            .forward_shifted(&self.norm1.forward_silu(x)?, Some(&t))?;
        self.tail(x, &h)
    }

    /// y = shortcut(x) + conv2(silu(norm2(h))).
    fn tail(&self, x: &Tensor, h: &Tensor) -> Result<Tensor> {
        let a = self.norm2.forward_silu(h)?;
        mark_on(a.device(), NORMS[0])?;
        let y = self.conv2.forward(&a)?;
        mark_on(y.device(), CONVS[0])?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + y)?)
    }

    /// The block computed outside autograd and tied to `x` by one op whose backward is written
    /// out ([`BlockGrad`]): candle's autograd would record the two norms, the convolutions and
    /// the residual add one by one and give each a zero-filled gradient to add into. The
    /// time embedding `t` takes no gradient here.
    fn forward_one_op(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let xd = x.detach();
        let a = self.norm1.forward_silu(&xd)?;
        mark_on(a.device(), NORMS[0])?;
        let h = self.conv1.forward_shifted(&a, Some(t))?;
        mark_on(h.device(), CONVS[0])?;
        let y = self.tail(&xd, &h)?;
        let grad = BlockGrad {
            block: self.clone(),
            h,
        };
        Ok(tie(x, &y, grad)?)
    }
}

/// The block's input gradient, for [`tie`]: the gradient of
///
/// y = shortcut(x) + conv2(silu(norm2(h))), h = conv1(silu(norm1(x))) + b1 + t:
///
/// dh = norm2ᵀ(conv2ᵀ(g)), dx = norm1ᵀ(conv1ᵀ(dh)) + shortcutᵀ(g), with convᵀ a convolution's
/// input gradient and normᵀ the GroupNorm + SiLU backward (statistics recomputed from its input).
struct BlockGrad {
    block: ResnetBlock,
    /// The input of norm2, kept from the forward.
    h: Tensor,
}

impl InputGradient for BlockGrad {
    const NAME: &'static str = "resnet-block";
    const PROFILE_LABEL: &'static str = "backward: ResNet blocks";

    fn input_grad(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        let b = &self.block;
        let wrap = candle_core::Error::wrap;
        let mark = |label| mark_on(x.device(), label).map_err(wrap);
        let (_, _, xh, xw) = x.dims4()?;
        let (_, _, hh, hw) = self.h.dims4()?;
        let da2 = b.conv2.input_grad((hh, hw), g)?;
        mark(CONVS[1])?;
        let dh = b.norm2.backward_silu(&self.h, &da2).map_err(wrap)?;
        mark(NORMS[1])?;
        let da1 = b.conv1.input_grad((xh, xw), &dh)?;
        mark(CONVS[1])?;
        let dx = b.norm1.backward_silu(&x.detach(), &da1).map_err(wrap)?;
        mark(NORMS[1])?;
        match &b.conv_shortcut {
            Some(c) => dx + c.input_grad((xh, xw), g)?,
            None => dx + g,
        }
    }
}
