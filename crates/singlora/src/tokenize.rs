//! Tokenizers: loading a model's `tokenizer.json` (with any truncation and padding stored in
//! the file switched off, since singlora truncates and pads batches itself), finding the
//! pad / bos / eos ids from `config.json` or the vocabulary, and building small word-level
//! tokenizers (BERT-style or LLaMA-style) for tests and synthetic checkpoints.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::normalizers::utils::Lowercase;
use tokenizers::pre_tokenizers::punctuation::Punctuation;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// Loads a tokenizer from a model directory (its `tokenizer.json`) or from a `tokenizer.json`
/// file, with the file's truncation and padding disabled.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let file: PathBuf = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    if !file.exists() {
        return Err(Error::bad_file(
            &file,
            "not found; singlora needs the model's tokenizer.json",
        ));
    }
    if !file.is_file() {
        return Err(Error::bad_file(
            &file,
            "is not a file; singlora needs the model's tokenizer.json",
        ));
    }
    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
    let mut tok = Tokenizer::from_bytes(&bytes).map_err(|e| {
        Error::bad_file(
            &file,
            format!("not a tokenizer.json that the tokenizers library can read: {e}"),
        )
    })?;
    tok.with_truncation(None)
        .map_err(|e| Error::bad_file(&file, format!("cannot disable truncation: {e}")))?;
    tok.with_padding(None);
    Ok(tok)
}

/// The ids of the padding, beginning-of-sequence and end-of-sequence tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    pub pad: u32,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

const PAD_TOKENS: &[&str] = &["[PAD]", "<pad>", "<|pad|>", "<PAD>", "<|padding|>"];
const BOS_TOKENS: &[&str] = &[
    "<s>",
    "<|begin_of_text|>",
    "<bos>",
    "<|startoftext|>",
    "<|im_start|>",
    "[CLS]",
];
const EOS_TOKENS: &[&str] = &[
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<eos>",
    "[SEP]",
];

/// Reads a token id from a config field: an integer, or a list of integers (the first is
/// taken). `null`, a missing field or anything else gives `None`.
/// `field` of config.json, or of its `text_config` (multimodal models such as Gemma 3 keep the
/// language model's ids there).
fn config_id(config: Option<&Value>, field: &str) -> Option<u32> {
    let config = config?;
    let v = config
        .get(field)
        .filter(|v| !v.is_null())
        .or_else(|| config.get("text_config")?.get(field))?;
    let v = match v {
        Value::Array(items) => items.first()?,
        other => other,
    };
    v.as_u64().and_then(|id| u32::try_from(id).ok())
}

fn vocab_id(tok: &Tokenizer, candidates: &[&str]) -> Option<u32> {
    candidates.iter().find_map(|t| tok.token_to_id(t))
}

/// Finds the special token ids: from `config.json` (`pad_token_id`, `bos_token_id`,
/// `eos_token_id`, the first of a list) when given, else by looking the usual token strings
/// up in the vocabulary. Padding falls back to eos, then to 0.
pub fn special_tokens(tok: &Tokenizer, config: Option<&Value>) -> SpecialTokens {
    let bos = config_id(config, "bos_token_id").or_else(|| vocab_id(tok, BOS_TOKENS));
    let eos = config_id(config, "eos_token_id").or_else(|| vocab_id(tok, EOS_TOKENS));
    let pad = config_id(config, "pad_token_id")
        .or_else(|| vocab_id(tok, PAD_TOKENS))
        .or(eos)
        .unwrap_or(0);
    SpecialTokens { pad, bos, eos }
}

/// The special-token layout of a [`word_level_tokenizer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerStyle {
    /// `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3; `[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]`
    /// (type ids 0 / 1).
    Bert,
    /// `<pad>`=0, `<unk>`=1, `<s>`=2, `</s>`=3; `<s>` is prepended.
    Llama,
}

/// A word-level tokenizer (lowercasing, split on whitespace and punctuation) over `words`,
/// which get ids from 4 on in order (repeated words keep their first id); ids 0–3 are the
/// special tokens of `style`.
pub fn word_level_tokenizer(words: &[&str], style: TokenizerStyle) -> Tokenizer {
    let specials: [&str; 4] = match style {
        TokenizerStyle::Bert => ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        TokenizerStyle::Llama => ["<pad>", "<unk>", "<s>", "</s>"],
    };
    let mut entries: Vec<(String, u32)> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| (s.to_string(), i as u32))
        .collect();
    for w in words {
        let w = w.to_lowercase();
        if !entries.iter().any(|(e, _)| *e == w) {
            let id = entries.len() as u32;
            entries.push((w, id));
        }
    }
    let model = WordLevel::builder()
        .vocab(entries.into_iter().collect())
        .unk_token(specials[1].to_string())
        .build()
        .expect("a word-level vocabulary with its unknown token is valid");
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(Lowercase))
        .expect("lowercase normaliser");
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        WhitespaceSplit.into(),
        Punctuation::default().into(),
    ])));
    let processor = match style {
        TokenizerStyle::Bert => TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .and_then(|b| b.try_pair("[CLS] $A [SEP] $B:1 [SEP]:1"))
            .expect("template")
            .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
            .build(),
        TokenizerStyle::Llama => TemplateProcessing::builder()
            .try_single("<s> $A")
            .and_then(|b| b.try_pair("<s> $A <s>:1 $B:1"))
            .expect("template")
            .special_tokens(vec![("<s>", 2)])
            .build(),
    }
    .expect("post-processor");
    tok.with_post_processor(Some(processor));
    tok.add_special_tokens(specials.map(|s| AddedToken::from(s, true)))
        .expect("special tokens");
    tok
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bert_style_encodes_single_and_pair() {
        let tok = word_level_tokenizer(&["hello", "world", "!"], TokenizerStyle::Bert);
        let enc = tok.encode("Hello, world!", true).unwrap();
        // "," is not in the vocabulary: [UNK].
        assert_eq!(enc.get_ids(), &[2, 4, 1, 5, 6, 3]);
        let enc = tok.encode(("hello", "world"), true).unwrap();
        assert_eq!(enc.get_ids(), &[2, 4, 3, 5, 3]);
        assert_eq!(enc.get_type_ids(), &[0, 0, 0, 1, 1]);
        let enc = tok.encode("hello world", false).unwrap();
        assert_eq!(enc.get_ids(), &[4, 5]);
    }

    #[test]
    fn llama_style_prepends_bos() {
        let tok = word_level_tokenizer(&["a", "b"], TokenizerStyle::Llama);
        assert_eq!(tok.encode("a b c", true).unwrap().get_ids(), &[2, 4, 5, 1]);
        assert_eq!(tok.encode("A", false).unwrap().get_ids(), &[4]);
        let st = special_tokens(&tok, None);
        assert_eq!(
            st,
            SpecialTokens {
                pad: 0,
                bos: Some(2),
                eos: Some(3)
            }
        );
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        for style in [TokenizerStyle::Bert, TokenizerStyle::Llama] {
            let tok = word_level_tokenizer(&["the", "cat", "sat", "."], style);
            let file = dir.path().join("tokenizer.json");
            tok.save(&file, false).unwrap();
            for path in [dir.path(), file.as_path()] {
                let back = load_tokenizer(path).unwrap();
                for text in ["The cat sat.", "the dog"] {
                    assert_eq!(
                        back.encode(text, true).unwrap().get_ids(),
                        tok.encode(text, true).unwrap().get_ids()
                    );
                }
                assert_eq!(
                    back.encode(("the cat", "sat"), true)
                        .unwrap()
                        .get_type_ids(),
                    tok.encode(("the cat", "sat"), true).unwrap().get_type_ids()
                );
                assert_eq!(special_tokens(&back, None), special_tokens(&tok, None));
            }
        }
    }

    #[test]
    fn stored_truncation_and_padding_are_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let mut tok = word_level_tokenizer(&["a"], TokenizerStyle::Bert);
        tok.with_truncation(Some(tokenizers::TruncationParams {
            max_length: 4,
            ..Default::default()
        }))
        .unwrap();
        tok.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(16),
            ..Default::default()
        }));
        tok.save(dir.path().join("tokenizer.json"), false).unwrap();
        let back = load_tokenizer(dir.path()).unwrap();
        assert!(back.get_truncation().is_none());
        assert!(back.get_padding().is_none());
        assert_eq!(back.encode("a a a a a a", true).unwrap().len(), 8);
    }

    #[test]
    fn missing_and_broken_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_tokenizer(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json: not found"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        let file = dir.path().join("tokenizer.json");
        std::fs::write(&file, "{not json").unwrap();
        let err = load_tokenizer(&file).unwrap_err().to_string();
        assert!(err.starts_with(&file.display().to_string()), "{err}");
    }

    #[test]
    fn config_ids_win_over_vocabulary() {
        let tok = word_level_tokenizer(&["x"], TokenizerStyle::Bert);
        let from_vocab = special_tokens(&tok, None);
        assert_eq!(
            from_vocab,
            SpecialTokens {
                pad: 0,
                bos: Some(2),
                eos: Some(3)
            }
        );
        let cfg = json!({"pad_token_id": null, "bos_token_id": 7, "eos_token_id": [9, 10]});
        let st = special_tokens(&tok, Some(&cfg));
        assert_eq!(st.bos, Some(7));
        assert_eq!(st.eos, Some(9));
        let multimodal =
            json!({"text_config": {"bos_token_id": 5, "eos_token_id": 6}, "eos_token_id": 8});
        let st = special_tokens(&tok, Some(&multimodal));
        assert_eq!((st.bos, st.eos), (Some(5), Some(8)));
        assert_eq!(st.pad, 0, "null pad id: found in the vocabulary");
        // A tokenizer with no pad token in its vocabulary pads with eos.
        let bare = Tokenizer::new(
            WordLevel::builder()
                .vocab(
                    [("a".to_string(), 0), ("</s>".to_string(), 1)]
                        .into_iter()
                        .collect(),
                )
                .unk_token("a".into())
                .build()
                .unwrap(),
        );
        let st = special_tokens(&bare, None);
        assert_eq!(
            st,
            SpecialTokens {
                pad: 1,
                bos: None,
                eos: Some(1)
            }
        );
        let st = special_tokens(&bare, Some(&json!({"eos_token_id": 5})));
        assert_eq!(st.pad, 5);
    }
}
