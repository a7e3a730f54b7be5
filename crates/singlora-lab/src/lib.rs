//! The developer tooling of singlora, beside the user-facing library and `singlora` command:
//! benchmarks of training steps ([`bench`]), reproductions of the paper's experiments
//! ([`experiments`]), the benchmark model shapes ([`shapes`]) and band plots of repeated runs
//! ([`bands`]). The `singlora-lab` binary runs them, and checks the device path against the CPU.

pub mod bands;
pub mod bench;
pub mod experiments;
pub mod shapes;
