//! Low-rank adapters on a frozen linear weight W0 (d_out × d_in), one enum for every method.
//!
//! | method   | update                                   | trainable            |
//! |----------|------------------------------------------|----------------------|
//! | SingLoRA | ΔW = s·u(t)·A_out·A_inᵀ                  | A (max(d_in,d_out) × r) |
//! | LoRA     | ΔW = s·B·A, s = α/r (rsLoRA: α/√r)       | A (r × d_in), B (d_out × r) |
//! | DoRA     | W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row | A, B, m (d_out)      |
//!
//! LoRA+ is LoRA with a larger learning rate for B: an optimizer rule, see [`ParamRole`].
//! Every method implements the same hooks: [`Adapter::adapt`] (the factored forward),
//! [`Adapter::merged_weight`] / [`Adapter::unmerged_weight`], [`Adapter::params`] and the
//! tensors saved to and loaded from PEFT-format files.

mod layer;
mod lora;
mod singlora;

pub use layer::AdaptedLinear;
pub use lora::LoraAdapter;
pub use singlora::SingLoraAdapter;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::init::SingLoraInit;
use crate::ramp::RampClock;

/// Which adapter family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdapterKind {
    SingLora,
    Lora,
    Dora,
}

impl fmt::Display for AdapterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdapterKind::SingLora => "singlora",
            AdapterKind::Lora => "lora",
            AdapterKind::Dora => "dora",
        })
    }
}

/// The methods a user chooses between; rsLoRA and LoRA+ are LoRA with another scale or
/// another optimizer rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    SingLora,
    Lora,
    RsLora,
    LoraPlus,
    Dora,
}

impl Method {
    pub const ALL: [Method; 5] = [
        Method::SingLora,
        Method::Lora,
        Method::RsLora,
        Method::LoraPlus,
        Method::Dora,
    ];

    pub fn kind(self) -> AdapterKind {
        match self {
            Method::SingLora => AdapterKind::SingLora,
            Method::Lora | Method::RsLora | Method::LoraPlus => AdapterKind::Lora,
            Method::Dora => AdapterKind::Dora,
        }
    }

    pub fn uses_rslora(self) -> bool {
        self == Method::RsLora
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::SingLora => "singlora",
            Method::Lora => "lora",
            Method::RsLora => "rslora",
            Method::LoraPlus => "lora-plus",
            Method::Dora => "dora",
        })
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.to_string() == s || m.to_string().replace('-', "_") == s)
            .ok_or_else(|| {
                Error::msg(format!(
                    "unknown method `{s}`: expected singlora, lora, rslora, lora-plus or dora"
                ))
            })
    }
}

/// The scale s in ΔW = s·…: α/r, or α/√r with rsLoRA.
pub fn scale(alpha: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// What a trainable tensor is, for optimizer groups (LoRA+ gives B λ times A's rate;
/// weight decay skips magnitudes, norms and biases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamRole {
    /// SingLoRA's A or LoRA's A.
    A,
    /// LoRA's B.
    B,
    /// DoRA's magnitude vector.
    Magnitude,
    /// A fully trained head weight.
    HeadWeight,
    /// A fully trained head bias.
    HeadBias,
}

/// A trainable tensor with its file-key suffix (PEFT's naming) and its role.
#[derive(Debug, Clone)]
pub struct Param {
    pub suffix: &'static str,
    pub var: Var,
    pub role: ParamRole,
}

/// Hyper-parameters for creating fresh adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub kind: AdapterKind,
    pub r: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub init: SingLoraInit,
    pub seed: u64,
    /// Dtype of the trainable tensors (f32 for training; f64 in gradient checks).
    pub dtype: DType,
}

impl AdapterSpec {
    pub fn new(kind: AdapterKind, r: usize, alpha: f64) -> Self {
        Self {
            kind,
            r,
            alpha,
            rslora: false,
            init: SingLoraInit::default(),
            seed: 0,
            dtype: DType::F32,
        }
    }

    pub fn scale(&self) -> f64 {
        scale(self.alpha, self.r, self.rslora)
    }
}

/// One layer's adapter.
#[derive(Debug, Clone)]
pub enum Adapter {
    SingLora(SingLoraAdapter),
    Lora(LoraAdapter),
}

impl Adapter {
    /// A freshly initialised adapter for the weight `w0` of the module `name`.
    pub fn init(spec: &AdapterSpec, name: &str, w0: &Tensor, clock: &RampClock) -> Result<Self> {
        if spec.r == 0 {
            return Err(Error::msg("the rank r must be at least 1"));
        }
        let (d_out, d_in) = w0.dims2()?;
        let device = w0.device();
        Ok(match spec.kind {
            AdapterKind::SingLora => Adapter::SingLora(SingLoraAdapter::init(
                spec,
                name,
                d_out,
                d_in,
                clock.clone(),
                device,
            )?),
            AdapterKind::Lora => Adapter::Lora(LoraAdapter::init(spec, name, w0, false)?),
            AdapterKind::Dora => Adapter::Lora(LoraAdapter::init(spec, name, w0, true)?),
        })
    }

    /// Rebuilds an adapter from the tensors of a file (keys are the suffixes, e.g.
    /// `lora_A.weight`), checking their shapes against the base weight.
    #[allow(clippy::too_many_arguments)]
    pub fn from_tensors(
        kind: AdapterKind,
        name: &str,
        tensors: &BTreeMap<String, Tensor>,
        w0: &Tensor,
        r: usize,
        scale: f64,
        clock: &RampClock,
    ) -> Result<Self> {
        let (d_out, d_in) = w0.dims2()?;
        Ok(match kind {
            AdapterKind::SingLora => Adapter::SingLora(SingLoraAdapter::from_tensors(
                name,
                tensors,
                d_out,
                d_in,
                r,
                scale,
                clock.clone(),
            )?),
            AdapterKind::Lora | AdapterKind::Dora => Adapter::Lora(LoraAdapter::from_tensors(
                name,
                tensors,
                w0,
                r,
                scale,
                kind == AdapterKind::Dora,
            )?),
        })
    }

    pub fn kind(&self) -> AdapterKind {
        match self {
            Adapter::SingLora(_) => AdapterKind::SingLora,
            Adapter::Lora(l) if l.is_dora() => AdapterKind::Dora,
            Adapter::Lora(_) => AdapterKind::Lora,
        }
    }

    /// The adapted output (without bias) from the 2-D input `x` (m × d_in), the frozen
    /// weight and its output `y0 = x·W0ᵀ` (m × d_out). Factored: ΔW is never formed.
    pub fn adapt(&self, x: &Tensor, w0: &Tensor, y0: &Tensor) -> Result<Tensor> {
        match self {
            Adapter::SingLora(a) => a.adapt(x, y0),
            Adapter::Lora(a) => a.adapt(x, w0, y0),
        }
    }

    /// The factors (D, U, c) of ΔW = c·U·Dᵀ for the fused linear op: SingLoRA (A_in, A_out,
    /// s·u), LoRA and DoRA (Aᵀ, B, s; DoRA's output is then rescaled by [`Self::output_scale`]).
    pub fn factors(&self) -> Result<Option<(Tensor, Tensor, f64)>> {
        match self {
            Adapter::SingLora(a) => Ok(Some(a.factors()?)),
            Adapter::Lora(a) => Ok(Some((a.a().t()?, a.b().as_tensor().clone(), a.scale()))),
        }
    }

    /// DoRA's magnitude variable and its detached row norms ‖W0 + s·B·A‖ (d_out each); None
    /// for the other methods.
    pub fn dora_parts(&self, w0: &Tensor) -> Result<Option<(Var, Tensor)>> {
        match self {
            Adapter::Lora(a) if a.is_dora() => Ok(Some(a.dora_parts(w0)?)),
            _ => Ok(None),
        }
    }

    /// DoRA's per-output scale m / ‖W0 + s·B·A‖ (d_out; the norm detached, as in PEFT), by
    /// which the adapted output x·(W0 + ΔW)ᵀ is multiplied; None for the other methods.
    pub fn output_scale(&self, w0: &Tensor) -> Result<Option<Tensor>> {
        match self {
            Adapter::Lora(a) if a.is_dora() => Ok(Some(a.dora_scale(w0)?)),
            _ => Ok(None),
        }
    }

    /// The merged weight, computed in f64 from `w0` (any float dtype), returned in f64,
    /// with DoRA's row norms (needed to unmerge).
    pub fn merged_weight(&self, w0: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let w0 = w0.to_dtype(DType::F64)?;
        match self {
            Adapter::SingLora(a) => Ok(((w0 + a.delta_weight()?)?, None)),
            Adapter::Lora(a) => a.merged_weight(&w0),
        }
    }

    /// Inverts [`Adapter::merged_weight`]; `norm` is what it returned.
    pub fn unmerged_weight(&self, w: &Tensor, norm: Option<&Tensor>) -> Result<Tensor> {
        let w = w.to_dtype(DType::F64)?;
        match self {
            Adapter::SingLora(a) => Ok((w - a.delta_weight()?)?),
            Adapter::Lora(a) => a.unmerged_weight(&w, norm),
        }
    }

    /// ΔW in f64 (for DoRA, the LoRA part s·B·A before normalisation).
    pub fn delta_weight(&self) -> Result<Tensor> {
        match self {
            Adapter::SingLora(a) => a.delta_weight(),
            Adapter::Lora(a) => a.delta_weight(),
        }
    }

    pub fn params(&self) -> Vec<Param> {
        match self {
            Adapter::SingLora(a) => a.params(),
            Adapter::Lora(a) => a.params(),
        }
    }

    pub fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.var.elem_count()).sum()
    }

    pub fn rank(&self) -> usize {
        match self {
            Adapter::SingLora(a) => a.rank(),
            Adapter::Lora(a) => a.rank(),
        }
    }

    pub fn scale(&self) -> f64 {
        match self {
            Adapter::SingLora(a) => a.scale(),
            Adapter::Lora(a) => a.scale(),
        }
    }

    /// Refuses NaN or infinity in any trainable tensor; `name` is the module path.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        for p in self.params() {
            check_finite(&p.var, &format!("{name}.{}", p.suffix))?;
        }
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.params()[0].var.device().clone()
    }
}

/// The dtype the adapter path computes in: the activations' when they are half precision (the
/// trainable tensors stay f32 and are cast, as PyTorch autocast does), the parameters' else.
pub(crate) fn compute_dtype(x: &Tensor, param: DType) -> DType {
    match x.dtype() {
        DType::BF16 | DType::F16 => x.dtype(),
        _ => param,
    }
}

/// Errors if `t` holds NaN or ±∞.
pub fn check_finite(t: &Tensor, name: &str) -> Result<()> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let nan = v.iter().filter(|x| x.is_nan()).count();
    let inf = v.iter().filter(|x| x.is_infinite()).count();
    if nan + inf > 0 {
        return Err(Error::NonFinite {
            tensor: name.to_string(),
            what: format!("{nan} NaN, {inf} infinite of {}", v.len()),
        });
    }
    Ok(())
}

/// Fetches `suffix` from a layer's tensors and checks its shape.
pub(crate) fn take_tensor(
    name: &str,
    tensors: &BTreeMap<String, Tensor>,
    suffix: &str,
    shape: &[usize],
) -> Result<Tensor> {
    let key = format!("{name}.{suffix}");
    let t = tensors
        .get(suffix)
        .ok_or_else(|| Error::bad_tensor(&key, "missing from the adapter file"))?;
    if t.dims() != shape {
        return Err(Error::bad_tensor(
            &key,
            format!(
                "has shape {:?} but the base weight needs {:?}",
                t.dims(),
                shape
            ),
        ));
    }
    Ok(t.clone())
}
