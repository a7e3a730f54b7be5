//! Device buffers and the pointers the launchers pass: fresh outputs, and the device pointers
//! of candle's storages and tensors (bf16, f32 or u32).

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Storage, Tensor};

use super::Mat;

/// A fresh buffer of `n` elements, bf16 or f32, and its pointer. Its contents are undefined:
/// the kernel or GEMM that follows writes every element.
pub fn fresh(dev: &CudaDevice, bf16: bool, n: usize) -> candle_core::Result<(CudaStorage, u64)> {
    // SAFETY: as documented, the caller writes every element before anything reads it.
    let s = if bf16 {
        CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(n)? }, dev.clone())
    } else {
        CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n)? }, dev.clone())
    };
    let p = ptr_of(&s)?;
    Ok((s, p))
}

/// The device pointer of element `offset` of a bf16, f32 or u32 storage, and its type.
fn ptr_at(s: &CudaStorage, offset: usize, what: &str) -> candle_core::Result<(u64, DType)> {
    let stream = s.device.cuda_stream();
    let (base, dt) = match &s.slice {
        CudaStorageSlice::BF16(x) => (x.device_ptr(&stream).0, DType::BF16),
        CudaStorageSlice::F32(x) => (x.device_ptr(&stream).0, DType::F32),
        CudaStorageSlice::U32(x) => (x.device_ptr(&stream).0, DType::U32),
        _ => candle_core::bail!("{what}: bf16, f32 or u32 expected"),
    };
    Ok((base + (dt.size_in_bytes() * offset) as u64, dt))
}

/// The device pointer of a bf16 or f32 storage (its start).
pub fn ptr_of(s: &CudaStorage) -> candle_core::Result<u64> {
    match ptr_at(s, 0, "storage")? {
        (p, DType::BF16 | DType::F32) => Ok(p),
        _ => candle_core::bail!("bf16 or f32 storage expected"),
    }
}

/// A contiguous input of an op (bf16 or f32, `n` elements when given): its pointer at its
/// first element, and whether it is bf16.
pub fn input_ptr(
    s: &CudaStorage,
    l: &Layout,
    n: Option<usize>,
    what: &str,
) -> candle_core::Result<(u64, bool)> {
    match l.contiguous_offsets() {
        Some((a, b)) if n.is_none_or(|n| b - a == n) => {}
        _ => candle_core::bail!("{what}: the input must be contiguous (with {n:?} elements)"),
    }
    match ptr_at(s, l.start_offset(), what)? {
        (p, DType::BF16) => Ok((p, true)),
        (p, DType::F32) => Ok((p, false)),
        _ => candle_core::bail!("{what}: bf16 or f32 expected"),
    }
}

/// [`input_ptr`] of an input that must have the storage type `bf16` gives.
pub fn input_ptr_as(
    s: &CudaStorage,
    l: &Layout,
    bf16: bool,
    what: &str,
) -> candle_core::Result<u64> {
    let (p, b) = input_ptr(s, l, None, what)?;
    if b != bf16 {
        candle_core::bail!("{what}: operands of different types (bf16 and f32)");
    }
    Ok(p)
}

/// A contiguous u32 input's pointer at its first element.
pub fn u32_input_ptr(s: &CudaStorage, l: &Layout, what: &str) -> candle_core::Result<u64> {
    if l.contiguous_offsets().is_none() {
        candle_core::bail!("{what}: the input must be contiguous");
    }
    match ptr_at(s, l.start_offset(), what)? {
        (p, DType::U32) => Ok(p),
        _ => candle_core::bail!("{what}: u32 expected"),
    }
}

/// A 2-D operand of a linear op on the device: pointer and row stride (unit column stride
/// required), with whether it is stored as bf16.
pub fn mat_of(s: &CudaStorage, l: &Layout, what: &str) -> candle_core::Result<(Mat, bool)> {
    let st = l.stride();
    if st.len() != 2 || st[1] != 1 {
        candle_core::bail!(
            "{what}: a 2-D operand with unit column stride expected, got strides {st:?}"
        );
    }
    match ptr_at(s, l.start_offset(), what)? {
        (p, DType::BF16) => Ok((Mat::new(p, st[0]), true)),
        (p, DType::F32) => Ok((Mat::new(p, st[0]), false)),
        _ => candle_core::bail!("{what}: bf16 or f32 expected"),
    }
}

/// [`mat_of`] for a tensor (a frozen weight held by the op).
pub fn mat_of_tensor(t: &Tensor, what: &str) -> candle_core::Result<(Mat, bool)> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(c) => mat_of(c, layout, what),
        _ => candle_core::bail!("{what}: expected a CUDA tensor"),
    }
}

/// The device pointer of a contiguous CUDA tensor of one of `dtypes` (bf16, f32 or u32), at
/// its first element.
pub fn tensor_ptr(t: &Tensor, what: &str, dtypes: &[DType]) -> candle_core::Result<u64> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(c) = &*st else {
        candle_core::bail!("{what}: expected a CUDA tensor")
    };
    if !l.is_contiguous() {
        candle_core::bail!("{what}: expected a contiguous tensor");
    }
    if !dtypes.contains(&t.dtype()) {
        candle_core::bail!("{what}: {dtypes:?} expected, got {:?}", t.dtype());
    }
    Ok(ptr_at(c, l.start_offset(), what)?.0)
}

/// [`tensor_ptr`] of a bf16 tensor, and its device.
pub fn bf16_ptr(t: &Tensor, what: &str) -> candle_core::Result<(u64, CudaDevice)> {
    let p = tensor_ptr(t, what, &[DType::BF16])?;
    match t.device() {
        candle_core::Device::Cuda(d) => Ok((p, d.clone())),
        _ => candle_core::bail!("{what}: expected a CUDA tensor"),
    }
}

/// Key lengths (one per batch row) on the device, for the masked softmax and attention
/// kernels; the fast path uploads them once per step and its layers share them.
pub fn upload_lens(
    dev: &CudaDevice,
    key_lens: &[usize],
) -> candle_core::Result<Arc<CudaSlice<u32>>> {
    let lens: Vec<u32> = key_lens.iter().map(|&x| x as u32).collect();
    Ok(Arc::new(dev.clone_htod(&lens)?))
}

/// The device pointer of a buffer.
pub fn slice_ptr<T>(s: &CudaSlice<T>) -> u64 {
    let p = s.device_ptr(s.stream()).0;
    p
}

/// Hands a storage computed outside candle to candle as a tensor (a no-input op's output).
struct Wrap(std::sync::Mutex<Option<(CudaStorage, candle_core::Shape)>>);

impl candle_core::CustomOp1 for Wrap {
    fn name(&self) -> &'static str {
        "wrap"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("wrap: CUDA only")
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        self.0
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("wrap: used twice".into()))
    }
}

/// The storage `s` as a tensor of `shape` (its dtype is the storage's; `like`, any tensor on
/// the same device, only carries the op).
pub fn wrap_storage(
    s: CudaStorage,
    shape: impl Into<candle_core::Shape>,
    like: &Tensor,
) -> candle_core::Result<Tensor> {
    let op = Wrap(std::sync::Mutex::new(Some((s, shape.into()))));
    like.apply_op1_no_bwd(&op)
}
