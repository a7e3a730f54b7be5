//! Evaluation passes: the mean loss, with accuracy, macro-F1 and the per-class table for
//! classification, or perplexity for SFT. Used by training (each evaluation and the best-model
//! choice) and by `singlora eval`.

use candle_core::Device;
use serde_json::{json, Value};

use crate::data::{self, Encoded, Task};
use crate::error::Result;
use crate::metrics::ClassificationMetrics;
use crate::model::TaskModel;

/// The results of an evaluation pass.
#[derive(Debug, Clone)]
pub struct EvalResult {
    pub loss: f64,
    pub metrics: Option<ClassificationMetrics>,
    pub perplexity: Option<f64>,
    pub n: usize,
    /// Classification: the predicted class of each item, in the items' order (empty for SFT).
    pub predictions: Vec<usize>,
}

impl EvalResult {
    pub fn to_json(&self, step: u64) -> Value {
        let mut v = json!({"step": step, "eval_loss": self.loss});
        if let Some(m) = &self.metrics {
            v["eval_accuracy"] = json!(m.accuracy);
            v["eval_f1_macro"] = json!(m.f1_macro);
        }
        if let Some(p) = self.perplexity {
            v["eval_perplexity"] = json!(p);
        }
        v
    }

    pub fn summary(&self) -> String {
        match (&self.metrics, self.perplexity) {
            (Some(m), _) => format!(
                "eval loss {:.4}, accuracy {:.2}%, macro-F1 {:.4} ({} examples)",
                self.loss,
                100.0 * m.accuracy,
                m.f1_macro,
                self.n
            ),
            (None, Some(p)) => format!(
                "eval loss {:.4}, perplexity {:.3} ({} tokens)",
                self.loss, p, self.n
            ),
            _ => format!("eval loss {:.4}", self.loss),
        }
    }
}

/// Evaluates `model` on encoded items (no gradient, u of the updates applied so far).
pub fn evaluate(
    model: &TaskModel,
    items: &[Encoded],
    batch_size: usize,
    pad_id: u32,
    n_labels: Option<usize>,
    device: &Device,
) -> Result<EvalResult> {
    let was = model.clock.is_training();
    model.clock.set_training(false);
    let lengths: Vec<usize> = items.iter().map(|e| e.ids.len()).collect();
    let mut nll = 0.0;
    let mut count = 0usize;
    let mut preds = vec![];
    let mut labels = vec![];
    // (item index, prediction): batches group items by length
    let mut by_item = vec![];
    for idx in data::epoch_batches(&lengths, batch_size, 0, 0, false) {
        let batch = data::collate(items, &idx, pad_id, device)?;
        let s = model.eval_batch(&batch)?;
        nll += s.nll_sum;
        count += s.count;
        by_item.extend(idx.iter().copied().zip(s.preds.iter().copied()));
        preds.extend(s.preds);
        labels.extend(s.labels);
    }
    by_item.sort_unstable();
    model.clock.set_training(was);
    let loss = nll / count.max(1) as f64;
    Ok(match (model.task, n_labels) {
        (Task::Classify, Some(n)) => EvalResult {
            loss,
            metrics: Some(ClassificationMetrics::compute(&preds, &labels, n)),
            perplexity: None,
            n: count,
            predictions: by_item.into_iter().map(|(_, p)| p).collect(),
        },
        _ => EvalResult {
            loss,
            metrics: None,
            perplexity: Some(crate::metrics::perplexity(loss)),
            n: count,
            predictions: vec![],
        },
    })
}
