//! Training data for sequence classification and supervised fine-tuning (SFT): loading JSONL,
//! CSV and TSV files into [`Dataset`]s with every bad row reported as `FILE:LINE: reason`,
//! label sets, train/eval splits, tokenisation with truncation ([`encode`], [`Truncation`]),
//! length-bucketed batch schedules that are a pure function of (seed, epoch)
//! ([`epoch_batches`]), and dynamically padded batches ([`collate`]). [`DataSettings`] are the
//! settings `train`, `eval` and `predict` share.

mod batch;
mod encode;
mod labels;
mod rows;
mod split;
mod truncate;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

pub use batch::{collate, collate_rows, epoch_batches, pack_rows, Batch};
pub use encode::{encode, encode_with, EncodeOptions, Encoded, EncodedRows};
pub use labels::LabelSet;
pub use rows::{load_dataset, load_dataset_bytes};
pub use split::{split_every_nth, split_fraction};
pub use truncate::Truncation;

/// What the data trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Sequence classification: text (and optionally a second text) → label.
    Classify,
    /// Supervised fine-tuning of a causal LM: prompt → completion.
    Sft,
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Task::Classify => "classify",
            Task::Sft => "sft",
        })
    }
}

impl FromStr for Task {
    type Err = Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "classify" | "classification" => Ok(Task::Classify),
            "sft" => Ok(Task::Sft),
            _ => Err(Error::msg(format!(
                "unknown task `{s}`: expected classify or sft"
            ))),
        }
    }
}

crate::serde_via_str!(Task);

/// The names of the CSV columns / JSON fields that hold each part of an example (the
/// `--text-column` … flags; `text_column` … in `run.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::Args)]
#[serde(default)]
pub struct Columns {
    /// The column (JSONL field, CSV header) holding the text to classify.
    #[arg(long = "text-column", id = "text_column", default_value = "text")]
    #[serde(rename = "text_column")]
    pub text: String,
    /// The second text of a pair. `None`: a `text_pair` column / field is used where present.
    /// `Some(name)`: every row must have it.
    #[arg(long = "text-pair-column", id = "text_pair_column")]
    #[serde(rename = "text_pair_column")]
    pub text_pair: Option<String>,
    /// The column holding the label (a string or an integer).
    #[arg(long = "label-column", id = "label_column", default_value = "label")]
    #[serde(rename = "label_column")]
    pub label: String,
    /// SFT: the column holding the prompt.
    #[arg(long = "prompt-column", id = "prompt_column", default_value = "prompt")]
    #[serde(rename = "prompt_column")]
    pub prompt: String,
    /// SFT: the column holding the completion the model learns to write.
    #[arg(
        long = "completion-column",
        id = "completion_column",
        default_value = "completion"
    )]
    #[serde(rename = "completion_column")]
    pub completion: String,
}

/// The column used for the second text when [`Columns::text_pair`] is `None`.
pub const DEFAULT_TEXT_PAIR: &str = "text_pair";

impl Default for Columns {
    /// The flags' defaults.
    fn default() -> Self {
        crate::cli_defaults(&[])
    }
}

/// One training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    Classify {
        text: String,
        text_pair: Option<String>,
        /// Integers in the file become their decimal string.
        label: String,
    },
    Sft {
        prompt: String,
        completion: String,
    },
    /// SFT on a conversation (a JSONL `messages` list), learning the assistant's turns.
    Chat {
        messages: Vec<Message>,
    },
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// system, user or assistant.
    pub role: String,
    pub content: String,
}

impl Example {
    /// The label of a classification example.
    pub fn label(&self) -> Option<&str> {
        match self {
            Example::Classify { label, .. } => Some(label),
            Example::Sft { .. } | Example::Chat { .. } => None,
        }
    }
}

/// An example and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 1-based line of the file on which the row starts.
    pub line: usize,
    pub example: Example,
}

/// A row that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub path: PathBuf,
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for BadRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.reason)
    }
}

/// The usable rows of one file, in file order, and the rows dropped with `--skip-bad-rows`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub path: PathBuf,
    pub records: Vec<Record>,
    pub skipped: Vec<BadRow>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// `FILE:LINE` of a record, for messages.
    pub fn locate(&self, record: &Record) -> String {
        format!("{}:{}", self.path.display(), record.line)
    }
}

/// How many offending rows a message lists.
pub const MAX_LISTED: usize = 20;

/// `rows` as lines `  FILE:LINE: reason`: the first [`MAX_LISTED`], then how many more.
pub fn list_rows(rows: &[BadRow]) -> String {
    let mut s = String::new();
    for row in rows.iter().take(MAX_LISTED) {
        s.push_str(&format!("\n  {row}"));
    }
    if rows.len() > MAX_LISTED {
        s.push_str(&format!("\n  … and {} more", rows.len() - MAX_LISTED));
    }
    s
}

/// How data files are read and tokenized: the settings `train`, `eval` and `predict` share
/// (`eval` and `predict` on a run take them from its `run.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::Args)]
#[serde(default)]
pub struct DataSettings {
    #[command(flatten)]
    #[serde(flatten)]
    pub columns: Columns,
    /// Tokens per example, special tokens included.
    #[arg(long, default_value_t = 128)]
    pub max_length: usize,
    /// Rows longer than --max-length: right keeps their start (an SFT completion loses its
    /// end), left keeps their end (the completion and its end-of-sequence token), drop leaves
    /// them out; rows cut or left out are reported.
    #[arg(long, default_value = "right")]
    pub truncation: Truncation,
    /// Drop malformed rows (reported) instead of refusing to start.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// SFT: do not wrap prompts in the model's chat template (used by default when the model
    /// has one).
    #[arg(long = "no-chat-template", action = clap::ArgAction::SetFalse)]
    pub chat_template: bool,
    /// SFT: a Jinja chat template to use instead of the model's (for a base model without
    /// one); `train` keeps a copy with the adapter, which `eval` and `predict` then use.
    #[arg(long = "chat-template", value_name = "FILE")]
    pub chat_template_file: Option<std::path::PathBuf>,
}

/// Reads a chat template file given with `--chat-template`.
pub fn read_chat_template_file(path: &std::path::Path) -> crate::error::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::error::Error::io(path, e))?;
    if text.trim().is_empty() {
        return Err(crate::error::Error::bad_file(
            path,
            "the chat template is empty",
        ));
    }
    Ok(text)
}

impl Default for DataSettings {
    /// The flags' defaults.
    fn default() -> Self {
        crate::cli_defaults(&[])
    }
}

/// The rows of the data not used as written: malformed rows left out (`--skip-bad-rows`), rows
/// cut to `max_length` tokens, and rows left out for their length (`--truncation drop`), each
/// as `FILE:LINE: reason`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowReport {
    pub max_length: usize,
    pub truncation: Truncation,
    pub skipped: Vec<BadRow>,
    pub truncated: Vec<BadRow>,
    pub dropped: Vec<BadRow>,
}

impl RowReport {
    pub fn is_empty(&self) -> bool {
        self.skipped.is_empty() && self.truncated.is_empty() && self.dropped.is_empty()
    }

    /// Adds a dataset's malformed rows and its rows cut or left out at `max_length`.
    pub fn add(&mut self, ds: &Dataset, rows: &EncodedRows) {
        self.skipped.extend(ds.skipped.iter().cloned());
        self.truncated.extend(rows.truncated.iter().cloned());
        self.dropped.extend(rows.dropped.iter().cloned());
    }
}
