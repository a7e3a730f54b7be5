//! Tiny checkpoints with the real Hugging Face file layout and seeded random weights, for tests,
//! the example and benchmarks (no model weights live in the repository).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::adapter::{Adapter, AdapterSpec};
use crate::adapter_file::AdapterFile;
use crate::checkpoint::{write_safetensors, INDEX_FILE, SINGLE_FILE};
use crate::config::AdapterConfig;
use crate::error::{IoContext, Result};
use crate::init::{normal, rng_for};
use crate::ramp::RampClock;
use crate::target::TargetSpec;

/// The shape of a LLaMA-family decoder.
#[derive(Debug, Clone, Copy)]
pub struct LlamaShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
}

impl LlamaShape {
    /// hidden 16, ff 24, 2 layers, 4 heads / 2 KV heads: square, tall and wide projections.
    pub const TINY: LlamaShape = LlamaShape {
        hidden: 16,
        intermediate: 24,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 32,
    };

    pub fn config(&self) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32"
        })
    }

    /// (module path, (d_out, d_in)) of every linear layer, the head last.
    pub fn linears(&self) -> Vec<(String, (usize, usize))> {
        let hd = self.hidden / self.heads;
        let kv = self.kv_heads * hd;
        let mut v = vec![];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            v.push((format!("{p}.self_attn.q_proj"), (self.hidden, self.hidden)));
            v.push((format!("{p}.self_attn.k_proj"), (kv, self.hidden)));
            v.push((format!("{p}.self_attn.v_proj"), (kv, self.hidden)));
            v.push((format!("{p}.self_attn.o_proj"), (self.hidden, self.hidden)));
            v.push((
                format!("{p}.mlp.gate_proj"),
                (self.intermediate, self.hidden),
            ));
            v.push((format!("{p}.mlp.up_proj"), (self.intermediate, self.hidden)));
            v.push((
                format!("{p}.mlp.down_proj"),
                (self.hidden, self.intermediate),
            ));
        }
        v.push(("lm_head".into(), (self.vocab, self.hidden)));
        v
    }

    /// Every tensor of the checkpoint, N(0, 0.2²) (norm weights around 1), in `dtype`.
    pub fn tensors(&self, seed: u64, dtype: DType) -> Result<BTreeMap<String, Tensor>> {
        let dev = Device::Cpu;
        let mut out = BTreeMap::new();
        let mut put = |name: String, shape: (usize, usize)| -> Result<()> {
            let t = normal(&mut rng_for(seed, &name), 0.2, shape, DType::F32, &dev)?;
            out.insert(name, t.to_dtype(dtype)?);
            Ok(())
        };
        put(
            "model.embed_tokens.weight".into(),
            (self.vocab, self.hidden),
        )?;
        for (name, shape) in self.linears() {
            put(format!("{name}.weight"), shape)?;
        }
        for l in 0..self.layers {
            for n in ["input_layernorm", "post_attention_layernorm"] {
                put(format!("model.layers.{l}.{n}.weight"), (1, self.hidden))?;
            }
        }
        put("model.norm.weight".into(), (1, self.hidden))?;
        for (name, t) in out.iter_mut() {
            if name.ends_with("norm.weight") {
                *t = (t.squeeze(0)? + 1.0)?;
            }
        }
        Ok(out)
    }
}

/// Writes a checkpoint directory: config.json and one `model.safetensors`, or `shards` files
/// named as transformers names them, with the index.
pub fn write_checkpoint(
    dir: &Path,
    config: &Value,
    tensors: &BTreeMap<String, Tensor>,
    shards: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).at(dir)?;
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, serde_json::to_string_pretty(config).unwrap()).at(&cfg)?;
    if shards <= 1 {
        return write_safetensors(&dir.join(SINGLE_FILE), tensors, None);
    }
    let names: Vec<&String> = tensors.keys().collect();
    let per = names.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, chunk) in names.chunks(per).enumerate() {
        let fname = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        let part: BTreeMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        for (n, t) in &part {
            weight_map.insert(n.clone(), json!(fname));
            total += t.elem_count() * t.dtype().size_in_bytes();
        }
        write_safetensors(&dir.join(&fname), &part, None)?;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let p = dir.join(INDEX_FILE);
    std::fs::write(&p, serde_json::to_string_pretty(&index).unwrap()).at(&p)
}

/// An adapter for the given layers with every tensor random and non-zero (LoRA's B included),
/// so that merges are not trivial. `step` and `ramp_steps` set u for SingLoRA.
pub fn random_adapter(
    spec: &AdapterSpec,
    layers: &[(String, (usize, usize))],
    targets: &TargetSpec,
    step: u64,
    ramp_steps: u64,
) -> Result<AdapterFile> {
    let clock = RampClock::new(crate::ramp::RampSchedule::new(ramp_steps), step);
    let mut adapters = vec![];
    for (name, (o, i)) in layers {
        let w0 = normal(
            &mut rng_for(spec.seed ^ 0x5eed, name),
            0.2,
            (*o, *i),
            DType::F32,
            &Device::Cpu,
        )?;
        let a = Adapter::init(spec, name, &w0, &clock)?;
        for p in a.params() {
            let noise = normal(
                &mut rng_for(spec.seed, &format!("{name}.{}", p.suffix)),
                0.3,
                (p.var.elem_count(), 1),
                p.var.dtype(),
                &Device::Cpu,
            )?
            .reshape(p.var.dims())?;
            p.var.set(&(p.var.as_tensor() + noise)?)?;
        }
        adapters.push((name.as_str(), (*o, *i), a));
    }
    let mut config = AdapterConfig::lora(spec.kind, spec.r, spec.alpha, spec.rslora, targets);
    config.ramp_steps = ramp_steps;
    config.step = step;
    if spec.kind == crate::adapter::AdapterKind::SingLora {
        config.init = Some(spec.init.to_string());
    }
    AdapterFile::from_adapters(
        config,
        adapters.iter().map(|(n, s, a)| (*n, *s, a)),
        BTreeMap::new(),
    )
}
