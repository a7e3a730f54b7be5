//! Tokenisation of a dataset. Classification: text (and text pair) with the tokenizer's special
//! tokens, truncated longest-first to `max_length` by the tokenizer itself so the special
//! tokens survive. SFT: prompt (with special tokens) ++ completion (without) ++ eos, with a
//! target mask of 1 on the completion and eos; too-long rows lose the end of the completion,
//! and when the prompt alone would leave less than a quarter of `max_length` to the
//! completion, they lose the start of the prompt (its leading special tokens are kept).

use std::collections::HashMap;

use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use super::{Dataset, Example, LabelSet, Record};
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

/// Tokenises every record of `ds` (see the module documentation). `labels` is required for
/// classification data; `eos` is appended to SFT completions when given.
pub fn encode(
    tok: &Tokenizer,
    ds: &Dataset,
    labels: Option<&LabelSet>,
    max_length: usize,
    eos: Option<u32>,
) -> Result<Vec<Encoded>> {
    encode_with(tok, ds, labels, max_length, eos, None)
}

/// [`encode`], with SFT prompts wrapped by a chat template (a user turn, the assistant's turn
/// opened) when one is given; the rendered prompt is tokenized without added special tokens.
pub fn encode_with(
    tok: &Tokenizer,
    ds: &Dataset,
    labels: Option<&LabelSet>,
    max_length: usize,
    eos: Option<u32>,
    chat: Option<&crate::chat::ChatTemplate>,
) -> Result<Vec<Encoded>> {
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
            direction: TruncationDirection::Right,
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| Error::msg(format!("cannot truncate to {max_length} tokens: {e}")))?;
        Some(t)
    } else {
        None
    };
    if has_sft {
        if max_length < 2 {
            return Err(Error::msg(format!(
                "max_length {max_length} is too short for prompt/completion data; use at least 2"
            )));
        }
        tok.with_truncation(None)
            .map_err(|e| Error::msg(format!("cannot disable truncation: {e}")))?;
    }
    let label_index: Option<HashMap<&str, usize>> = labels.map(|set| {
        set.names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect()
    });

    let mut out = Vec::with_capacity(ds.records.len());
    for record in &ds.records {
        let enc = match &record.example {
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
                encode_classify(t, ds, record, text, text_pair.as_deref(), label)?
            }
            Example::Sft { prompt, completion } => {
                encode_sft(&tok, ds, record, prompt, completion, max_length, eos, chat)?
            }
        };
        debug_assert!(enc.ids.len() <= max_length);
        out.push(enc);
    }
    Ok(out)
}

fn tokenizer_error(ds: &Dataset, record: &Record, e: impl std::fmt::Display) -> Error {
    Error::msg(format!("{}: cannot tokenize: {e}", ds.locate(record)))
}

fn encode_classify(
    tok: &Tokenizer,
    ds: &Dataset,
    record: &Record,
    text: &str,
    text_pair: Option<&str>,
    label: usize,
) -> Result<Encoded> {
    let enc = match text_pair {
        Some(pair) => tok.encode((text, pair), true),
        None => tok.encode(text, true),
    }
    .map_err(|e| tokenizer_error(ds, record, e))?;
    if enc.is_empty() {
        return Err(Error::msg(format!(
            "{}: the text encodes to no tokens",
            ds.locate(record)
        )));
    }
    Ok(Encoded {
        ids: enc.get_ids().to_vec(),
        type_ids: enc.get_type_ids().to_vec(),
        label: Some(label),
        target_mask: vec![0; enc.len()],
    })
}

#[allow(clippy::too_many_arguments)]
fn encode_sft(
    tok: &Tokenizer,
    ds: &Dataset,
    record: &Record,
    prompt: &str,
    completion: &str,
    max_length: usize,
    eos: Option<u32>,
    chat: Option<&crate::chat::ChatTemplate>,
) -> Result<Encoded> {
    let p = match chat {
        None => tok.encode(prompt, true),
        Some(c) => {
            let text = c
                .user_prompt(prompt)
                .map_err(|e| Error::msg(format!("{}: {e}", ds.locate(record))))?;
            tok.encode(text, false)
        }
    }
    .map_err(|e| tokenizer_error(ds, record, e))?;
    let c = tok
        .encode(completion, false)
        .map_err(|e| tokenizer_error(ds, record, e))?;
    let mut p_ids = p.get_ids().to_vec();
    let mut p_types = p.get_type_ids().to_vec();
    let mut comp: Vec<u32> = c.get_ids().to_vec();
    comp.extend(eos);
    if comp.is_empty() {
        return Err(Error::msg(format!(
            "{}: the completion encodes to no tokens",
            ds.locate(record)
        )));
    }
    if p_ids.len() + comp.len() > max_length {
        // At least a quarter of max_length for the completion (the whole of a shorter one),
        // and at least one prompt position.
        let min_comp = comp.len().min((max_length / 4).max(1)).min(max_length - 1);
        let keep_prompt = p_ids.len().min(max_length - min_comp);
        if keep_prompt < p_ids.len() {
            // Drop from the start of the prompt, after its leading special tokens (bos).
            let specials = p
                .get_special_tokens_mask()
                .iter()
                .take_while(|&&m| m == 1)
                .count();
            let drop = p_ids.len() - keep_prompt;
            let (from, to) = if keep_prompt > specials && specials + drop <= p_ids.len() {
                (specials, specials + drop)
            } else {
                (0, drop)
            };
            p_ids.drain(from..to);
            p_types.drain(from..to);
        }
        comp.truncate(max_length - p_ids.len());
    }
    let n_prompt = p_ids.len();
    let n_comp = comp.len();
    let mut ids = p_ids;
    ids.extend_from_slice(&comp);
    let mut type_ids = p_types;
    type_ids.extend(std::iter::repeat_n(0, n_comp));
    let mut target_mask = vec![0u8; n_prompt];
    target_mask.extend(std::iter::repeat_n(1u8, n_comp));
    Ok(Encoded {
        ids,
        type_ids,
        label: None,
        target_mask,
    })
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
        let enc = &encode_with(&tok, &ds, None, 64, Some(3), Some(&chat)).unwrap()[0];
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
        let err = encode_with(&tok, &ds, None, 64, Some(3), Some(&bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("s.jsonl:1"), "{err}");
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
}
