//! Qwen3, Gemma 3, Phi-3 and GPT-2 against transformers and PEFT: logits of tiny checkpoints saved by
//! transformers' own classes, and the gradients of one LoRA step (loaded from PEFT's adapter
//! file) against PEFT's. Golden files: tests/fixtures/decoders, made by its
//! make_decoder_golden.py with the versions in VERSIONS.json.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use singlora::adapter::file::AdapterFile;
use singlora::checkpoint::Checkpoint;
use singlora::data::{collate, collate_rows, Encoded};
use singlora::model::llama::{Llama, LlamaConfig};
use singlora::model::weights::{ConfigReader, Weights};
use singlora::model::{Body, Pooling, Task, TaskModel};
use singlora::ops::FastPath;

mod common;

const FAMILIES: [&str; 4] = ["qwen3", "gemma3", "phi3", "gpt2"];

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/decoders")
        .join(name)
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn load(name: &str) -> Llama {
    let d = dir(name);
    let path = d.join("config.json");
    let value = read_json(&path);
    let cfg = Llama::config(&ConfigReader {
        path: &path,
        value: &value,
    })
    .unwrap();
    let weights = Weights::Checkpoint(Checkpoint::open(&d).unwrap());
    Llama::load(&weights, cfg, DType::F32, &Device::Cpu).unwrap()
}

fn golden_ids(name: &str) -> (Vec<u32>, Value) {
    let g = read_json(&dir(name).join("golden.json"));
    let ids = g["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    (ids, g["logits"].clone())
}

fn batch(ids: &[u32]) -> singlora::data::Batch {
    let items = vec![Encoded {
        ids: ids.to_vec(),
        type_ids: vec![0; ids.len()],
        label: None,
        target_mask: vec![1; ids.len()],
    }];
    collate(&items, &[0], 0, &Device::Cpu).unwrap()
}

#[test]
fn logits_match_transformers() {
    for name in FAMILIES {
        let model = load(name);
        let (ids, want) = golden_ids(name);
        let ours = logits_of(&model, &ids).to_vec2::<f32>().unwrap();
        let mut worst = 0.0f64;
        let mut scale = 0.0f64;
        for (row, want) in ours.iter().zip(want.as_array().unwrap()) {
            for (x, y) in row.iter().zip(want.as_array().unwrap()) {
                let y = y.as_f64().unwrap();
                worst = worst.max((*x as f64 - y).abs());
                scale = scale.max(y.abs());
            }
        }
        assert!(
            scale > 0.5,
            "{name}: logits too small to tell anything ({scale})"
        );
        assert!(worst <= 1e-4, "{name}: logits {worst:e} from transformers'");
    }
}

#[test]
fn lora_gradients_match_peft() {
    for name in FAMILIES {
        let d = dir(name);
        let body = Body::Llama(load(name));
        let mut model =
            TaskModel::new(body, Task::Sft, None, Pooling::Last, 0, &Device::Cpu).unwrap();
        let af = AdapterFile::read(&d.join("adapter"), &Device::Cpu).unwrap();
        model.load_adapter(&af).unwrap();
        let (ids, _) = golden_ids(name);
        let (loss, grads) = model.loss_and_grads(&batch(&ids), 1.0).unwrap();
        let want_loss = read_json(&d.join("loss.json"))["loss"].as_f64().unwrap();
        let loss = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
            "{name}: loss {loss} against PEFT's {want_loss}"
        );
        let want =
            candle_core::safetensors::load(d.join("grads.safetensors"), &Device::Cpu).unwrap();
        let mut seen = 0;
        for (layer, _, adapter) in model.adapters() {
            for p in adapter.params() {
                let key = format!("base_model.model.{layer}.{}", p.suffix);
                let theirs = want
                    .get(&key)
                    .unwrap_or_else(|| panic!("{name}: PEFT has no gradient {key}"));
                let ours = grads
                    .get(p.var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
                let diff = rel_diff(ours, theirs);
                assert!(diff <= 1e-4, "{name}: {key} {diff:e} from PEFT's gradient");
                seen += 1;
            }
        }
        assert_eq!(seen, want.len(), "{name}: every PEFT gradient compared");
    }
}

/// Generation's cached forward against the whole sequence's: a prompt of three tokens, a chunk
/// of three continuing it (the causal mask of new queries against cached keys), then one token
/// at a time; every position's logits against the full forward's and transformers'. The PEFT
/// adapter is loaded, so the adapted projections run in both.
#[test]
fn cached_decoding_matches_the_full_forward() {
    for name in FAMILIES {
        let d = dir(name);
        let mut model = TaskModel::new(
            Body::Llama(load(name)),
            Task::Sft,
            None,
            Pooling::Last,
            0,
            &Device::Cpu,
        )
        .unwrap();
        model
            .load_adapter(&AdapterFile::read(&d.join("adapter"), &Device::Cpu).unwrap())
            .unwrap();
        let (ids, _) = golden_ids(name);
        assert!(ids.len() >= 8, "{name}: golden sequence too short");
        let Body::Llama(llama) = &model.body else {
            unreachable!()
        };
        let full = logits_of(llama, &ids);
        let mut cache = model.new_cache().unwrap();
        let mut steps = vec![(0, 3), (3, 6)];
        steps.extend((6..ids.len()).map(|i| (i, i + 1)));
        for (from, to) in steps {
            assert_eq!(cache.len(), from);
            let got = model
                .next_token_logits_cached(&ids[from..to], &mut cache)
                .unwrap();
            let want = full.get(to - 1).unwrap();
            let diff = rel_diff(&got, &want);
            assert!(
                diff <= 1e-5,
                "{name}: position {}: cached logits {diff:e} from the full forward's",
                to - 1
            );
        }
        assert_eq!(cache.len(), ids.len());
        // the adapter's weights are trainable variables, yet the cache keeps no graph
        assert!(
            !cache.tracks_ops(),
            "{name}: the cache holds autograd history"
        );
    }
}

#[test]
fn packed_rows_train_as_their_examples_apart() {
    for name in FAMILIES {
        let d = dir(name);
        let mut model = TaskModel::new(
            Body::Llama(load(name)),
            Task::Sft,
            None,
            Pooling::Last,
            0,
            &Device::Cpu,
        )
        .unwrap();
        model
            .load_adapter(&AdapterFile::read(&d.join("adapter"), &Device::Cpu).unwrap())
            .unwrap();
        let (ids, _) = golden_ids(name);
        // three examples of different lengths, each with a prompt that is not trained on
        let example = |from: usize, n: usize, prompt: usize| Encoded {
            ids: ids[from..from + n].to_vec(),
            type_ids: vec![0; n],
            label: None,
            target_mask: (0..n).map(|j| u8::from(j >= prompt)).collect(),
        };
        let items = vec![example(0, 5, 2), example(2, 4, 1), example(1, 6, 3)];
        let apart = collate(&items, &[0, 1, 2], 0, &Device::Cpu).unwrap();
        // two examples in the first row (a third of its length padding), one in the second
        let packed = collate_rows(&items, &[vec![0, 1], vec![2]], 0, &Device::Cpu).unwrap();
        assert_eq!(packed.ids.dims(), &[2, 9]);
        assert_eq!(packed.segments, Some(vec![vec![5, 4], vec![6]]));
        let (loss_a, grads_a) = model.loss_and_grads(&apart, 1.0).unwrap();
        let (loss_p, grads_p) = model.loss_and_grads(&packed, 1.0).unwrap();
        let (loss_a, loss_p) = (
            loss_a.to_scalar::<f32>().unwrap(),
            loss_p.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (loss_a - loss_p).abs() <= 1e-5 * loss_a.abs(),
            "{name}: packed loss {loss_p} against {loss_a} apart"
        );
        let mut seen = 0;
        for (layer, _, adapter) in model.adapters() {
            for p in adapter.params() {
                let a = grads_a.get(p.var.as_tensor()).unwrap();
                let b = grads_p.get(p.var.as_tensor()).unwrap();
                let diff = rel_diff(b, a);
                assert!(diff <= 1e-4, "{name}: {layer}.{}: {diff:e}", p.suffix);
                seen += 1;
            }
        }
        assert!(seen > 0, "{name}: no adapter gradients compared");
        // the same rows with attention across the examples of a row: another loss
        let mut leaky = packed.clone();
        leaky.segments = None;
        let loss_l = model.loss(&leaky).unwrap().to_scalar::<f32>().unwrap();
        assert!(
            (loss_l - loss_a).abs() > 1e-3 * loss_a.abs(),
            "{name}: the test cannot tell packed attention from attention across examples"
        );
    }
}

/// Every position's vocabulary logits (t, vocab) of one sequence.
fn logits_of(m: &Llama, ids: &[u32]) -> Tensor {
    let h = m.hidden_states(&batch(ids), &FastPath::default()).unwrap();
    m.lm_logits(&h.reshape((ids.len(), h.dim(2).unwrap())).unwrap())
        .unwrap()
}

/// max |a − b| / max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    let d = (a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(scale > 0.0);
    d / scale
}

/// The family's golden config.json, edited by `edit`, read as a config.
fn edited_config(name: &str, edit: impl FnOnce(&mut Value)) -> singlora::Result<LlamaConfig> {
    let path = dir(name).join("config.json");
    let mut value = read_json(&path);
    edit(&mut value);
    Llama::config(&ConfigReader {
        path: &path,
        value: &value,
    })
}

fn assert_refused(r: singlora::Result<LlamaConfig>, fields: &[&str]) {
    let e = match r {
        Ok(_) => panic!("expected a refusal of {fields:?}"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("config.json"), "no file in: {e}");
    for f in fields {
        assert!(e.contains(&format!("`{f}`")), "no `{f}` in: {e}");
    }
}

#[test]
fn settings_not_implemented_are_refused_by_name() {
    let set = |k: &'static str, v: Value| move |c: &mut Value| c[k] = v;
    assert_refused(
        edited_config("gemma3", set("attn_logit_softcapping", 50.0.into())),
        &["attn_logit_softcapping"],
    );
    assert_refused(
        edited_config("gemma3", set("use_bidirectional_attention", true.into())),
        &["use_bidirectional_attention"],
    );
    assert_refused(
        edited_config("gemma3", set("hidden_activation", "gelu".into())),
        &["hidden_activation"],
    );
    assert_refused(
        edited_config("gemma3", |c| {
            c["rope_parameters"]["chunked_attention"] = serde_json::json!({"rope_theta": 1e4})
        }),
        &["rope_parameters.chunked_attention"],
    );
    assert_refused(
        edited_config("gemma3", |c| {
            c["rope_parameters"]["full_attention"]["rope_type"] = "yarn".into()
        }),
        &["rope_parameters.full_attention.rope_type"],
    );
    assert_refused(
        edited_config("gemma3", set("rope_theta", 5e5.into())),
        &["rope_parameters.full_attention.rope_theta", "rope_theta"],
    );
    assert_refused(
        edited_config(
            "gemma3",
            set("layer_types", serde_json::json!(["full_attention"])),
        ),
        &["layer_types"],
    );
    assert_refused(
        edited_config("phi3", |c| {
            c["rope_parameters"] = serde_json::json!({"rope_type": "longrope", "rope_theta": 1e4,
                "short_factor": [1.0], "long_factor": [1.0]})
        }),
        &["rope_parameters.rope_type"],
    );
    assert_refused(
        edited_config("phi3", |c| {
            c["rope_parameters"]["partial_rotary_factor"] = 0.75.into()
        }),
        &["rope_parameters.partial_rotary_factor"],
    );
    assert_refused(
        edited_config("qwen3", set("hidden_act", "gelu".into())),
        &["hidden_act"],
    );
    for (key, value) in [
        ("scale_attn_by_inverse_layer_idx", Value::from(true)),
        ("scale_attn_weights", false.into()),
        ("add_cross_attention", true.into()),
        ("activation_function", "relu".into()),
    ] {
        assert_refused(edited_config("gpt2", set(key, value)), &[key]);
    }
    // GPT-2's other spellings of tanh GELU, and erf GELU, are read
    for act in ["gelu_fast", "gelu_pytorch_tanh", "gelu"] {
        edited_config("gpt2", set("activation_function", act.into())).unwrap();
    }
}

/// GPT-2 as the Hugging Face hub keeps `gpt2` (names without `transformer.`, the causal-mask
/// buffers older transformers saved) loads to the same logits, with modules named as PEFT
/// names them on `GPT2LMHeadModel`; sequences past `n_positions` are refused.
#[test]
fn gpt2_reads_the_hub_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let src = dir("gpt2");
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut bare: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v))
        .collect();
    for i in 0..2 {
        let mask = Tensor::ones((1, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
        bare.insert(format!("h.{i}.attn.bias"), mask);
    }
    candle_core::safetensors::save(&bare, tmp.path().join("model.safetensors")).unwrap();
    let path = tmp.path().join("config.json");
    let value = read_json(&path);
    let cfg = Llama::config(&ConfigReader {
        path: &path,
        value: &value,
    })
    .unwrap();
    let weights = Weights::Checkpoint(Checkpoint::open(tmp.path()).unwrap());
    let hub = Llama::load(&weights, cfg, DType::F32, &Device::Cpu).unwrap();
    let (ids, _) = golden_ids("gpt2");
    let ours = logits_of(&load("gpt2"), &ids);
    assert!(rel_diff(&logits_of(&hub, &ids), &ours) == 0.0);
    let names: Vec<&str> = hub.linears().iter().map(|l| l.name()).collect();
    assert_eq!(
        names[..4],
        [
            "transformer.h.0.attn.c_attn",
            "transformer.h.0.attn.c_proj",
            "transformer.h.0.mlp.c_fc",
            "transformer.h.0.mlp.c_proj"
        ]
    );
    let long: Vec<u32> = (0..17).map(|i| i % 40).collect();
    let e = hub
        .hidden_states(&batch(&long), &FastPath::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("n_positions") && e.contains("16"), "{e}");
}

#[test]
fn gemma_reads_transformers_4_rope_layout_to_the_same_frequencies() {
    let now = edited_config("gemma3", |_| {}).unwrap();
    let old = edited_config("gemma3", |c| {
        let o = c.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.insert("rope_theta".into(), 1e6.into());
        o.insert("rope_local_base_freq".into(), 1e4.into());
        o.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "linear", "factor": 2.0}),
        );
    })
    .unwrap();
    assert_eq!(now.inv_freq, old.inv_freq);
    assert_eq!(now.local_rope, old.local_rope);
    let (local, layers) = now.local_rope.unwrap();
    assert_eq!(layers, [true, false, true]);
    // the local base, unscaled: θ^(−2i/d) at i = 1, d = 16
    assert!((local[1] - 1e4f64.powf(-2.0 / 16.0)).abs() < 1e-15);
    // the global base, halved by linear scaling
    assert!((now.inv_freq[1] - 1e6f64.powf(-2.0 / 16.0) / 2.0).abs() < 1e-15);
}

#[test]
fn missing_family_tensors_are_named() {
    for (name, tensor) in [
        ("gemma3", "model.layers.1.post_feedforward_layernorm.weight"),
        ("qwen3", "model.layers.0.self_attn.k_norm.weight"),
        ("phi3", "model.layers.1.self_attn.qkv_proj.weight"),
        ("gpt2", "transformer.h.1.ln_2.bias"),
        ("gpt2", "transformer.wpe.weight"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let src = dir(name);
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        let mut tensors =
            candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
        assert!(tensors.remove(tensor).is_some(), "{name}: no {tensor}");
        candle_core::safetensors::save(&tensors, tmp.path().join("model.safetensors")).unwrap();
        let path = tmp.path().join("config.json");
        let value = read_json(&path);
        let cfg = Llama::config(&ConfigReader {
            path: &path,
            value: &value,
        })
        .unwrap();
        let weights = Weights::Checkpoint(Checkpoint::open(tmp.path()).unwrap());
        let e = match Llama::load(&weights, cfg, DType::F32, &Device::Cpu) {
            Ok(_) => panic!("{name}: loaded without {tensor}"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(tensor), "{name}: {e}");
    }
}

/// Writes a GGUF file of `md`, a byte-level vocabulary of `vocab` placeholder tokens and
/// `tensors`.
fn save_gguf(
    path: &Path,
    mut md: Vec<(String, candle_core::quantized::gguf_file::Value)>,
    vocab: usize,
    tensors: &[(String, candle_core::quantized::QTensor)],
) {
    use candle_core::quantized::gguf_file::{self, Value as G};
    let tokens: Vec<G> = (0..vocab).map(|i| G::String(format!("t{i}"))).collect();
    md.extend([
        ("tokenizer.ggml.model".into(), G::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), G::String("gpt-2".into())),
        ("tokenizer.ggml.tokens".into(), G::Array(tokens)),
        ("tokenizer.ggml.merges".into(), G::Array(vec![])),
    ]);
    let md_refs: Vec<(&str, &G)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(path).unwrap(), &md_refs, &t_refs).unwrap();
}

/// The fixture written as llama.cpp's converter writes the family: its tensor names, Gemma's
/// norms stored as 1 + w, q/k rows in Hugging Face's order, the `<arch>.*` keys and a
/// byte-level vocabulary of the fixture's size; matrices f32, 1-D tensors `norm_dtype`.
fn write_gguf(name: &str, arch: &str, path: &Path, norm_dtype: GgmlDType) {
    use candle_core::quantized::gguf_file::Value as G;
    use candle_core::quantized::QTensor;
    let d = dir(name);
    let c = read_json(&d.join("config.json"));
    let gemma = arch == "gemma3";
    let tensors =
        candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    let layer_names = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.qkv_proj", "attn_qkv"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.gate_up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        (
            "post_attention_layernorm",
            if gemma {
                "post_attention_norm"
            } else {
                "ffn_norm"
            },
        ),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
    ];
    let mut out = vec![];
    for (hf, t) in &tensors {
        let g = match hf.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            "lm_head.weight" => "output.weight".to_string(),
            _ => {
                let rest = hf.strip_prefix("model.layers.").unwrap();
                let (layer, module) = rest.split_once('.').unwrap();
                let (module, kind) = module.rsplit_once('.').unwrap();
                let (_, g) = layer_names.iter().find(|(h, _)| *h == module).unwrap();
                format!("blk.{layer}.{g}.{kind}")
            }
        };
        let t = if gemma && hf.ends_with("norm.weight") {
            (t + 1.0).unwrap()
        } else {
            t.clone()
        };
        let dtype = if t.rank() == 1 {
            norm_dtype
        } else {
            GgmlDType::F32
        };
        out.push((g, QTensor::quantize(&t, dtype).unwrap()));
    }
    let n = |k: &str| G::U32(c[k].as_u64().unwrap() as u32);
    let theta = if gemma {
        c["rope_parameters"]["full_attention"]["rope_theta"].as_f64()
    } else {
        c["rope_parameters"]["rope_theta"].as_f64()
    };
    let vocab = c["vocab_size"].as_u64().unwrap() as usize;
    let mut md: Vec<(String, G)> = vec![
        ("general.architecture".into(), G::String(arch.into())),
        (format!("{arch}.block_count"), n("num_hidden_layers")),
        (format!("{arch}.context_length"), G::U32(4096)),
        (format!("{arch}.embedding_length"), n("hidden_size")),
        (
            format!("{arch}.feed_forward_length"),
            n("intermediate_size"),
        ),
        (
            format!("{arch}.attention.head_count"),
            n("num_attention_heads"),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            n("num_key_value_heads"),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            G::F32(c["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            G::F32(theta.unwrap() as f32),
        ),
    ];
    if let Some(hd) = c["head_dim"].as_u64() {
        md.push((format!("{arch}.attention.key_length"), G::U32(hd as u32)));
        md.push((format!("{arch}.attention.value_length"), G::U32(hd as u32)));
    }
    if gemma {
        md.push((
            format!("{arch}.attention.sliding_window"),
            G::U32(c["sliding_window"].as_u64().unwrap() as u32),
        ));
    }
    save_gguf(path, md, vocab, &out);
}

#[test]
fn gguf_files_of_the_families_load_as_their_checkpoints() {
    for (name, arch) in [("qwen3", "qwen3"), ("phi3", "phi3"), ("gemma3", "gemma3")] {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(format!("{name}.gguf"));
        write_gguf(name, arch, &path, GgmlDType::F32);
        let g = singlora::gguf::load_gguf(&path, DType::F32).unwrap();
        // every tensor back under its Hugging Face name, Gemma's norms as stored offsets
        let want =
            candle_core::safetensors::load(dir(name).join("model.safetensors"), &Device::Cpu)
                .unwrap();
        assert_eq!(g.tensors.len(), want.len(), "{name}");
        for (k, w) in &want {
            let got = g.tensors.get(k).unwrap_or_else(|| panic!("{name}: no {k}"));
            assert!(rel_diff(got, w) < 1e-6, "{name}: {k}");
        }
        let c = &g.config;
        let path_cfg = tmp.path().join("config.json");
        let cfg = Llama::config(&ConfigReader {
            path: &path_cfg,
            value: c,
        })
        .unwrap();
        if arch == "gemma3" {
            // llama.cpp's Gemma 3: every sixth layer global, the local RoPE base 10000, the
            // queries scaled by the head size
            assert_eq!(c["model_type"], "gemma3_text");
            assert_eq!(
                cfg.local_rope.as_ref().unwrap().1,
                [true, true, true],
                "a 3-layer model has no sixth layer"
            );
            assert_eq!(cfg.query_scale, 1.0);
            assert!((cfg.local_rope.unwrap().0[1] - 1e4f64.powf(-2.0 / 16.0)).abs() < 1e-15);
            continue;
        }
        // the same model: equal logits
        let weights = Weights::Memory(path.clone(), g.tensors);
        let model = Llama::load(&weights, cfg, DType::F32, &Device::Cpu).unwrap();
        let reference = load(name);
        let (ids, _) = golden_ids(name);
        let d = rel_diff(&logits_of(&model, &ids), &logits_of(&reference, &ids));
        assert!(
            d < 1e-6,
            "{name}: logits from the GGUF {d:e} from the checkpoint's"
        );
    }
}

/// Merging into GGUF from a family's GGUF base (as llama.cpp's converter writes it): the file
/// keeps the architecture, every tensor reads back as the safetensors merge of the checkpoint
/// with the same PEFT adapter, and Gemma's norms stay stored as 1 + w, also where they are
/// re-encoded (a base with f16 norms, written as f32).
#[test]
fn gguf_bases_of_the_families_merge_into_gguf() {
    use candle_core::quantized::gguf_file::{Content, Value as G};
    use singlora::gguf::model::GgufQuant;
    use singlora::merge::{merge_checkpoint, MergeOptions};
    for (name, norms) in [
        ("qwen3", GgmlDType::F32),
        ("phi3", GgmlDType::F32),
        ("gemma3", GgmlDType::F32),
        ("gemma3", GgmlDType::F16),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join(format!("{name}.gguf"));
        write_gguf(name, name, &base, norms);
        let adapter = dir(name).join("adapter");
        let out = tmp.path().join("merged.gguf");
        let gguf = MergeOptions {
            gguf: Some(GgufQuant::F32),
            ..Default::default()
        };
        merge_checkpoint(&base, &adapter, &out, &gguf).unwrap();
        let reference = tmp.path().join("reference");
        let f32 = MergeOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        };
        merge_checkpoint(&dir(name), &adapter, &reference, &f32).unwrap();
        let want = Checkpoint::open(&reference).unwrap();
        let got = singlora::gguf::load_gguf(&out, DType::F32).unwrap();
        assert_eq!(got.tensors.len(), want.names().count(), "{name}");
        // f16 norms carry f16's rounding of 1 + w: half a unit, 2^-11, near 1
        let f16_norms = norms == GgmlDType::F16;
        let norm_err = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max(0).unwrap();
            d.to_scalar::<f32>().unwrap() as f64
        };
        for n in want.names() {
            let w = want.load(n, &Device::Cpu).unwrap();
            let g = got
                .tensors
                .get(n)
                .unwrap_or_else(|| panic!("{name}: no {n}"));
            let (d, tol) = if f16_norms && w.rank() == 1 {
                (norm_err(g, &w), 2f64.powi(-11))
            } else {
                (rel_diff(g, &w), 1e-6)
            };
            assert!(
                d <= tol,
                "{name} ({norms:?} norms): {n} {d:e} from the merge's"
            );
        }
        let mut r = std::io::BufReader::new(std::fs::File::open(&out).unwrap());
        let c = Content::read(&mut r).unwrap();
        match &c.metadata["general.architecture"] {
            G::String(a) => assert_eq!(a, name),
            other => panic!("{name}: general.architecture {other:?}"),
        }
        if name == "gemma3" {
            let stored = c
                .tensor(&mut r, "blk.0.attn_norm.weight", &Device::Cpu)
                .unwrap();
            assert_eq!(stored.dtype(), GgmlDType::F32);
            let w = want
                .load("model.layers.0.input_layernorm.weight", &Device::Cpu)
                .unwrap();
            let d = norm_err(
                &stored.dequantize(&Device::Cpu).unwrap(),
                &(w + 1.0).unwrap(),
            );
            assert!(
                d <= 2f64.powi(-11),
                "gemma3: attn_norm stored {d:e} from 1 + w"
            );
        }
    }
}

/// GPT-2 end to end: SFT with SingLoRA on every Conv1D, an adapter file that says
/// `fan_in_fan_out` (as PEFT writes for GPT-2), and a merge that keeps the (d_in, d_out)
/// layout and gives the logits of the base with the adapter.
#[test]
fn gpt2_trains_and_merges_in_its_conv1d_layout() {
    use singlora::merge::{merge_checkpoint, MergeOptions};
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::copy(
        dir("gpt2").join("model.safetensors"),
        base.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg = read_json(&dir("gpt2").join("config.json"));
    cfg["bos_token_id"] = 0.into();
    cfg["eos_token_id"] = 1.into();
    std::fs::write(base.join("config.json"), cfg.to_string()).unwrap();
    common::write_tiny_tokenizer(&base);
    let run = train_tiny_sft(tmp.path(), &base, "c_attn,c_proj,c_fc");
    let af = AdapterFile::read(&run, &Device::Cpu).unwrap();
    assert!(af.config.fan_in_fan_out);
    assert_eq!(af.layers.len(), 8, "{:?}", af.layers.keys());
    assert!(af.layers.keys().all(|k| k.starts_with("transformer.h.")));
    let merged = tmp.path().join("merged");
    let f32 = MergeOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    merge_checkpoint(&base, &run, &merged, &f32).unwrap();
    let m = Checkpoint::open(&merged).unwrap();
    let c_attn = m
        .load("transformer.h.1.attn.c_attn.weight", &Device::Cpu)
        .unwrap();
    assert_eq!(c_attn.dims(), &[32, 96], "Conv1D layout kept");
    let load_dir = |d: &Path| {
        let path = d.join("config.json");
        let value = read_json(&path);
        let cfg = Llama::config(&ConfigReader {
            path: &path,
            value: &value,
        })
        .unwrap();
        let w = Weights::Checkpoint(Checkpoint::open(d).unwrap());
        Llama::load(&w, cfg, DType::F32, &Device::Cpu).unwrap()
    };
    let mut adapted = TaskModel::new(
        Body::Llama(load_dir(&base)),
        Task::Sft,
        None,
        Pooling::Last,
        0,
        &Device::Cpu,
    )
    .unwrap();
    adapted.load_adapter(&af).unwrap();
    let Body::Llama(adapted) = &adapted.body else {
        unreachable!()
    };
    let (ids, _) = golden_ids("gpt2");
    let want = logits_of(adapted, &ids);
    let got = logits_of(&load_dir(&merged), &ids);
    let diff = rel_diff(&got, &want);
    assert!(diff <= 1e-5, "merged GPT-2 {diff:e} from base + adapter");
    // the adapter moved the model
    assert!(rel_diff(&logits_of(&load_dir(&base), &ids), &want) > 1e-4);
}

/// A multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration: the settings in
/// `text_config`, the language model stored as `language_model.model.…` beside a vision tower)
/// trains on its language model: the text fixture's logits, modules named as PEFT names them
/// there, an adapter that names its modules (PEFT would also match the vision tower's
/// `q_proj`), and a merge that writes the language model's weights under their stored names
/// and copies the vision tower untouched.
#[test]
fn gemma3_multimodal_checkpoints_train_their_language_model() {
    use singlora::merge::{merge_checkpoint, MergeOptions};
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    let text = read_json(&dir("gemma3").join("config.json"));
    let mut cfg = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": text, "tie_word_embeddings": true, "image_token_index": 39,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
    });
    cfg["text_config"]["bos_token_id"] = 0.into();
    cfg["text_config"]["eos_token_id"] = 1.into();
    std::fs::write(base.join("config.json"), cfg.to_string()).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for (k, v) in
        candle_core::safetensors::load(dir("gemma3").join("model.safetensors"), &Device::Cpu)
            .unwrap()
    {
        tensors.insert(format!("language_model.{k}"), v);
    }
    let vision = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight";
    let v = Tensor::arange(0f32, 64.0, &Device::Cpu)
        .unwrap()
        .reshape((8, 8))
        .unwrap();
    tensors.insert(vision.to_string(), v.clone());
    tensors.insert(
        "multi_modal_projector.mm_input_projection_weight".into(),
        v.clone(),
    );
    candle_core::safetensors::save(&tensors, base.join("model.safetensors")).unwrap();
    common::write_tiny_tokenizer(&base);

    let pre = singlora::model::Pretrained::load(&base, DType::F32, &Device::Cpu).unwrap();
    let Body::Llama(mm) = &pre.body else {
        panic!("not a decoder")
    };
    let (ids, _) = golden_ids("gemma3");
    assert_eq!(
        rel_diff(&logits_of(mm, &ids), &logits_of(&load("gemma3"), &ids)),
        0.0
    );
    assert_eq!(
        mm.linears()[0].name(),
        "model.language_model.layers.0.self_attn.q_proj"
    );

    let run = train_tiny_sft(tmp.path(), &base, "q_proj,v_proj");
    let af = AdapterFile::read(&run, &Device::Cpu).unwrap();
    let names: Vec<&String> = af.layers.keys().collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert_eq!(
        af.config.target_modules,
        serde_json::json!(names),
        "the adapted modules by name"
    );
    let merged = tmp.path().join("merged");
    let f32 = MergeOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    merge_checkpoint(&base, &run, &merged, &f32).unwrap();
    let m = Checkpoint::open(&merged).unwrap();
    assert_eq!(m.names().count(), tensors.len());
    assert_eq!(
        m.load(vision, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        v.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let q = "language_model.model.layers.1.self_attn.q_proj.weight";
    let before = tensors[q].clone();
    assert!(
        rel_diff(&m.load(q, &Device::Cpu).unwrap(), &before) > 1e-6,
        "q_proj merged"
    );
    let mut adapted =
        TaskModel::new(pre.body, Task::Sft, None, Pooling::Last, 0, &Device::Cpu).unwrap();
    adapted.load_adapter(&af).unwrap();
    let Body::Llama(adapted) = &adapted.body else {
        unreachable!()
    };
    let merged_model = singlora::model::Pretrained::load(&merged, DType::F32, &Device::Cpu)
        .unwrap()
        .body;
    let Body::Llama(merged_model) = &merged_model else {
        unreachable!()
    };
    let diff = rel_diff(&logits_of(merged_model, &ids), &logits_of(adapted, &ids));
    assert!(
        diff <= 1e-5,
        "merged multimodal Gemma 3 {diff:e} from base + adapter"
    );
}

/// A short SingLoRA SFT run (rank 2, `targets`) on the fixture-sized model in `base`, over
/// 16 two-letter prompts with two-letter completions, in `dir/run`.
fn train_tiny_sft(dir: &Path, base: &Path, targets: &str) -> PathBuf {
    let data = dir.join("sft.jsonl");
    let rows: Vec<String> = (0..16)
        .map(|i| {
            let a = (b'a' + (i % 7) as u8) as char;
            let b = (b'k' + (i % 5) as u8) as char;
            serde_json::json!({"prompt": format!("{a}{b}"), "completion": format!(" {b}{a}")})
                .to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let run = dir.join("run");
    let cfg = singlora::train::TrainConfig {
        model: base.to_path_buf(),
        train: data,
        task: Task::Sft,
        targets: Some(targets.into()),
        rank: 2,
        alpha: 2.0,
        lr: Some(2e-2),
        max_steps: Some(6),
        batch_size: 4,
        ..Default::default()
    };
    let silent = std::sync::Arc::new(singlora::train::Silent);
    singlora::train::train(cfg, &run, false, silent).unwrap();
    run
}

/// Gemma 3 and Phi-3 Hugging Face directories written as llama.cpp's `gemma3` and `phi3`:
/// read back, the same tensors and logits as the directory; Gemma 3 settings llama.cpp
/// hard-codes otherwise (its fixture's query scalar, layer pattern, soft-capping) refused by
/// name.
#[test]
fn gemma3_and_phi3_directories_are_written_as_their_gguf_architectures() {
    use singlora::gguf::model::GgufQuant;
    use singlora::merge::{merge_checkpoint, MergeOptions};
    let gguf = MergeOptions {
        gguf: Some(GgufQuant::F32),
        ..Default::default()
    };
    for name in ["gemma3", "phi3"] {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::copy(
            dir(name).join("model.safetensors"),
            base.join("model.safetensors"),
        )
        .unwrap();
        let mut cfg = read_json(&dir(name).join("config.json"));
        common::write_tiny_tokenizer(&base);
        let adapter = dir(name).join("adapter");
        let out = tmp.path().join("out.gguf");
        if name == "gemma3" {
            std::fs::write(base.join("config.json"), cfg.to_string()).unwrap();
            let e = merge_checkpoint(&base, &adapter, &out, &gguf)
                .unwrap_err()
                .to_string();
            assert!(e.contains("config.json") && e.contains("llama.cpp"), "{e}");
            assert!(!out.exists());
            // as llama.cpp computes Gemma 3
            cfg["query_pre_attn_scalar"] = serde_json::json!(16);
            cfg["final_logit_softcapping"] = Value::Null;
            cfg["layer_types"] = serde_json::json!(["sliding_attention"; 3].to_vec());
        }
        std::fs::write(base.join("config.json"), cfg.to_string()).unwrap();
        merge_checkpoint(&base, &adapter, &out, &gguf).unwrap();
        let merged = tmp.path().join("merged");
        let f32 = MergeOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        };
        merge_checkpoint(&base, &adapter, &merged, &f32).unwrap();

        let g = singlora::gguf::load_gguf(&out, DType::F32).unwrap();
        let want = Checkpoint::open(&merged).unwrap();
        for n in want.names() {
            let w = want.load(n, &Device::Cpu).unwrap();
            let got = g.tensors.get(n).unwrap_or_else(|| panic!("{name}: no {n}"));
            assert!(rel_diff(got, &w) <= 1e-6, "{name}: {n}");
        }
        let path_cfg = tmp.path().join("config.json");
        let from_gguf = Llama::config(&ConfigReader {
            path: &path_cfg,
            value: &g.config,
        })
        .unwrap();
        let model = Llama::load(
            &Weights::Memory(out.clone(), g.tensors),
            from_gguf,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let merged_cfg = read_json(&merged.join("config.json"));
        let reference = Llama::load(
            &Weights::Checkpoint(Checkpoint::open(&merged).unwrap()),
            Llama::config(&ConfigReader {
                path: &merged.join("config.json"),
                value: &merged_cfg,
            })
            .unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let (ids, _) = golden_ids(name);
        let d = rel_diff(&logits_of(&model, &ids), &logits_of(&reference, &ids));
        assert!(
            d < 1e-6,
            "{name}: logits from the GGUF {d:e} from the directory's"
        );
    }
}

/// The GPT-2 fixture as llama.cpp's converter writes it: the `gpt2.*` keys, every Conv1D weight
/// transposed to (d_out, d_in), every bias, and the tied head written out as a copy of the
/// embedding (`head`: instead, a head of its own).
fn write_gpt2_gguf(path: &Path, norm_dtype: GgmlDType, head: Option<&Tensor>) {
    use candle_core::quantized::gguf_file::Value as G;
    use candle_core::quantized::QTensor;
    let d = dir("gpt2");
    let c = read_json(&d.join("config.json"));
    let tensors =
        candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out = vec![];
    for (hf, t) in &tensors {
        let name = hf.strip_prefix("transformer.").unwrap();
        let (g, transpose) = match name {
            "wte.weight" => ("token_embd.weight".to_string(), false),
            "wpe.weight" => ("position_embd.weight".to_string(), false),
            "ln_f.weight" => ("output_norm.weight".to_string(), false),
            "ln_f.bias" => ("output_norm.bias".to_string(), false),
            _ => {
                let (layer, module) = name.strip_prefix("h.").unwrap().split_once('.').unwrap();
                let (module, kind) = module.rsplit_once('.').unwrap();
                let g = match module {
                    "ln_1" => "attn_norm",
                    "attn.c_attn" => "attn_qkv",
                    "attn.c_proj" => "attn_output",
                    "ln_2" => "ffn_norm",
                    "mlp.c_fc" => "ffn_up",
                    "mlp.c_proj" => "ffn_down",
                    other => panic!("{other}"),
                };
                let conv1d = module.contains(".c_");
                (
                    format!("blk.{layer}.{g}.{kind}"),
                    conv1d && kind == "weight",
                )
            }
        };
        let t = if transpose {
            t.t().unwrap().contiguous().unwrap()
        } else {
            t.clone()
        };
        let dtype = if t.rank() == 1 {
            norm_dtype
        } else {
            GgmlDType::F32
        };
        out.push((g, QTensor::quantize(&t, dtype).unwrap()));
    }
    let output = head.unwrap_or(&tensors["transformer.wte.weight"]);
    out.push((
        "output.weight".into(),
        QTensor::quantize(output, GgmlDType::F32).unwrap(),
    ));
    let n = |k: &str| G::U32(c[k].as_u64().unwrap() as u32);
    let vocab = c["vocab_size"].as_u64().unwrap() as usize;
    let md: Vec<(String, G)> = vec![
        ("general.architecture".into(), G::String("gpt2".into())),
        ("gpt2.block_count".into(), n("n_layer")),
        ("gpt2.context_length".into(), n("n_positions")),
        ("gpt2.embedding_length".into(), n("n_embd")),
        ("gpt2.feed_forward_length".into(), n("n_inner")),
        ("gpt2.attention.head_count".into(), n("n_head")),
        (
            "gpt2.attention.layer_norm_epsilon".into(),
            G::F32(c["layer_norm_epsilon"].as_f64().unwrap() as f32),
        ),
    ];
    save_gguf(path, md, vocab, &out);
}

/// A GPT-2 model from its llama.cpp GGUF file: the checkpoint's tensors in Hugging Face's
/// Conv1D layout, the copied head read as tied, the checkpoint's logits; a head of its own
/// stays untied.
#[test]
fn gpt2_gguf_files_load_as_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gpt2.gguf");
    write_gpt2_gguf(&path, GgmlDType::F32, None);
    let g = singlora::gguf::load_gguf(&path, DType::F32).unwrap();
    let want = candle_core::safetensors::load(dir("gpt2").join("model.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(g.tensors.len(), want.len());
    for (k, w) in &want {
        let got = g.tensors.get(k).unwrap_or_else(|| panic!("no {k}"));
        assert_eq!(got.dims(), w.dims(), "{k}");
        assert!(rel_diff(got, w) == 0.0, "{k}");
    }
    let c = &g.config;
    assert_eq!(c["model_type"], "gpt2");
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["n_positions"], 16);
    assert_eq!(c["n_inner"], 48);
    let path_cfg = tmp.path().join("config.json");
    let cfg = Llama::config(&ConfigReader {
        path: &path_cfg,
        value: c,
    })
    .unwrap();
    let weights = Weights::Memory(path.clone(), g.tensors);
    let model = Llama::load(&weights, cfg, DType::F32, &Device::Cpu).unwrap();
    let (ids, golden) = golden_ids("gpt2");
    let ours = logits_of(&model, &ids);
    assert!(rel_diff(&ours, &logits_of(&load("gpt2"), &ids)) == 0.0);
    // and transformers' logits, within the golden file's tolerance
    let golden: Vec<Vec<f32>> = serde_json::from_value(golden).unwrap();
    let golden = Tensor::new(golden, &Device::Cpu).unwrap();
    assert!(rel_diff(&ours, &golden) < 1e-4);

    let own = Tensor::randn(0f32, 0.02, (40, 32), &Device::Cpu).unwrap();
    let untied = tmp.path().join("untied.gguf");
    write_gpt2_gguf(&untied, GgmlDType::F32, Some(&own));
    let g = singlora::gguf::load_gguf(&untied, DType::F32).unwrap();
    assert_eq!(g.config["tie_word_embeddings"], false);
    assert!(rel_diff(&g.tensors["lm_head.weight"], &own) == 0.0);

    // a wrong Conv1D shape is refused by name
    let e = {
        use candle_core::quantized::gguf_file::{self, Content};
        let mut r = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        let content = Content::read(&mut r).unwrap();
        let mut md: Vec<(&str, &candle_core::quantized::gguf_file::Value)> = content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        md.sort_by_key(|(k, _)| *k);
        let mut ts = vec![];
        for name in content.tensor_infos.keys() {
            let q = content.tensor(&mut r, name, &Device::Cpu).unwrap();
            let t = q.dequantize(&Device::Cpu).unwrap();
            // the Hugging Face layout where llama.cpp's is expected
            let t = if name == "blk.0.ffn_up.weight" {
                t.t().unwrap().contiguous().unwrap()
            } else {
                t
            };
            let q = candle_core::quantized::QTensor::quantize(&t, GgmlDType::F32).unwrap();
            ts.push((name.clone(), q));
        }
        let refs: Vec<(&str, &candle_core::quantized::QTensor)> =
            ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let bad = tmp.path().join("bad.gguf");
        gguf_file::write(&mut std::fs::File::create(&bad).unwrap(), &md, &refs).unwrap();
        singlora::gguf::load_gguf(&bad, DType::F32)
            .unwrap_err()
            .to_string()
    };
    assert!(
        e.contains("bad.gguf") && e.contains("blk.0.ffn_up.weight") && e.contains("[48, 32]"),
        "{e}"
    );
}

/// GPT-2 into GGUF, from its checkpoint (also in the hub's bare layout with the causal-mask
/// buffers) and from its GGUF file: the file is llama.cpp's `gpt2` (Conv1D weights stored
/// (d_out, d_in), every bias) and reads back as the safetensors merge with the same PEFT
/// adapter; the adapter as a llama.cpp LoRA GGUF holds that merge's change as B·A.
#[test]
fn gpt2_merges_and_exports_into_gguf() {
    use candle_core::quantized::gguf_file::{Content, Value as G};
    use singlora::gguf::model::GgufQuant;
    use singlora::merge::{merge_checkpoint, MergeOptions};
    let tmp = tempfile::tempdir().unwrap();
    let adapter = dir("gpt2").join("adapter");
    // the fixture with a tokenizer, which a GGUF file carries
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir("gpt2").join(f), ckpt.join(f)).unwrap();
    }
    common::write_tiny_tokenizer(&ckpt);
    let reference = tmp.path().join("reference");
    let f32 = MergeOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    merge_checkpoint(&ckpt, &adapter, &reference, &f32).unwrap();
    let want = Checkpoint::open(&reference).unwrap();
    let gguf = MergeOptions {
        gguf: Some(GgufQuant::F32),
        ..Default::default()
    };
    // the hub's layout of the same checkpoint
    let hub = tmp.path().join("hub");
    std::fs::create_dir_all(&hub).unwrap();
    std::fs::copy(dir("gpt2").join("config.json"), hub.join("config.json")).unwrap();
    common::write_tiny_tokenizer(&hub);
    let mut bare: std::collections::HashMap<String, Tensor> =
        candle_core::safetensors::load(dir("gpt2").join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v))
            .collect();
    for i in 0..2 {
        let mask = Tensor::ones((1, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
        bare.insert(format!("h.{i}.attn.bias"), mask);
    }
    candle_core::safetensors::save(&bare, hub.join("model.safetensors")).unwrap();
    let gguf_base = tmp.path().join("base.gguf");
    write_gpt2_gguf(&gguf_base, GgmlDType::F32, None);

    for (label, base) in [
        ("checkpoint", ckpt.clone()),
        ("hub layout", hub.clone()),
        ("gguf", gguf_base.clone()),
    ] {
        let out = tmp.path().join(format!("{}.gguf", label.replace(' ', "-")));
        merge_checkpoint(&base, &adapter, &out, &gguf).unwrap();
        let mut r = std::io::BufReader::new(std::fs::File::open(&out).unwrap());
        let c = Content::read(&mut r).unwrap();
        match &c.metadata["general.architecture"] {
            G::String(a) => assert_eq!(a, "gpt2", "{label}"),
            other => panic!("{label}: general.architecture {other:?}"),
        }
        assert!(
            c.metadata.keys().all(|k| !k.starts_with("llama.")),
            "{label}"
        );
        assert_eq!(
            c.tensor_infos["blk.1.attn_qkv.weight"].shape.dims(),
            &[96, 32],
            "{label}: llama.cpp's (d_out, d_in)"
        );
        assert!(
            c.tensor_infos.contains_key("blk.1.ffn_down.bias"),
            "{label}"
        );
        assert!(
            c.tensor_infos.contains_key("position_embd.weight"),
            "{label}"
        );
        let got = singlora::gguf::load_gguf(&out, DType::F32).unwrap();
        assert_eq!(got.config["tie_word_embeddings"], true, "{label}");
        assert_eq!(got.tensors.len(), want.names().count(), "{label}");
        for n in want.names() {
            let w = want.load(n, &Device::Cpu).unwrap();
            let g = got
                .tensors
                .get(n)
                .unwrap_or_else(|| panic!("{label}: no {n}"));
            assert!(rel_diff(g, &w) <= 1e-6, "{label}: {n}");
        }
    }
    // llama.cpp's quantiser leaves the learned positions in f32
    let q8 = tmp.path().join("q8.gguf");
    let opts = MergeOptions {
        gguf: Some(GgufQuant::Q8_0),
        ..Default::default()
    };
    merge_checkpoint(&ckpt, &adapter, &q8, &opts).unwrap();
    let mut r = std::io::BufReader::new(std::fs::File::open(&q8).unwrap());
    let c = Content::read(&mut r).unwrap();
    assert_eq!(
        c.tensor_infos["position_embd.weight"].ggml_dtype,
        GgmlDType::F32
    );
    assert_eq!(
        c.tensor_infos["blk.0.ffn_up.weight"].ggml_dtype,
        GgmlDType::Q8_0
    );

    // the merge changed c_attn (so the comparisons above could fail)
    let base_attn = load_tensor(&dir("gpt2"), "transformer.h.1.attn.c_attn.weight");
    let merged_attn = want
        .load("transformer.h.1.attn.c_attn.weight", &Device::Cpu)
        .unwrap();
    let change = (&merged_attn - &base_attn).unwrap();
    assert!(
        change
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1e-4
    );

    // the adapter for llama.cpp's --lora: B·A is the change in llama.cpp's (d_out, d_in)
    let lora = tmp.path().join("adapter.gguf");
    singlora::gguf::lora::export_lora_gguf(&adapter, &lora, Some(&ckpt), false).unwrap();
    let mut r = std::io::BufReader::new(std::fs::File::open(&lora).unwrap());
    let c = Content::read(&mut r).unwrap();
    match &c.metadata["general.architecture"] {
        G::String(a) => assert_eq!(a, "gpt2"),
        other => panic!("general.architecture {other:?}"),
    }
    let read = |r: &mut std::io::BufReader<std::fs::File>, n: &str| {
        c.tensor(r, n, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
    };
    let a = read(&mut r, "blk.1.attn_qkv.weight.lora_a");
    let b = read(&mut r, "blk.1.attn_qkv.weight.lora_b");
    let delta = b.matmul(&a).unwrap();
    assert!(rel_diff(&delta, &change.t().unwrap()) <= 1e-5);
}

fn load_tensor(d: &Path, name: &str) -> Tensor {
    Checkpoint::open(d)
        .unwrap()
        .load(name, &Device::Cpu)
        .unwrap()
}
