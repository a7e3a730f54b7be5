//! Qwen3, Gemma 3 and Phi-3 against transformers and PEFT: logits of tiny checkpoints saved by
//! transformers' own classes, and the gradients of one LoRA step (loaded from PEFT's adapter
//! file) against PEFT's. Golden files: tests/fixtures/decoders, made by its
//! make_decoder_golden.py with the versions in VERSIONS.json.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use singlora::adapter::file::AdapterFile;
use singlora::checkpoint::Checkpoint;
use singlora::data::{collate, Encoded};
use singlora::model::llama::Llama;
use singlora::model::weights::{ConfigReader, Weights};
use singlora::model::{Body, Pooling, Task, TaskModel};
use singlora::ops::FastPath;

const FAMILIES: [&str; 3] = ["qwen3", "gemma3", "phi3"];

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
        let hidden = model
            .hidden_states(&batch(&ids), &FastPath::default())
            .unwrap();
        let rows = hidden.reshape((ids.len(), hidden.dim(2).unwrap())).unwrap();
        let ours = model.lm_logits(&rows).unwrap().to_vec2::<f32>().unwrap();
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
