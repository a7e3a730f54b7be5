//! Reproductions of the paper's claims, as library code that the `singlora-lab experiment`
//! subcommands run (results and settings in `docs/results.md`).
//!
//! - [`attention_fit`]: the synthetic experiment of the paper's figure 1, fitting a target
//!   attention pattern by adapting Wq and Wk (128 × 128) with SingLoRA and LoRA at equal
//!   parameter count, with the library's own adapters, ramp clock and AdamW.
//! - [`param_counts`]: trainable-parameter counts of the paper's settings (LLaMA-7B, RoBERTa-base,
//!   GPT-2) from the weight shapes, checked against adapters built by the library.
//! - [`sweep`]: training sweeps on a real model and data set (learning rate, rank and
//!   parameter budget, initialisation, ramp length), many runs at once per device.
//! - [`snli`]: the pre-registered SNLI comparison of the methods (learning rate picked on dev,
//!   seeds scored on test).
//! - [`stats`]: McNemar's exact test and a bootstrap over seeds and test items.

pub mod attention_fit;
pub mod param_counts;
pub mod snli;
pub mod stats;
pub mod sweep;
