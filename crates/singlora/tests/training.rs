//! Training end to end on tiny random checkpoints in the real file layouts (config.json +
//! model.safetensors + tokenizer.json): the loss goes down, the outputs are written, resume is
//! bit-identical, every trainable tensor gets a gradient, and whole-model gradients match
//! finite differences in f64.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use singlora::adapter::file::AdapterFile;
use singlora::adapter::ramp::{RampClock, RampSchedule};
use singlora::adapter::target::TargetSpec;
use singlora::adapter::{AdapterKind, AdapterSpec, Method};
use singlora::checkpoint::TensorFile;
use singlora::data::{
    collate, encode, load_dataset, Columns, DataSettings, LabelSet, Task, Truncation,
};
use singlora::model::{ClassifierHead, Pretrained, TaskModel};
use singlora::synthetic::{write_checkpoint, write_tokenizer, BertShape, LlamaShape};
use singlora::tokenize::TokenizerStyle;
use singlora::train::{setup, TrainConfig};

mod common;
use common::run_train;

const WORDS: &[&str] = &[
    "the", "a", "movie", "film", "plot", "acting", "was", "is", "very", "really", "quite", "story",
    "good", "great", "nice", "fine", "bad", "awful", "poor", "dull", "pos", "neg", "and", "but",
];
const POSITIVE: &[&str] = &["good", "great", "nice", "fine"];
const NEGATIVE: &[&str] = &["bad", "awful", "poor", "dull"];

fn sentence(i: usize) -> (String, &'static str) {
    let fill = [
        "the", "a", "movie", "film", "plot", "acting", "was", "is", "very", "really", "quite",
        "story",
    ];
    let positive = i % 2 == 0;
    let word = if positive {
        POSITIVE[(i / 2) % 4]
    } else {
        NEGATIVE[(i / 2) % 4]
    };
    let n = 3 + (i * 7) % 5;
    let mut w: Vec<&str> = (0..n).map(|k| fill[(i * 5 + k * 3) % fill.len()]).collect();
    w.insert((i * 3) % (n + 1), word);
    (w.join(" "), if positive { "pos" } else { "neg" })
}

fn write_rows(path: &Path, rows: impl Iterator<Item = serde_json::Value>) {
    let text: String = rows.map(|r| r.to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

fn classification_data(dir: &Path, n_train: usize, n_eval: usize) -> (PathBuf, PathBuf) {
    let train = dir.join("train.jsonl");
    let eval = dir.join("eval.jsonl");
    write_rows(
        &train,
        (0..n_train).map(|i| {
            let (t, l) = sentence(i);
            serde_json::json!({"text": t, "label": l})
        }),
    );
    write_rows(
        &eval,
        (1000..1000 + n_eval).map(|i| {
            let (t, l) = sentence(i);
            serde_json::json!({"text": t, "label": l})
        }),
    );
    (train, eval)
}

fn sft_data(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("sft.jsonl");
    write_rows(
        &p,
        (0..n).map(|i| {
            let (t, l) = sentence(i);
            serde_json::json!({"prompt": t, "completion": l})
        }),
    );
    p
}

fn tiny_bert(dir: &Path, dtype: DType) -> PathBuf {
    let m = dir.join("bert");
    let s = BertShape::TINY;
    write_checkpoint(&m, &s.config(), &s.tensors(1, dtype).unwrap(), 1).unwrap();
    write_tokenizer(&m, WORDS, TokenizerStyle::Bert).unwrap();
    m
}

fn tiny_llama(dir: &Path, dtype: DType) -> PathBuf {
    let m = dir.join("llama");
    let s = LlamaShape {
        vocab: 32,
        ..LlamaShape::TINY
    };
    let mut cfg = s.config();
    cfg["pad_token_id"] = 0.into();
    cfg["bos_token_id"] = 2.into();
    cfg["eos_token_id"] = 3.into();
    write_checkpoint(&m, &cfg, &s.tensors(1, dtype).unwrap(), 1).unwrap();
    write_tokenizer(&m, WORDS, TokenizerStyle::Llama).unwrap();
    m
}

fn base_cfg(model: &Path, train: &Path, eval: Option<&Path>) -> TrainConfig {
    TrainConfig {
        model: model.to_path_buf(),
        train: train.to_path_buf(),
        eval: eval.map(Path::to_path_buf),
        batch_size: 8,
        epochs: 4,
        lr: Some(1e-2),
        ..TrainConfig::default()
    }
}

fn losses(run: &Path) -> Vec<f64> {
    singlora::metrics::read_metrics(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|l| l.get("loss").and_then(|v| v.as_f64()))
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// `--packing`: several SFT examples per row; the run learns, resumes bit-identical, counts
/// its updates from the packed rows, and is refused for classification.
#[test]
fn packed_sft_trains_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_llama(tmp.path(), DType::F32);
    let data = sft_data(tmp.path(), 40);
    let cfg = TrainConfig {
        task: Task::Sft,
        packing: true,
        batch_size: 2,
        epochs: 6,
        lr: Some(3e-2),
        save_every: Some(3),
        ..base_cfg(&model, &data, None)
    };
    cfg.validate().unwrap();
    let mut small = cfg.clone();
    small.data.max_length = 32;
    let plan = singlora::train::setup(small.clone()).unwrap().plan;
    let rows = plan.packed_rows.unwrap();
    assert!(
        rows * 3 <= plan.train_rows,
        "{rows} packed rows for {} examples",
        plan.train_rows
    );
    assert_eq!(plan.updates_per_epoch as usize, rows.div_ceil(2));
    let full = tmp.path().join("full");
    let s = run_train(small.clone(), &full, false, false).unwrap();
    let l = losses(&full);
    assert!(
        mean(&l[l.len() - 3..]) < 0.7 * l[0],
        "packed SFT loss did not fall: {l:?}"
    );
    let part = tmp.path().join("part");
    let stopped = run_train(
        TrainConfig {
            stop_after: Some(4),
            ..small.clone()
        },
        &part,
        false,
        false,
    )
    .unwrap();
    assert!(stopped.interrupted);
    let resumed = run_train(TrainConfig::default(), &part, true, false).unwrap();
    assert_eq!(resumed.steps, s.steps);
    assert_eq!(adapter_tensors(&full), adapter_tensors(&part));
    let (train_f, _) = classification_data(tmp.path(), 8, 0);
    let bert = tiny_bert(tmp.path(), DType::F32);
    let e = run_train(
        TrainConfig {
            packing: true,
            ..base_cfg(&bert, &train_f, None)
        },
        &tmp.path().join("cls"),
        false,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--packing") && e.contains("--task sft"), "{e}");
}

/// Trains `cfg` into DIR/full and checks that the loss fell (the last three updates' mean
/// below 70% of the first), that run.json records `base_dtype`, and that the same run stopped
/// after 5 updates and resumed ends with the same adapter bit for bit. Returns DIR/full.
fn learns_records_and_resumes(cfg: &TrainConfig, dir: &Path, base_dtype: &str) -> PathBuf {
    let full = dir.join("full");
    let s = run_train(cfg.clone(), &full, false, false).unwrap();
    let l = losses(&full);
    assert!(
        mean(&l[l.len() - 3..]) < 0.7 * l[0],
        "SFT loss on the {base_dtype} base did not fall: {l:?}"
    );
    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("run.json")).unwrap()).unwrap();
    assert_eq!(run_json["config"]["base_dtype"], base_dtype);
    let part = dir.join("part");
    run_train(
        TrainConfig {
            stop_after: Some(5),
            ..cfg.clone()
        },
        &part,
        false,
        false,
    )
    .unwrap();
    let resumed = run_train(TrainConfig::default(), &part, true, false).unwrap();
    assert_eq!(resumed.steps, s.steps);
    assert_eq!(adapter_tensors(&full), adapter_tensors(&part));
    full
}

/// `--base-dtype nf4`: SFT on a base kept in NF4 learns, resumes bit-identical and records the
/// setting; a BERT classifier trains on one too (its encoder's own CPU path steps aside).
#[test]
fn nf4_base_trains_and_resumes() {
    use singlora::quant::BaseDtype;
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_llama(tmp.path(), DType::F32);
    let data = sft_data(tmp.path(), 32);
    let cfg = TrainConfig {
        task: Task::Sft,
        base_dtype: BaseDtype::Nf4,
        epochs: 8,
        lr: Some(3e-2),
        save_every: Some(3),
        ..base_cfg(&model, &data, None)
    };
    let full = learns_records_and_resumes(&cfg, tmp.path(), "nf4");
    // a session for predict/eval keeps the base in NF4 when asked (all but the vocabulary
    // projection) and generates from it
    let sess =
        singlora::session::Session::load_as(&model, &full, Device::Cpu, BaseDtype::Nf4).unwrap();
    let linears = sess.model.body.linears();
    assert!(linears.iter().any(|l| l.base().is_quantized()));
    assert!(linears
        .iter()
        .all(|l| l.name() == "lm_head" || l.base().is_quantized()));
    sess.generate("the movie was", 3).unwrap();
    // the same run on the dense base ends elsewhere: the quantisation is real
    let dense = tmp.path().join("dense");
    run_train(
        TrainConfig {
            base_dtype: BaseDtype::Auto,
            ..cfg
        },
        &dense,
        false,
        false,
    )
    .unwrap();
    assert_ne!(adapter_tensors(&full), adapter_tensors(&dense));

    let bert = tiny_bert(tmp.path(), DType::F32);
    let (train_f, eval_f) = classification_data(tmp.path(), 32, 16);
    let s = run_train(
        TrainConfig {
            base_dtype: BaseDtype::Nf4,
            epochs: 6,
            ..base_cfg(&bert, &train_f, Some(&eval_f))
        },
        &tmp.path().join("bert-nf4"),
        false,
        false,
    )
    .unwrap();
    assert!(s.final_eval.unwrap().loss.is_finite());
}

#[test]
fn bert_classification_trains_and_writes_every_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path(), DType::F32);
    let (train_f, eval_f) = classification_data(tmp.path(), 64, 32);
    let run = tmp.path().join("run");
    let cfg = TrainConfig {
        epochs: 10,
        lr: Some(3e-2),
        ..base_cfg(&model, &train_f, Some(&eval_f))
    };
    let s = run_train(cfg, &run, false, false).unwrap();
    assert_eq!(s.steps, 80);
    let l = losses(&run);
    assert_eq!(l.len(), 80);
    assert!(
        mean(&l[70..]) < 0.75 * mean(&l[..5]),
        "loss did not fall: {l:?}"
    );
    let acc = s
        .final_eval
        .as_ref()
        .unwrap()
        .metrics
        .as_ref()
        .unwrap()
        .accuracy;
    eprintln!("tiny BERT eval accuracy {acc}");
    assert!(acc > 0.75, "eval accuracy {acc}");

    for f in [
        "run.json",
        "metrics.jsonl",
        "adapter_config.json",
        "adapter_model.safetensors",
        "curves.svg",
        "eval_report.txt",
        "best/adapter_config.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let lines = singlora::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let train_line = lines.iter().find(|l| l.get("loss").is_some()).unwrap();
    for k in ["step", "epoch", "loss", "lr", "u", "tokens", "tokens_per_s"] {
        assert!(train_line.get(k).is_some(), "training line lacks {k}");
    }
    let evals: Vec<_> = lines
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .collect();
    assert_eq!(
        evals.len(),
        11,
        "before training and after each of 10 epochs"
    );
    for e in &evals {
        let a = e["eval_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a) && e.get("eval_f1_macro").is_some());
    }
    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(run_json["config"]["seed"], 0);
    assert!(run_json["data"]["train"]["sha256"].as_str().unwrap().len() == 64);

    let af = AdapterFile::read(&run, &Device::Cpu).unwrap();
    assert_eq!(af.config.kind, AdapterKind::SingLora);
    assert_eq!(af.config.step, 80);
    assert_eq!(
        af.config.ramp_steps, 1,
        "1% of 80 updates, rounded, at least 1"
    );
    assert_eq!(
        af.config.labels.as_deref(),
        Some(&["neg".to_string(), "pos".to_string()][..])
    );
    assert_eq!(af.config.modules_to_save, vec!["classifier".to_string()]);
    assert_eq!(af.config.pooling.as_deref(), Some("cls"));
    assert_eq!(
        af.layers.len(),
        8,
        "query, key, value, attention.output.dense in 2 layers"
    );
    assert!(af.heads.contains_key("classifier.weight") && af.heads.contains_key("classifier.bias"));
    // the adapter reloads onto the model and evaluates to the same numbers
    let sess = singlora::session::Session::load(&model, &run, Device::Cpu).unwrap();
    let (again, report) = sess
        .eval_file(&eval_f, &DataSettings::default(), 16)
        .unwrap();
    assert!(report.is_empty());
    let fin = s.final_eval.unwrap();
    assert!(
        (again.loss - fin.loss).abs() < 1e-5,
        "{} vs {}",
        again.loss,
        fin.loss
    );
    let preds = sess
        .classify(
            &[
                "the movie was good".to_string(),
                "the movie was awful".to_string(),
            ],
            128,
            Truncation::Right,
        )
        .unwrap();
    assert_eq!(preds[0].probabilities.len(), 2);
}

/// A base model without a chat template trains on conversations with `--chat-template FILE`;
/// the template is kept with the adapter and used when it is loaded, and a model directory's
/// `chat_template.jinja` (transformers 5's layout) is the model's own template.
#[test]
fn a_chat_template_file_serves_a_model_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_llama(tmp.path(), DType::F32);
    let data = tmp.path().join("chat.jsonl");
    write_rows(
        &data,
        (0..16).map(|i| {
            let (t, l) = sentence(i);
            serde_json::json!({"messages": [
                {"role": "user", "content": t},
                {"role": "assistant", "content": l},
            ]})
        }),
    );
    // user turns start with "the", the assistant's with "a" and end with "and"
    let template = "{% for m in messages %}{% if m['role'] == 'user' %}the {{ m['content'] }} \
                    {% else %}a {{ m['content'] }} and {% endif %}{% endfor %}\
                    {% if add_generation_prompt %}a {% endif %}";
    let file = tmp.path().join("template.jinja");
    std::fs::write(&file, template).unwrap();
    let cfg = TrainConfig {
        task: Task::Sft,
        epochs: 2,
        ..base_cfg(&model, &data, None)
    };
    let err = run_train(cfg.clone(), &tmp.path().join("none"), false, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--chat-template FILE"), "{err}");
    let mut cfg = cfg;
    cfg.data.chat_template_file = Some(file.clone());
    let run = tmp.path().join("run");
    run_train(cfg, &run, false, false).unwrap();
    let l = losses(&run);
    assert!(l.iter().all(|x| x.is_finite()) && !l.is_empty());
    assert_eq!(
        std::fs::read_to_string(run.join("chat_template.jinja")).unwrap(),
        template
    );
    let af = AdapterFile::read(&run, &Device::Cpu).unwrap();
    assert_eq!(af.chat_template.as_deref(), Some(template));
    let mut sess = singlora::session::Session::load(&model, &run, Device::Cpu).unwrap();
    let chat = sess.chat.as_ref().expect("the adapter's own template");
    assert_eq!(chat.user_prompt("good").unwrap(), "the good a ");
    // `predict --chat-template` / `eval --chat-template` replace it
    let other = tmp.path().join("other.jinja");
    std::fs::write(&other, "{{ messages[0]['content'] }} was").unwrap();
    sess.set_chat_template_file(&other).unwrap();
    assert_eq!(
        sess.chat.as_ref().unwrap().user_prompt("good").unwrap(),
        "good was"
    );
    // an empty template file is refused by name
    let empty = tmp.path().join("empty.jinja");
    std::fs::write(&empty, " \n").unwrap();
    let err = singlora::data::read_chat_template_file(&empty)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty.jinja") && err.contains("empty"),
        "{err}"
    );
    // a merged model carries the template where transformers and singlora find it
    let merged = tmp.path().join("merged");
    singlora::merge::merge_checkpoint(&model, &run, &merged, &Default::default()).unwrap();
    let tc = singlora::checkpoint::read_json(&merged.join("tokenizer_config.json")).unwrap();
    assert_eq!(tc["chat_template"], template);
    let pre = singlora::model::Pretrained::load(&merged, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(pre.chat_template.as_deref(), Some(template));
    // transformers 5 keeps the template in chat_template.jinja beside the tokenizer
    assert!(
        singlora::model::Pretrained::load(&model, DType::F32, &Device::Cpu)
            .unwrap()
            .chat_template
            .is_none()
    );
    std::fs::write(model.join("chat_template.jinja"), template).unwrap();
    let pre = singlora::model::Pretrained::load(&model, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(pre.chat_template.as_deref(), Some(template));
}

#[test]
fn llama_sft_and_classification_train() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_llama(tmp.path(), DType::F32);
    let data = sft_data(tmp.path(), 48);
    let run = tmp.path().join("sft");
    let cfg = TrainConfig {
        task: Task::Sft,
        eval_fraction: Some(0.25),
        epochs: 10,
        lr: Some(3e-2),
        ..base_cfg(&model, &data, None)
    };
    let s = run_train(cfg, &run, false, false).unwrap();
    let l = losses(&run);
    assert!(
        mean(&l[l.len() - 3..]) < 0.7 * l[0],
        "SFT loss did not fall: {l:?}"
    );
    let ppl = s.final_eval.unwrap().perplexity.unwrap();
    assert!(ppl.is_finite() && ppl < 4.0, "perplexity {ppl}");
    let af = AdapterFile::read(&run, &Device::Cpu).unwrap();
    assert_eq!(af.layers.len(), 14, "all seven projections by default");
    assert!(af.heads.is_empty() && af.config.labels.is_none());
    assert_eq!(af.config.task_type.as_deref(), Some("CAUSAL_LM"));
    let sess = singlora::session::Session::load(&model, &run, Device::Cpu).unwrap();
    let out = sess.generate("the movie was good", 3).unwrap();
    assert!(out.len() < 40, "{out}");
    // sampling: the same seed gives the same text, streamed pieces add up to it, stop strings
    // cut it before them
    use singlora::generate::{GenerateOptions, StopReason};
    let opts = GenerateOptions {
        max_new_tokens: 6,
        temperature: 1.5,
        top_k: Some(20),
        top_p: Some(0.95),
        seed: 11,
        stop: vec![],
    };
    let mut streamed = String::new();
    let a = sess
        .generate_with(None, "the movie was", &opts, &mut |p| streamed.push_str(p))
        .unwrap();
    let b = sess
        .generate_with(None, "the movie was", &opts, &mut |_| {})
        .unwrap();
    assert_eq!(a.text, b.text);
    assert_eq!(streamed, a.text);
    assert!(a.tokens <= 6);
    if a.stop_reason == StopReason::Length {
        assert_eq!(a.tokens, 6);
    }
    if let Some(cut) = a.text.char_indices().nth(2).map(|(i, _)| i) {
        let stop = a.text[cut..].to_string();
        let c = sess
            .generate_with(
                None,
                "the movie was",
                &GenerateOptions {
                    stop: vec![stop],
                    ..opts.clone()
                },
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(c.text, a.text[..cut], "cut before the stop string");
        assert_eq!(c.stop_reason, StopReason::StopString);
    }

    let (train_f, eval_f) = classification_data(tmp.path(), 64, 16);
    let run = tmp.path().join("cls");
    let cfg = TrainConfig {
        method: Method::Dora,
        ..base_cfg(&model, &train_f, Some(&eval_f))
    };
    let s = run_train(cfg, &run, false, false).unwrap();
    let l = losses(&run);
    assert!(
        mean(&l[l.len() - 4..]) < 0.8 * mean(&l[..4]),
        "classification loss did not fall: {l:?}"
    );
    let af = AdapterFile::read(&run, &Device::Cpu).unwrap();
    assert_eq!(af.config.kind, AdapterKind::Dora);
    assert_eq!(af.config.pooling.as_deref(), Some("last"));
    assert!(af.heads.contains_key("score.weight") && !af.heads.contains_key("score.bias"));
    assert!(s.final_eval.is_some());
}

fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let f = TensorFile::open(&dir.join("adapter_model.safetensors")).unwrap();
    f.names()
        .map(|n| {
            (
                n.to_string(),
                f.load(n, &Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

/// A damaged newest checkpoint is passed over: the run resumes from the one before (and says
/// so) and still ends bit-identical to an uninterrupted run.
#[test]
fn a_damaged_checkpoint_falls_back_to_the_previous_one() {
    struct Skips(std::sync::Mutex<Vec<std::path::PathBuf>>);
    impl singlora::train::Observer for Skips {
        fn skipped_checkpoint(&self, dir: &Path, _why: &str) {
            self.0.lock().unwrap().push(dir.to_path_buf());
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path(), DType::F32);
    let (train_f, eval_f) = classification_data(tmp.path(), 40, 8);
    let cfg = TrainConfig {
        epochs: 2,
        save_every: Some(1),
        ..base_cfg(&model, &train_f, Some(&eval_f))
    };
    let full = tmp.path().join("full");
    run_train(cfg.clone(), &full, false, false).unwrap();
    let part = tmp.path().join("part");
    let stop = TrainConfig {
        stop_after: Some(4),
        ..cfg
    };
    assert!(run_train(stop, &part, false, false).unwrap().interrupted);
    let newest = part.join("checkpoints").join("step-4");
    let optim = newest.join("optimizer.safetensors");
    let bytes = std::fs::read(&optim).unwrap();
    std::fs::write(&optim, &bytes[..bytes.len() / 2]).unwrap();
    let skips = std::sync::Arc::new(Skips(Default::default()));
    let resumed = singlora::train::resume(&part, &Default::default(), skips.clone()).unwrap();
    assert_eq!(*skips.0.lock().unwrap(), vec![newest]);
    assert!(!resumed.interrupted);
    assert_eq!(adapter_tensors(&full), adapter_tensors(&part));
}

/// A run directory written before the settings were typed (its run.json holds the method as
/// the user spelled it, and lacks the keys added since) resumes and ends bit-identical to an
/// uninterrupted run.
#[test]
fn an_old_run_directory_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path(), DType::F32);
    let (train_f, eval_f) = classification_data(tmp.path(), 40, 8);
    let cfg = TrainConfig {
        method: Method::LoraPlus,
        epochs: 2,
        save_every: Some(2),
        ..base_cfg(&model, &train_f, Some(&eval_f))
    };
    let full = tmp.path().join("full");
    run_train(cfg.clone(), &full, false, false).unwrap();
    let part = tmp.path().join("part");
    let stop = TrainConfig {
        stop_after: Some(3),
        ..cfg
    };
    assert!(run_train(stop, &part, false, false).unwrap().interrupted);
    let p = part.join("run.json");
    let mut run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let c = run["config"].as_object_mut().unwrap();
    for later in ["devices", "bucket_values", "recompute", "head_only"] {
        assert!(c.remove(later).is_some(), "{later}");
    }
    c.insert("method".into(), "lora_plus".into());
    c.insert("device".into(), "cpu".into());
    std::fs::write(&p, serde_json::to_string_pretty(&run).unwrap()).unwrap();
    let resumed = run_train(TrainConfig::default(), &part, true, false).unwrap();
    assert!(!resumed.interrupted);
    assert_eq!(adapter_tensors(&full), adapter_tensors(&part));
}

#[test]
fn resume_ends_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path(), DType::F32);
    let (train_f, eval_f) = classification_data(tmp.path(), 40, 8);
    for (method, accum) in [("singlora", 1), ("lora-plus", 2), ("dora", 1)] {
        let cfg = TrainConfig {
            method: method.parse().unwrap(),
            grad_accum: accum,
            epochs: 3,
            save_every: Some(2),
            ramp_steps: Some(7),
            weight_decay: 0.01,
            ..base_cfg(&model, &train_f, Some(&eval_f))
        };
        let full = tmp.path().join(format!("full-{method}"));
        let s_full = run_train(cfg.clone(), &full, false, false).unwrap();
        let part = tmp.path().join(format!("part-{method}"));
        // stop mid-epoch (5 batches per epoch at batch 8) as a Ctrl-C would
        let stopped = run_train(
            TrainConfig {
                stop_after: Some(4),
                ..cfg.clone()
            },
            &part,
            false,
            false,
        )
        .unwrap();
        assert!(stopped.interrupted && stopped.steps == 4);
        assert!(!part.join("adapter_model.safetensors").exists());
        let resumed = run_train(
            TrainConfig {
                ..TrainConfig::default()
            },
            &part,
            true,
            false,
        )
        .unwrap();
        assert_eq!(resumed.steps, s_full.steps);
        assert_eq!(
            adapter_tensors(&full),
            adapter_tensors(&part),
            "{method}: resumed adapter differs"
        );
        let step = |d: &Path| AdapterFile::read(d, &Device::Cpu).unwrap().config.step;
        assert_eq!(step(&full), step(&part));
        // the metrics log continues without duplicated steps
        let steps: Vec<u64> = singlora::metrics::read_metrics(&part.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .filter(|l| l.get("loss").is_some())
            .map(|l| l["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, (1..=s_full.steps).collect::<Vec<_>>());
        assert!(
            singlora::train::state::list(&part).unwrap().len() <= 3,
            "old checkpoints pruned"
        );
    }
}

#[test]
fn existing_run_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path(), DType::F32);
    let (train_f, _) = classification_data(tmp.path(), 16, 0);
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("keep"), "x").unwrap();
    let err = run_train(base_cfg(&model, &train_f, None), &run, false, false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("already exists") && err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert!(run.join("keep").exists());
    let err = run_train(
        base_cfg(&model, &train_f, None),
        &tmp.path().join("none"),
        true,
        false,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("run.json"), "{err}");
}

#[test]
fn every_trainable_tensor_gets_a_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    let bert = tiny_bert(tmp.path(), DType::F32);
    let llama = tiny_llama(tmp.path(), DType::F32);
    let (train_f, _) = classification_data(tmp.path(), 16, 0);
    let sft = sft_data(tmp.path(), 16);
    for (model, data, task) in [
        (&bert, &train_f, "classify"),
        (&llama, &train_f, "classify"),
        (&llama, &sft, "sft"),
    ] {
        for method in Method::ALL {
            let cfg = TrainConfig {
                method,
                task: task.parse().unwrap(),
                targets: Some("all-linear".into()),
                ..base_cfg(model, data, None)
            };
            let s = setup(cfg).unwrap();
            s.model.clock.set_training(true);
            let idx: Vec<usize> = (0..8).collect();
            let batch = collate(&s.data.train_items, &idx, s.data.pad_id, &Device::Cpu).unwrap();
            let grads = s.model.loss(&batch).unwrap().backward().unwrap();
            let params = s.model.params();
            assert!(params.len() > 10);
            for p in &params {
                let g = grads
                    .get(p.var.as_tensor())
                    .unwrap_or_else(|| panic!("{method} {task}: no gradient for a {:?}", p.role));
                let n = g
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                // LoRA's A has a zero gradient at init (B = 0); B, SingLoRA's A and heads must not
                if !(p.role == singlora::adapter::ParamRole::A
                    && method.kind() != AdapterKind::SingLora)
                {
                    assert!(n > 0.0, "{method} {task}: zero gradient for a {:?}", p.role);
                }
            }
        }
    }
}

/// Whole-model gradients in f64 against central differences, through every op of both families.
#[test]
fn model_gradients_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let bert = tiny_bert(tmp.path(), DType::F32);
    let llama = tiny_llama(tmp.path(), DType::F32);
    let (train_f, _) = classification_data(tmp.path(), 6, 0);
    let sft = sft_data(tmp.path(), 4);
    for (model_dir, data, task) in [
        (&bert, &train_f, Task::Classify),
        (&llama, &sft, Task::Sft),
        (&llama, &train_f, Task::Classify),
    ] {
        // DoRA's norm is a constant in backprop by design, so it is checked at the layer level only
        for kind in [AdapterKind::SingLora, AdapterKind::Lora] {
            let pre = Pretrained::load(model_dir, DType::F64, &Device::Cpu).unwrap();
            let ds = load_dataset(data, task, &Columns::default(), false).unwrap();
            let labels = (task == Task::Classify).then(|| LabelSet::from_dataset(&ds).unwrap());
            let items = encode(&pre.tokenizer, &ds, labels.as_ref(), 32, Some(3)).unwrap();
            let family = pre.body.family();
            let pooling = pre.default_pooling();
            let mut tm = TaskModel::new(
                pre.body,
                task,
                labels.as_ref().map(|l| l.names.len()),
                pooling,
                0,
                &Device::Cpu,
            )
            .unwrap();
            if let Some(h) = &tm.head {
                let n = h.weight.dims()[0];
                let hidden = h.weight.dims()[1];
                tm.head = Some(
                    ClassifierHead::init(
                        family.head_name(),
                        n,
                        hidden,
                        h.bias.is_some(),
                        3,
                        DType::F64,
                        &Device::Cpu,
                    )
                    .unwrap(),
                );
            }
            let mut spec = AdapterSpec::new(kind, 2, 4.0);
            spec.dtype = DType::F64;
            let clock = RampClock::new(RampSchedule::new(4), 1);
            clock.set_training(true);
            tm.inject(
                &spec,
                &TargetSpec::parse("all-linear", None).unwrap(),
                clock,
            )
            .unwrap();
            // make LoRA's B non-zero so every path carries signal
            for p in tm.params() {
                let noise = Tensor::randn(0f64, 0.1, p.var.dims(), &Device::Cpu).unwrap();
                p.var.set(&(p.var.as_tensor() + noise).unwrap()).unwrap();
            }
            let idx: Vec<usize> = (0..items.len()).collect();
            let batch = collate(&items, &idx, 0, &Device::Cpu).unwrap();
            let loss_of = |tm: &TaskModel| tm.loss(&batch).unwrap().to_scalar::<f64>().unwrap();
            let params = tm.params();
            let grads = tm.loss(&batch).unwrap().backward().unwrap();
            // check a spread of entries in the first, a middle and the last tensor
            for pi in [0, params.len() / 2, params.len() - 1] {
                let var: &Var = &params[pi].var;
                let analytic = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                let orig = var.as_tensor().copy().unwrap();
                let flat = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                for j in (0..flat.len()).step_by((flat.len() / 5).max(1)) {
                    let at = |d: f64| {
                        let mut f = flat.clone();
                        f[j] += d;
                        var.set(&Tensor::from_vec(f, orig.dims(), &Device::Cpu).unwrap())
                            .unwrap();
                        let l = loss_of(&tm);
                        var.set(&orig).unwrap();
                        l
                    };
                    let eps = 1e-5;
                    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                    let err = (numeric - analytic[j]).abs() / (1e-3 + numeric.abs());
                    assert!(
                        err < 1e-4,
                        "{task:?} {kind:?} param {pi} ({:?}) elem {j}: autograd {} vs {numeric}",
                        params[pi].role,
                        analytic[j]
                    );
                }
            }
        }
    }
}

/// Data parallelism over CPU threads (the same trainer path as NCCL on GPUs, with an in-process
/// all-reduce): three ranks, each on its shard of every global batch, end where one process
/// ends with the same global batch. 37 rows at batch 4 leave a last batch of one row, so two
/// ranks have an empty shard there. BERT classification (rows weigh equally, the head's
/// gradients are summed too) and LLaMA SFT (shards weigh by completion tokens).
#[test]
fn data_parallel_ranks_match_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let bert = tiny_bert(tmp.path(), DType::F32);
    let llama = tiny_llama(tmp.path(), DType::F32);
    let (cls_train, cls_eval) = classification_data(tmp.path(), 37, 8);
    let sft = sft_data(tmp.path(), 37);
    let cases = [
        (
            "bert-singlora",
            &bert,
            &cls_train,
            Some(&cls_eval),
            "classify",
            "singlora",
            1,
        ),
        (
            "bert-lora-accum",
            &bert,
            &cls_train,
            Some(&cls_eval),
            "classify",
            "lora",
            2,
        ),
        ("llama-sft", &llama, &sft, None, "sft", "singlora", 1),
        ("llama-sft-packed", &llama, &sft, None, "sft", "lora", 1),
    ];
    for (name, model, data, eval, task, method, accum) in cases {
        let mut cfg = TrainConfig {
            task: task.parse().unwrap(),
            method: method.parse().unwrap(),
            batch_size: 4,
            grad_accum: accum,
            epochs: 2,
            ramp_steps: Some(3),
            weight_decay: 0.01,
            ..base_cfg(model, data, eval.map(|p| p.as_path()))
        };
        if name.ends_with("packed") {
            // rows of about three examples: 4 per batch over 3 ranks
            cfg.packing = true;
            cfg.data.max_length = 24;
        }
        let one = tmp.path().join(format!("{name}-one"));
        let s1 = run_train(cfg.clone(), &one, false, false).unwrap();
        let three = tmp.path().join(format!("{name}-three"));
        let devices = Some(vec![singlora::device::DeviceSpec::Cpu; 3]);
        let s3 = run_train(TrainConfig { devices, ..cfg }, &three, false, false).unwrap();
        assert_eq!(s1.steps, s3.steps, "{name}");
        let (a1, a3) = (adapter_tensors(&one), adapter_tensors(&three));
        assert_eq!(a1.len(), a3.len());
        for ((n1, v1), (n3, v3)) in a1.iter().zip(&a3) {
            assert_eq!(n1, n3);
            let scale = v1.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = v1
                .iter()
                .zip(v3)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 2e-4 * scale.max(1e-3),
                "{name}: {n1} differs by {diff} (max {scale})"
            );
        }
        // one metrics log (rank 0's), the same losses
        let (l1, l3) = (losses(&one), losses(&three));
        assert_eq!(l1.len(), l3.len(), "{name}: one line per update");
        for (x, y) in l1.iter().zip(&l3) {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "{name}: loss {x} vs {y}"
            );
        }
        let toks = |run: &Path| -> f64 {
            singlora::metrics::read_metrics(&run.join("metrics.jsonl"))
                .unwrap()
                .iter()
                .filter(|l| l.get("loss").is_some())
                .count() as f64
        };
        assert_eq!(toks(&one), toks(&three));
    }
}

#[test]
fn bad_device_lists_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path(), DType::F32);
    let (train_f, _) = classification_data(tmp.path(), 12, 0);
    let run = |devices: &[&str], batch: usize| {
        let cfg = TrainConfig {
            devices: Some(devices.iter().map(|d| d.parse().unwrap()).collect()),
            batch_size: batch,
            ..base_cfg(&model, &train_f, None)
        };
        let out = tmp.path().join("run");
        let e = run_train(cfg, &out, false, true).unwrap_err().to_string();
        assert!(!out.exists(), "nothing written for {devices:?}");
        e
    };
    let e = run(&["cpu", "cuda:0"], 8);
    assert!(
        e.contains("all CUDA devices") && e.contains("cpu,cuda:0"),
        "{e}"
    );
    let e = run(&["cpu", "cpu", "cpu"], 2);
    assert!(
        e.contains("--batch-size 2") && e.contains("3 devices"),
        "{e}"
    );
    let e = run(&["cuda:1", "cuda:1"], 4);
    assert!(e.contains("cuda:1 twice"), "{e}");
}

/// A data-parallel run stopped midway (as by Ctrl-C, which the ranks agree on through the
/// all-reduce) and resumed with `--resume` ends bit-identical to an uninterrupted one: the
/// ranks reload the same checkpoint, and the CPU group sums in rank order.
#[test]
fn data_parallel_resume_ends_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path(), DType::F32);
    let (train_f, eval_f) = classification_data(tmp.path(), 30, 6);
    let cfg = TrainConfig {
        batch_size: 6,
        epochs: 2,
        save_every: Some(2),
        devices: Some(vec![singlora::device::DeviceSpec::Cpu; 2]),
        ..base_cfg(&model, &train_f, Some(&eval_f))
    };
    let full = tmp.path().join("full");
    let s_full = run_train(cfg.clone(), &full, false, false).unwrap();
    let part = tmp.path().join("part");
    let stopped = run_train(
        TrainConfig {
            stop_after: Some(3),
            ..cfg
        },
        &part,
        false,
        false,
    )
    .unwrap();
    assert!(stopped.interrupted && stopped.steps == 3);
    let resumed = run_train(
        TrainConfig {
            ..TrainConfig::default()
        },
        &part,
        true,
        false,
    )
    .unwrap();
    assert_eq!(resumed.steps, s_full.steps);
    assert_eq!(adapter_tensors(&full), adapter_tensors(&part));
}

#[test]
fn evaluation_predictions_follow_the_file_order() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path(), DType::F32);
    let (train_f, eval_f) = classification_data(tmp.path(), 32, 24);
    let run = tmp.path().join("run");
    let cfg = TrainConfig {
        epochs: 2,
        lr: Some(3e-2),
        ..base_cfg(&model, &train_f, Some(&eval_f))
    };
    run_train(cfg, &run, false, false).unwrap();
    let session = singlora::session::Session::load(&model, &run, Device::Cpu).unwrap();
    let settings = singlora::data::DataSettings {
        max_length: 64,
        ..Default::default()
    };
    let (res, _) = session.eval_file(&eval_f, &settings, 5).unwrap();
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&eval_f)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(res.predictions.len(), rows.len());
    let names = &session.labels.as_ref().unwrap().names;
    let mut correct = 0;
    for (row, &p) in rows.iter().zip(&res.predictions) {
        // the same row scored alone
        let alone = session
            .classify(
                &[row["text"].as_str().unwrap().to_string()],
                64,
                singlora::data::Truncation::Right,
            )
            .unwrap();
        assert_eq!(names[p], alone[0].label, "{row}");
        correct += (names[p] == row["label"].as_str().unwrap()) as usize;
    }
    let acc = res.metrics.unwrap().accuracy;
    assert!((acc - correct as f64 / rows.len() as f64).abs() < 1e-12);
}

/// A library run reports, through its observer and before training, the prompt/completion
/// rows cut at `max_length` (with `--truncation left`, keeping each completion and its eos)
/// and a ramp longer than the run; run.json records the count.
#[test]
fn sft_rows_cut_at_max_length_are_reported_to_the_observer() {
    #[derive(Default)]
    struct Notes {
        rows: std::sync::Mutex<Vec<singlora::data::RowReport>>,
        warnings: std::sync::Mutex<Vec<String>>,
    }
    impl singlora::train::Observer for Notes {
        fn rows_report(&self, report: &singlora::data::RowReport) {
            self.rows.lock().unwrap().push(report.clone());
        }
        fn warning(&self, text: &str) {
            self.warnings.lock().unwrap().push(text.to_string());
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_llama(tmp.path(), DType::F32);
    let data = tmp.path().join("sft.jsonl");
    let long = "the movie was very good and the plot was quite nice";
    write_rows(
        &data,
        [("the movie", "good"), (long, "great"), ("a film", "bad")]
            .into_iter()
            .map(|(p, c)| serde_json::json!({"prompt": p, "completion": c})),
    );
    let cfg = TrainConfig {
        task: Task::Sft,
        max_steps: Some(2),
        ramp_steps: Some(10),
        data: DataSettings {
            max_length: 6,
            truncation: Truncation::Left,
            ..DataSettings::default()
        },
        ..base_cfg(&model, &data, None)
    };
    let s = setup(cfg.clone()).unwrap();
    // <s>, the end of the prompt, then `great` and eos whole
    let cut = &s.data.train_items[1];
    assert_eq!(cut.ids.len(), 6);
    assert_eq!(&cut.target_mask[4..], &[1, 1]);
    assert_eq!(cut.ids[5], 3);
    let notes = std::sync::Arc::new(Notes::default());
    let run = tmp.path().join("run");
    singlora::train::train(cfg, &run, false, notes.clone()).unwrap();
    let rows = notes.rows.lock().unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].skipped.is_empty() && rows[0].dropped.is_empty());
    let lines: Vec<String> = rows[0].truncated.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        lines,
        vec![format!(
            "{}:2: longer than 6 tokens: the start of the prompt cut",
            data.display()
        )]
    );
    let warnings = notes.warnings.lock().unwrap();
    assert!(
        warnings.len() == 1
            && warnings[0].contains("ramp of 10 updates is longer than the run's 2"),
        "{warnings:?}"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(saved["plan"]["truncated_rows"], 1);
    assert_eq!(saved["config"]["truncation"], "left");
}

/// `--base-dtype same`: SFT on a Q8_0 GGUF file with its weights kept as stored learns, resumes
/// bit-identical, records the setting, ends where the run on the same file dequantised at load
/// ends (the same weights), and a session generates from it; a Hugging Face directory is refused.
#[test]
fn same_base_trains_on_a_gguf_files_own_types() {
    use singlora::gguf::model::GgufQuant;
    use singlora::quant::BaseDtype;
    let tmp = tempfile::tempdir().unwrap();
    // rows of 32 and 64 values: whole Q8_0 blocks
    let hf = tmp.path().join("llama32");
    let s = LlamaShape {
        hidden: 32,
        intermediate: 64,
        vocab: 272,
        ..LlamaShape::TINY
    };
    let mut c = s.config();
    // <|endoftext|>, <|im_start|>, <|im_end|> of the byte-level vocabulary
    c["pad_token_id"] = 262.into();
    c["bos_token_id"] = 263.into();
    c["eos_token_id"] = 264.into();
    write_checkpoint(&hf, &c, &s.tensors(1, DType::F32).unwrap(), 1).unwrap();
    singlora::synthetic::write_bpe_tokenizer(&hf).unwrap();
    let gguf = tmp.path().join("llama-q8.gguf");
    singlora::merge::gguf::convert_to_gguf(&hf, &gguf, false, GgufQuant::Q8_0).unwrap();
    let data = sft_data(tmp.path(), 32);
    let cfg = TrainConfig {
        task: Task::Sft,
        base_dtype: BaseDtype::Same,
        epochs: 8,
        lr: Some(3e-2),
        save_every: Some(3),
        ..base_cfg(&gguf, &data, None)
    };
    let full = learns_records_and_resumes(&cfg, tmp.path(), "same");
    // the same file dequantised at load holds the same weights: the same run, up to the order
    // of floating-point sums
    let dense = tmp.path().join("dense");
    run_train(
        TrainConfig {
            base_dtype: BaseDtype::Auto,
            ..cfg.clone()
        },
        &dense,
        false,
        false,
    )
    .unwrap();
    for ((n, a), (_, b)) in adapter_tensors(&full).iter().zip(adapter_tensors(&dense)) {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-3 * scale, "{n}: {diff:e} of {scale:e}");
    }
    let sess =
        singlora::session::Session::load_as(&gguf, &full, Device::Cpu, BaseDtype::Same).unwrap();
    let linears = sess.model.body.linears();
    assert!(linears.iter().all(|l| l.base().is_quantized()));
    sess.generate("the movie was", 3).unwrap();

    let e = run_train(
        TrainConfig {
            model: hf.clone(),
            ..cfg
        },
        &tmp.path().join("hf"),
        false,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--base-dtype same") && e.contains("llama32"),
        "{e}"
    );
}
