//! Kernel-level timing of the CUDA fast path: when switched on, the fast path records a
//! timing event on its stream after each stage of a step (labelled), and [`take`] turns the
//! gaps between consecutive events into milliseconds per label. Off (the default), a mark is
//! one relaxed atomic load. `bench-llama --kernel-profile` uses it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent};
use candle_core::CudaDevice;

use crate::error::{Error, Result};

/// The label of the autograd backward's work outside the marked stages (candle's own ops'
/// backward between and after the custom ops that mark themselves).
pub const OTHER_BACKWARD: &str = "autograd: other ops' backward";

static ON: AtomicBool = AtomicBool::new(false);
static MARKS: Mutex<Vec<(&'static str, CudaEvent)>> = Mutex::new(Vec::new());

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
    MARKS.lock().unwrap().push((label, ev));
    Ok(())
}

/// Per label, in order of first appearance: total milliseconds and how many gaps it had, over
/// what was recorded since [`enable`]; clears the record.
pub fn take() -> Result<Vec<(&'static str, f64, usize)>> {
    let marks = std::mem::take(&mut *MARKS.lock().unwrap());
    let mut out: Vec<(&'static str, f64, usize)> = vec![];
    for w in marks.windows(2) {
        let ms = w[0]
            .1
            .elapsed_ms(&w[1].1)
            .map_err(|e| Error::Candle(candle_core::Error::Cuda(Box::new(e))))?
            as f64;
        match out.iter_mut().find(|(l, _, _)| *l == w[1].0) {
            Some(e) => {
                e.1 += ms;
                e.2 += 1;
            }
            None => out.push((w[1].0, ms, 1)),
        }
    }
    Ok(out)
}
