//! Where a model runs: `cpu`, `cuda` or `cuda:N` ([`DeviceSpec`]), and opening a CUDA device
//! set up for training.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;

    /// `cpu`, `cuda` (or `gpu`, GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(DeviceSpec::Cuda(i)),
                _ => Err(Error::msg(format!(
                    "unknown device `{s}`: expected cpu, cuda or cuda:N"
                ))),
            },
        }
    }
}

crate::serde_via_str!(DeviceSpec);

impl DeviceSpec {
    /// Opens the device; a CUDA device is set up for training ([`open_cuda`]).
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(i) => open_cuda(i).map_err(|e| {
                Error::msg(format!(
                    "device `{self}` is not available ({e}); this binary may be built without the `cuda` feature"
                ))
            }),
        }
    }

    pub fn is_cpu(self) -> bool {
        self == DeviceSpec::Cpu
    }
}

/// A CUDA device set up for training: one stream, so cudarc's per-buffer event tracking (an
/// event record and a stream wait per kernel argument, on the host) is switched off; and the
/// stream-ordered memory pool keeps what it has reserved across synchronisations (its default
/// release threshold of 0 hands freed memory back to the driver at every sync, so each step
/// would map its activations afresh).
fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // SAFETY: the device has one stream (candle's) and no buffers allocated yet.
        unsafe { d.disable_event_tracking() };
        let ctx = d.cuda_stream().context().clone();
        // SAFETY: plain driver calls on this context's device with valid out-pointers.
        unsafe {
            ctx.bind_to_thread()
                .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
            let mut pool = std::mem::MaybeUninit::uninit();
            if sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device())
                == sys::CUresult::CUDA_SUCCESS
            {
                let mut keep = u64::MAX;
                sys::cuMemPoolSetAttribute(
                    pool.assume_init(),
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut keep as *mut u64).cast(),
                );
            }
        }
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_typos_are_refused() {
        for (s, d) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("gpu", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            let parsed: DeviceSpec = s.parse().unwrap();
            assert_eq!(parsed, d);
            assert_eq!(parsed.to_string().parse::<DeviceSpec>().unwrap(), d);
            let json = serde_json::to_value(d).unwrap();
            assert_eq!(serde_json::from_value::<DeviceSpec>(json).unwrap(), d);
        }
        for bad in ["cuda:x", "tpu", "CPU", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        }
    }
}
