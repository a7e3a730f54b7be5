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
