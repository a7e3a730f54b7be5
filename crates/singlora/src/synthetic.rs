//! Tiny checkpoints with the real Hugging Face file layout and seeded random weights, for tests,
//! the example and the device check (no model weights live in the repository).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::adapter::config::AdapterConfig;
use crate::adapter::file::AdapterFile;
use crate::adapter::ramp::RampClock;
use crate::adapter::target::TargetSpec;
use crate::adapter::{Adapter, AdapterSpec};
use crate::checkpoint::{write_safetensors, INDEX_FILE, SINGLE_FILE};
use crate::error::{IoContext, Result};
use crate::rng::{normal, rng_for};

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

    /// The smallest shape whose rows are whole Q4_K blocks (256 values): hidden 256, ff 512,
    /// 2 layers, 4 heads / 2 KV heads, vocab 272 (GGUF files kept in their own types).
    pub const K_BLOCKS: LlamaShape = LlamaShape {
        hidden: 256,
        intermediate: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 272,
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

/// The shape of a BERT encoder.
#[derive(Debug, Clone, Copy)]
pub struct BertShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub vocab: usize,
    pub max_positions: usize,
}

impl BertShape {
    pub const TINY: BertShape = BertShape {
        hidden: 16,
        intermediate: 32,
        layers: 2,
        heads: 2,
        vocab: 64,
        max_positions: 64,
    };

    pub fn config(&self) -> Value {
        json!({
            "architectures": ["BertModel"],
            "model_type": "bert",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_positions,
            "type_vocab_size": 2,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0
        })
    }

    /// Tensors named as a bare BertModel checkpoint (MiniLM's layout), with a pooler.
    pub fn tensors(&self, seed: u64, dtype: DType) -> Result<BTreeMap<String, Tensor>> {
        let dev = Device::Cpu;
        let h = self.hidden;
        let mut out = BTreeMap::new();
        let mut put = |name: String, shape: (usize, usize), std: f64, offset: f64| -> Result<()> {
            let t = (normal(&mut rng_for(seed, &name), std, shape, DType::F32, &dev)? + offset)?;
            let t = if shape.0 == 1 { t.squeeze(0)? } else { t };
            out.insert(name, t.to_dtype(dtype)?);
            Ok(())
        };
        put(
            "embeddings.word_embeddings.weight".into(),
            (self.vocab, h),
            0.2,
            0.0,
        )?;
        put(
            "embeddings.position_embeddings.weight".into(),
            (self.max_positions, h),
            0.2,
            0.0,
        )?;
        put(
            "embeddings.token_type_embeddings.weight".into(),
            (2, h),
            0.2,
            0.0,
        )?;
        let mut ln = |base: String| -> Result<()> {
            put(format!("{base}.weight"), (1, h), 0.1, 1.0)?;
            put(format!("{base}.bias"), (1, h), 0.1, 0.0)
        };
        ln("embeddings.LayerNorm".into())?;
        for l in 0..self.layers {
            ln(format!("encoder.layer.{l}.attention.output.LayerNorm"))?;
            ln(format!("encoder.layer.{l}.output.LayerNorm"))?;
        }
        let mut put = |name: String, shape: (usize, usize), std: f64| -> Result<()> {
            let t = normal(&mut rng_for(seed, &name), std, shape, DType::F32, &dev)?;
            let t = if shape.0 == 1 { t.squeeze(0)? } else { t };
            out.insert(name, t.to_dtype(dtype)?);
            Ok(())
        };
        let mut lin = |name: String, o: usize, i: usize| -> Result<()> {
            put(format!("{name}.weight"), (o, i), 1.0 / (i as f64).sqrt())?;
            put(format!("{name}.bias"), (1, o), 0.02)
        };
        for l in 0..self.layers {
            let p = format!("encoder.layer.{l}");
            for m in [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
            ] {
                lin(format!("{p}.{m}"), h, h)?;
            }
            lin(format!("{p}.intermediate.dense"), self.intermediate, h)?;
            lin(format!("{p}.output.dense"), h, self.intermediate)?;
        }
        lin("pooler.dense".into(), h, h)?;
        Ok(out)
    }
}

/// Writes `tokenizer.json` for a word-level vocabulary into `dir`.
pub fn write_tokenizer(
    dir: &Path,
    words: &[&str],
    style: crate::tokenize::TokenizerStyle,
) -> Result<()> {
    let tok = crate::tokenize::word_level_tokenizer(words, style);
    let p = dir.join("tokenizer.json");
    tok.save(&p, false)
        .map_err(|e| crate::error::Error::msg(format!("{}: {e}", p.display())))
}

/// GPT-2's printable stand-in for each byte (byte-level BPE vocabularies spell tokens in it).
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("a valid char")
}

/// The special tokens of [`write_bpe_tokenizer`], after the bytes and merges.
pub const BPE_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A ChatML template, as SmolLM2-Instruct's (shortened).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Writes a GPT-2-style byte-level BPE `tokenizer.json` (the 256 bytes, a few English merges,
/// [`BPE_SPECIALS`]) and a `tokenizer_config.json` with [`CHATML_TEMPLATE`] into `dir`;
/// returns the number of tokens.
pub fn write_bpe_tokenizer(dir: &Path) -> Result<usize> {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), json!(b));
    }
    let merges = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("i", "n"),
        ("a", "n"),
        ("Ġ", "a"),
    ];
    for (l, r) in merges {
        let id = vocab.len();
        vocab.insert(format!("{l}{r}"), json!(id));
    }
    let added: Vec<Value> = BPE_SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": vocab.len() + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let n = vocab.len() + added.len();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                            "use_regex": true});
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab,
                  "merges": merges.iter().map(|(l, r)| format!("{l} {r}")).collect::<Vec<_>>()},
    });
    std::fs::create_dir_all(dir).at(dir)?;
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, serde_json::to_string_pretty(&tj).unwrap()).at(&p)?;
    let tc = json!({
        "bos_token": BPE_SPECIALS[1],
        "eos_token": BPE_SPECIALS[2],
        "add_bos_token": false,
        "chat_template": CHATML_TEMPLATE,
    });
    let p = dir.join("tokenizer_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&tc).unwrap()).at(&p)?;
    Ok(n)
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
    let clock = RampClock::new(crate::adapter::ramp::RampSchedule::new(ramp_steps), step);
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
