//! Evaluation metrics and the training run's metrics log.
//!
//! [`ClassificationMetrics::compute`] follows scikit-learn's conventions: a ratio whose
//! denominator is zero (a class never predicted, a class absent from the labels) counts as 0
//! (`zero_division = 0`), F1 is 2·TP / (2·TP + FP + FN), and macro F1 is the unweighted mean over
//! all `n_classes` classes, present or not. [`ClassificationMetrics::render`] prints a per-class
//! table and the confusion matrix as plain text. [`MetricsLog`] writes `metrics.jsonl`, one
//! compact JSON object per line, flushed as it goes; on resume it keeps the lines up to the
//! checkpoint's step and drops the rest, so that a resumed run does not log a step twice.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, IoContext, Result};

/// Precision, recall and F1 of one class, and how many examples carry it as their label.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassReport {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

/// Accuracy, macro F1, per-class reports and the confusion matrix of a set of predictions.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassificationMetrics {
    pub accuracy: f64,
    pub f1_macro: f64,
    pub per_class: Vec<ClassReport>,
    /// `confusion[true][pred]`: how many examples of class `true` were predicted as `pred`.
    pub confusion: Vec<Vec<usize>>,
    /// The number of examples.
    pub n: usize,
}

/// `num / den`, or 0 where `den` is 0 (scikit-learn's `zero_division = 0`).
fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

impl ClassificationMetrics {
    /// Scores `preds` against `labels`, classes numbered `0..n_classes`.
    ///
    /// With no examples every figure is 0.
    ///
    /// # Panics
    /// If the slices differ in length or hold a class `>= n_classes`.
    pub fn compute(preds: &[usize], labels: &[usize], n_classes: usize) -> ClassificationMetrics {
        assert_eq!(
            preds.len(),
            labels.len(),
            "{} predictions for {} labels",
            preds.len(),
            labels.len()
        );
        let mut confusion = vec![vec![0usize; n_classes]; n_classes];
        for (&pred, &label) in preds.iter().zip(labels) {
            assert!(
                label < n_classes && pred < n_classes,
                "class out of range: label {label}, prediction {pred}, {n_classes} classes"
            );
            confusion[label][pred] += 1;
        }
        let n = labels.len();
        let correct: usize = (0..n_classes).map(|c| confusion[c][c]).sum();
        let per_class: Vec<ClassReport> = (0..n_classes)
            .map(|c| {
                let tp = confusion[c][c];
                let support: usize = confusion[c].iter().sum();
                let predicted: usize = confusion.iter().map(|row| row[c]).sum();
                ClassReport {
                    precision: ratio(tp, predicted),
                    recall: ratio(tp, support),
                    // 2·TP / (2·TP + FP + FN), with TP + FP = predicted and TP + FN = support.
                    f1: ratio(2 * tp, predicted + support),
                    support,
                }
            })
            .collect();
        let f1_macro = if n_classes == 0 {
            0.0
        } else {
            per_class.iter().map(|r| r.f1).sum::<f64>() / n_classes as f64
        };
        ClassificationMetrics {
            accuracy: ratio(correct, n),
            f1_macro,
            per_class,
            confusion,
            n,
        }
    }

    /// A plain-text report: per-class precision, recall, F1 and support with accuracy, macro and
    /// support-weighted averages, then the confusion matrix (rows: true class, columns:
    /// predicted class) with the class names on both axes.
    ///
    /// `label_names[i]` names class `i` (a missing name prints as `class i`). Long names are
    /// shortened with `…`, and a matrix wider than a terminal is printed in blocks of columns;
    /// classes are numbered on both axes so that shortened names stay unambiguous.
    pub fn render(&self, label_names: &[String]) -> String {
        let k = self.per_class.len();
        let names: Vec<String> = (0..k)
            .map(|i| match label_names.get(i) {
                Some(name) => clean_name(name),
                None => format!("class {i}"),
            })
            .collect();
        let mut out = String::new();
        self.render_table(&names, &mut out);
        out.push('\n');
        self.render_confusion(&names, &mut out);
        out
    }

    fn render_table(&self, names: &[String], out: &mut String) {
        const SUMMARY: [&str; 4] = ["class", "accuracy", "macro avg", "weighted avg"];
        let name_w = names
            .iter()
            .map(|s| char_len(s).min(MAX_TABLE_NAME))
            .chain(SUMMARY.iter().map(|s| s.len()))
            .max()
            .unwrap_or(0);
        let support_w = self.n.to_string().len().max("support".len());
        let _ = writeln!(
            out,
            "{:<name_w$}  {:>9}  {:>9}  {:>9}  {:>support_w$}",
            "class", "precision", "recall", "f1", "support"
        );
        let row = |out: &mut String, name: &str, p: f64, r: f64, f: f64, s: usize| {
            let _ = writeln!(
                out,
                "{:<name_w$}  {p:>9.4}  {r:>9.4}  {f:>9.4}  {s:>support_w$}",
                fit(name, name_w)
            );
        };
        for (name, rep) in names.iter().zip(&self.per_class) {
            row(out, name, rep.precision, rep.recall, rep.f1, rep.support);
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "{:<name_w$}  {:>9}  {:>9}  {:>9.4}  {:>support_w$}",
            "accuracy", "", "", self.accuracy, self.n
        );
        let k = self.per_class.len().max(1) as f64;
        let mean = |f: fn(&ClassReport) -> f64| self.per_class.iter().map(f).sum::<f64>() / k;
        row(
            out,
            "macro avg",
            mean(|r| r.precision),
            mean(|r| r.recall),
            self.f1_macro,
            self.n,
        );
        let weighted = |f: fn(&ClassReport) -> f64| {
            let total: usize = self.per_class.iter().map(|r| r.support).sum();
            if total == 0 {
                0.0
            } else {
                self.per_class
                    .iter()
                    .map(|r| f(r) * r.support as f64)
                    .sum::<f64>()
                    / total as f64
            }
        };
        row(
            out,
            "weighted avg",
            weighted(|r| r.precision),
            weighted(|r| r.recall),
            weighted(|r| r.f1),
            self.n,
        );
    }

    fn render_confusion(&self, names: &[String], out: &mut String) {
        let k = names.len();
        let _ = writeln!(
            out,
            "confusion matrix (rows: true class, columns: predicted class)"
        );
        if k == 0 {
            let _ = writeln!(out, "(no classes)");
            return;
        }
        let max_count = self.confusion.iter().flatten().copied().max().unwrap_or(0);
        let idx_w = (k - 1).to_string().len();
        let longest = names.iter().map(|s| char_len(s)).max().unwrap_or(0);
        // Row labels: "index name", the name shortened to MAX_ROW_NAME.
        let row_name_w = longest.min(MAX_ROW_NAME);
        let row_w = idx_w + 1 + row_name_w;
        // Columns: wide enough for every count and the index, names shortened to fit.
        let col_w = max_count
            .to_string()
            .len()
            .max(idx_w)
            .max(longest.min(MAX_COL_NAME));
        let per_block = ((MAX_LINE.saturating_sub(row_w)) / (col_w + 2)).max(1);
        let blocks = k.div_ceil(per_block);
        for b in 0..blocks {
            let cols = b * per_block..((b + 1) * per_block).min(k);
            if blocks > 1 {
                let _ = writeln!(
                    out,
                    "{}predicted classes {}–{} of {k}:",
                    if b > 0 { "\n" } else { "" },
                    cols.start,
                    cols.end - 1
                );
            }
            let mut idx_line = format!("{:row_w$}", "");
            let mut name_line = format!("{:row_w$}", "");
            for c in cols.clone() {
                let _ = write!(idx_line, "  {c:>col_w$}");
                let _ = write!(name_line, "  {:>col_w$}", fit(&names[c], col_w));
            }
            let _ = writeln!(out, "{}", idx_line.trim_end());
            let _ = writeln!(out, "{}", name_line.trim_end());
            for (t, name) in names.iter().enumerate() {
                let _ = write!(out, "{t:>idx_w$} {:<row_name_w$}", fit(name, row_name_w));
                for c in cols.clone() {
                    let _ = write!(out, "  {:>col_w$}", self.confusion[t][c]);
                }
                out.push('\n');
            }
        }
    }
}

/// Widest a class name is printed in the per-class table, the matrix's rows and its columns.
const MAX_TABLE_NAME: usize = 40;
const MAX_ROW_NAME: usize = 28;
const MAX_COL_NAME: usize = 10;
/// The confusion matrix wraps its columns to stay within this many characters a line.
const MAX_LINE: usize = 120;

fn char_len(s: &str) -> usize {
    s.chars().count()
}

/// A name with its control characters (a newline would break the table) made visible.
fn clean_name(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.is_empty() {
        "\"\"".into()
    } else {
        s
    }
}

/// `s` cut to at most `w` characters, ending in `…` where it was cut.
fn fit(s: &str, w: usize) -> String {
    if char_len(s) <= w {
        s.to_string()
    } else if w == 0 {
        String::new()
    } else {
        let mut cut: String = s.chars().take(w - 1).collect();
        cut.push('…');
        cut
    }
}

/// Perplexity from the mean negative log-likelihood per token (natural log): exp(mean NLL).
pub fn perplexity(mean_nll: f64) -> f64 {
    mean_nll.exp()
}

/// An open `metrics.jsonl`: one compact JSON object per line, each flushed when written.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Starts a new log at `path`, replacing any file there (its parent directory is created).
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).at(parent)?;
        }
        let file = File::create(path).at(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Continues the log at `path` (creating it where there is none), for a resumed run.
    ///
    /// With `keep_up_to_step = Some(s)` the lines whose `step` is greater than `s` are dropped
    /// first: they were logged after the checkpoint the run resumes from and will be logged
    /// again. Lines without a `step` are kept. A last line cut short by a crash (no newline and
    /// not valid JSON) is dropped; any other malformed line is an error naming FILE:LINE.
    pub fn append_to(path: &Path, keep_up_to_step: Option<u64>) -> Result<Self> {
        if !path.exists() {
            return Self::create(path);
        }
        let text = std::fs::read_to_string(path).at(path)?;
        let lines = parse_lines(path, &text)?;
        let kept: Vec<&str> = lines
            .iter()
            .filter(|(_, value)| match (keep_up_to_step, step_of(value)) {
                (Some(limit), Some(step)) => step <= limit as f64,
                _ => true,
            })
            .map(|(raw, _)| *raw)
            .collect();
        let clean = kept.len() == text.lines().count() && (text.is_empty() || text.ends_with('\n'));
        if !clean {
            let mut rewritten = String::with_capacity(text.len());
            for line in &kept {
                rewritten.push_str(line);
                rewritten.push('\n');
            }
            crate::atomic::write_file(path, rewritten.as_bytes())?;
        }
        let file = OpenOptions::new().append(true).open(path).at(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends `line`, which must be a JSON object, as one compact line, and flushes it.
    pub fn write(&mut self, line: &Value) -> Result<()> {
        if !line.is_object() {
            return Err(Error::msg(format!(
                "{}: a metrics line must be a JSON object, not {line}",
                self.path.display()
            )));
        }
        let mut text = serde_json::to_string(line)
            .map_err(|e| Error::bad_file(&self.path, format!("cannot serialise a line: {e}")))?;
        text.push('\n');
        self.file.write_all(text.as_bytes()).at(&self.path)?;
        self.file.flush().at(&self.path)
    }

    /// Where the log is written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The objects of a `metrics.jsonl`, in order. Blank lines are skipped, and so is a last line
/// without its newline that does not parse (a write in progress or cut short by a crash); any
/// other line that is not a JSON object is an error naming FILE:LINE.
pub fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).at(path)?;
    Ok(parse_lines(path, &text)?
        .into_iter()
        .map(|(_, value)| value)
        .collect())
}

/// The non-blank lines of a log with their parsed objects.
fn parse_lines<'a>(path: &Path, text: &'a str) -> Result<Vec<(&'a str, Value)>> {
    let n_lines = text.lines().count();
    let unterminated = !text.is_empty() && !text.ends_with('\n');
    let mut out = Vec::with_capacity(n_lines);
    for (i, raw) in text.lines().enumerate() {
        let raw = raw.trim_end_matches('\r');
        if raw.trim().is_empty() {
            continue;
        }
        let at_line = || PathBuf::from(format!("{}:{}", path.display(), i + 1));
        match serde_json::from_str::<Value>(raw) {
            Ok(value) if value.is_object() => out.push((raw, value)),
            Ok(_) => return Err(Error::bad_file(at_line(), "not a JSON object")),
            Err(_) if unterminated && i + 1 == n_lines => {}
            Err(e) => return Err(Error::bad_file(at_line(), format!("invalid JSON: {e}"))),
        }
    }
    Ok(out)
}

/// A line's `step`, where it has a numeric one.
fn step_of(value: &Value) -> Option<f64> {
    value.get("step").and_then(Value::as_f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// labels 0 0 0 0 1 1 1 2 2 2, preds 0 0 1 2 1 1 0 2 2 1:
    /// confusion [[2,1,1],[1,2,0],[0,1,2]]; predicted per class 3, 4, 3; support 4, 3, 3.
    fn three_class() -> ClassificationMetrics {
        let labels = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2];
        let preds = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1];
        ClassificationMetrics::compute(&preds, &labels, 3)
    }

    #[test]
    fn three_class_by_hand() {
        let m = three_class();
        assert_eq!(m.n, 10);
        assert_eq!(
            m.confusion,
            vec![vec![2, 1, 1], vec![1, 2, 0], vec![0, 1, 2]]
        );
        assert!(close(m.accuracy, 0.6));
        let expect = [
            // class 0: TP 2 of 3 predicted, 4 present; F1 = 4 / (4 + 1 + 2)
            (2.0 / 3.0, 0.5, 4.0 / 7.0, 4),
            // class 1: TP 2 of 4 predicted, 3 present; F1 = 4 / (4 + 2 + 1)
            (0.5, 2.0 / 3.0, 4.0 / 7.0, 3),
            // class 2: TP 2 of 3 predicted, 3 present
            (2.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 3),
        ];
        for (rep, (p, r, f, s)) in m.per_class.iter().zip(expect) {
            assert!(close(rep.precision, p), "{rep:?}");
            assert!(close(rep.recall, r), "{rep:?}");
            assert!(close(rep.f1, f), "{rep:?}");
            assert_eq!(rep.support, s);
        }
        // (4/7 + 4/7 + 2/3) / 3 = 38/63
        assert!(close(m.f1_macro, 38.0 / 63.0));
    }

    #[test]
    fn zero_division_counts_as_zero() {
        // Class 2 is neither present nor predicted: P = R = F1 = 0, and it still counts in the
        // macro mean.
        let m = ClassificationMetrics::compute(&[0, 1, 1, 1], &[0, 0, 1, 1], 3);
        let r2 = m.per_class[2];
        assert_eq!(
            (r2.precision, r2.recall, r2.f1, r2.support),
            (0.0, 0.0, 0.0, 0)
        );
        assert!(close(m.per_class[0].precision, 1.0));
        assert!(close(m.per_class[0].recall, 0.5));
        assert!(close(m.per_class[0].f1, 2.0 / 3.0));
        assert!(close(m.per_class[1].precision, 2.0 / 3.0));
        assert!(close(m.per_class[1].recall, 1.0));
        assert!(close(m.per_class[1].f1, 0.8));
        assert!(close(m.f1_macro, (2.0 / 3.0 + 0.8) / 3.0));

        // Class 1 is predicted once but never present: precision 0/1, recall 0/0.
        let m = ClassificationMetrics::compute(&[0, 1], &[0, 0], 2);
        let r1 = m.per_class[1];
        assert_eq!(
            (r1.precision, r1.recall, r1.f1, r1.support),
            (0.0, 0.0, 0.0, 0)
        );
        assert!(close(m.f1_macro, 1.0 / 3.0));
        assert!(close(m.accuracy, 0.5));

        // No examples at all.
        let m = ClassificationMetrics::compute(&[], &[], 2);
        assert_eq!((m.accuracy, m.f1_macro, m.n), (0.0, 0.0, 0));
    }

    #[test]
    fn perfect_predictions() {
        let labels = [0, 1, 2, 3, 3, 2, 1, 0];
        let m = ClassificationMetrics::compute(&labels, &labels, 4);
        assert_eq!(m.accuracy, 1.0);
        assert_eq!(m.f1_macro, 1.0);
        for (c, rep) in m.per_class.iter().enumerate() {
            assert_eq!(
                (rep.precision, rep.recall, rep.f1, rep.support),
                (1.0, 1.0, 1.0, 2)
            );
            assert_eq!(m.confusion[c][c], 2);
            assert_eq!(m.confusion[c].iter().sum::<usize>(), 2);
        }
    }

    #[test]
    #[should_panic(expected = "class out of range")]
    fn out_of_range_class_panics() {
        ClassificationMetrics::compute(&[0, 3], &[0, 1], 3);
    }

    #[test]
    fn perplexity_is_exp_nll() {
        assert_eq!(perplexity(0.0), 1.0);
        assert!(close(perplexity(2.0f64.ln()), 2.0));
    }

    #[test]
    fn render_shows_names_and_counts() {
        let m = three_class();
        let names: Vec<String> = ["negative", "neutral", "positive"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let text = m.render(&names);
        for name in &names {
            assert!(text.matches(name.as_str()).count() >= 3, "{text}");
        }
        assert!(text.contains("0.6000"), "{text}"); // accuracy
        assert!(text.contains("0.6032"), "{text}"); // macro F1 38/63
        assert!(text.contains("0.5714"), "{text}"); // F1 of classes 0 and 1
        let lines: Vec<&str> = text.lines().collect();
        let row = |name: &str| {
            let line = lines
                .iter()
                .rev()
                .find(|l| l.contains(name))
                .expect("matrix row");
            line.split_whitespace()
                .skip(2)
                .map(|v| v.parse::<usize>().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(row("negative"), vec![2, 1, 1]);
        assert_eq!(row("neutral"), vec![1, 2, 0]);
        assert_eq!(row("positive"), vec![0, 1, 2]);
        // The matrix's columns line up: every row as long as the header.
        let start = lines
            .iter()
            .position(|l| l.starts_with("confusion"))
            .unwrap();
        let widths: Vec<usize> = lines[start + 1..].iter().map(|l| char_len(l)).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{text}");
    }

    #[test]
    fn render_stays_readable_with_long_names_and_many_classes() {
        let k = 40;
        let labels: Vec<usize> = (0..k * 3).map(|i| i % k).collect();
        let preds: Vec<usize> = (0..k * 3).map(|i| (i * 7) % k).collect();
        let m = ClassificationMetrics::compute(&preds, &labels, k);
        let names: Vec<String> = (0..k)
            .map(|i| format!("a very long label name number {i} that goes on\nand on"))
            .collect();
        let text = m.render(&names[..k - 1]); // the last name is missing
        assert!(text.lines().all(|l| char_len(l) <= MAX_LINE), "{text}");
        assert!(text.contains("class 39"), "{text}");
        assert!(text.contains("predicted classes 0–"), "{text}");
        assert!(text.contains('…'));
        assert!(!text.contains("\nand on"));
    }

    #[test]
    fn log_round_trip_and_resume() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("metrics.jsonl");
        let mut log = MetricsLog::create(&path)?;
        log.write(&json!({"config": "x"}))?;
        for step in 1..=5u64 {
            log.write(&json!({"step": step, "loss": 1.0 / step as f64}))?;
        }
        log.write(&json!({"step": 4, "eval_loss": 0.3}))?;
        assert!(log.write(&json!([1, 2])).is_err());
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 7);
        assert!(
            text.lines().all(|l| !l.contains(": ")),
            "not compact: {text}"
        );
        assert_eq!(read_metrics(&path)?.len(), 7);

        // Resume from step 3: steps 4 and 5 (and the eval at 4) go, the config line stays.
        let mut log = MetricsLog::append_to(&path, Some(3))?;
        log.write(&json!({"step": 4, "loss": 0.2}))?;
        drop(log);
        let lines = read_metrics(&path)?;
        let steps: Vec<Option<u64>> = lines.iter().map(|v| v["step"].as_u64()).collect();
        assert_eq!(steps, vec![None, Some(1), Some(2), Some(3), Some(4)]);
        assert_eq!(lines[4]["loss"], json!(0.2));

        // Without a step limit everything is kept.
        let mut log = MetricsLog::append_to(&path, None)?;
        log.write(&json!({"step": 5, "loss": 0.1}))?;
        drop(log);
        assert_eq!(read_metrics(&path)?.len(), 6);

        // create truncates.
        let mut log = MetricsLog::create(&path)?;
        log.write(&json!({"step": 1, "loss": 2.0}))?;
        drop(log);
        assert_eq!(read_metrics(&path)?.len(), 1);

        // append_to on a missing file starts one.
        let fresh = dir.path().join("fresh.jsonl");
        MetricsLog::append_to(&fresh, Some(10))?.write(&json!({"step": 1}))?;
        assert_eq!(read_metrics(&fresh)?.len(), 1);
        Ok(())
    }

    #[test]
    fn torn_last_line_and_bad_lines() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1,\"loss\":1.0}\n\n{\"step\":2,\"lo").unwrap();
        assert_eq!(read_metrics(&path)?.len(), 1);
        let mut log = MetricsLog::append_to(&path, Some(10))?;
        log.write(&json!({"step": 2, "loss": 0.5}))?;
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"step\":1,\"loss\":1.0}\n{\"step\":2,\"loss\":0.5}\n"
        );

        std::fs::write(&path, "{\"step\":1}\nnot json\n{\"step\":2}\n").unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{}:2:", path.display())),
            "error does not name FILE:LINE: {err}"
        );
        assert!(MetricsLog::append_to(&path, Some(1)).is_err());

        std::fs::write(&path, "{\"step\":1}\n[1]\n").unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(err.contains(":2: not a JSON object"), "{err}");
        Ok(())
    }
}
