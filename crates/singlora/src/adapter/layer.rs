//! A frozen linear layer with an optional adapter: y = adapt(x, x·W0ᵀ) + b.
//!
//! `merge` folds the adapter into the weight (computed in f64, cast once to the base dtype);
//! `unmerge` subtracts it again. While merged the forward is the plain linear layer.

use candle_core::{DType, Tensor};

use super::{Adapter, FactorLayout, FactorSource};
use crate::error::{Error, Result};
use crate::linear::FrozenLinear;
use crate::ops::GradSlot;

#[derive(Debug, Clone)]
pub struct AdaptedLinear {
    name: String,
    base: FrozenLinear,
    adapter: Option<Adapter>,
    merged: Option<Merged>,
}

#[derive(Debug, Clone)]
struct Merged {
    dora_norm: Option<Tensor>,
}

impl AdaptedLinear {
    /// `name` is the module path (Hugging Face tensor name without `.weight`).
    pub fn new(name: impl Into<String>, base: FrozenLinear) -> Self {
        Self {
            name: name.into(),
            base,
            adapter: None,
            merged: None,
        }
    }

    pub fn with_adapter(mut self, adapter: Adapter) -> Self {
        self.adapter = Some(adapter);
        self
    }

    /// The same layer under the module name `name`.
    pub fn renamed(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }

    /// The frozen layer, to change how its weight is kept (quantisation); not its values.
    pub fn base_mut(&mut self) -> &mut FrozenLinear {
        &mut self.base
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    pub fn set_adapter(&mut self, adapter: Option<Adapter>) -> Result<()> {
        if self.merged.is_some() {
            return Err(Error::msg(format!(
                "{}: unmerge before replacing the adapter",
                self.name
            )));
        }
        self.adapter = adapter;
        Ok(())
    }

    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// The dense weight where the layer computes a plain frozen linear map (no adapter, or its
    /// adapter merged into the weight): what a hand-written backward multiplies by. None where
    /// an adapter is active or the weight is kept quantised.
    pub fn frozen_dense_weight(&self) -> Option<&Tensor> {
        match (&self.adapter, &self.merged) {
            (Some(_), None) => None,
            _ => self.base.dense_weight(),
        }
    }

    /// The layer as y = x·W0ᵀ + b + c·(x·D)·Uᵀ for a backward written out by hand
    /// ([`LowRankLinear`]), with detached copies of the factors D, U in `dtype` and the
    /// adapter's variables their gradients go to. None where the layer is not of that form on
    /// the fused ops: a quantised weight, DoRA's rescaled output, a weight not of `dtype`.
    pub fn as_low_rank(&self, dtype: DType) -> Result<Option<LowRankLinear>> {
        let Some(w0) = self.base.dense_weight().filter(|_| self.takes_apart(dtype)) else {
            return Ok(None);
        };
        let adapter = match (&self.adapter, &self.merged) {
            (Some(a), None) => {
                let (d, u, c) = a.factors_in(dtype)?;
                Some(LowRankFactors {
                    d: d.detach(),
                    u: u.detach(),
                    c,
                    vars: a
                        .params()
                        .into_iter()
                        .map(|p| p.var.as_tensor().clone())
                        .collect(),
                    layout: a.factor_layout(),
                })
            }
            _ => None,
        };
        Ok(Some(LowRankLinear {
            w0: w0.clone(),
            bias: self.base.bias().cloned(),
            adapter,
        }))
    }

    /// Whether [`Self::as_low_rank`] gives the layer taken apart in `dtype`, without making
    /// the factors' copies: a contiguous dense weight of `dtype`, and no adapter that rescales
    /// its output (DoRA) unless merged.
    pub fn takes_apart(&self, dtype: DType) -> bool {
        let dense =
            (self.base.dense_weight()).is_some_and(|w| w.dtype() == dtype && w.is_contiguous());
        let rescaled =
            matches!((&self.adapter, &self.merged), (Some(a), None) if a.rescales_output());
        dense && !rescaled
    }

    /// (d_out, d_in).
    pub fn dims(&self) -> (usize, usize) {
        self.base.dims()
    }

    /// gelu(forward(x)) (exact GELU); without an active adapter on the CPU one fused op.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        let (d_out, d_in) = self.dims();
        let frozen = self.adapter.is_none() || self.merged.is_some();
        let x2 = x.reshape((x.elem_count() / d_in, d_in))?;
        let dense = self.base.dense_weight();
        if let Some(w0) =
            dense.filter(|w0| frozen && x.device().is_cpu() && crate::ops::fused_available(&x2, w0))
        {
            let mut out = x.dims().to_vec();
            *out.last_mut().unwrap() = d_out;
            let y = crate::ops::frozen_linear_gelu(&x2, w0, self.base.bias())?;
            return Ok(y.reshape(out)?);
        }
        crate::ops::gelu_erf(&self.forward(x)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let adapter = match (&self.adapter, &self.merged) {
            (Some(a), None) => a,
            _ => return Ok(self.base.forward(x)?),
        };
        let (d_out, d_in) = self.dims();
        if let Some(w0) = self
            .base
            .dense_weight()
            .filter(|w0| crate::ops::fused_available(x, w0))
        {
            // one op on x as it is (its leading dimensions are rows, so no recorded reshapes):
            // bias, base product and adapter product into one output (for DoRA the bias comes
            // after the rescaling); the factors in the input's type, a parameter that holds
            // both (SingLoRA's A) cast once
            let dt = x.dtype();
            let (d, u, c) = adapter.factors_in(dt)?;
            let scale = adapter.output_scale(w0)?;
            let bias = if scale.is_some() {
                None
            } else {
                self.base.bias()
            };
            let y = crate::ops::adapted_linear(x, w0, bias, &d, &u, c)?;
            return Ok(match scale {
                Some(sc) => {
                    let y = y.broadcast_mul(&sc.to_dtype(dt)?)?;
                    self.base.add_bias(&y)?
                }
                None => y,
            });
        }
        let dims = x.dims().to_vec();
        let m = x.elem_count() / d_in;
        let x2 = x.reshape((m, d_in))?;
        let mut out = dims;
        *out.last_mut().unwrap() = d_out;
        let y0 = self.base.forward_no_bias(&x2)?;
        // only DoRA reads W0 here: a weight kept in NF4 is dequantised for it alone
        let w0 = match adapter.rescales_output() {
            true => Some(self.base.weight()?),
            false => None,
        };
        let y = adapter.adapt(&x2, w0.as_ref(), &y0)?;
        let y = self.base.add_bias(&y)?;
        Ok(y.reshape(out)?)
    }

    /// W ← merged(W0), in f64 then cast once; refuses a non-finite result.
    pub fn merge(&mut self) -> Result<()> {
        let Some(adapter) = &self.adapter else {
            return Ok(());
        };
        // a weight kept in NF4 stays so: the adapter keeps running beside it
        if self.merged.is_some() || self.base.is_quantized() {
            return Ok(());
        }
        let w0 = self.base.weight()?;
        let (w, dora_norm) = adapter.merged_weight(&w0)?;
        crate::adapter::check_finite(&w, &format!("{}.weight (merged)", self.name))?;
        let w = w.to_dtype(w0.dtype())?;
        self.base.set_weight(w);
        self.merged = Some(Merged { dora_norm });
        Ok(())
    }

    pub fn unmerge(&mut self) -> Result<()> {
        let (Some(adapter), Some(merged)) = (&self.adapter, self.merged.take()) else {
            return Ok(());
        };
        let w = self.base.weight()?;
        let w0 = adapter.unmerged_weight(&w, merged.dora_norm.as_ref())?;
        let w0 = w0.to_dtype(w.dtype())?;
        self.base.set_weight(w0);
        Ok(())
    }

    /// The base weight as f64 (for checks).
    pub fn weight_f64(&self) -> Result<Tensor> {
        Ok(self.base.weight()?.to_dtype(DType::F64)?)
    }
}

/// A linear layer taken apart for a backward written out by hand (from
/// [`AdaptedLinear::as_low_rank`]): y = x·W0ᵀ + b + c·(x·D)·Uᵀ on 2-D x, the adapter term
/// where the layer has one.
#[derive(Debug, Clone)]
pub struct LowRankLinear {
    pub w0: Tensor,
    pub bias: Option<Tensor>,
    pub adapter: Option<LowRankFactors>,
}

/// An adapter as [`LowRankLinear`] takes it: D, U and c (D and U detached copies of what the
/// variables hold), the variables, and where D and U sit in them.
#[derive(Debug, Clone)]
pub struct LowRankFactors {
    pub d: Tensor,
    pub u: Tensor,
    pub c: f64,
    pub vars: Vec<Tensor>,
    pub layout: FactorLayout,
}

impl LowRankLinear {
    /// y for 2-D `x`, outside autograd.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.detach();
        let bias = self.bias.as_ref();
        Ok(match &self.adapter {
            Some(a) => crate::ops::adapted_linear(&x, &self.w0, bias, &a.d, &a.u, a.c)?,
            None if crate::ops::fused_available(&x, &self.w0) => {
                crate::ops::frozen_linear(&x, &self.w0, bias)?
            }
            None => {
                let y = x.matmul(&self.w0.t()?)?;
                match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        })
    }

    /// dx (where `input_grad`) for the output gradient `g` at the input `x` (both 2-D), and
    /// the gradients of [`Self::variables`] (none without an adapter).
    pub fn backward(
        &self,
        x: &Tensor,
        g: &Tensor,
        input_grad: bool,
    ) -> Result<(Option<Tensor>, Vec<Tensor>)> {
        Ok(match &self.adapter {
            Some(a) => match a.fused_param_grads(x, g)? {
                Some(grads) => {
                    let dx = input_grad
                        .then(|| {
                            crate::ops::adapted_linear_input_grad(g, &self.w0, &a.d, &a.u, a.c)
                        })
                        .transpose()?;
                    (dx, grads)
                }
                None => {
                    let (dx, dd, du) =
                        crate::ops::adapted_linear_grads(x, &self.w0, &a.d, &a.u, a.c, g)?;
                    (input_grad.then_some(dx), a.param_grads(&dd, &du)?)
                }
            },
            None if input_grad => (Some(g.matmul(&self.w0)?), vec![]),
            None => (None, vec![]),
        })
    }

    /// [`Self::backward`] with the input gradient: dx and the variables' gradients.
    pub fn backward_with_input(&self, x: &Tensor, g: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let (dx, dp) = self.backward(x, g, true)?;
        Ok((dx.expect("the input gradient is asked for"), dp))
    }

    /// The adapter's variables, where the layer has one: the tensors whose gradients
    /// [`Self::backward`] gives.
    pub fn variables(&self) -> &[Tensor] {
        self.adapter.as_ref().map_or(&[], |a| a.vars.as_slice())
    }
}

impl LowRankFactors {
    /// The variables' gradients at the input `x` for the output gradient `g` (both 2-D) in
    /// two ops: every variable's gradient in one flat buffer ([`crate::ops::factor_grads`]),
    /// handed out as views. None where that op does not take these tensors: variables of
    /// different types, or one that is not a 2-D matrix of the factors' rank (r columns of
    /// at least the factor's rows, or the factor's transpose).
    fn fused_param_grads(&self, x: &Tensor, g: &Tensor) -> Result<Option<Vec<Tensor>>> {
        let Some(dtype) = self.vars.first().map(|v| v.dtype()) else {
            return Ok(None);
        };
        if self.vars.iter().any(|v| v.dtype() != dtype) {
            return Ok(None);
        }
        let r = self.d.dim(1)?;
        let offsets: Vec<usize> = self
            .vars
            .iter()
            .scan(0, |end, v| {
                let start = *end;
                *end += v.elem_count();
                Some(start)
            })
            .collect();
        let len = self.vars.iter().map(|v| v.elem_count()).sum();
        let slot = |src: FactorSource, rows: usize| -> Option<GradSlot> {
            let (vr, vc) = self.vars[src.param()].dims2().ok()?;
            let offset = offsets[src.param()];
            match src {
                FactorSource::Rows(_) if vc == r && vr >= rows => Some(GradSlot {
                    offset,
                    transposed: false,
                }),
                FactorSource::Transposed(_) if (vr, vc) == (r, rows) => Some(GradSlot {
                    offset,
                    transposed: true,
                }),
                _ => None,
            }
        };
        let slots = (
            slot(self.layout.d, self.d.dim(0)?),
            slot(self.layout.u, self.u.dim(0)?),
        );
        let (Some(sd), Some(su)) = slots else {
            return Ok(None);
        };
        let flat = crate::ops::factor_grads(x, g, &self.d, &self.u, self.c, [sd, su], len, dtype)?;
        let Some(flat) = flat else {
            return Ok(None);
        };
        let grads = self
            .vars
            .iter()
            .zip(offsets)
            .map(|(v, at)| flat.narrow(0, at, v.elem_count())?.reshape(v.shape()))
            .collect::<candle_core::Result<_>>()?;
        Ok(Some(grads))
    }

    /// The variables' gradients from the factors' gradients dD (d_in × r) and dU (d_out × r),
    /// in each variable's type: a factor that is a variable's leading rows adds into those
    /// rows, one that is its transpose adds transposed; a variable outside the factors gets
    /// zeros.
    fn param_grads(&self, dd: &Tensor, du: &Tensor) -> Result<Vec<Tensor>> {
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        for (src, g) in [(self.layout.d, dd), (self.layout.u, du)] {
            let var = &self.vars[src.param()];
            let g = match src {
                FactorSource::Rows(_) => {
                    let rows = g.dim(0)?;
                    g.pad_with_zeros(0, 0, var.dim(0)? - rows)?
                }
                FactorSource::Transposed(_) => g.t()?.contiguous()?,
            };
            let g = g.to_dtype(var.dtype())?;
            let slot = &mut grads[src.param()];
            *slot = Some(match slot.take() {
                Some(sum) => (sum + g)?,
                None => g,
            });
        }
        self.vars
            .iter()
            .zip(grads)
            .map(|(v, g)| Ok(g.map_or_else(|| v.zeros_like(), Ok)?))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::ramp::{RampClock, RampSchedule};
    use crate::adapter::{AdapterKind, AdapterSpec};
    use crate::ops::reference::tests::max_diff;
    use candle_core::{Device, Var};

    /// The backward written out by hand (every variable's gradient in one flat buffer, the
    /// input gradient in one op) gives what candle's autograd gives through the recorded
    /// adapted layer: SingLoRA on a square and both non-square shapes (D and U leading rows
    /// of one A), LoRA (D stored transposed, U as rows of B), in f64.
    #[test]
    fn written_out_backward_matches_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let clock = RampClock::new(RampSchedule::none(), 0);
        let cases = [
            (AdapterKind::SingLora, 6, 6),
            (AdapterKind::SingLora, 4, 9),
            (AdapterKind::SingLora, 9, 4),
            (AdapterKind::Lora, 5, 7),
        ];
        for (kind, d_out, d_in) in cases {
            let w0 = Tensor::randn(0f64, 1.0, (d_out, d_in), &dev)?;
            let bias = Tensor::randn(0f64, 1.0, d_out, &dev)?;
            let mut spec = AdapterSpec::new(kind, 3, 6.0);
            spec.dtype = DType::F64;
            let adapter = Adapter::init(&spec, "layer", &w0, &clock)?;
            // every variable away from its initial value (LoRA's B starts at zero)
            for p in adapter.params() {
                p.var.set(&Tensor::randn(0f64, 0.5, p.var.shape(), &dev)?)?;
            }
            let layer = AdaptedLinear::new("layer", FrozenLinear::new(w0, Some(bias)))
                .with_adapter(adapter.clone());
            let x = Tensor::randn(0f64, 1.0, (5, d_in), &dev)?;
            let g = Tensor::randn(0f64, 1.0, (5, d_out), &dev)?;
            let low = layer.as_low_rank(DType::F64)?.expect("a dense f64 layer");
            assert!(low
                .adapter
                .as_ref()
                .unwrap()
                .fused_param_grads(&x, &g)?
                .is_some());
            let (dx, grads) = low.backward_with_input(&x, &g)?;

            let xv = Var::from_tensor(&x)?;
            let y = layer.forward(xv.as_tensor())?;
            let want = (y * &g)?.sum_all()?.backward()?;
            let case = format!("{kind:?} {d_out}×{d_in}");
            let d = max_diff(&dx, want.get(xv.as_tensor()).unwrap());
            assert!(d < 1e-12, "{case}: input gradient off by {d}");
            let params = adapter.params();
            assert_eq!(grads.len(), params.len(), "{case}");
            for (got, p) in grads.iter().zip(&params) {
                let d = max_diff(got, want.get(p.var.as_tensor()).unwrap());
                assert!(d < 1e-12, "{case}: a variable's gradient off by {d}");
            }
        }
        Ok(())
    }
}
