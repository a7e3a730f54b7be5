//! Tokenisation of a dataset. Classification: text (and text pair) with the tokenizer's special
//! tokens, truncated longest-first to `max_length` by the tokenizer itself so the special
//! tokens survive. SFT: prompt (with special tokens) ++ completion (without) ++ eos, with a
//! target mask of 1 on the completion and eos.
//!
//! Rows longer than `max_length` follow [`Truncation`]: `right` (the default) keeps the start,
//! so an SFT row loses the end of its completion, and, when the prompt alone would leave less
//! than a quarter of `max_length` to the completion, the start of its prompt (its leading
//! special tokens are kept); `left` keeps the end (the completion and eos), cutting the start
//! after the leading special tokens; `drop` leaves such rows out. Rows cut or left out are
//! returned in [`EncodedRows`] as `FILE:LINE: what`. Long texts are tokenized only as far as
//! the kept tokens reach ([`super::truncate`]), with the same result as tokenizing them whole;
//! the one exception is a pair of texts both over 1 MiB, where which of the two keeps the odd
//! token of an odd budget follows their tokenized parts.

use std::collections::HashMap;

use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use super::truncate::{bytes_per_token, tokenizable_part, Keep, Truncation};
use super::{BadRow, Dataset, Example, LabelSet, Record};
use crate::chat::ChatTemplate;
use crate::error::{Error, Result};

/// One tokenised example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// The class index (classification).
    pub label: Option<usize>,
    /// 1 on the positions whose tokens are trained on (SFT: the completion and eos); all 0 for
    /// classification.
    pub target_mask: Vec<u8>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// How [`encode_with`] tokenizes rows.
#[derive(Clone, Copy)]
pub struct EncodeOptions<'a> {
    pub max_length: usize,
    /// Appended to SFT completions.
    pub eos: Option<u32>,
    /// SFT: prompts are wrapped in this chat template (a user turn, the assistant's turn
    /// opened) and conversations rendered by it, both tokenized without added special tokens.
    pub chat: Option<&'a ChatTemplate>,
    pub truncation: Truncation,
}

impl EncodeOptions<'_> {
    /// `max_length` tokens, cut at the right; no eos, no chat template.
    pub fn new(max_length: usize) -> Self {
        Self {
            max_length,
            eos: None,
            chat: None,
            truncation: Truncation::Right,
        }
    }
}

/// The encoded rows of a dataset, in file order, and the rows longer than `max_length`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedRows {
    pub items: Vec<Encoded>,
    /// Rows cut to `max_length` tokens, with what was cut.
    pub truncated: Vec<BadRow>,
    /// Rows left out for their length (`Truncation::Drop`).
    pub dropped: Vec<BadRow>,
}

/// Tokenises every record of `ds` (see the module documentation), cutting long rows at the
/// right. `labels` is required for classification data; `eos` is appended to SFT completions
/// when given.
pub fn encode(
    tok: &Tokenizer,
    ds: &Dataset,
    labels: Option<&LabelSet>,
    max_length: usize,
    eos: Option<u32>,
) -> Result<Vec<Encoded>> {
    let opts = EncodeOptions {
        eos,
        ..EncodeOptions::new(max_length)
    };
    Ok(encode_with(tok, ds, labels, &opts)?.items)
}

/// [`encode`] with every option, and the rows cut or left out for their length.
pub fn encode_with(
    tok: &Tokenizer,
    ds: &Dataset,
    labels: Option<&LabelSet>,
    opts: &EncodeOptions,
) -> Result<EncodedRows> {
    encode_rows(tok, ds, labels, opts, Some(bytes_per_token(tok)))
}

/// [`encode_with`]; `bytes_per_token` starts the search for the part of a long text to
/// tokenize, `None` tokenizes every text whole.
fn encode_rows(
    tok: &Tokenizer,
    ds: &Dataset,
    labels: Option<&LabelSet>,
    opts: &EncodeOptions,
    bytes_per_token: Option<usize>,
) -> Result<EncodedRows> {
    let max_length = opts.max_length;
    if max_length == 0 {
        return Err(Error::msg("max_length must be at least 1"));
    }
    let mut tok = tok.clone();
    tok.with_padding(None);
    let has_classify = ds
        .records
        .iter()
        .any(|r| matches!(r.example, Example::Classify { .. }));
    let has_sft = ds
        .records
        .iter()
        .any(|r| matches!(r.example, Example::Sft { .. }));

    // Classification truncates inside the tokenizer; SFT truncates by hand.
    let classify_tok = if has_classify {
        let added = |pair: bool| tok.get_post_processor().map_or(0, |p| p.added_tokens(pair));
        let has_pair = ds.records.iter().any(|r| {
            matches!(
                r.example,
                Example::Classify {
                    text_pair: Some(_),
                    ..
                }
            )
        });
        let (needed, what) = if has_pair {
            (added(true).max(added(false)) + 2, "the two texts")
        } else {
            (added(false) + 1, "the text")
        };
        if max_length < needed {
            return Err(Error::msg(format!(
                "max_length {max_length} leaves no room for {what} of {} next to the tokenizer's \
                 special tokens; use at least {needed}",
                ds.path.display()
            )));
        }
        let mut t = tok.clone();
        t.with_truncation(Some(TruncationParams {
            direction: match opts.truncation {
                Truncation::Left => TruncationDirection::Left,
                Truncation::Right | Truncation::Drop => TruncationDirection::Right,
            },
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| Error::msg(format!("cannot truncate to {max_length} tokens: {e}")))?;
        Some(t)
    } else {
        None
    };
    if has_sft && max_length < 2 {
        return Err(Error::msg(format!(
            "max_length {max_length} is too short for prompt/completion data; use at least 2"
        )));
    }
    tok.with_truncation(None)
        .map_err(|e| Error::msg(format!("cannot disable truncation: {e}")))?;
    let label_index: Option<HashMap<&str, usize>> = labels.map(|set| {
        set.names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect()
    });
    let row = RowEncoder {
        tok: &tok,
        ds,
        opts,
        bytes_per_token,
    };

    let mut out = EncodedRows {
        items: Vec::with_capacity(ds.records.len()),
        ..Default::default()
    };
    for record in &ds.records {
        let fitted = match &record.example {
            Example::Classify {
                text,
                text_pair,
                label,
            } => {
                let Some(index) = &label_index else {
                    return Err(Error::msg(format!(
                        "{}: classification data needs a label set",
                        ds.path.display()
                    )));
                };
                let Some(&label) = index.get(label.as_str()) else {
                    return Err(Error::msg(format!(
                        "{}: label `{label}` is not one of the known labels ({})",
                        ds.locate(record),
                        labels.map(LabelSet::describe).unwrap_or_default()
                    )));
                };
                let t = classify_tok
                    .as_ref()
                    .expect("built for classification rows");
                row.classify(t, record, text, text_pair.as_deref(), label)?
            }
            Example::Sft { prompt, completion } => row.sft(record, prompt, completion)?,
            Example::Chat { messages } => row.chat(record, messages)?,
        };
        let note = |reason: String| BadRow {
            path: ds.path.clone(),
            line: record.line,
            reason,
        };
        let learns_nothing =
            matches!(record.example, Example::Chat { .. }) && !fitted.enc.target_mask.contains(&1);
        match fitted.cut {
            Some(_) if learns_nothing => out.dropped.push(note(format!(
                "longer than {max_length} tokens, and none of the assistant's turns is left \
                 within them: left out"
            ))),
            None => out.items.push(fitted.enc),
            Some(_) if opts.truncation == Truncation::Drop => out.dropped.push(note(format!(
                "longer than {max_length} tokens: left out (--truncation drop)"
            ))),
            Some(what) => {
                out.truncated
                    .push(note(format!("longer than {max_length} tokens: {what} cut")));
                out.items.push(fitted.enc);
            }
        }
        debug_assert!(out.items.last().is_none_or(|e| e.ids.len() <= max_length));
    }
    if out.items.is_empty() && !out.dropped.is_empty() {
        return Err(Error::bad_file(
            &ds.path,
            match opts.truncation {
                Truncation::Drop => format!(
                    "every row is longer than {max_length} tokens, and --truncation drop leaves \
                     them all out"
                ),
                _ => format!(
                    "every row is left out: within {max_length} tokens none keeps an assistant \
                     turn to learn from (raise --max-length)"
                ),
            },
        ));
    }
    Ok(out)
}

/// The largest text of a pair tokenized whole when the other is long too (see
/// [`RowEncoder::classify`]).
const WHOLE_PAIR_BYTES: usize = 1 << 20;

/// A row's tokens, and what was cut from it to fit `max_length` (None: nothing).
struct Fitted {
    enc: Encoded,
    cut: Option<String>,
}

/// Encodes the rows of one dataset.
struct RowEncoder<'a> {
    /// The tokenizer, without truncation or padding.
    tok: &'a Tokenizer,
    ds: &'a Dataset,
    opts: &'a EncodeOptions<'a>,
    bytes_per_token: Option<usize>,
}

impl RowEncoder<'_> {
    fn error(&self, record: &Record, e: impl std::fmt::Display) -> Error {
        Error::msg(format!("{}: cannot tokenize: {e}", self.ds.locate(record)))
    }

    /// The ids of `text`.
    fn ids(&self, record: &Record, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tok
            .encode(text, special)
            .map_err(|e| self.error(record, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The part of `text` that decides its `max_length` tokens at the `keep` end; `ids` gives
    /// the tokens of a part.
    fn part<'t>(
        &self,
        text: &'t str,
        keep: Keep,
        ids: impl Fn(&str) -> Result<Vec<u32>>,
    ) -> Result<&'t str> {
        match self.bytes_per_token {
            Some(b) => tokenizable_part(text, self.opts.max_length, keep, b, ids),
            None => Ok(text),
        }
    }

    fn classify(
        &self,
        tok: &Tokenizer,
        record: &Record,
        text: &str,
        text_pair: Option<&str>,
        label: usize,
    ) -> Result<Fitted> {
        let keep = match self.opts.truncation {
            Truncation::Left => Keep::End,
            Truncation::Right | Truncation::Drop => Keep::Start,
        };
        let ids = |p: &str| self.ids(record, p, false);
        let enc = match text_pair {
            Some(pair) => {
                let (a, b) = (self.part(text, keep, ids)?, self.part(pair, keep, ids)?);
                // Of two long texts, longest-first truncation gives the longer the odd position,
                // which only the whole texts tell; beyond a size, the parts decide.
                let whole = (a.len(), b.len()) != (text.len(), pair.len())
                    && text.len().max(pair.len()) <= WHOLE_PAIR_BYTES;
                match whole {
                    true => tok.encode((text, pair), true),
                    false => tok.encode((a, b), true),
                }
            }
            None => tok.encode(self.part(text, keep, ids)?, true),
        }
        .map_err(|e| self.error(record, e))?;
        if enc.is_empty() {
            return Err(Error::msg(format!(
                "{}: the text encodes to no tokens",
                self.ds.locate(record)
            )));
        }
        let cut = (!enc.get_overflowing().is_empty()).then(|| {
            let side = match keep {
                Keep::Start => "the end",
                Keep::End => "the start",
            };
            match text_pair {
                Some(_) => format!("{side} of the longer text"),
                None => format!("{side} of the text"),
            }
        });
        Ok(Fitted {
            enc: Encoded {
                ids: enc.get_ids().to_vec(),
                type_ids: enc.get_type_ids().to_vec(),
                label: Some(label),
                target_mask: vec![0; enc.len()],
            },
            cut,
        })
    }

    /// A conversation through the chat template; the assistant's turns (their text and the
    /// template's end of turn) are the targets. A long one keeps its start (right, drop) or
    /// its end (left).
    fn chat(&self, record: &Record, messages: &[super::Message]) -> Result<Fitted> {
        let located = |e: Error| Error::msg(format!("{}: {e}", self.ds.locate(record)));
        let chat = self.opts.chat.ok_or_else(|| {
            Error::msg(format!(
                "{}: a `messages` row needs a chat template (tokenizer_config.json's \
                 chat_template, chat_template.jinja or the GGUF's), and this run has none (a \
                 model without one, or --no-chat-template): give one with --chat-template FILE, \
                 or use prompt/completion rows",
                self.ds.locate(record)
            ))
        })?;
        let turns: Vec<(&str, &str)> = messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        let (text, spans) = chat.assistant_spans(&turns).map_err(located)?;
        let enc = self
            .tok
            .encode(text.as_str(), false)
            .map_err(|e| self.error(record, e))?;
        let mut ids = enc.get_ids().to_vec();
        // a token is learned when it starts inside an assistant span
        let mut target_mask: Vec<u8> = enc
            .get_offsets()
            .iter()
            .map(|&(start, end)| {
                let inside = spans.iter().any(|s| s.contains(&start) && end > start);
                u8::from(inside)
            })
            .collect();
        let max_length = self.opts.max_length;
        let n = ids.len();
        let cut = (n > max_length).then(|| match self.opts.truncation {
            Truncation::Left => {
                ids.drain(..n - max_length);
                target_mask.drain(..n - max_length);
                "the start of the conversation".to_string()
            }
            Truncation::Right | Truncation::Drop => {
                ids.truncate(max_length);
                target_mask.truncate(max_length);
                "the end of the conversation".to_string()
            }
        });
        let len = ids.len();
        Ok(Fitted {
            enc: Encoded {
                ids,
                type_ids: vec![0; len],
                label: None,
                target_mask,
            },
            cut,
        })
    }

    fn sft(&self, record: &Record, prompt: &str, completion: &str) -> Result<Fitted> {
        let (max_length, chat) = (self.opts.max_length, self.opts.chat);
        let render = |p: &str| -> Result<Option<String>> {
            chat.map(|c| c.user_prompt(p))
                .transpose()
                .map_err(|e| Error::msg(format!("{}: {e}", self.ds.locate(record))))
        };
        let encode_prompt = |p: &str| -> Result<tokenizers::Encoding> {
            match render(p)? {
                None => self.tok.encode(p, true),
                Some(text) => self.tok.encode(text, false),
            }
            .map_err(|e| self.error(record, e))
        };
        // Both modes keep the end of a long prompt; the completion keeps its start (right) or
        // its end (left).
        let prompt = self.part(prompt, Keep::End, |p| {
            Ok(encode_prompt(p)?.get_ids().to_vec())
        })?;
        let comp_keep = match self.opts.truncation {
            Truncation::Left => Keep::End,
            Truncation::Right | Truncation::Drop => Keep::Start,
        };
        let completion = self.part(completion, comp_keep, |c| self.ids(record, c, false))?;
        let p = encode_prompt(prompt)?;
        let mut comp = self.ids(record, completion, false)?;
        comp.extend(self.opts.eos);
        if comp.is_empty() {
            return Err(Error::msg(format!(
                "{}: the completion encodes to no tokens",
                self.ds.locate(record)
            )));
        }
        let mut p_ids = p.get_ids().to_vec();
        let mut p_types = p.get_type_ids().to_vec();
        // the prompt's leading special tokens (bos), kept whenever the prompt is cut
        let specials = p
            .get_special_tokens_mask()
            .iter()
            .take_while(|&&m| m == 1)
            .count();
        let (n_prompt, n_comp) = (p_ids.len(), comp.len());
        let fits = n_prompt + n_comp <= max_length;
        match self.opts.truncation {
            _ if fits => {}
            Truncation::Left => {
                let head = specials.min(max_length - 1);
                if n_comp < max_length - head {
                    // the start of the prompt after its leading special tokens
                    let drop = n_prompt + n_comp - max_length;
                    p_ids.drain(head..head + drop);
                    p_types.drain(head..head + drop);
                } else {
                    // The completion fills the rest: the prompt keeps its leading special
                    // tokens or, having none, its last token (a position before the targets).
                    let keep = if head > 0 || n_prompt == 0 {
                        0..head
                    } else {
                        n_prompt - 1..n_prompt
                    };
                    p_ids = p_ids[keep.clone()].to_vec();
                    p_types = p_types[keep].to_vec();
                    comp.drain(..n_comp - (max_length - p_ids.len()));
                }
            }
            Truncation::Right | Truncation::Drop => {
                // At least a quarter of max_length for the completion (the whole of a shorter
                // one), and at least one prompt position.
                let min_comp = n_comp.min((max_length / 4).max(1)).min(max_length - 1);
                let keep_prompt = n_prompt.min(max_length - min_comp);
                if keep_prompt < n_prompt {
                    // Drop from the start of the prompt, after its leading special tokens.
                    let drop = n_prompt - keep_prompt;
                    let (from, to) = if keep_prompt > specials && specials + drop <= n_prompt {
                        (specials, specials + drop)
                    } else {
                        (0, drop)
                    };
                    p_ids.drain(from..to);
                    p_types.drain(from..to);
                }
                comp.truncate(max_length - p_ids.len());
            }
        }
        let cut = (!fits).then(|| {
            let mut what = vec![];
            if p_ids.len() < n_prompt {
                what.push("the start of the prompt");
            }
            if comp.len() < n_comp {
                what.push(match (self.opts.truncation, self.opts.eos) {
                    (Truncation::Left, _) => "the start of the completion",
                    (_, Some(_)) => "the end of the completion and its end-of-sequence token",
                    (_, None) => "the end of the completion",
                });
            }
            what.join(" and ")
        });
        let n_prompt = p_ids.len();
        let n_comp = comp.len();
        let mut ids = p_ids;
        ids.extend_from_slice(&comp);
        let mut type_ids = p_types;
        type_ids.extend(std::iter::repeat_n(0, n_comp));
        let mut target_mask = vec![0u8; n_prompt];
        target_mask.extend(std::iter::repeat_n(1u8, n_comp));
        Ok(Fitted {
            enc: Encoded {
                ids,
                type_ids,
                label: None,
                target_mask,
            },
            cut,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Record;
    use crate::tokenize::{word_level_tokenizer, TokenizerStyle};
    use std::path::PathBuf;

    const WORDS: &[&str] = &[
        "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p",
    ];

    fn classify_ds(rows: &[(&str, Option<&str>, &str)]) -> Dataset {
        Dataset {
            path: PathBuf::from("c.jsonl"),
            records: rows
                .iter()
                .enumerate()
                .map(|(i, (t, p, l))| Record {
                    line: i + 1,
                    example: Example::Classify {
                        text: t.to_string(),
                        text_pair: p.map(str::to_string),
                        label: l.to_string(),
                    },
                })
                .collect(),
            skipped: vec![],
        }
    }

    fn sft_ds(rows: &[(&str, &str)]) -> Dataset {
        Dataset {
            path: PathBuf::from("s.jsonl"),
            records: rows
                .iter()
                .enumerate()
                .map(|(i, (p, c))| Record {
                    line: i + 1,
                    example: Example::Sft {
                        prompt: p.to_string(),
                        completion: c.to_string(),
                    },
                })
                .collect(),
            skipped: vec![],
        }
    }

    /// Ids of single letters in WORDS: a=4, b=5, …
    fn id(w: &str) -> u32 {
        4 + WORDS.iter().position(|x| *x == w).unwrap() as u32
    }

    #[test]
    fn classification_keeps_special_tokens_within_max_length() {
        let tok = word_level_tokenizer(WORDS, TokenizerStyle::Bert);
        let ds = classify_ds(&[
            ("a b c d e f g h", None, "x"),
            ("a b", None, "y"),
            ("a b c d e f", Some("g h i"), "y"),
        ]);
        let labels = LabelSet::from_dataset(&ds).unwrap();
        let enc = encode(&tok, &ds, Some(&labels), 6, None).unwrap();
        assert_eq!(enc[0].ids, vec![2, id("a"), id("b"), id("c"), id("d"), 3]);
        assert_eq!(enc[0].label, Some(0));
        assert_eq!(enc[0].target_mask, vec![0; 6]);
        assert_eq!(enc[1].ids, vec![2, id("a"), id("b"), 3]);
        assert_eq!(enc[1].label, Some(1));
        // Longest first: 6 + 3 words into 6 − 3 positions → 2 + 1.
        assert_eq!(enc[2].ids, vec![2, id("a"), id("b"), 3, id("g"), 3]);
        assert_eq!(enc[2].type_ids, vec![0, 0, 0, 0, 1, 1]);
        for e in &enc {
            assert!(e.ids.len() <= 6);
            assert_eq!(e.ids.first(), Some(&2));
            assert_eq!(e.ids.last(), Some(&3));
        }
        // Too short to hold the special tokens and a word.
        let err = encode(&tok, &ds, Some(&labels), 4, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_length 4"), "{err}");
        // A label outside the set.
        let other = LabelSet {
            names: vec!["x".into(), "z".into()],
        };
        let err = encode(&tok, &ds, Some(&other), 6, None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.jsonl:2: label `y`"), "{err}");
        assert!(encode(&tok, &ds, None, 6, None).is_err());
    }

    #[test]
    fn sft_masks_exactly_the_completion_and_eos() {
        let tok = word_level_tokenizer(WORDS, TokenizerStyle::Llama);
        let ds = sft_ds(&[("a b c", "d e")]);
        let enc = encode(&tok, &ds, None, 64, Some(3)).unwrap();
        assert_eq!(
            enc[0].ids,
            vec![2, id("a"), id("b"), id("c"), id("d"), id("e"), 3]
        );
        assert_eq!(enc[0].target_mask, vec![0, 0, 0, 0, 1, 1, 1]);
        assert_eq!(enc[0].type_ids, vec![0; 7]);
        assert_eq!(enc[0].label, None);
        let enc = encode(&tok, &ds, None, 64, None).unwrap();
        assert_eq!(enc[0].target_mask, vec![0, 0, 0, 0, 1, 1]);
    }

    #[test]
    fn sft_prompts_go_through_the_chat_template_without_a_second_bos() {
        let tok = word_level_tokenizer(WORDS, TokenizerStyle::Llama);
        // the template writes bos itself and closes the user turn with the word `c`
        let chat = crate::chat::ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %} {{ m['content'] }} c{% endfor %}",
            Some("<s>".into()),
            None,
        )
        .unwrap();
        let ds = sft_ds(&[("a b", "d e")]);
        let opts = EncodeOptions {
            eos: Some(3),
            chat: Some(&chat),
            ..EncodeOptions::new(64)
        };
        let enc = &encode_with(&tok, &ds, None, &opts).unwrap().items[0];
        assert_eq!(
            enc.ids,
            vec![2, id("a"), id("b"), id("c"), id("d"), id("e"), 3]
        );
        assert_eq!(enc.target_mask, vec![0, 0, 0, 0, 1, 1, 1]);
        // without the template: the tokenizer's own <s>, the prompt as written
        let plain = &encode(&tok, &ds, None, 64, Some(3)).unwrap()[0];
        assert_eq!(plain.ids, vec![2, id("a"), id("b"), id("d"), id("e"), 3]);
        // a template that fails names the row
        let bad = crate::chat::ChatTemplate::new("{{ raise_exception('x') }}", None, None).unwrap();
        let opts = EncodeOptions {
            chat: Some(&bad),
            ..opts
        };
        let err = encode_with(&tok, &ds, None, &opts).unwrap_err().to_string();
        assert!(err.contains("s.jsonl:1"), "{err}");
    }

    #[test]
    fn conversations_learn_the_assistant_turns_only() {
        let tok = word_level_tokenizer(WORDS, TokenizerStyle::Llama);
        // turns as `<s> ROLE-WORD content`, the assistant's closed by `p` (its end of turn);
        // roles: system → m, user → n, assistant → o
        let chat = crate::chat::ChatTemplate::new(
            "{% for m in messages %}<s> {% if m['role'] == 'system' %}m{% elif m['role'] == 'user' %}n{% else %}o{% endif %} {{ m['content'] }}{% if m['role'] == 'assistant' %} p{% endif %} {% endfor %}{% if add_generation_prompt %}<s> o {% endif %}",
            None,
            None,
        )
        .unwrap();
        let msg = |role: &str, content: &str| crate::data::Message {
            role: role.into(),
            content: content.into(),
        };
        let ds = Dataset {
            path: PathBuf::from("c.jsonl"),
            records: vec![Record {
                line: 1,
                example: Example::Chat {
                    messages: vec![
                        msg("system", "a"),
                        msg("user", "b c"),
                        msg("assistant", "d"),
                        msg("user", "e"),
                        msg("assistant", "f g"),
                    ],
                },
            }],
            skipped: vec![],
        };
        let opts = EncodeOptions {
            eos: Some(3),
            chat: Some(&chat),
            ..EncodeOptions::new(64)
        };
        let enc = &encode_with(&tok, &ds, None, &opts).unwrap().items[0];
        let (s, m, n, o, p) = (2, id("m"), id("n"), id("o"), id("p"));
        assert_eq!(
            enc.ids,
            vec![
                s,
                m,
                id("a"),
                s,
                n,
                id("b"),
                id("c"),
                s,
                o,
                id("d"),
                p,
                s,
                n,
                id("e"),
                s,
                o,
                id("f"),
                id("g"),
                p
            ]
        );
        // the answers and their end of turn, not the prompts that open them
        assert_eq!(
            enc.target_mask,
            vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1]
        );
        // cut to 12 tokens: right keeps the first answer; left keeps the second
        let cut = |t: Truncation| {
            let opts = EncodeOptions {
                truncation: t,
                max_length: 12,
                ..opts
            };
            encode_with(&tok, &ds, None, &opts).unwrap()
        };
        let right = cut(Truncation::Right);
        assert_eq!(
            right.items[0]
                .target_mask
                .iter()
                .filter(|&&x| x == 1)
                .count(),
            2
        );
        assert_eq!(right.truncated.len(), 1);
        let left = cut(Truncation::Left);
        assert_eq!(left.items[0].ids[9..], [id("f"), id("g"), p]);
        // cut to 8: no answer left, so the row is left out
        let short = EncodeOptions {
            max_length: 8,
            ..opts
        };
        let err = encode_with(&tok, &ds, None, &short)
            .unwrap_err()
            .to_string();
        assert!(err.contains("assistant turn"), "{err}");
        // without a chat template the row is refused, naming it
        let opts = EncodeOptions {
            chat: None,
            ..EncodeOptions::new(64)
        };
        let err = encode_with(&tok, &ds, None, &opts).unwrap_err().to_string();
        assert!(
            err.contains("c.jsonl:1") && err.contains("chat template"),
            "{err}"
        );
    }

    #[test]
    fn sft_cuts_the_completion_when_the_prompt_is_short() {
        let tok = word_level_tokenizer(WORDS, TokenizerStyle::Llama);
        // Prompt 3 tokens (<s> a b), completion 10 + eos; max 8 → completion keeps 5, no eos.
        let ds = sft_ds(&[("a b", "c d e f g h i j k l")]);
        let enc = &encode(&tok, &ds, None, 8, Some(3)).unwrap()[0];
        assert_eq!(
            enc.ids,
            vec![
                2,
                id("a"),
                id("b"),
                id("c"),
                id("d"),
                id("e"),
                id("f"),
                id("g")
            ]
        );
        assert_eq!(enc.target_mask, vec![0, 0, 0, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn sft_drops_the_start_of_a_long_prompt() {
        let tok = word_level_tokenizer(WORDS, TokenizerStyle::Llama);
        // Prompt <s> + 12 words, completion 4 + eos, max 12: the completion needs 12/4 = 3
        // positions, so the prompt keeps <s> and its last 8 words.
        let ds = sft_ds(&[("a b c d e f g h i j k l", "m n o p")]);
        let enc = &encode(&tok, &ds, None, 12, Some(3)).unwrap()[0];
        let want: Vec<u32> = [2]
            .into_iter()
            .chain(["e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o"].map(id))
            .collect();
        assert_eq!(enc.ids, want);
        assert_eq!(enc.target_mask, [vec![0; 9], vec![1; 3]].concat());
        // A completion shorter than max_length/4 is kept whole, eos included.
        let ds = sft_ds(&[("a b c d e f g h i j k l", "m")]);
        let enc = &encode(&tok, &ds, None, 12, Some(3)).unwrap()[0];
        assert_eq!(enc.ids.len(), 12);
        assert_eq!(enc.ids[0], 2);
        assert_eq!(&enc.ids[10..], &[id("m"), 3]);
        assert_eq!(enc.target_mask, [vec![0; 10], vec![1; 2]].concat());
    }

    #[test]
    fn sft_respects_max_length_everywhere() {
        let tok = word_level_tokenizer(WORDS, TokenizerStyle::Llama);
        let long = "a b c d e f g h i j k l m n o p";
        for (p, c) in [(long, long), ("a", long), (long, "a"), ("a", "b")] {
            let ds = sft_ds(&[(p, c)]);
            for max_length in 2..24 {
                for eos in [None, Some(3)] {
                    let e = &encode(&tok, &ds, None, max_length, eos).unwrap()[0];
                    let n_prompt = 1 + p.split(' ').count();
                    let n_comp = c.split(' ').count() + usize::from(eos.is_some());
                    assert!(e.ids.len() <= max_length);
                    assert_eq!(e.ids.len(), (n_prompt + n_comp).min(max_length));
                    assert_eq!(e.type_ids.len(), e.ids.len());
                    let targets = e.target_mask.iter().filter(|&&m| m == 1).count();
                    // Targets are a suffix of at least min(completion, max(max/4, 1)).
                    assert!(targets >= n_comp.min((max_length / 4).max(1)));
                    assert!(e.target_mask[..e.ids.len() - targets]
                        .iter()
                        .all(|&m| m == 0));
                    assert!(targets < e.ids.len(), "a prompt position remains");
                }
            }
        }
        assert!(encode(&tok, &sft_ds(&[("a", "b")]), None, 1, None).is_err());
    }

    fn with(truncation: Truncation, max_length: usize, eos: Option<u32>) -> EncodeOptions<'static> {
        EncodeOptions {
            eos,
            truncation,
            ..EncodeOptions::new(max_length)
        }
    }

    #[test]
    fn left_truncation_keeps_the_completion_and_its_eos() {
        let tok = word_level_tokenizer(WORDS, TokenizerStyle::Llama);
        // <s> + 8 prompt words + 3 completion words + eos = 13 tokens into 8
        let ds = sft_ds(&[("a b c d e f g h", "i j k"), ("a", "b")]);
        let rows = encode_with(&tok, &ds, None, &with(Truncation::Left, 8, Some(3))).unwrap();
        let want: Vec<u32> = [2]
            .into_iter()
            .chain(["f", "g", "h", "i", "j", "k"].map(id))
            .chain([3])
            .collect();
        assert_eq!(rows.items[0].ids, want);
        assert_eq!(rows.items[0].target_mask, [vec![0; 4], vec![1; 4]].concat());
        assert_eq!(rows.items[1].ids, vec![2, id("a"), id("b"), 3]);
        assert_eq!(rows.truncated.len(), 1);
        assert_eq!(rows.truncated[0].line, 1);
        assert!(
            rows.truncated[0].reason.contains("the start of the prompt"),
            "{}",
            rows.truncated[0]
        );
        // a completion longer than max_length keeps its end after <s>
        let ds = sft_ds(&[("a b", "c d e f g h i j k")]);
        let e = &encode_with(&tok, &ds, None, &with(Truncation::Left, 5, Some(3)))
            .unwrap()
            .items[0];
        assert_eq!(e.ids, vec![2, id("i"), id("j"), id("k"), 3]);
        assert_eq!(e.target_mask, vec![0, 1, 1, 1, 1]);
        // classification keeps the end of the text, and its special tokens
        let tok = word_level_tokenizer(WORDS, TokenizerStyle::Bert);
        let ds = classify_ds(&[("a b c d e f", None, "x")]);
        let labels = LabelSet {
            names: vec!["x".into()],
        };
        let rows = encode_with(&tok, &ds, Some(&labels), &with(Truncation::Left, 5, None)).unwrap();
        assert_eq!(rows.items[0].ids, vec![2, id("d"), id("e"), id("f"), 3]);
        assert!(rows.truncated[0].reason.contains("the start of the text"));
    }

    #[test]
    fn right_truncation_is_counted_and_drop_leaves_rows_out() {
        let tok = word_level_tokenizer(WORDS, TokenizerStyle::Llama);
        // 1 + 2 + 2 + 1 = 6 tokens: fits 6 exactly, not 5
        let ds = sft_ds(&[("a b", "c d"), ("a b c d e f", "g h"), ("a", "b")]);
        let rows = encode_with(&tok, &ds, None, &with(Truncation::Right, 6, Some(3))).unwrap();
        assert_eq!(rows.items.len(), 3);
        let lines: Vec<usize> = rows.truncated.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![2]);
        let reason = &rows.truncated[0].reason;
        assert!(
            reason.starts_with("longer than 6 tokens: ")
                && reason.contains("the end of the completion and its end-of-sequence token"),
            "{reason}"
        );
        let rows = encode_with(&tok, &ds, None, &with(Truncation::Drop, 6, Some(3))).unwrap();
        assert_eq!(rows.items.len(), 2);
        assert!(rows.truncated.is_empty());
        assert_eq!(rows.dropped.len(), 1);
        assert_eq!(
            rows.dropped[0].to_string(),
            "s.jsonl:2: longer than 6 tokens: left out (--truncation drop)"
        );
        let err = encode_with(&tok, &ds, None, &with(Truncation::Drop, 2, Some(3)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s.jsonl") && err.contains("every row"),
            "{err}"
        );
        // classification: exactly max_length is not cut, one more is
        let tok = word_level_tokenizer(WORDS, TokenizerStyle::Bert);
        let ds = classify_ds(&[
            ("a b c", None, "x"),
            ("a b c d", None, "x"),
            ("a b", Some("c d"), "x"),
        ]);
        let labels = LabelSet {
            names: vec!["x".into()],
        };
        let rows =
            encode_with(&tok, &ds, Some(&labels), &with(Truncation::Right, 5, None)).unwrap();
        let lines: Vec<usize> = rows.truncated.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![2, 3]);
        assert!(rows.truncated[1].reason.contains("the longer text"));
    }

    /// Rows of random words over `vocab` and other characters, of every length up to `max`.
    fn random_texts(n: usize, max: usize, vocab: &[&str], seed: u64) -> Vec<String> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let extra = ["é", "ß", "日本", "!", ",", "  ", "\n", "xyzzy", "A"];
        (0..n)
            .map(|_| {
                let len = rng.random_range(0..max);
                let mut s = String::new();
                while s.len() < len {
                    if rng.random_bool(0.8) {
                        s.push_str(vocab[rng.random_range(0..vocab.len())]);
                    } else {
                        s.push_str(extra[rng.random_range(0..extra.len())]);
                    }
                    if rng.random_bool(0.7) {
                        s.push(' ');
                    }
                }
                s
            })
            .collect()
    }

    /// A byte-level BPE (GPT-2 style, split into words first) or, without `words`, one merge
    /// table over the whole text (Llama-2 style, no pre-tokenizer), trained on `corpus`.
    fn bpe(corpus: &[String], words: bool) -> Tokenizer {
        use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
        use tokenizers::models::TrainerWrapper;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::processors::template::TemplateProcessing;
        use tokenizers::AddedToken;
        let mut tok = Tokenizer::new(BPE::default());
        if words {
            tok.with_pre_tokenizer(Some(ByteLevel::default()));
        }
        let specials = ["<s>", "</s>"].map(|s| AddedToken::from(s, true));
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(300)
            .show_progress(false)
            .special_tokens(specials.to_vec())
            .build()
            .into();
        tok.train(&mut trainer, corpus.iter()).unwrap();
        let id = |t: &str| tok.token_to_id(t).unwrap();
        let post = TemplateProcessing::builder()
            .try_single("<s> $A")
            .and_then(|b| b.try_pair("<s> $A </s> $B:1"))
            .unwrap()
            .special_tokens(vec![("<s>", id("<s>")), ("</s>", id("</s>"))])
            .build()
            .unwrap();
        tok.with_post_processor(Some(post));
        tok
    }

    /// Tokenizing only the part of a long text that reaches the kept tokens gives what
    /// tokenizing the whole text gives, for every truncation, row length and kind of
    /// tokenizer; first cuts of 1 byte per token make most rows go through the check.
    #[test]
    fn tokenizing_part_of_a_row_equals_tokenizing_it_whole() {
        let vocab = ["the", "movie", "plot", "a", "b", "c", "good", "was"];
        let corpus = random_texts(200, 400, &vocab, 1);
        let tokenizers = [
            word_level_tokenizer(WORDS, TokenizerStyle::Bert),
            word_level_tokenizer(WORDS, TokenizerStyle::Llama),
            bpe(&corpus, true),
            bpe(&corpus, false),
        ];
        let texts = random_texts(60, 3000, &vocab, 2);
        for (k, tok) in tokenizers.iter().enumerate() {
            let rows: Vec<(String, Option<String>)> = texts
                .chunks(2)
                .enumerate()
                .map(|(i, p)| match i % 4 {
                    // a short row, so that --truncation drop keeps some
                    1 => ("a b".to_string(), None),
                    _ => (p[0].clone() + "x", (i % 3 == 0).then(|| p[1].clone() + "y")),
                })
                .collect();
            let classify = classify_ds(
                &rows
                    .iter()
                    .map(|(t, p)| (t.as_str(), p.as_deref(), "x"))
                    .collect::<Vec<_>>(),
            );
            let sft = sft_ds(
                &rows
                    .iter()
                    .map(|(t, p)| (t.as_str(), p.as_deref().unwrap_or("b c")))
                    .collect::<Vec<_>>(),
            );
            let labels = LabelSet {
                names: vec!["x".into()],
            };
            for truncation in [Truncation::Right, Truncation::Left, Truncation::Drop] {
                for max_length in [8, 33] {
                    let opts = with(truncation, max_length, Some(3));
                    for (ds, labels) in [(&classify, Some(&labels)), (&sft, None)] {
                        let whole = encode_rows(tok, ds, labels, &opts, None).unwrap();
                        for bytes_per_token in [1, 8] {
                            let part =
                                encode_rows(tok, ds, labels, &opts, Some(bytes_per_token)).unwrap();
                            assert!(
                                part == whole,
                                "tokenizer {k}, {truncation}, max_length {max_length}, {bytes_per_token} bytes per token"
                            );
                        }
                    }
                }
            }
        }
    }
}
