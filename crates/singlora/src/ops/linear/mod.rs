//! The adapted linear layer as one op: y = x·W0ᵀ + b + c·(x·D)·Uᵀ.
//!
//! D (d_in × r) and U (d_out × r) are the adapter's factors: SingLoRA D = A_in, U = A_out,
//! c = s·u; LoRA D = Aᵀ, U = B, c = s. The bias is written first and both products accumulate
//! into the same output (GEMM with β = 1), so no d_out-wide temporary is formed and no
//! separate add passes run. Backward, with g = ∂L/∂y and g_U = g·U:
//! dx = g·W0 + c·g_U·Dᵀ (again one output), dD = c·xᵀ·g_U, dU = c·gᵀ·(x·D); W0 and b, frozen,
//! get nothing. CPU kernels call the `gemm` crate directly; CUDA calls cuBLAS (bf16 or f32
//! storage, f32 accumulation, the scale c applied in f32 as GEMM's α); other devices use the
//! composed path of [`crate::adapter::AdaptedLinear`]. CUDA forms in `cuda.rs`, its kernels in
//! `linear.cu`.

use candle_core::backend::BackendStorage;
use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, WithDType,
};

use super::cpu_gemm::{gemm_at, View};
use super::{dispatch_float, filled_vec, host_vec, Real};
use crate::error::Result;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

fn view<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<(View<T>, &'a [T])> {
    let data = T::cpu_storage_as_slice(s)?;
    let st = l.stride();
    if st.len() != 2 {
        candle_core::bail!("fused linear: 2-D operands expected, got {:?}", l.dims());
    }
    let v = View {
        ptr: data[l.start_offset()..].as_ptr(),
        rs: st[0] as isize,
        cs: st[1] as isize,
    };
    Ok((v, data))
}

/// dst (m × n, row-major) ← [dst +] beta·lhs·rhs.
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: Real + 'static>(
    dst: &mut [T],
    m: usize,
    n: usize,
    k: usize,
    lhs: View<T>,
    rhs: View<T>,
    beta: T,
    accumulate: bool,
) {
    assert!(dst.len() >= m * n);
    // SAFETY: dst holds m×n elements at row stride n.
    unsafe {
        gemm_at(
            dst.as_mut_ptr(),
            n,
            (m, n, k),
            lhs,
            rhs,
            beta,
            accumulate,
            true,
        )
    }
}

/// Runs `f` with a gemm view of the frozen weight (d_out × d_in, row-major), copying it to the
/// host dtype only when it is stored otherwise.
fn with_w0<T: Real + 'static>(w0: &Tensor, f: impl FnOnce(View<T>)) -> candle_core::Result<()> {
    let (storage, layout) = w0.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) if s.dtype() == T::DTYPE => f(view::<T>(s, layout)?.0),
        _ => {
            let k = w0.dims()[1];
            let w = host_vec::<T>(w0)?;
            f(View {
                ptr: w.as_ptr(),
                rs: k as isize,
                cs: 1,
            });
        }
    }
    Ok(())
}

/// An m × n output, each row holding the bias if there is one; returns whether it did (then
/// the GEMMs accumulate into it).
fn output_with_bias<T: Real>(
    m: usize,
    n: usize,
    bias: Option<&Tensor>,
) -> candle_core::Result<(Vec<T>, bool)> {
    match bias {
        Some(b) => {
            let b = host_vec::<T>(b)?;
            let mut y = Vec::with_capacity(m * n);
            for _ in 0..m {
                y.extend_from_slice(&b);
            }
            Ok((y, true))
        }
        None => Ok((vec![T::zero(); m * n], false)),
    }
}

#[derive(Clone)]
struct AdaptedMatmul {
    w0: Tensor,
    bias: Option<Tensor>,
    c: f64,
}

impl AdaptedMatmul {
    fn fwd<T: Real + 'static>(
        &self,
        x: (&CpuStorage, &Layout),
        d: (&CpuStorage, &Layout),
        u: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = x.1.shape().dims2()?;
        let (n, k2) = self.w0.dims2()?;
        let r = d.1.dims()[1];
        if k != k2 || d.1.dims() != [k, r] || u.1.dims() != [n, r] {
            candle_core::bail!(
                "fused linear: x {:?}, W0 {:?}, D {:?}, U {:?} do not fit",
                x.1.dims(),
                self.w0.dims(),
                d.1.dims(),
                u.1.dims()
            );
        }
        let (xv, _) = view::<T>(x.0, x.1)?;
        let (dv, _) = view::<T>(d.0, d.1)?;
        let (uv, _) = view::<T>(u.0, u.1)?;
        let (mut y, has_bias) = output_with_bias::<T>(m, n, self.bias.as_ref())?;
        self.base_product(&mut y, m, n, k, xv, has_bias)?;
        if self.c != 0.0 {
            let mut h = vec![T::zero(); m * r];
            gemm_into(&mut h, m, r, k, xv, dv, T::one(), false);
            let hv = View {
                ptr: h.as_ptr(),
                rs: r as isize,
                cs: 1,
            };
            gemm_into(&mut y, m, n, r, hv, uv.t(), T::from(self.c).unwrap(), true);
        }
        Ok((T::to_cpu_storage_owned(y), Shape::from((m, n))))
    }

    /// y (+)= x·W0ᵀ.
    fn base_product<T: Real + 'static>(
        &self,
        y: &mut [T],
        m: usize,
        n: usize,
        k: usize,
        xv: View<T>,
        accumulate: bool,
    ) -> candle_core::Result<()> {
        with_w0::<T>(&self.w0, |wv| {
            gemm_into(y, m, n, k, xv, wv.t(), T::one(), accumulate)
        })
    }
}

impl CustomOp3 for AdaptedMatmul {
    fn name(&self) -> &'static str {
        "adapted-linear"
    }

    super::cpu_fwd!(|self, (s1, l1), (s2, l2), (s3, l3)| {
        let rows = as_rows(l1)?;
        let (y, _) = dispatch_float!(s1, "fused linear", |T| self.fwd::<T>(
            (s1, &rows),
            (s2, l2),
            (s3, l3)
        ))?;
        Ok((y, self.out_shape(l1)))
    });

    super::cuda_fwd!(|self, x, d, u| {
        let rows = as_rows(x.1)?;
        let (y, _) = cuda::adapted_fwd(self, (x.0, &rows), Some((d, u)))?;
        Ok((y, self.out_shape(x.1)))
    });

    fn bwd(
        &self,
        x: &Tensor,
        d: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        super::mark_backward_start(x.device())?;
        let (x2, g2) = (flat_rows(x)?, flat_rows(&g.contiguous()?)?);
        let (dx, d_d, d_u) = self.grads(&x2, d, u, &g2, x.track_op())?;
        let dx = dx.map(|dx| dx.reshape(x.dims())).transpose()?;
        super::mark_on(x.device(), "backward: adapted linear layers")
            .map_err(candle_core::Error::wrap)?;
        Ok((dx, Some(d_d), Some(d_u)))
    }
}

/// A contiguous layout (.., k) as the 2-D layout (rows, k) of the same elements: the linear
/// ops take any number of leading dimensions, so that their callers need no recorded reshapes.
fn as_rows(l: &Layout) -> candle_core::Result<Layout> {
    let k = l.dims().last().copied().unwrap_or(1);
    if !l.is_contiguous() || l.dims().is_empty() || k == 0 {
        candle_core::bail!(
            "fused linear: input {:?} is not a contiguous (.., k)",
            l.dims()
        );
    }
    Ok(Layout::contiguous_with_offset(
        (l.shape().elem_count() / k, k),
        l.start_offset(),
    ))
}

/// `x` (.., k) as a 2-D (rows, k) view, outside autograd.
fn flat_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let k = x.dims().last().copied().unwrap_or(1);
    x.detach().reshape((x.elem_count() / k.max(1), k))
}

impl AdaptedMatmul {
    /// The output's shape for an input of layout `l`: (.., n).
    fn out_shape(&self, l: &Layout) -> Shape {
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.w0.dims()[0];
        }
        Shape::from(dims)
    }

    /// dx (when `input_grad`), dD and dU of y = x·W0ᵀ + b + c·(x·D)·Uᵀ for the output
    /// gradient `g`, all (m, ·) 2-D: dx = g·W0 + c·(g·U)·Dᵀ in one op, dD = c·xᵀ·(g·U),
    /// dU = c·gᵀ·(x·D).
    fn grads(
        &self,
        x: &Tensor,
        d: &Tensor,
        u: &Tensor,
        g: &Tensor,
        input_grad: bool,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
        let g = g.contiguous()?;
        let g_u = g.matmul(u)?; // (m, r)
        let dx = if input_grad {
            Some(g.apply_op3_no_bwd(
                &g_u,
                d,
                &InputGrad {
                    op: self.clone(),
                    second: Second::GU,
                },
            )?)
        } else {
            None
        };
        let d_d = (x.t()?.matmul(&g_u)? * self.c)?;
        let h = x.matmul(d)?;
        let d_u = (g.t()?.matmul(&h)? * self.c)?;
        Ok((dx, d_d, d_u))
    }
}

/// The gradients of [`adapted_linear`] (bias aside) outside autograd, for a backward written
/// out by hand: (dx, dD, dU) of y = x·W0ᵀ + c·(x·D)·Uᵀ at 2-D `x` for the output gradient
/// `g`, through the same ops as the op's own backward.
pub fn adapted_linear_grads(
    x: &Tensor,
    w0: &Tensor,
    d: &Tensor,
    u: &Tensor,
    c: f64,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = AdaptedMatmul {
        w0: w0.clone(),
        bias: None,
        c,
    };
    let (dx, d_d, d_u) = op.grads(&x.contiguous()?, d, u, g, true)?;
    let dx = dx.ok_or_else(|| crate::Error::msg("adapted linear: no input gradient"))?;
    Ok((dx, d_d, d_u))
}

/// dx = g·W0 + c·g_U·Dᵀ into one buffer, for the adapted linear op it holds, with the op's
/// second operand g_U itself or U (then g_U = g·U is formed inside).
struct InputGrad {
    op: AdaptedMatmul,
    second: Second,
}

/// What [`InputGrad`]'s second operand is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Second {
    /// g_U = g·U (m × r)
    GU,
    /// U (d_out × r)
    U,
}

impl InputGrad {
    fn run<T: Real + 'static>(
        &self,
        g: (&CpuStorage, &Layout),
        second: (&CpuStorage, &Layout),
        d: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let AdaptedMatmul { w0, c, .. } = &self.op;
        let (m, n) = g.1.shape().dims2()?;
        let (_, k) = w0.dims2()?;
        let r = second.1.dims()[1];
        let (gv, _) = view::<T>(g.0, g.1)?;
        let (sv, _) = view::<T>(second.0, second.1)?;
        let (dv, _) = view::<T>(d.0, d.1)?;
        let mut w0_result = Ok(());
        // SAFETY: the GEMM without accumulation writes all m × k elements (row stride k).
        let mut dx = unsafe {
            filled_vec::<T>(m * k, |dx| {
                w0_result = with_w0::<T>(w0, |wv| {
                    gemm_at(
                        dx.as_mut_ptr().cast(),
                        k,
                        (m, k, n),
                        gv,
                        wv,
                        T::one(),
                        false,
                        true,
                    )
                })
            })
        };
        w0_result?;
        if *c != 0.0 {
            let gu = match self.second {
                Second::GU => None,
                Second::U => {
                    let mut gu = vec![T::zero(); m * r];
                    gemm_into(&mut gu, m, r, n, gv, sv, T::one(), false);
                    Some(gu)
                }
            };
            let guv = gu.as_ref().map_or(sv, |gu| View::rows(gu.as_ptr(), r));
            gemm_into(&mut dx, m, k, r, guv, dv.t(), T::from(*c).unwrap(), true);
        }
        Ok((T::to_cpu_storage_owned(dx), Shape::from((m, k))))
    }
}

impl CustomOp3 for InputGrad {
    fn name(&self) -> &'static str {
        "adapted-linear-input-grad"
    }

    super::cuda_fwd!(|self, g, second, d| cuda::input_grad(self, g, second, d));

    super::cpu_fwd!(|self, (s1, l1), (s2, l2), (s3, l3)| {
        dispatch_float!(s1, "fused linear backward", |T| self.run::<T>(
            (s1, l1),
            (s2, l2),
            (s3, l3)
        ))
    });
}

/// dx = g·W0 + c·(g·U)·Dᵀ of y = x·W0ᵀ + b + c·(x·D)·Uᵀ for the output gradient `g` (2-D),
/// one op outside autograd (g·U formed inside), on the CPU (f32/f64) and CUDA (f32/bf16).
pub fn adapted_linear_input_grad(
    g: &Tensor,
    w0: &Tensor,
    d: &Tensor,
    u: &Tensor,
    c: f64,
) -> Result<Tensor> {
    let op = InputGrad {
        op: AdaptedMatmul {
            w0: w0.clone(),
            bias: None,
            c,
        },
        second: Second::U,
    };
    Ok(g.contiguous()?.apply_op3_no_bwd(u, d, &op)?)
}

/// Where one factor's gradient goes in [`factor_grads`]' flat output: from element `offset`,
/// as the leading rows of a row-major (· × r) matrix, or (`transposed`) as the r × rows matrix
/// that is the factor's transpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradSlot {
    pub offset: usize,
    pub transposed: bool,
}

/// The factors' gradients of y = x·W0ᵀ + b + c·(x·D)·Uᵀ at the input `x` (m × d_in) for the
/// output gradient `g` (m × d_out), dD = c·xᵀ·(g·U) into `slots[0]` and dU = c·gᵀ·(x·D) into
/// `slots[1]` of one zero-initialised flat buffer of `len` elements of `dtype`, added where
/// the slots overlap (SingLoRA's D and U are both leading rows of A). Four GEMMs in one op:
/// composed, the two products, two scalings, the padding, casts and the add of the two
/// gradients are each an op. None where the kernels do not run for these tensors: on the CPU
/// `dtype` must be x's (f32/f64), on CUDA f32 (x bf16 or f32).
#[allow(clippy::too_many_arguments)]
pub fn factor_grads(
    x: &Tensor,
    g: &Tensor,
    d: &Tensor,
    u: &Tensor,
    c: f64,
    slots: [GradSlot; 2],
    len: usize,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let wanted = match x.device() {
        Device::Cpu => x.dtype(),
        _ => DType::F32,
    };
    if !super::fused_kernels_for(x) || dtype != wanted {
        return Ok(None);
    }
    let op = FactorGrads {
        d: d.clone(),
        u: u.clone(),
        c,
        slots,
        len,
    };
    Ok(Some(
        x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &op)?,
    ))
}

/// [`factor_grads`]' op on (x, g), holding D and U.
struct FactorGrads {
    d: Tensor,
    u: Tensor,
    c: f64,
    slots: [GradSlot; 2],
    len: usize,
}

impl FactorGrads {
    /// (m, d_in, d_out, r) where x (m × d_in), g (m × d_out), D, U and the slots fit.
    fn dims(&self, x: &Layout, g: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (m, k) = x.shape().dims2()?;
        let (m2, n) = g.shape().dims2()?;
        let r = self.d.dim(1)?;
        if m != m2 || self.d.dims() != [k, r] || self.u.dims() != [n, r] {
            candle_core::bail!(
                "adapter gradients: x {:?}, g {:?}, D {:?}, U {:?} do not fit",
                x.dims(),
                g.dims(),
                self.d.dims(),
                self.u.dims()
            );
        }
        for (slot, rows) in self.slots.iter().zip([k, n]) {
            if slot.offset + rows * r > self.len {
                candle_core::bail!(
                    "adapter gradients: a {rows} × {r} factor at {} overruns {} elements",
                    slot.offset,
                    self.len
                );
            }
        }
        Ok((m, k, n, r))
    }

    fn run<T: Real + 'static>(
        &self,
        x: (&CpuStorage, &Layout),
        g: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k, n, r) = self.dims(x.1, g.1)?;
        let (xv, _) = view::<T>(x.0, x.1)?;
        let (gv, _) = view::<T>(g.0, g.1)?;
        let (d, u) = (host_vec::<T>(&self.d)?, host_vec::<T>(&self.u)?);
        // a (m × k) times a factor (k × r)
        let times = |a: View<T>, f: &[T], k: usize| {
            let mut out = vec![T::zero(); m * r];
            gemm_into(
                &mut out,
                m,
                r,
                k,
                a,
                View::rows(f.as_ptr(), r),
                T::one(),
                false,
            );
            out
        };
        let (gu, h) = (times(gv, &u, n), times(xv, &d, k));
        let (guv, hv) = (View::rows(gu.as_ptr(), r), View::rows(h.as_ptr(), r));
        let mut out = vec![T::zero(); self.len];
        let c = T::from(self.c).unwrap();
        for (slot, rows, act, small) in [(self.slots[0], k, xv, guv), (self.slots[1], n, gv, hv)] {
            let dst = out[slot.offset..].as_mut_ptr();
            // SAFETY: `dims` checked that rows × r elements from the slot's offset lie in
            // `out`; the views address m × rows and m × r elements.
            unsafe {
                if slot.transposed {
                    gemm_at(dst, rows, (r, rows, m), small.t(), act, c, true, true)
                } else {
                    gemm_at(dst, r, (rows, r, m), act.t(), small, c, true, true)
                }
            }
        }
        Ok((T::to_cpu_storage_owned(out), Shape::from(self.len)))
    }
}

impl candle_core::CustomOp2 for FactorGrads {
    fn name(&self) -> &'static str {
        "adapter-factor-grads"
    }

    super::cuda_fwd!(|self, x, g| cuda::factor_grads(self, x, g));

    super::cpu_fwd!(|self, (s1, l1), (s2, l2)| {
        dispatch_float!(s1, "adapter gradients", |T| self
            .run::<T>((s1, l1), (s2, l2)))
    });
}

/// y = x·W0ᵀ + b without an adapter: the bias written first, the product accumulated.
struct FrozenBiasMatmul(AdaptedMatmul);

impl candle_core::CustomOp1 for FrozenBiasMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    super::cpu_fwd!(|self, (s, l)| {
        let rows = as_rows(l)?;
        dispatch_float!(s, "frozen linear", |T| {
            let (m, k) = rows.shape().dims2()?;
            let (n, _) = self.0.w0.dims2()?;
            let (xv, _) = view::<T>(s, &rows)?;
            let (mut y, has_bias) = output_with_bias::<T>(m, n, self.0.bias.as_ref())?;
            self.0.base_product(&mut y, m, n, k, xv, has_bias)?;
            Ok((T::to_cpu_storage_owned(y), self.0.out_shape(l)))
        })
    });

    super::cuda_fwd!(|self, x| {
        let rows = as_rows(x.1)?;
        let (y, _) = cuda::adapted_fwd(&self.0, (x.0, &rows), None)?;
        Ok((y, self.0.out_shape(x.1)))
    });

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        super::mark_backward_start(x.device())?;
        let dx = flat_rows(&g.contiguous()?)?
            .matmul(&self.0.w0)?
            .reshape(x.dims())?;
        super::mark_on(x.device(), "backward: frozen linear layers")
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(dx))
    }
}

/// y = x·W0ᵀ + b for `x` (.., k) on the CPU (f32/f64) and CUDA (f32/bf16); only x gets a
/// gradient.
pub fn frozen_linear(x: &Tensor, w0: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let op = FrozenBiasMatmul(AdaptedMatmul {
        w0: w0.clone(),
        bias: bias.cloned(),
        c: 0.0,
    });
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// gelu(x·W0ᵀ + b) without an adapter, one op: the pre-activation stays inside (kept for the
/// backward) instead of being an autograd tensor whose gradient candle zero-fills and adds.
struct FrozenGeluMatmul {
    lin: AdaptedMatmul,
    pre: Arc<Mutex<Option<Tensor>>>,
}

impl candle_core::CustomOp1 for FrozenGeluMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear-gelu"
    }

    super::cpu_fwd!(|self, (s, l)| {
        dispatch_float!(s, "frozen linear gelu", |T| {
            let (m, k) = l.shape().dims2()?;
            let (n, _) = self.lin.w0.dims2()?;
            let (xv, _) = view::<T>(s, l)?;
            let (mut pre, has_bias) = output_with_bias::<T>(m, n, self.lin.bias.as_ref())?;
            self.lin.base_product(&mut pre, m, n, k, xv, has_bias)?;
            let act = super::gelu::gelu_values(&pre);
            *self.pre.lock().unwrap() = Some(Tensor::from_vec(pre, (m, n), &Device::Cpu)?);
            Ok((T::to_cpu_storage_owned(act), Shape::from((m, n))))
        })
    });

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let pre = self.pre.lock().unwrap().take().ok_or_else(|| {
            candle_core::Error::Msg("frozen linear gelu: backward without a forward".into())
        })?;
        let d_pre = super::gelu::gelu_backward(&pre, g)?;
        Ok(Some(d_pre.matmul(&self.lin.w0)?))
    }
}

/// gelu(x·W0ᵀ + b) (exact GELU) for 2-D `x` on the CPU (f32/f64); only x gets a gradient.
pub fn frozen_linear_gelu(x: &Tensor, w0: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let op = FrozenGeluMatmul {
        lin: AdaptedMatmul {
            w0: w0.clone(),
            bias: bias.cloned(),
            c: 0.0,
        },
        pre: Arc::new(Mutex::new(None)),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// y = x·W0ᵀ + b + c·(x·D)·Uᵀ for `x` (.., d_in), any leading dimensions taken as rows, on
/// the CPU (f32/f64) and CUDA (f32/bf16).
pub fn adapted_linear(
    x: &Tensor,
    w0: &Tensor,
    bias: Option<&Tensor>,
    d: &Tensor,
    u: &Tensor,
    c: f64,
) -> Result<Tensor> {
    let op = AdaptedMatmul {
        w0: w0.clone(),
        bias: bias.cloned(),
        c,
    };
    let x = x.contiguous()?;
    Ok(x.apply_op3(d, u, op)?)
}

/// Whether [`adapted_linear`] runs natively for these tensors: f32/f64 on the CPU, bf16/f32
/// on CUDA (cuBLAS), with a contiguous weight of the input's type whose rows are as wide as
/// the input's last dimension.
pub fn fused_available(x: &Tensor, w0: &Tensor) -> bool {
    super::fused_kernels_for(x)
        && x.dtype() == w0.dtype()
        && w0.is_contiguous()
        && x.dims().last() == w0.dims().last()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::reference::tests::{check_grad, max_diff};
    use candle_core::{Device, Var};

    fn reference(x: &Tensor, w0: &Tensor, b: &Tensor, d: &Tensor, u: &Tensor, c: f64) -> Tensor {
        crate::ops::reference::linear(x, w0, Some(b), (d, u, c)).unwrap()
    }

    #[test]
    fn matches_reference_with_strided_factors() {
        let dev = Device::Cpu;
        for (n, k) in [(6, 6), (9, 5), (4, 7)] {
            let x = Tensor::randn(0f64, 1.0, (5, k), &dev).unwrap();
            let w0 = Tensor::randn(0f64, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f64, 1.0, n, &dev).unwrap();
            // SingLoRA-style: D, U are row prefixes of one A; LoRA-style: D is a transpose
            let a = Var::randn(0f64, 1.0, (n.max(k), 3), &dev).unwrap();
            let lora_a = Var::randn(0f64, 1.0, (3, k), &dev).unwrap();
            let lora_b = Var::randn(0f64, 1.0, (n, 3), &dev).unwrap();
            let cases = [
                (a.narrow(0, 0, k).unwrap(), a.narrow(0, 0, n).unwrap()),
                (lora_a.t().unwrap(), lora_b.as_tensor().clone()),
            ];
            for (d, u) in cases {
                let y = adapted_linear(&x, &w0, Some(&b), &d, &u, 0.7).unwrap();
                let r = reference(&x, &w0, &b, &d, &u, 0.7);
                let diff = max_diff(&y, &r);
                assert!(diff < 1e-12, "({n}, {k}): {diff}");
                check_grad(&x, |x| adapted_linear(x, &w0, Some(&b), &d, &u, 0.7));
                check_grad(&x, |x| frozen_linear(x, &w0, Some(&b)));
                check_grad(&x, |x| frozen_linear_gelu(x, &w0, Some(&b)));
                let fused = frozen_linear_gelu(&x, &w0, Some(&b)).unwrap();
                let composed = reference(&x, &w0, &b, &d, &u, 0.0).gelu_erf().unwrap();
                let diff = max_diff(&fused, &composed);
                assert!(diff < 1e-12, "gelu ({n}, {k}): {diff}");
            }
            // gradients into A through both prefixes, and into LoRA's A and B
            let a_val = a.as_tensor().copy().unwrap();
            check_grad(&a_val, |a| {
                adapted_linear(&x, &w0, None, &a.narrow(0, 0, k)?, &a.narrow(0, 0, n)?, 0.7)
            });
            let la = lora_a.as_tensor().copy().unwrap();
            check_grad(&la, |la| {
                adapted_linear(&x, &w0, Some(&b), &la.t()?, lora_b.as_tensor(), 0.7)
            });
            let lb = lora_b.as_tensor().copy().unwrap();
            check_grad(&lb, |lb| {
                adapted_linear(&x, &w0, Some(&b), &lora_a.t()?, lb, 0.7)
            });
        }
    }

    #[test]
    fn f32_matches_reference() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (64, 48), &dev).unwrap();
        let w0 = Tensor::randn(0f32, 0.1, (80, 48), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 80, &dev).unwrap();
        let d = Tensor::randn(0f32, 0.1, (48, 8), &dev).unwrap();
        let u = Tensor::randn(0f32, 0.1, (80, 8), &dev).unwrap();
        let y = adapted_linear(&x, &w0, Some(&b), &d, &u, 2.0).unwrap();
        let r = reference(&x, &w0, &b, &d, &u, 2.0);
        let diff = max_diff(&y, &r);
        assert!(diff < 1e-4, "{diff}");
    }
}
