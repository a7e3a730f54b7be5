//! Kernel-level timing of the CUDA fast path: when switched on, the fast path records a
//! timing event on its stream after each stage of a step (labelled), and [`take`] turns the
//! gaps between consecutive events into milliseconds per label, beside the host's time between
//! the same marks (the time to queue the stage's work: where it is as long as the device's,
//! the device waited for the host). Off (the default), a mark is one relaxed atomic load.
//! `bench-llama --kernel-profile` and `bench-unet --profile` use it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent};
use candle_core::CudaDevice;

use crate::error::{Error, Result};

/// The label of the autograd backward's work outside the marked stages (candle's own ops'
/// backward between and after the custom ops that mark themselves).
pub const OTHER_BACKWARD: &str = "autograd: other ops' backward";

static ON: AtomicBool = AtomicBool::new(false);
static MARKS: Mutex<Vec<(&'static str, CudaEvent, Instant)>> = Mutex::new(Vec::new());

/// One label's share of what was recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub label: &'static str,
    /// Milliseconds on the device's stream between the marks before and at this label.
    pub ms: f64,
    /// Milliseconds on the host between the same marks.
    pub host_ms: f64,
    /// How many gaps the label had.
    pub count: usize,
}

/// Switches recording on or off (and drops what was recorded).
pub fn enable(on: bool) {
    MARKS.lock().unwrap().clear();
    ON.store(on, Ordering::Relaxed);
}

/// Whether recording is on.
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The work queued on `dev`'s stream since the previous mark belongs to `label`.
pub fn mark(dev: &CudaDevice, label: &'static str) -> candle_core::Result<()> {
    if !ON.load(Ordering::Relaxed) {
        return Ok(());
    }
    let ev = dev
        .cuda_stream()
        .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    MARKS.lock().unwrap().push((label, ev, Instant::now()));
    Ok(())
}

/// Per label, in order of first appearance, over what was recorded since [`enable`]; clears
/// the record.
pub fn take() -> Result<Vec<Stage>> {
    let marks = std::mem::take(&mut *MARKS.lock().unwrap());
    let mut out: Vec<Stage> = vec![];
    for w in marks.windows(2) {
        let ms = w[0]
            .1
            .elapsed_ms(&w[1].1)
            .map_err(|e| Error::Candle(candle_core::Error::Cuda(Box::new(e))))?
            as f64;
        let host_ms = (w[1].2 - w[0].2).as_secs_f64() * 1e3;
        match out.iter_mut().find(|s| s.label == w[1].0) {
            Some(s) => {
                s.ms += ms;
                s.host_ms += host_ms;
                s.count += 1;
            }
            None => out.push(Stage {
                label: w[1].0,
                ms,
                host_ms,
                count: 1,
            }),
        }
    }
    Ok(out)
}
