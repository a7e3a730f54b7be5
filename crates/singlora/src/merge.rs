//! `singlora merge`: fold an adapter into its base checkpoint.
//!
//! W = W0 + s·u·A_out·A_inᵀ (SingLoRA, u from the saved step), W0 + s·B·A (LoRA, rsLoRA) or
//! m ⊙ V/‖V‖ (DoRA), computed in f64 and cast once to the base dtype (or `--dtype`). The output
//! has the base's tensor names, dtypes and sharding, with config.json, the tokenizer and every
//! other file copied; a trained head (`modules_to_save`) is written into it and its labels into
//! config.json. Non-finite results are refused, and nothing appears at the destination unless
//! the whole checkpoint was written.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::adapter::check_finite;
use crate::adapter::file::AdapterFile;
use crate::atomic::StagedDir;
use crate::checkpoint::{write_safetensors, Checkpoint, TensorFile, INDEX_FILE, SINGLE_FILE};
use crate::error::{Error, IoContext, Result};
use crate::model::Family;

#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    pub overwrite: bool,
    /// Cast every float tensor to this dtype (default: keep the base's).
    pub dtype: Option<DType>,
}

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub layers: usize,
    pub u: f64,
    /// Largest |W − W0| over all merged weights.
    pub max_abs_change: f64,
    pub heads: Vec<String>,
    pub files: Vec<String>,
    /// Temporary outputs of interrupted singlora processes, removed before writing.
    pub cleaned: Vec<std::path::PathBuf>,
}

/// Loads `module`'s base weight as (d_out, d_in), undoing a Conv1D (fan_in_fan_out) layout.
pub(crate) fn base_weight(ckpt: &Checkpoint, module: &str, fan_in_fan_out: bool) -> Result<Tensor> {
    let name = format!("{module}.weight");
    let t = ckpt.load(&name, &Device::Cpu).map_err(|_| {
        Error::msg(format!(
            "the adapter has a layer `{module}` but the base {} has no tensor `{name}`",
            ckpt.dir().display()
        ))
    })?;
    as_matrix(t, &name, fan_in_fan_out)
}

fn as_matrix(t: Tensor, name: &str, fan_in_fan_out: bool) -> Result<Tensor> {
    if t.rank() != 2 {
        return Err(Error::bad_tensor(
            name,
            format!("is {:?}, not a matrix", t.dims()),
        ));
    }
    Ok(if fan_in_fan_out {
        t.t()?.contiguous()?
    } else {
        t
    })
}

/// Merges every adapted layer of `af` on the CPU, with `load` giving a base tensor by name;
/// returns the merged tensors (in the base dtype) and the largest |W − W0|.
fn merge_layers(
    af: &AdapterFile,
    load: impl Fn(&str) -> Result<Tensor>,
) -> Result<(BTreeMap<String, Tensor>, f64)> {
    let clock = af.clock();
    let fifo = af.config.fan_in_fan_out;
    let mut out = BTreeMap::new();
    let mut max_change = 0f64;
    for module in af.layers.keys() {
        let name = format!("{module}.weight");
        let w0 = as_matrix(load(&name)?, &name, fifo)?;
        let adapter = af.build_adapter(module, &w0, &clock)?;
        let (w, _) = adapter.merged_weight(&w0)?;
        check_finite(&w, &format!("{name} (merged)"))?;
        let change = (&w - w0.to_dtype(DType::F64)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        max_change = max_change.max(change);
        let w = if fifo { w.t()?.contiguous()? } else { w };
        out.insert(name, w.to_dtype(w0.dtype())?);
    }
    Ok((out, max_change))
}

/// Merges into `W` for every adapted layer of `af`, on the CPU; returns the merged tensors
/// keyed by base tensor name, in the base dtype.
pub fn merged_weights(
    ckpt: &Checkpoint,
    af: &AdapterFile,
) -> Result<(BTreeMap<String, Tensor>, f64)> {
    merge_layers(af, |name| {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        base_weight(ckpt, module, false)
    })
}

/// Merges an adapter trained on a GGUF model into a Hugging Face checkpoint: every tensor
/// dequantised (f32 unless `--dtype`), the merged layers and head, config.json from the GGUF
/// metadata, and the tokenizer (with its chat template) as tokenizer.json.
fn merge_gguf(
    base: &Path,
    (adapter, af): (&Path, &AdapterFile),
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let (staged, cleaned) = output_dir(base, adapter, out, opts)?;
    let g = crate::gguf::load_gguf(base, DType::F32)?;
    let (merged, max_abs_change) = merge_layers(af, |name| {
        g.tensors.get(name).cloned().ok_or_else(|| {
            Error::msg(format!(
                "the adapter has a layer for `{name}` but {} has no such tensor",
                base.display()
            ))
        })
    })?;
    let dtype = opts.dtype.unwrap_or(DType::F32);
    let mut tensors = g.tensors.clone();
    tensors.extend(merged);
    tensors.extend(af.heads.clone());
    for t in tensors.values_mut() {
        *t = t.to_dtype(dtype)?;
    }
    write_safetensors(&staged.path().join(SINGLE_FILE), &tensors, None)?;
    let mut config = g.config.clone();
    if let Some(labels) = &af.config.labels {
        config = classifier_config(&config, labels);
    }
    config["torch_dtype"] = json!(dtype_name(dtype));
    let p = staged.path().join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&config).unwrap()).at(&p)?;
    let p = staged.path().join("tokenizer.json");
    g.tokenizer
        .save(&p, false)
        .map_err(|e| Error::msg(format!("{}: {e}", p.display())))?;
    if let Some(t) = &g.chat_template {
        let p = staged.path().join("tokenizer_config.json");
        let tc = json!({"chat_template": t});
        std::fs::write(&p, serde_json::to_string_pretty(&tc).unwrap()).at(&p)?;
    }
    staged.commit()?;
    Ok(MergeReport {
        layers: af.layers.len(),
        u: af.config.u(),
        max_abs_change,
        heads: af.heads.keys().cloned().collect(),
        files: vec![SINGLE_FILE.to_string()],
        cleaned,
    })
}

fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Copies every file and folder of `from` except the weights into `to`.
fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from).at(from)? {
        let entry = entry.at(from)?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_weights = name.ends_with(".safetensors")
            || name == INDEX_FILE
            || name.ends_with(".bin")
            || name.ends_with(".gguf")
            || name.ends_with(".pt");
        if path.is_dir() {
            std::fs::create_dir_all(to.join(&name)).at(&to.join(&name))?;
            copy_side_files(&path, &to.join(&name))?;
        } else if !is_weights {
            std::fs::copy(&path, to.join(&name)).at(&path)?;
        }
    }
    Ok(())
}

/// config.json for a merged classifier: labels and the ForSequenceClassification class.
pub fn classifier_config(config: &Value, labels: &[String]) -> Value {
    let mut c = config.clone();
    let id2label: serde_json::Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), json!(l)))
        .collect();
    let label2id: serde_json::Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), json!(i)))
        .collect();
    c["id2label"] = Value::Object(id2label);
    c["label2id"] = Value::Object(label2id);
    c["num_labels"] = json!(labels.len());
    let arch = match c.get("model_type").and_then(Value::as_str) {
        Some("llama") => "LlamaForSequenceClassification",
        Some("mistral") => "MistralForSequenceClassification",
        Some("qwen2") => "Qwen2ForSequenceClassification",
        Some("roberta") => "RobertaForSequenceClassification",
        _ => "BertForSequenceClassification",
    };
    c["architectures"] = json!([arch]);
    c
}

/// The merged model's staged directory: `out` may not overlap the base or the adapter, and
/// replaces only a model singlora merged (with `--overwrite`).
fn output_dir(
    base: &Path,
    adapter: &Path,
    out: &Path,
    opts: &MergeOptions,
) -> Result<(StagedDir, Vec<std::path::PathBuf>)> {
    StagedDir::output(
        out,
        opts.overwrite,
        &[("--base", base), ("--adapter", adapter)],
    )
}

/// Merges the adapter directory `adapter` into the checkpoint `base`, writing `out`.
pub fn merge_checkpoint(
    base: &Path,
    adapter: &Path,
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    if let Some(gguf) = crate::gguf::find_gguf(base).filter(|_| !base.join("config.json").exists())
    {
        let af = AdapterFile::read(adapter, &Device::Cpu)?;
        af.config
            .check_weight_layout(Some(Family::Llama), af.layers.keys().next())?;
        return merge_gguf(&gguf, (adapter, &af), out, opts);
    }
    let ckpt = Checkpoint::open(base)?;
    let af = AdapterFile::read(adapter, &Device::Cpu)?;
    let family = Family::detect(ckpt.config(), ckpt.dir()).ok();
    af.config
        .check_weight_layout(family, af.layers.keys().next())?;
    let (staged, cleaned) = output_dir(base, adapter, out, opts)?;
    let (mut merged, max_abs_change) = merged_weights(&ckpt, &af)?;

    let mut heads: BTreeMap<String, Tensor> = af.heads.clone();
    let mut index_map: BTreeMap<String, String> = BTreeMap::new();
    let mut files = vec![];
    let n_files = ckpt.files().len();
    for (i, file) in ckpt.files().iter().enumerate() {
        let mut tensors = BTreeMap::new();
        for name in file.names() {
            // the index decides which shard a tensor belongs to
            if !std::ptr::eq(ckpt.file_of(name).unwrap(), file) {
                continue;
            }
            let t = match merged.remove(name).or_else(|| heads.remove(name)) {
                Some(t) => t,
                None => file.load(name, &Device::Cpu)?,
            };
            tensors.insert(name.to_string(), t);
        }
        if i + 1 == n_files {
            // heads the base lacks (a new classifier) go into the last file
            tensors.append(&mut heads);
        }
        if let Some(dt) = opts.dtype {
            for t in tensors.values_mut() {
                if t.dtype().is_float() {
                    *t = t.to_dtype(dt)?;
                }
            }
        }
        let fname = file
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| SINGLE_FILE.into());
        for name in tensors.keys() {
            index_map.insert(name.clone(), fname.clone());
        }
        let meta: Option<HashMap<String, String>> = file.metadata().cloned();
        write_safetensors(&staged.path().join(&fname), &tensors, meta.as_ref())?;
        files.push(fname);
    }
    copy_side_files(base, staged.path())?;
    if let Some(index) = ckpt.index() {
        let mut index = index.clone();
        index["weight_map"] = json!(index_map);
        if opts.dtype.is_some() || !af.heads.is_empty() {
            let mut total = 0usize;
            for f in &files {
                let tf = TensorFile::open(&staged.path().join(f))?;
                for n in tf.names() {
                    let m = tf.meta(n).unwrap();
                    total += m.shape.iter().product::<usize>() * m.dtype.bitsize() / 8;
                }
            }
            index["metadata"]["total_size"] = json!(total);
        }
        let p = staged.path().join(INDEX_FILE);
        std::fs::write(&p, serde_json::to_string_pretty(&index).unwrap()).at(&p)?;
    }
    let mut config = ckpt.config().clone();
    if let Some(labels) = &af.config.labels {
        config = classifier_config(&config, labels);
    }
    if let Some(dt) = opts.dtype {
        config["torch_dtype"] = json!(dtype_name(dt));
    }
    let p = staged.path().join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&config).unwrap()).at(&p)?;
    staged.commit()?;
    Ok(MergeReport {
        layers: af.layers.len(),
        u: af.config.u(),
        max_abs_change,
        heads: af.heads.keys().cloned().collect(),
        files,
        cleaned,
    })
}

/// Parses `f32`, `bf16`, `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(Error::msg(format!(
            "unknown dtype `{s}`: expected f32, bf16 or f16"
        ))),
    }
}
