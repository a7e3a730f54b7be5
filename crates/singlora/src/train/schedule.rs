//! Learning-rate schedules: linear warm-up, then linear decay, cosine decay or constant.
//!
//! With W warm-up updates and N in total, update k (1-based) uses lr·k/W for k ≤ W, then
//! lr·f((k − 1 − W)/(N − W)) with f(p) = 1 − p (linear), ½(1 + cos πp) (cosine) or 1
//! (constant): the first update after warm-up runs at the full rate, the last at a small one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
            Schedule::Constant => "constant",
        })
    }
}

impl FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            "constant" => Ok(Schedule::Constant),
            _ => Err(Error::msg(format!(
                "unknown schedule `{s}`: expected linear, cosine or constant"
            ))),
        }
    }
}

/// The learning rate of update `k` (1-based) of `total`, with `warmup` warm-up updates.
pub fn lr_at(base: f64, schedule: Schedule, warmup: u64, total: u64, k: u64) -> f64 {
    if warmup > 0 && k <= warmup {
        return base * k as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = (k.saturating_sub(warmup + 1) as f64 / span).clamp(0.0, 1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - p),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(lr_at(1.0, Schedule::Linear, 10, 110, 5), 0.5);
        assert_eq!(lr_at(1.0, Schedule::Linear, 10, 110, 10), 1.0);
        assert_eq!(lr_at(1.0, Schedule::Linear, 10, 110, 11), 1.0);
        assert!((lr_at(1.0, Schedule::Linear, 10, 110, 61) - 0.5).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Linear, 10, 110, 110) - 0.01).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Cosine, 0, 100, 51) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(2.0, Schedule::Constant, 0, 100, 77), 2.0);
        assert_eq!(lr_at(1.0, Schedule::Cosine, 0, 100, 1), 1.0);
    }
}
