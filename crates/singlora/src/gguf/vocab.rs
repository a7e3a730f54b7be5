//! A Hugging Face BPE tokenizer (tokenizer.json, tokenizer_config.json) as the
//! `tokenizer.*` metadata llama.cpp reads: the token strings by id, their types, the merges,
//! the pre-tokenizer's name, the special token ids, whether a BOS/EOS is added, and the chat
//! template.
//!
//! - Token ids without a token up to the model's `vocab_size` become `[PAD<id>]` of type
//!   unused, as llama.cpp's converter writes them (the embedding matrix has a row for each).
//! - Types: an added special token is control (3), an added ordinary one user-defined (4),
//!   every other token normal (1).
//! - `tokenizer.ggml.pre` names the text splitting before BPE; it is read off the pre-tokenizer
//!   (GPT-2's byte-level regex, SmolLM's digits-then-GPT-2, LLaMA 3's and Qwen2's regexes).
//!   Any other is refused: llama.cpp would split text differently from the model's training.
//! - A BPE vocabulary with byte fallback (LLaMA 2's, Mistral v0.1's, TinyLlama's: SentencePiece
//!   pieces with ▁ for spaces) is written as llama.cpp's SentencePiece tokenizer (`llama`):
//!   the pieces by id, scores that rank them in id order (SentencePiece's own order, which its
//!   merges follow), `<0xNN>` pieces as bytes, the unknown piece, and `add_space_prefix` from
//!   the normalizer's or Metaspace's prefix. Unigram vocabularies are refused.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::checkpoint::read_json;
use crate::error::{Error, Result};

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const BYTE: i32 = 6;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Qwen2's split (single digits, newlines kept apart).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-fallback piece, `<0x41>`.
fn is_byte_piece(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether a SentencePiece-style tokenizer.json puts a ▁ before the text (llama.cpp's
/// `add_space_prefix`): spaces must become ▁ either by the normalizer (Replace, after an
/// optional Prepend) with no pre-tokenizer, or by a Metaspace pre-tokenizer that does not split;
/// anything else would split text differently in llama.cpp.
fn spm_space_prefix(path: &Path, tj: &Json) -> Result<bool> {
    let ty = |v: &Json| v["type"].as_str().unwrap_or("").to_string();
    let is_replace = |v: &Json| {
        ty(v) == "Replace" && v["pattern"]["String"] == " " && v["content"] == "\u{2581}"
    };
    let is_prepend = |v: &Json| ty(v) == "Prepend" && v["prepend"] == "\u{2581}";
    let (norm, pre) = (&tj["normalizer"], &tj["pre_tokenizer"]);
    // Gemma's split at spaces, which the normalizer has already turned into ▁: nothing to split
    let no_op_split = ty(pre) == "Split" && pre["pattern"]["String"] == " ";
    let by_normalizer = if pre.is_null() || no_op_split {
        match ty(norm).as_str() {
            "Replace" if is_replace(norm) => Some(false),
            "Sequence" => match norm["normalizers"].as_array().map(Vec::as_slice) {
                Some([p, r]) if is_prepend(p) && is_replace(r) => Some(true),
                Some([r]) if is_replace(r) => Some(false),
                _ => None,
            },
            _ => None,
        }
    } else {
        None
    };
    let by_metaspace = (norm.is_null()
        && ty(pre) == "Metaspace"
        && pre["replacement"] == "\u{2581}"
        && pre["split"].as_bool() == Some(false))
    .then(|| pre["prepend_scheme"].as_str() != Some("never"));
    by_normalizer.or(by_metaspace).ok_or_else(|| {
        Error::bad_field(
            path,
            "normalizer",
            format!(
                "{norm} with pre-tokenizer {pre}: a byte-fallback vocabulary is written as llama.cpp's SentencePiece tokenizer, which turns spaces into ▁ (after one put before the text, or not) and nothing else"
            ),
        )
    })
}

fn string(s: impl Into<String>) -> Value {
    Value::String(s.into())
}

/// The `tokenizer.*` metadata of the Hugging Face model directory `dir`, for a model of
/// `vocab` embedding rows whose config.json is `config`.
pub fn hf_tokenizer_metadata(
    dir: &Path,
    config: &Json,
    vocab: usize,
) -> Result<Vec<(String, Value)>> {
    let tj_path = dir.join("tokenizer.json");
    if !tj_path.is_file() {
        return Err(Error::msg(format!(
            "{} has no tokenizer.json: a GGUF file carries its tokenizer, and singlora builds it from tokenizer.json",
            dir.display()
        )));
    }
    let tj = read_json(&tj_path)?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() {
        Some(read_json(&tc_path)?)
    } else {
        None
    };
    let model = &tj["model"];
    let kind = model["type"].as_str().unwrap_or("BPE");
    if kind != "BPE" {
        return Err(Error::bad_field(
            &tj_path,
            "model",
            format!(
                "is a {kind} vocabulary; GGUF export writes BPE vocabularies (byte-level as LLaMA 3, SmolLM and Qwen2's, or with byte fallback as LLaMA 2's) only"
            ),
        ));
    }
    // LLaMA 2's kind: SentencePiece pieces (spaces as ▁) with byte fallback, llama.cpp's `llama`
    // tokenizer; otherwise byte-level BPE, its `gpt2`
    let spm = if model["byte_fallback"].as_bool() == Some(true) {
        Some(spm_space_prefix(&tj_path, &tj)?)
    } else {
        None
    };
    let pre = match spm {
        Some(_) => "default",
        None => pre_name(&tj_path, &tj["pre_tokenizer"])?,
    };
    let unk = model["unk_token"].as_str();

    // id → (token, type)
    let mut by_id: BTreeMap<usize, (String, i32)> = BTreeMap::new();
    let vocab_map = model["vocab"].as_object().ok_or_else(|| {
        Error::bad_field(&tj_path, "model.vocab", "must be an object of token → id")
    })?;
    for (tok, id) in vocab_map {
        let id = id.as_u64().ok_or_else(|| {
            Error::bad_field(
                &tj_path,
                "model.vocab",
                format!("id of {tok:?} is not an integer"),
            )
        })? as usize;
        let ty = match spm {
            Some(_) if is_byte_piece(tok) => BYTE,
            Some(_) if Some(tok.as_str()) == unk => UNKNOWN,
            _ => NORMAL,
        };
        by_id.insert(id, (tok.clone(), ty));
    }
    for (i, added) in tj["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            return Err(Error::bad_field(
                &tj_path,
                format!("added_tokens[{i}]"),
                "needs an integer `id` and a string `content`",
            ));
        };
        let ty = match by_id.get(&(id as usize)) {
            // a vocabulary piece also listed as added keeps its kind (LLaMA 2's bytes, <unk>)
            Some((t, ty @ (BYTE | UNKNOWN))) if t == content => *ty,
            _ if added["special"].as_bool() == Some(true) => CONTROL,
            _ => USER_DEFINED,
        };
        by_id.insert(id as usize, (content.to_string(), ty));
    }
    let n_tok = by_id.keys().next_back().map_or(0, |m| m + 1);
    if n_tok > vocab {
        return Err(Error::msg(format!(
            "{} has token ids up to {} but the model's embedding has {vocab} rows",
            tj_path.display(),
            n_tok - 1
        )));
    }
    let mut tokens = Vec::with_capacity(vocab);
    let mut types = Vec::with_capacity(vocab);
    let mut ids: BTreeMap<&str, usize> = BTreeMap::new();
    for id in 0..vocab {
        let (tok, ty) = match by_id.get(&id) {
            Some((t, ty)) => (t.clone(), *ty),
            None => (format!("[PAD{id}]"), UNUSED),
        };
        tokens.push(tok);
        types.push(ty);
    }
    for (id, tok) in tokens.iter().enumerate() {
        if ids.insert(tok.as_str(), id).is_some() {
            return Err(Error::msg(format!(
                "{}: token {tok:?} appears twice; a GGUF vocabulary needs each token once",
                tj_path.display()
            )));
        }
    }

    if let Some(prefix) = spm {
        // llama.cpp merges the pair whose piece scores highest: the pieces' order, as
        // SentencePiece scores them
        let scores = types
            .iter()
            .enumerate()
            .map(|(id, ty)| Value::F32(if *ty == NORMAL { -(id as f32) } else { 0.0 }))
            .collect();
        let mut md: Vec<(String, Value)> = vec![
            ("tokenizer.ggml.model".into(), string("llama")),
            ("tokenizer.ggml.pre".into(), string(pre)),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(tokens.iter().map(|t| string(t.clone())).collect()),
            ),
            ("tokenizer.ggml.scores".into(), Value::Array(scores)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            (
                "tokenizer.ggml.add_space_prefix".into(),
                Value::Bool(prefix),
            ),
        ];
        md.extend(special_ids(config, tc.as_ref(), &ids, vocab, &tj));
        md.extend(chat_templates(dir, &tc_path, tc.as_ref())?);
        return Ok(md);
    }

    let mut merges = vec![];
    for (i, m) in model["merges"].as_array().into_iter().flatten().enumerate() {
        let pair = match m {
            Json::String(s) => s.clone(),
            Json::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) if !a.contains(' ') && !b.contains(' ') => format!("{a} {b}"),
                _ => String::new(),
            },
            _ => String::new(),
        };
        if pair.is_empty() {
            return Err(Error::bad_field(
                &tj_path,
                format!("model.merges[{i}]"),
                format!("{m} is not a pair of tokens without spaces, which GGUF stores as \"left right\""),
            ));
        }
        merges.push(string(pair));
    }

    let mut md: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), string("gpt2")),
        ("tokenizer.ggml.pre".into(), string(pre)),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| string(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];

    md.extend(special_ids(config, tc.as_ref(), &ids, vocab, &tj));
    md.extend(chat_templates(dir, &tc_path, tc.as_ref())?);
    Ok(md)
}

/// The special token ids (BOS, EOS, unknown, padding; from tokenizer_config.json's tokens, else
/// config.json's ids) and whether a BOS and an EOS are added (tokenizer_config.json's flags,
/// else the post-processor's template).
fn special_ids(
    config: &Json,
    tc: Option<&Json>,
    ids: &BTreeMap<&str, usize>,
    vocab: usize,
    tj: &Json,
) -> Vec<(String, Value)> {
    let mut md = vec![];
    let token_id = |field: &str| -> Option<usize> {
        let t = tc?.get(field)?;
        let s = t.as_str().or_else(|| t.get("content")?.as_str())?;
        ids.get(s).copied()
    };
    let config_id = |field: &str| -> Option<usize> {
        let v = config.get(field)?;
        v.as_u64()
            .or_else(|| v.as_array()?.first()?.as_u64())
            .map(|x| x as usize)
    };
    for (key, tc_field, config_field) in [
        ("bos_token_id", "bos_token", Some("bos_token_id")),
        ("eos_token_id", "eos_token", Some("eos_token_id")),
        ("unknown_token_id", "unk_token", None),
        ("padding_token_id", "pad_token", Some("pad_token_id")),
    ] {
        let id = token_id(tc_field).or_else(|| config_field.and_then(config_id));
        if let Some(id) = id.filter(|&i| i < vocab) {
            md.push((format!("tokenizer.ggml.{key}"), Value::U32(id as u32)));
        }
    }
    let (bos_added, eos_added) = post_processor_adds(&tj["post_processor"]);
    let flag = |field: &str| tc.and_then(|c| c.get(field)?.as_bool());
    md.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(flag("add_bos_token").unwrap_or(bos_added)),
    ));
    md.push((
        "tokenizer.ggml.add_eos_token".into(),
        Value::Bool(flag("add_eos_token").unwrap_or(eos_added)),
    ));
    md
}

/// llama.cpp's name for the pre-tokenizer of tokenizer.json.
fn pre_name(path: &Path, pre: &Json) -> Result<&'static str> {
    let ty = |v: &Json| v["type"].as_str().unwrap_or("").to_string();
    let byte_level = |v: &Json, regex: bool| {
        ty(v) == "ByteLevel" && v["use_regex"].as_bool().unwrap_or(true) == regex
    };
    let split_regex = |v: &Json| -> Option<String> {
        (ty(v) == "Split").then(|| v["pattern"]["Regex"].as_str().map(str::to_string))?
    };
    let name = match ty(pre).as_str() {
        "ByteLevel" if byte_level(pre, true) => Some("gpt-2"),
        "Sequence" => {
            let parts = pre["pretokenizers"].as_array().cloned().unwrap_or_default();
            match parts.as_slice() {
                [d, b]
                    if ty(d) == "Digits"
                        && d["individual_digits"].as_bool() == Some(true)
                        && byte_level(b, true) =>
                {
                    Some("smollm")
                }
                [s, b] if byte_level(b, false) => match split_regex(s).as_deref() {
                    Some(r) if r == super::LLAMA3_SPLIT => Some("llama-bpe"),
                    Some(r) if r == QWEN2_SPLIT => Some("qwen2"),
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    };
    name.ok_or_else(|| {
        Error::bad_field(
            path,
            "pre_tokenizer",
            format!(
                "{pre} is not a pre-tokenizer llama.cpp knows by name (supported: GPT-2's byte-level regex, SmolLM's digits then byte-level, LLaMA 3's and Qwen2's split regexes); llama.cpp would split text differently"
            ),
        )
    })
}

/// Whether tokenizer.json's post-processor puts a special token before (BOS) and after (EOS) a
/// single sequence.
fn post_processor_adds(pp: &Json) -> (bool, bool) {
    let single = match pp["type"].as_str() {
        Some("TemplateProcessing") => pp["single"].as_array().cloned(),
        Some("Sequence") => pp["processors"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["type"] == "TemplateProcessing")
            .and_then(|p| p["single"].as_array().cloned()),
        _ => None,
    };
    let Some(single) = single else {
        return (false, false);
    };
    let special = |v: Option<&Json>| v.is_some_and(|v| v.get("SpecialToken").is_some());
    (special(single.first()), special(single.last()))
}

/// `tokenizer.chat_template` (and llama.cpp's `tokenizer.chat_template.<name>` for the named
/// extra templates) from tokenizer_config.json, or from chat_template.jinja beside it.
fn chat_templates(dir: &Path, tc_path: &Path, tc: Option<&Json>) -> Result<Vec<(String, Value)>> {
    let mut out = vec![];
    match tc.and_then(|c| c.get("chat_template")) {
        Some(Json::String(t)) => out.push(("tokenizer.chat_template".into(), string(t.clone()))),
        Some(Json::Array(list)) => {
            for (i, item) in list.iter().enumerate() {
                let (Some(name), Some(t)) = (item["name"].as_str(), item["template"].as_str())
                else {
                    return Err(Error::bad_field(
                        tc_path,
                        format!("chat_template[{i}]"),
                        "needs a string `name` and `template`",
                    ));
                };
                let key = if name == "default" {
                    "tokenizer.chat_template".to_string()
                } else {
                    format!("tokenizer.chat_template.{name}")
                };
                out.push((key, string(t)));
            }
        }
        Some(Json::Null) | None => {
            let p = dir.join("chat_template.jinja");
            if p.is_file() {
                let t = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
                out.push(("tokenizer.chat_template".into(), string(t)));
            }
        }
        Some(other) => {
            return Err(Error::bad_field(
                tc_path,
                "chat_template",
                format!("must be a string or a list of named templates, found {other}"),
            ))
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pre_tokenizers_are_named_as_llama_cpp_names_them() {
        let p = Path::new("tokenizer.json");
        let bl = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": regex});
        let split = |r: &str| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false});
        let seq = |a: Json, b: Json| json!({"type": "Sequence", "pretokenizers": [a, b]});
        let digits = json!({"type": "Digits", "individual_digits": true});
        assert_eq!(pre_name(p, &bl(true)).unwrap(), "gpt-2");
        assert_eq!(
            pre_name(p, &seq(digits.clone(), bl(true))).unwrap(),
            "smollm"
        );
        assert_eq!(
            pre_name(p, &seq(split(super::super::LLAMA3_SPLIT), bl(false))).unwrap(),
            "llama-bpe"
        );
        assert_eq!(
            pre_name(p, &seq(split(QWEN2_SPLIT), bl(false))).unwrap(),
            "qwen2"
        );
        for other in [
            json!({"type": "Metaspace", "replacement": "▁"}),
            bl(false),
            seq(split(r"\s+"), bl(false)),
            seq(
                json!({"type": "Digits", "individual_digits": false}),
                bl(true),
            ),
            Json::Null,
        ] {
            let e = pre_name(p, &other).unwrap_err().to_string();
            assert!(
                e.contains("tokenizer.json") && e.contains("pre_tokenizer"),
                "{e}"
            );
        }
    }

    #[test]
    fn bos_and_eos_come_from_the_post_processor() {
        let tp = |single: Json| json!({"type": "TemplateProcessing", "single": single});
        let special = json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
        let seq = json!({"Sequence": {"id": "A", "type_id": 0}});
        assert_eq!(
            post_processor_adds(&tp(json!([special, seq]))),
            (true, false)
        );
        assert_eq!(
            post_processor_adds(&tp(json!([seq, special]))),
            (false, true)
        );
        let both = json!({"type": "Sequence", "processors": [
            {"type": "ByteLevel"}, tp(json!([special, seq, special]))]});
        assert_eq!(post_processor_adds(&both), (true, true));
        assert_eq!(
            post_processor_adds(&json!({"type": "ByteLevel"})),
            (false, false)
        );
    }

    #[test]
    fn named_chat_templates_and_jinja_files() {
        let dir = tempfile::tempdir().unwrap();
        let tc = json!({"chat_template": [
            {"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]});
        let md = chat_templates(dir.path(), Path::new("tc.json"), Some(&tc)).unwrap();
        let keys: Vec<_> = md.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "tokenizer.chat_template",
                "tokenizer.chat_template.tool_use"
            ]
        );
        std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
        let md = chat_templates(dir.path(), Path::new("tc.json"), Some(&json!({}))).unwrap();
        assert_eq!(format!("{:?}", md[0].1), "String(\"J\")");
        let e = chat_templates(
            dir.path(),
            Path::new("tc.json"),
            Some(&json!({"chat_template": 3})),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tc.json") && e.contains("chat_template"), "{e}");
    }

    #[test]
    fn unigram_and_unknown_space_handling_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |tj: serde_json::Value| {
            std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap()
        };
        // byte fallback, but spaces split by a Metaspace that splits words
        write(
            json!({"model": {"type": "BPE", "byte_fallback": true, "vocab": {}, "merges": []},
                     "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "split": true}}),
        );
        let e = hf_tokenizer_metadata(dir.path(), &json!({}), 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("normalizer") && e.contains('\u{2581}'),
            "{e}"
        );
        write(json!({"model": {"type": "Unigram", "vocab": []}}));
        let e = hf_tokenizer_metadata(dir.path(), &json!({}), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Unigram"), "{e}");
        let e = hf_tokenizer_metadata(&dir.path().join("none"), &json!({}), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no tokenizer.json"), "{e}");
    }
}
