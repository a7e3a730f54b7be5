//! Rows longer than `max_length` tokens: how they are shortened ([`Truncation`]), and
//! tokenizing only the part of a long text that can reach the kept tokens, so that the memory
//! and time a row costs follow `max_length`, not the row.
//!
//! A text longer than twice a budget of b = n·c bytes (n tokens kept, c bytes per token: the
//! tokenizer's longest token, clamped to [8, 64]) is cut to b bytes at the end whose tokens are
//! kept. The cut is taken when the n tokens at that end agree with those of a cut of 2b bytes;
//! else b doubles, up to the whole text. A cut changes only the tokens near it (pre-tokenizers
//! split locally, BPE merges neighbours), so the kept tokens are those of the whole text.

use std::fmt;
use std::str::FromStr;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// What happens to a row longer than `max_length` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Keep the start. Classification cuts the end of the text (of the longer text of a pair
    /// first); prompt/completion rows cut the end of the completion, and the start of a prompt
    /// that would leave the completion less than a quarter of `max_length`.
    #[default]
    Right,
    /// Keep the end: the completion and its end-of-sequence token, or the end of the text; the
    /// start is cut after the leading special tokens.
    Left,
    /// Leave the row out.
    Drop,
}

impl fmt::Display for Truncation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Truncation::Right => "right",
            Truncation::Left => "left",
            Truncation::Drop => "drop",
        })
    }
}

impl FromStr for Truncation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "right" => Ok(Truncation::Right),
            "left" => Ok(Truncation::Left),
            "drop" => Ok(Truncation::Drop),
            _ => Err(Error::msg(format!(
                "unknown truncation `{s}`: expected right, left or drop"
            ))),
        }
    }
}

crate::serde_via_str!(Truncation);

/// Which end of a text its kept tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    Start,
    End,
}

/// The bytes of text one token is first taken to cover: the longest token of the vocabulary,
/// within [8, 64] (a longer first guess only costs time; the check corrects a shorter one).
pub(crate) fn bytes_per_token(tok: &Tokenizer) -> usize {
    tok.get_vocab(true)
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .clamp(8, 64)
}

/// At most `bytes` bytes of `text` from its `keep` end, cut at a character boundary.
fn cut(text: &str, bytes: usize, keep: Keep) -> &str {
    match keep {
        Keep::Start => {
            let mut i = bytes.min(text.len());
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            &text[..i]
        }
        Keep::End => {
            let mut i = text.len().saturating_sub(bytes);
            while !text.is_char_boundary(i) {
                i += 1;
            }
            &text[i..]
        }
    }
}

/// The `n` ids at the `keep` end of `ids`.
fn end_of(ids: &[u32], n: usize, keep: Keep) -> &[u32] {
    match keep {
        Keep::Start => &ids[..n],
        Keep::End => &ids[ids.len() - n..],
    }
}

/// The part of `text` whose `n` tokens at its `keep` end are those of the whole text, searched
/// from a cut of `n · bytes_per_token` bytes; `encode` gives a text's token ids.
pub(crate) fn tokenizable_part(
    text: &str,
    n: usize,
    keep: Keep,
    bytes_per_token: usize,
    encode: impl Fn(&str) -> Result<Vec<u32>>,
) -> Result<&str> {
    let mut budget = n.max(1).saturating_mul(bytes_per_token.max(1));
    // a text within twice the budget costs no more to tokenize whole than to check a cut
    while text.len() > budget.saturating_mul(2) {
        let part = cut(text, budget, keep);
        let ids = encode(part)?;
        if ids.len() >= n {
            let longer = encode(cut(text, 2 * budget, keep))?;
            if longer.len() >= n && end_of(&ids, n, keep) == end_of(&longer, n, keep) {
                return Ok(part);
            }
        }
        budget *= 2;
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn names_round_trip() {
        for t in [Truncation::Right, Truncation::Left, Truncation::Drop] {
            assert_eq!(t.to_string().parse::<Truncation>().unwrap(), t);
        }
        let err = "middle".parse::<Truncation>().unwrap_err().to_string();
        assert!(err.contains("right, left or drop"), "{err}");
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        let text = "é".repeat(10);
        assert_eq!(cut(&text, 5, Keep::Start), "éé");
        assert_eq!(cut(&text, 5, Keep::End), "éé");
        assert_eq!(cut(&text, 100, Keep::End), text);
    }

    /// One id per word; counts the bytes handed to the tokenizer.
    fn words(text: &str, seen: &Cell<usize>) -> Result<Vec<u32>> {
        seen.set(seen.get() + text.len());
        Ok(text.split_whitespace().map(|w| w.len() as u32).collect())
    }

    #[test]
    fn the_work_follows_the_tokens_kept_not_the_text() {
        let text = "ab cde f ".repeat(1 << 17);
        for keep in [Keep::Start, Keep::End] {
            let seen = Cell::new(0);
            let part = tokenizable_part(&text, 16, keep, 8, |t| words(t, &seen)).unwrap();
            let all = words(&text, &Cell::new(0)).unwrap();
            let ids = words(part, &Cell::new(0)).unwrap();
            assert_eq!(end_of(&ids, 16, keep), end_of(&all, 16, keep));
            assert!(
                seen.get() <= 3 * 16 * 8,
                "{keep:?}: {} bytes read",
                seen.get()
            );
        }
        // a text within twice the budget is kept whole
        let short = "ab ".repeat(80);
        let part = tokenizable_part(&short, 16, Keep::Start, 8, |t| words(t, &Cell::new(0)));
        assert_eq!(part.unwrap(), short);
    }

    #[test]
    fn a_cut_that_changes_the_kept_tokens_is_widened() {
        // one "word" of 4096 bytes: no cut keeps its token, so the whole text is used
        let text = format!("{} tail", "x".repeat(4096));
        let part = tokenizable_part(&text, 1, Keep::Start, 8, |t| words(t, &Cell::new(0)));
        assert_eq!(part.unwrap(), text);
    }
}
