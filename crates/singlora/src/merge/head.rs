//! A trained classification head in a merged checkpoint.
//!
//! transformers scores a `…ForSequenceClassification` checkpoint with its own pooling, so a
//! head goes into the checkpoint's architecture only where that pooling is the one the head
//! was trained with:
//!
//! - BERT (`model_type: bert`), `cls` pooling, a pooler in the base: BertForSequenceClassification,
//!   logits = W_c·tanh(W_p·h₀ + b_p) + b_c with h₀ the first token's last hidden state.
//! - LLaMA, Mistral, Qwen2, `last` pooling: the family's …ForSequenceClassification, which
//!   scores the rightmost token that is not `pad_token_id`. That is the last real token, as
//!   singlora pools, when config.json names the id singlora pads with, that id is a special
//!   token (no text encodes to it) and the tokenizer does not end a text with it.
//!
//! Any other head (the mean of the tokens, [CLS] without a pooler, the RoBERTa family, whose
//! classes score through a head of their own) stays out of the architecture: config.json keeps
//! the base's, and the head is written beside the weights in [`HEAD_FILE`], with [`HEAD_INFO`]
//! saying how to pool and which label each logit is. No file is written that transformers loads
//! as a classifier and then scores differently from singlora.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::adapter::config::AdapterConfig;
use crate::atomic::write_file;
use crate::checkpoint::write_safetensors;
use crate::error::{Error, Result};
use crate::model::{Family, Pooling};

/// The head's tensors when it is kept out of the checkpoint.
pub const HEAD_FILE: &str = "classifier_head.safetensors";
/// How to pool for the head in [`HEAD_FILE`], and its labels.
pub const HEAD_INFO: &str = "classifier_head.json";

/// Where a merge put a trained classification head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadPlacement {
    /// In the checkpoint, with config.json naming `architecture`, which scores as trained.
    Checkpoint { architecture: String },
    /// Beside the checkpoint in [`HEAD_FILE`] and [`HEAD_INFO`]; `reason` says why.
    Separate { pooling: Pooling, reason: String },
}

/// What placing a head needs to know about the base.
pub(crate) struct BaseFacts<'a> {
    pub config: &'a Value,
    /// The prefix of a BERT-family encoder's tensors, and whether it has a pooler.
    pub pooler: Option<String>,
    pub sentence_transformers: bool,
    pub tokenizer: Option<&'a Tokenizer>,
}

impl BaseFacts<'_> {
    fn model_type(&self) -> &str {
        self.config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// The head's pooling: the adapter's, else the default singlora trains and predicts with.
fn pooling(base: &BaseFacts, adapter: &AdapterConfig, family: Family) -> Result<Pooling> {
    match &adapter.pooling {
        Some(p) => p.parse(),
        None => Ok(Pooling::default_for(
            family,
            base.pooler.is_some(),
            base.sentence_transformers,
        )),
    }
}

/// Where the head goes, and for the checkpoint the config.json that makes transformers score
/// it as trained.
pub(crate) fn place(
    base: &BaseFacts,
    adapter: &AdapterConfig,
    labels: &[String],
    path: &Path,
) -> Result<(HeadPlacement, Option<Value>)> {
    let family = Family::detect(base.config, path)?;
    let pooling = pooling(base, adapter, family)?;
    let mt = base.model_type();
    let found = match (family, pooling) {
        (Family::Bert, Pooling::Cls) if mt != "bert" => Err(format!(
            "transformers' sequence classifier for model_type `{mt}` scores [CLS] through a head of its own (dense, tanh, out_proj), not through the pooler and one linear layer as this head was trained"
        )),
        (Family::Bert, Pooling::Cls) if base.pooler.is_none() => Err(
            "the base has no pooler: BertForSequenceClassification would score [CLS] through a pooler transformers initialises at random"
                .into(),
        ),
        (Family::Bert, Pooling::Cls) => Ok(("BertForSequenceClassification", None)),
        (Family::Llama | Family::Gpt2, Pooling::Last) => last_token_class(base).map(|(a, pad)| (a, Some(pad))),
        (_, Pooling::Mean) => Err(
            "transformers has no sequence-classification class that pools by the mean of the tokens (BertForSequenceClassification would score [CLS] through the pooler, a LLaMA-family one the last token)"
                .into(),
        ),
        (_, p) => Err(format!(
            "transformers has no sequence-classification class for model_type `{mt}` that pools by `{p}`"
        )),
    };
    Ok(match found {
        Ok((architecture, pad)) => {
            let mut config = classifier_config(base.config, labels, architecture);
            if let Some(pad) = pad {
                config["pad_token_id"] = json!(pad);
            }
            (
                HeadPlacement::Checkpoint {
                    architecture: architecture.into(),
                },
                Some(config),
            )
        }
        Err(reason) => (HeadPlacement::Separate { pooling, reason }, None),
    })
}

/// The LLaMA-family class that scores the last token that is not padding, and the pad id its
/// config.json must name; an error saying why transformers would score another token.
fn last_token_class(base: &BaseFacts) -> std::result::Result<(&'static str, u32), String> {
    let mt = base.model_type();
    let arch = match mt {
        "llama" => "LlamaForSequenceClassification",
        "gpt2" => "GPT2ForSequenceClassification",
        "mistral" => "MistralForSequenceClassification",
        "qwen2" => "Qwen2ForSequenceClassification",
        _ => {
            return Err(format!(
                "transformers has no sequence-classification class for model_type `{mt}`"
            ))
        }
    };
    let Some(tok) = base.tokenizer else {
        return Err(format!(
            "the base has no tokenizer to check that {arch}, which scores the last token that is not padding, finds the token singlora scores"
        ));
    };
    let pad = crate::tokenize::special_tokens(tok, Some(base.config)).pad;
    let name = tok.id_to_token(pad).unwrap_or_else(|| pad.to_string());
    let special = tok
        .get_added_tokens_decoder()
        .get(&pad)
        .is_some_and(|t| t.special);
    if !special {
        return Err(format!(
            "the pad id {pad} (`{name}`) is an ordinary token: {arch} would skip it as padding at the end of a text, where singlora scores it"
        ));
    }
    for input in [tokenizers::EncodeInput::from("a"), ("a", "b").into()] {
        let ends_with_pad = tok
            .encode(input, true)
            .map(|e| e.get_ids().last() == Some(&pad))
            .unwrap_or(false);
        if ends_with_pad {
            return Err(format!(
                "the tokenizer ends every text with `{name}`, which is also the pad id {pad}: {arch} would skip it as padding and score the token before"
            ));
        }
    }
    Ok((arch, pad))
}

/// config.json for a merged classifier: labels and the ForSequenceClassification class.
pub fn classifier_config(config: &Value, labels: &[String], architecture: &str) -> Value {
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
    c["architectures"] = json!([architecture]);
    c
}

/// Writes a head kept out of the checkpoint into `dir`: its tensors in [`HEAD_FILE`], and in
/// [`HEAD_INFO`] the pooling, the formula, the labels and why it is not in the checkpoint.
pub(crate) fn write_separate(
    dir: &Path,
    heads: &BTreeMap<String, Tensor>,
    labels: &[String],
    (pooling, reason): (Pooling, &str),
    pooler: Option<&str>,
) -> Result<()> {
    write_safetensors(&dir.join(HEAD_FILE), heads, None)?;
    let pooled = match (pooling, pooler) {
        (Pooling::Cls, Some(prefix)) => format!(
            "tanh({prefix}pooler.dense.weight · h[0] + {prefix}pooler.dense.bias), with h[0] the first token's last hidden state (the pooler is in the checkpoint)"
        ),
        (Pooling::Cls, None) => "h[0], the first token's last hidden state".into(),
        (Pooling::Mean, _) => {
            "the mean of the last hidden states over the tokens the attention mask keeps".into()
        }
        (Pooling::Last, _) => {
            "the last hidden state of the last token the attention mask keeps".into()
        }
    };
    let weight = heads
        .keys()
        .find(|k| k.ends_with(".weight"))
        .cloned()
        .unwrap_or_default();
    let bias = heads.keys().find(|k| k.ends_with(".bias"));
    let logits = match bias {
        Some(b) => format!("{weight} · pooled + {b}"),
        None => format!("{weight} · pooled"),
    };
    let info = json!({
        "pooling": pooling.to_string(),
        "pooled": pooled,
        "hidden_states": "last_hidden_state of the merged checkpoint loaded as its base model (transformers' AutoModel)",
        "logits": logits,
        "labels": labels,
        "weights": HEAD_FILE,
        "not_in_checkpoint": reason,
    });
    let text = serde_json::to_string_pretty(&info).expect("JSON values serialise") + "\n";
    write_file(&dir.join(HEAD_INFO), text.as_bytes())
}

/// Refuses to keep a head out of a base that already holds a head under its names: the
/// checkpoint would then load as the base's own classifier.
pub(crate) fn check_no_stale_head<'a>(
    mut base_names: impl Iterator<Item = &'a str>,
    heads: &BTreeMap<String, Tensor>,
    reason: &str,
) -> Result<()> {
    if let Some(n) = base_names.find(|n| heads.contains_key(*n)) {
        return Err(Error::msg(format!(
            "the base already holds a head tensor `{n}`, and the adapter's head cannot replace it in a form transformers scores as trained ({reason}); merge into the base model without its head"
        )));
    }
    Ok(())
}
