//! Frozen base weights in fewer bits: [`nf4`] (QLoRA's 4-bit NormalFloat with double
//! quantisation), chosen by [`BaseDtype`].

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

pub mod nf4;

/// How the frozen base's linear weights are kept during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseDtype {
    /// f32 on the CPU, bf16 on a GPU.
    #[default]
    Auto,
    /// NF4 with double quantisation (QLoRA), dequantised layer by layer where used.
    Nf4,
}

impl fmt::Display for BaseDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BaseDtype::Auto => "auto",
            BaseDtype::Nf4 => "nf4",
        })
    }
}

impl FromStr for BaseDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(BaseDtype::Auto),
            "nf4" => Ok(BaseDtype::Nf4),
            _ => Err(Error::msg(format!(
                "unknown base dtype `{s}`: expected auto or nf4"
            ))),
        }
    }
}

crate::serde_via_str!(BaseDtype);
