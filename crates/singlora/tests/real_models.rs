//! Checks on the real pretrained models of ../shared/ASSETS.md, when they are present
//! (`singlora demo --fetch-only` puts MiniLM in ~/.cache/singlora; SINGLORA_MINILM points
//! elsewhere). Each test says "skipped" and passes when its model is absent.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use singlora::data::{collate, Encoded};
use singlora::model::{Body, Pretrained};

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
