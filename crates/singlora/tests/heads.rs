//! Trained classification heads in merged checkpoints: a head goes into the checkpoint only as
//! a class transformers scores exactly as singlora does, else beside it.
//!
//! The golden files (`tests/fixtures/heads`, written by `make_head_golden.py` there) hold tiny
//! BERT and LLaMA bases, adapters with trained heads, and the logits transformers 5 computes
//! for the merge made in Python and loaded with `AutoModelForSequenceClassification` (for mean
//! pooling, the mean-pooled reference computed from transformers' encoder output). Where that
//! script's Python environment is at hand (`~/.cache/singlora/hf-venv`, or the interpreter in
//! SINGLORA_HF_PYTHON), transformers also scores singlora's own merged output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use singlora::adapter::file::AdapterFile;
use singlora::checkpoint::{Checkpoint, TensorFile};
use singlora::merge::{merge_checkpoint, HeadPlacement, MergeOptions, HEAD_FILE, HEAD_INFO};
use singlora::model::Pooling;
use singlora::session::Session;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/heads")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn texts() -> Vec<String> {
    golden()["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn max_abs(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f64::max)
}

/// Class probabilities singlora computes for the golden texts with `adapter` on `model`, in
/// the order of the labels.
fn singlora_probs(model: &Path, adapter: &Path) -> Vec<Vec<f64>> {
    let s = Session::load(model, adapter, Device::Cpu).unwrap();
    s.classify(&texts(), 64, singlora::data::Truncation::Right)
        .unwrap()
        .into_iter()
        .map(|p| p.probabilities.iter().map(|(_, x)| *x as f64).collect())
        .collect()
}

fn merge(base: &Path, adapter: &Path, out: &Path) -> singlora::merge::MergeReport {
    merge_checkpoint(base, adapter, out, &MergeOptions::default()).unwrap()
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// W0 + (α/r)·B·A for every layer of a LoRA adapter, computed here in f64.
fn expected_lora_merge(base: &Path, adapter: &Path) -> BTreeMap<String, Tensor> {
    let ck = Checkpoint::open(base).unwrap();
    let af = AdapterFile::read(adapter, &Device::Cpu).unwrap();
    let s = af.config.lora_alpha / af.config.r as f64;
    af.layers
        .iter()
        .map(|(m, t)| {
            let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let w0 = f(&ck.load(&format!("{m}.weight"), &Device::Cpu).unwrap());
            let ba = f(&t["lora_B.weight"])
                .matmul(&f(&t["lora_A.weight"]))
                .unwrap();
            (format!("{m}.weight"), (w0 + (ba * s).unwrap()).unwrap())
        })
        .collect()
}

/// The merged checkpoint holds the base's tensors (the adapted ones merged) and `head`, with
/// nothing else: the layout transformers loaded in the golden script.
fn check_merged_tensors(base: &Path, adapter: &Path, out: &Path, head: &[&str]) {
    let (b, m) = (
        Checkpoint::open(base).unwrap(),
        Checkpoint::open(out).unwrap(),
    );
    let mut want: Vec<&str> = b.names().chain(head.iter().copied()).collect();
    want.sort();
    assert_eq!(m.names().collect::<Vec<_>>(), want);
    for (name, w) in expected_lora_merge(base, adapter) {
        let got = m
            .load(&name, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let d = (got - w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-6, "{name} differs from W0 + s·B·A by {d}");
    }
}

/// The interpreter of the golden script's environment, if it is here.
fn hf_python() -> Option<PathBuf> {
    let p = std::env::var_os("SINGLORA_HF_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/singlora/hf-venv/bin/python"))
        })?;
    p.is_file().then_some(p)
}

/// transformers' logits for `texts` on the merged checkpoint `dir`, with the class it loaded,
/// when the Python environment is here.
fn transformers_logits(dir: &Path) -> Option<(String, Vec<Vec<f64>>)> {
    let Some(python) = hf_python() else {
        println!(
            "skipped the live transformers check: no ~/.cache/singlora/hf-venv (or SINGLORA_HF_PYTHON); the golden logits were checked"
        );
        return None;
    };
    let o = Command::new(python)
        .arg(fixtures().join("make_head_golden.py"))
        .arg("score")
        .arg(dir)
        .args(texts())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    Some((
        v["architecture"].as_str().unwrap().to_string(),
        matrix(&v["logits"]),
    ))
}

#[test]
fn bert_cls_head_merges_as_bert_for_sequence_classification() {
    let g = golden();
    let (base, adapter) = (fixtures().join("bert/base"), fixtures().join("bert/cls"));
    let want = matrix(&g["bert/cls"]["logits"]);
    let want_probs: Vec<Vec<f64>> = want.iter().map(|r| softmax(r)).collect();
    // singlora's [CLS]-through-the-pooler head scores as BertForSequenceClassification does
    let ours = singlora_probs(&base, &adapter);
    let d = max_abs(&ours, &want_probs);
    println!("bert cls: singlora vs transformers, max |Δp| = {d:.2e}");
    assert!(d < 1e-4, "{d}");

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let report = merge(&base, &adapter, &out);
    assert_eq!(
        report.head,
        Some(HeadPlacement::Checkpoint {
            architecture: "BertForSequenceClassification".into()
        })
    );
    let cfg = config(&out);
    assert_eq!(cfg["architectures"][0], g["bert/cls"]["architecture"]);
    assert_eq!(cfg["id2label"]["2"], "mixed");
    assert_eq!(cfg["num_labels"], 3);
    check_merged_tensors(
        &base,
        &adapter,
        &out,
        &["classifier.bias", "classifier.weight"],
    );
    assert!(!out.join(HEAD_FILE).exists() && !out.join(HEAD_INFO).exists());
    if let Some((arch, logits)) = transformers_logits(&out) {
        let d = max_abs(&logits, &want);
        println!("bert cls: transformers on singlora's merge vs golden, max |Δlogit| = {d:.2e}");
        assert_eq!(arch, "BertForSequenceClassification");
        assert!(d < 1e-5, "{d}");
    }
}

#[test]
fn bert_mean_head_is_kept_out_of_the_architecture() {
    let g = golden();
    let (base, adapter) = (fixtures().join("bert/base"), fixtures().join("bert/mean"));
    let want = matrix(&g["bert/mean"]["logits"]);
    let want_probs: Vec<Vec<f64>> = want.iter().map(|r| softmax(r)).collect();
    // what BertForSequenceClassification computes with this head is far from it
    let misread = matrix(&g["bert/mean"]["misread_as_cls"]);
    assert!(max_abs(&misread, &want) > 0.1);
    let ours = singlora_probs(&base, &adapter);
    let d = max_abs(&ours, &want_probs);
    println!("bert mean: singlora vs the mean-pooled reference, max |Δp| = {d:.2e}");
    assert!(d < 1e-4, "{d}");

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let report = merge(&base, &adapter, &out);
    match &report.head {
        Some(HeadPlacement::Separate { pooling, reason }) => {
            assert_eq!(*pooling, Pooling::Mean);
            assert!(reason.contains("mean"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // config.json is the base's: loaders see a plain encoder, no classifier
    assert_eq!(config(&out), config(&base));
    check_merged_tensors(&base, &adapter, &out, &[]);
    let head = TensorFile::open(&out.join(HEAD_FILE)).unwrap();
    assert_eq!(
        head.names().collect::<Vec<_>>(),
        ["classifier.bias", "classifier.weight"]
    );
    let af = AdapterFile::read(&adapter, &Device::Cpu).unwrap();
    for (name, t) in &af.heads {
        let got = head.load(name, &Device::Cpu).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(HEAD_INFO)).unwrap()).unwrap();
    assert_eq!(info["pooling"], "mean");
    assert_eq!(info["labels"], g["labels"]);
    assert_eq!(
        info["logits"],
        "classifier.weight · pooled + classifier.bias"
    );
    assert!(info["pooled"].as_str().unwrap().contains("mean"));

    // the separate head on the merged encoder, pooled as classifier_head.json says, scores as
    // the adapter on the base did
    let head_only = tmp.path().join("head-only");
    let mut cfg = af.config.clone();
    cfg.layer_shapes.clear();
    cfg.pooling = Some(info["pooling"].as_str().unwrap().to_string());
    let heads = head.load_all(&Device::Cpu).unwrap();
    AdapterFile {
        config: cfg,
        layers: BTreeMap::new(),
        heads,
        chat_template: None,
    }
    .write(&head_only, false)
    .unwrap();
    let d = max_abs(&singlora_probs(&out, &head_only), &want_probs);
    assert!(d < 1e-4, "{d}");
    if let Some((arch, logits)) = transformers_logits(&out) {
        // transformers sees a plain encoder and gives it a fresh two-label head, not ours
        assert_eq!(arch, "BertForSequenceClassification");
        assert_eq!(logits[0].len(), 2);
    }
}

#[test]
fn llama_last_token_head_merges_as_llama_for_sequence_classification() {
    let g = golden();
    let (base, adapter) = (fixtures().join("llama/base"), fixtures().join("llama/last"));
    let want = matrix(&g["llama/last"]["logits"]);
    // transformers scores each text alike padded in a batch and alone
    assert!(max_abs(&want, &matrix(&g["llama/last"]["single"])) < 1e-5);
    let want_probs: Vec<Vec<f64>> = want.iter().map(|r| softmax(r)).collect();
    let ours = singlora_probs(&base, &adapter);
    let d = max_abs(&ours, &want_probs);
    println!("llama last: singlora vs transformers, max |Δp| = {d:.2e}");
    assert!(d < 1e-4, "{d}");

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let report = merge(&base, &adapter, &out);
    assert_eq!(
        report.head,
        Some(HeadPlacement::Checkpoint {
            architecture: "LlamaForSequenceClassification".into()
        })
    );
    let cfg = config(&out);
    assert_eq!(cfg["architectures"][0], g["llama/last"]["architecture"]);
    // the base names no pad id; transformers needs the one singlora pads with (`<pad>`)
    assert!(config(&base)["pad_token_id"].is_null());
    assert_eq!(cfg["pad_token_id"], 0);
    check_merged_tensors(&base, &adapter, &out, &["score.weight"]);
    if let Some((arch, logits)) = transformers_logits(&out) {
        let d = max_abs(&logits, &want);
        println!("llama last: transformers on singlora's merge vs golden, max |Δlogit| = {d:.2e}");
        assert_eq!(arch, "LlamaForSequenceClassification");
        assert!(d < 1e-5, "{d}");
    }
}

// ---- where no transformers class scores the head as trained, it is kept out ----

/// A tiny LLaMA base with a tokenizer, and a LoRA adapter with a `score` head of `pooling`.
fn llama_case(dir: &Path, pooling: &str) -> (PathBuf, PathBuf) {
    use singlora::adapter::target::TargetSpec;
    use singlora::adapter::{AdapterKind, AdapterSpec};
    use singlora::synthetic::{random_adapter, write_checkpoint, write_tokenizer, LlamaShape};
    let shape = LlamaShape::TINY;
    let base = dir.join("base");
    write_checkpoint(
        &base,
        &shape.config(),
        &shape.tensors(1, DType::F32).unwrap(),
        1,
    )
    .unwrap();
    write_tokenizer(
        &base,
        &["good", "bad"],
        singlora::tokenize::TokenizerStyle::Llama,
    )
    .unwrap();
    let targets = TargetSpec::parse("q_proj", None).unwrap();
    let layers: Vec<_> = shape
        .linears()
        .into_iter()
        .filter(|(n, _)| targets.matches(n))
        .collect();
    let mut af = random_adapter(
        &AdapterSpec::new(AdapterKind::Lora, 2, 4.0),
        &layers,
        &targets,
        0,
        0,
    )
    .unwrap();
    af.config.modules_to_save = vec!["score".into()];
    af.config.labels = Some(vec!["a".into(), "b".into()]);
    af.config.pooling = Some(pooling.into());
    af.heads.insert(
        "score.weight".into(),
        Tensor::ones((2, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    let adapter = dir.join("adapter");
    af.write(&adapter, false).unwrap();
    (base, adapter)
}

fn separate_reason(report: &singlora::merge::MergeReport) -> String {
    match &report.head {
        Some(HeadPlacement::Separate { reason, .. }) => reason.clone(),
        other => panic!("the head went into the checkpoint: {other:?}"),
    }
}

#[test]
fn heads_transformers_would_score_otherwise_are_kept_out() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();

    // a decoder head on the mean of the tokens
    let (base, adapter) = llama_case(&root.join("mean"), "mean");
    let out = root.join("mean/out");
    let reason = separate_reason(&merge(&base, &adapter, &out));
    assert!(reason.contains("mean"), "{reason}");
    assert_eq!(config(&out)["architectures"][0], "LlamaForCausalLM");
    assert!(
        out.join(HEAD_FILE).exists() && !Checkpoint::open(&out).unwrap().contains("score.weight")
    );

    // a pad id the tokenizer ends every text with: transformers would score the token before
    let (base, adapter) = llama_case(&root.join("eos"), "last");
    let tok = base.join("tokenizer.json");
    let mut t: Value = serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    t["post_processor"]["single"] = serde_json::json!([
        {"SpecialToken": {"id": "<s>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
        {"SpecialToken": {"id": "</s>", "type_id": 0}}
    ]);
    t["post_processor"]["special_tokens"]["</s>"] =
        serde_json::json!({"id": "</s>", "ids": [3], "tokens": ["</s>"]});
    std::fs::write(&tok, t.to_string()).unwrap();
    let mut cfg = config(&base);
    cfg["pad_token_id"] = 3.into();
    std::fs::write(base.join("config.json"), cfg.to_string()).unwrap();
    let out = root.join("eos/out");
    let reason = separate_reason(&merge(&base, &adapter, &out));
    assert!(reason.contains("ends every text with `</s>`"), "{reason}");

    // no tokenizer to check the padding against
    let (base, adapter) = llama_case(&root.join("notok"), "last");
    std::fs::remove_file(base.join("tokenizer.json")).unwrap();
    let reason = separate_reason(&merge(&base, &adapter, &root.join("notok/out")));
    assert!(reason.contains("no tokenizer"), "{reason}");

    // and the same base with its tokenizer writes LlamaForSequenceClassification
    let (base, adapter) = llama_case(&root.join("ok"), "last");
    let report = merge(&base, &adapter, &root.join("ok/out"));
    assert!(
        matches!(report.head, Some(HeadPlacement::Checkpoint { ref architecture }) if architecture == "LlamaForSequenceClassification")
    );
}

#[test]
fn encoder_heads_without_a_matching_class_are_kept_out() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixtures().join("bert");
    let copy = |name: &str, edit: &dyn Fn(&Path)| -> PathBuf {
        let base = tmp.path().join(name);
        std::fs::create_dir_all(&base).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(fx.join("base").join(f), base.join(f)).unwrap();
        }
        edit(&base);
        base
    };
    let adapter = fx.join("cls");

    // RoBERTa-family classes score [CLS] through a head of their own
    let base = copy("roberta", &|b| {
        let mut c = config(b);
        c["model_type"] = "roberta".into();
        std::fs::write(b.join("config.json"), c.to_string()).unwrap();
    });
    let reason = separate_reason(&merge(&base, &adapter, &tmp.path().join("o1")));
    assert!(reason.contains("roberta"), "{reason}");

    // [CLS] pooling on a base without a pooler
    let base = copy("nopooler", &|b| {
        let p = b.join("model.safetensors");
        let mut t = TensorFile::open(&p)
            .unwrap()
            .load_all(&Device::Cpu)
            .unwrap();
        t.retain(|k, _| !k.starts_with("pooler."));
        singlora::checkpoint::write_safetensors(&p, &t, None).unwrap();
    });
    let reason = separate_reason(&merge(&base, &adapter, &tmp.path().join("o2")));
    assert!(reason.contains("no pooler"), "{reason}");

    // a base that already holds a classifier cannot take a head kept out of it
    let base = copy("classifier", &|b| {
        let p = b.join("model.safetensors");
        let mut t = TensorFile::open(&p)
            .unwrap()
            .load_all(&Device::Cpu)
            .unwrap();
        t.insert(
            "classifier.weight".into(),
            Tensor::zeros((3, 16), DType::F32, &Device::Cpu).unwrap(),
        );
        singlora::checkpoint::write_safetensors(&p, &t, None).unwrap();
    });
    let out = tmp.path().join("o3");
    let err = merge_checkpoint(&base, &fx.join("mean"), &out, &MergeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("`classifier.weight`"), "{err}");
    assert!(!out.exists());
}
