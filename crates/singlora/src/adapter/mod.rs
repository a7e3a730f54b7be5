//! Low-rank adapters on a frozen linear weight W0 (d_out × d_in), one enum for every method.
//!
//! | method   | update                                   | trainable            |
//! |----------|------------------------------------------|----------------------|
//! | SingLoRA | ΔW = s·u(t)·A_out·A_inᵀ                  | A (max(d_in,d_out) × r) |
//! | LoRA     | ΔW = s·B·A, s = α/r (rsLoRA: α/√r)       | A (r × d_in), B (d_out × r) |
//! | DoRA     | W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row | A, B, m (d_out)      |
//!
//! LoRA+ is LoRA with a larger learning rate for B: an optimizer rule, see [`ParamRole`].
//!
//! Every method implements the same hooks, and nothing outside this module asks which method
//! it holds:
//! - [`Adapter::adapt`]: the factored forward through candle's autograd;
//! - [`Adapter::factors`] / [`Adapter::factors_in`] and [`Adapter::factor_layout`]: ΔW = c·U·Dᵀ
//!   for the fused paths, and where D and U sit in the parameters, so that a fused backward
//!   that computes dD = c·xᵀ·(g·U) and dU = c·gᵀ·(x·D) hands them back as the parameters'
//!   gradients ([`Adapter::fold_factor_grads`] on the host, the layout itself on a device);
//! - [`Adapter::magnitude`] / [`Adapter::output_scale`]: DoRA's trainable per-output rescale;
//! - [`Adapter::merged_weight`] / [`Adapter::unmerged_weight`] / [`Adapter::delta_weight`];
//! - [`Adapter::params`] (with their file-key suffixes and optimizer roles), and the tensors
//!   read from files ([`Adapter::from_tensors`]); [`AdapterKind::param_count`] and
//!   [`AdapterKind::file_suffixes`] from shapes alone.
//!
//! The rest of PEFT's tuner lives here too: `adapter_config.json` ([`config`]), adapter
//! directories ([`file`]), target matching ([`target`]), putting adapters on a model's linear
//! layers ([`inject`]), SingLoRA's initialisation ([`init`]) and ramp ([`ramp`]), and the
//! export of a SingLoRA adapter as a plain LoRA ([`export`]).

pub mod config;
pub mod export;
pub mod file;
pub mod init;
pub mod inject;
mod layer;
mod lora;
pub mod ramp;
mod singlora;
pub mod target;

pub use layer::{AdaptedLinear, LowRankFactors, LowRankLinear};
pub use lora::LoraAdapter;
pub use singlora::SingLoraAdapter;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor, Var};

use crate::adapter::init::SingLoraInit;
use crate::adapter::ramp::RampClock;
use crate::error::{Error, Result};

/// Which adapter family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdapterKind {
    SingLora,
    Lora,
    Dora,
}

impl AdapterKind {
    /// Trainable parameters of one adapted (d_out × d_in) weight at rank r: SingLoRA
    /// max(d_in, d_out)·r, LoRA r·(d_in + d_out), DoRA that plus d_out.
    pub fn param_count(self, d_out: usize, d_in: usize, r: usize) -> usize {
        match self {
            AdapterKind::SingLora => d_out.max(d_in) * r,
            AdapterKind::Lora => r * (d_in + d_out),
            AdapterKind::Dora => r * (d_in + d_out) + d_out,
        }
    }

    /// The tensors one layer holds in an adapter file, by key suffix.
    pub fn file_suffixes(self) -> &'static [&'static str] {
        match self {
            AdapterKind::SingLora => &["singlora_A.weight"],
            AdapterKind::Lora => &["lora_A.weight", "lora_B.weight"],
            AdapterKind::Dora => &["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"],
        }
    }

    /// The method a file of this kind describes (`rslora`: the config's `use_rslora`).
    pub fn method(self, rslora: bool) -> Method {
        match (self, rslora) {
            (AdapterKind::SingLora, _) => Method::SingLora,
            (AdapterKind::Lora, true) => Method::RsLora,
            (AdapterKind::Lora, false) => Method::Lora,
            (AdapterKind::Dora, _) => Method::Dora,
        }
    }

    /// A layer's (d_out, d_in) from its file tensors, where they determine it.
    pub fn shape_from_tensors(self, tensors: &BTreeMap<String, Tensor>) -> Option<(usize, usize)> {
        match self {
            AdapterKind::SingLora => None,
            AdapterKind::Lora | AdapterKind::Dora => Some((
                *tensors.get("lora_B.weight")?.dims().first()?,
                *tensors.get("lora_A.weight")?.dims().get(1)?,
            )),
        }
    }

    /// Whether ΔW follows the ramp u(t) (SingLoRA); the others always apply in full.
    pub fn ramps(self) -> bool {
        self == AdapterKind::SingLora
    }

    /// Whether the tensors alone leave a layer's shape open, so that files record
    /// `layer_shapes` and `init` (SingLoRA's A is (max(d_in, d_out), r): it does not say which
    /// side is d_in).
    pub fn records_layer_shapes(self) -> bool {
        self == AdapterKind::SingLora
    }
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

    /// A learning rate that works for the method when the user gives none (LoRA+'s B then
    /// trains 16× faster, so its base rate is lower).
    pub fn default_lr(self) -> f64 {
        match self {
            Method::LoraPlus => 2e-4,
            _ => 1e-3,
        }
    }

    /// LoRA+: B's learning rate as a multiple of A's, `ratio` (λ) for LoRA+ and None for the
    /// others.
    pub fn b_lr_ratio(self, ratio: f64) -> Option<f64> {
        (self == Method::LoraPlus).then_some(ratio)
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

crate::serde_via_str!(Method);

/// The scale s in ΔW = s·…: α/r, or α/√r with rsLoRA.
pub fn scale(alpha: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// The largest scale taken for intended (typical ones lie between 0.1 and 16); an alpha that
/// gives more is refused, on the command line and in adapter files.
pub const MAX_SCALE: f64 = 1000.0;

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

/// Where one factor of ΔW = c·U·Dᵀ (rows × r) sits among an adapter's [`Adapter::params`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorSource {
    /// The first `rows` rows of parameter i (row-major, r columns): its gradient adds into
    /// those rows.
    Rows(usize),
    /// The transpose of parameter i (r × rows).
    Transposed(usize),
}

impl FactorSource {
    /// The parameter's index in [`Adapter::params`].
    pub fn param(self) -> usize {
        match self {
            FactorSource::Rows(i) | FactorSource::Transposed(i) => i,
        }
    }
}

/// Where an adapter's factors D (d_in × r) and U (d_out × r) sit in its parameters: SingLoRA
/// both in A (rows 0..d_in and 0..d_out), LoRA D = Aᵀ and U = B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FactorLayout {
    pub d: FactorSource,
    pub u: FactorSource,
}

impl FactorLayout {
    /// Whether D and U live in one parameter, so that their gradients add into one buffer.
    pub fn shared(self) -> bool {
        self.d.param() == self.u.param()
    }
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
    /// `w0`, the base weight, is read only where the output is rescaled (DoRA).
    pub fn adapt(&self, x: &Tensor, w0: Option<&Tensor>, y0: &Tensor) -> Result<Tensor> {
        match self {
            Adapter::SingLora(a) => a.adapt(x, y0),
            Adapter::Lora(a) => a.adapt(x, w0, y0),
        }
    }

    /// (d_out, d_in) of the adapted weight.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Adapter::SingLora(a) => a.dims(),
            Adapter::Lora(a) => a.dims(),
        }
    }

    /// The factors (D, U, c) of ΔW = c·U·Dᵀ for the forward about to run: D (d_in × r),
    /// U (d_out × r), as views of the parameters (SingLoRA A_in, A_out, s·u; LoRA and DoRA
    /// Aᵀ, B, s, DoRA's output then rescaled by [`Self::output_scale`]).
    pub fn factors(&self) -> Result<(Tensor, Tensor, f64)> {
        match self {
            Adapter::SingLora(a) => a.factors(),
            Adapter::Lora(a) => Ok((a.a().t()?, a.b().as_tensor().clone(), a.scale())),
        }
    }

    /// Where D and U sit in [`Self::params`].
    pub fn factor_layout(&self) -> FactorLayout {
        match self {
            Adapter::SingLora(_) => FactorLayout {
                d: FactorSource::Rows(0),
                u: FactorSource::Rows(0),
            },
            Adapter::Lora(_) => FactorLayout {
                d: FactorSource::Transposed(0),
                u: FactorSource::Rows(1),
            },
        }
    }

    /// [`Self::factors`] in `dtype`, each factor contiguous. A parameter is cast once: factors
    /// that are row prefixes of one parameter are views of that one cast (a step prepares
    /// every adapter, and each cast is a kernel launch).
    pub fn factors_in(&self, dtype: DType) -> Result<(Tensor, Tensor, f64)> {
        let (_, _, c) = self.factors()?;
        let (d_out, d_in) = self.dims();
        let layout = self.factor_layout();
        let params = self.params();
        let mut cast: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut factor = |src: FactorSource, rows: usize| -> Result<Tensor> {
            let var = params[src.param()].var.as_tensor();
            Ok(match src {
                FactorSource::Rows(p) => {
                    let t = match &cast[p] {
                        Some(t) => t.clone(),
                        None => {
                            let t = var.to_dtype(dtype)?.contiguous()?;
                            cast[p] = Some(t.clone());
                            t
                        }
                    };
                    t.narrow(0, 0, rows)?
                }
                FactorSource::Transposed(_) => var.t()?.to_dtype(dtype)?.contiguous()?,
            })
        };
        let d = factor(layout.d, d_in)?;
        let u = factor(layout.u, d_out)?;
        Ok((d, u, c))
    }

    /// The parameters' gradients from the factors' gradients dD (d_in × r) and dU (d_out × r),
    /// row-major f32 on the host, placed as [`Self::factor_layout`] says (added where D and U
    /// share a parameter); parameters outside the factors (DoRA's magnitude) get none here.
    pub fn fold_factor_grads(
        &self,
        dd: &[f32],
        du: &[f32],
        device: &Device,
    ) -> Result<Vec<(Var, Tensor)>> {
        let (d_out, d_in) = self.dims();
        let r = self.rank();
        let layout = self.factor_layout();
        let mut out = vec![];
        for (i, p) in self.params().into_iter().enumerate() {
            let mut grad: Option<Vec<f32>> = None;
            for (src, g, rows) in [(layout.d, dd, d_in), (layout.u, du, d_out)] {
                if src.param() != i {
                    continue;
                }
                let buf = grad.get_or_insert_with(|| vec![0f32; p.var.elem_count()]);
                match src {
                    FactorSource::Rows(_) => {
                        for (x, y) in buf[..rows * r].iter_mut().zip(g) {
                            *x += y;
                        }
                    }
                    // the parameter is r × rows
                    FactorSource::Transposed(_) => {
                        for row in 0..rows {
                            for j in 0..r {
                                buf[j * rows + row] += g[row * r + j];
                            }
                        }
                    }
                }
            }
            if let Some(g) = grad {
                let t = Tensor::from_vec(g, p.var.dims(), device)?;
                out.push((p.var, t));
            }
        }
        Ok(out)
    }

    /// DoRA's magnitude variable m and its detached row norms ‖W0 + s·B·A‖ (d_out each), by
    /// which the adapted output is rescaled: y = (x·W0ᵀ + c·x·D·Uᵀ)·diag(m/‖·‖); None for the
    /// methods without a rescale.
    pub fn magnitude(&self, w0: &Tensor) -> Result<Option<(Var, Tensor)>> {
        match self {
            Adapter::Lora(a) if a.is_dora() => Ok(Some(a.dora_parts(w0)?)),
            _ => Ok(None),
        }
    }

    /// Whether the adapted output is rescaled per output ([`Self::magnitude`]).
    pub fn rescales_output(&self) -> bool {
        matches!(self, Adapter::Lora(a) if a.is_dora())
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

/// The trainable tensors of the adapters on `linears`, layer by layer in their order.
pub fn params_of<'a>(linears: impl IntoIterator<Item = &'a AdaptedLinear>) -> Vec<Param> {
    linears
        .into_iter()
        .filter_map(|l| l.adapter())
        .flat_map(Adapter::params)
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// For every method and shape, the factors' gradients dD = c·xᵀ·(g·U) and dU = c·gᵀ·(x·D)
    /// folded by [`Adapter::fold_factor_grads`] equal autograd's gradients of the parameters
    /// through [`Adapter::adapt`], and [`Adapter::factors_in`] gives the factors of
    /// [`Adapter::factors`].
    #[test]
    fn folded_factor_gradients_match_autograd() -> Result<()> {
        let dev = Device::Cpu;
        for kind in [AdapterKind::SingLora, AdapterKind::Lora] {
            for (d_out, d_in) in [(6, 6), (9, 5), (4, 7)] {
                let w0 = Tensor::randn(0f32, 1.0, (d_out, d_in), &dev)?;
                let mut spec = AdapterSpec::new(kind, 3, 6.0);
                spec.seed = 5;
                let clock = RampClock::new(crate::adapter::ramp::RampSchedule::new(4), 2);
                let a = Adapter::init(&spec, "m", &w0, &clock)?;
                // LoRA's B starts at zero: make it non-zero so both factors matter
                for p in a.params() {
                    if p.role == ParamRole::B {
                        p.var.set(&p.var.as_tensor().randn_like(0.0, 0.5)?)?;
                    }
                }
                let x = Tensor::randn(0f32, 1.0, (8, d_in), &dev)?;
                let g = Tensor::randn(0f32, 1.0, (8, d_out), &dev)?;
                let y0 = x.matmul(&w0.t()?)?;
                let loss = (a.adapt(&x, Some(&w0), &y0)? * &g)?.sum_all()?;
                let grads = loss.backward()?;

                let (d, u, c) = a.factors()?;
                let gu = g.matmul(&u)?;
                let dd = (x.t()?.matmul(&gu)? * c)?;
                let du = (g.t()?.matmul(&x.matmul(&d)?)? * c)?;
                let folded = a.fold_factor_grads(
                    &dd.flatten_all()?.to_vec1::<f32>()?,
                    &du.flatten_all()?.to_vec1::<f32>()?,
                    &dev,
                )?;
                assert_eq!(folded.len(), a.params().len(), "{kind} {d_out}×{d_in}");
                for (var, got) in folded {
                    let want = grads.get(var.as_tensor()).expect("autograd gradient");
                    let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(diff < 1e-4, "{kind} {d_out}×{d_in}: {diff}");
                }

                let (d2, u2, c2) = a.factors_in(DType::F64)?;
                assert!(d2.is_contiguous() && u2.is_contiguous());
                assert_eq!(c, c2);
                for (p, q) in [(&d, &d2), (&u, &u2)] {
                    let diff = (p.to_dtype(DType::F64)? - q)?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f64>()?;
                    assert_eq!(diff, 0.0, "{kind} {d_out}×{d_in}");
                }
            }
        }
        Ok(())
    }

    /// The shape-only hooks agree with the adapters themselves.
    #[test]
    fn counts_and_file_tensors_match_the_adapters() -> Result<()> {
        let dev = Device::Cpu;
        for kind in [AdapterKind::SingLora, AdapterKind::Lora, AdapterKind::Dora] {
            for (d_out, d_in) in [(6, 6), (9, 5), (4, 7)] {
                let w0 = Tensor::randn(0f32, 1.0, (d_out, d_in), &dev)?;
                let a = Adapter::init(
                    &AdapterSpec::new(kind, 3, 3.0),
                    "m",
                    &w0,
                    &RampClock::new(crate::adapter::ramp::RampSchedule::none(), 0),
                )?;
                assert_eq!(a.num_params(), kind.param_count(d_out, d_in, 3));
                let suffixes: Vec<&str> = a.params().iter().map(|p| p.suffix).collect();
                assert_eq!(suffixes, kind.file_suffixes());
                assert_eq!(a.dims(), (d_out, d_in));
                let tensors: BTreeMap<String, Tensor> = a
                    .params()
                    .iter()
                    .map(|p| (p.suffix.to_string(), p.var.as_tensor().clone()))
                    .collect();
                let shape = kind.shape_from_tensors(&tensors);
                assert!(shape.is_none_or(|s| s == (d_out, d_in)));
                assert_eq!(shape.is_none(), kind.records_layer_shapes());
            }
        }
        Ok(())
    }
}
