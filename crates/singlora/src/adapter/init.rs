//! How SingLoRA's A is initialised.
//!
//! SingLoRA's A (n × r, n = max(d_in, d_out)) can be drawn several ways; the paper says
//! "Kaiming" and its analysis needs entries of order 1/√n:
//! - `kaiming_width` (default): U(−1/√n, 1/√n), Kaiming-uniform (a = √5) with fan_in = n;
//! - `gaussian_width`: N(0, 1/n);
//! - `kaiming_rank`: U(−1/√r, 1/√r), Kaiming-uniform over the (n, r) tensor as PyTorch computes
//!   it (fan_in = r), which the public implementations use; A·Aᵀ then has diagonal ≈ 1/3;
//! - `gaussian:STD`: N(0, STD²).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::error::{Error, Result};
use crate::rng::{normal, uniform};

/// How SingLoRA's A is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum SingLoraInit {
    #[default]
    KaimingWidth,
    GaussianWidth,
    KaimingRank,
    Gaussian(f64),
}

impl fmt::Display for SingLoraInit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SingLoraInit::KaimingWidth => write!(f, "kaiming_width"),
            SingLoraInit::GaussianWidth => write!(f, "gaussian_width"),
            SingLoraInit::KaimingRank => write!(f, "kaiming_rank"),
            SingLoraInit::Gaussian(std) => write!(f, "gaussian:{std}"),
        }
    }
}

impl FromStr for SingLoraInit {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kaiming_width" | "kaiming-width" => Ok(SingLoraInit::KaimingWidth),
            "gaussian_width" | "gaussian-width" => Ok(SingLoraInit::GaussianWidth),
            "kaiming_rank" | "kaiming-rank" => Ok(SingLoraInit::KaimingRank),
            _ => match s.strip_prefix("gaussian:").map(str::parse::<f64>) {
                Some(Ok(std)) if std > 0.0 && std.is_finite() => Ok(SingLoraInit::Gaussian(std)),
                _ => Err(Error::msg(format!(
                    "unknown init `{s}`: expected kaiming_width, gaussian_width, kaiming_rank or gaussian:STD"
                ))),
            },
        }
    }
}

crate::serde_via_str!(SingLoraInit);

impl SingLoraInit {
    /// Draws A of shape (n, r).
    pub fn sample(
        &self,
        rng: &mut impl Rng,
        n: usize,
        r: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        match *self {
            SingLoraInit::KaimingWidth => {
                uniform(rng, 1.0 / (n as f64).sqrt(), (n, r), dtype, device)
            }
            SingLoraInit::GaussianWidth => {
                normal(rng, 1.0 / (n as f64).sqrt(), (n, r), dtype, device)
            }
            SingLoraInit::KaimingRank => {
                uniform(rng, 1.0 / (r as f64).sqrt(), (n, r), dtype, device)
            }
            SingLoraInit::Gaussian(std) => normal(rng, std, (n, r), dtype, device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::rng_for;

    #[test]
    fn names_round_trip() {
        for init in [
            SingLoraInit::KaimingWidth,
            SingLoraInit::GaussianWidth,
            SingLoraInit::KaimingRank,
            SingLoraInit::Gaussian(0.02),
        ] {
            assert_eq!(init.to_string().parse::<SingLoraInit>().unwrap(), init);
        }
        assert!("xavier".parse::<SingLoraInit>().is_err());
        assert!("gaussian:-1".parse::<SingLoraInit>().is_err());
    }

    #[test]
    fn width_scaled_variance() -> Result<()> {
        let n = 2048;
        let r = 8;
        let mut rng = rng_for(0, "x");
        let a = SingLoraInit::GaussianWidth.sample(&mut rng, n, r, DType::F32, &Device::Cpu)?;
        let var = a.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        assert!(
            (var * n as f64 - 1.0).abs() < 0.05,
            "variance·n = {}",
            var * n as f64
        );
        let a = SingLoraInit::KaimingWidth.sample(&mut rng, n, r, DType::F32, &Device::Cpu)?;
        let max = a.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        assert!(max <= 1.0 / (n as f64).sqrt());
        let var = a.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        assert!((var * 3.0 * n as f64 - 1.0).abs() < 0.05);
        Ok(())
    }
}
