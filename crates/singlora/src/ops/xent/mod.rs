//! Per-row cross-entropy of logits (n, C) against class indices, forward and backward in one
//! pass over the logits each on CUDA (the composed version upcasts to f32 and runs max, sub,
//! exp, sum, log and gather, each a pass over an (n, C) tensor and each with a backward). The
//! CPU runs the composed version ([`super::reference::nll`]). CUDA launchers in `cuda.rs`,
//! kernels in `xent.cu`.

use candle_core::{CustomOp2, CustomOp3, DType, Tensor};

use super::reference;
use crate::error::Result;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

/// Weighted mean cross-entropy of `logits` (n, C) against `targets` (n) u32; `weights` (n)
/// (1 for rows that count, 0 for padding) or None for all rows. Computed in f32 at least;
/// the rows fused where [`xent_fused`] says, composed elsewhere.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let nll = if xent_fused(logits) {
        xent_rows(logits, targets)?
    } else {
        reference::nll(logits, targets)?
    };
    reference::weighted_mean(&nll, weights)
}

/// Per-row negative log-likelihoods (n), without a graph (for evaluation).
pub fn nll_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    reference::nll(&logits.detach(), targets)
}

struct Xent;
struct XentBackward;

impl CustomOp2 for Xent {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    super::cpu_composed!(2, "cross-entropy");

    super::cuda_fwd!(|self, z, t| cuda::forward(z, t));

    fn bwd(
        &self,
        z: &Tensor,
        t: &Tensor,
        out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // (row gradient, lse) side by side for the kernel
        let lg = Tensor::cat(&[&g.narrow(1, 0, 1)?, &out.narrow(1, 1, 1)?], 1)?.contiguous()?;
        Ok((Some(z.apply_op3_no_bwd(t, &lg, &XentBackward)?), None))
    }
}

impl CustomOp3 for XentBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    super::cpu_composed!(3, "cross-entropy backward");

    super::cuda_fwd!(|self, z, t, g| cuda::backward(z, t, g));
}

/// Whether [`xent_rows`] runs fused for these logits.
pub fn xent_fused(logits: &Tensor) -> bool {
    super::cuda_kernels_for(logits) && logits.rank() == 2
}

/// −log softmax(logits)[target] per row (n) in f32, fused (CUDA only: see [`xent_fused`]).
pub fn xent_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let out = logits
        .contiguous()?
        .apply_op2(&targets.to_dtype(DType::U32)?.contiguous()?, Xent)?;
    Ok(out.narrow(1, 0, 1)?.squeeze(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::reference::tests::{check_grad, max_diff, randn, values};
    use candle_core::Device;

    #[test]
    fn matches_reference_and_differentiates() {
        let targets = Tensor::new(&[2u32, 0, 1], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f64, 0., 1.], &Device::Cpu).unwrap();
        let z = randn(&[3, 4]);
        for weights in [Some(&w), None] {
            let got = cross_entropy(&z, &targets, weights).unwrap();
            let want = reference::cross_entropy(&z, &targets, weights).unwrap();
            assert!(max_diff(&got, &want) < 1e-12);
            check_grad(&z, |z| cross_entropy(z, &targets, weights));
        }
        let rows = values(&nll_rows(&z, &targets).unwrap());
        let want = values(&reference::nll(&z, &targets).unwrap());
        assert_eq!(rows, want);
    }
}
