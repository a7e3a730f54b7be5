//! Where a model's frozen weights come from: a safetensors checkpoint directory, or tensors
//! already in memory (a GGUF file, dequantised or with its quantised linear weights kept),
//! loaded onto a device in a chosen dtype.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::quant::QuantWeight;

pub enum Weights {
    Checkpoint(Checkpoint),
    /// Tensors in memory (a GGUF file dequantised at load), with the file they came from.
    Memory(PathBuf, BTreeMap<String, Tensor>),
    /// Tensors with the frozen linear weights kept quantised: a GGUF file's as stored
    /// (`--base-dtype same`), or weights made quantised (the benchmarks' random NF4 ones): the
    /// dense tensors, and the kept ones by name.
    Kept(
        PathBuf,
        BTreeMap<String, Tensor>,
        BTreeMap<String, Arc<dyn QuantWeight>>,
    ),
    /// The same weights, with the frozen linear layers' weights quantised to NF4 one at a time
    /// as they load (`--base-dtype nf4`), so no dense copy of the whole model is ever held on
    /// the device.
    Nf4(Box<Weights>),
}

impl Weights {
    pub fn source(&self) -> PathBuf {
        match self {
            Weights::Checkpoint(c) => c.dir().to_path_buf(),
            Weights::Memory(p, _) | Weights::Kept(p, _, _) => p.clone(),
            Weights::Nf4(w) => w.source(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Weights::Checkpoint(c) => c.contains(name),
            Weights::Memory(_, m) => m.contains_key(name),
            Weights::Kept(_, m, k) => m.contains_key(name) || k.contains_key(name),
            Weights::Nf4(w) => w.contains(name),
        }
    }

    pub fn names(&self) -> Vec<String> {
        match self {
            Weights::Checkpoint(c) => c.names().map(str::to_string).collect(),
            Weights::Memory(_, m) => m.keys().cloned().collect(),
            Weights::Kept(_, m, k) => m.keys().chain(k.keys()).cloned().collect(),
            Weights::Nf4(w) => w.names(),
        }
    }

    /// `name` where it is kept quantised ([`Weights::Kept`]).
    pub fn kept(&self, name: &str) -> Option<Arc<dyn QuantWeight>> {
        match self {
            Weights::Kept(_, _, k) => k.get(name).cloned(),
            Weights::Nf4(w) => w.kept(name),
            _ => None,
        }
    }

    /// Whether frozen linear weights are quantised to NF4 as they load.
    pub fn quantizes_nf4(&self) -> bool {
        matches!(self, Weights::Nf4(_))
    }

    /// Elements in all the tensors (embeddings included).
    pub fn num_params(&self) -> usize {
        match self {
            Weights::Checkpoint(c) => c.num_params(),
            Weights::Memory(_, m) => m.values().map(Tensor::elem_count).sum(),
            Weights::Kept(_, m, k) => {
                let kept: usize = k.values().map(|w| w.dims().0 * w.dims().1).sum();
                m.values().map(Tensor::elem_count).sum::<usize>() + kept
            }
            Weights::Nf4(w) => w.num_params(),
        }
    }

    /// Loads `name` onto `device` as `dtype`.
    pub fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = match self {
            Weights::Checkpoint(c) => {
                if !c.contains(name) {
                    return Err(self.missing(name));
                }
                c.load(name, &Device::Cpu)?
            }
            Weights::Memory(_, m) => m.get(name).cloned().ok_or_else(|| self.missing(name))?,
            Weights::Kept(_, m, k) => match (m.get(name), k.get(name)) {
                (Some(t), _) => t.clone(),
                // dequantised for a use other than a frozen linear layer's
                (None, Some(w)) => w.to_tensor(dtype, device)?,
                (None, None) => return Err(self.missing(name)),
            },
            Weights::Nf4(w) => return w.get(name, dtype, device),
        };
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// Loads `name` and checks its shape.
    pub fn get_shaped(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = self.get(name, dtype, device)?;
        if t.dims() != shape {
            return Err(Error::bad_tensor(
                name,
                format!(
                    "in {} has shape {:?} but config.json implies {:?}",
                    self.source().display(),
                    t.dims(),
                    shape
                ),
            ));
        }
        Ok(t)
    }

    /// The first of `names` that exists.
    pub fn first_of(&self, names: &[String]) -> Option<String> {
        names.iter().find(|n| self.contains(n)).cloned()
    }

    fn missing(&self, name: &str) -> Error {
        Error::msg(format!(
            "{}: the checkpoint has no tensor `{name}` (is config.json's model type right?)",
            self.source().display()
        ))
    }
}

/// Refuses tensors of the model's own namespace (`owned`) that loading did not `read`: a
/// bias or a layer that config.json does not declare would otherwise drop out of the math
/// without a word.
pub fn refuse_unread(
    w: &Weights,
    read: &BTreeSet<String>,
    owned: impl Fn(&str) -> bool,
) -> Result<()> {
    let unread: Vec<String> = w
        .names()
        .into_iter()
        .filter(|n| owned(n) && !read.contains(n))
        .collect();
    if unread.is_empty() {
        return Ok(());
    }
    let shown = unread
        .iter()
        .take(6)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    let more = unread.len().saturating_sub(6);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    Err(Error::msg(format!(
        "{}: the checkpoint has tensors that config.json gives no place in the model: \
         {shown}{more}. Using the model without them would compute something else than \
         transformers does; check config.json (e.g. `attention_bias`, `mlp_bias`, the model \
         type) against the checkpoint",
        w.source().display()
    )))
}

/// Reads a typed field of config.json, naming it on error. A field name with dots reaches into
/// nested objects (`rope_parameters.factor`); HF's keys have no dots of their own.
pub struct ConfigReader<'a> {
    pub path: &'a Path,
    pub value: &'a Value,
}

impl ConfigReader<'_> {
    /// The value of `field`, None when absent or null (transformers reads both as unset).
    pub fn get(&self, field: &str) -> Option<&Value> {
        field
            .split('.')
            .try_fold(self.value, |v, key| v.get(key))
            .filter(|v| !v.is_null())
    }

    pub fn usize(&self, field: &str) -> Result<usize> {
        self.usize_or(field, None)
    }

    pub fn usize_or(&self, field: &str, default: Option<usize>) -> Result<usize> {
        match (self.get(field), default) {
            (Some(v), _) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                Error::bad_field(
                    self.path,
                    field,
                    format!("must be a non-negative integer, found {v}"),
                )
            }),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(Error::bad_field(
                self.path,
                field,
                "is required but missing",
            )),
        }
    }

    pub fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        self.get(field)
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    Error::bad_field(self.path, field, format!("must be a number, found {v}"))
                })
            })
            .transpose()
    }

    pub fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        Ok(self.f64_opt(field)?.unwrap_or(default))
    }

    /// A number the math cannot do without.
    pub fn f64_req(&self, field: &str) -> Result<f64> {
        self.f64_opt(field)?
            .ok_or_else(|| Error::bad_field(self.path, field, "is required but missing"))
    }

    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            Some(v) => v.as_bool().ok_or_else(|| {
                Error::bad_field(
                    self.path,
                    field,
                    format!("must be true or false, found {v}"),
                )
            }),
            None => Ok(default),
        }
    }

    pub fn str_opt(&self, field: &str) -> Result<Option<&str>> {
        self.get(field)
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    Error::bad_field(self.path, field, format!("must be a string, found {v}"))
                })
            })
            .transpose()
    }

    pub fn str_or<'b>(&'b self, field: &str, default: &'b str) -> Result<&'b str> {
        Ok(self.str_opt(field)?.unwrap_or(default))
    }

    /// The refusal of `field`'s value: a setting that changes the model's math and that
    /// singlora does not implement. `hint` says what is supported or what to do.
    pub fn unsupported(&self, field: &str, hint: impl Into<String>) -> Error {
        Error::Unsupported {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            value: self.get(field).map_or("null".into(), Value::to_string),
            hint: hint.into(),
        }
    }

    /// Refuses `field` when it is set and `supported` says no to its value.
    pub fn refuse_unless(
        &self,
        field: &str,
        supported: impl Fn(&Value) -> bool,
        hint: &str,
    ) -> Result<()> {
        match self.get(field) {
            Some(v) if !supported(v) => Err(self.unsupported(field, hint)),
            _ => Ok(()),
        }
    }
}
