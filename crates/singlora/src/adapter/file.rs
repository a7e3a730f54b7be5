//! Adapter directories: `adapter_config.json` + `adapter_model.safetensors`, as PEFT writes them.
//!
//! Tensor keys are `base_model.model.<module path>.<suffix>` with the suffixes
//! `singlora_A.weight` (SingLoRA, (max(d_in, d_out), r), f32), `lora_A.weight` (r × d_in),
//! `lora_B.weight` (d_out × r) and `lora_magnitude_vector` (DoRA, d_out); a fully trained head
//! listed in `modules_to_save` is stored under `base_model.model.<head path>.weight` / `.bias`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;

use crate::adapter::config::{AdapterConfig, CONFIG_FILE, WEIGHTS_FILE};
use crate::adapter::ramp::RampClock;
use crate::adapter::target::TargetSpec;
use crate::adapter::{check_finite, Adapter};
use crate::atomic::StagedDir;
use crate::checkpoint::{write_safetensors, Checkpoint, TensorFile};
use crate::error::{Error, Result};

pub const KEY_PREFIX: &str = "base_model.model.";

/// Per-layer tensor suffixes, in the order they are tried (longest first).
const SUFFIXES: &[&str] = &[
    "singlora_A.weight",
    "lora_A.weight",
    "lora_B.weight",
    "lora_magnitude_vector.weight",
    "lora_magnitude_vector",
];

/// The contents of an adapter directory.
#[derive(Debug, Clone)]
pub struct AdapterFile {
    pub config: AdapterConfig,
    /// module path → suffix → tensor.
    pub layers: BTreeMap<String, BTreeMap<String, Tensor>>,
    /// Fully trained module tensors (`modules_to_save`), keyed by their model name.
    pub heads: BTreeMap<String, Tensor>,
    /// The chat template the adapter was trained with when it was not the model's own
    /// (`chat_template.jinja` beside the two files).
    pub chat_template: Option<String>,
}

fn split_key(key: &str) -> Option<(&str, &'static str)> {
    SUFFIXES.iter().find_map(|s| {
        key.strip_suffix(s)
            .and_then(|m| m.strip_suffix('.'))
            .map(|m| (m, *s))
    })
}

impl AdapterFile {
    /// Reads and validates an adapter directory: config fields, tensor keys and dtypes (F32,
    /// F16 or BF16), the tensors each method needs, finiteness of every tensor, and that the
    /// config and the file name the same layers. Every command that reads an adapter (merge,
    /// export-lora, inspect, eval, predict) comes through here.
    pub fn read(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::msg(format!(
                "{}: not a directory (expected an adapter directory with {CONFIG_FILE} and {WEIGHTS_FILE})",
                dir.display()
            )));
        }
        let config = AdapterConfig::read(dir)?;
        let file = TensorFile::open(&dir.join(WEIGHTS_FILE))?;
        let mut af = Self::from_parts(config, &file, device)?;
        let template = dir.join(crate::model::CHAT_TEMPLATE_FILE);
        if template.exists() {
            af.chat_template = Some(crate::data::read_chat_template_file(&template)?);
        }
        Ok(af)
    }

    /// Validates an adapter made of a parsed config and its opened weights file (what
    /// [`AdapterFile::read`] does after reading the two files).
    pub fn from_parts(config: AdapterConfig, file: &TensorFile, device: &Device) -> Result<Self> {
        let path = file.path();
        let mut layers: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
        let mut heads = BTreeMap::new();
        for key in file.names() {
            let dtype = file.meta(key).map(|m| m.dtype);
            if !matches!(dtype, Some(Dtype::F32 | Dtype::F16 | Dtype::BF16)) {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "tensor `{key}` is {}; adapter tensors must be F32, F16 or BF16",
                        dtype.map_or("unreadable".into(), |d| format!("{d:?}"))
                    ),
                ));
            }
            let t = file.load(key, device)?;
            check_finite(&t, key).map_err(|e| Error::bad_file(path, e.to_string()))?;
            let name = key.strip_prefix(KEY_PREFIX).ok_or_else(|| {
                Error::bad_file(
                    path,
                    format!("tensor `{key}` does not start with `{KEY_PREFIX}`"),
                )
            })?;
            if let Some((module, suffix)) = split_key(name) {
                // PEFT has written DoRA's magnitude with and without `.weight`.
                let suffix = if suffix.starts_with("lora_magnitude") {
                    "lora_magnitude_vector"
                } else {
                    suffix
                };
                layers
                    .entry(module.to_string())
                    .or_default()
                    .insert(suffix.to_string(), t);
            } else if config.modules_to_save.iter().any(|m| {
                name.strip_prefix(m.as_str())
                    .is_some_and(|r| r.starts_with('.'))
            }) {
                heads.insert(name.to_string(), t);
            } else {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "tensor `{key}` is neither an adapter tensor nor part of modules_to_save"
                    ),
                ));
            }
        }
        if layers.is_empty() && heads.is_empty() {
            return Err(Error::bad_file(path, "holds no adapter tensors"));
        }
        let af = Self {
            config,
            layers,
            heads,
            chat_template: None,
        };
        af.check_layout(path)?;
        // The config sits beside the weights in an adapter directory.
        af.check_agreement(&path.with_file_name(CONFIG_FILE), path)?;
        Ok(af)
    }

    /// The config and the tensors name the same layers: each layer `layer_shapes` lists has
    /// tensors and each layer with tensors is listed (when the config lists any) and selected
    /// by `target_modules` / `exclude_modules`; `modules_to_save` names a head the file holds.
    fn check_agreement(&self, config_path: &Path, weights_path: &Path) -> Result<()> {
        let shapes = &self.config.layer_shapes;
        if !shapes.is_empty() {
            if let Some(m) = shapes.keys().find(|m| !self.layers.contains_key(*m)) {
                return Err(Error::bad_file(
                    weights_path,
                    format!(
                        "holds no tensors for layer `{m}`, which {CONFIG_FILE} lists in `layer_shapes` ({} layers listed, {} in the file): the file is incomplete, or it and the config belong to different adapters",
                        shapes.len(),
                        self.layers.len()
                    ),
                ));
            }
            if let Some(m) = self.layers.keys().find(|m| !shapes.contains_key(*m)) {
                return Err(Error::bad_field(
                    config_path,
                    "layer_shapes",
                    format!(
                        "does not list layer `{m}`, which {WEIGHTS_FILE} holds: the config and the tensors belong to different adapters"
                    ),
                ));
            }
        }
        let targets = TargetSpec::from_json(
            &self.config.target_modules,
            Some(&self.config.exclude_modules),
        )
        .map_err(|msg| Error::bad_field(config_path, "target_modules", msg))?;
        if let Some(m) = self.layers.keys().find(|m| !targets.matches(m)) {
            return Err(Error::bad_field(
                config_path,
                "target_modules",
                format!(
                    "does not select layer `{m}` (exclude_modules applied), which {WEIGHTS_FILE} holds: the config and the tensors belong to different adapters"
                ),
            ));
        }
        // PEFT lists both `classifier` and `score` for a sequence classifier and saves the one
        // the model has, so one listed head with tensors is enough.
        let has_head = |m: &String| {
            self.heads.keys().any(|k| {
                k.strip_prefix(m.as_str())
                    .is_some_and(|r| r.starts_with('.'))
            })
        };
        let listed = &self.config.modules_to_save;
        if !listed.is_empty() && !listed.iter().any(has_head) {
            return Err(Error::bad_field(
                config_path,
                "modules_to_save",
                format!(
                    "lists {} but {WEIGHTS_FILE} holds no tensors of {}",
                    listed
                        .iter()
                        .map(|m| format!("`{m}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if listed.len() == 1 {
                        "it"
                    } else {
                        "any of them"
                    }
                ),
            ));
        }
        Ok(())
    }

    /// Each layer holds exactly the tensors its method needs.
    fn check_layout(&self, path: &Path) -> Result<()> {
        let want = self.config.kind.file_suffixes();
        for (module, tensors) in &self.layers {
            for w in want {
                if !tensors.contains_key(*w) {
                    return Err(Error::bad_file(
                        path,
                        format!(
                            "tensor `{KEY_PREFIX}{module}.{w}` is missing (the config says {})",
                            self.config.kind
                        ),
                    ));
                }
            }
            for (have, t) in tensors {
                if !want.contains(&have.as_str()) {
                    return Err(Error::bad_file(
                        path,
                        format!(
                            "tensor `{KEY_PREFIX}{module}.{have}` does not belong to a {} adapter",
                            self.config.kind
                        ),
                    ));
                }
                // A and B are matrices, DoRA's magnitude a vector.
                let rank = if have.starts_with("lora_magnitude") {
                    1
                } else {
                    2
                };
                if t.rank() != rank {
                    return Err(Error::bad_file(
                        path,
                        format!(
                            "tensor `{KEY_PREFIX}{module}.{have}` has shape {:?}, not {rank}-D",
                            t.dims()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The (d_out, d_in) of `module`: from the recorded `layer_shapes` or the tensors, else
    /// from `base`; None where neither says.
    pub fn layer_shape(
        &self,
        module: &str,
        base: Option<&Checkpoint>,
    ) -> Result<Option<(usize, usize)>> {
        if let Some(s) = self.config.layer_shapes.get(module) {
            return Ok(Some(*s));
        }
        if let Some(s) = self
            .layers
            .get(module)
            .and_then(|t| self.config.kind.shape_from_tensors(t))
        {
            return Ok(Some(s));
        }
        match base {
            Some(ck) => Ok(Some(
                crate::merge::base_weight(ck, module, self.config.fan_in_fan_out)?.dims2()?,
            )),
            None => Ok(None),
        }
    }

    /// The ramp clock at the saved step.
    pub fn clock(&self) -> RampClock {
        RampClock::new(self.config.ramp(), self.config.step)
    }

    /// Rebuilds the adapter of `module` on the base weight `w0` (d_out × d_in).
    pub fn build_adapter(&self, module: &str, w0: &Tensor, clock: &RampClock) -> Result<Adapter> {
        let tensors = self
            .layers
            .get(module)
            .ok_or_else(|| Error::msg(format!("the adapter has no layer `{module}`")))?;
        let tensors: BTreeMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_device(w0.device())?)))
            .collect::<Result<_>>()?;
        Adapter::from_tensors(
            self.config.kind,
            &format!("{KEY_PREFIX}{module}"),
            &tensors,
            w0,
            self.config.rank_for(module),
            self.config.scale_for(module),
            clock,
        )
    }

    /// Collects trained adapters (and head tensors) into a file image.
    pub fn from_adapters<'a>(
        mut config: AdapterConfig,
        adapters: impl IntoIterator<Item = (&'a str, (usize, usize), &'a Adapter)>,
        heads: BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        let mut layers = BTreeMap::new();
        for (module, shape, adapter) in adapters {
            if adapter.kind() != config.kind {
                return Err(Error::msg(format!(
                    "layer {module} holds a {} adapter but the config says {}",
                    adapter.kind(),
                    config.kind
                )));
            }
            let tensors = adapter
                .params()
                .into_iter()
                .map(|p| {
                    Ok((
                        p.suffix.to_string(),
                        p.var.as_tensor().to_dtype(DType::F32)?,
                    ))
                })
                .collect::<Result<BTreeMap<_, _>>>()?;
            if config.kind.records_layer_shapes() {
                config.layer_shapes.insert(module.to_string(), shape);
            }
            layers.insert(module.to_string(), tensors);
        }
        Ok(Self {
            config,
            layers,
            heads,
            chat_template: None,
        })
    }

    /// All tensors under their file keys.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (module, ts) in &self.layers {
            for (suffix, t) in ts {
                out.insert(format!("{KEY_PREFIX}{module}.{suffix}"), t.clone());
            }
        }
        for (name, t) in &self.heads {
            out.insert(format!("{KEY_PREFIX}{name}"), t.clone());
        }
        out
    }

    /// Writes the directory atomically; refuses NaN/Inf and an existing `dir` unless
    /// `overwrite` (and singlora wrote it).
    pub fn write(&self, dir: &Path, overwrite: bool) -> Result<()> {
        self.write_output(dir, overwrite, &[])?;
        Ok(())
    }

    /// [`Self::write`] for an output made from `inputs` (role, path), which it may not overlap;
    /// returns what interrupted writes had left beside it and was removed.
    pub fn write_output(
        &self,
        dir: &Path,
        overwrite: bool,
        inputs: &[(&str, &Path)],
    ) -> Result<Vec<std::path::PathBuf>> {
        let (staged, cleaned) = StagedDir::output(dir, overwrite, inputs)?;
        self.write_into(staged.path())?;
        staged.commit()?;
        Ok(cleaned)
    }

    /// Writes the two files into an existing directory (the caller makes it atomic).
    pub fn write_into(&self, dir: &Path) -> Result<()> {
        let tensors = self.tensors();
        for (k, t) in &tensors {
            check_finite(t, k)?;
        }
        let json =
            serde_json::to_string_pretty(&self.config.to_json()).expect("JSON values serialise");
        let cfg_path = dir.join(CONFIG_FILE);
        std::fs::write(&cfg_path, json + "\n").map_err(|e| Error::io(&cfg_path, e))?;
        if let Some(t) = &self.chat_template {
            let p = dir.join(crate::model::CHAT_TEMPLATE_FILE);
            std::fs::write(&p, t).map_err(|e| Error::io(&p, e))?;
        }
        write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, None)
    }

    /// Trainable parameters in the adapter layers (heads excluded).
    pub fn num_adapter_params(&self) -> usize {
        self.layers
            .values()
            .flat_map(|ts| ts.values())
            .map(Tensor::elem_count)
            .sum()
    }
}
