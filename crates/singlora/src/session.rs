//! A trained adapter on its base model, for `singlora eval` and `singlora predict`.
//!
//! The adapter directory (a run directory or `RUN_DIR/best`) says what it is: its method,
//! step and ramp, its head and labels (classification) or none (SFT); the forward uses
//! u(step), exactly as a merge of the same adapter would.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::adapter::file::AdapterFile;
use crate::data::{
    self, DataSettings, Dataset, EncodeOptions, Example, LabelSet, Record, RowReport, Task,
    Truncation,
};
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

    /// Evaluates on a data file (its labels must be among the adapter's), read and tokenized
    /// as `settings` say; also gives the rows left out or cut.
    pub fn eval_file(
        &self,
        path: &Path,
        settings: &DataSettings,
        batch_size: usize,
    ) -> Result<(EvalResult, RowReport)> {
        let ds = data::load_dataset(
            path,
            self.model.task,
            &settings.columns,
            settings.skip_bad_rows,
        )?;
        if let Some(l) = &self.labels {
            l.check(&ds)?;
        }
        let opts = EncodeOptions {
            max_length: settings.max_length,
            eos: self.special.eos.filter(|_| self.model.task == Task::Sft),
            chat: self.chat.as_ref().filter(|_| settings.chat_template),
            truncation: settings.truncation,
        };
        let rows = data::encode_with(&self.tokenizer, &ds, self.labels.as_ref(), &opts)?;
        let mut report = RowReport {
            max_length: settings.max_length,
            truncation: settings.truncation,
            ..Default::default()
        };
        report.add(&ds, &rows);
        let result = evaluate(
            &self.model,
            &rows.items,
            batch_size,
            self.special.pad,
            self.labels.as_ref().map(|l| l.names.len()),
            &self.device,
        )?;
        Ok((result, report))
    }

    /// Labels with probabilities for each text, cut to `max_length` tokens at the end
    /// `truncation` keeps (`drop` cuts as `right` does: every text gets a prediction).
    pub fn classify(
        &self,
        texts: &[String],
        max_length: usize,
        truncation: Truncation,
    ) -> Result<Vec<Prediction>> {
        let labels = self.labels.as_ref().ok_or_else(|| {
            Error::msg("this adapter has no labels: it was not trained for classification")
        })?;
        let ds = Dataset {
            path: "(texts to predict)".into(),
            records: texts
                .iter()
                .enumerate()
                .map(|(i, t)| Record {
                    line: i + 1,
                    // a placeholder label: the rows are only tokenized
                    example: Example::Classify {
                        text: t.clone(),
                        text_pair: None,
                        label: labels.names[0].clone(),
                    },
                })
                .collect(),
            skipped: vec![],
        };
        let opts = EncodeOptions {
            truncation: match truncation {
                Truncation::Drop => Truncation::Right,
                t => t,
            },
            ..EncodeOptions::new(max_length)
        };
        let mut items = data::encode_with(&self.tokenizer, &ds, Some(labels), &opts)?.items;
        for item in &mut items {
            item.label = None;
        }
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
