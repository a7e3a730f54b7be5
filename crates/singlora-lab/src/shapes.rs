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
    // splitmix64 per 8-byte word: fast enough for tens of GB on the host's cores
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut codes = vec![0u8; n.div_ceil(2)];
    codes.par_chunks_mut(8).enumerate().for_each(|(i, c)| {
        let w = mix(seed ^ ((i as u64) << 8)).to_le_bytes();
        c.copy_from_slice(&w[..c.len()]);
    });
    // codes of the scale map between −1 and 1 (indices 0..256): the upper half's small values
    let absmax_codes: Vec<u8> = (0..blocks)
        .map(|b| 128 + (mix(seed.wrapping_add(b as u64)) % 96) as u8)
        .collect();
    let group_scales = vec![0.01f32; blocks.div_ceil(GROUP)];
    let q = Nf4Tensor::from_parts(&[dims.0, dims.1], codes, absmax_codes, group_scales, 0.05)?;
    singlora::linear::nf4_on(q, device)
}

/// [`device_tensors`] with the decoder layers' linear weights in NF4 ([`random_nf4`]): the
/// dense tensors (embeddings, norms, vocabulary projection in `dtype`) and the NF4 ones.
#[allow(clippy::type_complexity)]
pub fn device_tensors_nf4(
    shape: &LlamaShape,
    dtype: DType,
    device: &Device,
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
            quant.insert(
                format!("{name}.weight"),
                random_nf4(dims, i as u64 + 1, device)?,
            );
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
