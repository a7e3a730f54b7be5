//! SingLoRA: low-rank adaptation through one matrix, ΔW = (α/r)·u(t)·A_out·A_inᵀ, with LoRA,
//! rsLoRA, LoRA+ and DoRA as baselines on the same code paths, PEFT-format adapter files,
//! merge into the base and export as a plain LoRA.

pub mod adapter;
pub mod adapter_file;
pub mod atomic;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod export;
pub mod init;
pub mod inspect;
pub mod linear;
pub mod merge;
pub mod optim;
pub mod ramp;
pub mod synthetic;
pub mod target;

pub use error::{Error, Result};
