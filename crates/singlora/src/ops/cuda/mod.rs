//! The CUDA plumbing the fused ops' launchers share (each op's kernels and launchers live in its
//! own folder, `ops/<op>/`): the launch context [`Ctx`], kernel modules and the one launch
//! helper ([`Module::launch`]), launch shapes, cuBLAS GEMMs, device buffers and pointers, and
//! kernel-level timing ([`prof`]). Kernel code shared between `.cu` files: `common.cuh`
//! (storage access and block reductions) and `tc.cuh` (tensor-core and shared-memory helpers).
//! build.rs compiles every `ops/<op>/<op>.cu` to PTX; each op's launchers load their module's.

mod buffers;
mod gemm;
pub mod prof;

pub use buffers::*;
pub use gemm::*;

use candle_core::cuda_backend::cudarc::driver::{sys, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::CudaDevice;

use super::FastPath;

/// What a launch needs besides its buffers: the device (whose stream orders every kernel and
/// cuBLAS call), whether the activations are stored as bf16 (or f32), and the fast path's
/// choices among kernels that compute the same function.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub dev: &'a CudaDevice,
    pub bf16: bool,
    pub fast: FastPath,
}

impl<'a> Ctx<'a> {
    pub fn new(dev: &'a CudaDevice, bf16: bool, fast: FastPath) -> Self {
        Self { dev, bf16, fast }
    }

    /// The element-wise and row-wise autograd ops' context: their scalar kernels, which take
    /// any alignment and which the device check compares with the CPU directly (and the fast
    /// path's 8-wide kernels with them).
    pub fn scalar(dev: &'a CudaDevice, bf16: bool) -> Self {
        let fast = FastPath {
            vectorised: false,
            ..FastPath::default()
        };
        Self { dev, bf16, fast }
    }

    /// The storage type's kernel-name suffix.
    pub fn suffix(&self) -> &'static str {
        if self.bf16 {
            "bf16"
        } else {
            "f32"
        }
    }

    /// Bytes per element of the storage type.
    pub fn elem(&self) -> u64 {
        if self.bf16 {
            2
        } else {
            4
        }
    }

    /// Whether an 8-wide kernel variant applies: chosen, 16-byte aligned pointers, and a
    /// length (or row width) that is a multiple of 8.
    pub fn v8(&self, ptrs: &[u64], n: usize) -> bool {
        self.fast.vectorised && n % 8 == 0 && ptrs.iter().all(|p| p % 16 == 0)
    }

    /// Kernel `name` for the storage type, its 8-wide variant (`{name}_v8`) with `vec`.
    pub fn kernel(&self, name: &str, vec: bool) -> String {
        if vec {
            format!("{name}_v8_{}", self.suffix())
        } else {
            format!("{name}_{}", self.suffix())
        }
    }

    /// A fresh buffer of `n` elements of the storage type, and its pointer.
    pub fn fresh(&self, n: usize) -> candle_core::Result<(candle_core::CudaStorage, u64)> {
        fresh(self.dev, self.bf16, n)
    }

    /// [`prof::mark`] on this device.
    pub fn mark(&self, label: &'static str) -> candle_core::Result<()> {
        prof::mark(self.dev, label)
    }
}

/// A compiled kernel file: candle caches its module under `name`; `ptx` is build.rs's output.
pub struct Module {
    name: &'static str,
    ptx: &'static str,
}

/// The [`Module`] of `ops/<op>/<stem>.cu`.
macro_rules! ptx_module {
    ($stem:literal) => {
        $crate::ops::cuda::Module::new(
            concat!("singlora_", $stem),
            include_str!(concat!(env!("OUT_DIR"), "/", $stem, ".ptx")),
        )
    };
}
pub(crate) use ptx_module;

/// A kernel argument, by value as the kernel's parameter takes it (pointers as u64).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    U64(u64),
    I64(i64),
    I32(i32),
    F32(f32),
}

macro_rules! arg_from {
    ($($t:ty => $v:ident),*) => {
        $(impl From<$t> for Arg {
            fn from(x: $t) -> Self {
                Arg::$v(x)
            }
        })*
    };
}
arg_from!(u64 => U64, i64 => I64, i32 => I32, f32 => F32);

/// The kernel arguments `[Arg]` of the expressions given, in the kernel's parameter order.
macro_rules! args {
    ($($a:expr),* $(,)?) => {
        &[$($crate::ops::cuda::Arg::from($a)),*]
    };
}
pub(crate) use args;

impl Module {
    pub const fn new(name: &'static str, ptx: &'static str) -> Self {
        Self { name, ptx }
    }

    /// Launches `kernel` of this module on `dev`'s stream.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters, and every pointer among them address a live
    /// device buffer of the size the kernel reads or writes under `cfg`, on `dev`'s stream.
    pub unsafe fn launch(
        &self,
        dev: &CudaDevice,
        kernel: &str,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> candle_core::Result<()> {
        let f = dev.get_or_load_custom_func(kernel, self.name, self.ptx)?;
        if cfg.shared_mem_bytes > STATIC_SMEM_BYTES {
            // dynamic shared memory past the default limit is opt-in, per function
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.shared_mem_bytes as i32,
            )
            .w()?;
        }
        let mut bld = f.builder();
        for a in args {
            match a {
                Arg::U64(v) => bld.arg(v),
                Arg::I64(v) => bld.arg(v),
                Arg::I32(v) => bld.arg(v),
                Arg::F32(v) => bld.arg(v),
            };
        }
        // SAFETY: the caller's.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(())
    }
}

/// The shared memory a block has without opting in to more.
pub const STATIC_SMEM_BYTES: u32 = 48 * 1024;

/// Threads per block of the row-wise and grid-stride kernels.
pub const THREADS: u32 = 256;

/// A grid of (x, y) blocks of `threads`.
pub fn grid((x, y): (usize, usize), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A block per row.
pub fn rows_cfg(rows: usize) -> LaunchConfig {
    grid((rows, 1), THREADS)
}

/// Per lane, the values a warp-per-row kernel holds in registers (rows up to 32 × this;
/// WARP_ROW_MAX in softmax.cu).
pub const WARP_ROW_MAX: usize = 32;

/// Blocks of 8 warps, a warp per row.
pub fn warp_rows_cfg(rows: usize) -> LaunchConfig {
    grid((rows.div_ceil(8), 1), 256)
}

/// A grid-stride launch over `n` elements.
pub fn elems_cfg(n: usize) -> LaunchConfig {
    grid((n.div_ceil(THREADS as usize).clamp(1, 1 << 16), 1), THREADS)
}

/// A grid-stride launch over `n` elements 8 at a time.
pub fn v8_cfg(n: usize) -> LaunchConfig {
    elems_cfg(n / 8)
}

/// [`elems_cfg`] or [`v8_cfg`].
pub fn elems_or_v8_cfg(n: usize, vec: bool) -> LaunchConfig {
    if vec {
        v8_cfg(n)
    } else {
        elems_cfg(n)
    }
}
