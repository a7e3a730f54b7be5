//! Trainable-parameter counts of the paper's settings, from the weight shapes alone.
//!
//! Per adapted (d_out × d_in) weight: SingLoRA n·r with n = max(d_in, d_out), LoRA
//! r·(d_in + d_out), DoRA that plus d_out ([`singlora::adapter::AdapterKind::param_count`]). Shapes are in
//! `nn.Linear` orientation (d_out, d_in); GPT-2's Conv1D weights, stored (d_in, d_out), are
//! listed transposed. [`count_with_adapters`] builds the library's adapters for every distinct
//! shape and counts their tensors, so the table is checked against the product code.
//!
//! The settings (SPEC.md: the layers adapted follow the LoRA+ scripts):
//! - LLaMA-7B (hidden 4096, MLP 11008, 32 blocks), all seven projections, r = 8: the paper's
//!   12.65 M against 19.99 M (21 M for DoRA);
//! - RoBERTa-base (hidden 768, 12 blocks), query and key, r = 8 (the paper: "half the
//!   params"), and query and value (the original LoRA setting), which counts the same;
//! - GPT-2 small (hidden 768, MLP 3072, 12 blocks), c_attn, c_proj and c_fc, r = 8, where
//!   `c_proj` matches both the attention and the MLP output projection (PEFT's suffix match);
//!   and c_attn alone (the fused q, k, v projection, PEFT's default for GPT-2);
//! - the synthetic attention fit: Wq and Wk (128 × 128), SingLoRA r = 16 against LoRA r = 8
//!   (equal parameters).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use singlora::adapter::ramp::{RampClock, RampSchedule};
use singlora::adapter::{Adapter, AdapterKind, AdapterSpec};
use singlora::error::Result;
use singlora::inspect::{llama_block_shapes, thousands};

/// A model, the modules adapted in each of its blocks, and the ranks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Setting {
    pub model: String,
    pub targets: String,
    /// Repeated blocks (layers).
    pub blocks: usize,
    /// The adapted weights of one block: (module, d_out, d_in).
    pub modules: Vec<(String, usize, usize)>,
    pub singlora_rank: usize,
    pub lora_rank: usize,
    /// What the paper reports for this setting, if anything.
    pub paper: Option<String>,
}

impl Setting {
    fn new(
        model: &str,
        targets: &str,
        blocks: usize,
        modules: &[(&str, usize, usize)],
        ranks: (usize, usize),
        paper: Option<&str>,
    ) -> Self {
        Self {
            model: model.into(),
            targets: targets.into(),
            blocks,
            modules: modules
                .iter()
                .map(|&(m, o, i)| (m.to_string(), o, i))
                .collect(),
            singlora_rank: ranks.0,
            lora_rank: ranks.1,
            paper: paper.map(str::to_string),
        }
    }

    fn rank(&self, kind: AdapterKind) -> usize {
        match kind {
            AdapterKind::SingLora => self.singlora_rank,
            _ => self.lora_rank,
        }
    }

    /// Trainable parameters of `kind` over all blocks, from the shapes.
    pub fn count(&self, kind: AdapterKind) -> usize {
        let r = self.rank(kind);
        self.blocks
            * self
                .modules
                .iter()
                .map(|&(_, o, i)| kind.param_count(o, i, r))
                .sum::<usize>()
    }
}

/// The settings of the paper's experiments (see the module documentation).
pub fn paper_settings() -> Vec<Setting> {
    let llama = llama_block_shapes(4096, 11008, 32, 32);
    let names = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let llama: Vec<(&str, usize, usize)> = names
        .iter()
        .zip(&llama)
        .map(|(n, &(o, i))| (*n, o, i))
        .collect();
    let h = 768;
    vec![
        Setting::new(
            "LLaMA-7B",
            "q, k, v, o, gate, up, down",
            32,
            &llama,
            (8, 8),
            Some("SingLoRA 12.65 M, LoRA 19.99 M (table: 12 M, 20 M, DoRA 21 M)"),
        ),
        Setting::new(
            "RoBERTa-base",
            "query, key (LoRA+ scripts)",
            12,
            &[("query", h, h), ("key", h, h)],
            (8, 8),
            Some("half the parameters of LoRA"),
        ),
        Setting::new(
            "RoBERTa-base",
            "query, value (LoRA paper)",
            12,
            &[("query", h, h), ("value", h, h)],
            (8, 8),
            None,
        ),
        Setting::new(
            "GPT-2 (124M)",
            "c_attn, c_proj (attn + mlp), c_fc",
            12,
            &[
                ("attn.c_attn", 3 * h, h),
                ("attn.c_proj", h, h),
                ("mlp.c_fc", 4 * h, h),
                ("mlp.c_proj", h, 4 * h),
            ],
            (8, 8),
            None,
        ),
        Setting::new(
            "GPT-2 (124M)",
            "c_attn (fused q, k, v)",
            12,
            &[("attn.c_attn", 3 * h, h)],
            (8, 8),
            None,
        ),
        Setting::new(
            "synthetic attention fit",
            "Wq, Wk (128 x 128), equal parameters",
            1,
            &[("wq", 128, 128), ("wk", 128, 128)],
            (16, 8),
            None,
        ),
    ]
}

/// The counts of one setting.
#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    pub model: String,
    pub targets: String,
    pub singlora_rank: usize,
    pub lora_rank: usize,
    pub singlora: usize,
    pub lora: usize,
    pub dora: usize,
    /// SingLoRA / LoRA.
    pub ratio: f64,
    pub paper: Option<String>,
}

/// The counts of `s` from its shapes.
pub fn count(s: &Setting) -> Counts {
    let singlora = s.count(AdapterKind::SingLora);
    let lora = s.count(AdapterKind::Lora);
    Counts {
        model: s.model.clone(),
        targets: s.targets.clone(),
        singlora_rank: s.singlora_rank,
        lora_rank: s.lora_rank,
        singlora,
        lora,
        dora: s.count(AdapterKind::Dora),
        ratio: singlora as f64 / lora as f64,
        paper: s.paper.clone(),
    }
}

/// Counts SingLoRA's and LoRA's parameters of `s` by building the library's adapters
/// ([`Adapter::init`]) for each distinct weight shape; returns (SingLoRA, LoRA).
pub fn count_with_adapters(s: &Setting) -> Result<(usize, usize)> {
    let mut shapes: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for &(_, o, i) in &s.modules {
        *shapes.entry((o, i)).or_default() += s.blocks;
    }
    let clock = RampClock::new(RampSchedule::none(), 0);
    let mut totals = (0, 0);
    for (&(o, i), &times) in &shapes {
        // the adapters read only the base weight's shape: a broadcast zero, never allocated
        let w0 = Tensor::zeros((), DType::F32, &Device::Cpu)?.broadcast_as((o, i))?;
        for (kind, total) in [
            (AdapterKind::SingLora, &mut totals.0),
            (AdapterKind::Lora, &mut totals.1),
        ] {
            let spec = AdapterSpec::new(kind, s.rank(kind), s.rank(kind) as f64);
            *total += times * Adapter::init(&spec, "w", &w0, &clock)?.num_params();
        }
    }
    Ok(totals)
}

/// Every paper setting, counted from shapes and checked against built adapters.
pub fn paper_counts() -> Result<Vec<Counts>> {
    paper_settings()
        .iter()
        .map(|s| {
            let c = count(s);
            let built = count_with_adapters(s)?;
            if built != (c.singlora, c.lora) {
                return Err(singlora::Error::msg(format!(
                    "{} {}: shapes give ({}, {}), built adapters ({}, {})",
                    s.model, s.targets, c.singlora, c.lora, built.0, built.1
                )));
            }
            Ok(c)
        })
        .collect()
}

/// The counts as a Markdown table.
pub fn render_table(counts: &[Counts]) -> String {
    let mut s = String::from(
        "| model | adapted modules | r (SingLoRA / LoRA) | SingLoRA | LoRA | DoRA | SingLoRA / LoRA | paper |\n\
         |---|---|---|---:|---:|---:|---:|---|\n",
    );
    for c in counts {
        s.push_str(&format!(
            "| {} | {} | {} / {} | {} | {} | {} | {:.1}% | {} |\n",
            c.model,
            c.targets,
            c.singlora_rank,
            c.lora_rank,
            thousands(c.singlora),
            thousands(c.lora),
            thousands(c.dora),
            100.0 * c.ratio,
            c.paper.as_deref().unwrap_or("–"),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(counts: &'a [Counts], model: &str, targets: &str) -> &'a Counts {
        counts
            .iter()
            .find(|c| c.model == model && c.targets.starts_with(targets))
            .unwrap()
    }

    #[test]
    fn llama_7b_matches_the_paper_exactly() -> Result<()> {
        let counts = paper_counts()?;
        let c = find(&counts, "LLaMA-7B", "q, k, v");
        assert_eq!(c.singlora, 12_648_448);
        assert_eq!(c.lora, 19_988_480);
        // the paper's table rounds DoRA to 21 M: LoRA plus one magnitude per output row
        assert_eq!(c.dora, 21_348_352);
        assert!((c.ratio - 0.6328).abs() < 1e-4, "{}", c.ratio);
        Ok(())
    }

    #[test]
    fn roberta_and_gpt2() -> Result<()> {
        let counts = paper_counts()?;
        for targets in ["query, key", "query, value"] {
            let c = find(&counts, "RoBERTa-base", targets);
            assert_eq!(c.singlora, 12 * 2 * 768 * 8);
            assert_eq!(c.singlora, 147_456);
            assert_eq!(c.lora, 294_912);
            assert_eq!(c.ratio, 0.5, "square weights: exactly half");
        }
        let c = find(&counts, "GPT-2 (124M)", "c_attn, c_proj");
        // per block: c_attn 2304·8, attn.c_proj 768·8, c_fc 3072·8, mlp.c_proj 3072·8
        assert_eq!(c.singlora, 12 * 8 * (2304 + 768 + 3072 + 3072));
        assert_eq!(c.singlora, 884_736);
        assert_eq!(c.lora, 12 * 8 * (3072 + 1536 + 3840 + 3840));
        assert_eq!(c.lora, 1_179_648);
        let c = find(&counts, "GPT-2 (124M)", "c_attn (");
        assert_eq!((c.singlora, c.lora), (221_184, 294_912));
        let c = find(&counts, "synthetic attention fit", "Wq, Wk");
        assert_eq!((c.singlora, c.lora), (4096, 4096));
        Ok(())
    }

    #[test]
    fn built_adapters_agree_with_the_formula() -> Result<()> {
        for s in paper_settings() {
            let c = count(&s);
            assert_eq!(
                count_with_adapters(&s)?,
                (c.singlora, c.lora),
                "{}",
                s.model
            );
        }
        Ok(())
    }

    #[test]
    fn table_renders() -> Result<()> {
        let t = render_table(&paper_counts()?);
        assert!(
            t.contains("| 12,648,448 | 19,988,480 | 21,348,352 | 63.3% |"),
            "{t}"
        );
        assert_eq!(t.lines().count(), 2 + paper_settings().len());
        Ok(())
    }
}
