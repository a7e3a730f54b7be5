//! Merging a U-Net adapter into a diffusers folder (`model_index.json`, `unet/`, `vae/`, …):
//! the U-Net's adapted weights become W0 + ΔW in its own files and sharding (the same rules as
//! for a transformers checkpoint), and every other component is copied as it is, so the output
//! loads with `StableDiffusionPipeline.from_pretrained` and carries no adapter.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;

use super::{
    base_weight, merge_layers, output_dir, write_merged_checkpoint, MergeOptions, MergeReport,
};
use crate::adapter::file::AdapterFile;
use crate::checkpoint::Checkpoint;
use crate::diffusion::files::UNET_PREFIX;
use crate::error::{Error, IoContext, Result};

/// Whether `dir` is a diffusers pipeline folder.
pub fn is_pipeline(dir: &Path) -> bool {
    dir.join("model_index.json").is_file()
}

/// Merges `adapter` (U-Net layers) into the pipeline folder `base`, writing `out`.
pub(super) fn merge_pipeline(
    base: &Path,
    adapter: &Path,
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let af = AdapterFile::read(adapter, &Device::Cpu)?;
    if let Some(m) = af.layers.keys().find(|m| !m.starts_with(UNET_PREFIX)) {
        return Err(Error::msg(format!(
            "{} is a diffusers pipeline, but the adapter's layer `{m}` is not a U-Net layer (`{UNET_PREFIX}…`)",
            base.display()
        )));
    }
    if !af.heads.is_empty() {
        return Err(Error::msg(
            "the adapter holds a classification head, which a diffusion pipeline has no place for",
        ));
    }
    let unet_dir = base.join("unet");
    let ckpt = Checkpoint::open(&unet_dir)?;
    let (staged, cleaned) = output_dir(base, adapter, out, opts)?;
    let (merged, max_abs_change) = merge_layers(
        &af,
        |name| {
            let module = name.strip_suffix(".weight").unwrap_or(name);
            base_weight(
                &ckpt,
                module.strip_prefix(UNET_PREFIX).unwrap_or(module),
                false,
            )
        },
        opts.dtype,
    )?;
    let merged: BTreeMap<_, _> = merged
        .into_iter()
        .map(|(k, t)| (k.strip_prefix(UNET_PREFIX).unwrap_or(&k).to_string(), t))
        .collect();
    let unet_out = staged.path().join("unet");
    std::fs::create_dir_all(&unet_out).at(&unet_out)?;
    let mut config = ckpt.config().clone();
    if let Some(dt) = opts.dtype {
        config["torch_dtype"] = serde_json::json!(super::dtype_name(dt));
    }
    let files = write_merged_checkpoint(&ckpt, &unet_out, merged, BTreeMap::new(), opts, config)?;
    for entry in std::fs::read_dir(base).at(base)? {
        let entry = entry.at(base)?;
        if entry.file_name() == "unet" {
            continue;
        }
        copy_tree(&entry.path(), &staged.path().join(entry.file_name()))?;
    }
    staged.commit()?;
    Ok(MergeReport {
        files: files.into_iter().map(|f| format!("unet/{f}")).collect(),
        ..MergeReport::of(&af, max_abs_change, None, cleaned)
    })
}

/// Copies a file, or a folder with everything in it.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to).at(to)?;
        for entry in std::fs::read_dir(from).at(from)? {
            let entry = entry.at(from)?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(from, to).at(from).map(|_| ())
    }
}
