//! `singlora export-lora`: a SingLoRA adapter rewritten as a plain rank-r PEFT LoRA adapter.
//!
//! ΔW = s·u·A_out·A_inᵀ = B·A with B = s·u·A_out (d_out × r) and A = A_inᵀ (r × d_in); the file
//! says `lora_alpha = r` and `use_rslora = false`, so every LoRA consumer applies scale 1 and
//! gets exactly our ΔW (u of the saved step is baked into B). Per-layer ranks from
//! `rank_pattern` get an `alpha_pattern` with the same keys and α = r.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::adapter::file::AdapterFile;
use crate::adapter::AdapterKind;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// One layer as plain LoRA factors with every scale folded into B, so ΔW = B·A exactly
/// (α = r for a consumer): SingLoRA's B = s·u·A_out, A = A_inᵀ; LoRA's B = s·B. DoRA's
/// magnitude rides along unchanged (its direction is W0 + B·A either way).
#[derive(Debug, Clone)]
pub struct PlainLora {
    /// r × d_in, f32.
    pub a: Tensor,
    /// d_out × r, f32.
    pub b: Tensor,
    /// DoRA's m (d_out), f32.
    pub magnitude: Option<Tensor>,
}

/// [`PlainLora`] of `module`. `base` supplies the layer shape when a SingLoRA file does not
/// record it (adapters written by other tools).
pub fn plain_lora_layer(
    af: &AdapterFile,
    module: &str,
    base: Option<&Checkpoint>,
) -> Result<PlainLora> {
    let tensors = af
        .layers
        .get(module)
        .ok_or_else(|| Error::msg(format!("the adapter has no layer `{module}`")))?;
    let s = af.config.scale_for(module);
    let f32c = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    if af.config.kind != AdapterKind::SingLora {
        let a = tensors["lora_A.weight"].to_dtype(DType::F64)?;
        let b = (tensors["lora_B.weight"].to_dtype(DType::F64)? * s)?;
        let magnitude = tensors
            .get("lora_magnitude_vector")
            .or_else(|| tensors.get("lora_magnitude_vector.weight"))
            .map(|m| f32c(m.clone()))
            .transpose()?;
        return Ok(PlainLora {
            a: f32c(a)?,
            b: f32c(b)?,
            magnitude,
        });
    }
    let (d_out, d_in) = af.layer_shape(module, base)?.ok_or_else(|| {
        Error::msg(format!(
            "the adapter does not record the shape of `{module}` (no `layer_shapes` in its config); pass --base"
        ))
    })?;
    let a = &tensors["singlora_A.weight"];
    let (n, _) = a.dims2()?;
    if n != d_out.max(d_in) {
        return Err(Error::bad_tensor(
            format!("base_model.model.{module}.singlora_A.weight"),
            format!("has {n} rows but the layer is {d_out} × {d_in}"),
        ));
    }
    let a = a.to_dtype(DType::F64)?;
    let c = s * af.config.u();
    Ok(PlainLora {
        a: f32c(a.narrow(0, 0, d_in)?.t()?)?,
        b: f32c((a.narrow(0, 0, d_out)? * c)?)?,
        magnitude: None,
    })
}

/// The LoRA image of a SingLoRA adapter file. `base` supplies layer shapes when the file does
/// not record them (adapters written by other tools).
pub fn to_lora(af: &AdapterFile, base: Option<&Checkpoint>) -> Result<AdapterFile> {
    if af.config.kind != AdapterKind::SingLora {
        return Err(Error::msg(format!(
            "export-lora rewrites SingLoRA adapters; this one is already {} (peft_type LORA)",
            af.config.kind
        )));
    }
    let mut layers = BTreeMap::new();
    for module in af.layers.keys() {
        let p = plain_lora_layer(af, module, base)?;
        let mut out = BTreeMap::new();
        out.insert("lora_A.weight".to_string(), p.a);
        out.insert("lora_B.weight".to_string(), p.b);
        layers.insert(module.clone(), out);
    }
    let mut config = af.config.clone();
    config.kind = AdapterKind::Lora;
    config.lora_alpha = config.r as f64;
    config.use_rslora = false;
    config.alpha_pattern = config
        .rank_pattern
        .iter()
        .map(|(k, r)| (k.clone(), *r as f64))
        .collect();
    config.ramp_steps = 0;
    config.step = 0;
    config.init = None;
    config.layer_shapes.clear();
    Ok(AdapterFile {
        config,
        layers,
        heads: af.heads.clone(),
        chat_template: af.chat_template.clone(),
    })
}

/// Reads `adapter`, converts it and writes `out` atomically.
pub fn export_lora(
    adapter: &Path,
    out: &Path,
    base: Option<&Path>,
    overwrite: bool,
) -> Result<(AdapterFile, Vec<std::path::PathBuf>)> {
    let af = AdapterFile::read(adapter, &Device::Cpu)?;
    let ckpt = base.map(Checkpoint::open).transpose()?;
    let lora = to_lora(&af, ckpt.as_ref())?;
    let mut inputs = vec![("--adapter", adapter)];
    inputs.extend(base.map(|b| ("--base", b)));
    let cleaned = lora.write_output(out, overwrite, &inputs)?;
    Ok((lora, cleaned))
}

/// ΔW of one layer of a LoRA-family file in f64 (B·A·s), for checks.
pub fn lora_delta(af: &AdapterFile, module: &str) -> Result<Tensor> {
    let t = &af.layers[module];
    let a = t["lora_A.weight"].to_dtype(DType::F64)?;
    let b = t["lora_B.weight"].to_dtype(DType::F64)?;
    Ok((b.matmul(&a)? * af.config.scale_for(module))?)
}
