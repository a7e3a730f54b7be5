//! Text generation for `predict` on SFT adapters: greedy decoding or sampling (temperature,
//! top-k, top-p, a seed), stopping at the end of sequence, at the chat format's end of turn or
//! at stop strings, and the text handed out as it grows (for streaming).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// How to pick tokens and when to stop.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 picks the most likely token every time (greedy); above 0 samples from the
    /// distribution sharpened (below 1) or flattened (above 1) by it.
    pub temperature: f64,
    /// Sample only among the k most likely tokens.
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to p.
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Stop before the first of these strings; it is not part of the completion.
    pub stop: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop: vec![],
        }
    }
}

impl GenerateOptions {
    /// Refuses settings no sampler can mean, naming the flag.
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::msg(format!(
                "--temperature must be 0 (greedy) or positive, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::msg("--top-k must be at least 1"));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::msg(format!("--top-p must be in (0, 1], got {p}")));
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::msg("--stop strings must not be empty"));
        }
        Ok(())
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The end-of-sequence or end-of-turn token.
    EndOfText,
    /// One of the stop strings.
    StopString,
    /// `max_new_tokens` reached.
    Length,
}

/// The next token from one row of logits.
pub fn pick(logits: &[f32], opts: &GenerateOptions, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if opts.temperature == 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    if order.is_empty() {
        return argmax();
    }
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = opts.top_k {
        order.truncate(k.max(1));
    }
    let top = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / opts.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = opts.top_p {
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (n, q) in probs.iter().enumerate() {
            mass += q;
            if mass >= p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (n, q) in probs.iter().enumerate() {
        acc += q;
        if u < acc {
            return order[n] as u32;
        }
    }
    order[probs.len() - 1] as u32
}

/// The completion's text so far, with what may still turn into a stop string (or into a
/// whole character, while a byte-fallback sequence is unfinished) held back.
pub struct StopScan {
    stop: Vec<String>,
    /// Bytes of the text already handed out.
    emitted: usize,
}

impl StopScan {
    pub fn new(stop: &[String]) -> Self {
        Self {
            stop: stop.to_vec(),
            emitted: 0,
        }
    }

    /// Where a stop string starts in `text`, if one does.
    pub fn stop_at(&self, text: &str) -> Option<usize> {
        self.stop.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    /// The part of `text` (the whole completion so far) that can be handed out now.
    pub fn release<'a>(&mut self, text: &'a str, finished: bool) -> &'a str {
        let mut end = match self.stop_at(text) {
            Some(at) => at,
            None if finished => text.len(),
            None => {
                // keep back a tail that may be the start of a stop string
                let mut end = text.len();
                for s in &self.stop {
                    for k in (1..s.len()).rev() {
                        if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                            end = end.min(text.len() - k);
                            break;
                        }
                    }
                }
                // an unfinished multi-byte character decodes as U+FFFD for now
                if text[..end].ends_with('\u{FFFD}') {
                    end -= '\u{FFFD}'.len_utf8();
                }
                end
            }
        };
        end = end.max(self.emitted);
        let out = &text[self.emitted..end];
        self.emitted = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn opts(t: f64, k: Option<usize>, p: Option<f64>) -> GenerateOptions {
        GenerateOptions {
            temperature: t,
            top_k: k,
            top_p: p,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_and_degenerate_samplers_pick_the_most_likely() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for o in [
            opts(0.0, None, None),
            opts(1.0, Some(1), None),
            opts(1.0, None, Some(1e-9)),
        ] {
            for _ in 0..20 {
                assert_eq!(pick(&logits, &o, &mut rng), 1);
            }
        }
    }

    #[test]
    fn sampling_follows_the_tempered_distribution() {
        // p ∝ exp(l / T): with T = 0.5 the logits 0, ln 2, ln 4 give 1 : 4 : 16
        let logits = [0.0f32, 2f32.ln(), 4f32.ln()];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let n = 42_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[pick(&logits, &opts(0.5, None, None), &mut rng) as usize] += 1;
        }
        for (c, want) in counts.iter().zip([1.0 / 21.0, 4.0 / 21.0, 16.0 / 21.0]) {
            let got = *c as f64 / n as f64;
            // five binomial standard errors
            let se = (want * (1.0 - want) / n as f64).sqrt();
            assert!((got - want).abs() < 5.0 * se, "{got} against {want}");
        }
        // top-k 2 leaves 4 : 16, top-p 0.7 leaves only the first (16/21 ≥ 0.7)
        let mut counts = [0usize; 3];
        for _ in 0..10_000 {
            counts[pick(&logits, &opts(0.5, Some(2), None), &mut rng) as usize] += 1;
        }
        assert_eq!(counts[0], 0);
        let got = counts[2] as f64 / 10_000.0;
        assert!((got - 0.8).abs() < 0.02, "{got}");
        for _ in 0..100 {
            assert_eq!(pick(&logits, &opts(0.5, None, Some(0.7)), &mut rng), 2);
        }
    }

    #[test]
    fn bad_settings_are_named() {
        for (o, flag) in [
            (opts(-1.0, None, None), "--temperature"),
            (opts(1.0, Some(0), None), "--top-k"),
            (opts(1.0, None, Some(1.5)), "--top-p"),
        ] {
            let e = o.check().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let mut s = StopScan::new(&["\nUser:".to_string()]);
        assert_eq!(s.release("Paris", false), "Paris");
        // "\nUs" may become the stop string: held back
        assert_eq!(s.release("Paris.\nUs", false), ".");
        assert_eq!(s.stop_at("Paris.\nUser: hi"), Some(6));
        assert_eq!(s.release("Paris.\nUser: hi", false), "");
        let mut s = StopScan::new(&[]);
        assert_eq!(s.release("caf\u{FFFD}", false), "caf");
        assert_eq!(s.release("café", true), "é");
    }
}
