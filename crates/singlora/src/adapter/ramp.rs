//! The SingLoRA ramp u(t) = min(t / T, 1) and the clock that counts optimizer updates.
//!
//! `t` counts optimizer updates only: forward calls, evaluation passes and micro-batches under
//! gradient accumulation never move it. The forward and backward that produce the k-th update
//! (k = 1, 2, …) use u(k), so the very first update already trains the adapter; evaluation,
//! merging and export after k updates use u(k). Before any update u = 0 and the adapted model is
//! exactly the pretrained one. `T = 0` means no ramp (u ≡ 1).
//!
//! ```
//! use singlora::adapter::ramp::{RampClock, RampSchedule};
//! let clock = RampClock::new(RampSchedule::new(4), 0);
//! assert_eq!(clock.u(), 0.0); // evaluation before any update: the base model
//! clock.set_training(true);
//! assert_eq!(clock.u(), 0.25); // the forward that produces update 1
//! clock.advance();
//! clock.set_training(false);
//! assert_eq!(clock.u(), 0.25); // evaluation after one update
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// u(t) = min(t / T, 1), with T = 0 meaning no ramp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RampSchedule {
    pub ramp_steps: u64,
}

impl RampSchedule {
    pub fn new(ramp_steps: u64) -> Self {
        Self { ramp_steps }
    }

    /// No ramp: u ≡ 1.
    pub fn none() -> Self {
        Self { ramp_steps: 0 }
    }

    /// T as a fraction of the total optimizer updates (the paper's default is 1%), at least 1
    /// update for any positive fraction; a fraction of 0 is no ramp.
    pub fn fraction_of(total_updates: u64, fraction: f64) -> Self {
        if fraction <= 0.0 {
            return Self::none();
        }
        Self {
            ramp_steps: ((total_updates as f64 * fraction).round() as u64).max(1),
        }
    }

    pub fn u(&self, t: u64) -> f64 {
        if self.ramp_steps == 0 {
            1.0
        } else {
            (t as f64 / self.ramp_steps as f64).min(1.0)
        }
    }
}

#[derive(Debug)]
struct ClockState {
    schedule: RampSchedule,
    step: AtomicU64,
    training: AtomicBool,
}

/// The shared optimizer-step counter of one set of adapters.
///
/// Every SingLoRA layer of a model holds a clone of the same clock, so one `advance()` after an
/// optimizer update moves them all, and the step is saved and restored with the adapter file.
#[derive(Debug, Clone)]
pub struct RampClock(Arc<ClockState>);

impl RampClock {
    pub fn new(schedule: RampSchedule, step: u64) -> Self {
        Self(Arc::new(ClockState {
            schedule,
            step: AtomicU64::new(step),
            training: AtomicBool::new(false),
        }))
    }

    pub fn schedule(&self) -> RampSchedule {
        self.0.schedule
    }

    /// Optimizer updates applied so far.
    pub fn step(&self) -> u64 {
        self.0.step.load(Ordering::SeqCst)
    }

    pub fn set_step(&self, step: u64) {
        self.0.step.store(step, Ordering::SeqCst)
    }

    /// Called once per optimizer update, after the parameters have changed.
    pub fn advance(&self) {
        self.0.step.fetch_add(1, Ordering::SeqCst);
    }

    pub fn is_training(&self) -> bool {
        self.0.training.load(Ordering::SeqCst)
    }

    /// In training mode forwards compute the update about to be taken, u(step + 1).
    pub fn set_training(&self, training: bool) {
        self.0.training.store(training, Ordering::SeqCst)
    }

    /// The u the next forward uses: u(step + 1) while training, u(step) otherwise.
    pub fn u(&self) -> f64 {
        let t = self.step() + u64::from(self.is_training());
        self.0.schedule.u(t)
    }

    /// u after the updates applied so far, as merge and export use it.
    pub fn u_saved(&self) -> f64 {
        self.0.schedule.u(self.step())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_values() {
        let s = RampSchedule::new(10);
        assert_eq!(s.u(0), 0.0);
        assert_eq!(s.u(1), 0.1);
        assert_eq!(s.u(10), 1.0);
        assert_eq!(s.u(25), 1.0);
        assert_eq!(RampSchedule::none().u(0), 1.0);
        assert_eq!(RampSchedule::fraction_of(1000, 0.01).ramp_steps, 10);
        assert_eq!(RampSchedule::fraction_of(10, 0.01).ramp_steps, 1);
        let none = RampSchedule::fraction_of(1000, 0.0);
        assert_eq!(none.ramp_steps, 0);
        assert_eq!(none.u(0), 1.0);
    }

    #[test]
    fn clock_is_shared_and_moves_only_on_advance() {
        let a = RampClock::new(RampSchedule::new(4), 0);
        let b = a.clone();
        a.set_training(true);
        for _ in 0..5 {
            assert_eq!(b.u(), 0.25);
        }
        a.advance();
        assert_eq!(b.step(), 1);
        assert_eq!(b.u(), 0.5);
        b.set_training(false);
        assert_eq!(a.u(), 0.25);
        assert_eq!(a.u_saved(), 0.25);
    }
}
