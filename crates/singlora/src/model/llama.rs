//! LLaMA-family decoders (LLaMA, Mistral, Qwen2, SmolLM2), written for training.
//!
//! Per layer: x += O·attn(RoPE(Q·n₁(x)), RoPE(K·n₁(x)), V·n₁(x)) with grouped-query attention
//! and a causal mask, then x += W_down·(silu(W_gate·n₂(x)) ⊙ W_up·n₂(x)), n = RMSNorm; tied or
//! untied embeddings.
//!
//! config.json is read as transformers 5 reads it, and every key that changes this math is
//! either implemented or refused by name:
//! - RoPE in Hugging Face's rotate-half layout, from either layout transformers writes: the
//!   top-level `rope_theta` / `rope_scaling` (transformers 4) or `rope_parameters` (5), with
//!   the `default`, `linear` and `llama3` types; other types (dynamic, yarn, longrope, …),
//!   `partial_rotary_factor` and per-layer-type RoPE are refused, and so are the two layouts
//!   when they disagree.
//! - Biases as each model class declares them: LLaMA's `attention_bias` (q, k, v and o) and
//!   `mlp_bias`; Qwen2's q/k/v biases; none for Mistral. A checkpoint tensor that the config
//!   gives no place is refused rather than dropped.
//! - Sliding-window attention (Mistral's `sliding_window`, Qwen2's `use_sliding_window` with
//!   `max_window_layers` or `layer_types`) is not implemented: it equals full causal attention
//!   while a sequence fits in the window, so longer sequences are refused at the forward.
//! - `hidden_act` must be silu (or its alias swish).
//!
//! Dropout (`attention_dropout`) is a training-time regulariser that singlora does not apply:
//! the frozen base runs as in evaluation mode.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::weights::{refuse_unread, ConfigReader, Weights};
use super::{load_linear, Batch};
use crate::adapter::AdaptedLinear;
use crate::error::{Error, Result};
use crate::linear::frozen_matmul;
use crate::ops::{attention_block, key_lens, rms_norm, rope_tables, swiglu, FastPath};

#[cfg(feature = "cuda")]
pub(crate) mod fast;

#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub eps: f64,
    pub tie_embeddings: bool,
    /// Inverse RoPE frequencies, scaling applied.
    pub inv_freq: Vec<f64>,
    /// Biases of the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias of the attention output projection.
    pub o_bias: bool,
    /// Biases of the gate, up and down projections.
    pub mlp_bias: bool,
    /// The attention window of the layers that have one; sequences longer than it are refused.
    pub sliding_window: Option<usize>,
}

/// How RoPE's frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// LLaMA 3.1's: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// RoPE as config.json sets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// transformers' defaults where config.json leaves a key out, per model type.
struct Defaults {
    max_position_embeddings: usize,
}

fn defaults(model_type: &str) -> Defaults {
    Defaults {
        max_position_embeddings: match model_type {
            "mistral" => 4096 * 32,
            "qwen2" => 32768,
            _ => 2048,
        },
    }
}

/// `max_position_embeddings`, or transformers' default for the model type.
pub fn max_positions(c: &ConfigReader) -> Result<usize> {
    let d = defaults(c.str_or("model_type", "llama")?);
    c.usize_or("max_position_embeddings", Some(d.max_position_embeddings))
}

/// RoPE's base where neither layout sets one.
const DEFAULT_THETA: f64 = 10000.0;

/// Where each transformers version keeps the RoPE settings: `rope_scaling` (with the base in
/// the top-level `rope_theta`) before version 5, `rope_parameters` (base inside) from 5 on.
const LEGACY: &str = "rope_scaling";
const CURRENT: &str = "rope_parameters";

impl Rope {
    /// Reads either layout. transformers 5 takes a non-empty `rope_scaling` over
    /// `rope_parameters` and a base inside the dictionary over the top-level one; where both
    /// say something they must agree, or the file is refused.
    pub fn read(c: &ConfigReader, max_position_embeddings: usize) -> Result<Self> {
        c.refuse_unless(
            "partial_rotary_factor",
            |v| v.as_f64() == Some(1.0),
            "partial rotary embeddings are not implemented",
        )?;
        let mut thetas = vec![];
        for field in [
            "rope_theta",
            "rope_scaling.rope_theta",
            "rope_parameters.rope_theta",
        ] {
            if let Some(t) = c.f64_opt(field)? {
                thetas.push((field, t));
            }
        }
        if let Some(&(f1, t1)) = thetas.first() {
            if let Some(&(f2, t2)) = thetas.iter().find(|(_, t)| *t != t1) {
                return Err(Error::bad_field(
                    c.path,
                    f1,
                    format!(
                        "= {t1} but `{f2}` = {t2}: the two RoPE layouts disagree; keep one of them"
                    ),
                ));
            }
        }
        let theta = thetas.first().map_or(DEFAULT_THETA, |(_, t)| *t);
        if !(theta.is_finite() && theta > 1.0) {
            return Err(c.unsupported(thetas[0].0, "RoPE's base must be a number above 1"));
        }
        let legacy = scaling_section(c, LEGACY, max_position_embeddings)?;
        let current = scaling_section(c, CURRENT, max_position_embeddings)?;
        let scaling = match (legacy, current) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::bad_field(
                    c.path,
                    LEGACY,
                    format!(
                        "says {a:?} but `{CURRENT}` says {b:?}: the two RoPE layouts disagree; \
                         keep one of them"
                    ),
                ))
            }
            (Some(s), _) | (None, Some(s)) => s,
            (None, None) => RopeScaling::None,
        };
        Ok(Rope { theta, scaling })
    }

    /// The inverse frequencies θ^(−2i/d), i < d/2, scaled.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f64> {
        let base =
            (0..head_dim / 2).map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / head_dim as f64));
        match self.scaling {
            RopeScaling::None => base.collect(),
            RopeScaling::Linear { factor } => base.map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: old_ctx,
            } => base
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < old_ctx / high {
                        f
                    } else if wavelen > old_ctx / low {
                        f / factor
                    } else {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect(),
        }
    }
}

/// The scaling one layout describes; None where that layout is absent (transformers treats an
/// empty dictionary as absent too).
fn scaling_section(
    c: &ConfigReader,
    section: &str,
    max_position_embeddings: usize,
) -> Result<Option<RopeScaling>> {
    let Some(v) = c.get(section) else {
        return Ok(None);
    };
    let Some(map) = v.as_object() else {
        return Err(Error::bad_field(
            c.path,
            section,
            format!("must be an object, found {v}"),
        ));
    };
    if map.is_empty() {
        return Ok(None);
    }
    if let Some((key, _)) = map.iter().find(|(_, v)| v.is_object()) {
        return Err(c.unsupported(
            &format!("{section}.{key}"),
            "RoPE settings per layer type are not implemented; one dictionary for all layers is",
        ));
    }
    let field = |k: &str| format!("{section}.{k}");
    c.refuse_unless(
        &field("partial_rotary_factor"),
        |v| v.as_f64() == Some(1.0),
        "partial rotary embeddings are not implemented",
    )?;
    // transformers 5 reads `rope_type` and falls back on the older `type`
    let type_field = if map.contains_key("rope_type") {
        field("rope_type")
    } else {
        field("type")
    };
    let positive = |k: &str| -> Result<f64> {
        let f = field(k);
        let x = c.f64_req(&f)?;
        if x.is_finite() && x > 0.0 {
            Ok(x)
        } else {
            Err(c.unsupported(&f, "must be a positive number"))
        }
    };
    Ok(Some(match c.str_or(&type_field, "default")? {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: positive("factor")?,
        },
        "llama3" => {
            let low = positive("low_freq_factor")?;
            let high = positive("high_freq_factor")?;
            if high <= low {
                return Err(c.unsupported(
                    &field("high_freq_factor"),
                    "must be above `low_freq_factor` for llama3 scaling",
                ));
            }
            let old_ctx_field = field("original_max_position_embeddings");
            let old_ctx = match c.get(&old_ctx_field) {
                Some(_) => positive("original_max_position_embeddings")?,
                None => max_position_embeddings as f64,
            };
            RopeScaling::Llama3 {
                factor: positive("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: old_ctx,
            }
        }
        _ => {
            return Err(c.unsupported(
                &type_field,
                "only the default, linear and llama3 RoPE types are implemented",
            ))
        }
    }))
}

/// The window of the layers that attend through one, as transformers 5 configures them:
/// Mistral windows every layer by `sliding_window` (4096 where the key is absent, none where it
/// is null); Qwen2 only with `use_sliding_window`, and then the layers that `layer_types` marks
/// `sliding_attention`, or by default those from `max_window_layers` on. LLaMA has none.
fn sliding_window(c: &ConfigReader, model_type: &str, layers: usize) -> Result<Option<usize>> {
    let window = |default: usize| -> Result<Option<usize>> {
        match c.value.get("sliding_window") {
            Some(Value::Null) => Ok(None),
            None => Ok(Some(default)),
            Some(_) => c.usize("sliding_window").map(Some),
        }
    };
    match model_type {
        "mistral" => window(4096),
        "qwen2" if c.bool_or("use_sliding_window", false)? => {
            let Some(w) = window(4096)? else {
                return Ok(None);
            };
            let windowed = match c.get("layer_types") {
                Some(types) => {
                    let types = types.as_array().ok_or_else(|| {
                        Error::bad_field(c.path, "layer_types", "must be a list of strings")
                    })?;
                    types
                        .iter()
                        .any(|t| t.as_str() == Some("sliding_attention"))
                }
                None => c.usize_or("max_window_layers", Some(28))? < layers,
            };
            Ok(windowed.then_some(w))
        }
        _ => Ok(None),
    }
}

struct Layer {
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: AdaptedLinear,
    o: AdaptedLinear,
    gate: AdaptedLinear,
    up: AdaptedLinear,
    down: AdaptedLinear,
    ln1: Tensor,
    ln2: Tensor,
}

/// Where the vocabulary logits come from.
enum VocabHead {
    Own(AdaptedLinear),
    Tied,
    Missing,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// None when tied to the embedding, or when the checkpoint has no head.
    lm_head: Option<AdaptedLinear>,
    /// The checkpoint, where it has no vocabulary projection of any kind.
    headless: Option<PathBuf>,
    dtype: DType,
    /// Benchmarks of the frozen base: make the embedded input a leaf variable so the backward
    /// runs through every layer without any trainable parameter.
    pub grad_from_embeddings: bool,
    /// The CUDA fast path keeps no SwiGLU output and no attention probabilities and
    /// recomputes them in the backward (b·t·ff and, off the fused attention kernels, b·h·t²
    /// values less per layer; one more SwiGLU pass, and a QKᵀ GEMM and softmax).
    pub recompute: bool,
}

impl Llama {
    pub fn config(c: &ConfigReader) -> Result<LlamaConfig> {
        let model_type = c.str_or("model_type", "llama")?;
        let hidden = c.usize("hidden_size")?;
        let heads = c.usize("num_attention_heads")?;
        let kv_heads = c.usize_or("num_key_value_heads", Some(heads))?;
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(Error::bad_field(
                c.path,
                "num_key_value_heads",
                format!("{kv_heads} key/value heads cannot be shared by {heads} attention heads"),
            ));
        }
        let head_dim = c.usize_or("head_dim", Some(hidden / heads))?;
        if head_dim % 2 != 0 {
            return Err(Error::bad_field(
                c.path,
                "head_dim",
                format!("RoPE needs an even head size, found {head_dim}"),
            ));
        }
        c.refuse_unless(
            "hidden_act",
            |v| matches!(v.as_str(), Some("silu" | "swish")),
            "LLaMA-family MLPs are implemented with silu",
        )?;
        let layers = c.usize("num_hidden_layers")?;
        let max_positions = max_positions(c)?;
        // each class declares its own biases; transformers reads `attention_bias` and
        // `mlp_bias` for LLaMA only
        let (qkv_bias, o_bias, mlp_bias) = match model_type {
            "qwen2" => (true, false, false),
            "mistral" => (false, false, false),
            _ => {
                let attn = c.bool_or("attention_bias", false)?;
                (attn, attn, c.bool_or("mlp_bias", false)?)
            }
        };
        Ok(LlamaConfig {
            hidden,
            intermediate: c.usize("intermediate_size")?,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab: c.usize("vocab_size")?,
            eps: c.f64_or("rms_norm_eps", 1e-6)?,
            tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
            inv_freq: Rope::read(c, max_positions)?.inv_freq(head_dim),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window: sliding_window(c, model_type, layers)?,
        })
    }

    pub fn load(w: &Weights, cfg: LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let h = cfg.hidden;
        let qd = cfg.heads * cfg.head_dim;
        let kvd = cfg.kv_heads * cfg.head_dim;
        let mut read = BTreeSet::new();
        let mut take = |name: &str| read.insert(name.to_string());
        let embed = w.get_shaped("model.embed_tokens.weight", &[cfg.vocab, h], dtype, device)?;
        take("model.embed_tokens.weight");
        let mut layers = vec![];
        for i in 0..cfg.layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let mut lin = |s: &str, o, inp, bias| {
                take(&p(&format!("{s}.weight")));
                if bias {
                    take(&p(&format!("{s}.bias")));
                }
                load_linear(w, &p(s), o, inp, bias, dtype, device)
            };
            let (qkv, ob, mb) = (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias);
            let ff = cfg.intermediate;
            let (q, k, v) = (
                lin("self_attn.q_proj", qd, h, qkv)?,
                lin("self_attn.k_proj", kvd, h, qkv)?,
                lin("self_attn.v_proj", kvd, h, qkv)?,
            );
            let o = lin("self_attn.o_proj", h, qd, ob)?;
            let (gate, up, down) = (
                lin("mlp.gate_proj", ff, h, mb)?,
                lin("mlp.up_proj", ff, h, mb)?,
                lin("mlp.down_proj", h, ff, mb)?,
            );
            let mut norm = |s: &str| {
                take(&p(s));
                w.get_shaped(&p(s), &[h], DType::F32, device)
            };
            layers.push(Layer {
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
                ln1: norm("input_layernorm.weight")?,
                ln2: norm("post_attention_layernorm.weight")?,
            });
        }
        let norm = w.get_shaped("model.norm.weight", &[h], DType::F32, device)?;
        take("model.norm.weight");
        let has_head = w.contains("lm_head.weight");
        let lm_head = if cfg.tie_embeddings {
            if has_head {
                // transformers ties the head to the embedding and so never reads this copy
                let head = w.get_shaped("lm_head.weight", &[cfg.vocab, h], dtype, device)?;
                if (head - &embed)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?
                    != 0.0
                {
                    return Err(Error::msg(format!(
                        "{}: config.json ties the vocabulary projection to the embedding \
                         (`tie_word_embeddings`), but the checkpoint's `lm_head.weight` differs \
                         from `model.embed_tokens.weight`; set tie_word_embeddings to false to \
                         use the checkpoint's head",
                        w.source().display()
                    )));
                }
                take("lm_head.weight");
            }
            VocabHead::Tied
        } else if has_head {
            take("lm_head.weight");
            VocabHead::Own(load_linear(
                w, "lm_head", cfg.vocab, h, false, dtype, device,
            )?)
        } else {
            VocabHead::Missing
        };
        let owned = |n: &str| n.starts_with("model.") || n.starts_with("lm_head.");
        // a non-persistent buffer that older checkpoints saved and transformers recomputes
        let owned = |n: &str| owned(n) && !n.ends_with(".rotary_emb.inv_freq");
        refuse_unread(w, &read, owned)?;
        let (lm_head, headless) = match lm_head {
            VocabHead::Own(l) => (Some(l), None),
            VocabHead::Tied => (None, None),
            VocabHead::Missing => (None, Some(w.source())),
        };
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            headless,
            dtype,
            grad_from_embeddings: false,
            recompute: false,
        })
    }

    /// Whether the model can produce vocabulary logits: its own `lm_head.weight` or a head
    /// tied to the embedding. A bare `LlamaModel` checkpoint with untied embeddings has
    /// neither, and serves classification only.
    pub fn has_vocab_head(&self) -> bool {
        self.headless.is_none()
    }

    /// The refusal of vocabulary logits from a checkpoint without a head.
    pub(crate) fn no_vocab_head(&self) -> Error {
        let source = self
            .headless
            .as_deref()
            .unwrap_or(Path::new("the checkpoint"));
        Error::msg(format!(
            "{}: no `lm_head.weight`, and config.json does not tie the head to the embedding \
             (`tie_word_embeddings` is false): without a vocabulary projection the model serves \
             classification, not SFT or generation",
            source.display()
        ))
    }

    /// Refuses a sequence of `t` tokens that would reach past the sliding attention window,
    /// where transformers' attention differs from the full causal attention computed here.
    pub fn check_len(&self, t: usize) -> Result<()> {
        match self.cfg.sliding_window {
            Some(w) if t > w => Err(Error::msg(format!(
                "a sequence of {t} tokens is longer than this model's sliding attention window \
                 of {w} (config.json's `sliding_window`); singlora computes full causal attention, \
                 which equals the model's only up to {w} tokens: use --max-length {w} or less"
            ))),
            _ => Ok(()),
        }
    }

    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        let mut v = vec![];
        for l in &self.layers {
            v.extend([&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]);
        }
        v.extend(self.lm_head.iter());
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut v = vec![];
        for l in &mut self.layers {
            v.extend([
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ]);
        }
        v.extend(self.lm_head.iter_mut());
        v
    }

    /// Final hidden states (b, t, h), normalised; `fast` chooses the attention's CUDA kernels.
    pub fn hidden_states(&self, batch: &Batch, fast: &FastPath) -> Result<Tensor> {
        let (b, t) = batch.ids.dims2()?;
        self.check_len(t)?;
        let c = &self.cfg;
        let mut x = self
            .embed
            .index_select(&batch.ids.flatten_all()?, 0)?
            .reshape((b, t, c.hidden))?;
        if self.grad_from_embeddings {
            x = candle_core::Var::from_tensor(&x)?.as_tensor().clone();
        }
        let lens = key_lens(&batch.mask)?;
        // f32 tables on CUDA (the fused kernel's), the model's dtype on the CPU
        let table_dt = if x.device().is_cpu() {
            self.dtype
        } else {
            DType::F32
        };
        let (cos, sin) = rope_tables(&c.inv_freq, t, table_dt, x.device())?;
        for l in &self.layers {
            let hn = rms_norm(&x, &l.ln1, c.eps)?;
            let a = attention_block(
                &l.q.forward(&hn)?,
                &l.k.forward(&hn)?,
                &l.v.forward(&hn)?,
                (&cos, &sin),
                (c.heads, c.kv_heads),
                &lens,
                true,
                fast,
            )?;
            x = (x + l.o.forward(&a)?)?;
            let hn = rms_norm(&x, &l.ln2, c.eps)?;
            let f = swiglu(&l.gate.forward(&hn)?, &l.up.forward(&hn)?)?;
            x = (x + l.down.forward(&f)?)?;
        }
        rms_norm(&x, &self.norm, c.eps)
    }

    /// The final norm of the residual stream (b, t, h).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.cfg.eps)
    }

    /// Vocabulary logits for hidden rows (n, h) → (n, vocab).
    pub fn lm_logits(&self, rows: &Tensor) -> Result<Tensor> {
        match &self.lm_head {
            Some(head) => head.forward(rows),
            None if self.has_vocab_head() => Ok(frozen_matmul(rows, &self.embed)?),
            None => Err(self.no_vocab_head()),
        }
    }
}
