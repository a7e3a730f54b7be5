//! Where a model's frozen weights come from: a safetensors checkpoint directory, or tensors
//! already in memory (a dequantised GGUF file), loaded onto a device in a chosen dtype.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

pub enum Weights {
    Checkpoint(Checkpoint),
    /// Tensors in memory (a GGUF file dequantised at load), with the file they came from.
    Memory(PathBuf, BTreeMap<String, Tensor>),
}

impl Weights {
    pub fn source(&self) -> PathBuf {
        match self {
            Weights::Checkpoint(c) => c.dir().to_path_buf(),
            Weights::Memory(p, _) => p.clone(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Weights::Checkpoint(c) => c.contains(name),
            Weights::Memory(_, m) => m.contains_key(name),
        }
    }

    pub fn names(&self) -> Vec<String> {
        match self {
            Weights::Checkpoint(c) => c.names().map(str::to_string).collect(),
            Weights::Memory(_, m) => m.keys().cloned().collect(),
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

/// Reads a typed field of config.json, naming it on error.
pub struct ConfigReader<'a> {
    pub path: &'a Path,
    pub value: &'a Value,
}

impl ConfigReader<'_> {
    pub fn usize(&self, field: &str) -> Result<usize> {
        self.usize_or(field, None)
    }

    pub fn usize_or(&self, field: &str, default: Option<usize>) -> Result<usize> {
        match (self.value.get(field).filter(|v| !v.is_null()), default) {
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

    pub fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.value.get(field).filter(|v| !v.is_null()) {
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::bad_field(self.path, field, format!("must be a number, found {v}"))
            }),
            None => Ok(default),
        }
    }

    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.value.get(field).filter(|v| !v.is_null()) {
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

    pub fn str_or<'b>(&'b self, field: &str, default: &'b str) -> &'b str {
        self.value
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or(default)
    }
}
