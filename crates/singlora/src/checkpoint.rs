//! Hugging Face checkpoint directories: `config.json` plus `model.safetensors`, or sharded
//! `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`; f32, f16 and bf16.
//!
//! Every safetensors file is memory-mapped and its header validated in full on open (offsets
//! contiguous, sizes consistent with dtype × shape, file exactly covered), so a truncated or
//! forged file is refused with its path before any tensor is used.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo, TensorView};
use safetensors::{SafeTensors, View};
use serde_json::Value;

use crate::error::{Error, IoContext, Result};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";
/// diffusers' names for a component's weights (`unet/`, `vae/`).
pub const DIFFUSERS_INDEX_FILE: &str = "diffusion_pytorch_model.safetensors.index.json";
pub const DIFFUSERS_SINGLE_FILE: &str = "diffusion_pytorch_model.safetensors";

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    offsets: (usize, usize),
}

/// The bytes of a safetensors file: memory-mapped from disk, or owned (read from elsewhere).
#[derive(Debug)]
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A memory-mapped, validated safetensors file.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    mmap: Bytes,
    data_start: usize,
    tensors: BTreeMap<String, TensorMeta>,
    metadata: Option<HashMap<String, String>>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).at(path)?;
        // SAFETY: the map is read-only and the file is not modified while mapped by this process.
        let mmap = unsafe { Mmap::map(&file) }.at(path)?;
        Self::from_bytes_(path, Bytes::Mapped(mmap))
    }

    /// Parses and validates a safetensors file already in memory; `path` names it in errors.
    /// [`TensorFile::open`] does the same on a memory-mapped file.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::from_bytes_(path, Bytes::Owned(bytes))
    }

    fn from_bytes_(path: &Path, mmap: Bytes) -> Result<Self> {
        check_offsets(path, &mmap)?;
        let (n, meta) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::bad_file(path, format!("is not a valid safetensors file: {e}")))?;
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                (
                    name,
                    TensorMeta {
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        offsets: info.data_offsets,
                    },
                )
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            data_start: 8 + n,
            metadata: meta.metadata().clone(),
            tensors,
            mmap,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors.get(name)
    }

    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }

    /// Loads one tensor onto `device` in its stored dtype.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let m = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::bad_file(&self.path, format!("has no tensor `{name}`")))?;
        let data = self
            .data_start
            .checked_add(m.offsets.0)
            .zip(self.data_start.checked_add(m.offsets.1))
            .and_then(|(start, end)| self.mmap.get(start..end))
            .ok_or_else(|| {
                Error::bad_file(&self.path, format!("tensor `{name}` lies beyond the file"))
            })?;
        let view = TensorView::new(m.dtype, m.shape.clone(), data)
            .map_err(|e| Error::bad_file(&self.path, format!("tensor `{name}`: {e}")))?;
        view.load(device).map_err(|e| {
            Error::bad_file(&self.path, format!("tensor `{name}` cannot be loaded: {e}"))
        })
    }

    /// Every tensor, loaded.
    pub fn load_all(&self, device: &Device) -> Result<BTreeMap<String, Tensor>> {
        self.names()
            .map(|n| Ok((n.to_string(), self.load(n, device)?)))
            .collect()
    }
}

/// Refuses a header whose `data_offsets` point past the end of the file. The safetensors crate
/// checks that the offsets are contiguous and end exactly at the end of the file, but sums them
/// unchecked first, so offsets near `usize::MAX` overflow (a panic in a debug build). Headers it
/// cannot read at all are left to it to report.
fn check_offsets(path: &Path, buf: &[u8]) -> Result<()> {
    let Some(len) = buf.first_chunk::<8>().map(|n| u64::from_le_bytes(*n)) else {
        return Ok(());
    };
    let Some(header) = usize::try_from(len)
        .ok()
        .and_then(|n| buf.get(8..n.checked_add(8)?))
    else {
        return Ok(());
    };
    let Ok(Value::Object(entries)) = serde_json::from_slice::<Value>(header) else {
        return Ok(());
    };
    let data_len = (buf.len() - 8 - header.len()) as u64;
    for (name, entry) in &entries {
        let Some(offsets) = entry.get("data_offsets").and_then(Value::as_array) else {
            continue;
        };
        if offsets
            .iter()
            .any(|o| o.as_u64().is_some_and(|o| o > data_len))
        {
            return Err(Error::bad_file(
                path,
                format!(
                    "is not a valid safetensors file: tensor `{name}` has data_offsets {} \
                     beyond the {data_len} bytes of tensor data",
                    Value::Array(offsets.clone())
                ),
            ));
        }
    }
    Ok(())
}

/// Writes tensors as a safetensors file with `{"format": "pt"}` metadata (transformers needs it),
/// atomically and with the mode every output gets ([`crate::atomic::write_with`]). Tensors are
/// laid out as the safetensors crate lays them out: larger dtypes first, then by name, so each
/// one starts aligned to its element size.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<&HashMap<String, String>>,
) -> Result<()> {
    let mut meta = metadata.cloned().unwrap_or_default();
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    let mut entries: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    entries.sort_by(|(a, x), (b, y)| View::dtype(y).cmp(&View::dtype(x)).then(a.cmp(b)));
    let mut infos = Vec::with_capacity(entries.len());
    let mut offset = 0;
    for (name, t) in &entries {
        let n = View::data_len(t);
        infos.push((
            name.to_string(),
            TensorInfo {
                dtype: View::dtype(t),
                shape: t.dims().to_vec(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let bad =
        |e: &dyn std::fmt::Display| Error::bad_file(path, format!("could not be written: {e}"));
    let header = Metadata::new(Some(meta), infos).map_err(|e| bad(&e))?;
    let mut header = serde_json::to_vec(&header).map_err(|e| bad(&e))?;
    header.resize(header.len().next_multiple_of(8), b' ');
    crate::atomic::write_with(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (_, t) in &entries {
            w.write_all(&View::data(t))?;
        }
        Ok(())
    })
}

/// Reads a JSON file, naming it in errors.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(path, format!("is not valid JSON: {e}")))
}

/// A Hugging Face checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: Value,
    files: Vec<TensorFile>,
    /// tensor name → index into `files`.
    location: BTreeMap<String, usize>,
    /// The index JSON of a sharded checkpoint.
    index: Option<Value>,
    /// The index's file name (`model.safetensors.index.json` or diffusers' names).
    index_name: String,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::msg(format!(
                "{}: not a directory (expected a Hugging Face checkpoint with config.json and *.safetensors)",
                dir.display()
            )));
        }
        let config = read_json(&dir.join("config.json"))?;
        // transformers' names first, then diffusers' (a U-Net or VAE folder)
        // transformers' names, then diffusers' (a U-Net or VAE folder), each also as the
        // half-precision variant some repositories ship alone (`*.fp16.safetensors`)
        let candidates = [
            (INDEX_FILE.to_string(), SINGLE_FILE.to_string()),
            (
                DIFFUSERS_INDEX_FILE.to_string(),
                DIFFUSERS_SINGLE_FILE.to_string(),
            ),
            (
                INDEX_FILE.replace(".safetensors", ".fp16.safetensors"),
                SINGLE_FILE.replace(".safetensors", ".fp16.safetensors"),
            ),
            (
                DIFFUSERS_INDEX_FILE.replace(".safetensors", ".fp16.safetensors"),
                DIFFUSERS_SINGLE_FILE.replace(".safetensors", ".fp16.safetensors"),
            ),
        ];
        let (index_name, single_name) = candidates
            .iter()
            .find(|(i, s)| dir.join(i).exists() || dir.join(s).exists())
            .cloned()
            .unwrap_or_else(|| candidates[0].clone());
        let index_path = dir.join(&index_name);
        let mut files = vec![];
        let mut location = BTreeMap::new();
        let index = if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    Error::bad_field(&index_path, "weight_map", "is missing or not an object")
                })?;
            let mut shard_of: BTreeMap<String, usize> = BTreeMap::new();
            for (tensor, shard) in map {
                // A file beside the index: no directories, so the index cannot name any file.
                let shard = shard
                    .as_str()
                    .filter(|s| Path::new(s).file_name() == Some(std::ffi::OsStr::new(s)))
                    .ok_or_else(|| {
                        Error::bad_field(
                            &index_path,
                            format!("weight_map.{tensor}"),
                            format!("must be the name of a file beside the index, found {shard}"),
                        )
                    })?;
                let i = match shard_of.get(shard) {
                    Some(i) => *i,
                    None => {
                        files.push(TensorFile::open(&dir.join(shard))?);
                        shard_of.insert(shard.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if files[i].meta(tensor).is_none() {
                    return Err(Error::bad_file(
                        &index_path,
                        format!("lists tensor `{tensor}` in {shard}, which does not hold it"),
                    ));
                }
                location.insert(tensor.clone(), i);
            }
            Some(index)
        } else if dir.join(&single_name).exists() {
            let f = TensorFile::open(&dir.join(&single_name))?;
            for n in f.names() {
                location.insert(n.to_string(), 0);
            }
            files.push(f);
            None
        } else {
            return Err(Error::msg(format!(
                "{}: no {SINGLE_FILE}, {INDEX_FILE}, {DIFFUSERS_SINGLE_FILE} or {DIFFUSERS_INDEX_FILE} found",
                dir.display()
            )));
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            files,
            location,
            index,
            index_name,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &Value {
        &self.config
    }

    pub fn files(&self) -> &[TensorFile] {
        &self.files
    }

    /// The file name of the index, where the checkpoint is sharded.
    pub fn index_name(&self) -> &str {
        &self.index_name
    }

    pub fn index(&self) -> Option<&Value> {
        self.index.as_ref()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.location
            .get(name)
            .and_then(|i| self.files[*i].meta(name))
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&TensorFile> {
        self.location.get(name).map(|i| &self.files[*i])
    }

    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let f = self.file_of(name).ok_or_else(|| {
            Error::msg(format!(
                "{}: the checkpoint has no tensor `{name}`",
                self.dir.display()
            ))
        })?;
        f.load(name, device)
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.location
            .keys()
            .filter_map(|n| self.meta(n))
            .map(|m| m.shape.iter().product::<usize>())
            .sum()
    }

    /// Modules with a 2-D `.weight`: (module path, (rows, cols)) as stored.
    pub fn matrices(&self) -> Vec<(String, (usize, usize))> {
        self.location
            .keys()
            .filter_map(|n| {
                let module = n.strip_suffix(".weight")?;
                match self.meta(n)?.shape.as_slice() {
                    [a, b] => Some((module.to_string(), (*a, *b))),
                    _ => None,
                }
            })
            .collect()
    }
}

/// candle's dtype for a safetensors dtype, for the float types a checkpoint may hold.
pub fn float_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}
