//! Rows widened with zeros or cut short, as one op each way: x seen as rows of `from` values
//! becomes rows of `to` values, each row's first min(from, to) values kept and the rest zero.
//! The attention kernels' head padding (heads of 40 laid out as 48 or 64 wide) is this op on
//! (b, t, heads·d): recorded as reshapes and a concatenation with zeros (and a narrow back),
//! each of those ops would give its input a zero-filled gradient to add into.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! let x = Var::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
//! let y = singlora::ops::rows::resize_rows(&x, 2, 3)?;
//! assert_eq!(y.to_vec2::<f32>()?, vec![vec![1., 2., 0.], vec![3., 4., 0.]]);
//! let g = y.sum_all()?.backward()?;
//! assert_eq!(g.get(&x).unwrap().to_vec2::<f32>()?, vec![vec![1., 1.], vec![1., 1.]]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Tensor};

use crate::error::{Error, Result};

/// `x` (.., w) with w a multiple of `from`, as rows of `from` values, each row written as `to`
/// values: (.., w / from · to). Its gradient is the same op the other way.
pub fn resize_rows(x: &Tensor, from: usize, to: usize) -> Result<Tensor> {
    let w = x.dims().last().copied().unwrap_or(0);
    if from == 0 || to == 0 || w % from != 0 {
        return Err(Error::msg(format!(
            "resize rows: a last dimension of {w} is not made of rows of {from}"
        )));
    }
    if from == to {
        return Ok(x.clone());
    }
    Ok(x.contiguous()?.apply_op1(ResizeRows { from, to })?)
}

struct ResizeRows {
    from: usize,
    to: usize,
}

impl ResizeRows {
    fn run<S: BackendStorage, D: BackendDevice<Storage = S>>(
        &self,
        s: &S,
        l: &Layout,
        dev: &D,
    ) -> candle_core::Result<(S, Shape)> {
        if !l.is_contiguous() {
            candle_core::bail!("resize rows: the input is not contiguous");
        }
        let mut dims = l.dims().to_vec();
        let last = dims.last_mut().expect("checked by resize_rows");
        let rows = l.shape().elem_count() / self.from;
        *last = *last / self.from * self.to;
        let shape = Shape::from(dims);
        // widened rows keep zeros past their values; cut rows are written whole
        let mut out = match self.to > self.from {
            true => dev.zeros_impl(&shape, s.dtype())?,
            // SAFETY: the copy below writes every element (rows of `to` values, `to` ≤ `from`)
            false => unsafe { dev.alloc_uninit(&shape, s.dtype())? },
        };
        let n = self.from.min(self.to);
        s.copy2d(&mut out, rows, n, self.from, self.to, l.start_offset(), 0)?;
        Ok((out, shape))
    }
}

impl CustomOp1 for ResizeRows {
    fn name(&self) -> &'static str {
        "resize-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(s, l, &candle_core::cpu_backend::CpuDevice)
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.run(s, l, s.device())
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = ResizeRows {
            from: self.to,
            to: self.from,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Widening and cutting rows against the same done by reshapes, a concatenation with
    /// zeros and a narrow (f64): values and gradients, both ways, on a 3-D input.
    #[test]
    fn matches_pad_and_narrow() {
        let dev = Device::Cpu;
        let (b, t, heads) = (2, 3, 4);
        for (from, to) in [(5, 8), (8, 5), (3, 3)] {
            let x = Var::randn(0f64, 1.0, (b, t, heads * from), &dev).unwrap();
            let g = Tensor::randn(0f64, 1.0, (b, t, heads * to), &dev).unwrap();
            let y = resize_rows(&x, from, to).unwrap();
            let r = x.reshape((b, t, heads, from)).unwrap();
            let r = match to.cmp(&from) {
                std::cmp::Ordering::Greater => r.pad_with_zeros(3, 0, to - from).unwrap(),
                _ => r.narrow(3, 0, to).unwrap(),
            };
            let r = r.contiguous().unwrap().reshape((b, t, heads * to)).unwrap();
            let diff = |a: &Tensor, c: &Tensor| {
                let e = (a - c).unwrap().abs().unwrap().max_all().unwrap();
                e.to_scalar::<f64>().unwrap()
            };
            assert_eq!(diff(&y, &r), 0.0, "{from} -> {to}");
            let gy = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (r * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, c) = (gy.get(&x).unwrap(), gr.get(&x).unwrap());
            assert_eq!(diff(a, c), 0.0, "{from} -> {to} gradient");
            assert_eq!(a.dtype(), DType::F64);
        }
    }

    #[test]
    fn refuses_rows_that_do_not_divide() {
        let x = Tensor::zeros((2, 7), DType::F32, &Device::Cpu).unwrap();
        let e = resize_rows(&x, 3, 4).unwrap_err().to_string();
        assert!(e.contains("rows of 3"), "{e}");
    }
}
