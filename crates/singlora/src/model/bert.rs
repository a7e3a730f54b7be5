//! BERT-family encoders (BERT, RoBERTa, MiniLM layouts), written for training.
//!
//! x = LN(E_word[ids] + E_pos[pos] + E_type[type_ids]); per layer
//! a = LN(x + O·attn(Q·x, K·x, V·x)), x = LN(a + W_out·act(W_in·a)). Tensor names with or without
//! a `bert.` / `roberta.` prefix, and `LayerNorm.gamma/beta` as older checkpoints write them.
//! RoBERTa numbers positions from `pad_token_id + 1` over the real tokens.
//!
//! config.json is read as transformers 5 reads it, and every key that changes this math is
//! implemented or refused by name: absolute position embeddings only
//! (`position_embedding_type`), no causal mask (`is_decoder`), no embedding projection
//! (ELECTRA's `embedding_size` ≠ `hidden_size`), the activations of [`Activation::from_hf`];
//! the embedding tables must have the shapes `vocab_size`, `max_position_embeddings` and
//! `type_vocab_size` declare, and a tensor of the encoder that the config gives no place
//! (cross-attention, say) is refused rather than dropped. Heads of other tasks in the file
//! (`cls.*`, `lm_head.*`) are not the encoder's and are left alone, as `BertModel` does.
//!
//! Dropout (`hidden_dropout_prob`, `attention_probs_dropout_prob`) is a training-time
//! regulariser that singlora does not apply: the frozen base runs as in evaluation mode.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor};

pub(crate) mod fast;

use super::weights::{refuse_unread, ConfigReader, Weights};
use super::{load_linear, Batch};
use crate::adapter::AdaptedLinear;
use crate::error::{Error, Result};
use crate::ops::{heads_attention, key_lens, layer_norm, Activation};

#[derive(Debug, Clone)]
pub struct BertConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub act: Activation,
    pub eps: f64,
    pub max_positions: usize,
    pub roberta: bool,
    pub pad_token_id: usize,
    pub vocab: usize,
    pub type_vocab: usize,
}

struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    /// Loads `base`'s weight and bias, recording their names in `read`.
    fn load(
        w: &Weights,
        base: &str,
        hidden: usize,
        device: &Device,
        read: &mut BTreeSet<String>,
    ) -> Result<Self> {
        let (wn, bn) = if w.contains(&format!("{base}.weight")) {
            (format!("{base}.weight"), format!("{base}.bias"))
        } else {
            (format!("{base}.gamma"), format!("{base}.beta"))
        };
        read.extend([wn.clone(), bn.clone()]);
        Ok(Self {
            w: w.get_shaped(&wn, &[hidden], DType::F32, device)?,
            b: w.get_shaped(&bn, &[hidden], DType::F32, device)?,
        })
    }

    fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        layer_norm(x, &self.w, &self.b, eps)
    }
}

struct Layer {
    query: AdaptedLinear,
    key: AdaptedLinear,
    value: AdaptedLinear,
    attn_out: AdaptedLinear,
    attn_norm: Norm,
    inter: AdaptedLinear,
    out: AdaptedLinear,
    out_norm: Norm,
}

pub struct Bert {
    pub cfg: BertConfig,
    /// `""`, `"bert."` or `"roberta."`.
    pub prefix: String,
    word: Tensor,
    pos: Tensor,
    token_type: Option<Tensor>,
    emb_norm: Norm,
    layers: Vec<Layer>,
    pooler: Option<AdaptedLinear>,
    /// Buffers of the CPU encoder path, kept between training steps.
    fast_pool: fast::Pool,
}

/// The prefix of a BERT-family checkpoint's encoder tensors (none for a bare BertModel such as
/// MiniLM, `bert.` / `roberta.` / `model.` inside a task model), found by its word embeddings.
pub fn tensor_prefix(contains: impl Fn(&str) -> bool) -> Option<&'static str> {
    ["", "bert.", "roberta.", "model."]
        .into_iter()
        .find(|p| contains(&format!("{p}embeddings.word_embeddings.weight")))
}

impl Bert {
    pub fn config(c: &ConfigReader) -> Result<BertConfig> {
        let model_type = c.str_or("model_type", "bert")?;
        let roberta = matches!(model_type, "roberta" | "xlm-roberta" | "camembert");
        let act_name = c.str_or("hidden_act", "gelu")?;
        let act = Activation::from_hf(act_name).ok_or_else(|| {
            c.unsupported(
                "hidden_act",
                "gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, silu, swish and relu are implemented",
            )
        })?;
        c.refuse_unless(
            "position_embedding_type",
            |v| v.as_str() == Some("absolute"),
            "only absolute position embeddings are implemented",
        )?;
        c.refuse_unless(
            "is_decoder",
            |v| v.as_bool() == Some(false),
            "a BERT-family decoder (causal attention) is not implemented",
        )?;
        let hidden = c.usize("hidden_size")?;
        if model_type == "electra" && c.usize_or("embedding_size", Some(128))? != hidden {
            return Err(c.unsupported(
                "embedding_size",
                "ELECTRA's projection of the embeddings up to `hidden_size` is not implemented",
            ));
        }
        let cfg = BertConfig {
            hidden,
            layers: c.usize("num_hidden_layers")?,
            heads: c.usize("num_attention_heads")?,
            intermediate: c.usize("intermediate_size")?,
            act,
            eps: c.f64_or("layer_norm_eps", 1e-12)?,
            max_positions: c.usize_or("max_position_embeddings", Some(512))?,
            roberta,
            // RoBERTa's classes default to 1, BERT's to 0
            pad_token_id: c.usize_or("pad_token_id", Some(usize::from(roberta)))?,
            vocab: c.usize_or("vocab_size", Some(30522))?,
            type_vocab: c.usize_or("type_vocab_size", Some(2))?,
        };
        if cfg.heads == 0 || cfg.hidden % cfg.heads != 0 {
            return Err(Error::bad_field(
                c.path,
                "num_attention_heads",
                format!("{} does not divide hidden_size {}", cfg.heads, cfg.hidden),
            ));
        }
        Ok(cfg)
    }

    /// `dtype` is the dtype of the frozen linear weights (f32 on CPU; bf16 on GPU).
    pub fn load(w: &Weights, cfg: BertConfig, dtype: DType, device: &Device) -> Result<Self> {
        let prefix = tensor_prefix(|n| w.contains(n))
            .ok_or_else(|| {
                Error::msg(format!(
                    "{}: no `embeddings.word_embeddings.weight` (with or without a bert./roberta. prefix): not a BERT-family checkpoint",
                    w.source().display()
                ))
            })?
            .to_string();
        let h = cfg.hidden;
        let p = |s: &str| format!("{prefix}{s}");
        let mut read = BTreeSet::new();
        let table = |s: &str, rows: usize, read: &mut BTreeSet<String>| {
            read.insert(p(s));
            w.get_shaped(&p(s), &[rows, h], dtype, device)
        };
        let word = table("embeddings.word_embeddings.weight", cfg.vocab, &mut read)?;
        let pos = table(
            "embeddings.position_embeddings.weight",
            cfg.max_positions,
            &mut read,
        )?;
        let token_type = if w.contains(&p("embeddings.token_type_embeddings.weight")) {
            Some(table(
                "embeddings.token_type_embeddings.weight",
                cfg.type_vocab,
                &mut read,
            )?)
        } else {
            None
        };
        let emb_norm = Norm::load(w, &p("embeddings.LayerNorm"), h, device, &mut read)?;
        let lin = |name: String, o, inp, read: &mut BTreeSet<String>| {
            read.extend([format!("{name}.weight"), format!("{name}.bias")]);
            load_linear(w, &name, o, inp, true, dtype, device)
        };
        let mut layers = vec![];
        for i in 0..cfg.layers {
            let l = |s: &str| p(&format!("encoder.layer.{i}.{s}"));
            let r = &mut read;
            layers.push(Layer {
                query: lin(l("attention.self.query"), h, h, r)?,
                key: lin(l("attention.self.key"), h, h, r)?,
                value: lin(l("attention.self.value"), h, h, r)?,
                attn_out: lin(l("attention.output.dense"), h, h, r)?,
                attn_norm: Norm::load(w, &l("attention.output.LayerNorm"), h, device, r)?,
                inter: lin(l("intermediate.dense"), cfg.intermediate, h, r)?,
                out: lin(l("output.dense"), h, cfg.intermediate, r)?,
                out_norm: Norm::load(w, &l("output.LayerNorm"), h, device, r)?,
            });
        }
        let pooler = if w.contains(&p("pooler.dense.weight")) {
            Some(lin(p("pooler.dense"), h, h, &mut read)?)
        } else {
            None
        };
        // the encoder's own tensors; `position_ids` and `token_type_ids` are index buffers
        // that older checkpoints saved
        let owned = |n: &str| {
            n.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                ["embeddings.", "encoder.", "pooler."]
                    .iter()
                    .any(|s| rest.starts_with(s))
                    && !matches!(
                        rest,
                        "embeddings.position_ids" | "embeddings.token_type_ids"
                    )
            })
        };
        refuse_unread(w, &read, owned)?;
        Ok(Self {
            cfg,
            prefix,
            word,
            pos,
            token_type,
            emb_norm,
            layers,
            pooler,
            fast_pool: fast::Pool::default(),
        })
    }

    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        let mut v = vec![];
        for l in &self.layers {
            v.extend([&l.query, &l.key, &l.value, &l.attn_out, &l.inter, &l.out]);
        }
        v.extend(self.pooler.iter());
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut v = vec![];
        for l in &mut self.layers {
            v.extend([
                &mut l.query,
                &mut l.key,
                &mut l.value,
                &mut l.attn_out,
                &mut l.inter,
                &mut l.out,
            ]);
        }
        v.extend(self.pooler.iter_mut());
        v
    }

    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    fn position_ids(&self, batch: &Batch) -> Result<Tensor> {
        let (b, t) = batch.ids.dims2()?;
        let device = batch.ids.device();
        if self.cfg.roberta {
            // positions count real tokens from pad + 1; padding gets the pad position
            if self.cfg.pad_token_id + t >= self.cfg.max_positions {
                return Err(Error::msg(format!(
                    "sequence of {t} tokens needs RoBERTa positions up to {} (they start after \
                     pad_token_id {}), beyond max_position_embeddings {}",
                    self.cfg.pad_token_id + t,
                    self.cfg.pad_token_id,
                    self.cfg.max_positions
                )));
            }
            let mask = batch.mask.to_dtype(DType::F32)?;
            let csum = mask.cumsum(1)?;
            let pos = ((csum * &mask)? + self.cfg.pad_token_id as f64)?;
            return Ok(pos.to_dtype(DType::U32)?);
        }
        if t > self.cfg.max_positions {
            return Err(Error::msg(format!(
                "sequence of {t} tokens exceeds max_position_embeddings {}",
                self.cfg.max_positions
            )));
        }
        let row = Tensor::arange(0u32, t as u32, device)?;
        Ok(row.unsqueeze(0)?.broadcast_as((b, t))?.contiguous()?)
    }

    /// The embeddings after their LayerNorm, (b, t, h): frozen, so without a gradient.
    fn embed(&self, batch: &Batch) -> Result<Tensor> {
        let (b, t) = batch.ids.dims2()?;
        let h = self.cfg.hidden;
        let ids = batch.ids.flatten_all()?;
        let mut x = self.word.index_select(&ids, 0)?;
        let pos = self.position_ids(batch)?.flatten_all()?;
        x = (x + self.pos.index_select(&pos, 0)?)?;
        if let Some(tt) = &self.token_type {
            x = (x + tt.index_select(&batch.type_ids.flatten_all()?, 0)?)?;
        }
        self.emb_norm.forward(&x.reshape((b, t, h))?, self.cfg.eps)
    }

    /// Final hidden states (b, t, h) in the model dtype.
    pub fn hidden_states(&self, batch: &Batch) -> Result<Tensor> {
        let mut x = self.embed(batch)?;
        let lens = key_lens(&batch.mask)?;
        for l in &self.layers {
            let q = l.query.forward(&x)?;
            let k = l.key.forward(&x)?;
            let v = l.value.forward(&x)?;
            let a = heads_attention(&q, &k, &v, self.cfg.heads, &lens, false)?;
            let a = l.attn_out.forward(&a)?;
            let x1 = l.attn_norm.forward(&(a + &x)?, self.cfg.eps)?;
            let act = match self.cfg.act {
                Activation::GeluErf => l.inter.forward_gelu(&x1)?,
                other => other.apply(&l.inter.forward(&x1)?)?,
            };
            let f = l.out.forward(&act)?;
            x = l.out_norm.forward(&(f + x1)?, self.cfg.eps)?;
        }
        Ok(x)
    }

    /// BertForSequenceClassification's pooling: tanh(W·h_[CLS] + b) (raw [CLS] without a pooler).
    pub fn cls_pooled(&self, hidden: &Tensor) -> Result<Tensor> {
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        match &self.pooler {
            Some(p) => Ok(p.forward(&cls)?.tanh()?),
            None => Ok(cls),
        }
    }
}
