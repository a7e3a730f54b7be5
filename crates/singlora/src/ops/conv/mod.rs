//! 2-D convolution by a frozen kernel, no autograd (the U-Net's convolutions and their input
//! gradients, `diffusion::unet::conv`): on CUDA, im2col into a (c_in·k·k) × (h_out·w_out)
//! matrix per image (`conv.cu`), then one strided-batched cuBLAS GEMM for the batch,
//! W (c_out × c_in·k·k) · col, whose output is already NCHW; a 1×1, stride-1, unpadded
//! convolution is the GEMM on the input itself. candle's CUDA convolution builds its im2col
//! matrix the other way round (pixels by taps, uncoalesced) and transposes its output back to
//! NCHW in one more pass. Elsewhere (the CPU, other dtypes, non-square kernels) this is
//! candle's `conv2d`. On CUDA, where libcudnn is found at run time, [`input_grad`] is cuDNN's
//! (`cudnn.rs`).

use candle_core::Tensor;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cudnn;

/// cuDNN's version (e.g. 91002 for 9.10.2) where CUDA convolutions' input gradients take
/// cuDNN's path (it was found and is switched on); `None` where they take the built-in one.
pub fn cudnn_version() -> Option<usize> {
    #[cfg(feature = "cuda")]
    return cudnn::version();
    #[cfg(not(feature = "cuda"))]
    None
}

/// Switches cuDNN's path for CUDA convolutions' input gradients on (the default, where cuDNN
/// is found) or off, for this process; no effect without CUDA.
pub fn set_cudnn(on: bool) {
    #[cfg(feature = "cuda")]
    cudnn::set_enabled(on);
    let _ = on;
}

/// `W ⋆ x`: x (b, c_in, h, w), W (c_out, c_in, k, k), zero padding `padding`, `stride`,
/// dilation 1, one group, no bias.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let (_, _, kh, kw) = w.dims4()?;
        let supported = matches!(
            x.dtype(),
            candle_core::DType::BF16 | candle_core::DType::F32
        ) && x.dtype() == w.dtype()
            && kh == kw
            && stride > 0;
        if x.device().is_cuda() && supported {
            let op = Conv { padding, stride };
            return x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op);
        }
    }
    x.conv2d(w, padding, stride, 1, 1)
}

/// The input gradient (b, c_in, h, w) of `W ⋆ x` for an input of side `(h, w)` and the output
/// gradient `g` (b, c_out, h_out, w_out), where cuDNN computes it in one call (CUDA, bf16 or
/// f32, square kernel, cuDNN found); `None` elsewhere (the caller builds it from [`conv2d`]).
pub fn input_grad(
    g: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    (h, wd): (usize, usize),
) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = g.device() {
        let (co, c, kh, kw) = w.dims4()?;
        let (b, _, _, _) = g.dims4()?;
        let bf16 = match g.dtype() {
            candle_core::DType::BF16 => true,
            candle_core::DType::F32 => false,
            _ => return Ok(None),
        };
        let shape = cudnn::ConvShape {
            b,
            c,
            h,
            w: wd,
            co,
            k: kh,
            padding,
            stride,
        };
        let fits = kh == kw
            && stride > 0
            && h + 2 * padding >= kh
            && wd + 2 * padding >= kh
            && w.dtype() == g.dtype();
        if fits && cudnn::takes_input_grad(dev, bf16, shape) {
            let op = InputGrad(shape);
            return Ok(Some(
                g.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op)?,
            ));
        }
    }
    let _ = (g, w, padding, stride, h, wd);
    Ok(None)
}

/// W (c_out, c_in, k, k) → (c_in, c_out, k, k) with the taps reversed along both axes: the
/// kernel whose convolution of an output gradient is the input gradient (stride 1). One kernel
/// on CUDA; elsewhere a transpose and two index selections.
pub fn flipped(w: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    #[cfg(feature = "cuda")]
    if w.device().is_cuda()
        && matches!(
            w.dtype(),
            candle_core::DType::BF16 | candle_core::DType::F32
        )
        && kh == kw
    {
        return w.contiguous()?.apply_op1_no_bwd(&Flip);
    }
    let w = w.transpose(0, 1)?.contiguous()?;
    if kh == 1 && kw == 1 {
        return Ok(w);
    }
    let rev = |k: usize| Tensor::from_vec((0..k as u32).rev().collect::<Vec<_>>(), k, w.device());
    w.index_select(&rev(kh)?, 2)?.index_select(&rev(kw)?, 3)
}

#[cfg(feature = "cuda")]
struct Flip;

#[cfg(feature = "cuda")]
impl candle_core::CustomOp1 for Flip {
    fn name(&self) -> &'static str {
        "conv-kernel-flip"
    }

    super::cpu_composed!(1, "conv kernel flip");

    super::cuda_fwd!(|self, w| cuda::flip(w));
}

#[cfg(feature = "cuda")]
struct Conv {
    padding: usize,
    stride: usize,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    super::cpu_composed!(2, "conv2d");

    super::cuda_fwd!(|self, x, w| cuda::forward(x, w, self.padding, self.stride));
}

#[cfg(feature = "cuda")]
struct InputGrad(cudnn::ConvShape);

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv2d-input-grad-cudnn"
    }

    super::cpu_composed!(2, "conv2d input gradient");

    super::cuda_fwd!(|self, g, w| cuda::input_grad_cudnn(g, w, self.0));
}
