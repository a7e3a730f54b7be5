//! U-Net adapters in the files diffusers and ComfyUI / A1111 load.
//!
//! Every method is written as plain LoRA factors with its whole scale folded into B, so that
//! ΔW = B·A exactly and a loader that assumes α = r (or reads the α we write, = r) applies
//! scale 1 ([`crate::adapter::export::plain_lora_layer`]): SingLoRA's B = s·u·A_out, A = A_inᵀ.
//!
//! - **diffusers** (`pytorch_lora_weights.safetensors`, what `pipe.load_lora_weights(dir)`
//!   reads): `unet.<module path>.lora_A.weight` (r × d_in), `.lora_B.weight` (d_out × r) and,
//!   for DoRA, `.lora_magnitude_vector` (d_out), where `<module path>` is diffusers' name of the
//!   layer in `UNet2DConditionModel` (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
//! - **kohya** (ComfyUI's and A1111's LoRA loaders): `lora_unet_<module path with `_` for
//!   `.`>.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha` (a scalar, = r), with
//!   sd-scripts' `ss_network_*` metadata. DoRA has no agreed layout there and is refused.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{Device, Tensor};

use crate::adapter::export::plain_lora_layer;
use crate::adapter::file::AdapterFile;
use crate::adapter::AdapterKind;
use crate::atomic::StagedDir;
use crate::checkpoint::write_safetensors;
use crate::error::{Error, Result};

/// The name diffusers looks for in a LoRA directory.
pub const DIFFUSERS_FILE: &str = "pytorch_lora_weights.safetensors";
/// The kohya-format file singlora writes beside it.
pub const KOHYA_FILE: &str = "lora_kohya.safetensors";
/// The prefix of U-Net module paths in adapter files, as diffusers' PEFT integration names them.
pub const UNET_PREFIX: &str = "unet.";

/// The file layouts `export-lora` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`).
    Peft,
    /// `pytorch_lora_weights.safetensors`, for diffusers.
    Diffusers,
    /// kohya / A1111 keys, for ComfyUI and A1111.
    Kohya,
    /// A llama.cpp LoRA adapter GGUF ([`crate::gguf::lora`]).
    Gguf,
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExportFormat::Peft => "peft",
            ExportFormat::Diffusers => "diffusers",
            ExportFormat::Kohya => "kohya",
            ExportFormat::Gguf => "gguf",
        })
    }
}

impl FromStr for ExportFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "peft" => Ok(ExportFormat::Peft),
            "diffusers" => Ok(ExportFormat::Diffusers),
            "kohya" | "comfyui" | "a1111" => Ok(ExportFormat::Kohya),
            "gguf" | "llama.cpp" => Ok(ExportFormat::Gguf),
            _ => Err(Error::msg(format!(
                "unknown export format `{s}`: expected peft, diffusers, kohya or gguf"
            ))),
        }
    }
}

/// Refuses an adapter whose layers are not all U-Net layers (diffusers and kohya files name
/// the component each layer belongs to).
fn unet_modules(af: &AdapterFile) -> Result<Vec<&str>> {
    let mut out = vec![];
    for m in af.layers.keys() {
        if !m.starts_with(UNET_PREFIX) {
            return Err(Error::msg(format!(
                "layer `{m}` is not a Stable Diffusion U-Net layer: the diffusers and kohya formats are for adapters trained with train-diffusion (use --format peft for text models)"
            )));
        }
        out.push(m.as_str());
    }
    if out.is_empty() {
        return Err(Error::msg("the adapter has no layers to export"));
    }
    Ok(out)
}

/// The diffusers file's tensors.
pub fn diffusers_tensors(af: &AdapterFile) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for module in unet_modules(af)? {
        let p = plain_lora_layer(af, module, None)?;
        out.insert(format!("{module}.lora_A.weight"), p.a);
        out.insert(format!("{module}.lora_B.weight"), p.b);
        if let Some(m) = p.magnitude {
            out.insert(format!("{module}.lora_magnitude_vector"), m);
        }
    }
    Ok(out)
}

/// kohya's name of a U-Net layer: `lora_unet_` + its diffusers path with `_` for `.`.
pub fn kohya_name(module: &str) -> String {
    format!("lora_{}", module.replace('.', "_"))
}

/// The kohya file's tensors and metadata.
pub fn kohya_tensors(
    af: &AdapterFile,
) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    if af.config.kind == AdapterKind::Dora {
        return Err(Error::msg(
            "a DoRA adapter has no kohya layout that ComfyUI and A1111 agree on; export it with --format diffusers",
        ));
    }
    let mut out = BTreeMap::new();
    let mut rank = 0;
    for module in unet_modules(af)? {
        let p = plain_lora_layer(af, module, None)?;
        let r = p.a.dim(0)?;
        rank = rank.max(r);
        let name = kohya_name(module);
        out.insert(format!("{name}.lora_down.weight"), p.a);
        out.insert(format!("{name}.lora_up.weight"), p.b);
        out.insert(
            format!("{name}.alpha"),
            Tensor::new(r as f32, &Device::Cpu)?,
        );
    }
    let meta = HashMap::from([
        ("ss_network_module".to_string(), "networks.lora".to_string()),
        ("ss_network_dim".to_string(), rank.to_string()),
        ("ss_network_alpha".to_string(), rank.to_string()),
        (
            "ss_training_comment".to_string(),
            format!(
                "singlora {} adapter written as plain LoRA (scale folded into lora_up)",
                af.config.kind
            ),
        ),
    ]);
    Ok((out, meta))
}

/// Writes the diffusers file (`DIR/pytorch_lora_weights.safetensors`) into an existing
/// directory.
pub fn write_diffusers_into(af: &AdapterFile, dir: &Path) -> Result<PathBuf> {
    let p = dir.join(DIFFUSERS_FILE);
    write_safetensors(&p, &diffusers_tensors(af)?, None)?;
    Ok(p)
}

/// Writes the kohya file (`DIR/lora_kohya.safetensors`) into an existing directory.
pub fn write_kohya_into(af: &AdapterFile, dir: &Path) -> Result<PathBuf> {
    let (t, meta) = kohya_tensors(af)?;
    let p = dir.join(KOHYA_FILE);
    write_safetensors(&p, &t, Some(&meta))?;
    Ok(p)
}

/// `export-lora --format diffusers|kohya`: reads `adapter` and writes the directory `out`
/// (atomically) with the one file; returns what interrupted writes had left and was removed.
pub fn export(
    adapter: &Path,
    out: &Path,
    format: ExportFormat,
    overwrite: bool,
) -> Result<(PathBuf, Vec<PathBuf>)> {
    let af = AdapterFile::read(adapter, &Device::Cpu)?;
    let (staged, cleaned) = StagedDir::output(out, overwrite, &[("--adapter", adapter)])?;
    let written = match format {
        ExportFormat::Diffusers => write_diffusers_into(&af, staged.path())?,
        ExportFormat::Kohya => write_kohya_into(&af, staged.path())?,
        ExportFormat::Peft | ExportFormat::Gguf => {
            return Err(Error::msg(
                "the PEFT and GGUF formats are written by crate::adapter::export::export_lora and crate::gguf::lora::export_lora_gguf",
            ))
        }
    };
    let name = written.file_name().map(PathBuf::from).unwrap_or_default();
    staged.commit()?;
    Ok((out.join(name), cleaned))
}
