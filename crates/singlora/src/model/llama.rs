//! LLaMA-family decoders (LLaMA 1–3.x, Mistral, Qwen2, Qwen3, SmolLM2, Gemma 3, Phi-3),
//! written for training.
//!
//! Per layer: x += O·attn(RoPE(Q·n₁(x)), RoPE(K·n₁(x)), V·n₁(x)) with grouped-query attention
//! and a causal mask, then x += W_down·(silu(W_gate·n₂(x)) ⊙ W_up·n₂(x)), n = RMSNorm; tied or
//! untied embeddings. The families differ from this as follows:
//! - Qwen3: queries and keys RMS-normed per head (one weight of the head's size) before RoPE.
//! - Gemma 3 (`gemma3_text`): the embedding scaled by √h (rounded to the model's dtype);
//!   norm weights w stored as offsets, the scale being 1 + w; per-head q/k norms; the
//!   attention's and the MLP's outputs normed again before they join the residual stream;
//!   GeGLU (tanh GELU) instead of SwiGLU; attention scaled by `query_pre_attn_scalar`^-½;
//!   sliding-window layers with their own RoPE base (`rope_parameters` per layer type);
//!   optional final logit soft-capping.
//! - Phi-3: q, k and v from one fused `qkv_proj` and gate and up from one `gate_up_proj`
//!   (adapters sit on the fused projections, as PEFT names them).
//! - GPT-2: LayerNorm with biases instead of RMSNorm; learned absolute positions (`wpe`) added
//!   to the embedding instead of RoPE; q, k, v from one `c_attn`; a plain MLP
//!   `c_proj(gelu(c_fc(x)))`; biases on every projection; weights stored (d_in, d_out) as
//!   its Conv1D keeps them (transposed at load; adapters sit on `c_attn`, `attn.c_proj`,
//!   `c_fc`, `mlp.c_proj` as PEFT names them, with `fan_in_fan_out`); the head tied to `wte`.
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
//! - `hidden_act` must be silu (or its alias swish); Gemma's `hidden_activation` tanh GELU.
//!
//! Dropout (`attention_dropout`) is a training-time regulariser that singlora does not apply:
//! the frozen base runs as in evaluation mode.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::weights::{refuse_unread, ConfigReader, Weights};
use super::{load_linear, load_linear_as, Batch};
use crate::adapter::AdaptedLinear;
use crate::error::{Error, Result};
use crate::linear::{frozen_matmul, FrozenLinear};
use crate::ops::{
    attention_block, key_lens, layer_norm, masked_attention, rms_norm, rope_split, rope_tables_at,
    swiglu, FastPath, Segments,
};

#[cfg(feature = "cuda")]
pub(crate) mod fast;
#[cfg(feature = "cuda")]
pub use fast::fast_forwards_run;

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
    /// Gemma 3: the RoPE frequencies of the sliding-window layers, and which layers those are.
    pub local_rope: Option<(Vec<f64>, Vec<bool>)>,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Gemma's layout: norm weights as offsets from 1, norms after the attention and the MLP,
    /// the embedding scaled by √h.
    pub gemma: bool,
    /// The queries' scale on top of the attention's 1/√head_dim (Gemma's
    /// √(head_dim / query_pre_attn_scalar)).
    pub query_scale: f64,
    /// Logits become c·tanh(logits / c).
    pub final_softcap: Option<f64>,
    pub mlp_act: MlpAct,
    /// Phi-3: one `qkv_proj` and one `gate_up_proj` per layer.
    pub fused_projections: bool,
    /// GPT-2's layout (see the module documentation).
    pub gpt2: bool,
    /// Learned absolute positions (GPT-2's `n_positions`): sequences longer are refused.
    pub learned_positions: Option<usize>,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpAct {
    Silu,
    /// GELU in its tanh approximation (`gelu_pytorch_tanh`, GPT-2's `gelu_new`).
    GeluTanh,
    /// GELU with erf (`gelu`).
    GeluErf,
}

impl MlpAct {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            MlpAct::Silu => candle_nn::ops::silu(x)?,
            MlpAct::GeluTanh => x.gelu()?,
            MlpAct::GeluErf => x.gelu_erf()?,
        })
    }
}

impl LlamaConfig {
    /// Whether the model is the plain LLaMA layout that the CUDA layer kernels implement.
    pub fn is_plain(&self) -> bool {
        !(self.qk_norm
            || self.gemma
            || self.fused_projections
            || self.gpt2
            || self.local_rope.is_some())
            && self.mlp_act == MlpAct::Silu
            && self.query_scale == 1.0
            && self.final_softcap.is_none()
    }
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
            "qwen2" | "qwen3" => 32768,
            "gemma3_text" => 131072,
            "phi3" => 4096,
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
        let theta = rope_base(
            c,
            &[
                "rope_theta",
                "rope_scaling.rope_theta",
                "rope_parameters.rope_theta",
            ],
            DEFAULT_THETA,
        )?;
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

impl Rope {
    /// llama.cpp's `rope_freqs`: per frequency i < d/2, the divisor of θ^(−2i/d) that LLaMA
    /// 3.1's scaling applies (1 for the high frequencies, `factor` for the low ones); None for
    /// other scalings.
    pub fn freq_factors(&self, head_dim: usize) -> Option<Vec<f64>> {
        if !matches!(self.scaling, RopeScaling::Llama3 { .. }) {
            return None;
        }
        let plain = Rope {
            theta: self.theta,
            scaling: RopeScaling::None,
        }
        .inv_freq(head_dim);
        let scaled = self.inv_freq(head_dim);
        Some(plain.iter().zip(scaled).map(|(p, s)| p / s).collect())
    }

    /// The scaling whose [`Rope::freq_factors`] at base θ are `factors` (llama.cpp's
    /// `rope_freqs`, stored in f32): LLaMA 3.1's, its parameters recovered from the factors
    /// between the two plateaus (with Meta's low_freq_factor 1; the factors fix only the ratios
    /// of the others to it), or Meta's own (1, 4, 8192) where too few factors lie between; no
    /// scaling for factors of 1. None when no LLaMA 3.1 scaling gives these factors.
    pub fn from_freq_factors(theta: f64, head_dim: usize, factors: &[f64]) -> Option<RopeScaling> {
        if factors.len() != head_dim / 2 || factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
            return None;
        }
        let factor = factors.iter().cloned().fold(f64::MIN, f64::max);
        if factors.iter().all(|f| (f - 1.0).abs() <= 1e-6) {
            return Some(RopeScaling::None);
        }
        if factor <= 1.0 {
            return None;
        }
        // between the plateaus, smooth = (old / wavelen − low) / (high − low) is linear in
        // 1 / wavelen: smooth = a / wavelen − b with a = old / (high − low), b = low / (high − low)
        let wavelen =
            |i: usize| 2.0 * std::f64::consts::PI * theta.powf(2.0 * i as f64 / head_dim as f64);
        let tol = 1e-5;
        let mid: Vec<(f64, f64)> = factors
            .iter()
            .enumerate()
            .filter(|(_, f)| **f > 1.0 + tol && **f < factor * (1.0 - tol))
            .map(|(i, f)| {
                (
                    1.0 / wavelen(i),
                    (1.0 / f - 1.0 / factor) / (1.0 - 1.0 / factor),
                )
            })
            .collect();
        let mut candidates = vec![(1.0, 4.0, 8192.0)];
        if mid.len() >= 2 {
            let n = mid.len() as f64;
            let (mx, my) = (
                mid.iter().map(|p| p.0).sum::<f64>() / n,
                mid.iter().map(|p| p.1).sum::<f64>() / n,
            );
            let sxy: f64 = mid.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
            let sxx: f64 = mid.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
            let a = sxy / sxx;
            let b = a * mx - my;
            if a > 0.0 && b > 0.0 {
                // Meta's parameters are whole numbers; the stored factors are f32
                let high = ((1.0 + 1.0 / b) * 1e3).round() / 1e3;
                let old = (a / b).round();
                candidates.insert(0, (1.0, high, old));
            }
        }
        candidates.into_iter().find_map(|(low, high, old)| {
            let scaling = RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: old,
            };
            let got = Rope {
                theta,
                scaling: scaling.clone(),
            }
            .freq_factors(head_dim)?;
            got.iter()
                .zip(factors)
                .all(|(g, f)| (g - f).abs() <= 1e-5 * f)
                .then_some(scaling)
        })
    }
}

/// RoPE's base from whichever of `fields` are set, which must agree (the first set one is
/// named in a refusal); `default` where none is.
fn rope_base(c: &ConfigReader, fields: &[&str], default: f64) -> Result<f64> {
    let mut set = vec![];
    for &field in fields {
        if let Some(t) = c.f64_opt(field)? {
            set.push((field, t));
        }
    }
    let Some(&(f1, t1)) = set.first() else {
        return Ok(default);
    };
    if let Some(&(f2, t2)) = set.iter().find(|(_, t)| *t != t1) {
        return Err(Error::bad_field(
            c.path,
            f1,
            format!("= {t1} but `{f2}` = {t2}: the two RoPE layouts disagree; keep one of them"),
        ));
    }
    if !(t1.is_finite() && t1 > 1.0) {
        return Err(c.unsupported(f1, "RoPE's base must be a number above 1"));
    }
    Ok(t1)
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
/// is null); Qwen2 and Qwen3 only with `use_sliding_window`, and then the layers that
/// `layer_types` marks `sliding_attention`, or by default those from `max_window_layers` on;
/// Phi-3 every layer where `sliding_window` is set; Gemma 3 its sliding layers
/// ([`gemma_layer_types`]). LLaMA has none.
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
        "phi3" => match c.get("sliding_window") {
            None => Ok(None),
            Some(_) => c.usize("sliding_window").map(Some),
        },
        "gemma3_text" => {
            let windowed = gemma_layer_types(c, layers)?.iter().any(|&s| s);
            Ok(if windowed { window(4096)? } else { None })
        }
        "qwen2" | "qwen3" if c.bool_or("use_sliding_window", false)? => {
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

/// Gemma 3's layers, true for those that attend through the sliding window: `layer_types`, or
/// by default every layer but each `sliding_window_pattern`-th (6).
fn gemma_layer_types(c: &ConfigReader, layers: usize) -> Result<Vec<bool>> {
    match c.get("layer_types") {
        Some(types) => {
            let types = types
                .as_array()
                .filter(|t| t.len() == layers)
                .ok_or_else(|| {
                    Error::bad_field(
                        c.path,
                        "layer_types",
                        format!("must be a list of {layers} strings, one per layer"),
                    )
                })?;
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(c.unsupported(
                        "layer_types",
                        format!("{t}: only sliding_attention and full_attention are known"),
                    )),
                })
                .collect()
        }
        None => {
            let pattern = c.usize_or("sliding_window_pattern", Some(6))?.max(1);
            Ok((0..layers).map(|i| (i + 1) % pattern != 0).collect())
        }
    }
}

/// Gemma 3's two RoPEs, for its full-attention and its sliding-window layers: transformers 5
/// keeps one dictionary per layer type in `rope_parameters`; transformers 4 kept the global
/// base in `rope_theta`, the local one in `rope_local_base_freq` and the global scaling in
/// `rope_scaling`. Where both layouts set a base they must agree.
pub(crate) fn gemma_ropes(c: &ConfigReader, max_positions: usize) -> Result<(Rope, Rope)> {
    c.refuse_unless(
        "partial_rotary_factor",
        |v| v.as_f64() == Some(1.0),
        "partial rotary embeddings are not implemented",
    )?;
    let read = |kind: &str, legacy_theta: &str, default: f64| -> Result<Rope> {
        let section = format!("{CURRENT}.{kind}");
        let theta_field = format!("{section}.rope_theta");
        let theta = rope_base(c, &[&theta_field, legacy_theta], default)?;
        let mut scaling = scaling_section(c, &section, max_positions)?;
        if kind == "full_attention" {
            let legacy = scaling_section(c, LEGACY, max_positions)?;
            match (&scaling, legacy) {
                (Some(a), Some(b)) if *a != b => {
                    return Err(Error::bad_field(
                        c.path,
                        LEGACY,
                        format!(
                            "says {b:?} but `{section}` says {a:?}: the two RoPE layouts \
                             disagree; keep one of them"
                        ),
                    ))
                }
                (None, Some(b)) => scaling = Some(b),
                _ => {}
            }
        }
        Ok(Rope {
            theta,
            scaling: scaling.unwrap_or(RopeScaling::None),
        })
    };
    if let Some(v) = c.get(CURRENT) {
        if let Some((key, _)) = v
            .as_object()
            .into_iter()
            .flatten()
            .find(|(k, _)| !matches!(k.as_str(), "full_attention" | "sliding_attention"))
        {
            return Err(c.unsupported(
                &format!("{CURRENT}.{key}"),
                "Gemma 3 keeps one RoPE dictionary per layer type (full_attention, \
                 sliding_attention)",
            ));
        }
    }
    Ok((
        read("full_attention", "rope_theta", 1_000_000.0)?,
        read("sliding_attention", "rope_local_base_freq", 10_000.0)?,
    ))
}

/// A GPT-2 causal-mask buffer (`h.N.attn.bias`, `h.N.attn.masked_bias`): older checkpoints
/// saved them, every runtime rebuilds them, and they are not weights.
pub(crate) fn is_gpt2_mask_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}

/// GPT-2's config.json (`GPT2Config`'s own field names; transformers 5 reads the same).
fn gpt2_config(c: &ConfigReader) -> Result<LlamaConfig> {
    let hidden = c.usize("n_embd")?;
    let heads = c.usize("n_head")?;
    if heads == 0 || hidden % heads != 0 || (hidden / heads) % 2 != 0 {
        return Err(Error::bad_field(
            c.path,
            "n_head",
            format!("{heads} heads do not split n_embd {hidden} into heads of an even size"),
        ));
    }
    let head_dim = hidden / heads;
    let intermediate = match c.get("n_inner") {
        None | Some(Value::Null) => 4 * hidden,
        Some(_) => c.usize("n_inner")?,
    };
    let mlp_act = match c.str_or("activation_function", "gelu_new")? {
        // one formula written three ways
        "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => MlpAct::GeluTanh,
        "gelu" => MlpAct::GeluErf,
        _ => {
            return Err(c.unsupported(
                "activation_function",
                "GPT-2's MLP is implemented with gelu_new (tanh GELU) and gelu",
            ))
        }
    };
    c.refuse_unless(
        "scale_attn_weights",
        |v| v.as_bool() == Some(true),
        "attention without the 1/sqrt(head size) scale is not implemented",
    )?;
    c.refuse_unless(
        "scale_attn_by_inverse_layer_idx",
        |v| v.as_bool() == Some(false),
        "scaling attention by 1/(layer + 1) is not implemented",
    )?;
    c.refuse_unless(
        "add_cross_attention",
        |v| v.as_bool() == Some(false),
        "cross-attention (an encoder-decoder GPT-2) is not implemented",
    )?;
    let n_positions = c.usize_or("n_positions", Some(1024))?;
    Ok(LlamaConfig {
        hidden,
        intermediate,
        layers: c.usize("n_layer")?,
        heads,
        kv_heads: heads,
        head_dim,
        vocab: c.usize("vocab_size")?,
        eps: c.f64_or("layer_norm_epsilon", 1e-5)?,
        tie_embeddings: c.bool_or("tie_word_embeddings", true)?,
        // no RoPE: zero frequencies rotate nothing
        inv_freq: vec![0.0; head_dim / 2],
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        sliding_window: None,
        local_rope: None,
        qk_norm: false,
        gemma: false,
        query_scale: 1.0,
        final_softcap: None,
        mlp_act,
        fused_projections: true,
        gpt2: true,
        learned_positions: Some(n_positions),
    })
}

/// The attention's input projections: separate q, k and v, or Phi-3's one `qkv_proj`.
// one per layer: the variants' sizes do not matter
#[allow(clippy::large_enum_variant)]
enum QkvProj {
    Split {
        q: AdaptedLinear,
        k: AdaptedLinear,
        v: AdaptedLinear,
    },
    Fused(AdaptedLinear),
}

/// The MLP's input projections: separate gate and up, Phi-3's one `gate_up_proj`, or GPT-2's
/// ungated `c_fc`.
enum GateUpProj {
    Split {
        gate: AdaptedLinear,
        up: AdaptedLinear,
    },
    Fused(AdaptedLinear),
    Ungated(AdaptedLinear),
}

struct Layer {
    qkv: QkvProj,
    o: AdaptedLinear,
    gate_up: GateUpProj,
    down: AdaptedLinear,
    ln1: Tensor,
    ln2: Tensor,
    /// The per-head norms of queries and keys.
    qk_norm: Option<(Tensor, Tensor)>,
    /// Gemma's norms of the attention's and the MLP's outputs.
    post_norms: Option<(Tensor, Tensor)>,
    /// GPT-2: the biases of `ln1` and `ln2`, which are then LayerNorms.
    ln_bias: Option<(Tensor, Tensor)>,
}

/// RMSNorm with weight `w`, or LayerNorm with `w` and the bias `b` where there is one.
fn norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    match b {
        Some(b) => layer_norm(x, w, b, eps),
        None => rms_norm(x, w, eps),
    }
}

impl Layer {
    /// Every projection, in the order of the forward.
    fn projs(&self) -> Vec<&AdaptedLinear> {
        let mut v = match &self.qkv {
            QkvProj::Split { q, k, v } => vec![q, k, v],
            QkvProj::Fused(p) => vec![p],
        };
        v.push(&self.o);
        match &self.gate_up {
            GateUpProj::Split { gate, up } => v.extend([gate, up]),
            GateUpProj::Fused(p) | GateUpProj::Ungated(p) => v.push(p),
        }
        v.push(&self.down);
        v
    }

    fn projs_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut v = match &mut self.qkv {
            QkvProj::Split { q, k, v } => vec![q, k, v],
            QkvProj::Fused(p) => vec![p],
        };
        v.push(&mut self.o);
        match &mut self.gate_up {
            GateUpProj::Split { gate, up } => v.extend([gate, up]),
            GateUpProj::Fused(p) | GateUpProj::Ungated(p) => v.push(p),
        }
        v.push(&mut self.down);
        v
    }

    /// q, k, v (b, t, ·) of the normalised input, after the per-head norms and with the
    /// query scale applied.
    fn qkv(&self, hn: &Tensor, c: &LlamaConfig) -> Result<(Tensor, Tensor, Tensor)> {
        let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let (mut q, mut k, v) = match &self.qkv {
            QkvProj::Split { q, k, v } => (q.forward(hn)?, k.forward(hn)?, v.forward(hn)?),
            QkvProj::Fused(p) => {
                let y = p.forward(hn)?;
                (
                    y.narrow(2, 0, qd)?.contiguous()?,
                    y.narrow(2, qd, kvd)?.contiguous()?,
                    y.narrow(2, qd + kvd, kvd)?.contiguous()?,
                )
            }
        };
        if let Some((qn, kn)) = &self.qk_norm {
            q = head_norm(&q, qn, c.head_dim, c.eps)?;
            k = head_norm(&k, kn, c.head_dim, c.eps)?;
        }
        if c.query_scale != 1.0 {
            q = (q * c.query_scale)?;
        }
        Ok((q, k, v))
    }

    /// The rest of the layer from the attention's merged heads `a`: the output projection and
    /// its residual, then the MLP and its residual.
    fn finish(&self, x: &Tensor, a: &Tensor, c: &LlamaConfig) -> Result<Tensor> {
        let mut a = self.o.forward(a)?;
        if let Some((post_attn, _)) = &self.post_norms {
            a = rms_norm(&a, post_attn, c.eps)?;
        }
        let x = (x + a)?;
        let hn = norm(&x, &self.ln2, self.ln_bias.as_ref().map(|b| &b.1), c.eps)?;
        let ff = c.intermediate;
        let (g, u) = match &self.gate_up {
            GateUpProj::Split { gate, up } => (gate.forward(&hn)?, up.forward(&hn)?),
            GateUpProj::Fused(p) => {
                let y = p.forward(&hn)?;
                (
                    y.narrow(2, 0, ff)?.contiguous()?,
                    y.narrow(2, ff, ff)?.contiguous()?,
                )
            }
            GateUpProj::Ungated(p) => {
                let m = self.down.forward(&c.mlp_act.apply(&p.forward(&hn)?)?)?;
                return Ok((x + m)?);
            }
        };
        let f = match c.mlp_act {
            MlpAct::Silu => swiglu(&g, &u)?,
            act => (act.apply(&g)? * u)?,
        };
        let mut m = self.down.forward(&f)?;
        if let Some((_, post_ffn)) = &self.post_norms {
            m = rms_norm(&m, post_ffn, c.eps)?;
        }
        Ok((x + m)?)
    }

    /// q, k, v, o, gate, up, down of the plain layout; None for fused projections.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn split_projs(&self) -> Option<[&AdaptedLinear; 7]> {
        match (&self.qkv, &self.gate_up) {
            (QkvProj::Split { q, k, v }, GateUpProj::Split { gate, up }) => {
                Some([q, k, v, &self.o, gate, up, &self.down])
            }
            _ => None,
        }
    }
}

/// A norm weight (f32); Gemma's stored offsets w become the scale 1 + w.
fn norm_weight(
    w: &Weights,
    name: &str,
    size: usize,
    offset: bool,
    device: &Device,
) -> Result<Tensor> {
    let t = w.get_shaped(name, &[size], DType::F32, device)?;
    Ok(if offset { (t + 1.0)? } else { t })
}

/// RMSNorm of each head's slice of (b, t, n·head_dim) with one weight of the head's size.
fn head_norm(x: &Tensor, weight: &Tensor, head_dim: usize, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let rows = x.elem_count() / head_dim;
    Ok(rms_norm(&x.reshape((rows, head_dim))?, weight, eps)?.reshape(dims)?)
}

/// The RoPE tables of `n` positions from `start`: the model's, and Gemma 3's local ones.
struct LayerRopes<'a> {
    global: (Tensor, Tensor),
    local: Option<((Tensor, Tensor), &'a [bool])>,
}

impl<'a> LayerRopes<'a> {
    fn new(
        c: &'a LlamaConfig,
        start: usize,
        n: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let local = match &c.local_rope {
            Some((inv_freq, layers)) => Some((
                rope_tables_at(inv_freq, start, n, dtype, device)?,
                layers.as_slice(),
            )),
            None => None,
        };
        Ok(Self {
            global: rope_tables_at(&c.inv_freq, start, n, dtype, device)?,
            local,
        })
    }

    /// cos and sin of layer `i`.
    fn of_layer(&self, i: usize) -> (&Tensor, &Tensor) {
        match &self.local {
            Some((tables, layers)) if layers[i] => (&tables.0, &tables.1),
            _ => (&self.global.0, &self.global.1),
        }
    }
}

/// Keys and values (heads split, after RoPE) of the positions a decoder has run so far, one
/// pair (1, kv_heads, len, head_dim) per layer: generation then runs only each new token.
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// The positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a cached tensor still records the ops that made it. Never: with trainable
    /// adapters in the layers that record would keep every earlier step's graph and
    /// activations alive for as long as the generation runs.
    pub fn tracks_ops(&self) -> bool {
        self.kv
            .iter()
            .flatten()
            .any(|(k, v)| k.track_op() || v.track_op())
    }
}

/// The vocabulary projection (the module `lm_head`, stored as `head`): tied to the embedding
/// `embed` (stored as `embed_name`; a stored head must then equal it), the checkpoint's own,
/// or none.
#[allow(clippy::too_many_arguments)]
fn vocab_head(
    w: &Weights,
    cfg: &LlamaConfig,
    (embed, embed_name): (&Tensor, &str),
    head: &str,
    read: &mut BTreeSet<String>,
    dtype: DType,
    device: &Device,
) -> Result<VocabHead> {
    let h = cfg.hidden;
    let head_name = format!("{head}.weight");
    let mut take = |name: &str| read.insert(name.to_string());
    let has_head = w.contains(&head_name);
    Ok(if cfg.tie_embeddings {
        if has_head {
            // transformers ties the head to the embedding and so never reads this copy
            let head = w.get_shaped(&head_name, &[cfg.vocab, h], dtype, device)?;
            if (head - embed)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                != 0.0
            {
                return Err(Error::msg(format!(
                    "{}: config.json ties the vocabulary projection to the embedding \
                         (`tie_word_embeddings`), but the checkpoint's `{head_name}` differs \
                         from `{embed_name}`; set tie_word_embeddings to false to \
                         use the checkpoint's head",
                    w.source().display()
                )));
            }
            take(&head_name);
        }
        VocabHead::Tied
    } else if has_head {
        take(&head_name);
        VocabHead::Own(
            load_linear_as(w, head, (cfg.vocab, h), false, false, dtype, device)?
                .renamed("lm_head"),
        )
    } else {
        VocabHead::Missing
    })
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
    /// Gemma's embedding scale: √h rounded to the model's dtype, as transformers multiplies.
    embed_scale: Option<f64>,
    /// GPT-2: the final LayerNorm's bias.
    norm_bias: Option<Tensor>,
    /// GPT-2: the learned position embeddings (n_positions, h).
    positions: Option<Tensor>,
    /// Benchmarks of the frozen base: make the embedded input a leaf variable so the backward
    /// runs through every layer without any trainable parameter.
    pub grad_from_embeddings: bool,
    /// The CUDA fast path keeps no SwiGLU output and no attention probabilities and
    /// recomputes them in the backward (b·t·ff and, off the fused attention kernels, b·h·t²
    /// values less per layer; one more SwiGLU pass, and a QKᵀ GEMM and softmax).
    pub recompute: bool,
    /// The CUDA fast path keeps only each layer's input and runs the layer's forward again
    /// in the backward (activation checkpointing: the activations' memory of one layer
    /// instead of all, for about one more forward's time).
    pub checkpoint_layers: bool,
}

impl Llama {
    pub fn config(c: &ConfigReader) -> Result<LlamaConfig> {
        let model_type = c.str_or("model_type", "llama")?;
        if model_type == "gpt2" {
            return gpt2_config(c);
        }
        if model_type == "gemma3" {
            // Gemma3ForConditionalGeneration: the text model's settings in `text_config`
            let text = match c.get("text_config") {
                Some(v @ Value::Object(_)) => v,
                _ => {
                    return Err(Error::bad_field(
                        c.path,
                        "text_config",
                        "is missing: a multimodal Gemma 3 config.json keeps the language \
                         model's settings there",
                    ))
                }
            };
            let mut cfg = Llama::config(&ConfigReader {
                path: c.path,
                value: text,
            })
            .map_err(|e| Error::msg(format!("{e} (in `text_config`)")))?;
            if !cfg.gemma {
                return Err(Error::bad_field(
                    c.path,
                    "text_config.model_type",
                    "must be gemma3_text in a Gemma 3 config.json",
                ));
            }
            cfg.tie_embeddings = c.bool_or("tie_word_embeddings", cfg.tie_embeddings)?;
            return Ok(cfg);
        }
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
        let gemma = model_type == "gemma3_text";
        let head_dim_default = match model_type {
            "qwen3" => 128,
            "gemma3_text" => 256,
            _ => hidden / heads,
        };
        let head_dim = c.usize_or("head_dim", Some(head_dim_default))?;
        if head_dim % 2 != 0 {
            return Err(Error::bad_field(
                c.path,
                "head_dim",
                format!("RoPE needs an even head size, found {head_dim}"),
            ));
        }
        let mlp_act = if gemma {
            c.refuse_unless(
                "hidden_activation",
                |v| v.as_str() == Some("gelu_pytorch_tanh"),
                "Gemma 3's MLP is implemented with gelu_pytorch_tanh",
            )?;
            MlpAct::GeluTanh
        } else {
            c.refuse_unless(
                "hidden_act",
                |v| matches!(v.as_str(), Some("silu" | "swish")),
                "LLaMA-family MLPs are implemented with silu",
            )?;
            MlpAct::Silu
        };
        let layers = c.usize("num_hidden_layers")?;
        let max_positions = max_positions(c)?;
        // each class declares its own biases; transformers reads `attention_bias` and
        // `mlp_bias` for LLaMA only
        let (qkv_bias, o_bias, mlp_bias) = match model_type {
            "qwen2" => (true, false, false),
            "mistral" | "phi3" => (false, false, false),
            "qwen3" | "gemma3_text" => {
                let attn = c.bool_or("attention_bias", false)?;
                (attn, attn, false)
            }
            _ => {
                let attn = c.bool_or("attention_bias", false)?;
                (attn, attn, c.bool_or("mlp_bias", false)?)
            }
        };
        let (inv_freq, local_rope) = if gemma {
            let (global, local) = gemma_ropes(c, max_positions)?;
            let local_layers = gemma_layer_types(c, layers)?;
            (
                global.inv_freq(head_dim),
                Some((local.inv_freq(head_dim), local_layers)),
            )
        } else {
            (Rope::read(c, max_positions)?.inv_freq(head_dim), None)
        };
        let (query_scale, final_softcap) = if gemma {
            c.refuse_unless(
                "attn_logit_softcapping",
                |_| false,
                "attention logit soft-capping (Gemma 2's) is not implemented",
            )?;
            c.refuse_unless(
                "use_bidirectional_attention",
                |v| v.as_bool() == Some(false),
                "bidirectional attention is not implemented; decoders attend causally",
            )?;
            let scalar = c.f64_or("query_pre_attn_scalar", 256.0)?;
            if !(scalar.is_finite() && scalar > 0.0) {
                return Err(c.unsupported("query_pre_attn_scalar", "must be a positive number"));
            }
            let cap = c.f64_opt("final_logit_softcapping")?;
            if let Some(cap) = cap {
                if !(cap.is_finite() && cap > 0.0) {
                    return Err(
                        c.unsupported("final_logit_softcapping", "must be a positive number")
                    );
                }
            }
            ((head_dim as f64 / scalar).sqrt(), cap)
        } else {
            (1.0, None)
        };
        Ok(LlamaConfig {
            hidden,
            intermediate: c.usize("intermediate_size")?,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab: c.usize("vocab_size")?,
            eps: c.f64_or(
                "rms_norm_eps",
                if model_type == "phi3" { 1e-5 } else { 1e-6 },
            )?,
            tie_embeddings: c.bool_or("tie_word_embeddings", gemma)?,
            inv_freq,
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window: sliding_window(c, model_type, layers)?,
            local_rope,
            qk_norm: matches!(model_type, "qwen3" | "gemma3_text"),
            gemma,
            query_scale,
            final_softcap,
            mlp_act,
            fused_projections: model_type == "phi3",
            gpt2: false,
            learned_positions: None,
        })
    }

    pub fn load(w: &Weights, cfg: LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let h = cfg.hidden;
        let qd = cfg.heads * cfg.head_dim;
        let kvd = cfg.kv_heads * cfg.head_dim;
        if cfg.gpt2 {
            return Self::load_gpt2(w, cfg, dtype, device);
        }
        // Gemma 3's multimodal checkpoints keep the text model as `language_model.model.…`
        // (the vision tower beside it is not used); its modules are named as PEFT names them
        // on Gemma3ForConditionalGeneration, `model.language_model.…`
        let (stored, named) = if w.contains("language_model.model.embed_tokens.weight") {
            ("language_model.model.", "model.language_model.")
        } else {
            ("model.", "model.")
        };
        let mut read = BTreeSet::new();
        let mut take = |name: &str| read.insert(name.to_string());
        let embed_name = format!("{stored}embed_tokens.weight");
        let embed = w.get_shaped(&embed_name, &[cfg.vocab, h], dtype, device)?;
        take(&embed_name);
        let mut layers = vec![];
        for i in 0..cfg.layers {
            let p = |s: &str| format!("{stored}layers.{i}.{s}");
            let mut lin = |s: &str, o, inp, bias| {
                take(&p(&format!("{s}.weight")));
                if bias {
                    take(&p(&format!("{s}.bias")));
                }
                let l = load_linear(w, &p(s), o, inp, bias, dtype, device)?;
                Ok::<_, Error>(l.renamed(format!("{named}layers.{i}.{s}")))
            };
            let (qkv_b, ob, mb) = (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias);
            let ff = cfg.intermediate;
            let qkv = if cfg.fused_projections {
                QkvProj::Fused(lin("self_attn.qkv_proj", qd + 2 * kvd, h, qkv_b)?)
            } else {
                QkvProj::Split {
                    q: lin("self_attn.q_proj", qd, h, qkv_b)?,
                    k: lin("self_attn.k_proj", kvd, h, qkv_b)?,
                    v: lin("self_attn.v_proj", kvd, h, qkv_b)?,
                }
            };
            let o = lin("self_attn.o_proj", h, qd, ob)?;
            let gate_up = if cfg.fused_projections {
                GateUpProj::Fused(lin("mlp.gate_up_proj", 2 * ff, h, mb)?)
            } else {
                GateUpProj::Split {
                    gate: lin("mlp.gate_proj", ff, h, mb)?,
                    up: lin("mlp.up_proj", ff, h, mb)?,
                }
            };
            let down = lin("mlp.down_proj", h, ff, mb)?;
            let mut norm = |s: &str, size: usize| {
                take(&p(s));
                norm_weight(w, &p(s), size, cfg.gemma, device)
            };
            let ln1 = norm("input_layernorm.weight", h)?;
            let (ln2, post_norms) = if cfg.gemma {
                let post_attn = norm("post_attention_layernorm.weight", h)?;
                let ln2 = norm("pre_feedforward_layernorm.weight", h)?;
                let post_ffn = norm("post_feedforward_layernorm.weight", h)?;
                (ln2, Some((post_attn, post_ffn)))
            } else {
                (norm("post_attention_layernorm.weight", h)?, None)
            };
            let qk_norm = if cfg.qk_norm {
                let hd = cfg.head_dim;
                Some((
                    norm("self_attn.q_norm.weight", hd)?,
                    norm("self_attn.k_norm.weight", hd)?,
                ))
            } else {
                None
            };
            layers.push(Layer {
                qkv,
                o,
                gate_up,
                down,
                ln1,
                ln2,
                qk_norm,
                post_norms,
                ln_bias: None,
            });
        }
        let norm_name = format!("{stored}norm.weight");
        let norm = norm_weight(w, &norm_name, h, cfg.gemma, device)?;
        take(&norm_name);
        let lm_head = vocab_head(
            w,
            &cfg,
            (&embed, &embed_name),
            if stored == "model." {
                "lm_head"
            } else {
                "language_model.lm_head"
            },
            &mut read,
            dtype,
            device,
        )?;
        let owned = |n: &str| {
            n.starts_with(stored) || n.starts_with("lm_head.") || n.starts_with("language_model.")
        };
        // a non-persistent buffer that older checkpoints saved and transformers recomputes
        let owned = |n: &str| owned(n) && !n.ends_with(".rotary_emb.inv_freq");
        refuse_unread(w, &read, owned)?;
        let (lm_head, headless) = match lm_head {
            VocabHead::Own(l) => (Some(l), None),
            VocabHead::Tied => (None, None),
            VocabHead::Missing => (None, Some(w.source())),
        };
        let embed_scale = if cfg.gemma {
            let scale = Tensor::new(cfg.hidden as f64, &Device::Cpu)?
                .sqrt()?
                .to_dtype(dtype)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            Some(scale)
        } else {
            None
        };
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            headless,
            dtype,
            embed_scale,
            norm_bias: None,
            positions: None,
            grad_from_embeddings: false,
            recompute: false,
            checkpoint_layers: false,
        })
    }

    /// GPT-2 (`GPT2LMHeadModel`'s names, with or without its `transformer.` prefix; the
    /// modules are named with it, as PEFT names them).
    fn load_gpt2(w: &Weights, cfg: LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let (h, ff) = (cfg.hidden, cfg.intermediate);
        let prefix = if w.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let read = std::cell::RefCell::new(BTreeSet::new());
        let get = |name: &str, shape: &[usize], dt: DType| {
            let full = format!("{prefix}{name}");
            read.borrow_mut().insert(full.clone());
            w.get_shaped(&full, shape, dt, device)
        };
        let wte = get("wte.weight", &[cfg.vocab, h], dtype)?;
        let n_positions = cfg.learned_positions.unwrap_or_default();
        let wpe = get("wpe.weight", &[n_positions, h], dtype)?;
        let mut layers = vec![];
        for i in 0..cfg.layers {
            let p = |s: &str| format!("h.{i}.{s}");
            // Conv1D: (d_in, d_out) stored, (d_out, d_in) kept
            let conv = |s: &str, d_in: usize, d_out: usize| -> Result<AdaptedLinear> {
                let bias = get(&p(&format!("{s}.bias")), &[d_out], dtype)?;
                let name = format!("{prefix}{}", p(&format!("{s}.weight")));
                // a GGUF weight kept as stored is llama.cpp's (d_out, d_in) already
                let base = match super::kept_weight(w, &name, d_out, d_in)? {
                    Some(q) => {
                        read.borrow_mut().insert(name);
                        FrozenLinear::quantized(q, Some(bias), dtype, device)
                    }
                    None => {
                        let weight = get(&p(&format!("{s}.weight")), &[d_in, d_out], dtype)?;
                        FrozenLinear::new(weight.t()?.contiguous()?, Some(bias))
                    }
                };
                Ok(AdaptedLinear::new(format!("transformer.{}", p(s)), base))
            };
            let qkv = QkvProj::Fused(conv("attn.c_attn", h, 3 * h)?);
            let o = conv("attn.c_proj", h, h)?;
            let gate_up = GateUpProj::Ungated(conv("mlp.c_fc", h, ff)?);
            let down = conv("mlp.c_proj", ff, h)?;
            let ln = |s: &str| -> Result<(Tensor, Tensor)> {
                Ok((
                    get(&p(&format!("{s}.weight")), &[h], DType::F32)?,
                    get(&p(&format!("{s}.bias")), &[h], DType::F32)?,
                ))
            };
            let (ln1, b1) = ln("ln_1")?;
            let (ln2, b2) = ln("ln_2")?;
            layers.push(Layer {
                qkv,
                o,
                gate_up,
                down,
                ln1,
                ln2,
                qk_norm: None,
                post_norms: None,
                ln_bias: Some((b1, b2)),
            });
        }
        let norm = get("ln_f.weight", &[h], DType::F32)?;
        let norm_bias = get("ln_f.bias", &[h], DType::F32)?;
        let embed_name = format!("{prefix}wte.weight");
        let mut read = read.into_inner();
        let lm_head = vocab_head(
            w,
            &cfg,
            (&wte, &embed_name),
            "lm_head",
            &mut read,
            dtype,
            device,
        )?;
        let owned = |n: &str| {
            (n.starts_with(prefix) || n.starts_with("lm_head.")) && !is_gpt2_mask_buffer(n)
        };
        refuse_unread(w, &read, owned)?;
        let (lm_head, headless) = match lm_head {
            VocabHead::Own(l) => (Some(l), None),
            VocabHead::Tied => (None, None),
            VocabHead::Missing => (None, Some(w.source())),
        };
        Ok(Self {
            cfg,
            embed: wte,
            layers,
            norm,
            lm_head,
            headless,
            dtype,
            embed_scale: None,
            norm_bias: Some(norm_bias),
            positions: Some(wpe),
            grad_from_embeddings: false,
            recompute: false,
            checkpoint_layers: false,
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
        if let Some(n) = self.cfg.learned_positions {
            if t > n {
                return Err(Error::msg(format!(
                    "a sequence of {t} tokens is longer than this model's {n} learned positions \
                     (config.json's `n_positions`): use --max-length {n} or less"
                )));
            }
        }
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
        let mut v: Vec<_> = self.layers.iter().flat_map(Layer::projs).collect();
        v.extend(self.lm_head.iter());
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut v: Vec<_> = self.layers.iter_mut().flat_map(Layer::projs_mut).collect();
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
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
        if let Some(wpe) = &self.positions {
            // each example's positions from 0, packed or not; padding at 0
            let mut pos = vec![0u32; b * t];
            let rows: Vec<Vec<usize>> = match &batch.segments {
                Some(s) => s.clone(),
                None => vec![vec![t]; b],
            };
            for (r, row) in rows.iter().enumerate() {
                let mut at = r * t;
                for &len in row {
                    for (j, p) in pos[at..at + len].iter_mut().enumerate() {
                        *p = j as u32;
                    }
                    at += len;
                }
            }
            let pe = wpe.index_select(&Tensor::new(pos, x.device())?, 0)?;
            x = (x + pe.reshape((b, t, c.hidden))?)?;
        }
        if self.grad_from_embeddings {
            x = candle_core::Var::from_tensor(&x)?.as_tensor().clone();
        }
        // packed rows: attention on one example per row, positions restarting with each
        let segments = match &batch.segments {
            Some(s) => Some(Segments::new(s, t, x.device())?),
            None => None,
        };
        let (lens, rope_len) = match &segments {
            Some(s) => (s.lens().to_vec(), s.max_len()),
            None => (key_lens(&batch.mask)?, t),
        };
        // f32 tables on CUDA (the fused kernel's), the model's dtype on the CPU
        let table_dt = if x.device().is_cpu() {
            self.dtype
        } else {
            DType::F32
        };
        let ropes = LayerRopes::new(c, 0, rope_len, table_dt, x.device())?;
        for (i, l) in self.layers.iter().enumerate() {
            let hn = norm(&x, &l.ln1, l.ln_bias.as_ref().map(|b| &b.0), c.eps)?;
            let (q, k, v) = l.qkv(&hn, c)?;
            let (cos, sin) = ropes.of_layer(i);
            let attend = |q: &Tensor, k: &Tensor, v: &Tensor| {
                let dims = (c.heads, c.kv_heads);
                attention_block(q, k, v, (cos, sin), dims, &lens, true, fast)
            };
            let a = match &segments {
                None => attend(&q, &k, &v)?,
                Some(s) => s.pack(&attend(&s.unpack(&q)?, &s.unpack(&k)?, &s.unpack(&v)?)?)?,
            };
            x = l.finish(&x, &a, c)?;
        }
        self.final_norm(&x)
    }

    /// An empty cache of keys and values for [`Llama::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            kv: vec![None; self.layers.len()],
            len: 0,
        }
    }

    /// Runs the tokens `ids` that follow the `cache.len()` positions already in `cache` (the
    /// prompt first, then each new token), adds their keys and values to it and returns the
    /// last position's final hidden state (1, h), normalised. The same numbers as
    /// [`Llama::hidden_states`] on the whole sequence, without recomputing its prefix.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::msg("forward_cached: no tokens"));
        }
        if cache.kv.len() != self.layers.len() {
            return Err(Error::msg("forward_cached: a cache of another model"));
        }
        let (n, p0) = (ids.len(), cache.len);
        self.check_len(p0 + n)?;
        let c = &self.cfg;
        let device = self.embed.device();
        let mut x = self
            .embed
            .index_select(&Tensor::new(ids, device)?, 0)?
            .unsqueeze(0)?;
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
        if let Some(wpe) = &self.positions {
            x = x.broadcast_add(&wpe.narrow(0, p0, n)?.unsqueeze(0)?)?;
        }
        let table_dt = if device.is_cpu() {
            self.dtype
        } else {
            DType::F32
        };
        let ropes = LayerRopes::new(c, p0, n, table_dt, device)?;
        for (i, l) in self.layers.iter().enumerate() {
            let hn = norm(&x, &l.ln1, l.ln_bias.as_ref().map(|b| &b.0), c.eps)?;
            let (q, k, v) = l.qkv(&hn, c)?;
            let (cos, sin) = ropes.of_layer(i);
            let q = rope_split(&q, cos, sin, c.heads, true)?;
            let k = rope_split(&k, cos, sin, c.kv_heads, true)?;
            let v = rope_split(&v, cos, sin, c.kv_heads, false)?;
            let (k, v) = match cache.kv[i].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k.contiguous()?, v.contiguous()?),
            };
            // the n new queries see every cached key and, causally, each other
            let a = masked_attention(&q, &k, &v, &[p0 + n], true)?;
            // detached: with trainable adapters in the layers, a cached key would otherwise
            // hold the graph of every step before it (and all of their activations) alive
            cache.kv[i] = Some((k.detach(), v.detach()));
            let a = a.transpose(1, 2)?.reshape((1, n, c.heads * c.head_dim))?;
            x = l.finish(&x, &a, c)?;
        }
        cache.len = p0 + n;
        let last = x.narrow(1, n - 1, 1)?.reshape((1, c.hidden))?;
        self.final_norm(&last)
    }

    /// The final norm of the residual stream (b, t, h).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        norm(x, &self.norm, self.norm_bias.as_ref(), self.cfg.eps)
    }

    /// Vocabulary logits for hidden rows (n, h) → (n, vocab).
    pub fn lm_logits(&self, rows: &Tensor) -> Result<Tensor> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(rows)?,
            None if self.has_vocab_head() => frozen_matmul(rows, &self.embed)?,
            None => return Err(self.no_vocab_head()),
        };
        match self.cfg.final_softcap {
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
            None => Ok(logits),
        }
    }
}
