//! config.json read as transformers 5 reads it: RoPE frequencies and whole-model logits against
//! transformers' own (golden files of tests/fixtures/rope, made by its make_rope_golden.py with
//! the versions in VERSIONS.json), and every setting singlora does not implement refused by
//! name, with the file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use singlora::checkpoint::Checkpoint;
use singlora::data::{collate, Encoded};
use singlora::model::bert::Bert;
use singlora::model::llama::{Llama, LlamaConfig};
use singlora::model::weights::{ConfigReader, Weights};
use singlora::model::{Body, Pooling, Task, TaskModel};
use singlora::ops::{rope_tables, FastPath};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/rope")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn llama_config(path: &Path, value: &Value) -> singlora::Result<LlamaConfig> {
    Llama::config(&ConfigReader { path, value })
}

fn max_rel(ours: &[f64], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs() / b.abs())
        .fold(0.0, f64::max)
}

#[test]
fn rope_frequencies_match_transformers_in_both_layouts() {
    let cases = fixtures().join("cases");
    let mut n = 0;
    for entry in std::fs::read_dir(&cases).unwrap() {
        let dir = entry.unwrap().path();
        let want = read_json(&dir.join("expected.json"));
        let f64_ref = floats(&want["inv_freq_f64"]);
        let f32_ref = floats(&want["inv_freq_f32"]);
        for file in ["config.json", "config.v4.json"] {
            let p = dir.join(file);
            let cfg = llama_config(&p, &read_json(&p)).unwrap();
            let what = p.display();
            // the same formulas in double precision agree to rounding
            let rel = max_rel(&cfg.inv_freq, &f64_ref);
            assert!(rel <= 1e-12, "{what}: {rel:e} from transformers in f64");
            // transformers' float32 run, to float32 rounding of θ^(−2i/d)
            let rel = max_rel(&cfg.inv_freq, &f32_ref);
            assert!(rel <= 2e-6, "{what}: {rel:e} from transformers in f32");
            let positions: Vec<usize> = want["positions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_u64().unwrap() as usize)
                .collect();
            let t = positions.iter().max().unwrap() + 1;
            let (cos, sin) = rope_tables(&cfg.inv_freq, t, DType::F64, &Device::Cpu).unwrap();
            let half = cfg.inv_freq.len();
            for (table, key) in [(&cos, "cos_first_half"), (&sin, "sin_first_half")] {
                let rows = table.to_vec2::<f64>().unwrap();
                for (k, &pos) in positions.iter().enumerate() {
                    let theirs = floats(&want[key][k]);
                    for i in 0..half {
                        // both halves of a head turn at the same frequencies
                        for ours in [rows[pos][i], rows[pos][half + i]] {
                            let d = (ours - theirs[i]).abs();
                            assert!(d <= 2e-5, "{what}: {key} at {pos}, {i}: {d:e}");
                        }
                    }
                }
            }
        }
        n += 1;
    }
    assert!(n >= 7, "only {n} RoPE cases in {}", cases.display());
}

/// Logits (t, vocab) of `ids` through a model loaded from `dir`, on the CPU in f32.
fn logits(dir: &Path, config: &Value, ids: &[u32]) -> singlora::Result<Vec<Vec<f32>>> {
    let path = dir.join("config.json");
    let cfg = llama_config(&path, config)?;
    let weights = Weights::Checkpoint(Checkpoint::open(dir)?);
    let model = Llama::load(&weights, cfg, DType::F32, &Device::Cpu)?;
    let items = vec![Encoded {
        ids: ids.to_vec(),
        type_ids: vec![0; ids.len()],
        label: None,
        target_mask: vec![1; ids.len()],
    }];
    let batch = collate(&items, &[0], 0, &Device::Cpu)?;
    let hidden = model.hidden_states(&batch, &FastPath::default())?;
    let h = hidden.dim(2)?;
    let rows = hidden.reshape((ids.len(), h))?;
    Ok(model.lm_logits(&rows)?.to_vec2::<f32>()?)
}

fn max_abs(a: &[Vec<f32>], b: &Value) -> f64 {
    let mut m = 0.0f64;
    for (row, want) in a.iter().zip(b.as_array().unwrap()) {
        for (x, y) in row.iter().zip(floats(want)) {
            m = m.max((*x as f64 - y).abs());
        }
    }
    m
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn golden(name: &str) -> (Vec<u32>, Value) {
    let g = read_json(&model_dir(name).join("logits.json"));
    let ids = g["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    (ids, g["logits"].clone())
}

#[test]
fn whole_models_match_transformers_logits() {
    for name in [
        "llama3_tied",
        "llama_biases_linear",
        "qwen2",
        "mistral_window",
    ] {
        let dir = model_dir(name);
        let (ids, want) = golden(name);
        let config = read_json(&dir.join("config.json"));
        let ours = logits(&dir, &config, &ids).unwrap();
        let d = max_abs(&ours, &want);
        assert!(d <= 1e-4, "{name}: logits {d:e} from transformers'");
    }
}

#[test]
fn ignoring_rope_parameters_would_be_caught() {
    // the reading: transformers 5's `rope_parameters` dropped, θ = 10000 unscaled
    let dir = model_dir("llama3_tied");
    let (ids, want) = golden("llama3_tied");
    let mut config = read_json(&dir.join("config.json"));
    config.as_object_mut().unwrap().remove("rope_parameters");
    let d = max_abs(&logits(&dir, &config, &ids).unwrap(), &want);
    assert!(
        d > 1e-2,
        "the golden logits do not tell the RoPE settings apart ({d:e})"
    );
}

fn err_text<T>(r: singlora::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected a refusal"),
        Err(e) => e.to_string(),
    }
}

/// A LLaMA config.json in transformers 5's layout, edited by `edit`.
fn llama_json(edit: impl FnOnce(&mut Value)) -> Value {
    let mut v = json!({
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 32,
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}
    });
    edit(&mut v);
    v
}

fn assert_refused(r: singlora::Result<impl Sized>, path: &Path, fields: &[&str]) {
    let e = err_text(r);
    assert!(e.contains(&path.display().to_string()), "no file in: {e}");
    for f in fields {
        assert!(e.contains(&format!("`{f}`")), "no `{f}` in: {e}");
    }
}

#[test]
fn llama_settings_not_implemented_are_refused_by_name() {
    let p = PathBuf::from("/models/some-llama/config.json");
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (
            llama_json(
                |v| v["rope_parameters"] = json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
            ),
            vec!["rope_parameters.rope_type"],
        ),
        (
            llama_json(|v| {
                v["rope_scaling"] = json!({"type": "dynamic", "factor": 2.0});
                v.as_object_mut().unwrap().remove("rope_parameters");
            }),
            vec!["rope_scaling.type"],
        ),
        (
            llama_json(|v| {
                v["rope_parameters"] =
                    json!({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]})
            }),
            vec!["rope_parameters.rope_type"],
        ),
        (
            llama_json(|v| v["rope_theta"] = json!(500000.0)),
            vec!["rope_theta", "rope_parameters.rope_theta"],
        ),
        (
            llama_json(|v| v["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0})),
            vec!["rope_scaling", "rope_parameters"],
        ),
        (
            llama_json(|v| {
                v["rope_parameters"] = json!({
                    "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}
                })
            }),
            vec!["rope_parameters.full_attention"],
        ),
        (
            llama_json(|v| v["partial_rotary_factor"] = json!(0.5)),
            vec!["partial_rotary_factor"],
        ),
        (
            llama_json(|v| v["rope_parameters"]["partial_rotary_factor"] = json!(0.5)),
            vec!["rope_parameters.partial_rotary_factor"],
        ),
        (
            llama_json(
                |v| v["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "high_freq_factor": 4.0}),
            ),
            vec!["rope_parameters.low_freq_factor"],
        ),
        (
            llama_json(|v| {
                v["rope_parameters"] = json!({"rope_type": "linear", "rope_theta": 10000.0})
            }),
            vec!["rope_parameters.factor"],
        ),
        (
            llama_json(|v| v["hidden_act"] = json!("gelu")),
            vec!["hidden_act"],
        ),
        (
            llama_json(|v| v["num_key_value_heads"] = json!(3)),
            vec!["num_key_value_heads"],
        ),
    ];
    for (config, fields) in cases {
        assert_refused(llama_config(&p, &config), &p, &fields);
    }
    // the same settings in agreement are one model, whichever layout says them
    let both = llama_json(|v| {
        v["rope_theta"] = json!(10000.0);
        v["rope_scaling"] = json!({"type": "default"});
    });
    let one = llama_json(|_| {});
    assert_eq!(
        llama_config(&p, &both).unwrap().inv_freq,
        llama_config(&p, &one).unwrap().inv_freq
    );
}

/// A copy of fixture model `name` in a temporary directory with its config.json edited.
fn edited_model(name: &str, edit: impl FnOnce(&mut Value)) -> (tempfile::TempDir, Value) {
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir(name);
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let mut config = read_json(&src.join("config.json"));
    edit(&mut config);
    std::fs::write(
        tmp.path().join("config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    (tmp, config)
}

/// The refusal to load fixture model `name` with its config.json edited by `edit`, checked to
/// name the checkpoint and each of `words`.
fn refusal_of_edited(name: &str, edit: impl FnOnce(&mut Value), words: &[&str]) {
    let (tmp, config) = edited_model(name, edit);
    let e = err_text(logits(tmp.path(), &config, &[1, 2]));
    assert!(
        e.contains(&tmp.path().display().to_string()),
        "no file in: {e}"
    );
    for w in words {
        assert!(e.contains(w), "no {w} in: {e}");
    }
}

#[test]
fn checkpoint_tensors_the_config_gives_no_place_are_refused() {
    // biases in the file, none in config.json: transformers would drop them, and so would we
    let no_biases = |c: &mut Value| {
        c["attention_bias"] = json!(false);
        c["mlp_bias"] = json!(false);
    };
    refusal_of_edited(
        "llama_biases_linear",
        no_biases,
        &["o_proj.bias", "attention_bias"],
    );
    // the same file as a Mistral, whose class has no biases
    let mistral = |c: &mut Value| c["model_type"] = json!("mistral");
    refusal_of_edited("llama_biases_linear", mistral, &["q_proj.bias"]);
    // a head of its own in the file while config.json ties it to the embedding
    let tied = |c: &mut Value| c["tie_word_embeddings"] = json!(true);
    refusal_of_edited(
        "llama_biases_linear",
        tied,
        &["lm_head.weight", "tie_word_embeddings"],
    );
    // untied, and the file has no lm_head.weight (a bare LlamaModel): no vocabulary logits
    let untied = |c: &mut Value| c["tie_word_embeddings"] = json!(false);
    refusal_of_edited(
        "llama3_tied",
        untied,
        &["lm_head.weight", "tie_word_embeddings"],
    );
    // such a model still classifies, and SFT is refused before any training starts
    let (tmp, config) = edited_model("llama3_tied", untied);
    let path = tmp.path().join("config.json");
    let weights = Weights::Checkpoint(Checkpoint::open(tmp.path()).unwrap());
    let cfg = llama_config(&path, &config).unwrap();
    let body = || {
        let l = Llama::load(&weights, cfg.clone(), DType::F32, &Device::Cpu).unwrap();
        Body::Llama(l)
    };
    let new = |task, labels| TaskModel::new(body(), task, labels, Pooling::Last, 0, &Device::Cpu);
    new(Task::Classify, Some(2)).unwrap();
    let e = err_text(new(Task::Sft, None));
    assert!(e.contains(&tmp.path().display().to_string()), "{e}");
}

#[test]
fn sequences_past_the_sliding_window_are_refused() {
    let dir = model_dir("mistral_window");
    let config = read_json(&dir.join("config.json"));
    let window = config["sliding_window"].as_u64().unwrap() as usize;
    let ids: Vec<u32> = (0..window as u32 + 1).collect();
    let e = err_text(logits(&dir, &config, &ids));
    assert!(
        e.contains("sliding_window") && e.contains("--max-length"),
        "{e}"
    );

    let p = PathBuf::from("/models/x/config.json");
    let window_of = |v: Value| llama_config(&p, &v).unwrap().sliding_window;
    // Mistral's class windows every layer by 4096 when the key is absent, none when null
    assert_eq!(
        window_of(llama_json(|v| v["model_type"] = json!("mistral"))),
        Some(4096)
    );
    assert_eq!(
        window_of(llama_json(|v| {
            v["model_type"] = json!("mistral");
            v["sliding_window"] = Value::Null;
        })),
        None
    );
    // Qwen2 only with use_sliding_window, and only for layers from max_window_layers on
    let qwen = |use_it: bool, max_window_layers: usize| {
        llama_json(|v| {
            v["model_type"] = json!("qwen2");
            v["num_hidden_layers"] = json!(4);
            v["sliding_window"] = json!(64);
            v["use_sliding_window"] = json!(use_it);
            v["max_window_layers"] = json!(max_window_layers);
        })
    };
    assert_eq!(window_of(qwen(false, 0)), None);
    assert_eq!(window_of(qwen(true, 4)), None);
    assert_eq!(window_of(qwen(true, 2)), Some(64));
    // LlamaConfig has no window: a stray key changes nothing in transformers either
    assert_eq!(
        window_of(llama_json(|v| v["sliding_window"] = json!(8))),
        None
    );
}

fn bert_json(edit: impl FnOnce(&mut Value)) -> Value {
    let mut v = singlora::synthetic::BertShape::TINY.config();
    edit(&mut v);
    v
}

#[test]
fn bert_settings_not_implemented_are_refused_by_name() {
    let p = PathBuf::from("/models/some-bert/config.json");
    let cases: Vec<(Value, &str)> = vec![
        (
            bert_json(|v| v["position_embedding_type"] = json!("relative_key")),
            "position_embedding_type",
        ),
        (bert_json(|v| v["is_decoder"] = json!(true)), "is_decoder"),
        (
            bert_json(|v| v["hidden_act"] = json!("gelu_10")),
            "hidden_act",
        ),
        (
            bert_json(|v| {
                v["model_type"] = json!("electra");
                v["embedding_size"] = json!(8);
            }),
            "embedding_size",
        ),
    ];
    for (value, field) in cases {
        assert_refused(
            Bert::config(&ConfigReader {
                path: &p,
                value: &value,
            }),
            &p,
            &[field],
        );
    }
    let ok = bert_json(|v| v["position_embedding_type"] = json!("absolute"));
    let c = Bert::config(&ConfigReader {
        path: &p,
        value: &ok,
    })
    .unwrap();
    assert_eq!(c.pad_token_id, 0);
    // RoBERTa's classes number positions after pad_token_id, 1 unless the file says otherwise
    let mut roberta = bert_json(|v| v["model_type"] = json!("roberta"));
    roberta.as_object_mut().unwrap().remove("pad_token_id");
    let c = Bert::config(&ConfigReader {
        path: &p,
        value: &roberta,
    })
    .unwrap();
    assert_eq!(c.pad_token_id, 1);
}

#[test]
fn bert_tensors_the_config_gives_no_place_are_refused() {
    let shape = singlora::synthetic::BertShape::TINY;
    let mut tensors = shape.tensors(0, DType::F32).unwrap();
    let p = PathBuf::from("/models/some-bert/config.json");
    let config = shape.config();
    let reader = ConfigReader {
        path: &p,
        value: &config,
    };
    let load = |t: &std::collections::BTreeMap<String, Tensor>| {
        let w = Weights::Memory(p.clone(), t.clone());
        Bert::load(&w, Bert::config(&reader).unwrap(), DType::F32, &Device::Cpu).map(|_| ())
    };
    // heads of other tasks and index buffers are not the encoder's
    let extra = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    tensors.insert("cls.predictions.bias".into(), extra.clone());
    tensors.insert("embeddings.position_ids".into(), extra.clone());
    load(&tensors).unwrap();
    // a cross-attention block (`add_cross_attention`) is
    tensors.insert(
        "encoder.layer.0.crossattention.self.query.weight".into(),
        extra,
    );
    let e = err_text(load(&tensors));
    assert!(e.contains("crossattention"), "{e}");
}

/// llama.cpp's `rope_freqs` (per-frequency divisors, stored in f32) and back: Meta's LLaMA 3.1
/// and 3.2 settings, a small head with other parameters, no scaling; factors no LLaMA 3.1
/// scaling gives are not taken for one.
#[test]
fn llama3_scaling_is_recovered_from_llama_cpps_rope_freqs() {
    use singlora::model::llama::{Rope, RopeScaling};
    let llama3 = |factor, low, high, old| RopeScaling::Llama3 {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: old,
    };
    for (theta, head_dim, scaling) in [
        (500000.0, 128, llama3(8.0, 1.0, 4.0, 8192.0)),
        (500000.0, 64, llama3(32.0, 1.0, 4.0, 8192.0)),
        (500000.0, 64, llama3(4.0, 1.0, 2.0, 2048.0)),
    ] {
        let rope = Rope {
            theta,
            scaling: scaling.clone(),
        };
        let factors: Vec<f64> = rope
            .freq_factors(head_dim)
            .unwrap()
            .iter()
            .map(|f| *f as f32 as f64)
            .collect();
        assert!(factors.contains(&1.0) && factors.iter().any(|f| *f > 1.0));
        assert_eq!(
            Rope::from_freq_factors(theta, head_dim, &factors),
            Some(scaling.clone()),
            "{scaling:?}"
        );
    }
    assert_eq!(
        Rope::from_freq_factors(1e4, 16, &[1.0; 8]),
        Some(RopeScaling::None)
    );
    // a uniform factor (linear scaling), a rising one, the wrong length: not LLaMA 3.1's
    assert_eq!(Rope::from_freq_factors(5e5, 16, &[2.0; 8]), None);
    let rising: Vec<f64> = (0..8).map(|i| 1.0 + i as f64).collect();
    assert_eq!(Rope::from_freq_factors(5e5, 16, &rising), None);
    assert_eq!(Rope::from_freq_factors(5e5, 16, &[1.0; 7]), None);
    // other rope scalings have no rope_freqs
    let linear = Rope {
        theta: 1e4,
        scaling: RopeScaling::Linear { factor: 2.0 },
    };
    assert_eq!(linear.freq_factors(16), None);
}
