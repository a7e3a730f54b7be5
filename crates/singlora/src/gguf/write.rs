//! Writing GGUF files (llama.cpp's format, version 3), tensor by tensor.
//!
//! Layout, all little-endian: the magic `GGUF`, u32 version 3, u64 tensor count, u64 key/value
//! count; each key/value as a string key, a u32 value type and the value (strings are a u64
//! byte length and UTF-8 bytes; arrays a u32 element type, a u64 length and the elements); each
//! tensor's info as its name, u32 rank, u64 dimensions innermost first (the reverse of candle's
//! row-major shape), u32 ggml type and u64 offset from the start of the data; zero padding to
//! the alignment (`general.alignment`, default 32); then each tensor's bytes at its offset, every
//! offset a multiple of the alignment.
//!
//! The sizes of all tensors follow from their shapes and types, so the header is written first
//! and each tensor's data is asked for only when its turn comes: one tensor is in memory at a
//! time beyond what the caller holds. Files are staged under a temporary name and renamed into
//! place ([`write_gguf_file`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

use crate::atomic::{check_disjoint, clean_stale, try_write_with};
use crate::error::{Error, IoContext, Result};

/// The data alignment a GGUF file has when `general.alignment` does not set one.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The metadata key singlora writes into every GGUF file it makes, so that `--overwrite` can
/// tell its own outputs from anything else; llama.cpp ignores keys it does not know.
pub const WRITER_KEY: &str = "singlora.writer";

/// One tensor of a file being written: its name, row-major shape (as candle's) and ggml type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorInfo {
    /// The bytes this tensor takes in the file; refused when the innermost dimension is not a
    /// whole number of the type's blocks.
    pub fn size_in_bytes(&self) -> Result<usize> {
        let inner = self.shape.last().copied().unwrap_or(1);
        let block = self.dtype.block_size();
        if inner % block != 0 {
            return Err(Error::bad_tensor(
                &self.name,
                format!(
                    "has rows of {inner} values, not a multiple of {block} as {:?} needs",
                    self.dtype
                ),
            ));
        }
        let elems = self
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                Error::bad_tensor(&self.name, "has more elements than can be addressed")
            })?;
        Ok(elems / block * self.dtype.type_size())
    }
}

/// ggml's number for a tensor type, as the file stores it.
pub fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// GGUF's number for a metadata value type.
fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// A writer that counts the bytes written through it.
struct Counted<'a> {
    w: &'a mut dyn Write,
    /// The file being written, for errors.
    path: &'a Path,
    pos: u64,
}

impl Counted<'_> {
    fn bytes(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b).at(self.path)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn u32(&mut self, x: u32) -> Result<()> {
        self.bytes(&x.to_le_bytes())
    }

    fn u64(&mut self, x: u64) -> Result<()> {
        self.bytes(&x.to_le_bytes())
    }

    fn string(&mut self, s: &str) -> Result<()> {
        self.u64(s.len() as u64)?;
        self.bytes(s.as_bytes())
    }

    fn pad_to(&mut self, alignment: u64) -> Result<()> {
        let pad = self.pos.next_multiple_of(alignment) - self.pos;
        self.bytes(&vec![0u8; pad as usize])
    }

    /// One value, without its type tag.
    fn value(&mut self, key: &str, v: &Value) -> Result<()> {
        match v {
            Value::U8(x) => self.bytes(&[*x])?,
            Value::I8(x) => self.bytes(&x.to_le_bytes())?,
            Value::U16(x) => self.bytes(&x.to_le_bytes())?,
            Value::I16(x) => self.bytes(&x.to_le_bytes())?,
            Value::U32(x) => self.u32(*x)?,
            Value::I32(x) => self.bytes(&x.to_le_bytes())?,
            Value::F32(x) => self.bytes(&x.to_le_bytes())?,
            Value::Bool(x) => self.bytes(&[u8::from(*x)])?,
            Value::String(s) => self.string(s)?,
            Value::U64(x) => self.u64(*x)?,
            Value::I64(x) => self.bytes(&x.to_le_bytes())?,
            Value::F64(x) => self.bytes(&x.to_le_bytes())?,
            Value::Array(items) => {
                // an empty array's element type is never read; llama.cpp's writer uses u8 too
                let ty = items.first().map_or(0, value_type_id);
                if let Some(i) = items.iter().position(|x| value_type_id(x) != ty) {
                    return Err(Error::msg(format!(
                        "GGUF metadata `{key}`[{i}] has another type than the array's first element"
                    )));
                }
                if matches!(items.first(), Some(Value::Array(_))) {
                    return Err(Error::msg(format!(
                        "GGUF metadata `{key}`: arrays of arrays are not written"
                    )));
                }
                self.u32(ty)?;
                self.u64(items.len() as u64)?;
                for x in items {
                    self.value(key, x)?;
                }
            }
        }
        Ok(())
    }
}

/// The alignment `metadata` asks for: `general.alignment` as an unsigned 32-bit power of two,
/// or [`DEFAULT_ALIGNMENT`].
fn alignment_of(metadata: &[(String, Value)]) -> Result<u64> {
    match metadata.iter().rev().find(|(k, _)| k == "general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, Value::U32(a))) if a.is_power_of_two() => Ok(u64::from(*a)),
        Some((_, v)) => Err(Error::msg(format!(
            "GGUF metadata `general.alignment` must be a u32 power of two (llama.cpp reads no other), found {v:?}"
        ))),
    }
}

/// Writes a GGUF v3 file to `w`: `metadata` in order, then the infos of `tensors` and their
/// data, which `data(i, info)` supplies for each tensor in turn (exactly
/// [`TensorInfo::size_in_bytes`] bytes: ggml's block layout of that type, rows innermost).
/// `path` names the destination in I/O errors.
pub fn write_gguf(
    w: &mut dyn Write,
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorInfo],
    mut data: impl FnMut(usize, &TensorInfo) -> Result<Vec<u8>>,
) -> Result<()> {
    let alignment = alignment_of(metadata)?;
    let mut seen = std::collections::BTreeSet::new();
    for (k, _) in metadata {
        if !seen.insert(k.as_str()) {
            return Err(Error::msg(format!("GGUF metadata key `{k}` given twice")));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(Error::bad_tensor(&t.name, "given twice in one GGUF file"));
        }
    }
    let sizes = tensors
        .iter()
        .map(TensorInfo::size_in_bytes)
        .collect::<Result<Vec<_>>>()?;

    let mut c = Counted { w, path, pos: 0 };
    c.bytes(b"GGUF")?;
    c.u32(3)?;
    c.u64(tensors.len() as u64)?;
    c.u64(metadata.len() as u64)?;
    for (k, v) in metadata {
        c.string(k)?;
        c.u32(value_type_id(v))?;
        c.value(k, v)?;
    }
    let mut offset = 0u64;
    for (t, &size) in tensors.iter().zip(&sizes) {
        c.string(&t.name)?;
        c.u32(t.shape.len() as u32)?;
        for &d in t.shape.iter().rev() {
            c.u64(d as u64)?;
        }
        c.u32(ggml_type_id(t.dtype))?;
        c.u64(offset)?;
        offset = (offset + size as u64).next_multiple_of(alignment);
    }
    c.pad_to(alignment)?;
    for (i, (t, &size)) in tensors.iter().zip(&sizes).enumerate() {
        let bytes = data(i, t)?;
        if bytes.len() != size {
            return Err(Error::bad_tensor(
                &t.name,
                format!(
                    "{} bytes of data for a {:?} tensor of shape {:?}, which takes {size}",
                    bytes.len(),
                    t.dtype,
                    t.shape
                ),
            ));
        }
        c.bytes(&bytes)?;
        c.pad_to(alignment)?;
    }
    Ok(())
}

/// Whether `path` is a GGUF file that singlora wrote (its [`WRITER_KEY`]).
pub fn written_by_singlora(path: &Path) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut r = std::io::BufReader::new(f);
    candle_core::quantized::gguf_file::Content::read(&mut r)
        .is_ok_and(|c| c.metadata.contains_key(WRITER_KEY))
}

/// Writes the GGUF file `out` through a temporary file and a rename. `out` may not overlap any
/// of `inputs`, and an existing `out` is replaced only with `overwrite` and only when singlora
/// wrote it. Returns what interrupted writes had left beside it and was removed.
pub fn write_gguf_file(
    out: &Path,
    overwrite: bool,
    inputs: &[(&str, &Path)],
    metadata: &[(String, Value)],
    tensors: &[TensorInfo],
    data: impl FnMut(usize, &TensorInfo) -> Result<Vec<u8>>,
) -> Result<Vec<PathBuf>> {
    check_disjoint(out, inputs)?;
    if out.exists() || out.is_symlink() {
        if !overwrite {
            return Err(Error::OutputExists {
                path: out.to_path_buf(),
            });
        }
        if out.is_dir() || !written_by_singlora(out) {
            return Err(Error::msg(format!(
                "{} exists and is not a GGUF file singlora wrote (no `{WRITER_KEY}` in its metadata): --overwrite replaces only singlora's own outputs; choose another output or remove it yourself",
                out.display()
            )));
        }
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).at(parent)?;
    let cleaned = clean_stale(parent)?;
    let mut metadata = metadata.to_vec();
    metadata.retain(|(k, _)| k != WRITER_KEY);
    metadata.push((
        WRITER_KEY.to_string(),
        Value::String(format!("singlora {}", env!("CARGO_PKG_VERSION"))),
    ));
    try_write_with(out, |w| write_gguf(w, out, &metadata, tensors, data))?;
    Ok(cleaned)
}
