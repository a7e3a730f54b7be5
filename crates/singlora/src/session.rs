//! A trained adapter on its base model, for `singlora eval` and `singlora predict`.
//!
//! The adapter directory (a run directory or `RUN_DIR/best`) says what it is: its method,
//! step and ramp, its head and labels (classification) or none (SFT); the forward uses
//! u(step), exactly as a merge of the same adapter would.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::adapter::file::AdapterFile;
use crate::data::{self, Columns, Encoded, LabelSet, Task};
use crate::error::{Error, Result};
use crate::eval::{evaluate, EvalResult};
use crate::model::{Pooling, Pretrained, TaskModel};
use crate::tokenize::{special_tokens, SpecialTokens};

pub struct Session {
    pub model: TaskModel,
    pub tokenizer: tokenizers::Tokenizer,
    pub labels: Option<LabelSet>,
    pub special: SpecialTokens,
    pub device: Device,
    pub adapter: AdapterFile,
    /// SFT: the model's chat template, applied to prompts as in training (None: raw prompts).
    pub chat: Option<crate::chat::ChatTemplate>,
}

/// A classification prediction.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    pub label: String,
    pub probabilities: Vec<(String, f32)>,
}

impl Session {
    /// Loads `model` with the adapter in `adapter` (a directory with adapter_config.json).
    pub fn load(model: &Path, adapter: &Path, device: Device) -> Result<Self> {
        let af = AdapterFile::read(adapter, &device)?;
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        let pre = Pretrained::load(model, dtype, &device)?;
        let task = match (&af.config.labels, af.config.task_type.as_deref()) {
            (Some(_), _) => Task::Classify,
            (None, Some("CAUSAL_LM")) | (None, None) => Task::Sft,
            (None, Some(t)) => {
                return Err(Error::msg(format!(
                "{}: task_type {t} without labels: singlora cannot tell what the adapter predicts",
                adapter.display()
            )))
            }
        };
        let labels = af.config.labels.clone().map(|names| LabelSet { names });
        let pooling = match &af.config.pooling {
            Some(p) => p.parse::<Pooling>()?,
            None => pre.default_pooling(),
        };
        let special = special_tokens(&pre.tokenizer, Some(&pre.config));
        let tokenizer = pre.tokenizer.clone();
        let chat = match task {
            Task::Sft => pre.chat_template()?,
            Task::Classify => None,
        };
        let n = labels.as_ref().map(|l| l.names.len());
        let mut tm = TaskModel::new(pre.body, task, n, pooling, 0, &device)?;
        tm.load_adapter(&af)?;
        Ok(Self {
            model: tm,
            tokenizer,
            labels,
            special,
            device,
            adapter: af,
            chat,
        })
    }

    /// Evaluates on a data file (its labels must be among the adapter's).
    pub fn eval_file(
        &self,
        path: &Path,
        columns: &Columns,
        max_length: usize,
        batch_size: usize,
        skip_bad_rows: bool,
    ) -> Result<EvalResult> {
        let ds = data::load_dataset(path, self.model.task, columns, skip_bad_rows)?;
        if let Some(l) = &self.labels {
            l.check(&ds)?;
        }
        let eos = (self.model.task == Task::Sft)
            .then_some(self.special.eos)
            .flatten();
        let items = data::encode_with(
            &self.tokenizer,
            &ds,
            self.labels.as_ref(),
            max_length,
            eos,
            self.chat.as_ref(),
        )?;
        evaluate(
            &self.model,
            &items,
            batch_size,
            self.special.pad,
            self.labels.as_ref().map(|l| l.names.len()),
            &self.device,
        )
    }

    /// Labels with probabilities for each text.
    pub fn classify(&self, texts: &[String], max_length: usize) -> Result<Vec<Prediction>> {
        let labels = self.labels.as_ref().ok_or_else(|| {
            Error::msg("this adapter has no labels: it was not trained for classification")
        })?;
        let mut tok = self.tokenizer.clone();
        tok.with_truncation(Some(tokenizers::TruncationParams {
            max_length,
            ..Default::default()
        }))
        .map_err(|e| Error::msg(format!("tokenizer: {e}")))?;
        let items: Vec<Encoded> = texts
            .iter()
            .map(|t| {
                let enc = tok
                    .encode(t.as_str(), true)
                    .map_err(|e| Error::msg(format!("cannot tokenize {t:?}: {e}")))?;
                Ok(Encoded {
                    ids: enc.get_ids().to_vec(),
                    type_ids: enc.get_type_ids().to_vec(),
                    label: None,
                    target_mask: vec![0; enc.get_ids().len()],
                })
            })
            .collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(texts.len());
        for chunk in (0..items.len()).collect::<Vec<_>>().chunks(16) {
            let batch = data::collate(&items, chunk, self.special.pad, &self.device)?;
            let s = self.model.eval_batch(&batch)?;
            for (p, probs) in s.preds.iter().zip(s.probs) {
                out.push(Prediction {
                    label: labels.names[*p].clone(),
                    probabilities: labels.names.iter().cloned().zip(probs).collect(),
                });
            }
        }
        Ok(out)
    }

    /// Greedy completion of `prompt`, stopping at the end-of-sequence token.
    pub fn generate(&self, prompt: &str, max_new_tokens: usize) -> Result<String> {
        let enc = match &self.chat {
            None => self.tokenizer.encode(prompt, true),
            Some(c) => self.tokenizer.encode(c.user_prompt(prompt)?, false),
        }
        .map_err(|e| Error::msg(format!("cannot tokenize the prompt: {e}")))?;
        let mut ids: Vec<u32> = enc.get_ids().to_vec();
        let start = ids.len();
        for _ in 0..max_new_tokens {
            let t = ids.len();
            let batch = data::Batch {
                indices: vec![0],
                ids: Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?,
                type_ids: Tensor::zeros((1, t), DType::U32, &self.device)?,
                mask: Tensor::ones((1, t), DType::F32, &self.device)?,
                labels: None,
                target_mask: None,
                n_tokens: t,
            };
            let next = self
                .model
                .next_token_logits(&batch)?
                .argmax(0)?
                .to_scalar::<u32>()?;
            if Some(next) == self.special.eos {
                break;
            }
            ids.push(next);
        }
        self.tokenizer
            .decode(&ids[start..], true)
            .map_err(|e| Error::msg(format!("cannot decode: {e}")))
    }
}
