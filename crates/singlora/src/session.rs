//! A trained adapter on its base model, for `singlora eval` and `singlora predict`.
//!
//! The adapter directory (a run directory or `RUN_DIR/best`) says what it is: its method,
//! step and ramp, its head and labels (classification) or none (SFT); the forward uses
//! u(step), exactly as a merge of the same adapter would.

use std::path::Path;

use candle_core::{DType, Device};

use crate::adapter::file::AdapterFile;
use crate::data::{
    self, DataSettings, Dataset, EncodeOptions, Example, LabelSet, Record, RowReport, Task,
    Truncation,
};
use crate::error::{Error, Result};
use crate::eval::{evaluate, EvalResult};
use crate::generate::{pick, GenerateOptions, StopReason, StopScan};
use crate::model::{Pooling, Pretrained, TaskModel};
use crate::rng::rng_for;
use crate::tokenize::{special_tokens, SpecialTokens};

/// Tokens that end an assistant turn in the chat formats of common models (ChatML, Gemma,
/// LLaMA 3, Phi-3).
const END_OF_TURN: &[&str] = &["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"];

/// A generated completion.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Completion {
    pub text: String,
    /// Tokens generated (the ending token not counted).
    pub tokens: usize,
    pub stop_reason: StopReason,
}

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
        Self::load_as(model, adapter, device, crate::quant::BaseDtype::Auto)
    }

    /// [`Session::load`] with the base's linear weights kept as `base` says (NF4 for an
    /// adapter trained on an NF4 base, a GGUF file's own types for one trained with `same`:
    /// the model it was trained and evaluated on).
    pub fn load_as(
        model: &Path,
        adapter: &Path,
        device: Device,
        base: crate::quant::BaseDtype,
    ) -> Result<Self> {
        let af = AdapterFile::read(adapter, &device)?;
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        let mut pre = Pretrained::load_as(model, dtype, &device, base)?;
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
        // an adapter trained with a template of its own keeps it beside its files
        if let Some(t) = &af.chat_template {
            pre.chat_template = Some(t.clone());
        }
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
    /// Uses the chat template in `path` (a `--chat-template` file) instead of the adapter's or
    /// the model's; a classifier has none to replace.
    pub fn set_chat_template_file(&mut self, path: &Path) -> Result<()> {
        if self.labels.is_some() {
            return Ok(());
        }
        let src = crate::data::read_chat_template_file(path)?;
        let t = crate::chat::ChatTemplate::for_tokenizer(&src, &self.tokenizer, &self.special)
            .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        self.chat = Some(t);
        Ok(())
    }

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
        let opts = GenerateOptions {
            max_new_tokens,
            ..Default::default()
        };
        Ok(self.generate_with(None, prompt, &opts, &mut |_| {})?.text)
    }

    /// The ids that end a completion: end of sequence, and with a chat template the chat
    /// format's end-of-turn tokens the vocabulary has.
    fn end_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.special.eos.into_iter().collect();
        if self.chat.is_some() {
            for t in END_OF_TURN {
                if let Some(id) = self.tokenizer.token_to_id(t) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// Completes `prompt` (after a `system` turn, with a chat template), handing each new
    /// piece of text to `on_text` as it is decided (stop strings held back until they are
    /// ruled out). The model reruns over the whole sequence for every token.
    pub fn generate_with(
        &self,
        system: Option<&str>,
        prompt: &str,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Completion> {
        opts.check()?;
        let enc = match &self.chat {
            None => self.tokenizer.encode(prompt, true),
            Some(c) => self
                .tokenizer
                .encode(c.prompt_with_system(system, prompt)?, false),
        }
        .map_err(|e| Error::msg(format!("cannot tokenize the prompt: {e}")))?;
        let mut ids: Vec<u32> = enc.get_ids().to_vec();
        let start = ids.len();
        let ends = self.end_ids();
        let mut rng = rng_for(opts.seed, "generate");
        let mut scan = StopScan::new(&opts.stop);
        let decode = |ids: &[u32]| {
            self.tokenizer
                .decode(ids, true)
                .map_err(|e| Error::msg(format!("cannot decode: {e}")))
        };
        let mut reason = StopReason::Length;
        // the completion so far, decoded after every new token
        let mut text = String::new();
        // the prompt runs once; then each step runs only the token it picked
        let mut cache = self.model.new_cache()?;
        for _ in 0..opts.max_new_tokens {
            let logits = self
                .model
                .next_token_logits_cached(&ids[cache.len()..], &mut cache)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            let next = pick(&logits, opts, &mut rng);
            if ends.contains(&next) {
                reason = StopReason::EndOfText;
                break;
            }
            ids.push(next);
            text = decode(&ids[start..])?;
            if scan.stop_at(&text).is_some() {
                reason = StopReason::StopString;
                on_text(scan.release(&text, true));
                break;
            }
            on_text(scan.release(&text, false));
        }
        if let Some(at) = scan.stop_at(&text) {
            text.truncate(at);
        }
        if reason != StopReason::StopString {
            on_text(scan.release(&text, true));
        }
        Ok(Completion {
            text,
            tokens: ids.len() - start,
            stop_reason: reason,
        })
    }
}
