//! The CLIP text side of Stable Diffusion, forward only: the tokenizer (transformers'
//! `CLIPTokenizer`) and the text encoder (`CLIPTextModel`, `CLIPTextModelWithProjection`) of
//! `text_encoder/` and SDXL's `text_encoder_2/`.
//!
//! Tokenizer: NFC, runs of whitespace to one space, lower case; split by CLIP's pattern
//! (`'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+`, the special tokens kept whole);
//! byte-level BPE whose word-final pieces end in `</w>`; then
//! `<|startoftext|> … <|endoftext|>`, truncated and padded to `model_max_length` (77) with the
//! pad token (`<|endoftext|>` in SD 1.x, `!` in SD 2.x and SDXL's second tokenizer).
//!
//! Encoder, for ids of length s ≤ `max_position_embeddings`:
//! h₀ = E_tok[ids] + E_pos[0..s]; for each of L layers
//! h ← h + W_o·attn(LN₁(h)), attn = softmax(q·kᵀ/√d_head + causal mask)·v per head, then
//! h ← h + W₂·act(W₁·LN₂(h) + b₁) + b₂ with act = quick_gelu (x·σ(1.702x)) or gelu (erf).
//! Outputs: `last_hidden` = LN_final(h_L); `penultimate` = h_{L−1} (transformers'
//! `hidden_states[-2]`, no final LN: what SDXL conditions on); `pooled` = the row of
//! `last_hidden` at each sequence's end token, times W_projᵀ when the checkpoint has
//! `text_projection.weight`. The end token is the first `eos_token_id`, or the largest id when
//! config.json says `eos_token_id` = 2 (configs older than transformers' fix of the field,
//! where the largest id is `<|endoftext|>`).

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear};
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::utils::{Lowercase, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::checkpoint::{read_json, Checkpoint};
use crate::error::{Error, Result};
use crate::model::weights::{refuse_unread, ConfigReader, Weights};

/// CLIP's pre-tokenisation pattern, its special tokens first so they stay whole.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The length every Stable Diffusion text encoder was trained on.
const CLIP_MAX_LENGTH: usize = 77;

/// transformers' `CLIPTokenizer` over a diffusers `tokenizer/` folder.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    pad_id: u32,
}

/// A special token as `tokenizer_config.json` or `special_tokens_map.json` gives it: a string,
/// or an `AddedToken` object with its matching flags.
fn special_token(v: &Value) -> Option<AddedToken> {
    match v {
        // transformers matches a special token given as a string in the raw text
        Value::String(s) => Some(AddedToken::from(s.clone(), true).normalized(false)),
        Value::Object(o) => {
            let flag =
                |k: &str, default: bool| o.get(k).and_then(Value::as_bool).unwrap_or(default);
            Some(
                AddedToken::from(o.get("content")?.as_str()?.to_string(), true)
                    .normalized(flag("normalized", true))
                    .lstrip(flag("lstrip", false))
                    .rstrip(flag("rstrip", false))
                    .single_word(flag("single_word", false)),
            )
        }
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads `dir/tokenizer.json` when present, else builds the tokenizer from `vocab.json` and
    /// `merges.txt`; special tokens and `model_max_length` come from `tokenizer_config.json`,
    /// overridden by `special_tokens_map.json` as transformers does.
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            read_json(&config_path)?
        } else {
            Value::Null
        };
        let map_path = dir.join("special_tokens_map.json");
        let map = if map_path.exists() {
            read_json(&map_path)?
        } else {
            Value::Null
        };
        let token = |name: &str, default: &str| -> Result<AddedToken> {
            let (v, path) = match map.get(name) {
                Some(v) if !v.is_null() => (v, &map_path),
                _ => match config.get(name) {
                    Some(v) if !v.is_null() => (v, &config_path),
                    _ => return Ok(AddedToken::from(default.to_string(), true)),
                },
            };
            special_token(v).ok_or_else(|| {
                Error::bad_field(
                    path,
                    name,
                    format!("must be a string or an AddedToken object, found {v}"),
                )
            })
        };
        let bos = token("bos_token", "<|startoftext|>")?;
        let eos = token("eos_token", "<|endoftext|>")?;
        let unk = token("unk_token", "<|endoftext|>")?;
        let pad = token("pad_token", "<|endoftext|>")?;
        // transformers writes a huge number here when the model sets no limit
        let max_length = ConfigReader {
            path: &config_path,
            value: &config,
        }
        .usize_or("model_max_length", Some(CLIP_MAX_LENGTH))?
        .min(CLIP_MAX_LENGTH);

        let json = dir.join("tokenizer.json");
        let mut tokenizer = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| {
                Error::bad_file(
                    &json,
                    format!("not a tokenizer.json that the tokenizers library can read: {e}"),
                )
            })?
        } else {
            build_clip_bpe(dir, &unk.content)?
        };
        let mut seen = BTreeSet::new();
        let specials: Vec<AddedToken> = [&bos, &eos, &unk, &pad]
            .into_iter()
            .filter(|t| seen.insert(t.content.clone()))
            .cloned()
            .collect();
        tokenizer.add_special_tokens(specials).map_err(|e| {
            Error::msg(format!(
                "{}: cannot add the special tokens: {e}",
                dir.display()
            ))
        })?;
        let id = |t: &AddedToken| -> Result<u32> {
            tokenizer.token_to_id(&t.content).ok_or_else(|| {
                Error::msg(format!(
                    "{}: the special token `{}` is not in the vocabulary",
                    dir.display(),
                    t.content
                ))
            })
        };
        let (bos_id, eos_id, pad_id) = (id(&bos)?, id(&eos)?, id(&pad)?);
        if !json.exists() {
            tokenizer.with_post_processor(Some(
                RobertaProcessing::new(
                    (eos.content.clone(), eos_id),
                    (bos.content.clone(), bos_id),
                )
                .trim_offsets(false)
                .add_prefix_space(false),
            ));
        }
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::msg(format!("{}: cannot set truncation: {e}", dir.display())))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad.content.clone(),
        }));
        Ok(Self {
            tokenizer,
            max_length,
            pad_id,
        })
    }

    /// The length of every encoded prompt.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Each prompt's ids, exactly `max_length()` of them.
    pub fn encode(&self, prompts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(prompts.to_vec(), true)
            .map_err(|e| Error::msg(format!("cannot tokenize the prompts: {e}")))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// The ids of `prompts` as a (b, max_length) u32 tensor.
    pub fn encode_tensor(&self, prompts: &[&str], device: &Device) -> Result<Tensor> {
        let ids: Vec<u32> = self.encode(prompts)?.concat();
        Ok(Tensor::from_vec(
            ids,
            (prompts.len(), self.max_length),
            device,
        )?)
    }
}

/// CLIP's tokenizer from `vocab.json` and `merges.txt`, as transformers' converter builds it.
fn build_clip_bpe(dir: &Path, unk: &str) -> Result<Tokenizer> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    for f in [&vocab, &merges] {
        if !f.exists() {
            return Err(Error::bad_file(
                f,
                "not found; a CLIP tokenizer folder needs tokenizer.json, or vocab.json and merges.txt",
            ));
        }
    }
    let bpe = BPE::builder()
        .files(vocab.display().to_string(), merges.display().to_string())
        .end_of_word_suffix("</w>".into())
        .continuing_subword_prefix(String::new())
        .unk_token(unk.into())
        .build()
        .map_err(|e| {
            Error::bad_file(dir, format!("vocab.json / merges.txt cannot be read: {e}"))
        })?;
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
        .map_err(|e| Error::msg(format!("CLIP whitespace pattern: {e}")))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| Error::msg(format!("CLIP split pattern: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| Error::msg(format!("CLIP normalizer: {e}")))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    QuickGelu,
    Gelu,
}

/// The fields of a CLIP text config.json that the forward pass reads.
#[derive(Debug, Clone)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub projection_dim: Option<usize>,
    pub eos_token_id: u32,
    hidden_act: Activation,
}

impl TextConfig {
    pub fn from_config(value: &Value, path: &Path) -> Result<Self> {
        let c = ConfigReader { path, value };
        c.refuse_unless(
            "model_type",
            |v| v == "clip_text_model",
            "a Stable Diffusion text_encoder/ holds a clip_text_model",
        )?;
        let hidden_act = match c.str_or("hidden_act", "quick_gelu")? {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            _ => return Err(c.unsupported("hidden_act", "expected quick_gelu or gelu")),
        };
        let hidden_size = c.usize("hidden_size")?;
        let num_attention_heads = c.usize("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(Error::bad_field(
                path,
                "num_attention_heads",
                format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
            ));
        }
        let num_hidden_layers = c.usize("num_hidden_layers")?;
        if num_hidden_layers == 0 {
            return Err(Error::bad_field(
                path,
                "num_hidden_layers",
                "must be at least 1",
            ));
        }
        Ok(Self {
            vocab_size: c.usize("vocab_size")?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            max_position_embeddings: c.usize_or("max_position_embeddings", Some(77))?,
            layer_norm_eps: c.f64_or("layer_norm_eps", 1e-5)?,
            projection_dim: c
                .get("projection_dim")
                .map(|_| c.usize("projection_dim"))
                .transpose()?,
            eos_token_id: c.usize_or("eos_token_id", Some(2))? as u32,
            hidden_act,
        })
    }
}

/// What the encoder gives a batch of prompts.
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// (b, s, hidden), after the final layer norm.
    pub last_hidden: Tensor,
    /// (b, s, hidden), the input of the last layer, without the final layer norm.
    pub penultimate: Tensor,
    /// (b, hidden) or (b, projection_dim): the end token's row of `last_hidden`, projected when
    /// the model has a projection.
    pub pooled: Tensor,
}

struct EncoderLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// A CLIP text encoder, frozen.
pub struct TextEncoder {
    config: TextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_ln: LayerNorm,
    projection: Option<Tensor>,
    dtype: DType,
}

/// Reads named tensors of one checkpoint, remembering which were read.
struct Reader<'a> {
    w: &'a Weights,
    dtype: DType,
    device: &'a Device,
    read: BTreeSet<String>,
}

impl Reader<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.read.insert(name.to_string());
        self.w.get_shaped(name, shape, self.dtype, self.device)
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        Ok(Linear::new(
            self.get(&format!("{prefix}.weight"), &[out, inp])?,
            Some(self.get(&format!("{prefix}.bias"), &[out])?),
        ))
    }

    fn layer_norm(&mut self, prefix: &str, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm::new(
            self.get(&format!("{prefix}.weight"), &[dim])?,
            self.get(&format!("{prefix}.bias"), &[dim])?,
            eps,
        ))
    }
}

impl TextEncoder {
    /// Loads `dir/config.json` and `dir/model.safetensors` (or its shards).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        let config = TextConfig::from_config(ckpt.config(), &dir.join("config.json"))?;
        let w = Weights::Checkpoint(ckpt);
        let mut r = Reader {
            w: &w,
            dtype,
            device,
            read: BTreeSet::new(),
        };
        // transformers 5 saves a bare CLIPTextModel without the `text_model.` of older files
        let t = if !w.contains("text_model.embeddings.token_embedding.weight")
            && w.contains("embeddings.token_embedding.weight")
        {
            ""
        } else {
            "text_model."
        };
        let c = &config;
        let (h, m) = (c.hidden_size, c.intermediate_size);
        let token_embedding = r.get(
            &format!("{t}embeddings.token_embedding.weight"),
            &[c.vocab_size, h],
        )?;
        let position_embedding = r.get(
            &format!("{t}embeddings.position_embedding.weight"),
            &[c.max_position_embeddings, h],
        )?;
        // a buffer older checkpoints stored: always 0..max_position_embeddings
        r.read.insert(format!("{t}embeddings.position_ids"));
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("{t}encoder.layers.{i}");
                Ok(EncoderLayer {
                    ln1: r.layer_norm(&format!("{p}.layer_norm1"), h, c.layer_norm_eps)?,
                    q: r.linear(&format!("{p}.self_attn.q_proj"), h, h)?,
                    k: r.linear(&format!("{p}.self_attn.k_proj"), h, h)?,
                    v: r.linear(&format!("{p}.self_attn.v_proj"), h, h)?,
                    out: r.linear(&format!("{p}.self_attn.out_proj"), h, h)?,
                    ln2: r.layer_norm(&format!("{p}.layer_norm2"), h, c.layer_norm_eps)?,
                    fc1: r.linear(&format!("{p}.mlp.fc1"), m, h)?,
                    fc2: r.linear(&format!("{p}.mlp.fc2"), h, m)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_ln = r.layer_norm(&format!("{t}final_layer_norm"), h, c.layer_norm_eps)?;
        let projection = if w.contains("text_projection.weight") {
            let dim = c.projection_dim.ok_or_else(|| {
                Error::bad_field(
                    dir.join("config.json"),
                    "projection_dim",
                    "is missing but the checkpoint has text_projection.weight",
                )
            })?;
            Some(r.get("text_projection.weight", &[dim, h])?)
        } else {
            None
        };
        refuse_unread(&w, &r.read, |n| {
            n.starts_with(t) || n.starts_with("text_projection.")
        })?;
        Ok(Self {
            config,
            token_embedding,
            position_embedding,
            layers,
            final_ln,
            projection,
            dtype,
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// The width of `pooled`: projection_dim with a projection, else hidden_size.
    pub fn pooled_dim(&self) -> usize {
        self.projection
            .as_ref()
            .map_or(self.config.hidden_size, |p| p.dims()[0])
    }

    /// Runs the encoder on (b, s) u32 token ids.
    pub fn encode(&self, ids: &Tensor) -> Result<TextOutput> {
        let (b, s) = ids.dims2()?;
        let c = &self.config;
        if s > c.max_position_embeddings {
            return Err(Error::bad_tensor(
                "ids",
                format!(
                    "has {s} tokens a row; the text encoder takes at most {}",
                    c.max_position_embeddings
                ),
            ));
        }
        let rows: Vec<Vec<u32>> = ids
            .to_device(&Device::Cpu)?
            .to_dtype(DType::U32)?
            .to_vec2()?;
        if let Some(bad) = rows
            .iter()
            .flatten()
            .find(|&&id| id as usize >= c.vocab_size)
        {
            return Err(Error::bad_tensor(
                "ids",
                format!(
                    "holds token id {bad}, past the vocabulary of {}",
                    c.vocab_size
                ),
            ));
        }
        // row i's end token, as an index into the (b·s) rows of the flattened output
        let ends = rows
            .iter()
            .enumerate()
            .map(|(i, row)| Ok((i * s) as u32 + self.end_position(i, row)?))
            .collect::<Result<Vec<u32>>>()?;
        let device = self.token_embedding.device();
        let ids = ids.to_device(device)?.to_dtype(DType::U32)?;
        let tokens = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, c.hidden_size))?;
        let mut h = tokens.broadcast_add(&self.position_embedding.narrow(0, 0, s)?)?;
        let mask = causal_mask(s, self.dtype, device)?;
        let mut penultimate = h.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = h.clone();
            }
            h = self.layer_forward(layer, &h, &mask)?;
        }
        let last_hidden = self.final_ln.forward(&h)?;
        let mut pooled = last_hidden
            .reshape((b * s, c.hidden_size))?
            .index_select(&Tensor::from_vec(ends, b, device)?, 0)?;
        if let Some(p) = &self.projection {
            pooled = pooled.matmul(&p.t()?)?;
        }
        Ok(TextOutput {
            last_hidden,
            penultimate,
            pooled,
        })
    }

    fn end_position(&self, row_index: usize, row: &[u32]) -> Result<u32> {
        let eos = self.config.eos_token_id;
        let pos = if eos == 2 {
            // the first of the largest ids, as torch.argmax picks
            row.iter()
                .enumerate()
                .fold(
                    (0, 0),
                    |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                )
                .0
        } else {
            row.iter().position(|&id| id == eos).ok_or_else(|| {
                Error::bad_tensor(
                    "ids",
                    format!(
                        "row {row_index} has no end token (eos_token_id {eos}); tokenize with the model's own tokenizer"
                    ),
                )
            })?
        };
        Ok(pos as u32)
    }

    fn layer_forward(&self, l: &EncoderLayer, h: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s, hidden) = h.dims3()?;
        let heads = self.config.num_attention_heads;
        let d = hidden / heads;
        let x = l.ln1.forward(h)?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, s, heads, d))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split((l.q.forward(&x)? * (d as f64).powf(-0.5))?)?;
        let k = split(l.k.forward(&x)?)?;
        let v = split(l.v.forward(&x)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        // softmax in f32: half-precision exponentials overflow
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
            .to_dtype(self.dtype)?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, hidden))?;
        let h = (h + l.out.forward(&attn)?)?;
        let x = l.fc1.forward(&l.ln2.forward(&h)?)?;
        let x = match self.config.hidden_act {
            Activation::QuickGelu => (&x * candle_nn::ops::sigmoid(&(&x * 1.702)?)?)?,
            Activation::Gelu => x.gelu_erf()?,
        };
        Ok((h + l.fc2.forward(&x)?)?)
    }
}

/// (s, s): 0 on and below the diagonal, −∞ above, so a token attends to itself and earlier ones.
fn causal_mask(s: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..s * s)
        .map(|i| {
            if i % s > i / s {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(v, (s, s), device)?.to_dtype(dtype)?)
}
