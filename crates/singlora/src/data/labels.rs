//! The label set of a classification run: the distinct labels of the training data in a fixed
//! order (numeric when every label is an integer, else lexicographic), so that class indices
//! do not depend on row order; and the check that an evaluation set uses no other labels.

use std::collections::BTreeSet;

use super::{Dataset, Example, MAX_LISTED};
use crate::error::{Error, Result};

/// Class names; a label's class index is its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSet {
    pub names: Vec<String>,
}

/// How many known labels an error message lists.
const MAX_KNOWN_LISTED: usize = 50;

impl LabelSet {
    /// The distinct labels of a training set, sorted numerically when all are integers and
    /// lexicographically otherwise. Fewer than two labels is an error.
    pub fn from_dataset(ds: &Dataset) -> Result<LabelSet> {
        let mut distinct = BTreeSet::new();
        for record in &ds.records {
            match &record.example {
                Example::Classify { label, .. } => {
                    distinct.insert(label.as_str());
                }
                Example::Sft { .. } | Example::Chat { .. } => {
                    return Err(Error::bad_file(
                        &ds.path,
                        "holds prompt/completion rows; labels need classification rows",
                    ))
                }
            }
        }
        let mut names: Vec<String> = distinct.into_iter().map(str::to_string).collect();
        sort_labels(&mut names);
        match names.len() {
            0 => Err(Error::bad_file(
                &ds.path,
                "no labels; classification needs at least 2 distinct labels",
            )),
            1 => Err(Error::bad_file(
                &ds.path,
                format!(
                    "only one label (`{}`) in the training data; classification needs at least 2 \
                     distinct labels",
                    names[0]
                ),
            )),
            _ => Ok(LabelSet { names }),
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The class index of a label.
    pub fn index(&self, label: &str) -> Option<usize> {
        self.names.iter().position(|n| n == label)
    }

    /// Refuses an evaluation set holding labels not seen in training, naming `FILE:LINE` of up
    /// to 20 such rows and the known labels.
    pub fn check(&self, eval: &Dataset) -> Result<()> {
        let known: std::collections::HashSet<&str> =
            self.names.iter().map(String::as_str).collect();
        let unknown: Vec<(usize, &str)> = eval
            .records
            .iter()
            .filter_map(|r| match &r.example {
                Example::Classify { label, .. } if !known.contains(label.as_str()) => {
                    Some((r.line, label.as_str()))
                }
                _ => None,
            })
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "{}: {} row{} with labels not seen in the training data:",
            eval.path.display(),
            unknown.len(),
            if unknown.len() == 1 { "" } else { "s" }
        );
        for (line, label) in unknown.iter().take(MAX_LISTED) {
            msg.push_str(&format!(
                "\n  {}:{line}: label `{label}`",
                eval.path.display()
            ));
        }
        if unknown.len() > MAX_LISTED {
            msg.push_str(&format!("\n  … and {} more", unknown.len() - MAX_LISTED));
        }
        msg.push_str(&format!("\nthe known labels are {}", self.describe()));
        Err(Error::msg(msg))
    }

    /// The labels as a list for messages (`a`, `b`, … and N more).
    pub fn describe(&self) -> String {
        let mut s: Vec<String> = self
            .names
            .iter()
            .take(MAX_KNOWN_LISTED)
            .map(|n| format!("`{n}`"))
            .collect();
        if self.names.len() > MAX_KNOWN_LISTED {
            s.push(format!(
                "… and {} more",
                self.names.len() - MAX_KNOWN_LISTED
            ));
        }
        s.join(", ")
    }
}

/// Numeric order when every label is an integer (ties between spellings such as `1` and `01`
/// broken by the string), else lexicographic.
fn sort_labels(names: &mut [String]) {
    let numbers: Option<Vec<i128>> = names.iter().map(|n| n.parse::<i128>().ok()).collect();
    match numbers {
        Some(_) => names.sort_by_key(|n| (n.parse::<i128>().unwrap_or_default(), n.clone())),
        None => names.sort(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load_dataset, Columns, Record, Task};
    use std::path::{Path, PathBuf};

    fn ds(path: &str, labels: &[&str]) -> Dataset {
        Dataset {
            path: PathBuf::from(path),
            records: labels
                .iter()
                .enumerate()
                .map(|(i, l)| Record {
                    line: i + 1,
                    example: Example::Classify {
                        text: format!("t{i}"),
                        text_pair: None,
                        label: l.to_string(),
                    },
                })
                .collect(),
            skipped: vec![],
        }
    }

    #[test]
    fn integer_labels_sort_numerically() {
        let set = LabelSet::from_dataset(&ds("t.jsonl", &["10", "2", "-1", "2", "0"])).unwrap();
        assert_eq!(set.names, vec!["-1", "0", "2", "10"]);
        assert_eq!(set.index("10"), Some(3));
        assert_eq!(set.index("3"), None);
        let set = LabelSet::from_dataset(&ds("t.jsonl", &["10", "2", "b"])).unwrap();
        assert_eq!(set.names, vec!["10", "2", "b"]);
    }

    #[test]
    fn integer_labels_from_json_and_csv_agree() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("a.jsonl");
        std::fs::write(
            &j,
            "{\"text\":\"a\",\"label\":10}\n{\"text\":\"b\",\"label\":9}\n{\"text\":\"c\",\"label\":\"9\"}\n",
        )
        .unwrap();
        let c = dir.path().join("a.csv");
        std::fs::write(&c, "text,label\na,10\nb, 9\n").unwrap();
        let load = |p: &Path| {
            LabelSet::from_dataset(
                &load_dataset(p, Task::Classify, &Columns::default(), false).unwrap(),
            )
            .unwrap()
        };
        assert_eq!(load(&j).names, vec!["9", "10"]);
        assert_eq!(load(&c), load(&j));
    }

    #[test]
    fn one_label_is_refused() {
        let err = LabelSet::from_dataset(&ds("train.csv", &["pos", "pos"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("train.csv: only one label (`pos`)"),
            "{err}"
        );
    }

    #[test]
    fn unseen_eval_labels_are_refused_with_lines() {
        let set = LabelSet::from_dataset(&ds("train.jsonl", &["neg", "pos"])).unwrap();
        set.check(&ds("eval.jsonl", &["pos", "neg", "pos"]))
            .unwrap();
        let err = set
            .check(&ds("eval.jsonl", &["pos", "neutral", "neg", "mixed"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("eval.jsonl: 2 rows with labels not seen"),
            "{err}"
        );
        assert!(err.contains("eval.jsonl:2: label `neutral`"), "{err}");
        assert!(err.contains("eval.jsonl:4: label `mixed`"), "{err}");
        assert!(err.contains("known labels are `neg`, `pos`"), "{err}");
        let many: Vec<String> = (0..30).map(|i| format!("x{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let err = set.check(&ds("e.jsonl", &many)).unwrap_err().to_string();
        assert!(err.contains("e.jsonl:20: label `x19`"), "{err}");
        assert!(!err.contains("e.jsonl:21:"), "{err}");
        assert!(err.contains("and 10 more"), "{err}");
    }
}
