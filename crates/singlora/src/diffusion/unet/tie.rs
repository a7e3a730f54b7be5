//! Computations that run outside candle's autograd, tied back to their inputs by one op whose
//! backward is written out.
//!
//! candle's autograd records every op of a forward and, in the backward, gives each recorded
//! input a zero-filled gradient to add into; on (batch × positions × channels)-sized tensors
//! those fills and adds cost as much as the layers' own work. A block that runs on detached
//! tensors and is tied to its input by [`tie`] (input gradient only) or [`tie_params`] (input
//! gradient and the gradients of a few small trainable tensors) leaves one recorded op.

use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::error::{Error, Result};

/// The input gradient of a computation that ran outside autograd, on a detached input: what
/// [`tie`] gives the input in the backward.
pub(crate) trait InputGradient: Send + Sync + 'static {
    /// The op's name.
    const NAME: &'static str;
    /// What the kernel profile files the backward's time under.
    const PROFILE_LABEL: &'static str;
    /// The gradient of the input `x` for the output gradient `g` (contiguous).
    fn input_grad(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor>;
}

/// `y`, computed from a detached `x`, tied back to `x` for autograd by one op: its forward
/// passes `y` through (a copy), its backward gives `x` the gradient `grad` computes.
pub(crate) fn tie<G: InputGradient>(
    x: &Tensor,
    y: &Tensor,
    grad: G,
) -> candle_core::Result<Tensor> {
    x.apply_op2(y, Tied(grad))
}

struct Tied<G>(G);

impl<G: InputGradient> CustomOp2 for Tied<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        crate::ops::pass_through(y, ly)
    }

    fn cuda_fwd(
        &self,
        _x: &CudaStorage,
        _lx: &Layout,
        y: &CudaStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        crate::ops::pass_through(y, ly)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        crate::ops::mark_backward_start(x.device())?;
        let dx = self.0.input_grad(x, &g.contiguous()?)?;
        crate::ops::mark_on(x.device(), G::PROFILE_LABEL).map_err(candle_core::Error::wrap)?;
        Ok((Some(dx), None))
    }
}

/// The gradients of a computation that ran outside autograd on a detached input and detached
/// copies of a few small tensors (adapter variables): what [`tie_params`] gives them.
pub(crate) trait ParamsGradient: Send + Sync + 'static {
    /// The op's name.
    const NAME: &'static str;
    /// What the kernel profile files the backward's time under.
    const PROFILE_LABEL: &'static str;
    /// The gradient of the input `x` for the output gradient `g` (contiguous), and the
    /// gradients of the tensors passed to [`tie_params`], in their order and shapes.
    fn grads(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<(Tensor, Vec<Tensor>)>;
}

/// `y`, computed from a detached `x` and detached copies of `params`, tied back to both for
/// autograd: `params` are flattened into one vector (one small recorded concatenation), and
/// one op passes `y` through; its backward gives `x` and each of `params` the gradients
/// `grad` computes. Without `params` this is [`tie`].
pub(crate) fn tie_params<G: ParamsGradient>(
    x: &Tensor,
    params: &[Tensor],
    y: &Tensor,
    grad: G,
) -> Result<Tensor> {
    if params.windows(2).any(|w| w[0].dtype() != w[1].dtype()) {
        return Err(Error::msg(format!(
            "{}: the tied tensors are not all of one type",
            G::NAME
        )));
    }
    let flat = params
        .iter()
        .map(|p| p.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let shapes = params.iter().map(|p| p.shape().clone()).collect();
    let packed = match flat.len() {
        0 => Tensor::zeros(1, x.dtype(), x.device())?,
        _ => Tensor::cat(&flat, 0)?,
    };
    Ok(x.apply_op3(&packed, y, TiedParams { grad, shapes })?)
}

struct TiedParams<G> {
    grad: G,
    shapes: Vec<Shape>,
}

impl<G: ParamsGradient> CustomOp3 for TiedParams<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        _p: &CpuStorage,
        _lp: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        crate::ops::pass_through(y, ly)
    }

    fn cuda_fwd(
        &self,
        _x: &CudaStorage,
        _lx: &Layout,
        _p: &CudaStorage,
        _lp: &Layout,
        y: &CudaStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        crate::ops::pass_through(y, ly)
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _y: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::ops::mark_backward_start(x.device())?;
        let (dx, dp) = self.grad.grads(x, &g.contiguous()?)?;
        if dp.len() != self.shapes.len() || dp.iter().zip(&self.shapes).any(|(d, s)| d.shape() != s)
        {
            candle_core::bail!(
                "{}: the backward gave gradients of shapes {:?} for tensors of shapes {:?}",
                G::NAME,
                dp.iter().map(|d| d.dims().to_vec()).collect::<Vec<_>>(),
                self.shapes
            );
        }
        let dp = match dp.len() {
            0 => None,
            _ => {
                let flat = dp
                    .iter()
                    .map(|d| d.to_dtype(packed.dtype())?.flatten_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(Tensor::cat(&flat, 0)?)
            }
        };
        crate::ops::mark_on(x.device(), G::PROFILE_LABEL).map_err(candle_core::Error::wrap)?;
        Ok((Some(dx), dp, None))
    }
}
