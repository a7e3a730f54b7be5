//! `singlora merge`: fold an adapter into its base checkpoint.
//!
//! W = W0 + s·u·A_out·A_inᵀ (SingLoRA, u from the saved step), W0 + s·B·A (LoRA, rsLoRA) or
//! m ⊙ V/‖V‖ (DoRA), computed in f64 and cast once to the base dtype (or `--dtype`). The output
//! has the base's tensor names, dtypes and sharding, with config.json, the tokenizer and every
//! other file copied. A trained classification head (`modules_to_save`) goes into it, with its
//! labels and class in config.json, where a transformers class scores it as it was trained;
//! otherwise beside it ([`head`]). Every tensor computed or cast is checked in its output dtype:
//! one that holds NaN or ±∞ there is refused by name, and nothing appears at the destination
//! unless the whole checkpoint was written.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::adapter::check_finite;
use crate::adapter::file::AdapterFile;
use crate::atomic::StagedDir;
use crate::checkpoint::{
    float_dtype, write_safetensors, Checkpoint, TensorFile, DIFFUSERS_INDEX_FILE, INDEX_FILE,
    SINGLE_FILE,
};
use crate::error::{Error, IoContext, Result};
use crate::model::Family;

pub mod diffusers;
pub mod gguf;
pub mod head;

use head::BaseFacts;
pub use head::{classifier_config, HeadPlacement, HEAD_FILE, HEAD_INFO};

#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    pub overwrite: bool,
    /// Cast every float tensor to this dtype (default: keep the base's).
    pub dtype: Option<DType>,
    /// Write one GGUF file for llama.cpp with these tensor types instead of a checkpoint
    /// directory ([`gguf`]).
    pub gguf: Option<crate::gguf::model::GgufQuant>,
}

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub layers: usize,
    pub u: f64,
    /// Largest |W − W0| over all merged weights.
    pub max_abs_change: f64,
    pub heads: Vec<String>,
    /// Where a trained classification head went (None without one).
    pub head: Option<HeadPlacement>,
    pub files: Vec<String>,
    /// Temporary outputs of interrupted singlora processes, removed before writing.
    pub cleaned: Vec<std::path::PathBuf>,
}

impl MergeReport {
    /// The report of merging `af` (with no files yet).
    fn of(
        af: &AdapterFile,
        max_abs_change: f64,
        head: Option<HeadPlacement>,
        cleaned: Vec<std::path::PathBuf>,
    ) -> Self {
        Self {
            layers: af.layers.len(),
            u: af.config.u(),
            max_abs_change,
            heads: af.heads.keys().cloned().collect(),
            head,
            files: vec![],
            cleaned,
        }
    }
}

/// Module names and the prefixes checkpoints store them under where the two differ: Gemma 3's
/// multimodal checkpoints keep `model.language_model.…` as `language_model.model.…` (and an
/// untied head as `language_model.lm_head`), the hub's GPT-2 keeps `transformer.…` bare.
const STORED_PREFIXES: [(&str, &str); 3] = [
    ("model.language_model.", "language_model.model."),
    ("lm_head", "language_model.lm_head"),
    ("transformer.", ""),
];

/// The checkpoint's name of `module`'s weight: `{module}.weight`, or where the checkpoint keeps
/// it under another prefix ([`STORED_PREFIXES`]), that name.
pub(crate) fn stored_weight_name(ckpt: &Checkpoint, module: &str) -> String {
    let name = format!("{module}.weight");
    if ckpt.contains(&name) {
        return name;
    }
    STORED_PREFIXES
        .iter()
        .filter_map(|(named, stored)| {
            let rest = module.strip_prefix(named)?;
            Some(format!("{stored}{rest}.weight"))
        })
        .find(|alt| ckpt.contains(alt))
        .unwrap_or(name)
}

/// Loads `module`'s base weight as (d_out, d_in), undoing a Conv1D (fan_in_fan_out) layout.
/// The weight must be a float tensor: an integer or 8-bit one (a quantised checkpoint) cannot
/// take W0 + ΔW.
pub(crate) fn base_weight(ckpt: &Checkpoint, module: &str, fan_in_fan_out: bool) -> Result<Tensor> {
    let name = stored_weight_name(ckpt, module);
    let (Some(file), Some(meta)) = (ckpt.file_of(&name), ckpt.meta(&name)) else {
        return Err(Error::msg(format!(
            "the adapter has a layer `{module}` but the base {} has no tensor `{name}`",
            ckpt.dir().display()
        )));
    };
    if float_dtype(meta.dtype).is_none() {
        return Err(Error::bad_file(
            file.path(),
            format!(
                "tensor `{name}` is {:?}, but the weight of an adapted layer must be F32, F16, BF16 or F64",
                meta.dtype
            ),
        ));
    }
    as_matrix(file.load(&name, &Device::Cpu)?, &name, fan_in_fan_out)
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
/// returns the merged tensors, cast once from f64 to `dtype` (default: the base weight's), and
/// the largest |W − W0|.
fn merge_layers(
    af: &AdapterFile,
    load: impl Fn(&str) -> Result<Tensor>,
    dtype: Option<DType>,
) -> Result<(BTreeMap<String, Tensor>, f64)> {
    let mut out = BTreeMap::new();
    let mut max_change = 0f64;
    for module in af.layers.keys() {
        let (w, change) = merge_layer(af, module, &load, dtype)?;
        max_change = max_change.max(change);
        out.insert(format!("{module}.weight"), w);
    }
    Ok((out, max_change))
}

/// One adapted layer of `af`, `module`, merged into its base weight (from `load`, by tensor
/// name): W cast once from f64 to `dtype` (default: the base weight's), and max |W − W0|.
fn merge_layer(
    af: &AdapterFile,
    module: &str,
    load: impl Fn(&str) -> Result<Tensor>,
    dtype: Option<DType>,
) -> Result<(Tensor, f64)> {
    let fifo = af.config.fan_in_fan_out;
    let name = format!("{module}.weight");
    let w0 = as_matrix(load(&name)?, &name, fifo)?;
    let adapter = af.build_adapter(module, &w0, &af.clock())?;
    let (w, _) = adapter.merged_weight(&w0)?;
    check_finite(&w, &format!("{name} (merged)"))?;
    let change = (&w - w0.to_dtype(DType::F64)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    let w = if fifo { w.t()?.contiguous()? } else { w };
    let w = w.to_dtype(dtype.unwrap_or(w0.dtype()))?;
    check_representable(&name, &w)?;
    Ok((w, change))
}

/// Refuses a tensor about to be written that holds NaN or ±∞ once cast to its output dtype
/// (a value past f16's 65504 or f32's 3.4e38 becomes infinite in the cast).
fn check_representable(name: &str, t: &Tensor) -> Result<()> {
    if !t.dtype().is_float() {
        return Ok(());
    }
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let bad = v.iter().filter(|x| !x.is_finite()).count();
    if bad == 0 {
        return Ok(());
    }
    let dt = dtype_short(t.dtype());
    Err(Error::bad_tensor(
        name,
        format!(
            "{bad} of {} values are NaN or infinite in {dt}, the output dtype (its largest finite value is {:.4e}); nothing was written",
            v.len(),
            largest_finite(t.dtype())
        ),
    ))
}

fn largest_finite(dt: DType) -> f64 {
    match dt {
        DType::F16 => half::f16::MAX.to_f64(),
        DType::BF16 => half::bf16::MAX.to_f64(),
        DType::F32 => f32::MAX as f64,
        _ => f64::MAX,
    }
}

fn dtype_short(dt: DType) -> &'static str {
    match dt {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        _ => "a non-float dtype",
    }
}

/// `t` cast to `dtype`, refused if the cast leaves non-finite values.
fn output_tensor(name: &str, t: &Tensor, dtype: DType) -> Result<Tensor> {
    let t = t.to_dtype(dtype)?;
    check_representable(name, &t)?;
    Ok(t)
}

/// Merges into `W` for every adapted layer of `af`, on the CPU; returns the merged tensors
/// keyed by base tensor name, in the base dtype.
pub fn merged_weights(
    ckpt: &Checkpoint,
    af: &AdapterFile,
) -> Result<(BTreeMap<String, Tensor>, f64)> {
    merged_weights_as(ckpt, af, None)
}

/// [`merged_weights`] cast to `dtype` (None: the base's).
fn merged_weights_as(
    ckpt: &Checkpoint,
    af: &AdapterFile,
    dtype: Option<DType>,
) -> Result<(BTreeMap<String, Tensor>, f64)> {
    let (merged, change) = merge_layers(
        af,
        |name| {
            let module = name.strip_suffix(".weight").unwrap_or(name);
            base_weight(ckpt, module, false)
        },
        dtype,
    )?;
    // written back under the checkpoint's own names
    let merged = merged
        .into_iter()
        .map(|(name, w)| {
            let module = name.strip_suffix(".weight").unwrap_or(&name);
            (stored_weight_name(ckpt, module), w)
        })
        .collect();
    Ok((merged, change))
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
    let dtype = opts.dtype.unwrap_or(DType::F32);
    let (merged, max_abs_change) = merge_layers(
        af,
        |name| {
            g.tensors.get(name).cloned().ok_or_else(|| {
                Error::msg(format!(
                    "the adapter has a layer for `{name}` but {} has no such tensor",
                    base.display()
                ))
            })
        },
        Some(dtype),
    )?;
    let facts = BaseFacts {
        config: &g.config,
        pooler: None,
        sentence_transformers: false,
        tokenizer: Some(&g.tokenizer),
    };
    let (head, head_config) = place_head(&facts, af, (base, adapter))?;
    let mut tensors = g.tensors.clone();
    tensors.extend(merged);
    if let Some(HeadPlacement::Separate { pooling, reason }) = &head {
        let labels = af.config.labels.as_deref().unwrap_or_default();
        head::write_separate(staged.path(), &af.heads, labels, (*pooling, reason), None)?;
    } else {
        tensors.extend(af.heads.clone());
    }
    // every tensor was dequantised, so every one is checked in the dtype it is written in
    for (name, t) in tensors.iter_mut() {
        *t = t.to_dtype(dtype)?;
        check_representable(name, t)?;
    }
    write_safetensors(&staged.path().join(SINGLE_FILE), &tensors, None)?;
    let mut config = head_config.unwrap_or_else(|| g.config.clone());
    config["torch_dtype"] = json!(dtype_name(dtype));
    let p = staged.path().join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&config).unwrap()).at(&p)?;
    let p = staged.path().join("tokenizer.json");
    g.tokenizer
        .save(&p, false)
        .map_err(|e| Error::msg(format!("{}: {e}", p.display())))?;
    // the template the adapter was trained with, else the GGUF's
    if let Some(t) = af.chat_template.as_ref().or(g.chat_template.as_ref()) {
        write_chat_template(staged.path(), t)?;
    }
    staged.commit()?;
    Ok(MergeReport {
        files: vec![SINGLE_FILE.to_string()],
        ..MergeReport::of(af, max_abs_change, head, cleaned)
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
/// Puts `template` where transformers and singlora look for a chat template:
/// `chat_template.jinja`, and `chat_template` in tokenizer_config.json (made if there is none).
fn write_chat_template(dir: &Path, template: &str) -> Result<()> {
    let p = dir.join("tokenizer_config.json");
    let mut tc = if p.exists() {
        crate::checkpoint::read_json(&p)?
    } else {
        json!({})
    };
    let Some(obj) = tc.as_object_mut() else {
        return Err(Error::bad_file(&p, "is not a JSON object"));
    };
    obj.insert("chat_template".into(), json!(template));
    std::fs::write(&p, serde_json::to_string_pretty(&tc).unwrap()).at(&p)?;
    let j = dir.join(crate::model::CHAT_TEMPLATE_FILE);
    std::fs::write(&j, template).at(&j)
}

fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from).at(from)? {
        let entry = entry.at(from)?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_weights = name.ends_with(".safetensors")
            || name == INDEX_FILE
            || name == DIFFUSERS_INDEX_FILE
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

/// Where the adapter's classification head goes, and the config.json that goes with it (None:
/// the base's). A head without labels (one PEFT trained through a transformers class) goes into
/// the checkpoint as it is.
fn place_head(
    facts: &BaseFacts,
    af: &AdapterFile,
    (base_config, adapter): (&Path, &Path),
) -> Result<(Option<HeadPlacement>, Option<Value>)> {
    let Some(labels) = &af.config.labels else {
        return Ok((None, None));
    };
    if af.heads.is_empty() {
        return Err(Error::bad_field(
            adapter.join(crate::adapter::config::CONFIG_FILE),
            "labels",
            "names labels but the adapter holds no classification head (modules_to_save)",
        ));
    }
    let (placement, config) = head::place(facts, &af.config, labels, base_config)?;
    Ok((Some(placement), config))
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
    if let Some(quant) = opts.gguf {
        if opts.dtype.is_some() {
            return Err(Error::msg(
                "--dtype casts a safetensors checkpoint; a GGUF output takes its types from --quant",
            ));
        }
        return gguf::merge_to_gguf(base, adapter, out, opts.overwrite, quant);
    }
    if let Some(gguf) = crate::gguf::find_gguf(base).filter(|_| !base.join("config.json").exists())
    {
        let af = AdapterFile::read(adapter, &Device::Cpu)?;
        af.config
            .check_weight_layout(Some(Family::Llama), af.layers.keys().next())?;
        return merge_gguf(&gguf, (adapter, &af), out, opts);
    }
    if diffusers::is_pipeline(base) {
        return diffusers::merge_pipeline(base, adapter, out, opts);
    }
    let ckpt = Checkpoint::open(base)?;
    let af = AdapterFile::read(adapter, &Device::Cpu)?;
    let family = Family::detect(ckpt.config(), ckpt.dir()).ok();
    af.config
        .check_weight_layout(family, af.layers.keys().next())?;
    let (staged, cleaned) = output_dir(base, adapter, out, opts)?;
    let (merged, max_abs_change) = merged_weights_as(&ckpt, &af, opts.dtype)?;

    let tokenizer = crate::tokenize::load_tokenizer(base).ok();
    let facts = BaseFacts {
        config: ckpt.config(),
        pooler: crate::model::bert::tensor_prefix(|n| ckpt.contains(n))
            .filter(|p| ckpt.contains(&format!("{p}pooler.dense.weight")))
            .map(str::to_string),
        sentence_transformers: crate::model::is_sentence_transformers(base),
        tokenizer: tokenizer.as_ref(),
    };
    let (head, head_config) = place_head(&facts, &af, (&base.join("config.json"), adapter))?;
    // a head kept out of the checkpoint is written beside it, not into it
    let heads: BTreeMap<String, Tensor> = match &head {
        Some(HeadPlacement::Separate { pooling, reason }) => {
            head::check_no_stale_head(ckpt.names(), &af.heads, reason)?;
            let labels = af.config.labels.as_deref().unwrap_or_default();
            let pooler = facts.pooler.as_deref();
            head::write_separate(staged.path(), &af.heads, labels, (*pooling, reason), pooler)?;
            BTreeMap::new()
        }
        _ => af.heads.clone(),
    };
    let config = head_config.unwrap_or_else(|| ckpt.config().clone());
    let files = write_merged_checkpoint(&ckpt, staged.path(), merged, heads, opts, config)?;
    if let Some(t) = &af.chat_template {
        write_chat_template(staged.path(), t)?;
    }
    staged.commit()?;
    Ok(MergeReport {
        files,
        ..MergeReport::of(&af, max_abs_change, head, cleaned)
    })
}

/// Writes `ckpt` into `dir` with the tensors of `merged` in place of the base's and `heads`
/// (tensors the base may lack, which go into its last file), in the base's file names and
/// sharding, cast to `opts.dtype` where given; then `config` as config.json and every other
/// file of the base. Returns the weight files written.
fn write_merged_checkpoint(
    ckpt: &Checkpoint,
    dir: &Path,
    mut merged: BTreeMap<String, Tensor>,
    mut heads: BTreeMap<String, Tensor>,
    opts: &MergeOptions,
    config: Value,
) -> Result<Vec<String>> {
    let index_name = ckpt.index_name();
    let heads_written = !heads.is_empty();
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
            let t = match merged.remove(name) {
                Some(t) => t,
                None => match heads.remove(name) {
                    Some(t) => output_tensor(name, &t, opts.dtype.unwrap_or(t.dtype()))?,
                    None => {
                        let t = file.load(name, &Device::Cpu)?;
                        match opts.dtype {
                            Some(dt) if t.dtype().is_float() => output_tensor(name, &t, dt)?,
                            // copied as the base has it
                            _ => t,
                        }
                    }
                },
            };
            tensors.insert(name.to_string(), t);
        }
        if i + 1 == n_files {
            // heads the base lacks (a new classifier) go into the last file
            for (name, t) in std::mem::take(&mut heads) {
                let t = output_tensor(&name, &t, opts.dtype.unwrap_or(t.dtype()))?;
                tensors.insert(name, t);
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
        write_safetensors(&dir.join(&fname), &tensors, meta.as_ref())?;
        files.push(fname);
    }
    copy_side_files(ckpt.dir(), dir)?;
    if let Some(index) = ckpt.index() {
        let mut index = index.clone();
        index["weight_map"] = json!(index_map);
        if opts.dtype.is_some() || heads_written {
            let mut total = 0usize;
            for f in &files {
                let tf = TensorFile::open(&dir.join(f))?;
                for n in tf.names() {
                    let m = tf.meta(n).unwrap();
                    total += m.shape.iter().product::<usize>() * m.dtype.bitsize() / 8;
                }
            }
            index["metadata"]["total_size"] = json!(total);
        }
        let p = dir.join(index_name);
        std::fs::write(&p, serde_json::to_string_pretty(&index).unwrap()).at(&p)?;
    }
    let mut config = config;
    if let Some(dt) = opts.dtype {
        config["torch_dtype"] = json!(dtype_name(dt));
    }
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&config).unwrap()).at(&p)?;
    Ok(files)
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
