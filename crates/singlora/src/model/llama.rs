//! LLaMA-family decoders (LLaMA, Mistral, Qwen2, SmolLM2), written for training.
//!
//! Per layer: x += O·attn(RoPE(Q·n₁(x)), RoPE(K·n₁(x)), V·n₁(x)) with grouped-query attention
//! and a causal mask, then x += W_down·(silu(W_gate·n₂(x)) ⊙ W_up·n₂(x)), n = RMSNorm. RoPE in
//! Hugging Face's rotate-half layout with `rope_theta` and `rope_scaling` (linear, llama3) from
//! config.json; Qwen2's q/k/v biases when the checkpoint has them; tied or untied embeddings.

use candle_core::{DType, Device, Tensor};

use super::weights::{ConfigReader, Weights};
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
}

fn inv_freq(c: &ConfigReader, head_dim: usize) -> Result<Vec<f64>> {
    let theta = c.f64_or("rope_theta", 10000.0)?;
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
        .collect();
    let Some(scaling) = c.value.get("rope_scaling").filter(|v| !v.is_null()) else {
        return Ok(base);
    };
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let factor = scaling
        .get("factor")
        .and_then(|v| v.as_f64())
        .unwrap_or(1.0);
    match kind {
        "default" => Ok(base),
        "linear" => Ok(base.iter().map(|f| f / factor).collect()),
        "llama3" => {
            let get = |k: &str, d: f64| scaling.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
            let low = get("low_freq_factor", 1.0);
            let high = get("high_freq_factor", 4.0);
            let old_ctx = get("original_max_position_embeddings", 8192.0);
            let low_wavelen = old_ctx / low;
            let high_wavelen = old_ctx / high;
            Ok(base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect())
        }
        other => Err(Error::bad_field(
            c.path,
            "rope_scaling",
            format!("type `{other}` is not supported (default, linear and llama3 are)"),
        )),
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

pub struct Llama {
    pub cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// None when tied to the embedding.
    lm_head: Option<AdaptedLinear>,
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
        let hidden = c.usize("hidden_size")?;
        let heads = c.usize("num_attention_heads")?;
        let head_dim = c.usize_or("head_dim", Some(hidden / heads.max(1)))?;
        let act = c.str_or("hidden_act", "silu");
        if act != "silu" {
            return Err(Error::bad_field(
                c.path,
                "hidden_act",
                format!("`{act}` is not supported (silu is)"),
            ));
        }
        Ok(LlamaConfig {
            hidden,
            intermediate: c.usize("intermediate_size")?,
            layers: c.usize("num_hidden_layers")?,
            heads,
            kv_heads: c.usize_or("num_key_value_heads", Some(heads))?,
            head_dim,
            vocab: c.usize("vocab_size")?,
            eps: c.f64_or("rms_norm_eps", 1e-6)?,
            tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
            inv_freq: inv_freq(c, head_dim)?,
        })
    }

    pub fn load(w: &Weights, cfg: LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let h = cfg.hidden;
        let qd = cfg.heads * cfg.head_dim;
        let kvd = cfg.kv_heads * cfg.head_dim;
        let embed = w.get_shaped("model.embed_tokens.weight", &[cfg.vocab, h], dtype, device)?;
        let mut layers = vec![];
        for i in 0..cfg.layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let attn_bias = w.contains(&p("self_attn.q_proj.bias"));
            let lin = |s: &str, o, inp, bias| load_linear(w, &p(s), o, inp, bias, dtype, device);
            layers.push(Layer {
                q: lin("self_attn.q_proj", qd, h, attn_bias)?,
                k: lin("self_attn.k_proj", kvd, h, attn_bias)?,
                v: lin("self_attn.v_proj", kvd, h, attn_bias)?,
                o: lin("self_attn.o_proj", h, qd, false)?,
                gate: lin("mlp.gate_proj", cfg.intermediate, h, false)?,
                up: lin("mlp.up_proj", cfg.intermediate, h, false)?,
                down: lin("mlp.down_proj", h, cfg.intermediate, false)?,
                ln1: w.get_shaped(&p("input_layernorm.weight"), &[h], DType::F32, device)?,
                ln2: w.get_shaped(
                    &p("post_attention_layernorm.weight"),
                    &[h],
                    DType::F32,
                    device,
                )?,
            });
        }
        let norm = w.get_shaped("model.norm.weight", &[h], DType::F32, device)?;
        let lm_head = if w.contains("lm_head.weight") && !cfg.tie_embeddings {
            Some(load_linear(
                w, "lm_head", cfg.vocab, h, false, dtype, device,
            )?)
        } else {
            None
        };
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            dtype,
            grad_from_embeddings: false,
            recompute: false,
        })
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
            None => Ok(frozen_matmul(rows, &self.embed)?),
        }
    }
}
