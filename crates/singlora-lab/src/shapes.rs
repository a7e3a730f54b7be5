//! The benchmark shapes (TinyLlama-1.1B, LLaMA-7B) and random weights for them made on the
//! device, where generating them on the host would take longer than the benchmark.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use singlora::error::Result;
use singlora::synthetic::LlamaShape;

/// TinyLlama-1.1B: hidden 2048, 22 layers, 32 heads, 4 KV heads, ff 5632, vocab 32000.
pub const TINYLLAMA: LlamaShape = LlamaShape {
    hidden: 2048,
    intermediate: 5632,
    layers: 22,
    heads: 32,
    kv_heads: 4,
    vocab: 32000,
};

/// LLaMA-7B: hidden 4096, 32 layers, 32 heads, ff 11008, vocab 32000.
pub const LLAMA_7B: LlamaShape = LlamaShape {
    hidden: 4096,
    intermediate: 11008,
    layers: 32,
    heads: 32,
    kv_heads: 32,
    vocab: 32000,
};

/// LLaMA-2-70B: hidden 8192, 80 layers, 64 heads, 8 KV heads, ff 28672, vocab 32000.
pub const LLAMA_70B: LlamaShape = LlamaShape {
    hidden: 8192,
    intermediate: 28672,
    layers: 80,
    heads: 64,
    kv_heads: 8,
    vocab: 32000,
};

/// splitmix64: a fast, well-mixed word per index for random weight bytes made in parallel.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A random NF4 weight of `dims` on `device`: uniform codes, block scales between 0.04 and 0.06
/// (about the block maxima of N(0, 0.02²) values). Made from its parts, so that a quantised
/// base too large to hold dense (70B) never is.
pub fn random_nf4(
    dims: (usize, usize),
    seed: u64,
    device: &Device,
) -> Result<std::sync::Arc<dyn singlora::quant::QuantWeight>> {
    use rayon::prelude::*;
    use singlora::quant::nf4::{Nf4Tensor, BLOCK, GROUP};
    let n = dims.0 * dims.1;
    let blocks = n.div_ceil(BLOCK);
    let mut codes = vec![0u8; n.div_ceil(2)];
    codes.par_chunks_mut(8).enumerate().for_each(|(i, c)| {
        let w = splitmix(seed ^ ((i as u64) << 8)).to_le_bytes();
        c.copy_from_slice(&w[..c.len()]);
    });
    // codes of the scale map between −1 and 1 (indices 0..256): the upper half's small values
    let absmax_codes: Vec<u8> = (0..blocks)
        .map(|b| 128 + (splitmix(seed.wrapping_add(b as u64)) % 96) as u8)
        .collect();
    let group_scales = vec![0.01f32; blocks.div_ceil(GROUP)];
    let q = Nf4Tensor::from_parts(&[dims.0, dims.1], codes, absmax_codes, group_scales, 0.05)?;
    singlora::linear::nf4_on(q, device)
}

/// A random Q4_K weight (a GGUF file's 4-bit K-quant: blocks of 256 values, 144 bytes) of
/// `dims` on `device`, as `--base-dtype same` keeps one: uniform 4-bit codes and 6-bit scales
/// and minima, both block scales 2⁻¹⁴ (values between about −0.004 and 0.058). Made from raw
/// blocks, never dense.
pub fn random_q4k(
    dims: (usize, usize),
    seed: u64,
    device: &Device,
) -> Result<std::sync::Arc<dyn singlora::quant::QuantWeight>> {
    use candle_core::quantized::{GgmlDType, QStorage, QTensor};
    use rayon::prelude::*;
    use singlora::quant::ggml::GgmlWeight;
    const VALUES: usize = 256;
    const BYTES: usize = 144;
    if dims.1 % VALUES != 0 {
        return Err(singlora::Error::msg(format!(
            "a Q4_K weight of {dims:?}: rows are whole blocks of {VALUES}"
        )));
    }
    let mut bytes = vec![0u8; dims.0 * dims.1 / VALUES * BYTES];
    // f16 2⁻¹⁴ for d and dmin, then 12 bytes of scales and 128 of codes
    let scale = 0x0400u16.to_le_bytes();
    bytes.par_chunks_mut(BYTES).enumerate().for_each(|(i, b)| {
        b[0..2].copy_from_slice(&scale);
        b[2..4].copy_from_slice(&scale);
        for (j, c) in b[4..].chunks_mut(8).enumerate() {
            let w = splitmix(seed ^ ((i as u64) << 8) ^ j as u64).to_le_bytes();
            c.copy_from_slice(&w[..c.len()]);
        }
    });
    let storage =
        QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, GgmlDType::Q4K)?;
    let w = GgmlWeight::new(QTensor::new(storage, dims)?, None)?;
    Ok(std::sync::Arc::new(if device.is_cpu() {
        w
    } else {
        w.to_device(device)?
    }))
}

/// [`device_tensors`] with the decoder layers' linear weights quantised by `make` (`dims`,
/// a seed; [`random_nf4`] or [`random_q4k`]): the dense tensors (embeddings, norms, vocabulary
/// projection in `dtype`) and the quantised ones.
#[allow(clippy::type_complexity)]
pub fn device_tensors_quant(
    shape: &LlamaShape,
    dtype: DType,
    device: &Device,
    make: fn(
        (usize, usize),
        u64,
        &Device,
    ) -> Result<std::sync::Arc<dyn singlora::quant::QuantWeight>>,
) -> Result<(
    BTreeMap<String, Tensor>,
    BTreeMap<String, std::sync::Arc<dyn singlora::quant::QuantWeight>>,
)> {
    let mut dense = BTreeMap::new();
    let mut quant = BTreeMap::new();
    let randn = |dims: (usize, usize)| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 0.02, dims, device)?.to_dtype(dtype)?)
    };
    dense.insert(
        "model.embed_tokens.weight".to_string(),
        randn((shape.vocab, shape.hidden))?,
    );
    for (i, (name, dims)) in shape.linears().into_iter().enumerate() {
        if name == "lm_head" {
            dense.insert(format!("{name}.weight"), randn(dims)?);
        } else {
            quant.insert(format!("{name}.weight"), make(dims, i as u64 + 1, device)?);
        }
    }
    let ones = Tensor::ones(shape.hidden, dtype, device)?;
    for l in 0..shape.layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            dense.insert(format!("model.layers.{l}.{n}.weight"), ones.clone());
        }
    }
    dense.insert("model.norm.weight".into(), ones);
    Ok((dense, quant))
}

/// Every tensor of a `shape` checkpoint, made on `device` in `dtype`: N(0, 0.02²), norms 1.
pub fn device_tensors(
    shape: &LlamaShape,
    dtype: DType,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let mut put = |name: String, dims: (usize, usize)| -> Result<()> {
        let t = Tensor::randn(0f32, 0.02, dims, device)?.to_dtype(dtype)?;
        out.insert(name, t);
        Ok(())
    };
    put(
        "model.embed_tokens.weight".into(),
        (shape.vocab, shape.hidden),
    )?;
    for (name, dims) in shape.linears() {
        put(format!("{name}.weight"), dims)?;
    }
    let ones = Tensor::ones(shape.hidden, dtype, device)?;
    for l in 0..shape.layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            out.insert(format!("model.layers.{l}.{n}.weight"), ones.clone());
        }
    }
    out.insert("model.norm.weight".into(), ones);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The random Q4_K weight dequantises (by candle, as a GGUF file's would) to values within
    /// the range its documentation gives, varied, with the shape asked for.
    #[test]
    fn random_q4k_values_are_in_range() {
        let w = random_q4k((4, 512), 7, &Device::Cpu).unwrap();
        assert_eq!(w.dims(), (4, 512));
        let v: Vec<f32> = w
            .to_tensor(DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (lo, hi) = v
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(lo >= -0.0039 && hi <= 0.0577, "{lo} {hi}");
        assert!(hi - lo > 0.02, "too little spread: {lo} {hi}");
        assert!(random_q4k((4, 100), 7, &Device::Cpu).is_err());
    }
}
