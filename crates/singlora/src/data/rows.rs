//! Reading data files into [`Dataset`]s: JSON Lines (`.jsonl`, `.ndjson`, `.json`: one object
//! per line, blank lines ignored), CSV (`.csv`: a header row, RFC 4180 quoting, so fields may
//! hold commas and newlines) and TSV (`.tsv`: a header row, one row per line, no quoting).
//! Every unusable row is reported as `FILE:LINE: reason` with the line on which the row starts.

use std::path::Path;

use serde_json::{Map, Value};

use super::{BadRow, Columns, Dataset, Example, Message, Record, Task, DEFAULT_TEXT_PAIR};
use crate::error::{Error, IoContext, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    JsonLines,
    Csv,
    Tsv,
}

impl Format {
    fn of(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("jsonl" | "ndjson" | "json") => Ok(Format::JsonLines),
            Some("csv") => Ok(Format::Csv),
            Some("tsv") => Ok(Format::Tsv),
            Some(other) => Err(Error::bad_file(
                path,
                format!(
                    "unknown data format `.{other}`: expected .jsonl, .ndjson, .json (one JSON \
                     object per line), .csv or .tsv"
                ),
            )),
            None => Err(Error::bad_file(
                path,
                "no file extension to tell the format by: expected .jsonl, .ndjson, .json (one \
                 JSON object per line), .csv or .tsv",
            )),
        }
    }
}

/// Loads the examples of `task` from a JSONL, CSV or TSV file.
///
/// Bad rows (missing or empty fields, wrong types, lines that do not parse) are collected; unless
/// `skip_bad_rows`, any bad row fails the load with a message listing them. With it they are
/// dropped and kept in [`Dataset::skipped`]. A file without a usable row is an error.
pub fn load_dataset(
    path: &Path,
    task: Task,
    columns: &Columns,
    skip_bad_rows: bool,
) -> Result<Dataset> {
    Format::of(path)?;
    let bytes = std::fs::read(path).at(path)?;
    load_dataset_bytes(path, &bytes, task, columns, skip_bad_rows)
}

/// [`load_dataset`] on the contents of a file already in memory; `path` names it in messages
/// and its extension gives the format.
pub fn load_dataset_bytes(
    path: &Path,
    bytes: &[u8],
    task: Task,
    columns: &Columns,
    skip_bad_rows: bool,
) -> Result<Dataset> {
    let format = Format::of(path)?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut records = Vec::new();
    let mut bad = Vec::new();
    match format {
        Format::JsonLines => read_json_lines(path, bytes, task, columns, &mut records, &mut bad)?,
        Format::Csv => read_delimited(
            path,
            bytes,
            b',',
            true,
            task,
            columns,
            &mut records,
            &mut bad,
        )?,
        Format::Tsv => read_delimited(
            path,
            bytes,
            b'\t',
            false,
            task,
            columns,
            &mut records,
            &mut bad,
        )?,
    }
    if !bad.is_empty() && !skip_bad_rows {
        return Err(bad_rows_error(path, &bad, records.len()));
    }
    if records.is_empty() {
        let msg = match bad.first() {
            None => "no rows".to_string(),
            Some(first) => format!(
                "no rows: all {} rows are bad (the first: line {}: {})",
                bad.len(),
                first.line,
                first.reason
            ),
        };
        return Err(Error::bad_file(path, msg));
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        records,
        skipped: bad,
    })
}

fn bad_rows_error(path: &Path, bad: &[BadRow], good: usize) -> Error {
    let mut msg = format!(
        "{}: {} bad row{} ({} usable):",
        path.display(),
        bad.len(),
        if bad.len() == 1 { "" } else { "s" },
        good
    );
    msg.push_str(&super::list_rows(bad));
    msg.push_str("\nfix them, or pass --skip-bad-rows to drop them and train on the rest");
    Error::msg(msg)
}

/// One field of a row, as found in the file.
enum Field<'a> {
    Missing,
    Null,
    Str(&'a str),
    Int(String),
    /// A value of another type, described in words ("a boolean", "the number 1.5", …).
    Other(String),
}

/// How a row is looked up: JSON fields or CSV columns (named so in messages).
trait Row {
    fn get(&self, name: &str) -> Field<'_>;
    /// The JSON value of a field (JSON Lines only).
    fn json(&self, _name: &str) -> Option<&Value> {
        None
    }
    /// "field" or "column".
    fn noun(&self) -> &'static str;
    /// A hint appended to "missing …" reasons.
    fn missing_hint(&self) -> String {
        String::new()
    }
}

struct JsonRow<'a>(&'a Map<String, Value>);

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

impl Row for JsonRow<'_> {
    fn json(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    fn get(&self, name: &str) -> Field<'_> {
        match self.0.get(name) {
            None => Field::Missing,
            Some(Value::Null) => Field::Null,
            Some(Value::String(s)) => Field::Str(s),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Field::Int(n.to_string()),
            Some(other) => Field::Other(describe(other)),
        }
    }

    fn noun(&self) -> &'static str {
        "field"
    }

    fn missing_hint(&self) -> String {
        let names: Vec<String> = self.0.keys().map(|k| format!("`{k}`")).collect();
        if names.is_empty() {
            " (the object is empty)".into()
        } else {
            format!(" (the row has {})", names.join(", "))
        }
    }
}

struct CsvRow<'a> {
    /// (column name, cell) for the columns in use.
    cells: Vec<(&'a str, &'a str)>,
}

impl Row for CsvRow<'_> {
    fn get(&self, name: &str) -> Field<'_> {
        match self.cells.iter().find(|(n, _)| *n == name) {
            Some((_, cell)) => Field::Str(cell),
            None => Field::Missing,
        }
    }

    fn noun(&self) -> &'static str {
        "column"
    }
}

/// A required, non-empty text.
fn text_field(row: &dyn Row, name: &str) -> std::result::Result<String, String> {
    let noun = row.noun();
    match row.get(name) {
        Field::Str(s) if s.trim().is_empty() => Err(format!("{noun} `{name}` is empty")),
        Field::Str(s) => Ok(s.to_string()),
        Field::Missing => Err(format!("missing {noun} `{name}`{}", row.missing_hint())),
        Field::Null => Err(format!("{noun} `{name}` is null")),
        Field::Int(n) => Err(format!(
            "{noun} `{name}` must be a string, found the number {n}"
        )),
        Field::Other(what) => Err(format!("{noun} `{name}` must be a string, found {what}")),
    }
}

/// A label: a non-empty string (trimmed) or an integer (its decimal string).
fn label_field(row: &dyn Row, name: &str) -> std::result::Result<String, String> {
    let noun = row.noun();
    match row.get(name) {
        Field::Str(s) if s.trim().is_empty() => Err(format!("{noun} `{name}` is empty")),
        Field::Str(s) => Ok(s.trim().to_string()),
        Field::Int(n) => Ok(n),
        Field::Missing => Err(format!("missing {noun} `{name}`{}", row.missing_hint())),
        Field::Null => Err(format!("{noun} `{name}` is null")),
        Field::Other(what) => Err(format!(
            "{noun} `{name}` must be a string or an integer, found {what}"
        )),
    }
}

/// The second text: required when named explicitly, else used when present and non-empty.
fn pair_field(row: &dyn Row, columns: &Columns) -> std::result::Result<Option<String>, String> {
    match &columns.text_pair {
        Some(name) => text_field(row, name).map(Some),
        None => {
            let noun = row.noun();
            let name = DEFAULT_TEXT_PAIR;
            match row.get(name) {
                Field::Missing | Field::Null => Ok(None),
                Field::Str(s) if s.trim().is_empty() => Ok(None),
                Field::Str(s) => Ok(Some(s.to_string())),
                Field::Int(n) => Err(format!(
                    "{noun} `{name}` must be a string, found the number {n}"
                )),
                Field::Other(what) => {
                    Err(format!("{noun} `{name}` must be a string, found {what}"))
                }
            }
        }
    }
}

fn example(row: &dyn Row, task: Task, columns: &Columns) -> std::result::Result<Example, String> {
    match task {
        Task::Classify => {
            // Report every problem of the row at once.
            let text = text_field(row, &columns.text);
            let pair = pair_field(row, columns);
            let label = label_field(row, &columns.label);
            match (text, pair, label) {
                (Ok(text), Ok(text_pair), Ok(label)) => Ok(Example::Classify {
                    text,
                    text_pair,
                    label,
                }),
                (t, p, l) => Err(join_errors([t.err(), p.err(), l.err()])),
            }
        }
        Task::Sft if row.json(MESSAGES).is_some() || row.json(CONVERSATIONS).is_some() => {
            messages_field(row).map(|messages| Example::Chat { messages })
        }
        Task::Sft => {
            let prompt = text_field(row, &columns.prompt);
            let completion = text_field(row, &columns.completion);
            match (prompt, completion) {
                (Ok(prompt), Ok(completion)) => Ok(Example::Sft { prompt, completion }),
                (p, c) => Err(join_errors([p.err(), c.err()])),
            }
        }
    }
}

/// The JSONL field of a conversation: OpenAI's `messages` ({"role", "content"}) or
/// ShareGPT's `conversations` ({"from", "value"}, from system, human or gpt).
const MESSAGES: &str = "messages";
const CONVERSATIONS: &str = "conversations";

/// A conversation, with at least one assistant turn to learn from.
fn messages_field(row: &dyn Row) -> std::result::Result<Vec<Message>, String> {
    let (field, role_key, content_key, known) = match row.json(MESSAGES) {
        Some(_) => (MESSAGES, "role", "content", "system, user or assistant"),
        None => (CONVERSATIONS, "from", "value", "system, human or gpt"),
    };
    let Some(Value::Array(list)) = row.json(field) else {
        return Err(format!(
            "field `{field}` must be a list of {{\"{role_key}\", \"{content_key}\"}} objects"
        ));
    };
    let mut out = vec![];
    for (i, m) in list.iter().enumerate() {
        let at = format!("`{field}[{i}]`");
        let Value::Object(m) = m else {
            return Err(format!("{at} must be an object, found {}", describe(m)));
        };
        let Some(given) = m.get(role_key) else {
            return Err(format!("{at} has no `{role_key}`"));
        };
        let role = match (field, given.as_str()) {
            (_, Some("system")) => "system",
            (MESSAGES, Some("user")) | (CONVERSATIONS, Some("human")) => "user",
            (MESSAGES, Some("assistant")) | (CONVERSATIONS, Some("gpt")) => "assistant",
            _ => return Err(format!("{at}.{role_key} must be {known}, found {given}")),
        };
        let content = match m.get(content_key) {
            Some(Value::String(c)) => c.clone(),
            Some(other) => {
                return Err(format!(
                    "{at}.{content_key} must be a string, found {}",
                    describe(other)
                ))
            }
            None => return Err(format!("{at} has no `{content_key}`")),
        };
        out.push(Message {
            role: role.to_string(),
            content,
        });
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err(format!(
            "field `{field}` has no assistant turn: there is nothing to learn from it"
        ));
    }
    Ok(out)
}

fn join_errors<const N: usize>(errors: [Option<String>; N]) -> String {
    errors.into_iter().flatten().collect::<Vec<_>>().join("; ")
}

fn read_json_lines(
    path: &Path,
    bytes: &[u8],
    task: Task,
    columns: &Columns,
    records: &mut Vec<Record>,
    bad: &mut Vec<BadRow>,
) -> Result<()> {
    let mut first = true;
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t,
            Err(e) => {
                bad.push(bad_row(path, line, format!("not valid UTF-8 ({e})")));
                first = false;
                continue;
            }
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            continue;
        }
        if first {
            first = false;
            if trimmed.starts_with('[') {
                return Err(Error::bad_file(
                    path,
                    "holds a JSON array; singlora reads JSON Lines, one object per line \
                     (convert with `jq -c '.[]' FILE > FILE.jsonl`)",
                ));
            }
            if trimmed == "{" {
                return Err(Error::bad_file(
                    path,
                    "looks like pretty-printed JSON; singlora reads JSON Lines, one object per \
                     line (convert with `jq -c . FILE > FILE.jsonl`)",
                ));
            }
        }
        let value: Value = match serde_json::from_str(trimmed) {
            Ok(v) => v,
            Err(e) => {
                bad.push(bad_row(path, line, format!("not valid JSON ({e})")));
                continue;
            }
        };
        let Value::Object(obj) = &value else {
            bad.push(bad_row(
                path,
                line,
                format!("not a JSON object (found {})", describe(&value)),
            ));
            continue;
        };
        match example(&JsonRow(obj), task, columns) {
            Ok(example) => records.push(Record { line, example }),
            Err(reason) => bad.push(bad_row(path, line, reason)),
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn read_delimited(
    path: &Path,
    bytes: &[u8],
    delimiter: u8,
    quoting: bool,
    task: Task,
    columns: &Columns,
    records: &mut Vec<Record>,
    bad: &mut Vec<BadRow>,
) -> Result<()> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quoting)
        .has_headers(true)
        .flexible(true)
        .from_reader(bytes);
    let header: Vec<String> = reader
        .byte_headers()
        .map_err(|e| Error::bad_file(path, format!("cannot read the header row: {e}")))?
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_string())
        .collect();
    if header.iter().all(|h| h.is_empty()) {
        return Err(Error::bad_file(path, "no rows (not even a header row)"));
    }
    // The columns in use, by name, and where they are.
    let mut wanted: Vec<&str> = match task {
        Task::Classify => vec![&columns.text, &columns.label],
        Task::Sft => vec![&columns.prompt, &columns.completion],
    };
    if task == Task::Classify {
        match &columns.text_pair {
            Some(name) => wanted.push(name),
            None if header.iter().any(|h| h == DEFAULT_TEXT_PAIR) => wanted.push(DEFAULT_TEXT_PAIR),
            None => {}
        }
    }
    let mut positions = Vec::with_capacity(wanted.len());
    for name in &wanted {
        match header.iter().position(|h| h == name) {
            Some(i) => positions.push(i),
            None => {
                let cols: Vec<String> = header.iter().map(|h| format!("`{h}`")).collect();
                return Err(Error::bad_file(
                    path,
                    format!(
                        "no column `{name}` in the header row; its columns are {}",
                        cols.join(", ")
                    ),
                ));
            }
        }
    }

    let mut rec = csv::ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut rec) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(Error::bad_file(path, format!("cannot read: {e}"))),
        }
        let line = rec.position().map_or(0, |p| p.line() as usize);
        if rec.len() != header.len() {
            bad.push(bad_row(
                path,
                line,
                format!(
                    "{} fields, but the header row has {}{}",
                    rec.len(),
                    header.len(),
                    if quoting {
                        " (a missing delimiter or an unbalanced quote?)"
                    } else {
                        ""
                    }
                ),
            ));
            continue;
        }
        let mut cells = Vec::with_capacity(wanted.len());
        let mut utf8_errors = Vec::new();
        for (name, &i) in wanted.iter().zip(&positions) {
            match std::str::from_utf8(&rec[i]) {
                Ok(cell) => cells.push((*name, cell)),
                Err(e) => utf8_errors.push(format!("column `{name}` is not valid UTF-8 ({e})")),
            }
        }
        if !utf8_errors.is_empty() {
            bad.push(bad_row(path, line, utf8_errors.join("; ")));
            continue;
        }
        match example(&CsvRow { cells }, task, columns) {
            Ok(example) => records.push(Record { line, example }),
            Err(reason) => bad.push(bad_row(path, line, reason)),
        }
    }
    Ok(())
}

fn bad_row(path: &Path, line: usize, reason: String) -> BadRow {
    BadRow {
        path: path.to_path_buf(),
        line,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    fn classify(path: &Path, skip: bool) -> Result<Dataset> {
        load_dataset(path, Task::Classify, &Columns::default(), skip)
    }

    fn lines(ds: &Dataset) -> Vec<usize> {
        ds.records.iter().map(|r| r.line).collect()
    }

    #[test]
    fn empty_files_have_no_rows() {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in [
            ("a.jsonl", ""),
            ("b.jsonl", "\n\n  \n"),
            ("c.csv", ""),
            ("d.csv", "text,label\n"),
            ("e.tsv", "text\tlabel\n"),
        ] {
            let p = write(&dir, name, content);
            let err = classify(&p, true).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("{}: no rows", p.display())),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn one_row_and_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "one.jsonl", r#"{"text": "hi", "label": "a"}"#);
        let ds = classify(&p, false).unwrap();
        assert_eq!(ds.len(), 1);
        assert_eq!(
            ds.records[0],
            Record {
                line: 1,
                example: Example::Classify {
                    text: "hi".into(),
                    text_pair: None,
                    label: "a".into()
                }
            }
        );
        let p = write(
            &dir,
            "blank.jsonl",
            "\n{\"text\": \"x\", \"label\": 1}\r\n\n   \n{\"text\": \"y\", \"label\": \"b\"}\n\n",
        );
        let ds = classify(&p, false).unwrap();
        assert_eq!(lines(&ds), vec![2, 5]);
        assert_eq!(ds.records[0].example.label(), Some("1"));
        let p = write(&dir, "one.csv", "text,label\nhello,pos");
        let ds = classify(&p, false).unwrap();
        assert_eq!(lines(&ds), vec![2]);
    }

    #[test]
    fn jsonl_bad_rows_are_listed_with_lines() {
        let dir = tempfile::tempdir().unwrap();
        let content = [
            r#"{"text": "good", "label": "a"}"#,
            r#"{"text": "", "label": "a"}"#,
            "",
            "not json",
            r#"["text", "label"]"#,
            r#"{"sentence": "x", "label": "b"}"#,
            r#"{"text": "ok", "label": 1.5}"#,
            r#"{"text": "ok", "label": true}"#,
            r#"{"text": 3, "label": null}"#,
            r#"{"text": "fine", "label": -2}"#,
        ]
        .join("\n");
        let p = write(&dir, "bad.jsonl", &content);
        let err = classify(&p, false).unwrap_err().to_string();
        let f = p.display().to_string();
        assert!(
            err.contains(&format!("{f}: 7 bad rows (2 usable)")),
            "{err}"
        );
        assert!(
            err.contains(&format!("{f}:2: field `text` is empty")),
            "{err}"
        );
        assert!(err.contains(&format!("{f}:4: not valid JSON")), "{err}");
        assert!(
            err.contains(&format!("{f}:5: not a JSON object (found an array)")),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "{f}:6: missing field `text` (the row has `sentence`, `label`)"
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "{f}:7: field `label` must be a string or an integer, found the number 1.5"
            )),
            "{err}"
        );
        assert!(err.contains(&format!("{f}:8: field `label`")), "{err}");
        assert!(
            err.contains(&format!(
                "{f}:9: field `text` must be a string, found the number 3; field `label` is null"
            )),
            "{err}"
        );
        assert!(err.contains("--skip-bad-rows"), "{err}");

        let ds = classify(&p, true).unwrap();
        assert_eq!(lines(&ds), vec![1, 10]);
        assert_eq!(ds.records[1].example.label(), Some("-2"));
        let skipped: Vec<usize> = ds.skipped.iter().map(|b| b.line).collect();
        assert_eq!(skipped, vec![2, 4, 5, 6, 7, 8, 9]);
        assert_eq!(
            ds.skipped[0].to_string(),
            format!("{f}:2: field `text` is empty")
        );
    }

    #[test]
    fn at_most_twenty_bad_rows_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let mut content = String::new();
        for i in 0..25 {
            content.push_str(&format!("{{\"text\": \"t{i}\"}}\n"));
        }
        let p = write(&dir, "many.jsonl", &content);
        let err = classify(&p, false).unwrap_err().to_string();
        assert!(err.contains("25 bad rows (0 usable)"), "{err}");
        assert!(err.contains(&format!("{}:20:", p.display())), "{err}");
        assert!(!err.contains(&format!("{}:21:", p.display())), "{err}");
        assert!(err.contains("and 5 more"), "{err}");
        // Skipping everything leaves nothing.
        let err = classify(&p, true).unwrap_err().to_string();
        assert!(err.contains("no rows: all 25 rows are bad"), "{err}");
    }

    #[test]
    fn csv_line_numbers_count_quoted_newlines() {
        let dir = tempfile::tempdir().unwrap();
        let content = "text,label\n\
                       \"first, with a comma\",a\n\
                       \"a field\nover\nthree lines\",b\n\
                       ,a\n\
                       \"ok\",\"b\"\n\
                       only one field\n\
                       \"quoted \"\"inner\"\" quotes\",c\n";
        let p = write(&dir, "multi.csv", content);
        let f = p.display().to_string();
        let err = classify(&p, false).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{f}:6: column `text` is empty")),
            "{err}"
        );
        assert!(
            err.contains(&format!("{f}:8: 1 fields, but the header row has 2")),
            "{err}"
        );
        let ds = classify(&p, true).unwrap();
        assert_eq!(lines(&ds), vec![2, 3, 7, 9]);
        assert_eq!(
            ds.records[1].example,
            Example::Classify {
                text: "a field\nover\nthree lines".into(),
                text_pair: None,
                label: "b".into()
            }
        );
        assert_eq!(
            ds.records[0].example,
            Example::Classify {
                text: "first, with a comma".into(),
                text_pair: None,
                label: "a".into()
            }
        );
        assert_eq!(
            ds.records[3].example,
            Example::Classify {
                text: "quoted \"inner\" quotes".into(),
                text_pair: None,
                label: "c".into()
            }
        );
        assert_eq!(ds.skipped.len(), 2);
    }

    #[test]
    fn missing_csv_column_names_it_and_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "cols.csv", "sentence,label\nx,a\n");
        let err = classify(&p, false).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: no column `text` in the header row; its columns are `sentence`, `label`",
                p.display()
            )
        );
        let columns = Columns {
            text: "sentence".into(),
            ..Columns::default()
        };
        let ds = load_dataset(&p, Task::Classify, &columns, false).unwrap();
        assert_eq!(ds.len(), 1);
        // An explicitly named pair column must exist.
        let columns = Columns {
            text: "sentence".into(),
            text_pair: Some("hypothesis".into()),
            ..Columns::default()
        };
        let err = load_dataset(&p, Task::Classify, &columns, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no column `hypothesis`"), "{err}");
    }

    #[test]
    fn text_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "pairs.jsonl",
            "{\"text\": \"a\", \"text_pair\": \"b\", \"label\": 0}\n\
             {\"text\": \"c\", \"label\": 1}\n\
             {\"text\": \"d\", \"text_pair\": null, \"label\": 1}\n",
        );
        let ds = classify(&p, false).unwrap();
        let pairs: Vec<Option<&str>> = ds
            .records
            .iter()
            .map(|r| match &r.example {
                Example::Classify { text_pair, .. } => text_pair.as_deref(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(pairs, vec![Some("b"), None, None]);

        let p = write(
            &dir,
            "pairs.csv",
            "premise,hypothesis,label\np1,h1,yes\np2,,no\n",
        );
        let columns = Columns {
            text: "premise".into(),
            text_pair: Some("hypothesis".into()),
            ..Columns::default()
        };
        let err = load_dataset(&p, Task::Classify, &columns, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{}:3: column `hypothesis` is empty", p.display())),
            "{err}"
        );
        let p = write(
            &dir,
            "pairs2.tsv",
            "text\ttext_pair\tlabel\np1\th1\tyes\np2\t\tno\n",
        );
        let ds = classify(&p, false).unwrap();
        assert_eq!(
            ds.records[0].example,
            Example::Classify {
                text: "p1".into(),
                text_pair: Some("h1".into()),
                label: "yes".into()
            }
        );
        assert_eq!(
            ds.records[1].example,
            Example::Classify {
                text: "p2".into(),
                text_pair: None,
                label: "no".into()
            }
        );
    }

    #[test]
    fn sft_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "sft.jsonl",
            "{\"prompt\": \"Q: 2+2?\", \"completion\": \" 4\"}\n\
             {\"prompt\": \"Q\", \"completion\": \"  \"}\n\
             {\"prompt\": \"Q\"}\n",
        );
        let err = load_dataset(&p, Task::Sft, &Columns::default(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains(":2: field `completion` is empty"), "{err}");
        assert!(err.contains(":3: missing field `completion`"), "{err}");
        let ds = load_dataset(&p, Task::Sft, &Columns::default(), true).unwrap();
        assert_eq!(
            ds.records[0].example,
            Example::Sft {
                prompt: "Q: 2+2?".into(),
                completion: " 4".into()
            }
        );
    }

    #[test]
    fn conversation_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "chat.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n\
             {\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n\
             {\"messages\": [{\"role\": \"bot\", \"content\": \"Hi\"}]}\n\
             {\"messages\": [{\"role\": \"assistant\", \"content\": 3}]}\n\
             {\"messages\": \"Hi\"}\n\
             {\"prompt\": \"Q\", \"completion\": \"A\"}\n\
             {\"conversations\": [{\"from\": \"human\", \"value\": \"Hi\"}, {\"from\": \"gpt\", \"value\": \"Hello\"}]}\n\
             {\"conversations\": [{\"from\": \"user\", \"value\": \"Hi\"}]}\n",
        );
        let err = load_dataset(&p, Task::Sft, &Columns::default(), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2: field `messages` has no assistant turn"),
            "{err}"
        );
        assert!(
            err.contains(":3: `messages[0]`.role must be system, user or assistant"),
            "{err}"
        );
        assert!(
            err.contains(":4: `messages[0]`.content must be a string"),
            "{err}"
        );
        assert!(err.contains(":5: field `messages` must be a list"), "{err}");
        assert!(
            err.contains(":8: `conversations[0]`.from must be system, human or gpt"),
            "{err}"
        );
        let ds = load_dataset(&p, Task::Sft, &Columns::default(), true).unwrap();
        let msg = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
        assert_eq!(
            ds.records[0].example,
            Example::Chat {
                messages: vec![msg("user", "Hi"), msg("assistant", "Hello")]
            }
        );
        // prompt/completion rows may sit beside conversations; ShareGPT's read as OpenAI's
        assert!(matches!(ds.records[1].example, Example::Sft { .. }));
        assert_eq!(ds.records[2].example, ds.records[0].example);
    }

    #[test]
    fn format_problems_are_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "data.parquet", "x");
        let err = classify(&p, false).unwrap_err().to_string();
        assert!(err.contains("unknown data format `.parquet`"), "{err}");
        let p = write(&dir, "array.json", "[{\"text\": \"a\", \"label\": \"b\"}]");
        let err = classify(&p, false).unwrap_err().to_string();
        assert!(err.contains("JSON array"), "{err}");
        let p = write(&dir, "missing.jsonl", "");
        std::fs::remove_file(&p).unwrap();
        let err = classify(&p, false).unwrap_err().to_string();
        assert!(err.starts_with(&p.display().to_string()), "{err}");
    }
}
