//! Merging into a GGUF file for llama.cpp and Ollama: W = W0 + ΔW computed as every merge is
//! (f64, cast once, non-finite refused) and the whole model written as a GGUF file of its
//! llama.cpp architecture ([`crate::gguf::model`]) in the types `--quant` asks for, one layer
//! merged at a time as the file is written.
//!
//! The base is a Hugging Face LLaMA-family directory (its config.json becomes the `llama.*`
//! metadata, tokenizer.json and tokenizer_config.json the `tokenizer.*` metadata) or a GGUF file
//! (its metadata are kept as they are, chat template included; a tensor the adapter does not
//! change and whose type stays the same is copied byte for byte).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::{base_weight, merge_layer, MergeReport};
use crate::adapter::file::AdapterFile;
use crate::atomic::check_disjoint;
use crate::checkpoint::{float_dtype, Checkpoint};
use crate::error::{Error, IoContext, Result};
use crate::gguf::model::{
    gguf_name_in, hf_llama_metadata, write_llama_gguf, Arch, GgufQuant, LlamaGguf, TensorData,
};
use crate::gguf::vocab::hf_tokenizer_metadata;
use crate::gguf::write::WRITER_KEY;
use crate::model::llama::{Llama, LlamaConfig};
use crate::model::weights::ConfigReader;
use crate::model::Family;

/// Merges `adapter` into `base` and writes the GGUF file `out` with tensor types `quant`.
pub(super) fn merge_to_gguf(
    base: &Path,
    adapter: &Path,
    out: &Path,
    overwrite: bool,
    quant: GgufQuant,
) -> Result<MergeReport> {
    let inputs = [("--base", base), ("--adapter", adapter)];
    check_disjoint(out, &inputs)?;
    let af = AdapterFile::read(adapter, &Device::Cpu)?;
    if !af.heads.is_empty() {
        return Err(Error::msg(
            "the adapter holds a classification head, which llama.cpp's LLaMA has no place for; merge it as safetensors instead (--format safetensors)",
        ));
    }
    let (files, max_abs_change, cleaned) =
        write_base(base, Some(&af), out, overwrite, quant, &inputs)?;
    Ok(MergeReport {
        files,
        ..MergeReport::of(&af, max_abs_change, None, cleaned)
    })
}

/// Writes the base model itself as the GGUF file `out` (the file an adapter GGUF from
/// `export-lora --format gguf` is applied to). Returns the file name and what interrupted writes
/// had left and was removed.
pub fn convert_to_gguf(
    base: &Path,
    out: &Path,
    overwrite: bool,
    quant: GgufQuant,
) -> Result<(String, Vec<std::path::PathBuf>)> {
    let inputs = [("--base", base)];
    check_disjoint(out, &inputs)?;
    let (mut files, _, cleaned) = write_base(base, None, out, overwrite, quant, &inputs)?;
    Ok((files.remove(0), cleaned))
}

fn write_base(
    base: &Path,
    af: Option<&AdapterFile>,
    out: &Path,
    overwrite: bool,
    quant: GgufQuant,
    inputs: &[(&str, &Path)],
) -> Result<Written> {
    let out = Output {
        path: out,
        overwrite,
        quant,
        inputs,
    };
    match crate::gguf::find_gguf(base).filter(|_| !base.join("config.json").exists()) {
        Some(g) => from_gguf(&g, af, &out),
        None => from_hf(base, af, &out),
    }
}

/// The adapter's layers merged one at a time, as the writer comes to each tensor, so that only
/// one merged weight is in memory at once.
struct Merger<'a> {
    af: Option<&'a AdapterFile>,
    /// The largest |W − W0| so far.
    max_change: f64,
}

impl<'a> Merger<'a> {
    /// Checks first that every adapted layer is a tensor the file will hold.
    fn new(
        af: Option<&'a AdapterFile>,
        cfg: &LlamaConfig,
        base: &Path,
        tensors: &[(String, Vec<usize>)],
    ) -> Result<Self> {
        if let Some(af) = af {
            let family = if cfg.gpt2 {
                Family::Gpt2
            } else {
                Family::Llama
            };
            af.config
                .check_weight_layout(Some(family), af.layers.keys().next())?;
        }
        for module in af.iter().flat_map(|af| af.layers.keys()) {
            let name = format!("{module}.weight");
            if cfg.tie_embeddings && name == "lm_head.weight" {
                return Err(Error::msg(
                    "the adapter changes lm_head, but the model ties it to the embedding, which GGUF stores once; merge it as safetensors instead",
                ));
            }
            if !tensors.iter().any(|(n, _)| *n == name) {
                return Err(Error::msg(format!(
                    "the adapter has a layer `{module}` but the base {} has no tensor `{name}`",
                    base.display()
                )));
            }
        }
        Ok(Self {
            af,
            max_change: 0.0,
        })
    }

    /// W0 + ΔW in f32 for `hf` when the adapter changes it, W0 from `load`.
    fn merged(
        &mut self,
        hf: &str,
        load: impl Fn(&str) -> Result<Tensor>,
    ) -> Result<Option<Tensor>> {
        let Some(af) = self.af else {
            return Ok(None);
        };
        let Some(module) = hf
            .strip_suffix(".weight")
            .filter(|m| af.layers.contains_key(*m))
        else {
            return Ok(None);
        };
        let (w, change) = merge_layer(af, module, load, Some(DType::F32))?;
        self.max_change = self.max_change.max(change);
        Ok(Some(w))
    }
}

type Written = (Vec<String>, f64, Vec<std::path::PathBuf>);

/// Where and how the GGUF file is written.
struct Output<'a> {
    path: &'a Path,
    overwrite: bool,
    quant: GgufQuant,
    /// The inputs it may not overlap, by role.
    inputs: &'a [(&'a str, &'a Path)],
}

impl Output<'_> {
    fn write(
        &self,
        m: &LlamaGguf,
        load: impl FnMut(&str, &crate::gguf::write::TensorInfo) -> Result<TensorData>,
    ) -> Result<Vec<std::path::PathBuf>> {
        let (_, cleaned) =
            write_llama_gguf(self.path, self.overwrite, self.inputs, m, self.quant, load)?;
        Ok(cleaned)
    }

    fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

fn llama_config(path: &Path, config: &serde_json::Value) -> Result<LlamaConfig> {
    Llama::config(&ConfigReader {
        path,
        value: config,
    })
}

fn from_gguf(path: &Path, af: Option<&AdapterFile>, out: &Output) -> Result<Written> {
    let mut reader = BufReader::new(File::open(path).at(path)?);
    let content = Content::read(&mut reader)
        .map_err(|e| Error::bad_file(path, format!("unreadable GGUF header: {e}")))?;
    let arch = match content.metadata.get("general.architecture") {
        Some(Value::String(a)) => Arch::parse(a),
        _ => None,
    }
    .ok_or_else(|| {
        Error::bad_file(
            path,
            format!(
                "general.architecture = {:?}: GGUF export writes llama, qwen3, gemma3, phi3 and gpt2 models only",
                content.metadata.get("general.architecture")
            ),
        )
    })?;
    let g = crate::gguf::load_gguf(path, DType::F32)?;
    let cfg = llama_config(path, &g.config)?;
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| *k != WRITER_KEY && *k != "general.alignment")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // general.architecture first, as llama.cpp's writer puts it; the rest in key order
    metadata.sort_by(|(a, _), (b, _)| {
        (a != "general.architecture", a.as_str()).cmp(&(b != "general.architecture", b.as_str()))
    });
    let mut base_types = BTreeMap::new();
    for hf in g.tensors.keys() {
        if let Some(info) = gguf_name_in(arch, hf).and_then(|n| content.tensor_infos.get(&n)) {
            base_types.insert(hf.clone(), info.ggml_dtype);
        }
    }
    let m = LlamaGguf {
        arch,
        // LLaMA 3.1's RoPE factors, kept as the base stores them
        rope_freqs: g.rope_freqs.clone(),
        metadata,
        heads: cfg.heads,
        kv_heads: cfg.kv_heads,
        layers: cfg.layers,
        tied: cfg.tie_embeddings,
        tensors: g
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect(),
        base_types,
    };
    let mut merger = Merger::new(af, &cfg, path, &m.tensors)?;
    let base = |name: &str| {
        g.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::bad_tensor(name, format!("not in {}", path.display())))
    };
    let cleaned = out.write(&m, |hf, info| {
        if let Some(t) = merger.merged(hf, base)? {
            return Ok(TensorData::Values(t));
        }
        if m.base_types.get(hf) == Some(&info.dtype) {
            let q = content
                .tensor(&mut reader, &info.name, &Device::Cpu)
                .map_err(|e| Error::bad_file(path, format!("tensor `{}`: {e}", info.name)))?;
            return Ok(TensorData::Raw(q.data()?.into_owned()));
        }
        Ok(TensorData::Values(g.tensors[hf].clone()))
    })?;
    Ok((vec![out.file_name()], merger.max_change, cleaned))
}

/// A safetensors dtype as the GGUF type `same` keeps.
fn ggml_of(dt: DType) -> Option<GgmlDType> {
    match dt {
        DType::F32 => Some(GgmlDType::F32),
        DType::F16 => Some(GgmlDType::F16),
        DType::BF16 => Some(GgmlDType::BF16),
        _ => None,
    }
}

fn from_hf(base: &Path, af: Option<&AdapterFile>, out: &Output) -> Result<Written> {
    let ckpt = Checkpoint::open(base)?;
    let config_path = base.join("config.json");
    let family = Family::detect(ckpt.config(), &config_path)?;
    if !matches!(family, Family::Llama | Family::Gpt2) {
        return Err(Error::msg(format!(
            "{}: GGUF export writes LLaMA-family models (llama, mistral, qwen2, qwen3, gemma3, \
             phi3, SmolLM2) and GPT-2; this one is of the {family:?} family",
            base.display()
        )));
    }
    let cfg = llama_config(&config_path, ckpt.config())?;
    let reader = ConfigReader {
        path: &config_path,
        value: ckpt.config(),
    };
    let name = std::fs::canonicalize(base)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let hf = hf_llama_metadata(&reader, &cfg, &name)?;
    let (arch, rope_freqs, mut metadata) = (hf.arch, hf.rope_freqs, hf.metadata);
    metadata.extend(hf_tokenizer_metadata(base, ckpt.config(), cfg.vocab)?);

    let mut tensors = vec![];
    let mut base_types = BTreeMap::new();
    // each tensor under the name the model's modules have, and the name the checkpoint stores
    // it under (the hub's GPT-2 keeps `transformer.` bare)
    let mut stored = BTreeMap::new();
    for n in ckpt.names() {
        // RoPE's inverse frequencies, which some checkpoints store, follow from the config
        let buffer = cfg.gpt2 && crate::model::llama::is_gpt2_mask_buffer(n);
        if n.ends_with("rotary_emb.inv_freq") || buffer {
            continue;
        }
        let name = if cfg.gpt2 && !n.starts_with("transformer.") && !n.starts_with("lm_head.") {
            format!("transformer.{n}")
        } else {
            n.to_string()
        };
        let meta = ckpt.meta(n).expect("a listed tensor");
        tensors.push((name.clone(), meta.shape.clone()));
        if let Some(t) = float_dtype(meta.dtype).and_then(ggml_of) {
            base_types.insert(name.clone(), t);
        }
        stored.insert(name, n.to_string());
    }
    let m = LlamaGguf {
        arch,
        rope_freqs,
        metadata,
        heads: cfg.heads,
        kv_heads: cfg.kv_heads,
        layers: cfg.layers,
        tied: cfg.tie_embeddings,
        tensors,
        base_types,
    };
    let mut merger = Merger::new(af, &cfg, base, &m.tensors)?;
    let cleaned = out.write(&m, |hf, _| {
        let base =
            |name: &str| base_weight(&ckpt, name.strip_suffix(".weight").unwrap_or(name), false);
        let t = match merger.merged(hf, base)? {
            Some(t) => t,
            None => ckpt.load(stored.get(hf).map_or(hf, String::as_str), &Device::Cpu)?,
        };
        Ok(TensorData::Values(t))
    })?;
    Ok((vec![out.file_name()], merger.max_change, cleaned))
}
