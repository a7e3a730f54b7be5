//! A LLaMA-family model (LLaMA, Mistral, SmolLM2 and relatives; Qwen3) as the GGUF file
//! llama.cpp and Ollama run: `general.architecture = llama` (or `qwen3`), the `<arch>.*`
//! hyper-parameters, the tokenizer, llama.cpp's tensor names and its Q/K row order, each tensor
//! in the type a quantisation mix gives it.
//!
//! - Qwen3 is written as llama.cpp's `qwen3`: the per-head query and key norms as
//!   `blk.N.attn_{q,k}_norm`, `<arch>.attention.key_length` where the head size is not
//!   hidden / heads, and Q/K rows in Hugging Face's order (llama.cpp's `qwen3` rotates halves).
//!
//! - Names: `model.embed_tokens` → `token_embd`, `model.layers.N.self_attn.{q,k,v,o}_proj` →
//!   `blk.N.attn_{q,k,v,output}`, `mlp.{gate,up,down}_proj` → `blk.N.ffn_{gate,up,down}`,
//!   `input_layernorm` → `blk.N.attn_norm`, `post_attention_layernorm` → `blk.N.ffn_norm`,
//!   `model.norm` → `output_norm`, `lm_head` → `output` (left out with tied embeddings);
//!   projection biases keep their `.bias` (llama.cpp's `llama` reads them).
//! - Q and K: llama.cpp applies RoPE to adjacent pairs of a head's rows, Hugging Face to the
//!   head's two halves, so within each head row i of the first half goes to 2i and row i of the
//!   second half to 2i + 1 ([`super::permute_qk`], with the query or key/value head count), and
//!   so are their biases (Qwen2).
//! - Types ([`GgufQuant`]): 1-D tensors (norms) stay F32 always. `q4_k_m` follows llama.cpp's
//!   Q4_K_M mix for a dense LLaMA: `output` (or the tied `token_embd`) Q6_K; `attn_v` and
//!   `ffn_down` of layer i Q6_K when i < n/8, i ≥ 7n/8 or (i − n/8) mod 3 = 2; every other
//!   matrix Q4_K. `q4_0` gives `output` Q6_K as llama.cpp does. A matrix whose rows are not a
//!   whole number of blocks falls back as in llama.cpp (Q4_K → Q5_0, Q6_K → Q8_0, then F16).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::permute_qk;
use super::write::{write_gguf_file, TensorInfo};
pub use super::{gguf_name, gguf_name_in, Arch, ROPE_FREQS};
use crate::error::{Error, Result};
use crate::model::llama::{max_positions, LlamaConfig, Rope, RopeScaling};
use crate::model::weights::ConfigReader;

/// The tensor types of a written model, as `--quant` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    /// llama.cpp's Q4_K_M mix.
    Q4KM,
    /// Each tensor in the type it has in the base (a GGUF file's per-tensor types).
    Same,
}

impl fmt::Display for GgufQuant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GgufQuant::F32 => "f32",
            GgufQuant::F16 => "f16",
            GgufQuant::BF16 => "bf16",
            GgufQuant::Q8_0 => "q8_0",
            GgufQuant::Q4_0 => "q4_0",
            GgufQuant::Q4KM => "q4_k_m",
            GgufQuant::Same => "same",
        })
    }
}

impl FromStr for GgufQuant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => GgufQuant::F32,
            "f16" => GgufQuant::F16,
            "bf16" => GgufQuant::BF16,
            "q8_0" => GgufQuant::Q8_0,
            "q4_0" => GgufQuant::Q4_0,
            "q4_k_m" => GgufQuant::Q4KM,
            "same" => GgufQuant::Same,
            _ => {
                return Err(Error::msg(format!(
                    "unknown GGUF quantisation `{s}`: expected f32, f16, bf16, q8_0, q4_0, q4_k_m or same"
                )))
            }
        })
    }
}

impl GgufQuant {
    /// llama.cpp's `general.file_type` number (its `llama_ftype`); None for `same`.
    pub fn file_type(self) -> Option<u32> {
        match self {
            GgufQuant::F32 => Some(0),
            GgufQuant::F16 => Some(1),
            GgufQuant::Q4_0 => Some(2),
            GgufQuant::Q8_0 => Some(7),
            GgufQuant::Q4KM => Some(15),
            GgufQuant::BF16 => Some(32),
            GgufQuant::Same => None,
        }
    }
}

/// The layer number and module of a `blk.N.module.weight` (or `.bias`) name.
fn block_of(gguf: &str) -> Option<(usize, &str)> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, module) = rest.split_once('.')?;
    let module = module
        .strip_suffix(".weight")
        .or_else(|| module.strip_suffix(".bias"))?;
    Some((layer.parse().ok()?, module))
}

/// llama.cpp's "more bits" layers of the Q4_K_M mix: the first and last eighth, and every third
/// layer between.
fn more_bits(i: usize, n: usize) -> bool {
    let (first, last) = (n / 8, 7 * n / 8);
    i < first || i >= last || (i - first) % 3 == 2
}

/// The type a matrix with rows of `cols` values gets when `want` does not fit them, as
/// llama.cpp's quantiser falls back.
fn fallback(want: GgmlDType, cols: usize) -> GgmlDType {
    if cols % want.block_size() == 0 {
        return want;
    }
    let next = match want {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if cols % next.block_size() == 0 {
        next
    } else {
        GgmlDType::F16
    }
}

/// The type of tensor `gguf` (row-major `shape`) under `quant`, for a model of `layers` layers
/// (`tied`: the embedding is also the output); `base` is its type in the base for `same`.
pub fn tensor_type(
    quant: GgufQuant,
    gguf: &str,
    shape: &[usize],
    layers: usize,
    tied: bool,
    base: Option<GgmlDType>,
) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    let cols = shape[shape.len() - 1];
    let is_output = gguf == "output.weight" || (tied && gguf == "token_embd.weight");
    let block = block_of(gguf);
    let want = match quant {
        GgufQuant::F32 => GgmlDType::F32,
        GgufQuant::F16 => GgmlDType::F16,
        GgufQuant::BF16 => GgmlDType::BF16,
        GgufQuant::Same => base.unwrap_or(GgmlDType::F32),
        // llama.cpp's quantiser leaves learned positions (GPT-2's) as they are
        _ if gguf == "position_embd.weight" => GgmlDType::F32,
        GgufQuant::Q8_0 => GgmlDType::Q8_0,
        GgufQuant::Q4_0 if is_output => GgmlDType::Q6K,
        GgufQuant::Q4_0 => GgmlDType::Q4_0,
        GgufQuant::Q4KM if is_output => GgmlDType::Q6K,
        GgufQuant::Q4KM => match block {
            Some((_, "attn_qkv")) => GgmlDType::Q5K,
            Some((i, "attn_v" | "ffn_down")) if more_bits(i, layers) => GgmlDType::Q6K,
            _ => GgmlDType::Q4K,
        },
    };
    fallback(want, cols)
}

fn string(s: impl Into<String>) -> Value {
    Value::String(s.into())
}

fn u32_of(what: &str, n: usize) -> Result<Value> {
    u32::try_from(n)
        .map(Value::U32)
        .map_err(|_| Error::msg(format!("{what} = {n} does not fit GGUF's 32-bit field")))
}

/// The `general.*` and `<arch>.*` metadata of a Hugging Face LLaMA-family config.json (`c`,
/// already read into `cfg`), named `name`, and the architecture llama.cpp runs it as
/// ([`Arch::for_export`]). Other model types (whose extra norms, activations or RoPE layouts
/// singlora does not write yet) and LLaMA 3.1's RoPE scaling are refused.
pub fn hf_llama_metadata(c: &ConfigReader, cfg: &LlamaConfig, name: &str) -> Result<HfMetadata> {
    let model_type = c.str_or("model_type", "llama")?;
    let arch = Arch::for_export(model_type).ok_or_else(|| {
        Error::bad_field(
            c.path,
            "model_type",
            format!("`{model_type}`: GGUF export writes {EXPORT_FAMILIES} models only"),
        )
    })?;
    if arch == Arch::Gpt2 {
        return gpt2_metadata(c, cfg, name);
    }
    if arch == Arch::Qwen3 && cfg.sliding_window.is_some() {
        return Err(Error::bad_field(
            c.path,
            "use_sliding_window",
            "Qwen3 with sliding-window layers: llama.cpp's qwen3 attends to the whole context",
        ));
    }
    let rope = match arch {
        Arch::Gemma3 => gemma3_rope(c, cfg)?,
        _ => Rope::read(c, max_positions(c)?)?,
    };
    let key = |k: &str| format!("{}.{k}", arch.name());
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), string(arch.name())),
        ("general.type".into(), string("model")),
        ("general.name".into(), string(name)),
        (
            key("context_length"),
            u32_of("max_position_embeddings", max_positions(c)?)?,
        ),
        (key("embedding_length"), u32_of("hidden_size", cfg.hidden)?),
        (key("block_count"), u32_of("num_hidden_layers", cfg.layers)?),
        (
            key("feed_forward_length"),
            u32_of("intermediate_size", cfg.intermediate)?,
        ),
        (
            key("attention.head_count"),
            u32_of("num_attention_heads", cfg.heads)?,
        ),
        (
            key("attention.head_count_kv"),
            u32_of("num_key_value_heads", cfg.kv_heads)?,
        ),
        (key("rope.freq_base"), Value::F32(rope.theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.eps as f32),
        ),
        (
            key("rope.dimension_count"),
            u32_of("head_dim", cfg.head_dim)?,
        ),
        (key("vocab_size"), u32_of("vocab_size", cfg.vocab)?),
    ];
    if let (Some(w), Arch::Gemma3 | Arch::Phi3) = (cfg.sliding_window, arch) {
        md.push((
            key("attention.sliding_window"),
            u32_of("sliding_window", w)?,
        ));
    }
    if cfg.head_dim * cfg.heads != cfg.hidden || arch == Arch::Gemma3 {
        md.push((
            key("attention.key_length"),
            u32_of("head_dim", cfg.head_dim)?,
        ));
        md.push((
            key("attention.value_length"),
            u32_of("head_dim", cfg.head_dim)?,
        ));
    }
    match rope.scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            md.push((key("rope.scaling.type"), string("linear")));
            md.push((key("rope.scaling.factor"), Value::F32(factor as f32)));
        }
        // llama.cpp keeps LLaMA 3.1's scaling as per-frequency factors, the `rope_freqs` tensor
        RopeScaling::Llama3 { .. } if arch == Arch::Llama => {}
        RopeScaling::Llama3 { .. } => {
            return Err(Error::bad_field(
                c.path,
                "rope_scaling",
                format!("LLaMA 3.1's scaling (rope_type llama3) on a {model_type} model: llama.cpp's {} does not read it", arch.name()),
            ))
        }
    }
    let rope_freqs = rope
        .freq_factors(cfg.head_dim)
        .map(|f| f.into_iter().map(|x| x as f32).collect());
    Ok(HfMetadata {
        arch,
        metadata: md,
        rope_freqs,
    })
}

/// GPT-2's `gpt2.*` keys, after checking the model is what llama.cpp's `gpt2` computes: the
/// tanh GELU, learned positions, heads of hidden / heads.
fn gpt2_metadata(c: &ConfigReader, cfg: &LlamaConfig, name: &str) -> Result<HfMetadata> {
    use crate::model::llama::MlpAct;
    if cfg.mlp_act != MlpAct::GeluTanh {
        return Err(Error::bad_field(
            c.path,
            "activation_function",
            format!(
                "{:?}: llama.cpp's gpt2 computes the tanh GELU (gelu_new) only",
                cfg.mlp_act
            ),
        ));
    }
    let positions = cfg.learned_positions.ok_or_else(|| {
        Error::bad_field(c.path, "n_positions", "GPT-2 without learned positions")
    })?;
    let key = |k: &str| format!("gpt2.{k}");
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), string("gpt2")),
        ("general.type".into(), string("model")),
        ("general.name".into(), string(name)),
        (key("context_length"), u32_of("n_positions", positions)?),
        (key("embedding_length"), u32_of("n_embd", cfg.hidden)?),
        (key("block_count"), u32_of("n_layer", cfg.layers)?),
        (
            key("feed_forward_length"),
            u32_of("n_inner", cfg.intermediate)?,
        ),
        (key("attention.head_count"), u32_of("n_head", cfg.heads)?),
        (
            key("attention.layer_norm_epsilon"),
            Value::F32(cfg.eps as f32),
        ),
    ];
    Ok(HfMetadata {
        arch: Arch::Gpt2,
        metadata: md,
        rope_freqs: None,
    })
}

/// Gemma 3's global RoPE, after checking the rest is what llama.cpp's `gemma3` hard-codes:
/// every sixth layer global and the others local with base 10000 unscaled, the queries scaled
/// by 1/√head_dim (1/√(hidden / heads) at 62 layers), no logit soft-capping.
fn gemma3_rope(c: &ConfigReader, cfg: &LlamaConfig) -> Result<Rope> {
    let (global, local) = crate::model::llama::gemma_ropes(c, max_positions(c)?)?;
    let refuse = |field: &str, what: String| {
        Err(Error::bad_field(
            c.path,
            field,
            format!("{what}, which llama.cpp's gemma3 does not compute (it hard-codes Gemma 3's settings)"),
        ))
    };
    if local.theta != 10000.0 || local.scaling != RopeScaling::None {
        return refuse(
            "rope_parameters.sliding_attention",
            format!("local RoPE base {} ({:?})", local.theta, local.scaling),
        );
    }
    if let Some((_, sliding)) = &cfg.local_rope {
        if sliding
            .iter()
            .enumerate()
            .any(|(i, &s)| s == ((i + 1) % 6 == 0))
        {
            return refuse("layer_types", "global layers other than every sixth".into());
        }
    }
    let theirs = if cfg.layers == 62 {
        1.0 / ((cfg.hidden / cfg.heads) as f64).sqrt()
    } else {
        1.0 / (cfg.head_dim as f64).sqrt()
    };
    let ours = cfg.query_scale / (cfg.head_dim as f64).sqrt();
    if (ours - theirs).abs() > 1e-9 * theirs {
        return refuse(
            "query_pre_attn_scalar",
            format!("queries scaled by {ours} where llama.cpp scales by {theirs}"),
        );
    }
    if let Some(cap) = cfg.final_softcap {
        return refuse(
            "final_logit_softcapping",
            format!("logits soft-capped at {cap}"),
        );
    }
    if matches!(global.scaling, RopeScaling::Llama3 { .. }) {
        return refuse(
            "rope_parameters.full_attention",
            "LLaMA 3.1's RoPE scaling".into(),
        );
    }
    Ok(global)
}

/// What a Hugging Face config.json gives a GGUF file.
pub struct HfMetadata {
    /// The architecture llama.cpp runs the model as.
    pub arch: Arch,
    /// `general.*` and `<arch>.*`.
    pub metadata: Vec<(String, Value)>,
    /// LLaMA 3.1's RoPE scaling as llama.cpp's `rope_freqs` tensor.
    pub rope_freqs: Option<Vec<f32>>,
}

/// The Hugging Face model types GGUF export writes, for messages.
pub const EXPORT_FAMILIES: &str =
    "LLaMA-architecture (llama, mistral, qwen2, SmolLM2), Qwen3, Gemma 3, Phi-3 and GPT-2";

/// What a LLaMA-family GGUF file is made from, besides the tensors' values.
#[derive(Debug, Clone)]
pub struct LlamaGguf {
    /// The architecture llama.cpp runs it as: its tensor names and Q/K row order.
    pub arch: Arch,
    /// LLaMA 3.1's RoPE factors, written as the `rope_freqs` tensor.
    pub rope_freqs: Option<Vec<f32>>,
    /// Every metadata key but the type-dependent ones (`general.file_type`,
    /// `general.quantization_version`), which [`write_llama_gguf`] adds.
    pub metadata: Vec<(String, Value)>,
    pub heads: usize,
    pub kv_heads: usize,
    pub layers: usize,
    /// The output head is the embedding: no `output.weight`.
    pub tied: bool,
    /// The Hugging Face names and shapes of the tensors to write (a tied `lm_head` is skipped).
    pub tensors: Vec<(String, Vec<usize>)>,
    /// Each tensor's type in the base, for `same` (Hugging Face names).
    pub base_types: BTreeMap<String, GgmlDType>,
}

/// A tensor's data: values in Hugging Face's layout (any float dtype), or bytes already in the
/// planned type and llama.cpp's layout (an unchanged tensor of a GGUF base, copied exactly).
pub enum TensorData {
    Values(Tensor),
    Raw(Vec<u8>),
}

/// The planned tensors of `m` under `quant`, in llama.cpp's order (embedding, blocks, output),
/// each with its Hugging Face name.
pub fn plan(m: &LlamaGguf, quant: GgufQuant) -> Result<Vec<(String, TensorInfo)>> {
    let mut out = vec![];
    for (hf, shape) in &m.tensors {
        if m.tied && hf == "lm_head.weight" {
            continue;
        }
        let g = gguf_name_in(m.arch, hf).ok_or_else(|| {
            Error::bad_tensor(
                hf,
                format!(
                    "has no place in llama.cpp's {} (known: the embedding, the projections, the norms and lm_head)",
                    m.arch.name()
                ),
            )
        })?;
        if quant == GgufQuant::Same && !m.base_types.contains_key(hf) {
            return Err(Error::bad_tensor(
                hf,
                "has no type in the base to keep (--quant same)",
            ));
        }
        // llama.cpp's layout: GPT-2's Conv1D weights as (d_out, d_in)
        let mut shape = shape.clone();
        if m.arch.transposes(&g) {
            shape.reverse();
        }
        let dtype = tensor_type(
            quant,
            &g,
            &shape,
            m.layers,
            m.tied,
            m.base_types.get(hf).copied(),
        );
        out.push((
            hf.clone(),
            TensorInfo {
                name: g,
                shape,
                dtype,
            },
        ));
    }
    if let Some(f) = &m.rope_freqs {
        out.push((
            ROPE_FREQS.to_string(),
            TensorInfo {
                name: ROPE_FREQS.to_string(),
                shape: vec![f.len()],
                dtype: GgmlDType::F32,
            },
        ));
    }
    let rank = |n: &str| match n {
        ROPE_FREQS => (0, 0, 0),
        "token_embd.weight" => (0, 1, 0),
        "position_embd.weight" => (0, 2, 0),
        "output_norm.weight" => (2, 0, 0),
        "output_norm.bias" => (2, 0, 1),
        "output.weight" => (2, 1, 0),
        _ => {
            const ORDER: [&str; 14] = [
                "attn_norm",
                "attn_qkv",
                "attn_q",
                "attn_q_norm",
                "attn_k",
                "attn_k_norm",
                "attn_v",
                "attn_output",
                "post_attention_norm",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
                "post_ffw_norm",
            ];
            let (i, m) = block_of(n).unwrap_or((usize::MAX, ""));
            (
                1,
                i,
                ORDER.iter().position(|o| *o == m).unwrap_or(ORDER.len()),
            )
        }
    };
    out.sort_by_key(|(_, t)| rank(&t.name));
    Ok(out)
}

/// `t` (Hugging Face layout) as llama.cpp stores `info`: Q/K rows permuted, quantised; refused
/// when the stored values are not all finite (a weight past f16's range, a non-finite merge).
fn encode(t: &Tensor, info: &TensorInfo, m: &LlamaGguf) -> Result<Vec<u8>> {
    let transposed;
    let t = if m.arch.transposes(&info.name) {
        transposed = t.t()?;
        &transposed
    } else {
        t
    };
    if t.dims() != info.shape.as_slice() {
        return Err(Error::bad_tensor(
            &info.name,
            format!("has shape {:?}, planned {:?}", t.dims(), info.shape),
        ));
    }
    let mut t = t.to_dtype(DType::F32)?;
    match block_of(&info.name) {
        Some((_, "attn_q")) if m.arch.permutes_qk() => t = permute_qk(&t, m.heads)?,
        Some((_, "attn_k")) if m.arch.permutes_qk() => t = permute_qk(&t, m.kv_heads)?,
        _ => {}
    }
    if m.arch.norms_plus_one() && info.name.ends_with("norm.weight") {
        // Gemma's offsets w, stored as the 1 + w llama.cpp multiplies by
        t = (t + 1.0)?;
    }
    // candle's quantize reads the whole storage under a view, so it gets a tensor of its own
    let t = Tensor::from_vec(t.flatten_all()?.to_vec1::<f32>()?, t.dims(), &Device::Cpu)?;
    let q = QTensor::quantize(&t, info.dtype).map_err(|e| {
        Error::bad_tensor(&info.name, format!("cannot store as {:?}: {e}", info.dtype))
    })?;
    let back = q
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bad = back.iter().filter(|x| !x.is_finite()).count();
    if bad > 0 {
        return Err(Error::bad_tensor(
            &info.name,
            format!(
                "{bad} of {} values are NaN or infinite once stored as {:?}; nothing was written",
                back.len(),
                info.dtype
            ),
        ));
    }
    Ok(q.data()?.into_owned())
}

/// Writes `m` to the GGUF file `out` (staged, `inputs` never overwritten; see
/// [`write_gguf_file`]), each tensor's data from `load(hf_name, planned)`. Returns the planned
/// tensors and what interrupted writes had left and was removed.
pub fn write_llama_gguf(
    out: &Path,
    overwrite: bool,
    inputs: &[(&str, &Path)],
    m: &LlamaGguf,
    quant: GgufQuant,
    mut load: impl FnMut(&str, &TensorInfo) -> Result<TensorData>,
) -> Result<(Vec<TensorInfo>, Vec<PathBuf>)> {
    let planned = plan(m, quant)?;
    let infos: Vec<TensorInfo> = planned.iter().map(|(_, t)| t.clone()).collect();
    let mut md: Vec<(String, Value)> = m
        .metadata
        .iter()
        .filter(|(k, _)| k != "general.file_type" && k != "general.quantization_version")
        .cloned()
        .collect();
    let file_type = quant.file_type().or_else(|| {
        // `same`: the base's file type where it said one
        m.metadata.iter().find_map(|(k, v)| match (k.as_str(), v) {
            ("general.file_type", Value::U32(t)) => Some(*t),
            _ => None,
        })
    });
    if let Some(ft) = file_type {
        md.push(("general.file_type".into(), Value::U32(ft)));
    }
    md.push(("general.quantization_version".into(), Value::U32(2)));
    let cleaned = write_gguf_file(out, overwrite, inputs, &md, &infos, |i, info| {
        if let (ROPE_FREQS, Some(f)) = (planned[i].0.as_str(), &m.rope_freqs) {
            return Ok(f.iter().flat_map(|x| x.to_le_bytes()).collect());
        }
        match load(&planned[i].0, info)? {
            TensorData::Raw(bytes) => Ok(bytes),
            TensorData::Values(t) => encode(&t, info, m),
        }
    })?;
    Ok((infos, cleaned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_invert_hf_name() {
        for g in [
            "token_embd.weight",
            "output_norm.weight",
            "output.weight",
            "blk.0.attn_q.weight",
            "blk.11.attn_k.weight",
            "blk.2.attn_v.weight",
            "blk.2.attn_output.weight",
            "blk.3.ffn_gate.weight",
            "blk.3.ffn_up.weight",
            "blk.3.ffn_down.weight",
            "blk.4.attn_norm.weight",
            "blk.4.ffn_norm.weight",
        ] {
            let hf = super::super::hf_name(g).unwrap();
            assert_eq!(gguf_name(&hf).as_deref(), Some(g), "{hf}");
        }
        assert_eq!(
            gguf_name("model.layers.2.self_attn.q_proj.bias").as_deref(),
            Some("blk.2.attn_q.bias")
        );
        for hf in [
            "model.layers.0.input_layernorm.bias",
            "model.norm.bias",
            "model.layers.x.mlp.up_proj.weight",
            "model.rotary_emb.inv_freq",
            "score.weight",
        ] {
            assert_eq!(gguf_name(hf), None, "{hf}");
        }
    }

    #[test]
    fn q4_k_m_mix_is_llama_cpps() {
        // 30 layers (SmolLM2-135M): Q6_K for attn_v/ffn_down at 0..3, 27..29 and every third
        let n = 30;
        let six: Vec<usize> = (0..n).filter(|&i| more_bits(i, n)).collect();
        assert_eq!(six, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        let t = |name: &str, shape: &[usize], tied| {
            tensor_type(GgufQuant::Q4KM, name, shape, n, tied, None)
        };
        assert_eq!(t("blk.0.attn_v.weight", &[256, 512], false), GgmlDType::Q6K);
        assert_eq!(t("blk.3.attn_v.weight", &[256, 512], false), GgmlDType::Q4K);
        assert_eq!(
            t("blk.5.ffn_down.weight", &[512, 1536], false),
            GgmlDType::Q6K
        );
        assert_eq!(t("blk.5.attn_q.weight", &[512, 512], false), GgmlDType::Q4K);
        assert_eq!(t("output.weight", &[100, 512], false), GgmlDType::Q6K);
        assert_eq!(t("token_embd.weight", &[100, 512], false), GgmlDType::Q4K);
        assert_eq!(t("token_embd.weight", &[100, 512], true), GgmlDType::Q6K);
        // rows of 576 (SmolLM2's width) are not whole 256-blocks: Q5_0 / Q8_0 as llama.cpp
        assert_eq!(
            t("blk.3.attn_q.weight", &[576, 576], false),
            GgmlDType::Q5_0
        );
        assert_eq!(
            t("blk.0.attn_v.weight", &[192, 576], false),
            GgmlDType::Q8_0
        );
        // rows of 16: F16
        assert_eq!(t("blk.3.attn_q.weight", &[16, 16], false), GgmlDType::F16);
        assert_eq!(t("blk.3.attn_norm.weight", &[576], false), GgmlDType::F32);
        assert_eq!(
            tensor_type(GgufQuant::Q4_0, "output.weight", &[10, 64], 2, false, None),
            GgmlDType::Q8_0
        );
        assert_eq!(
            tensor_type(
                GgufQuant::Same,
                "blk.0.attn_q.weight",
                &[64, 64],
                2,
                false,
                Some(GgmlDType::Q4_1)
            ),
            GgmlDType::Q4_1
        );
        assert_eq!("Q4_K_M".parse::<GgufQuant>().unwrap(), GgufQuant::Q4KM);
        assert!("q3"
            .parse::<GgufQuant>()
            .unwrap_err()
            .to_string()
            .contains("q4_k_m"));
    }
}
