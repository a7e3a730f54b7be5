//! The NCCL transport of data parallelism: one communicator rank per GPU (one thread each in
//! this process), built on cudarc's NCCL bindings. Reductions run on a stream of their own, so
//! the backward of the layers below keeps the GPU busy while finished gradient buckets are
//! summed; the compute stream waits for them (an event, no host synchronisation) before the
//! optimizer reads the gradients.
//!
//! NCCL's NVLink multicast (NVLS) is switched off unless the environment says otherwise: it
//! needs a fabric manager setup that the lent machines do not have.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtr};
use candle_core::cuda_backend::cudarc::nccl::{result, sys};
use candle_core::{DType, Device, Storage, Tensor};

use super::{Collective, GradSync};
use crate::error::{Error, Result};

fn nccl_error(what: &str, e: result::NcclError) -> Error {
    Error::msg(format!("NCCL {what}: {e:?}"))
}

fn driver_error(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> Error {
    Error::Candle(candle_core::Error::Cuda(Box::new(e)))
}

/// The identity of a new group: made once, handed to every rank.
#[derive(Clone, Copy)]
pub struct GroupId(sys::ncclUniqueId);

// SAFETY: an opaque 128-byte value.
unsafe impl Send for GroupId {}
unsafe impl Sync for GroupId {}

impl GroupId {
    pub fn new() -> Result<Self> {
        result::get_uniqueid()
            .map(GroupId)
            .map_err(|e| nccl_error("could not make a group id (is libnccl.so.2 found?)", e))
    }

    /// Its 128 bytes, to send to the other processes of a group.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal.iter().map(|&c| c as u8).collect()
    }

    /// The id another process sent.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        if b.len() != id.internal.len() {
            return Err(Error::msg(format!(
                "an NCCL group id of {} bytes, not {}",
                b.len(),
                id.internal.len()
            )));
        }
        for (d, s) in id.internal.iter_mut().zip(b) {
            *d = *s as _;
        }
        Ok(GroupId(id))
    }
}

/// One rank of an NCCL group, on one GPU.
pub struct NcclRank {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    /// candle's stream on this GPU, where the forward and backward run.
    compute: Arc<CudaStream>,
    /// The stream the reductions run on.
    comm_stream: Arc<CudaStream>,
    bucket: usize,
}

// SAFETY: the communicator is used by one thread at a time (its rank's); NCCL allows a
// communicator to move between threads.
unsafe impl Send for NcclRank {}
unsafe impl Sync for NcclRank {}

impl NcclRank {
    /// Joins group `id` as `rank` of `world` on `device` (blocks until every rank has joined).
    /// `bucket` is the number of f32 values a backward collects before it starts a reduction.
    pub fn new(
        id: GroupId,
        rank: usize,
        world: usize,
        device: &Device,
        bucket: usize,
    ) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(Error::msg("NCCL needs a CUDA device for every rank"));
        };
        let compute = dev.cuda_stream();
        let ctx = compute.context().clone();
        ctx.bind_to_thread().map_err(driver_error)?;
        let comm_stream = ctx.new_stream().map_err(driver_error)?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: a valid out-pointer; the id came from get_uniqueid.
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), world as i32, id.0, rank as i32)
                .map_err(|e| nccl_error(&format!("rank {rank} of {world} could not join"), e))?;
            comm.assume_init()
        };
        Ok(Self {
            comm,
            rank,
            world,
            compute,
            comm_stream,
            bucket: bucket.max(1),
        })
    }

    /// Sums `len` f32 values at `ptr` over the ranks, in place, after the compute stream's
    /// work so far; returns at once.
    fn sum_in_place(&self, ptr: u64, len: usize) -> Result<()> {
        let ev = self.compute.record_event(None).map_err(driver_error)?;
        self.comm_stream.wait(&ev).map_err(driver_error)?;
        // SAFETY: ptr holds len f32 values on this rank's GPU that stay alive until the
        // compute stream has waited for the comm stream (`join`).
        unsafe {
            result::all_reduce(
                ptr as *const _,
                ptr as *mut _,
                len,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.comm_stream.cu_stream() as _,
            )
        }
        .map_err(|e| {
            nccl_error(
                &format!("all-reduce of {len} values on rank {}", self.rank),
                e,
            )
        })?;
        Ok(())
    }
}

impl Drop for NcclRank {
    fn drop(&mut self) {
        // SAFETY: the communicator is ours and no longer used.
        unsafe {
            let _ = self.comm_stream.synchronize();
            let _ = result::comm_destroy(self.comm);
        }
    }
}

impl GradSync for NcclRank {
    fn reduce_async(&self, ptr: u64, len: usize) -> Result<()> {
        self.sum_in_place(ptr, len)
    }

    fn join(&self) -> Result<()> {
        let ev = self.comm_stream.record_event(None).map_err(driver_error)?;
        self.compute.wait(&ev).map_err(driver_error)
    }

    fn bucket_len(&self) -> usize {
        self.bucket
    }
}

impl Collective for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        // a buffer of our own (copy), summed in place
        let buf = t.to_dtype(DType::F32)?.flatten_all()?.copy()?;
        let n = buf.elem_count();
        {
            let (storage, layout) = buf.storage_and_layout();
            let Storage::Cuda(c) = &*storage else {
                return Err(Error::msg(
                    "NCCL all-reduce of a tensor that is not on the GPU",
                ));
            };
            let slice = c.as_cuda_slice::<f32>()?;
            let ptr = slice.device_ptr(&self.compute).0 + 4 * layout.start_offset() as u64;
            self.sum_in_place(ptr, n)?;
        }
        self.join()?;
        Ok(buf.reshape(t.shape())?.to_dtype(t.dtype())?)
    }

    fn as_grad_sync(&self) -> Option<&dyn GradSync> {
        Some(self)
    }
}
