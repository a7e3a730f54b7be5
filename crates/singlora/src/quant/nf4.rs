//! NF4 with double quantisation, as QLoRA defines it: a weight is cut into blocks of 64
//! values (in row-major order); each block keeps its largest magnitude (its absmax) and each
//! value the index of the nearest of the 16 NormalFloat levels ([`NF4_LEVELS`]) to
//! value / absmax, two indices a byte (the first in the high half). The block absmaxes are
//! quantised again: their mean (the offset) is taken off, and in groups of 256 blocks each
//! keeps the group's largest magnitude and an 8-bit index into the signed dynamic map
//! ([`dynamic_map`]). Dequantised: level[i] · (map[j] · group scale + offset).
//!
//! That is bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64,
//! compress_statistics=True)` layout; `tests/fixtures/nf4` checks codes and values against it.
//! A weight costs 4 bits a value plus 8 bits per 64 values and 32 per 16,384: about 4.13 bits.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Values per block.
pub const BLOCK: usize = 64;
/// Blocks per group of the double quantisation.
pub const GROUP: usize = 256;

/// The 16 NormalFloat levels (QLoRA): quantiles of N(0, 1) scaled to [−1, 1], with an exact 0,
/// 7 negative and 8 positive levels; as bitsandbytes keeps them in f32.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The signed 8-bit dynamic map (Dettmers' dynamic tree quantisation) the block scales are
/// quantised with: for i = 0..7, the 2^i midpoints of [0.1, 1] cut into 2^i equal parts, scaled
/// by 10^(i−6), with both signs; then 0 and 1. 256 values, ascending.
pub fn dynamic_map() -> [f32; 256] {
    let mut v = Vec::with_capacity(256);
    for i in 0..7i32 {
        let n = 1usize << i;
        let scale = 10f64.powi(i - 6);
        for k in 0..n {
            let lo = 0.1 + 0.9 * k as f64 / n as f64;
            let hi = 0.1 + 0.9 * (k + 1) as f64 / n as f64;
            let m = scale * (lo + hi) / 2.0;
            v.push(m);
            v.push(-m);
        }
    }
    v.push(0.0);
    v.push(1.0);
    v.sort_by(f64::total_cmp);
    let mut out = [0f32; 256];
    for (o, x) in out.iter_mut().zip(v) {
        *o = x as f32;
    }
    out
}

/// The index of the level nearest `x` in the ascending `levels` (the lower one on a tie).
fn nearest(levels: &[f32], x: f32) -> u8 {
    let i = levels.partition_point(|&l| l < x);
    if i == 0 {
        return 0;
    }
    if i == levels.len() {
        return (levels.len() - 1) as u8;
    }
    let (lo, hi) = (levels[i - 1], levels[i]);
    if x - lo <= hi - x {
        (i - 1) as u8
    } else {
        i as u8
    }
}

/// A frozen weight in NF4 with double-quantised block scales.
#[derive(Debug, Clone)]
pub struct Nf4Tensor {
    dims: Vec<usize>,
    /// Two level indices a byte, the first value in the high half.
    codes: Vec<u8>,
    /// Per block: an index into [`dynamic_map`].
    absmax_codes: Vec<u8>,
    /// Per group of [`GROUP`] blocks: the largest |absmax − offset|.
    group_scales: Vec<f32>,
    /// The mean of the block absmaxes.
    offset: f32,
}

impl Nf4Tensor {
    /// Quantises `values` (row-major, of shape `dims`).
    pub fn quantize(values: &[f32], dims: &[usize]) -> Result<Self> {
        let n: usize = dims.iter().product();
        if n != values.len() || n == 0 {
            return Err(Error::msg(format!(
                "NF4: {} values for the shape {dims:?}",
                values.len()
            )));
        }
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(Error::msg(format!(
                "NF4: cannot quantise a weight holding {bad}"
            )));
        }
        use rayon::prelude::*;
        let absmax: Vec<f32> = values
            .par_chunks(BLOCK)
            .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        // a block's 64 values fill 32 whole bytes (the last block's, what is left)
        let mut codes = vec![0u8; n.div_ceil(2)];
        codes
            .par_chunks_mut(BLOCK / 2)
            .zip(values.par_chunks(BLOCK))
            .zip(&absmax)
            .for_each(|((bytes, block), &amax)| {
                let inv = if amax > 0.0 { 1.0 / amax } else { 0.0 };
                for (j, &v) in block.iter().enumerate() {
                    let c = nearest(&NF4_LEVELS, v * inv);
                    bytes[j / 2] |= if j % 2 == 0 { c << 4 } else { c };
                }
            });
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        let map = dynamic_map();
        let mut absmax_codes = Vec::with_capacity(absmax.len());
        let mut group_scales = Vec::with_capacity(absmax.len().div_ceil(GROUP));
        for group in absmax.chunks(GROUP) {
            let scale = group.iter().fold(0f32, |m, a| m.max((a - offset).abs()));
            group_scales.push(scale);
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            absmax_codes.extend(group.iter().map(|a| nearest(&map, (a - offset) * inv)));
        }
        Self::from_parts(dims, codes, absmax_codes, group_scales, offset)
    }

    /// A weight from its stored parts (as [`Nf4Tensor::parts`] gives them), their lengths
    /// checked against `dims`.
    pub fn from_parts(
        dims: &[usize],
        codes: Vec<u8>,
        absmax_codes: Vec<u8>,
        group_scales: Vec<f32>,
        offset: f32,
    ) -> Result<Self> {
        let n: usize = dims.iter().product();
        let blocks = n.div_ceil(BLOCK);
        let want = (n.div_ceil(2), blocks, blocks.div_ceil(GROUP));
        let got = (codes.len(), absmax_codes.len(), group_scales.len());
        if n == 0 || got != want {
            return Err(Error::msg(format!(
                "NF4 parts for the shape {dims:?}: {got:?} codes, block codes and group scales, \
                 {want:?} expected"
            )));
        }
        Ok(Self {
            dims: dims.to_vec(),
            codes,
            absmax_codes,
            group_scales,
            offset,
        })
    }

    /// Quantises a tensor (any float dtype, any device; read through f32 on the host).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Self::quantize(&v, t.dims())
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// Bytes held: the codes, the scales' codes and the group scales and offset.
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + self.absmax_codes.len() + 4 * (self.group_scales.len() + 1)
    }

    /// The block scales as dequantised from their 8-bit codes.
    fn block_scales(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.absmax_codes
            .iter()
            .enumerate()
            .map(|(b, &c)| map[c as usize] * self.group_scales[b / GROUP] + self.offset)
            .collect()
    }

    /// The dequantised values, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let n = self.elem_count();
        let scales = self.block_scales();
        (0..n)
            .map(|i| {
                let byte = self.codes[i / 2];
                let c = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                NF4_LEVELS[c as usize] * scales[i / BLOCK]
            })
            .collect()
    }

    /// The dequantised weight as a tensor of `dtype` on `device`.
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(
            Tensor::from_vec(self.dequantize(), self.dims.as_slice(), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?,
        )
    }

    /// The stored parts, for tests against other implementations: packed codes, the scales'
    /// codes, the group scales and the offset.
    pub fn parts(&self) -> (&[u8], &[u8], &[f32], f32) {
        (
            &self.codes,
            &self.absmax_codes,
            &self.group_scales,
            self.offset,
        )
    }
}

/// An NF4 weight held on a GPU: the same parts as [`Nf4Tensor`] in device memory, dequantised
/// there by a kernel where it is used (`ops/nf4`), to the same values as the CPU's.
#[cfg(feature = "cuda")]
pub struct Nf4Cuda {
    dims: Vec<usize>,
    dev: candle_core::CudaDevice,
    codes: candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>,
    absmax_codes: candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>,
    group_scales: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    map: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    offset: f32,
    bytes: usize,
}

#[cfg(feature = "cuda")]
impl std::fmt::Debug for Nf4Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nf4Cuda")
            .field("dims", &self.dims)
            .field("bytes", &self.bytes)
            .finish()
    }
}

#[cfg(feature = "cuda")]
impl Nf4Tensor {
    /// The weight's parts copied to `dev` (the map with them: 1 KiB a weight).
    pub fn upload(&self, dev: &candle_core::CudaDevice) -> Result<Nf4Cuda> {
        Ok(Nf4Cuda {
            dims: self.dims.clone(),
            dev: dev.clone(),
            codes: dev.clone_htod(&self.codes)?,
            absmax_codes: dev.clone_htod(&self.absmax_codes)?,
            group_scales: dev.clone_htod(&self.group_scales)?,
            map: dev.clone_htod(&dynamic_map()[..])?,
            offset: self.offset,
            bytes: self.storage_bytes(),
        })
    }
}

#[cfg(feature = "cuda")]
impl Nf4Cuda {
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Bytes held, as [`Nf4Tensor::storage_bytes`] counts them (the shared map aside).
    pub fn storage_bytes(&self) -> usize {
        self.bytes
    }

    pub fn device(&self) -> &candle_core::CudaDevice {
        &self.dev
    }

    /// The weight back on the host, as quantised.
    pub fn download(&self) -> Result<Nf4Tensor> {
        Ok(Nf4Tensor {
            dims: self.dims.clone(),
            codes: self.dev.clone_dtoh(&self.codes)?,
            absmax_codes: self.dev.clone_dtoh(&self.absmax_codes)?,
            group_scales: self.dev.clone_dtoh(&self.group_scales)?,
            offset: self.offset,
        })
    }

    /// The device pointers of the parts, for the dequantisation kernel.
    pub(crate) fn parts(&self) -> crate::ops::nf4::Nf4Parts {
        use crate::ops::cuda::slice_ptr;
        crate::ops::nf4::Nf4Parts {
            codes: slice_ptr(&self.codes),
            absmax_codes: slice_ptr(&self.absmax_codes),
            group_scales: slice_ptr(&self.group_scales),
            map: slice_ptr(&self.map),
            offset: self.offset,
        }
    }

    /// Writes the dequantised weight (row-major, bf16 or f32) to the device buffer at `y`.
    ///
    /// # Safety
    /// `y` must address `elem_count` elements of the type `bf16` says, on this weight's device.
    pub(crate) unsafe fn dequantize_into(&self, bf16: bool, y: u64) -> Result<()> {
        let n: usize = self.dims.iter().product();
        // SAFETY: the parts are this weight's, of n values; y is the caller's.
        unsafe { crate::ops::nf4::dequantize_into(&self.dev, &self.parts(), n, bf16, y)? };
        Ok(())
    }

    /// The dequantised weight as a tensor of `dtype` (bf16 or f32) on `device`: by the kernel
    /// on this weight's GPU, through the host anywhere else.
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let here = Device::Cuda(self.dev.clone());
        if !device.same_device(&here) || !matches!(dtype, DType::BF16 | DType::F32) {
            return self.download()?.to_tensor(dtype, device);
        }
        let n: usize = self.dims.iter().product();
        let bf16 = dtype == DType::BF16;
        let (s, y) = crate::ops::cuda::fresh(&self.dev, bf16, n)?;
        // SAFETY: y is a fresh buffer of n elements of that type on this device.
        unsafe { self.dequantize_into(bf16, y)? };
        let like = Tensor::zeros((), dtype, device)?;
        Ok(crate::ops::cuda::wrap_storage(
            s,
            self.dims.as_slice(),
            &like,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Φ⁻¹(p) by bisection on Φ(x) = erfc(−x/√2)/2, in f64.
    fn normal_quantile(p: f64) -> f64 {
        let (mut lo, mut hi) = (-10.0f64, 10.0f64);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if 0.5 * libm::erfc(-mid / std::f64::consts::SQRT_2) < p {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    }

    /// The levels from QLoRA's definition: with δ = ½(1/30 + 1/32), 8 positive quantiles of
    /// N(0, 1) at probabilities evenly from 1 − δ down to ½ (excluded), 7 negative ones the
    /// same way, and 0; all divided by the largest.
    #[test]
    fn levels_are_qloras_normal_quantiles() {
        let delta = 0.5 * (1.0 / 30.0 + 1.0 / 32.0);
        let top = 1.0 - delta;
        let quantiles = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|i| normal_quantile(top + (0.5 - top) * i as f64 / n as f64))
                .collect()
        };
        let mut v: Vec<f64> = quantiles(8);
        v.extend(quantiles(7).iter().map(|q| -q));
        v.push(0.0);
        v.sort_by(f64::total_cmp);
        let max = v[15];
        for (i, (got, want)) in NF4_LEVELS.iter().zip(&v).enumerate() {
            let want = want / max;
            assert!(
                (*got as f64 - want).abs() < 1e-6,
                "level {i}: {got} against {want}"
            );
        }
    }

    #[test]
    fn dynamic_map_is_signed_ascending_with_zero_and_one() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((m[127], m[255]), (0.0, 1.0));
        assert!((m[0] + 0.992_968_75).abs() < 1e-7);
        // the smallest positive value: the one midpoint of [0.1, 1] at 10^-6
        assert!((m[128] - 0.55e-6).abs() < 1e-12);
    }

    #[test]
    fn round_trip_error_is_bounded_by_the_level_gaps() {
        let vals: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let q = Nf4Tensor::quantize(&vals, &[10, 100]).unwrap();
        let back = q.dequantize();
        let scales = q.block_scales();
        // the largest half-gap between neighbouring levels, times the block scale, plus the
        // scale's own rounding
        let half_gap = NF4_LEVELS
            .windows(2)
            .map(|w| (w[1] - w[0]) / 2.0)
            .fold(0f32, f32::max);
        for (i, (a, b)) in vals.iter().zip(&back).enumerate() {
            let amax = vals[i / BLOCK * BLOCK..((i / BLOCK + 1) * BLOCK).min(vals.len())]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            let bound = half_gap * scales[i / BLOCK] + (scales[i / BLOCK] - amax).abs() + 1e-6;
            assert!(
                (a - b).abs() <= bound,
                "value {i}: {a} → {b}, bound {bound}"
            );
        }
        // 4 bits a value, one byte a block, and the group scales
        assert_eq!(q.storage_bytes(), 500 + 16 + 4 * 2);
        assert!(Nf4Tensor::quantize(&[1.0, f32::NAN], &[2]).is_err());
        assert!(Nf4Tensor::quantize(&[1.0], &[2]).is_err());
    }

    #[test]
    fn parts_round_trip_and_wrong_lengths_are_refused() {
        let vals: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = Nf4Tensor::quantize(&vals, &[3, 100]).unwrap();
        let (c, a, g, o) = q.parts();
        let back = Nf4Tensor::from_parts(&[3, 100], c.to_vec(), a.to_vec(), g.to_vec(), o).unwrap();
        assert_eq!(back.dequantize(), q.dequantize());
        let err = Nf4Tensor::from_parts(&[3, 101], c.to_vec(), a.to_vec(), g.to_vec(), o)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[3, 101]"), "{err}");
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let q = Nf4Tensor::quantize(&[0.0; 130], &[130]).unwrap();
        assert!(q.dequantize().iter().all(|&v| v == 0.0));
    }
}
