//! AdamW's update of every CUDA f32 parameter in one launch (the optimizer is
//! [`crate::optim::AdamW`]; kernel in `adamw.cu`).

use candle_core::CudaDevice;

use super::cuda::{args, grid, ptx_module, slice_ptr, Module, THREADS};

const MODULE: Module = ptx_module!("adamw");

/// The AdamW hyper-parameters of one update shared by every parameter (each [`AdamWJob`] has
/// its own learning rate and decay), as the kernel takes them.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub bc1: f32,
    pub bc2: f32,
}

/// One parameter's part of [`adamw_multi`]: the f32 parameter, its moments and its gradient
/// (contiguous, `n` elements each, on one device), its learning rate and decay factor
/// (1 − lr·wd).
#[derive(Clone, Copy, Debug)]
pub struct AdamWJob {
    pub p: u64,
    pub m: u64,
    pub v: u64,
    pub g: u64,
    pub n: usize,
    pub lr: f32,
    pub decay: f32,
}

/// Every job's AdamW update in one launch (`adamw_multi_f32`).
///
/// # Safety
/// Each job's pointers must be live f32 buffers of its n elements on `dev`, p, m and v owned
/// by the caller for the update, and no two jobs may share a p, m or v.
pub unsafe fn adamw_multi(
    dev: &CudaDevice,
    jobs: &[AdamWJob],
    h: AdamWStep,
) -> candle_core::Result<()> {
    let Some(most) = jobs.iter().map(|j| j.n).max() else {
        return Ok(());
    };
    if jobs.len() > 65535 {
        candle_core::bail!("adamw_multi: {} parameters in one launch", jobs.len());
    }
    // the kernel's AdamWJob: four pointers, the length, lr and decay (48 bytes)
    let table: Vec<u64> = jobs
        .iter()
        .flat_map(|j| {
            let scal = u64::from(j.lr.to_bits()) | (u64::from(j.decay.to_bits()) << 32);
            [j.p, j.m, j.v, j.g, j.n as u64, scal]
        })
        .collect();
    let table = dev.clone_htod(&table)?;
    let tp = slice_ptr(&table);
    let cfg = grid(
        (most.div_ceil(THREADS as usize).min(64), jobs.len()),
        THREADS,
    );
    let a = args![tp, h.beta1, h.beta2, h.eps, h.bc1, h.bc2];
    // SAFETY: the caller's, for the jobs; the table lives until the launch is queued and is
    // freed in stream order.
    unsafe { MODULE.launch(dev, "adamw_multi_f32", cfg, a) }
}
