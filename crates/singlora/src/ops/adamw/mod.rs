//! AdamW's update of every CUDA f32 parameter in one launch, and the sum of every gradient's
//! squares (for clipping to a global norm) in one more (the optimizer is
//! [`crate::optim::AdamW`]; kernels in `adamw.cu`).

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

/// One parameter's part of [`AdamWJobs`]: the f32 parameter, its moments and its gradient
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

/// The jobs of one update on one device, their table uploaded once for the launches.
pub struct AdamWJobs {
    dev: CudaDevice,
    table: candle_core::cuda_backend::cudarc::driver::CudaSlice<u64>,
    jobs: usize,
    most: usize,
}

impl AdamWJobs {
    /// Uploads the jobs' table.
    ///
    /// # Safety
    /// Each job's pointers must be live f32 buffers of its n elements on `dev` until the last
    /// launch of this table is queued, p, m and v owned by the caller for the update, and no
    /// two jobs may share a p, m or v.
    pub unsafe fn new(dev: &CudaDevice, jobs: &[AdamWJob]) -> candle_core::Result<Self> {
        if jobs.len() > 65535 {
            candle_core::bail!("AdamW: {} parameters in one launch", jobs.len());
        }
        // the kernel's AdamWJob: four pointers, the length, lr and decay (48 bytes)
        let table: Vec<u64> = jobs
            .iter()
            .flat_map(|j| {
                let scal = u64::from(j.lr.to_bits()) | (u64::from(j.decay.to_bits()) << 32);
                [j.p, j.m, j.v, j.g, j.n as u64, scal]
            })
            .collect();
        Ok(Self {
            dev: dev.clone(),
            table: dev.clone_htod(&table)?,
            jobs: jobs.len(),
            most: jobs.iter().map(|j| j.n).max().unwrap_or(0),
        })
    }

    fn cfg(&self) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid(
            (self.most.div_ceil(THREADS as usize).clamp(1, 64), self.jobs),
            THREADS,
        )
    }

    /// Adds the sum of every job's gradient's squares to the f32 at `out` (one launch).
    ///
    /// # Safety
    /// `out` must be a live f32 on the device.
    pub unsafe fn sum_squares(&self, out: u64) -> candle_core::Result<()> {
        if self.jobs == 0 {
            return Ok(());
        }
        let tp = slice_ptr(&self.table);
        // SAFETY: the table's jobs are live (`new`'s contract); out is the caller's.
        unsafe {
            MODULE.launch(
                &self.dev,
                "sum_squares_multi_f32",
                self.cfg(),
                args![tp, out],
            )
        }
    }

    /// Every job's AdamW update in one launch; with `clip` = (the f32 sum of squares from
    /// [`Self::sum_squares`], max norm), the gradients clipped to that global norm first and
    /// nothing updated where the norm is not finite.
    ///
    /// # Safety
    /// As [`Self::new`]; a `clip` pointer must be a live f32 on the device.
    pub unsafe fn update(&self, h: AdamWStep, clip: Option<(u64, f32)>) -> candle_core::Result<()> {
        if self.jobs == 0 {
            return Ok(());
        }
        let tp = slice_ptr(&self.table);
        let (sumsq, max_norm) = clip.unwrap_or((0, 0.0));
        let a = args![tp, h.beta1, h.beta2, h.eps, h.bc1, h.bc2, sumsq, max_norm];
        // SAFETY: the table's jobs are live (`new`'s contract); the table is freed in stream
        // order after the launch.
        unsafe { MODULE.launch(&self.dev, "adamw_multi_f32", self.cfg(), a) }
    }
}
