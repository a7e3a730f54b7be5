//! Loading a LLaMA-architecture GGUF file (llama.cpp's format) as if it were a Hugging Face
//! checkpoint: the `llama.*` metadata become an HF `LlamaConfig`-style `config.json`, the
//! tensors are dequantised and renamed to HF's names (`blk.3.attn_q.weight` becomes
//! `model.layers.3.self_attn.q_proj.weight`), the rows of the Q and K projections are put back
//! from llama.cpp's interleaved RoPE order into HF's rotate-half order, and the byte-level BPE
//! vocabulary stored under `tokenizer.ggml.*` becomes a `tokenizers::Tokenizer`. The result
//! can be fine-tuned exactly like a model loaded from `config.json` + safetensors.
//!
//! The metadata are read as llama.cpp reads them (RoPE scaling's type defaulting to linear, the
//! older `rope.scale_linear` key; `rope_freqs` as the LLaMA 3.1 scaling that gives its
//! factors), and a `llama.*` key or a tensor this loader does not implement (YaRN, other
//! `rope_freqs`, partial rotary) is refused by name, never ignored.
//!
//! The other direction, files llama.cpp runs: [`write`] (the GGUF container), [`model`] (a
//! LLaMA model: names, Q/K order, metadata, quantisation mix), [`vocab`] (a Hugging Face
//! tokenizer as `tokenizer.*` metadata) and [`lora`] (an adapter for llama.cpp's `--lora`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value as Json};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, IoContext, Result};

pub mod lora;
pub mod model;
pub mod vocab;
pub mod write;

/// The four bytes every GGUF file starts with.
const MAGIC: &[u8; 4] = b"GGUF";

/// A GGUF model turned into the pieces of a Hugging Face checkpoint.
pub struct GgufModel {
    /// An HF `LlamaConfig`-like `config.json`.
    pub config: Json,
    /// HF tensor names → dequantised tensors on the CPU, in the requested dtype.
    pub tensors: BTreeMap<String, Tensor>,
    /// The byte-level BPE tokenizer rebuilt from the `tokenizer.ggml.*` metadata.
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template`, when the file has one.
    pub chat_template: Option<String>,
    /// LLaMA 3.1's per-frequency RoPE divisors (`rope_freqs`) as the file stores them; `config`
    /// holds the scaling they amount to.
    pub rope_freqs: Option<Vec<f32>>,
    /// With [`load_gguf_keeping`]: the linear layers' weights stored in a quantised type, kept
    /// as stored (HF names; not in `tensors`).
    pub kept: BTreeMap<String, std::sync::Arc<crate::quant::ggml::GgmlWeight>>,
}

impl std::fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufModel")
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// Whether `path` is a readable file that starts with the GGUF magic bytes.
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == MAGIC
}

fn has_gguf_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The GGUF file that `dir_or_file` designates: the path itself when it is a GGUF file (by its
/// magic bytes, or by its `.gguf` extension so that a damaged file still reaches
/// [`load_gguf`] and its error), or the single `*.gguf` file inside a directory. `None` when
/// there is no such file or a directory holds several.
pub fn find_gguf(dir_or_file: &Path) -> Option<PathBuf> {
    if dir_or_file.is_file() {
        return (is_gguf(dir_or_file) || has_gguf_extension(dir_or_file))
            .then(|| dir_or_file.to_path_buf());
    }
    let entries = std::fs::read_dir(dir_or_file).ok()?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && has_gguf_extension(p))
        .collect();
    if found.len() == 1 {
        found.pop()
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor names

/// Tensors llama.cpp may write that carry nothing a HF LLaMA needs (`attn_rot_embd` is the RoPE
/// inverse-frequency table, recomputed from `rope_theta`).
fn is_ignorable(gguf_name: &str) -> bool {
    gguf_name.starts_with("blk.") && gguf_name.contains(".attn_rot_embd")
}

/// The Hugging Face name of a llama.cpp LLaMA tensor, or `None` for a name this loader does not
/// know. `token_embd.weight` → `model.embed_tokens.weight`, `blk.N.attn_q.weight` →
/// `model.layers.N.self_attn.q_proj.weight`, `output.weight` → `lm_head.weight`, and so on.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    hf_name_in(Arch::Llama, gguf_name)
}

/// [`hf_name`] for one architecture's tensors.
fn hf_name_in(arch: Arch, gguf_name: &str) -> Option<String> {
    // a bias: `blk.N.attn_q.bias` (LLaMA's projections), every GPT-2 block tensor and `ln_f`
    if let Some(stem) = gguf_name.strip_suffix(".bias") {
        let hf = hf_name_in(arch, &format!("{stem}.weight"))?;
        let module = hf.strip_suffix(".weight")?;
        return arch.has_bias(module).then(|| format!("{module}.bias"));
    }
    let stem = gguf_name.strip_suffix(".weight")?;
    if let Some((_, top)) = arch.top_tensors().iter().find(|(g, _)| *g == stem) {
        return Some(format!("{top}.weight"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, module) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = arch
        .layer_tensors()
        .into_iter()
        .find(|(g, _)| *g == module)?;
    Some(format!("{}{layer}.{hf}.weight", arch.block_prefix()))
}

/// The tensors outside the blocks of LLaMA's layout: llama.cpp's name, Hugging Face's.
const TOP_TENSORS: [(&str, &str); 3] = [
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// GPT-2's (`GPT2LMHeadModel`'s names).
const GPT2_TOP_TENSORS: [(&str, &str); 4] = [
    ("token_embd", "transformer.wte"),
    ("position_embd", "transformer.wpe"),
    ("output_norm", "transformer.ln_f"),
    ("output", "lm_head"),
];

/// llama.cpp's name of a Hugging Face LLaMA tensor (the inverse of [`hf_name`]), or None for a
/// tensor llama.cpp's LLaMA has no place for: `model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`; a projection's bias (Qwen2's, `attention_bias`, `mlp_bias`) keeps
/// `.bias`.
pub fn gguf_name(hf: &str) -> Option<String> {
    gguf_name_in(Arch::Llama, hf)
}

/// [`gguf_name`] for one architecture's tensors (Qwen3's `self_attn.q_norm` → `attn_q_norm`;
/// GPT-2's by `GPT2LMHeadModel`'s names, `transformer.h.N.…`).
pub fn gguf_name_in(arch: Arch, hf: &str) -> Option<String> {
    let (stem, suffix) = hf.rsplit_once('.')?;
    if !(suffix == "weight" || (suffix == "bias" && arch.has_bias(stem))) {
        return None;
    }
    if let Some((top, _)) = arch.top_tensors().iter().find(|(_, h)| *h == stem) {
        return Some(format!("{top}.{suffix}"));
    }
    let (layer, module) = stem.strip_prefix(arch.block_prefix())?.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (g, _) = arch
        .layer_tensors()
        .into_iter()
        .find(|(_, h)| *h == module)?;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

// ---------------------------------------------------------------------------------------------
// Q/K row order

/// Reorders the rows of each head: `to_gguf` sends HF's rotate-half layout (the head's first
/// half of rows paired with its second half) to llama.cpp's interleaved pairs, otherwise back.
fn reorder_heads(w: &Tensor, n_head: usize, to_gguf: bool) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = *dims
        .first()
        .ok_or_else(|| Error::msg("Q/K permutation of a scalar tensor"))?;
    if n_head == 0 || rows % (2 * n_head) != 0 {
        return Err(Error::msg(format!(
            "Q/K permutation: {rows} rows do not split into {n_head} heads of an even size"
        )));
    }
    let half = rows / n_head / 2;
    let rest = w.elem_count() / rows.max(1);
    let split = if to_gguf {
        w.reshape((n_head, 2, half, rest))?
    } else {
        w.reshape((n_head, half, 2, rest))?
    };
    Ok(split.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// Undoes llama.cpp's Q/K row permutation: `w` (rows = `n_head` × head size) in llama.cpp's
/// interleaved layout, where each head's rows come in (x₀, y₀, x₁, y₁, …) pairs, goes back to
/// Hugging Face's rotate-half layout (x₀, x₁, …, y₀, y₁, …). Use the number of query heads for
/// Q and the number of key/value heads for K. Works on weights (rows, d_in) and biases (rows).
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    reorder_heads(w, n_head, false)
}

/// The permutation llama.cpp's converter applies to HF's Q/K weights (the inverse of
/// [`unpermute_qk`]): within each head, row `i` of the first half goes to row `2i` and row `i`
/// of the second half to row `2i + 1`.
pub fn permute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    reorder_heads(w, n_head, true)
}

// ---------------------------------------------------------------------------------------------
// Metadata

/// The `general.architecture`s this loader reads: LLaMA's layout and the families that add to
/// it (see `model::llama`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen3,
    Gemma3,
    Phi3,
    /// GPT-2: learned positions, LayerNorm with biases, fused `c_attn`, Conv1D weights that
    /// Hugging Face stores as (d_in, d_out) and llama.cpp as (d_out, d_in).
    Gpt2,
}

impl Arch {
    /// The architecture llama.cpp runs a Hugging Face config.json `model_type` as, for the
    /// types singlora writes to GGUF: llama.cpp's `llama` computes LLaMA, Mistral (without its
    /// window) and Qwen2 (with the projection biases) exactly; Qwen3, Gemma 3, Phi-3 and GPT-2
    /// are their own.
    pub fn for_export(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" | "mistral" | "qwen2" => Arch::Llama,
            "qwen3" => Arch::Qwen3,
            "gemma3_text" => Arch::Gemma3,
            "phi3" => Arch::Phi3,
            "gpt2" => Arch::Gpt2,
            _ => return None,
        })
    }

    /// The architecture of a config.json `model_type` among those this loader reads (Mistral
    /// and Qwen2 as llama.cpp's `llama`).
    pub fn of_model_type(model_type: &str) -> Option<Self> {
        Self::for_export(model_type)
    }

    /// An architecture by its `general.architecture` name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Arch::Llama,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            "phi3" => Arch::Phi3,
            "gpt2" => Arch::Gpt2,
            _ => return None,
        })
    }

    /// Its `general.architecture` name, the prefix of its own metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
            Arch::Gpt2 => "gpt2",
        }
    }

    /// config.json's `model_type` and `architectures`.
    fn model_type(self) -> &'static str {
        match self {
            Arch::Gemma3 => "gemma3_text",
            other => other.name(),
        }
    }

    fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::Gpt2 => "GPT2LMHeadModel",
        }
    }

    /// The architecture's keys beyond [`KNOWN_KEYS`] that this loader reads.
    fn extra_keys(self) -> &'static [&'static str] {
        match self {
            Arch::Gemma3 => &[
                "attention.sliding_window",
                "final_logit_softcapping",
                "attn_logit_softcapping",
            ],
            Arch::Phi3 => &["attention.sliding_window"],
            Arch::Gpt2 => &["attention.layer_norm_epsilon"],
            _ => &[],
        }
    }

    /// The tensors outside the blocks: llama.cpp's name, Hugging Face's, without `.weight`.
    fn top_tensors(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Arch::Gpt2 => &GPT2_TOP_TENSORS,
            _ => &TOP_TENSORS,
        }
    }

    /// The Hugging Face prefix of block N's tensors, before the N.
    fn block_prefix(self) -> &'static str {
        match self {
            Arch::Gpt2 => "transformer.h.",
            _ => "model.layers.",
        }
    }

    /// Whether the Hugging Face module (a name without `.weight`) may have a bias that llama.cpp
    /// reads: LLaMA's projections (Qwen2's q/k/v, `attention_bias`, `mlp_bias`), every GPT-2
    /// block tensor and its final norm.
    fn has_bias(self, module: &str) -> bool {
        match self {
            Arch::Gpt2 => module.starts_with("transformer.h.") || module == "transformer.ln_f",
            _ => module.starts_with("model.layers.") && module.ends_with("_proj"),
        }
    }

    /// Whether llama.cpp stores the tensor `gguf_name` transposed against Hugging Face's
    /// layout: GPT-2's Conv1D weights, (d_in, d_out) in the checkpoint.
    pub fn transposes(self, gguf_name: &str) -> bool {
        self == Arch::Gpt2
            && hf_name_in(self, gguf_name)
                .as_deref()
                .and_then(|hf| hf.strip_suffix(".weight"))
                .is_some_and(is_conv1d)
    }

    /// Each layer's tensors: llama.cpp's name (after `blk.N.`) and Hugging Face's (after
    /// [`Arch::block_prefix`] and N), without `.weight`.
    fn layer_tensors(self) -> Vec<(&'static str, &'static str)> {
        if self == Arch::Gpt2 {
            return vec![
                ("attn_norm", "ln_1"),
                ("attn_qkv", "attn.c_attn"),
                ("attn_output", "attn.c_proj"),
                ("ffn_norm", "ln_2"),
                ("ffn_up", "mlp.c_fc"),
                ("ffn_down", "mlp.c_proj"),
            ];
        }
        let mut v = vec![
            ("attn_output", "self_attn.o_proj"),
            ("ffn_down", "mlp.down_proj"),
            ("attn_norm", "input_layernorm"),
        ];
        if self == Arch::Phi3 {
            v.extend([
                ("attn_qkv", "self_attn.qkv_proj"),
                ("ffn_up", "mlp.gate_up_proj"),
            ]);
        } else {
            v.extend([
                ("attn_q", "self_attn.q_proj"),
                ("attn_k", "self_attn.k_proj"),
                ("attn_v", "self_attn.v_proj"),
                ("ffn_gate", "mlp.gate_proj"),
                ("ffn_up", "mlp.up_proj"),
            ]);
        }
        if self == Arch::Gemma3 {
            v.extend([
                ("post_attention_norm", "post_attention_layernorm"),
                ("ffn_norm", "pre_feedforward_layernorm"),
                ("post_ffw_norm", "post_feedforward_layernorm"),
            ]);
        } else {
            v.push(("ffn_norm", "post_attention_layernorm"));
        }
        if matches!(self, Arch::Qwen3 | Arch::Gemma3) {
            v.extend([
                ("attn_q_norm", "self_attn.q_norm"),
                ("attn_k_norm", "self_attn.k_norm"),
            ]);
        }
        v
    }

    /// Whether llama.cpp's converter interleaved the Q/K rows (its LLaMA RoPE layout; the
    /// others keep Hugging Face's rotate-half order).
    pub fn permutes_qk(self) -> bool {
        self == Arch::Llama
    }

    /// Whether norm weights are stored as llama.cpp multiplies by them, 1 + w for Gemma's
    /// offsets w.
    pub fn norms_plus_one(self) -> bool {
        self == Arch::Gemma3
    }
}

struct Meta<'a> {
    path: &'a Path,
    content: &'a Content,
    /// `general.architecture`: the prefix of the model's own keys.
    arch: Arch,
}

impl<'a> Meta<'a> {
    /// The architecture's own key `<arch>.<suffix>`.
    fn k(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch.name())
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.content.metadata.get(key)
    }

    fn missing(&self, key: &str) -> Error {
        Error::bad_file(self.path, format!("missing metadata key `{key}`"))
    }

    fn mistyped(&self, key: &str, want: &str, v: &Value) -> Error {
        Error::bad_file(
            self.path,
            format!(
                "metadata key `{key}` should be {want}, found {:?}",
                v.value_type()
            ),
        )
    }

    fn uint(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(Some)
            .ok_or_else(|| self.mistyped(key, "a non-negative integer", v))
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        let n = self.uint(key)?.ok_or_else(|| self.missing(key))?;
        usize::try_from(n)
            .map_err(|_| Error::bad_file(self.path, format!("metadata `{key}` = {n} is too large")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.uint(key)?
            .map(|n| {
                usize::try_from(n).map_err(|_| {
                    Error::bad_file(self.path, format!("metadata `{key}` = {n} is too large"))
                })
            })
            .transpose()
    }

    /// A float; an `f32` is given the shortest decimal that reads back as the same `f32`
    /// (so 1e-5 stored as f32 comes out as 1e-5, not 9.999999747378752e-6).
    fn float(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let x = match v {
            Value::F32(x) => x.to_string().parse::<f64>().unwrap_or(*x as f64),
            Value::F64(x) => *x,
            _ => match self.uint(key) {
                Ok(Some(n)) => n as f64,
                _ => return Err(self.mistyped(key, "a number", v)),
            },
        };
        Ok(Some(x))
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.mistyped(key, "a string", v)),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.mistyped(key, "a bool", v)),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a.as_slice())),
            Some(v) => Err(self.mistyped(key, "an array", v)),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(Error::bad_file(
                    self.path,
                    format!(
                        "metadata `{key}`[{i}] should be a string, found {:?}",
                        v.value_type()
                    ),
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::I8(x) => Ok(*x as i64),
                Value::I16(x) => Ok(*x as i64),
                Value::I32(x) => Ok(*x as i64),
                Value::I64(x) => Ok(*x),
                Value::U8(x) => Ok(*x as i64),
                Value::U16(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                v => Err(Error::bad_file(
                    self.path,
                    format!(
                        "metadata `{key}`[{i}] should be an integer, found {:?}",
                        v.value_type()
                    ),
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// The model's dimensions, read from the `llama.*` keys.
struct Dims {
    hidden: usize,
    layers: usize,
    ff: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    /// `<arch>.context_length`: GPT-2's learned positions.
    positions: usize,
}

fn dtype_name(path: &Path, dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        other => {
            return Err(Error::bad_file(
                path,
                format!("cannot load a GGUF model as {other:?}; use f32, f16 or bf16"),
            ))
        }
    })
}

fn read_dims(m: &Meta, vocab: usize) -> Result<Dims> {
    let hidden = m.req_usize(&m.k("embedding_length"))?;
    let layers = m.req_usize(&m.k("block_count"))?;
    let ff = m.req_usize(&m.k("feed_forward_length"))?;
    let heads = m.req_usize(&m.k("attention.head_count"))?;
    let kv_heads = m
        .opt_usize(&m.k("attention.head_count_kv"))?
        .unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::bad_file(
            m.path,
            format!("{heads} attention heads cannot be shared by {kv_heads} key/value heads"),
        ));
    }
    let head_dim = match m.opt_usize(&m.k("attention.key_length"))? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(Error::bad_file(
                m.path,
                format!("embedding length {hidden} is not a multiple of {heads} heads"),
            ))
        }
    };
    if let Some(v) = m.opt_usize(&m.k("attention.value_length"))? {
        if v != head_dim {
            return Err(Error::bad_file(
                m.path,
                format!("key length {head_dim} ≠ value length {v} is not a LLaMA attention"),
            ));
        }
    }
    if head_dim % 2 != 0 {
        return Err(Error::bad_file(m.path, format!("odd head size {head_dim}")));
    }
    if heads.checked_mul(head_dim).is_none() {
        return Err(Error::bad_file(
            m.path,
            format!("{heads} heads of size {head_dim} are more than can be addressed"),
        ));
    }
    if let Some(rot) = m.opt_usize(&m.k("rope.dimension_count"))? {
        if rot != head_dim {
            return Err(Error::bad_file(
                m.path,
                format!(
                    "RoPE over {rot} of the {head_dim} dimensions of a head (partial rotary) \
                     is not supported"
                ),
            ));
        }
    }
    if let Some(n) = m.opt_usize(&m.k("expert_count"))? {
        if n > 0 {
            return Err(Error::bad_file(
                m.path,
                format!("a mixture of {n} experts is not supported, only dense LLaMA models"),
            ));
        }
    }
    let positions = m.opt_usize(&m.k("context_length"))?.unwrap_or(2048);
    Ok(Dims {
        hidden,
        layers,
        ff,
        heads,
        kv_heads,
        head_dim,
        vocab,
        positions,
    })
}

/// The `<arch>.*` metadata keys (after the prefix) this loader reads or knows to leave the math
/// alone; any other is refused rather than ignored, since llama.cpp may act on it.
const KNOWN_KEYS: &[&str] = &[
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "vocab_size",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    "rope.scaling.attn_factor",
    // YaRN's pre-training context and a flag for the record: neither enters linear scaling
    "rope.scaling.original_context_length",
    "rope.scaling.finetuned",
    "expert_count",
    "expert_used_count",
];

fn refuse_unknown_keys(m: &Meta) -> Result<()> {
    let mut unknown: Vec<&str> = m
        .content
        .metadata
        .keys()
        .map(String::as_str)
        .filter(|k| {
            k.strip_prefix(m.arch.name())
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|rest| {
                    !KNOWN_KEYS.contains(&rest) && !m.arch.extra_keys().contains(&rest)
                })
        })
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort_unstable();
    Err(Error::bad_file(
        m.path,
        format!(
            "metadata {} not supported: llama.cpp may change the model's math by it, and \
             singlora does not implement it",
            unknown
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// RoPE scaling as llama.cpp applies it: the type defaults to linear, the factor comes from
/// `rope.scaling.factor` or the older `rope.scale_linear` (0 or absent: none), and type `none`
/// never scales; `rope.scaling.attn_factor` would scale the rotated values themselves.
fn rope_scaling(m: &Meta) -> Result<Option<Json>> {
    if let Some(a) = m.float(&m.k("rope.scaling.attn_factor"))? {
        if a != 1.0 {
            return Err(Error::bad_file(
                m.path,
                format!(
                    "metadata `{}` = {a} (a scale on RoPE's cos/sin) is not supported",
                    m.k("rope.scaling.attn_factor")
                ),
            ));
        }
    }
    let (factor_key, linear_key) = (m.k("rope.scaling.factor"), m.k("rope.scale_linear"));
    let factor = match m.float(&factor_key)? {
        Some(f) => Some((factor_key.as_str(), f)),
        None => m.float(&linear_key)?.map(|f| (linear_key.as_str(), f)),
    };
    let factor = factor.filter(|(_, f)| *f != 0.0 && *f != 1.0);
    match (
        m.string(&m.k("rope.scaling.type"))?.unwrap_or("linear"),
        factor,
    ) {
        ("none", _) | ("linear", None) => Ok(None),
        ("linear", Some((key, f))) => {
            if !(f.is_finite() && f > 0.0) {
                return Err(Error::bad_file(
                    m.path,
                    format!("metadata `{key}` = {f} is not a RoPE scaling factor"),
                ));
            }
            Ok(Some(
                json!({"type": "linear", "rope_type": "linear", "factor": f}),
            ))
        }
        (other, _) => Err(Error::bad_file(
            m.path,
            format!(
                "metadata `{}` = `{other}` is not supported (none and linear are)",
                m.k("rope.scaling.type")
            ),
        )),
    }
}

/// llama.cpp's name of LLaMA 3.1's per-frequency RoPE divisors.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// The file's `rope_freqs` factors, as stored.
fn read_rope_freqs<R: Read + Seek>(
    m: &Meta,
    content: &Content,
    reader: &mut R,
) -> Result<Vec<f32>> {
    content
        .tensor(reader, ROPE_FREQS, &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(|e| Error::bad_file(m.path, format!("tensor `{ROPE_FREQS}`: {e}")))
}

/// config.json's `rope_scaling` for a file's `rope_freqs` factors `stored`: the LLaMA 3.1
/// scaling that gives them ([`crate::model::llama::Rope::from_freq_factors`]), refused where
/// none does or where the metadata scale RoPE too.
fn llama3_scaling(m: &Meta, stored: &[f32], dims: &Dims, config: &Json) -> Result<Json> {
    use crate::model::llama::{Rope, RopeScaling};
    if !config["rope_scaling"].is_null() {
        return Err(Error::bad_file(
            m.path,
            format!(
                "both `{}` and the metadata's RoPE scaling scale RoPE; llama.cpp would apply both",
                ROPE_FREQS
            ),
        ));
    }
    let factors: Vec<f64> = stored.iter().map(|&f| f as f64).collect();
    let theta = config["rope_theta"].as_f64().unwrap_or(10000.0);
    match Rope::from_freq_factors(theta, dims.head_dim, &factors) {
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => Ok(json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings as u64,
        })),
        Some(_) => Ok(Json::Null),
        None => Err(Error::bad_file(
            m.path,
            format!(
                "tensor `{ROPE_FREQS}` holds {} RoPE factors that no LLaMA 3.1 scaling gives \
                 (with head size {} and base {theta}); singlora does not implement others",
                factors.len(),
                dims.head_dim
            ),
        )),
    }
}

fn build_config(m: &Meta, d: &Dims, tied: bool, attn_bias: bool, dtype: DType) -> Result<Json> {
    refuse_unknown_keys(m)?;
    let mut cfg = match m.arch {
        Arch::Gpt2 => gpt2_config(m, d, tied)?,
        _ => llama_config(m, d, tied, attn_bias)?,
    };
    for (gguf_key, hf_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = m.uint(gguf_key)? {
            if id as usize >= d.vocab {
                return Err(Error::bad_file(
                    m.path,
                    format!(
                        "`{gguf_key}` = {id} is outside the vocabulary of {}",
                        d.vocab
                    ),
                ));
            }
            cfg[hf_key] = json!(id);
        }
    }
    cfg["torch_dtype"] = json!(dtype_name(m.path, dtype)?);
    Ok(cfg)
}

/// GPT-2's config.json (`GPT2Config`'s names) from llama.cpp's `gpt2` keys: multi-head
/// attention over heads of hidden / heads, and the tanh GELU llama.cpp's `gpt2` computes.
fn gpt2_config(m: &Meta, d: &Dims, tied: bool) -> Result<Json> {
    if d.kv_heads != d.heads || d.head_dim * d.heads != d.hidden {
        return Err(Error::bad_file(
            m.path,
            format!(
                "{} key/value heads of size {} for {} query heads at width {}: llama.cpp's gpt2 \
                 has {} heads of {} each",
                d.kv_heads,
                d.head_dim,
                d.heads,
                d.hidden,
                d.heads,
                d.hidden / d.heads.max(1)
            ),
        ));
    }
    let key = m.k("attention.layer_norm_epsilon");
    let eps = m.float(&key)?.ok_or_else(|| m.missing(&key))?;
    Ok(json!({
        "architectures": [m.arch.hf_class()],
        "model_type": m.arch.model_type(),
        "n_embd": d.hidden,
        "n_inner": d.ff,
        "n_layer": d.layers,
        "n_head": d.heads,
        "n_positions": d.positions,
        "vocab_size": d.vocab,
        "layer_norm_epsilon": eps,
        "activation_function": "gelu_new",
        "scale_attn_weights": true,
        "tie_word_embeddings": tied,
    }))
}

/// The config.json of LLaMA's layout and the families that add to it.
fn llama_config(m: &Meta, d: &Dims, tied: bool, attn_bias: bool) -> Result<Json> {
    let eps = m
        .float(&m.k("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| m.missing(&m.k("attention.layer_norm_rms_epsilon")))?;
    let theta = m.float(&m.k("rope.freq_base"))?.unwrap_or(10000.0);
    let ctx = d.positions;
    let mut cfg = json!({
        "architectures": [m.arch.hf_class()],
        "model_type": m.arch.model_type(),
        "hidden_size": d.hidden,
        "intermediate_size": d.ff,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "vocab_size": d.vocab,
        "max_position_embeddings": ctx,
        "rms_norm_eps": eps,
        "attention_bias": attn_bias,
        "tie_word_embeddings": tied,
    });
    let scaling = rope_scaling(m)?;
    match m.arch {
        Arch::Gemma3 => {
            // llama.cpp's Gemma 3: every sixth layer global, the others local with a window
            // and RoPE base 10000; queries scaled by the head size, except at 27B (62 layers),
            // which scales by hidden / heads
            let window = m
                .opt_usize(&m.k("attention.sliding_window"))?
                .ok_or_else(|| m.missing(&m.k("attention.sliding_window")))?;
            let types: Vec<&str> = (0..d.layers)
                .map(|i| {
                    if (i + 1) % 6 == 0 {
                        "full_attention"
                    } else {
                        "sliding_attention"
                    }
                })
                .collect();
            let mut full = json!({"rope_type": "default", "rope_theta": theta});
            if let Some(sc) = &scaling {
                full["rope_type"] = sc["rope_type"].clone();
                full["factor"] = sc["factor"].clone();
            }
            let scalar = if d.layers == 62 {
                d.hidden / d.heads
            } else {
                d.head_dim
            };
            cfg["hidden_activation"] = json!("gelu_pytorch_tanh");
            cfg["sliding_window"] = json!(window);
            cfg["layer_types"] = json!(types);
            cfg["query_pre_attn_scalar"] = json!(scalar);
            cfg["rope_parameters"] = json!({
                "full_attention": full,
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            });
            for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
                cfg[key] = json!(m.float(&m.k(key))?);
            }
        }
        _ => {
            cfg["hidden_act"] = json!("silu");
            cfg["rope_theta"] = json!(theta);
            cfg["rope_scaling"] = json!(scaling);
            cfg["mlp_bias"] = json!(false);
            if m.arch == Arch::Phi3 {
                cfg["sliding_window"] = json!(m.opt_usize(&m.k("attention.sliding_window"))?);
            }
        }
    }
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

/// LLaMA 3's split (numbers in groups of up to three, newlines kept apart).
pub(crate) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How `tokenizer.ggml.pre` splits text before BPE, as llama.cpp does it.
enum PreSplit {
    /// GPT-2's regex (the one `ByteLevel` applies with `use_regex`).
    Gpt2,
    /// Every digit on its own, then GPT-2's regex (SmolLM, StarCoder and relatives).
    DigitsThenGpt2,
    /// LLaMA 3's regex; BPE keeps whole words found in the vocabulary (`ignore_merges`).
    Llama3,
}

fn pre_split(path: &Path, pre: Option<&str>) -> Result<PreSplit> {
    match pre {
        Some("gpt-2" | "gpt2" | "mpt" | "olmo" | "jais") => Ok(PreSplit::Gpt2),
        Some(
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b",
        ) => Ok(PreSplit::DigitsThenGpt2),
        Some("llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe") => {
            Ok(PreSplit::Llama3)
        }
        Some(other) => Err(Error::bad_file(
            path,
            format!(
                "tokenizer.ggml.pre = `{other}` is not supported (supported: gpt-2, smollm, \
                 starcoder, llama-bpe and their aliases)"
            ),
        )),
        None => Err(Error::bad_file(
            path,
            "no `tokenizer.ggml.pre`: the file predates llama.cpp's pre-tokenizer metadata and \
             its text splitting cannot be reproduced; reconvert it with a recent llama.cpp",
        )),
    }
}

/// One `tokenizer.ggml.merges` entry, "left right"; the split is at the first space after the
/// first character, as llama.cpp does it.
fn split_merge(path: &Path, i: usize, merge: &str) -> Result<(String, String)> {
    let first = merge.chars().next().map_or(0, char::len_utf8);
    merge[first..]
        .find(' ')
        .map(|at| {
            let at = first + at;
            (merge[..at].to_string(), merge[at + 1..].to_string())
        })
        .ok_or_else(|| {
            Error::bad_file(
                path,
                format!("tokenizer.ggml.merges[{i}] = {merge:?} is not two tokens"),
            )
        })
}

/// llama.cpp's token types.
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;
const TOKEN_NORMAL: i64 = 1;

fn build_tokenizer(m: &Meta) -> Result<Tokenizer> {
    let path = m.path;
    let model = m
        .string("tokenizer.ggml.model")?
        .ok_or_else(|| m.missing("tokenizer.ggml.model"))?;
    if model == "llama" {
        return build_spm_tokenizer(m);
    }
    if model != "gpt2" {
        return Err(Error::bad_file(
            path,
            format!(
                "tokenizer.ggml.model = `{model}` is not supported; byte-level BPE (`gpt2`) \
                 and SentencePiece (`llama`) vocabularies can be rebuilt"
            ),
        ));
    }
    let split = pre_split(path, m.string("tokenizer.ggml.pre")?)?;
    let tokens = m
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| m.missing("tokenizer.ggml.tokens"))?;
    let merges = m
        .strings("tokenizer.ggml.merges")?
        .ok_or_else(|| m.missing("tokenizer.ggml.merges"))?
        .iter()
        .enumerate()
        .map(|(i, s)| split_merge(path, i, s))
        .collect::<Result<Vec<_>>>()?;
    let types = token_types(m, tokens.len())?;
    let vocab = vocab_of(path, &tokens)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(matches!(split, PreSplit::Llama3))
        .build()
        .map_err(|e| Error::bad_file(path, format!("cannot build the BPE vocabulary: {e}")))?;

    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
    let pre: PreTokenizerWrapper = match split {
        PreSplit::Gpt2 => byte_level(true).into(),
        PreSplit::DigitsThenGpt2 => {
            Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into()
        }
        PreSplit::Llama3 => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::msg(format!("LLaMA 3 split regex: {e}")))?;
            Sequence::new(vec![split.into(), byte_level(false).into()]).into()
        }
    };

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(byte_level(true)));
    finish_tokenizer(
        m,
        tokenizer,
        &tokens,
        types.as_deref(),
        byte_level(true).into(),
    )
}

/// Token → id, refusing a token listed twice.
fn vocab_of(path: &Path, tokens: &[impl AsRef<str>]) -> Result<Vocab> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_ref().to_string(), i as u32))
        .collect();
    if vocab.len() != tokens.len() {
        return Err(Error::bad_file(
            path,
            "tokenizer.ggml.tokens holds the same token twice",
        ));
    }
    Ok(vocab)
}

/// `tokenizer.ggml.token_type`, one per token where present.
fn token_types(m: &Meta, n_tokens: usize) -> Result<Option<Vec<i64>>> {
    let types = m.ints("tokenizer.ggml.token_type")?;
    if let Some(t) = &types {
        if t.len() != n_tokens {
            return Err(Error::bad_file(
                m.path,
                format!(
                    "tokenizer.ggml.token_type has {} entries for {n_tokens} tokens",
                    t.len(),
                ),
            ));
        }
    }
    Ok(types)
}

/// A SentencePiece vocabulary (`tokenizer.ggml.model` = `llama`) as a BPE with byte fallback:
/// spaces become ▁ (and one is put before the text where `add_space_prefix` says so), and
/// pieces merge in the order of their ids (SentencePiece's score order), each piece by every
/// split into two pieces of the vocabulary, the longer left part first; characters no piece
/// covers fall back to the `<0xNN>` byte tokens. This is how transformers rebuilds such a
/// vocabulary from a GGUF file.
fn build_spm_tokenizer(m: &Meta) -> Result<Tokenizer> {
    let path = m.path;
    // llama.cpp keeps spaces inside whitespace pieces; SentencePiece writes them as ▁
    let tokens: Vec<String> = m
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| m.missing("tokenizer.ggml.tokens"))?
        .iter()
        .map(|t| t.replace(' ', "\u{2581}"))
        .collect();
    // user-defined pieces of whitespace are reached by merges, not matched whole
    let types = token_types(m, tokens.len())?.map(|types| {
        types
            .iter()
            .zip(&tokens)
            .map(|(&ty, t)| {
                if ty == TOKEN_USER_DEFINED && t.contains('\u{2581}') {
                    TOKEN_NORMAL
                } else {
                    ty
                }
            })
            .collect::<Vec<_>>()
    });
    let vocab = vocab_of(path, &tokens)?;
    let mut merges = vec![];
    for t in &tokens {
        let cuts: Vec<usize> = t.char_indices().map(|(i, _)| i).skip(1).collect();
        for &at in cuts.iter().rev() {
            let (l, r) = t.split_at(at);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((l.to_string(), r.to_string()));
            }
        }
    }
    let unk = match m.uint("tokenizer.ggml.unknown_token_id")? {
        Some(id) => Some(tokens.get(id as usize).cloned().ok_or_else(|| {
            Error::bad_file(
                path,
                format!("`tokenizer.ggml.unknown_token_id` = {id} is outside the vocabulary"),
            )
        })?),
        None => None,
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| Error::bad_file(path, format!("cannot build the vocabulary: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let space = |e| Error::msg(format!("SentencePiece normalizer: {e}"));
    let replace = || tokenizers::normalizers::replace::Replace::new(" ", "\u{2581}");
    let prefix = m
        .boolean("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let normalizer: tokenizers::NormalizerWrapper = if prefix {
        tokenizers::normalizers::Sequence::new(vec![
            tokenizers::normalizers::prepend::Prepend::new("\u{2581}".into()).into(),
            replace().map_err(space)?.into(),
        ])
        .into()
    } else {
        replace().map_err(space)?.into()
    };
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| Error::msg(format!("SentencePiece normalizer: {e}")))?;
    let mut decoders: Vec<tokenizers::DecoderWrapper> = vec![
        tokenizers::normalizers::replace::Replace::new("\u{2581}", " ")
            .map_err(space)?
            .into(),
        tokenizers::decoders::byte_fallback::ByteFallback::new().into(),
        tokenizers::decoders::fuse::Fuse::new().into(),
    ];
    if prefix {
        decoders.push(tokenizers::decoders::strip::Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(tokenizers::decoders::sequence::Sequence::new(
        decoders,
    )));
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    finish_tokenizer(
        m,
        tokenizer,
        &refs,
        types.as_deref(),
        tokenizers::processors::sequence::Sequence::new(vec![]).into(),
    )
}

/// Control and user-defined tokens matched whole, and BOS/EOS added as the metadata says
/// (`no_specials` where neither is).
fn finish_tokenizer(
    m: &Meta,
    mut tokenizer: Tokenizer,
    tokens: &[&str],
    types: Option<&[i64]>,
    no_specials: PostProcessorWrapper,
) -> Result<Tokenizer> {
    let path = m.path;
    // Control tokens are matched whole before BPE and are special; user-defined ones are
    // matched whole too but are ordinary text.
    if let Some(types) = &types {
        let mut special = vec![];
        let mut added = vec![];
        for (tok, &ty) in tokens.iter().zip(types.iter()) {
            match ty {
                TOKEN_CONTROL => special.push(AddedToken::from(tok.to_string(), true)),
                TOKEN_USER_DEFINED => {
                    added.push(AddedToken::from(tok.to_string(), false).normalized(false))
                }
                _ => {}
            }
        }
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| Error::bad_file(path, format!("control tokens: {e}")))?;
        tokenizer
            .add_tokens(added)
            .map_err(|e| Error::bad_file(path, format!("user-defined tokens: {e}")))?;
    }

    let add_bos = m.boolean("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = m.boolean("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let post: PostProcessorWrapper = if add_bos || add_eos {
        let mut specials = vec![];
        let mut wrap = |key: &str, add: bool| -> Result<Option<String>> {
            if !add {
                return Ok(None);
            }
            let id = m.uint(key)?.ok_or_else(|| m.missing(key))?;
            let tok = tokens.get(id as usize).ok_or_else(|| {
                Error::bad_file(path, format!("`{key}` = {id} is outside the vocabulary"))
            })?;
            specials.push((tok.to_string(), id as u32));
            Ok(Some(tok.to_string()))
        };
        let bos = wrap("tokenizer.ggml.bos_token_id", add_bos)?;
        let eos = wrap("tokenizer.ggml.eos_token_id", add_eos)?;
        let piece = |seq: &str| {
            let mut v = vec![];
            v.extend(bos.iter().map(|b| format!("{b}:0")));
            v.push(format!("${seq}:0"));
            v.extend(eos.iter().map(|e| format!("{e}:0")));
            v
        };
        let mut pair = piece("A");
        pair.extend(piece("B").into_iter().map(|p| p.replace(":0", ":1")));
        TemplateProcessing::builder()
            .try_single(piece("A"))
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| Error::msg(format!("BOS/EOS template: {e}")))?
            .special_tokens(specials)
            .build()
            .map_err(|e| Error::msg(format!("BOS/EOS template: {e}")))?
            .into()
    } else {
        no_specials
    };
    tokenizer.with_post_processor(Some(post));
    Ok(tokenizer)
}

// ---------------------------------------------------------------------------------------------
// Loading

/// The HF shape a mapped tensor must have.
fn expected_shape(d: &Dims, hf: &str) -> Option<Vec<usize>> {
    if let Some(module) = hf.strip_suffix(".bias") {
        let w = expected_shape(d, &format!("{module}.weight"))?;
        // a Conv1D's outputs are its second dimension
        let rows = if is_conv1d(module) {
            w.get(1)
        } else {
            w.first()
        };
        return Some(vec![*rows?]);
    }
    let q = d.heads * d.head_dim;
    let kv = d.kv_heads * d.head_dim;
    let module = hf.strip_suffix(".weight")?;
    let tail = module.rsplit('.').next()?;
    Some(match (module, tail) {
        ("model.embed_tokens", _) | ("lm_head", _) | ("transformer.wte", _) => {
            vec![d.vocab, d.hidden]
        }
        ("transformer.wpe", _) => vec![d.positions, d.hidden],
        ("model.norm", _)
        | ("transformer.ln_f", _)
        | (_, "input_layernorm")
        | (_, "post_attention_layernorm")
        | (_, "pre_feedforward_layernorm")
        | (_, "post_feedforward_layernorm")
        | (_, "ln_1")
        | (_, "ln_2") => vec![d.hidden],
        (_, "q_norm") | (_, "k_norm") => vec![d.head_dim],
        (_, "qkv_proj") => vec![q + 2 * kv, d.hidden],
        (_, "gate_up_proj") => vec![2 * d.ff, d.hidden],
        (_, "q_proj") => vec![q, d.hidden],
        (_, "k_proj") | (_, "v_proj") => vec![kv, d.hidden],
        (_, "o_proj") => vec![d.hidden, q],
        (_, "gate_proj") | (_, "up_proj") => vec![d.ff, d.hidden],
        (_, "down_proj") => vec![d.hidden, d.ff],
        // GPT-2's Conv1D, (d_in, d_out)
        (_, "c_attn") => vec![d.hidden, 3 * d.hidden],
        (m, "c_proj") if m.ends_with(".attn.c_proj") => vec![d.hidden, d.hidden],
        (_, "c_fc") => vec![d.hidden, d.ff],
        (m, "c_proj") if m.ends_with(".mlp.c_proj") => vec![d.ff, d.hidden],
        _ => return None,
    })
}

/// Whether a GPT-2 module is a Conv1D (weights stored (d_in, d_out) by Hugging Face).
fn is_conv1d(module: &str) -> bool {
    module.starts_with("transformer.h.")
        && [".attn.c_attn", ".attn.c_proj", ".mlp.c_fc", ".mlp.c_proj"]
            .iter()
            .any(|m| module.ends_with(m))
}

/// The HF tensors a checkpoint of this architecture and these dimensions must hold (the head
/// only when untied).
fn required_names(arch: Arch, d: &Dims, tied: bool) -> Vec<String> {
    let mut names = vec![];
    for (_, top) in arch.top_tensors() {
        if *top != "lm_head" || !tied {
            names.push(format!("{top}.weight"));
        }
        if arch.has_bias(top) {
            names.push(format!("{top}.bias"));
        }
    }
    for l in 0..d.layers {
        for (_, m) in arch.layer_tensors() {
            let module = format!("{}{l}.{m}", arch.block_prefix());
            names.push(format!("{module}.weight"));
            // LLaMA's projection biases are optional (Qwen2 has them, LLaMA not); GPT-2's not
            if arch == Arch::Gpt2 {
                names.push(format!("{module}.bias"));
            }
        }
    }
    names
}

/// What candle's GGUF reader will take as the data alignment: `Some(Some(n))` for an integer
/// `general.alignment` (the last one), `Some(None)` for its default, `None` where the metadata
/// cannot be walked (candle's reader then reports the error). candle divides by the alignment
/// unchecked, so a 0 must be refused before it reads the file.
fn declared_alignment<R: Read + Seek>(reader: &mut R, end: u64) -> Option<Option<u64>> {
    const KEY: &[u8] = b"general.alignment";
    let mut w = Walk {
        r: reader,
        pos: 0,
        end,
        wide: true,
    };
    w.skip(4)?; // magic
    w.wide = w.u32()? != 1; // GGUF v1 has 32-bit lengths
    let _tensors = w.len()?;
    let kvs = w.len()?;
    let mut alignment = None;
    for _ in 0..kvs {
        let n = w.len()?;
        let is_alignment = if n <= 64 {
            let mut key = vec![0u8; n as usize];
            w.read(&mut key)?;
            // candle drops trailing NULs from strings
            let trimmed = key
                .iter()
                .rposition(|&b| b != 0)
                .map_or(&key[..0], |i| &key[..=i]);
            trimmed == KEY
        } else {
            w.skip(n)?;
            false
        };
        let ty = w.u32()?;
        if !is_alignment {
            w.value(ty, 0)?;
            continue;
        }
        // candle's rule: an unsigned or non-negative signed integer of up to 32 bits, else 32.
        alignment = match ty {
            0 => Some(u64::from(w.bytes::<1>()?[0])),
            1 => u64::try_from(i8::from_le_bytes(w.bytes()?)).ok(),
            2 => Some(u64::from(u16::from_le_bytes(w.bytes()?))),
            3 => u64::try_from(i16::from_le_bytes(w.bytes()?)).ok(),
            4 => Some(u64::from(w.u32()?)),
            5 => u64::try_from(i32::from_le_bytes(w.bytes()?)).ok(),
            ty => {
                w.value(ty, 0)?;
                None
            }
        };
    }
    Some(alignment)
}

/// A cursor over GGUF metadata that skips values without reading them into memory.
struct Walk<'a, R> {
    r: &'a mut R,
    pos: u64,
    end: u64,
    /// 64-bit string and array lengths (GGUF v2 and v3).
    wide: bool,
}

impl<R: Read + Seek> Walk<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> Option<()> {
        self.r.read_exact(buf).ok()?;
        self.pos += buf.len() as u64;
        Some(())
    }

    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        self.read(&mut b)?;
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    fn len(&mut self) -> Option<u64> {
        if self.wide {
            self.bytes().map(u64::from_le_bytes)
        } else {
            self.u32().map(u64::from)
        }
    }

    fn skip(&mut self, n: u64) -> Option<()> {
        if n > self.end.saturating_sub(self.pos) {
            return None;
        }
        self.r.seek_relative(i64::try_from(n).ok()?).ok()?;
        self.pos += n;
        Some(())
    }

    /// Skips one value of GGUF value type `ty`.
    fn value(&mut self, ty: u32, depth: usize) -> Option<()> {
        // The size of a fixed-size value type.
        let fixed = |ty| match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match ty {
            8 => {
                let n = self.len()?;
                self.skip(n)
            }
            // Deeper than candle's reader allows (64): it refuses the file itself.
            9 if depth > 80 => None,
            9 => {
                let ty = self.u32()?;
                let n = self.len()?;
                match fixed(ty) {
                    Some(size) => self.skip(n.checked_mul(size)?),
                    None => (0..n).try_for_each(|_| self.value(ty, depth + 1)),
                }
            }
            ty => self.skip(fixed(ty)?),
        }
    }
}

/// Whether tensors `a` and `b` are both in the file with the same type, shape and bytes.
fn same_data<R: Read + Seek>(content: &Content, reader: &mut R, a: &str, b: &str) -> bool {
    let (Some(ia), Some(ib)) = (content.tensor_infos.get(a), content.tensor_infos.get(b)) else {
        return false;
    };
    if ia.ggml_dtype != ib.ggml_dtype || ia.shape.dims() != ib.shape.dims() {
        return false;
    }
    let mut data = |n: &str| {
        content
            .tensor(reader, n, &Device::Cpu)
            .ok()
            .and_then(|q| q.data().ok().map(|d| d.into_owned()))
    };
    match (data(a), data(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// Reads a GGUF file of the llama, qwen3, gemma3, phi3 or gpt2 architecture into an HF-style
/// config, HF-named tensors in Hugging Face's layout (dequantised to f32, Q/K rows un-permuted,
/// GPT-2's Conv1D weights transposed back, then cast to `dtype`, on the CPU), a tokenizer and
/// the chat template. Any other architecture, an unknown tensor, a missing one or a shape that
/// does not fit the metadata is an error naming the file.
pub fn load_gguf(path: &Path, dtype: DType) -> Result<GgufModel> {
    let file = File::open(path).at(path)?;
    load_gguf_from(path, BufReader::new(file), dtype, false)
}

/// [`load_gguf`], but the weights of the linear layers (the attention and MLP projections and an
/// untied output head) that the file stores in a quantised type stay in it, in
/// [`GgufModel::kept`] (`--base-dtype same`); float ones are read as [`load_gguf`] reads them.
pub fn load_gguf_keeping(path: &Path, dtype: DType) -> Result<GgufModel> {
    let file = File::open(path).at(path)?;
    load_gguf_from(path, BufReader::new(file), dtype, true)
}

/// [`load_gguf`] on a GGUF file already in memory; `path` names it in errors.
pub fn load_gguf_bytes(path: &Path, bytes: &[u8], dtype: DType) -> Result<GgufModel> {
    load_gguf_from(path, std::io::Cursor::new(bytes), dtype, false)
}

/// Whether HF tensor `hf` is the weight of a linear layer a frozen base may keep quantised.
fn is_linear_weight(arch: Arch, hf: &str) -> bool {
    let Some(module) = hf.strip_suffix(".weight") else {
        return false;
    };
    match arch {
        _ if module == "lm_head" => true,
        Arch::Gpt2 => is_conv1d(module),
        _ => module.starts_with("model.layers.") && module.ends_with("_proj"),
    }
}

fn load_gguf_from<R: Read + Seek>(
    path: &Path,
    mut reader: R,
    dtype: DType,
    keep: bool,
) -> Result<GgufModel> {
    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic).at(path)?;
    if &magic != MAGIC {
        return Err(Error::bad_file(
            path,
            format!("not a GGUF file (starts with {magic:02x?}, not \"GGUF\")"),
        ));
    }
    let file_len = reader.seek(SeekFrom::End(0)).at(path)?;
    reader.rewind().at(path)?;
    let alignment = declared_alignment(&mut reader, file_len);
    if alignment == Some(Some(0)) {
        return Err(Error::bad_file(
            path,
            "metadata `general.alignment` = 0; the alignment must be a power of two",
        ));
    }
    reader.rewind().at(path)?;
    let content = Content::read(&mut reader)
        .map_err(|e| Error::bad_file(path, format!("unreadable GGUF header: {e}")))?;
    let m = Meta {
        path,
        content: &content,
        arch: Arch::Llama,
    };
    dtype_name(path, dtype)?;

    let arch_name = m
        .string("general.architecture")?
        .ok_or_else(|| m.missing("general.architecture"))?;
    let arch = Arch::parse(arch_name).ok_or_else(|| {
        Error::bad_file(
            path,
            format!(
                "general.architecture = `{arch_name}`; GGUF models of the llama, qwen3, gemma3, \
                 phi3 and gpt2 architectures can be loaded"
            ),
        )
    })?;
    let m = Meta { arch, ..m };

    let tokenizer = build_tokenizer(&m)?;
    let vocab = m
        .array("tokenizer.ggml.tokens")?
        .map(<[Value]>::len)
        .ok_or_else(|| m.missing("tokenizer.ggml.tokens"))?;
    let dims = read_dims(&m, vocab)?;

    // Map every name before reading any data, so a foreign file fails fast.
    let mut mapped: Vec<(&str, String)> = vec![];
    let mut unknown: Vec<&str> = vec![];
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut rope_freqs = false;
    for name in names {
        match hf_name_in(arch, name) {
            Some(hf) => mapped.push((name.as_str(), hf)),
            None if is_ignorable(name) => {}
            // LLaMA 3.1's RoPE scaling, as llama.cpp stores it: read into the config below
            None if name == ROPE_FREQS && arch == Arch::Llama => rope_freqs = true,
            None => unknown.push(name.as_str()),
        }
    }
    if !unknown.is_empty() {
        let hint = if unknown.iter().any(|n| n.starts_with("rope_freqs")) {
            " (`rope_freqs` holds per-frequency RoPE factors, LLaMA 3.1's scaling as llama.cpp \
             stores it, which singlora reads for the `llama` architecture only)"
        } else {
            ""
        };
        return Err(Error::bad_file(
            path,
            format!(
                "tensors a `{}` model does not have: {}{hint}",
                arch.name(),
                unknown.join(", ")
            ),
        ));
    }
    // llama.cpp's converter writes GPT-2's tied head as a copy of the embedding: the same
    // bytes in the same type are one tensor again
    if arch == Arch::Gpt2 && same_data(&content, &mut reader, "output.weight", "token_embd.weight")
    {
        mapped.retain(|(name, _)| *name != "output.weight");
    }
    let tied = !mapped.iter().any(|(_, hf)| hf == "lm_head.weight");
    let present: std::collections::BTreeSet<&str> =
        mapped.iter().map(|(_, hf)| hf.as_str()).collect();
    // Nine tensors per layer: a layer count the file cannot hold is refused before the names
    // of the tensors it would need are listed.
    if dims.layers > content.tensor_infos.len() {
        return Err(Error::bad_file(
            path,
            format!(
                "{} = {} layers, but the file holds only {} tensors",
                m.k("block_count"),
                dims.layers,
                content.tensor_infos.len()
            ),
        ));
    }
    let missing: Vec<String> = required_names(arch, &dims, tied)
        .into_iter()
        .filter(|n| !present.contains(n.as_str()))
        .collect();
    if !missing.is_empty() {
        return Err(Error::bad_file(
            path,
            format!("missing tensors (HF names): {}", missing.join(", ")),
        ));
    }
    for (name, hf) in &mapped {
        let info = &content.tensor_infos[*name];
        let shape = info.shape.dims().to_vec();
        let want = expected_shape(&dims, hf).map(|mut w| {
            if arch.transposes(name) {
                w.reverse();
            }
            w
        });
        if want.as_deref() != Some(shape.as_slice()) {
            return Err(Error::bad_file(
                path,
                format!(
                    "tensor `{name}` ({hf}) has shape {shape:?}, the metadata call for {}",
                    want.map_or("none".to_string(), |w| format!("{w:?}"))
                ),
            ));
        }
        // Its size, checked here: candle multiplies the dimensions unchecked.
        let q = info.ggml_dtype;
        let bytes = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| (n / q.block_size()).checked_mul(q.type_size()));
        if bytes.is_none_or(|b| b as u64 > file_len) {
            return Err(Error::bad_file(
                path,
                format!("tensor `{name}` of shape {shape:?} in {q:?} is larger than the file"),
            ));
        }
    }

    let attn_bias = mapped
        .iter()
        .any(|(_, hf)| hf.contains(".self_attn.") && hf.ends_with(".bias"));
    let mut config = build_config(&m, &dims, tied, attn_bias, dtype)?;
    let rope_freqs = match rope_freqs {
        true => Some(read_rope_freqs(&m, &content, &mut reader)?),
        false => None,
    };
    if let Some(stored) = &rope_freqs {
        config["rope_scaling"] = llama3_scaling(&m, stored, &dims, &config)?;
    }
    let mut tensors = BTreeMap::new();
    let mut kept = BTreeMap::new();
    for (name, hf) in mapped {
        let bad = |e: candle_core::Error| Error::bad_file(path, format!("tensor `{name}`: {e}"));
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(bad)?;
        // Q and K rows in llama.cpp's RoPE order: the heads to put back in Hugging Face's
        let qk_heads = match () {
            _ if !arch.permutes_qk() => None,
            _ if hf.ends_with("self_attn.q_proj.weight") => Some(dims.heads),
            _ if hf.ends_with("self_attn.k_proj.weight") => Some(dims.kv_heads),
            _ => None,
        };
        if keep && is_linear_weight(arch, &hf) && crate::quant::ggml::is_quantized_type(q.dtype()) {
            let w = crate::quant::ggml::GgmlWeight::new(q, qk_heads)
                .map_err(|e| Error::bad_file(path, format!("tensor `{name}`: {e}")))?;
            kept.insert(hf, std::sync::Arc::new(w));
            continue;
        }
        let mut t = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(bad)?;
        if arch.transposes(name) {
            t = t.t().and_then(|t| t.contiguous()).map_err(bad)?;
        }
        if let Some(heads) = qk_heads {
            t = unpermute_qk(&t, heads)?;
        }
        if arch.norms_plus_one() && hf.ends_with("norm.weight") {
            t = (t - 1.0).map_err(bad)?;
        }
        let t = t.to_dtype(dtype).map_err(bad)?;
        tensors.insert(hf, t);
    }

    let chat_template = m.string("tokenizer.chat_template")?.map(str::to_string);
    Ok(GgufModel {
        config,
        tensors,
        tokenizer,
        chat_template,
        rope_freqs,
        kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;
    use candle_core::quantized::{GgmlDType, QTensor};

    fn rows(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn names_map_to_hf() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.12.attn_k.weight",
                "model.layers.12.self_attn.k_proj.weight",
            ),
            (
                "blk.3.attn_v.weight",
                "model.layers.3.self_attn.v_proj.weight",
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.29.ffn_gate.weight",
                "model.layers.29.mlp.gate_proj.weight",
            ),
            ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
            (
                "blk.29.ffn_down.weight",
                "model.layers.29.mlp.down_proj.weight",
            ),
            (
                "blk.7.attn_norm.weight",
                "model.layers.7.input_layernorm.weight",
            ),
            (
                "blk.7.ffn_norm.weight",
                "model.layers.7.post_attention_layernorm.weight",
            ),
        ];
        for (g, h) in cases {
            assert_eq!(hf_name(g).as_deref(), Some(h), "{g}");
        }
        for g in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.1.ffn_gate_exps.weight",
            "token_embd",
            "blk.1.attn_q.scale",
            "blk.1.attn_norm.bias",
            "output.bias",
        ] {
            assert_eq!(hf_name(g), None, "{g}");
        }
        // projections' biases (LLaMA's `attention_bias`)
        assert_eq!(
            hf_name("blk.1.attn_q.bias").as_deref(),
            Some("model.layers.1.self_attn.q_proj.bias")
        );
        assert!(is_ignorable("blk.4.attn_rot_embd"));
        assert!(!is_ignorable("rope_freqs.weight"));
    }

    #[test]
    fn permute_matches_hand_computed_case() {
        // One head of size 6: rows x0 x1 x2 y0 y1 y2 → x0 y0 x1 y1 x2 y2.
        let w = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((6, 1))
            .unwrap();
        assert_eq!(rows(&permute_qk(&w, 1).unwrap()), [0., 3., 1., 4., 2., 5.]);
        // Two heads of size 4, two input columns: each head is reordered on its own.
        let w = Tensor::arange(0f32, 16., &Device::Cpu)
            .unwrap()
            .reshape((8, 2))
            .unwrap();
        let p = permute_qk(&w, 2).unwrap();
        assert_eq!(p.dims(), &[8, 2]);
        let order: Vec<f32> = rows(&p).chunks(2).map(|r| r[0] / 2.).collect();
        assert_eq!(order, [0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(rows(&unpermute_qk(&p, 2).unwrap()), rows(&w));
    }

    #[test]
    fn permute_and_unpermute_are_inverse() {
        let w = Tensor::randn(0f32, 1., (3 * 10, 7), &Device::Cpu).unwrap();
        // (15 heads of 2 rows would be the identity.)
        for heads in [1, 3, 5] {
            let p = permute_qk(&w, heads).unwrap();
            assert_ne!(rows(&p), rows(&w));
            assert_eq!(rows(&unpermute_qk(&p, heads).unwrap()), rows(&w));
            assert_eq!(
                rows(&permute_qk(&unpermute_qk(&w, heads).unwrap(), heads).unwrap()),
                rows(&w)
            );
        }
        let b = Tensor::arange(0f32, 8., &Device::Cpu).unwrap();
        assert_eq!(
            rows(&permute_qk(&b, 2).unwrap()),
            [0., 2., 1., 3., 4., 6., 5., 7.]
        );
        assert!(permute_qk(&w, 4).is_err()); // 30 rows are not 4 heads of an even size
        assert!(permute_qk(&w, 0).is_err());
    }

    #[test]
    fn merges_split_at_first_inner_space() {
        let p = Path::new("m.gguf");
        assert_eq!(split_merge(p, 0, "Ġ t").unwrap(), ("Ġ".into(), "t".into()));
        assert_eq!(
            split_merge(p, 0, "Ġt he").unwrap(),
            ("Ġt".into(), "he".into())
        );
        assert!(split_merge(p, 3, "abc")
            .unwrap_err()
            .to_string()
            .contains("m.gguf"));
    }

    // A tiny LLaMA: hidden 32 (one quantisation block), 4 heads of 8, 2 KV heads, ff 64.
    const HIDDEN: usize = 32;
    const HEADS: usize = 4;
    const KV: usize = 2;
    const FF: usize = 64;
    const TOKENS: [&str; 10] = [
        "<|endoftext|>",
        "<|im_start|>",
        "a",
        "b",
        "c",
        "Ġ",
        "1",
        "Ġa",
        "ab",
        "Ġab",
    ];

    fn str_array(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// Writes the synthetic model (the tied variant also sets `add_bos_token`); returns the
    /// HF-layout tensors it was made from.
    fn write_tiny(
        path: &Path,
        arch: &str,
        extra_tensor: Option<&str>,
        tied: bool,
    ) -> BTreeMap<String, Tensor> {
        write_tiny_with(path, arch, extra_tensor, tied, vec![])
    }

    /// [`write_tiny`] with `extra` metadata after the usual keys (replacing any of them).
    fn write_tiny_with(
        path: &Path,
        arch: &str,
        extra_tensor: Option<&str>,
        tied: bool,
        extra: Vec<(&str, Value)>,
    ) -> BTreeMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut hf = BTreeMap::new();
        let mut gg: Vec<(String, QTensor)> = vec![];
        let mut add = |g: &str, shape: &[usize], quant: GgmlDType, perm: Option<usize>| {
            let t = Tensor::randn(0f32, 1., shape, &dev).unwrap();
            let stored = match perm {
                Some(h) => permute_qk(&t, h).unwrap(),
                None => t.clone(),
            };
            gg.push((g.to_string(), QTensor::quantize(&stored, quant).unwrap()));
            hf.insert(hf_name(g).unwrap(), t);
        };
        let hd = HIDDEN / HEADS;
        add(
            "token_embd.weight",
            &[TOKENS.len(), HIDDEN],
            GgmlDType::Q8_0,
            None,
        );
        add("output_norm.weight", &[HIDDEN], GgmlDType::F32, None);
        if !tied {
            add(
                "output.weight",
                &[TOKENS.len(), HIDDEN],
                GgmlDType::F32,
                None,
            );
        }
        for l in 0..2 {
            let p = format!("blk.{l}");
            add(
                &format!("{p}.attn_q.weight"),
                &[HEADS * hd, HIDDEN],
                GgmlDType::F32,
                Some(HEADS),
            );
            add(
                &format!("{p}.attn_k.weight"),
                &[KV * hd, HIDDEN],
                GgmlDType::F32,
                Some(KV),
            );
            add(
                &format!("{p}.attn_v.weight"),
                &[KV * hd, HIDDEN],
                GgmlDType::F32,
                None,
            );
            add(
                &format!("{p}.attn_output.weight"),
                &[HIDDEN, HIDDEN],
                GgmlDType::F32,
                None,
            );
            add(
                &format!("{p}.ffn_gate.weight"),
                &[FF, HIDDEN],
                GgmlDType::F32,
                None,
            );
            add(
                &format!("{p}.ffn_up.weight"),
                &[FF, HIDDEN],
                GgmlDType::F16,
                None,
            );
            add(
                &format!("{p}.ffn_down.weight"),
                &[HIDDEN, FF],
                GgmlDType::F32,
                None,
            );
            add(
                &format!("{p}.attn_norm.weight"),
                &[HIDDEN],
                GgmlDType::F32,
                None,
            );
            add(
                &format!("{p}.ffn_norm.weight"),
                &[HIDDEN],
                GgmlDType::F32,
                None,
            );
        }
        if let Some(name) = extra_tensor {
            let t = Tensor::zeros(4, DType::F32, &dev).unwrap();
            gg.push((
                name.to_string(),
                QTensor::quantize(&t, GgmlDType::F32).unwrap(),
            ));
        }
        let mut types = vec![Value::I32(1); TOKENS.len()];
        types[0] = Value::I32(3);
        types[1] = Value::I32(3);
        let md: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String(arch.into())),
            ("llama.block_count", Value::U32(2)),
            ("llama.context_length", Value::U32(512)),
            ("llama.embedding_length", Value::U32(HIDDEN as u32)),
            ("llama.feed_forward_length", Value::U32(FF as u32)),
            ("llama.attention.head_count", Value::U32(HEADS as u32)),
            ("llama.attention.head_count_kv", Value::U32(KV as u32)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.rope.freq_base", Value::F32(100000.)),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("smollm".into())),
            ("tokenizer.ggml.tokens", str_array(&TOKENS)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.merges", str_array(&["Ġ a", "a b", "Ġa b"])),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(0)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(tied)),
            ("tokenizer.chat_template", Value::String("{{ x }}".into())),
        ];
        let mut md: Vec<(&str, Value)> = md
            .into_iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .collect();
        md.extend(extra);
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = gg.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = File::create(path).unwrap();
        gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
        hf
    }

    #[test]
    fn synthetic_gguf_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let hf = write_tiny(&path, "llama", None, false);
        assert!(is_gguf(&path));
        assert_eq!(find_gguf(dir.path()).as_deref(), Some(path.as_path()));
        assert_eq!(find_gguf(&path).as_deref(), Some(path.as_path()));

        let m = load_gguf(&path, DType::F32).unwrap();
        let c = &m.config;
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["architectures"][0], "LlamaForCausalLM");
        assert_eq!(c["hidden_size"], HIDDEN);
        assert_eq!(c["intermediate_size"], FF);
        assert_eq!(c["num_hidden_layers"], 2);
        assert_eq!(c["num_attention_heads"], HEADS);
        assert_eq!(c["num_key_value_heads"], KV);
        assert_eq!(c["vocab_size"], TOKENS.len());
        assert_eq!(c["rms_norm_eps"], 1e-5);
        assert_eq!(c["rope_theta"], 100000.0);
        assert_eq!(c["max_position_embeddings"], 512);
        assert_eq!(c["tie_word_embeddings"], false);
        assert_eq!(c["bos_token_id"], 1);
        assert_eq!(c["eos_token_id"], 0);
        assert!(c.get("pad_token_id").is_none());
        assert_eq!(c["torch_dtype"], "float32");
        assert_eq!(m.chat_template.as_deref(), Some("{{ x }}"));

        assert_eq!(m.tensors.len(), hf.len());
        for (name, want) in &hf {
            let got = &m.tensors[name];
            assert_eq!(got.dims(), want.dims(), "{name}");
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // F32 exact; Q8_0 (embedding) and F16 (up) within their rounding.
            let tol = if name.contains("embed") {
                0.05
            } else if name.contains("up_proj") {
                2e-3
            } else {
                0.0
            };
            assert!(diff <= tol, "{name}: max |Δ| {diff}");
        }
        assert_eq!(
            m.tensors["model.layers.1.self_attn.k_proj.weight"].dims(),
            &[KV * HIDDEN / HEADS, HIDDEN]
        );

        let enc = m.tokenizer.encode("<|im_start|>ab ab a1c", false).unwrap();
        assert_eq!(enc.get_ids(), &[1, 8, 9, 7, 6, 4]);
        let text = m.tokenizer.decode(enc.get_ids(), false).unwrap();
        assert_eq!(text, "<|im_start|>ab ab a1c");

        assert_eq!(m.tokenizer.encode("ab", true).unwrap().get_ids(), &[8]);

        let bf = load_gguf(&path, DType::BF16).unwrap();
        assert_eq!(bf.config["torch_dtype"], "bfloat16");
        assert_eq!(bf.tensors["model.norm.weight"].dtype(), DType::BF16);
    }

    #[test]
    fn synthetic_gguf_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let tied = dir.path().join("tied.gguf");
        write_tiny(&tied, "llama", Some("blk.0.attn_rot_embd"), true);
        let m = load_gguf(&tied, DType::F32).unwrap();
        assert_eq!(m.config["tie_word_embeddings"], true);
        assert!(!m.tensors.contains_key("lm_head.weight"));
        // This one asks for a BOS (`tokenizer.ggml.add_bos_token`), the other one does not.
        assert_eq!(m.tokenizer.encode("ab", true).unwrap().get_ids(), &[1, 8]);
        assert_eq!(m.tokenizer.encode("ab", false).unwrap().get_ids(), &[8]);

        // RoPE factors no LLaMA 3.1 scaling gives (four zeros)
        let p = dir.path().join("rope.gguf");
        write_tiny(&p, "llama", Some("rope_freqs.weight"), false);
        let e = load_gguf(&p, DType::F32).unwrap_err().to_string();
        assert!(
            e.contains("rope.gguf") && e.contains("rope_freqs.weight") && e.contains("LLaMA 3.1"),
            "{e}"
        );

        let p = dir.path().join("gemma.gguf");
        write_tiny(&p, "gemma", None, false);
        let e = load_gguf(&p, DType::F32).unwrap_err().to_string();
        assert!(e.contains("gemma.gguf") && e.contains("`gemma`"), "{e}");

        let p = dir.path().join("fake.gguf");
        std::fs::write(&p, b"not a gguf file").unwrap();
        assert!(!is_gguf(&p));
        let e = load_gguf(&p, DType::F32).unwrap_err().to_string();
        assert!(e.contains("fake.gguf") && e.contains("not a GGUF"), "{e}");
        // Several .gguf files in one directory: no single answer.
        assert_eq!(find_gguf(dir.path()), None);
    }

    /// The RoPE settings a GGUF file implies, through the config.json it becomes.
    fn rope_of(extra: Vec<(&str, Value)>) -> Result<crate::model::llama::LlamaConfig> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rope.gguf");
        write_tiny_with(&p, "llama", None, false, extra);
        let m = load_gguf(&p, DType::F32)?;
        crate::model::llama::Llama::config(&crate::model::weights::ConfigReader {
            path: &p,
            value: &m.config,
        })
    }

    #[test]
    fn rope_metadata_is_read_as_llama_cpp_reads_it() {
        let plain = rope_of(vec![]).unwrap().inv_freq;
        let hd = HIDDEN / HEADS;
        for (i, f) in plain.iter().enumerate() {
            let want = 100000f64.powf(-2.0 * i as f64 / hd as f64);
            assert!((f - want).abs() <= 1e-15 * want, "{i}: {f} vs {want}");
        }
        let s = |x: &str| Value::String(x.into());
        let cases: Vec<(Vec<(&str, Value)>, f64)> = vec![
            // llama.cpp's type defaults to linear, so a factor alone scales
            (vec![("llama.rope.scaling.factor", Value::F32(4.0))], 4.0),
            (vec![("llama.rope.scale_linear", Value::F32(2.0))], 2.0),
            (
                vec![
                    ("llama.rope.scaling.type", s("linear")),
                    ("llama.rope.scaling.factor", Value::F32(8.0)),
                    ("llama.rope.scaling.attn_factor", Value::F32(1.0)),
                ],
                8.0,
            ),
            // type none never scales; a factor of 0 or 1 is none
            (
                vec![
                    ("llama.rope.scaling.type", s("none")),
                    ("llama.rope.scaling.factor", Value::F32(4.0)),
                ],
                1.0,
            ),
            (vec![("llama.rope.scaling.factor", Value::F32(0.0))], 1.0),
        ];
        for (extra, factor) in cases {
            let what = format!("{extra:?}");
            let got = rope_of(extra).unwrap().inv_freq;
            for (g, p) in got.iter().zip(&plain) {
                assert!(
                    (g * factor - p).abs() <= 1e-15 * p,
                    "{what}: {g} vs {p}/{factor}"
                );
            }
        }
        let refused: Vec<(Vec<(&str, Value)>, &str)> = vec![
            (
                vec![
                    ("llama.rope.scaling.type", s("yarn")),
                    ("llama.rope.scaling.factor", Value::F32(4.0)),
                ],
                "llama.rope.scaling.type",
            ),
            (
                vec![("llama.rope.scaling.attn_factor", Value::F32(2.0))],
                "llama.rope.scaling.attn_factor",
            ),
            (
                vec![("llama.attention.sliding_window", Value::U32(64))],
                "llama.attention.sliding_window",
            ),
            (
                vec![("llama.rope.dimension_count", Value::U32(2))],
                "partial rotary",
            ),
        ];
        for (extra, named) in refused {
            let e = rope_of(extra).unwrap_err().to_string();
            assert!(e.contains("rope.gguf") && e.contains(named), "{e}");
        }
    }
}

#[cfg(test)]
mod spm_tests {
    use super::*;
    use candle_core::quantized::gguf_file;

    /// A tokenizer rebuilt from metadata alone.
    fn tokenizer_of(md: Vec<(&str, Value)>) -> Result<Tokenizer> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.gguf");
        let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &refs, &[]).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let content = Content::read(&mut f).unwrap();
        build_tokenizer(&Meta {
            path: &path,
            content: &content,
            arch: Arch::Gemma3,
        })
    }

    fn strings(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A SentencePiece vocabulary: control tokens, pieces (one of them, a run of two spaces,
    /// stored with spaces as llama.cpp writes it), a user-defined piece and one byte piece.
    fn spm(prefix: bool) -> Vec<(&'static str, Value)> {
        let tokens = [
            "<unk>",
            "<s>",
            "</s>",
            "\u{2581}",
            "a",
            "b",
            "\u{2581}a",
            "ab",
            "\u{2581}ab",
            "  ",
            "<0x41>",
            "<sep>",
        ];
        let types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 4, 6, 4];
        vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            (
                "tokenizer.ggml.scores",
                Value::Array((0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
            ),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
            ("tokenizer.ggml.add_space_prefix", Value::Bool(prefix)),
        ]
    }

    fn ids(t: &Tokenizer, text: &str) -> Vec<u32> {
        t.encode(text, true).unwrap().get_ids().to_vec()
    }

    #[test]
    fn sentencepiece_vocabularies_tokenize_as_hand_computed() {
        let t = tokenizer_of(spm(false)).unwrap();
        // "▁ab▁a": merges rank by the merged piece's id, (▁, a) first, then (▁a, b)
        assert_eq!(ids(&t, "ab a"), [1, 7, 6]);
        assert_eq!(ids(&t, " ab a"), [1, 8, 6]);
        // a character no piece covers falls back to its byte piece, or to <unk>
        assert_eq!(ids(&t, "A"), [1, 10]);
        assert_eq!(ids(&t, "c"), [1, 0]);
        // control tokens are special, user-defined ones match whole, but a piece of spaces
        // merges like any other: (▁, a) ranks before (▁, ▁), whose piece has the larger id
        assert_eq!(ids(&t, "a<s>b<sep>"), [1, 4, 1, 5, 11]);
        assert_eq!(ids(&t, "  a"), [1, 3, 6]);
        assert_eq!(ids(&t, "  "), [1, 9]);
        assert_eq!(t.decode(&[8, 6, 10], true).unwrap(), " ab aA");
        // with add_space_prefix, the text starts with ▁ and decoding drops it again
        let t = tokenizer_of(spm(true)).unwrap();
        assert_eq!(ids(&t, "ab a"), [1, 8, 6]);
        assert_eq!(t.decode(&[8, 6], true).unwrap(), "ab a");
    }
}
