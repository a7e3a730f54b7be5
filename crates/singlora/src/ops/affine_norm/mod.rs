//! Normalisation with a frozen per-channel affine as one CUDA op each way: GroupNorm of
//! (b, c, h, w) (optionally followed by SiLU, as in a ResNet block) and LayerNorm over the last
//! axis, the U-Net's norms. Rows of n elements, each normalised by its own mean and σ; element
//! j of row r belongs to channel (r mod groups)·(channels a row) + j / (elements a channel):
//!
//! y = act(x̂·w_c + b_c), x̂ = (x − μ)/√(var + ε);
//! dx = (ĝ − mean ĝ − x̂·mean(ĝ⊙x̂))/σ, ĝ = w_c·dz, dz = g (or g·SiLU′(z) for act = SiLU).
//!
//! The backward recomputes the row statistics (and z) from x. Kernels in `affine_norm.cu`; on
//! the CPU and for other dtypes the callers compose candle's ops (the U-Net's `GroupNorm` and
//! `LayerNorm` keep those as their references).

use candle_core::{CustomOp1, CustomOp2, DType, Tensor};

use crate::error::Result;

#[cfg(feature = "cuda")]
mod cuda;

#[derive(Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AffineNorm {
    /// Per-channel weight and bias, f32 on the input's device.
    w: Tensor,
    b: Tensor,
    /// Elements a row, groups (rows cycle through them), channels a row, elements a channel.
    n: usize,
    groups: usize,
    cpr: usize,
    hw: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp1 for AffineNorm {
    fn name(&self) -> &'static str {
        "affine-norm"
    }

    super::cpu_composed!(1, "affine norm");

    super::cuda_fwd!(|self, x| cuda::forward(x, self));

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        super::mark_backward_start(x.device())?;
        let dx = x.apply_op2_no_bwd(&g.contiguous()?, &AffineNormBackward(self.clone()))?;
        super::mark_on(x.device(), "backward: GroupNorm, LayerNorm")
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(dx))
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AffineNormBackward(AffineNorm);

impl CustomOp2 for AffineNormBackward {
    fn name(&self) -> &'static str {
        "affine-norm-backward"
    }

    super::cpu_composed!(2, "affine norm backward");

    super::cuda_fwd!(|self, x, g| cuda::backward(x, g, &self.0));
}

/// GroupNorm of `x` (b, c, h, w) in `groups` groups with the per-channel `w`, `b` (c), then
/// SiLU when `silu`: None where the fused kernels do not take `x` (not CUDA f32/bf16).
pub fn group_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !super::cuda_kernels_for(x) {
        return Ok(None);
    }
    let op = group_op(x, (w, b), groups, eps, silu)?;
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// The input gradient of [`group_norm`] at `x` for the output gradient `g`, by the fused
/// backward kernel (the statistics recomputed from `x`): None where the fused kernels do not
/// take `x`.
pub fn group_norm_backward(
    x: &Tensor,
    g: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !super::cuda_kernels_for(x) {
        return Ok(None);
    }
    let op = group_op(x, (w, b), groups, eps, silu)?;
    backward_of(op, x, g, "group norm").map(Some)
}

/// The fused backward kernel of `op` at `x` for the output gradient `g` (of x's shape).
fn backward_of(op: AffineNorm, x: &Tensor, g: &Tensor, what: &str) -> Result<Tensor> {
    if g.dims() != x.dims() {
        return Err(crate::Error::msg(format!(
            "{what} backward: gradient {:?} for {:?}",
            g.dims(),
            x.dims()
        )));
    }
    Ok(x.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &AffineNormBackward(op))?)
}

/// The GroupNorm op for `x` (b, c, h, w): the channels checked against the groups and the
/// affine, rows of a group's (c / groups)·h·w elements.
fn group_op(
    x: &Tensor,
    (w, b): (&Tensor, &Tensor),
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<AffineNorm> {
    let (_, c, h, wd) = x.dims4()?;
    if groups == 0 || c % groups != 0 || w.elem_count() != c || b.elem_count() != c {
        return Err(crate::Error::msg(format!(
            "group norm: {c} channels in {groups} groups with {} weights and {} biases",
            w.elem_count(),
            b.elem_count()
        )));
    }
    let cpr = c / groups;
    op_of((w, b), (cpr * h * wd, groups, cpr, h * wd), eps, silu)
}

/// LayerNorm of `x` over its last axis (d) with `w`, `b` (d): None where the fused kernels do
/// not take `x` (not CUDA f32/bf16).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !super::cuda_kernels_for(x) {
        return Ok(None);
    }
    let op = layer_op(x, (w, b), eps)?;
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// The LayerNorm op for `x`: its last axis checked against the affine, rows of that axis.
fn layer_op(x: &Tensor, (w, b): (&Tensor, &Tensor), eps: f64) -> Result<AffineNorm> {
    let d = *x.dims().last().unwrap_or(&0);
    if d == 0 || w.elem_count() != d || b.elem_count() != d {
        return Err(crate::Error::msg(format!(
            "layer norm: {d} features with {} weights and {} biases",
            w.elem_count(),
            b.elem_count()
        )));
    }
    op_of((w, b), (d, 1, d, 1), eps, false)
}

/// The input gradient of [`layer_norm`] at `x` for the output gradient `g`, by the fused
/// backward kernel: None where the fused kernels do not take `x`.
pub fn layer_norm_backward(
    x: &Tensor,
    g: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    if !super::cuda_kernels_for(x) {
        return Ok(None);
    }
    let op = layer_op(x, (w, b), eps)?;
    backward_of(op, x, g, "layer norm").map(Some)
}

/// The op's parameters: the affine as f32, rows of `n` elements, `groups` groups, `cpr`
/// channels a row, `hw` elements a channel.
fn op_of(
    (w, b): (&Tensor, &Tensor),
    (n, groups, cpr, hw): (usize, usize, usize, usize),
    eps: f64,
    silu: bool,
) -> Result<AffineNorm> {
    Ok(AffineNorm {
        w: w.to_dtype(DType::F32)?.contiguous()?,
        b: b.to_dtype(DType::F32)?.contiguous()?,
        n,
        groups,
        cpr,
        hw,
        eps,
        silu,
    })
}
