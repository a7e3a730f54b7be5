//! Putting adapters on a model's linear layers (PEFT's tuner "model" part): fresh ones on the
//! modules a [`TargetSpec`] selects, or the layers of an adapter file, matched by module path.

use super::file::AdapterFile;
use super::ramp::RampClock;
use super::target::TargetSpec;
use super::{AdaptedLinear, Adapter, AdapterSpec};
use crate::error::{Error, Result};

/// Puts fresh adapters made from `spec` on the layers `targets` selects (`all-linear` leaves
/// `output_layers` alone); returns their names, in model order.
pub fn inject(
    mut linears: Vec<&mut AdaptedLinear>,
    output_layers: &[String],
    spec: &AdapterSpec,
    targets: &TargetSpec,
    clock: &RampClock,
) -> Result<Vec<String>> {
    let names: Vec<String> = linears.iter().map(|l| l.name().to_string()).collect();
    let chosen = targets.select(&names, output_layers)?;
    for l in linears
        .iter()
        .filter(|l| chosen.iter().any(|c| c == l.name()))
    {
        let (d_out, d_in) = l.dims();
        let most = d_out.min(d_in);
        if spec.r > most {
            return Err(Error::msg(format!(
                "rank {} is more than layer `{}` ({d_out} × {d_in}) can use: its update has rank \
                 at most {most}; lower the rank to {most} or leave the layer out of the targets",
                spec.r,
                l.name()
            )));
        }
    }
    for l in linears.iter_mut() {
        if chosen.iter().any(|c| c == l.name()) {
            let a = Adapter::init(spec, l.name(), &l.base().weight()?, clock)?;
            l.set_adapter(Some(a))?;
        }
    }
    Ok(chosen)
}

/// Replaces the adapters of `linears` with those of `af` (layers it does not name get none);
/// refuses a file that names a layer the model does not have.
pub fn load(
    mut linears: Vec<&mut AdaptedLinear>,
    af: &AdapterFile,
    clock: &RampClock,
) -> Result<()> {
    for module in af.layers.keys() {
        if !linears.iter().any(|l| l.name() == module) {
            return Err(Error::msg(format!(
                "the adapter has a layer `{module}` that this model does not have (its linear layers look like `{}`)",
                linears.first().map(|l| l.name()).unwrap_or_default()
            )));
        }
    }
    for l in linears.iter_mut() {
        let a = if af.layers.contains_key(l.name()) {
            let w0 = l.base().weight()?;
            Some(af.build_adapter(l.name(), &w0, clock)?)
        } else {
            None
        };
        l.set_adapter(a)?;
    }
    Ok(())
}
