//! SingLoRA: low-rank adaptation through one matrix, ΔW = (α/r)·u(t)·A_out·A_inᵀ, with LoRA,
//! rsLoRA, LoRA+ and DoRA as baselines on the same code paths, PEFT-format adapter files,
//! merge into the base and export as a plain LoRA.

pub mod adapter;
pub mod atomic;
pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod experiments;
pub mod gguf;
pub mod inspect;
pub mod linear;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod session;
pub mod synthetic;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};
