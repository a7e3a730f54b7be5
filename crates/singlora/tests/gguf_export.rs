//! GGUF export: what the writer writes, our reader reads back (every key, every tensor; exact
//! for f32/f16/bf16, q8_0 within its rounding); a model merged into GGUF computes the logits of
//! the model merged into safetensors; the adapter GGUF holds ΔW with llama.cpp's Q/K order; the
//! keys we write are the `gguf` package's (tests/fixtures/gguf_keys.txt, made by
//! scripts/gguf_keys.py); and the refusals (overlapping output, non-finite values, foreign files).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use singlora::adapter::file::AdapterFile;
use singlora::adapter::target::TargetSpec;
use singlora::adapter::{AdapterKind, AdapterSpec};
use singlora::checkpoint::Checkpoint;
use singlora::data::{collate, Encoded};
use singlora::gguf::model::{gguf_name, GgufQuant};
use singlora::gguf::write::{write_gguf, TensorInfo, WRITER_KEY};
use singlora::gguf::{load_gguf, permute_qk, unpermute_qk};
use singlora::merge::{merge_checkpoint, MergeOptions};
use singlora::model::{Body, FastPath, Pretrained};
use singlora::synthetic::{
    random_adapter, write_bpe_tokenizer, write_checkpoint, LlamaShape, CHATML_TEMPLATE,
};

mod common;
use common::{max_abs, max_abs_diff};

/// hidden 64 (rows of two Q8_0 blocks), 4 heads of 16 / 2 KV heads, ff 96, a vocabulary padded
/// past the tokenizer's 265 tokens.
const SHAPE: LlamaShape = LlamaShape {
    hidden: 64,
    intermediate: 96,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    vocab: 272,
};

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    adapter: PathBuf,
}

/// A Hugging Face base of `shape` (f32, BPE tokenizer, chat template) and a SingLoRA adapter
/// (mid-ramp) on its seven projections.
fn setup(shape: LlamaShape, kind: AdapterKind) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let base = root.join("base");
    let mut config = shape.config();
    config["rope_theta"] = serde_json::json!(50000.0);
    write_checkpoint(&base, &config, &shape.tensors(3, DType::F32).unwrap(), 1).unwrap();
    assert_eq!(write_bpe_tokenizer(&base).unwrap(), 265);
    let targets = TargetSpec::parse(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        None,
    )
    .unwrap();
    let layers: Vec<_> = shape
        .linears()
        .into_iter()
        .filter(|(n, _)| n != "lm_head")
        .collect();
    let mut spec = AdapterSpec::new(kind, 4, 8.0);
    spec.seed = 7;
    let af = random_adapter(&spec, &layers, &targets, 3, 10).unwrap();
    let adapter = root.join("adapter");
    af.write(&adapter, true).unwrap();
    Setup {
        _dir: dir,
        root,
        base,
        adapter,
    }
}

fn gguf_opts(quant: GgufQuant) -> MergeOptions {
    MergeOptions {
        gguf: Some(quant),
        ..Default::default()
    }
}

fn read_content(path: &Path) -> (Content, BufReader<File>) {
    let mut r = BufReader::new(File::open(path).unwrap());
    let c = Content::read(&mut r).unwrap();
    (c, r)
}

/// The f32 safetensors merge, which every GGUF merge is compared with.
fn merged_f32(s: &Setup) -> BTreeMap<String, Tensor> {
    let out = s.root.join("merged-f32");
    if !out.exists() {
        let opts = MergeOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        };
        merge_checkpoint(&s.base, &s.adapter, &out, &opts).unwrap();
    }
    let ckpt = Checkpoint::open(&out).unwrap();
    ckpt.names()
        .map(|n| (n.to_string(), ckpt.load(n, &Device::Cpu).unwrap()))
        .collect()
}

#[test]
fn writer_round_trips_every_value_type_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.gguf");
    let strings =
        |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
    let md: Vec<(String, Value)> = vec![
        ("general.alignment".into(), Value::U32(64)),
        ("t.u8".into(), Value::U8(200)),
        ("t.i8".into(), Value::I8(-100)),
        ("t.u16".into(), Value::U16(60000)),
        ("t.i16".into(), Value::I16(-30000)),
        ("t.u32".into(), Value::U32(4_000_000_000)),
        ("t.i32".into(), Value::I32(-2_000_000_000)),
        ("t.u64".into(), Value::U64(1 << 40)),
        ("t.i64".into(), Value::I64(-(1 << 40))),
        ("t.f32".into(), Value::F32(1e-5)),
        ("t.f64".into(), Value::F64(-2.5e300)),
        ("t.bool".into(), Value::Bool(true)),
        ("t.string".into(), Value::String("ünïcode {{ x }}\n".into())),
        ("t.strings".into(), strings(&["Ġa", "", "b c"])),
        (
            "t.ints".into(),
            Value::Array(vec![Value::I32(-1), Value::I32(3)]),
        ),
        (
            "t.floats".into(),
            Value::Array(vec![Value::F32(0.5), Value::F32(-1000.0)]),
        ),
        ("t.empty".into(), Value::Array(vec![])),
    ];
    let dev = Device::Cpu;
    let src = Tensor::randn(0f32, 1., (8, 64), &dev).unwrap();
    let tensors: Vec<(TensorInfo, QTensor)> = [
        ("a.f32", vec![8, 64], GgmlDType::F32),
        ("b.f16", vec![8, 64], GgmlDType::F16),
        ("c.bf16", vec![8, 64], GgmlDType::BF16),
        ("d.q8_0", vec![8, 64], GgmlDType::Q8_0),
        ("e.q4_0", vec![8, 64], GgmlDType::Q4_0),
        ("f.vec", vec![64], GgmlDType::F32),
    ]
    .into_iter()
    .map(|(n, shape, dt)| {
        let len: usize = shape.iter().product();
        let v = src.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let t = Tensor::from_vec(v[..len].to_vec(), shape.as_slice(), &dev).unwrap();
        let info = TensorInfo {
            name: n.into(),
            shape,
            dtype: dt,
        };
        (info, QTensor::quantize(&t, dt).unwrap())
    })
    .collect();
    let infos: Vec<TensorInfo> = tensors.iter().map(|(i, _)| i.clone()).collect();
    let mut f = File::create(&path).unwrap();
    write_gguf(&mut f, &path, &md, &infos, |i, _| {
        Ok(tensors[i].1.data().unwrap().into_owned())
    })
    .unwrap();
    drop(f);

    let mut head = [0u8; 8];
    File::open(&path).unwrap().read_exact(&mut head).unwrap();
    assert_eq!(&head[..4], b"GGUF");
    assert_eq!(u32::from_le_bytes(head[4..8].try_into().unwrap()), 3);

    let (c, mut r) = read_content(&path);
    assert_eq!(c.metadata.len(), md.len());
    for (k, v) in &md {
        assert_eq!(format!("{:?}", c.metadata[k]), format!("{v:?}"), "{k}");
    }
    assert_eq!(c.tensor_data_offset % 64, 0);
    for (info, q) in &tensors {
        let ti = &c.tensor_infos[&info.name];
        assert_eq!(ti.offset % 64, 0, "{}", info.name);
        assert_eq!(ti.ggml_dtype, info.dtype);
        let back = c.tensor(&mut r, &info.name, &dev).unwrap();
        assert_eq!(back.shape().dims(), info.shape.as_slice());
        assert_eq!(back.data().unwrap(), q.data().unwrap(), "{}", info.name);
    }
    // the data are exactly the values for the unquantised types
    let a = c
        .tensor(&mut r, "a.f32", &dev)
        .unwrap()
        .dequantize(&dev)
        .unwrap();
    assert_eq!(max_abs_diff(&a, &src), 0.0);

    // a wrong data size, a mistyped alignment and a repeated key are refused
    let mut sink = vec![];
    let e = write_gguf(&mut sink, &path, &md, &infos[..1], |_, _| Ok(vec![0u8; 3]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("a.f32") && e.contains("3 bytes"), "{e}");
    let bad = vec![("general.alignment".to_string(), Value::U64(64))];
    assert!(write_gguf(&mut sink, &path, &bad, &[], |_, _| Ok(vec![])).is_err());
    let twice = vec![
        ("k".to_string(), Value::U8(1)),
        ("k".to_string(), Value::U8(2)),
    ];
    let e = write_gguf(&mut sink, &path, &twice, &[], |_, _| Ok(vec![]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`k`"), "{e}");
    let odd = TensorInfo {
        name: "odd".into(),
        shape: vec![2, 48],
        dtype: GgmlDType::Q4K,
    };
    let e = odd.size_in_bytes().unwrap_err().to_string();
    assert!(e.contains("odd") && e.contains("256"), "{e}");
}

/// Next-token logits of the model at `path` (a checkpoint directory or a GGUF file).
fn logits(path: &Path, ids: &[u32]) -> Tensor {
    let pre = Pretrained::load(path, DType::F32, &Device::Cpu).unwrap();
    let Body::Llama(m) = pre.body else {
        panic!("a LLaMA")
    };
    let items = vec![Encoded {
        ids: ids.to_vec(),
        type_ids: vec![0; ids.len()],
        label: None,
        target_mask: vec![1; ids.len()],
    }];
    let batch = collate(&items, &[0], 0, &Device::Cpu).unwrap();
    let h = m.hidden_states(&batch, &FastPath::default()).unwrap();
    m.lm_logits(&h.squeeze(0).unwrap()).unwrap()
}

#[test]
fn merged_hf_model_reads_back_with_its_metadata_tokenizer_and_logits() {
    let s = setup(SHAPE, AdapterKind::SingLora);
    let want = merged_f32(&s);
    let out = s.root.join("out/model-f32.gguf");
    let report = merge_checkpoint(&s.base, &s.adapter, &out, &gguf_opts(GgufQuant::F32)).unwrap();
    assert_eq!(report.files, ["model-f32.gguf"]);
    assert!(report.max_abs_change > 0.0);

    let g = load_gguf(&out, DType::F32).unwrap();
    let c = &g.config;
    assert_eq!(c["hidden_size"], 64);
    assert_eq!(c["intermediate_size"], 96);
    assert_eq!(c["num_hidden_layers"], 2);
    assert_eq!(c["num_attention_heads"], 4);
    assert_eq!(c["num_key_value_heads"], 2);
    assert_eq!(c["vocab_size"], 272);
    assert_eq!(c["max_position_embeddings"], 2048);
    assert_eq!(c["rms_norm_eps"], 1e-5);
    assert_eq!(c["rope_theta"], 50000.0);
    assert_eq!(c["tie_word_embeddings"], false);
    assert_eq!(c["bos_token_id"], 263);
    assert_eq!(c["eos_token_id"], 264);
    assert_eq!(g.chat_template.as_deref(), Some(CHATML_TEMPLATE));
    // every tensor, exactly (Q/K permuted on the way out and back)
    assert_eq!(g.tensors.len(), want.len());
    for (name, t) in &want {
        assert_eq!(max_abs_diff(&g.tensors[name], t), 0.0, "{name}");
    }
    // the tokenizer splits text as the Hugging Face one
    let hf = singlora::tokenize::load_tokenizer(&s.base).unwrap();
    for text in [
        "the thin ant in an inn",
        "<|im_start|>user\nhi<|im_end|>",
        "ÿ é 1234",
    ] {
        let a = hf.encode(text, false).unwrap();
        let b = g.tokenizer.encode(text, false).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{text}");
    }
    // the file's tokens: 265 real ones, 7 unused pads
    let (content, _) = read_content(&out);
    let Value::Array(types) = &content.metadata["tokenizer.ggml.token_type"] else {
        panic!()
    };
    assert_eq!(types.len(), 272);
    assert_eq!(format!("{:?}", types[262]), "I32(3)");
    assert_eq!(format!("{:?}", types[271]), "I32(5)");
    assert_eq!(format!("{:?}", types[40]), "I32(1)");
    assert_eq!(
        format!("{:?}", content.metadata["general.file_type"]),
        "U32(0)"
    );
    assert!(content.metadata.contains_key(WRITER_KEY));

    // the model loaded from the GGUF computes the logits of the safetensors merge
    let ids = [5u32, 260, 100, 7, 262, 33];
    let a = logits(&s.root.join("merged-f32"), &ids);
    let b = logits(&out, &ids);
    let d = max_abs_diff(&a, &b);
    assert!(d <= 1e-5 * max_abs(&a), "logits differ by {d}");

    // f16 and bf16: exactly the f32 merge rounded once; q8_0 within its rounding
    for (quant, dt) in [(GgufQuant::F16, DType::F16), (GgufQuant::BF16, DType::BF16)] {
        let p = s.root.join(format!("model-{quant}.gguf"));
        merge_checkpoint(&s.base, &s.adapter, &p, &gguf_opts(quant)).unwrap();
        let g = load_gguf(&p, DType::F32).unwrap();
        let (content, _) = read_content(&p);
        for (name, t) in &want {
            let got = &g.tensors[name];
            let info = &content.tensor_infos[&gguf_name(name).unwrap()];
            if t.rank() == 1 {
                assert_eq!(info.ggml_dtype, GgmlDType::F32, "{name}");
                assert_eq!(max_abs_diff(got, t), 0.0, "{name}");
            } else {
                let rounded = t.to_dtype(dt).unwrap();
                assert_eq!(max_abs_diff(got, &rounded), 0.0, "{quant} {name}");
            }
        }
    }
    let p = s.root.join("model-q8_0.gguf");
    merge_checkpoint(&s.base, &s.adapter, &p, &gguf_opts(GgufQuant::Q8_0)).unwrap();
    let g = load_gguf(&p, DType::F32).unwrap();
    for (name, t) in &want {
        // each block of 32 is stored as d·q with d = max|x|/127 (in f16) and |q| ≤ 127
        let bound = if t.rank() == 1 {
            0.0
        } else {
            max_abs(t) / 127.0 * 0.51 + 1e-6
        };
        let d = max_abs_diff(&g.tensors[name], t);
        assert!(d <= bound, "q8_0 {name}: {d} > {bound}");
    }
    let q8 = logits(&p, &ids);
    let rel = max_abs_diff(&a, &q8) / max_abs(&a);
    let f16 = logits(&s.root.join("model-f16.gguf"), &ids);
    let rel16 = max_abs_diff(&a, &f16) / max_abs(&a);
    eprintln!("logits vs the f32 merge, relative to their range: f16 {rel16:.2e}, q8_0 {rel:.2e}");
    assert!(rel16 < 5e-3, "f16 logits off by {rel16} of their range");
    assert!(rel < 0.1, "q8_0 logits off by {rel} of their range");
}

#[test]
fn q4_k_m_follows_llama_cpps_mix_and_stays_close() {
    // rows of 256 values, so the K-quants apply; 8 layers so that the mix varies by layer
    let shape = LlamaShape {
        layers: 8,
        ..LlamaShape::K_BLOCKS
    };
    let s = setup(shape, AdapterKind::Lora);
    let want = merged_f32(&s);
    let p = s.root.join("model-q4_k_m.gguf");
    merge_checkpoint(&s.base, &s.adapter, &p, &gguf_opts(GgufQuant::Q4KM)).unwrap();
    let (content, _) = read_content(&p);
    let ty = |n: &str| content.tensor_infos[n].ggml_dtype;
    assert_eq!(ty("output.weight"), GgmlDType::Q6K);
    assert_eq!(ty("token_embd.weight"), GgmlDType::Q4K);
    assert_eq!(ty("output_norm.weight"), GgmlDType::F32);
    // 8 layers: n/8 = 1, 7n/8 = 7, so layers 0, 3, 6, 7 get Q6_K
    for l in 0..8 {
        let more = [0, 3, 6, 7].contains(&l);
        let want6 = if more { GgmlDType::Q6K } else { GgmlDType::Q4K };
        assert_eq!(ty(&format!("blk.{l}.attn_v.weight")), want6, "layer {l}");
        assert_eq!(ty(&format!("blk.{l}.ffn_down.weight")), want6, "layer {l}");
        assert_eq!(ty(&format!("blk.{l}.attn_q.weight")), GgmlDType::Q4K);
        assert_eq!(ty(&format!("blk.{l}.ffn_up.weight")), GgmlDType::Q4K);
        assert_eq!(ty(&format!("blk.{l}.attn_norm.weight")), GgmlDType::F32);
    }
    assert_eq!(
        format!("{:?}", content.metadata["general.file_type"]),
        "U32(15)"
    );
    let g = load_gguf(&p, DType::F32).unwrap();
    for (name, t) in &want {
        // relative RMS error of a 4-bit (6-bit) quantisation of Gaussian weights
        let err = (&g.tensors[name] - t)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let rms = t.sqr().unwrap().mean_all().unwrap();
        let rel = (err.to_scalar::<f32>().unwrap() / rms.to_scalar::<f32>().unwrap()).sqrt();
        assert!(rel < 0.15, "{name}: relative RMS error {rel}");
    }
}

#[test]
fn gguf_base_keeps_its_metadata_and_types() {
    let s = setup(SHAPE, AdapterKind::SingLora);
    // a GGUF base in q8_0 (the norms f32), as a user would download one
    let empty = s.root.join("zero");
    {
        let mut af = AdapterFile::read(&s.adapter, &Device::Cpu).unwrap();
        for layer in af.layers.values_mut() {
            for t in layer.values_mut() {
                *t = t.zeros_like().unwrap();
            }
        }
        af.write(&empty, true).unwrap();
    }
    let base = s.root.join("base-q8_0.gguf");
    merge_checkpoint(&s.base, &empty, &base, &gguf_opts(GgufQuant::Q8_0)).unwrap();
    let (bc, mut br) = read_content(&base);

    // `same`: merged layers re-quantised to q8_0, the rest copied byte for byte
    let out = s.root.join("same.gguf");
    merge_checkpoint(&base, &s.adapter, &out, &gguf_opts(GgufQuant::Same)).unwrap();
    let (oc, mut or) = read_content(&out);
    assert_eq!(oc.tensor_infos.len(), bc.tensor_infos.len());
    for (k, v) in &bc.metadata {
        assert_eq!(format!("{:?}", oc.metadata[k]), format!("{v:?}"), "{k}");
    }
    assert_eq!(oc.metadata.len(), bc.metadata.len());
    let dev = Device::Cpu;
    for (name, info) in &bc.tensor_infos {
        assert_eq!(oc.tensor_infos[name].ggml_dtype, info.ggml_dtype, "{name}");
        let a = bc.tensor(&mut br, name, &dev).unwrap();
        let b = oc.tensor(&mut or, name, &dev).unwrap();
        let adapted = !name.contains("_norm")
            && ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_"]
                .iter()
                .any(|m| name.contains(m));
        assert_eq!(a.data().unwrap() == b.data().unwrap(), !adapted, "{name}");
    }
    // and merging the base GGUF gives the model merged from the Hugging Face base, to q8_0's
    // rounding of the base
    let want = merged_f32(&s);
    let g = load_gguf(&out, DType::F32).unwrap();
    for (name, t) in &want {
        let bound = if t.rank() == 1 {
            0.0
        } else {
            2.0 * max_abs(t) / 127.0 + 1e-6
        };
        let d = max_abs_diff(&g.tensors[name], t);
        assert!(d <= bound, "{name}: {d} > {bound}");
    }
    // f16 from the GGUF base; the metadata still the base's, the file type now f16
    let f16 = s.root.join("from-gguf-f16.gguf");
    merge_checkpoint(&base, &s.adapter, &f16, &gguf_opts(GgufQuant::F16)).unwrap();
    let (fc, _) = read_content(&f16);
    assert_eq!(format!("{:?}", fc.metadata["general.file_type"]), "U32(1)");
    assert_eq!(
        fc.tensor_infos["blk.0.ffn_up.weight"].ggml_dtype,
        GgmlDType::F16
    );
    assert_eq!(
        format!("{:?}", fc.metadata["tokenizer.chat_template"]),
        format!("{:?}", bc.metadata["tokenizer.chat_template"])
    );
}

#[test]
fn adapter_gguf_holds_delta_w_in_llama_cpps_layout() {
    let s = setup(SHAPE, AdapterKind::SingLora);
    let out = s.root.join("adapter.gguf");
    let e = singlora::gguf::lora::export_lora_gguf(&s.adapter, &out, None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--base") && e.contains("attention heads"), "{e}");
    singlora::gguf::lora::export_lora_gguf(&s.adapter, &out, Some(&s.base), false).unwrap();
    let (c, mut r) = read_content(&out);
    let s_ = |k: &str| format!("{:?}", c.metadata[k]);
    assert_eq!(s_("general.architecture"), "String(\"llama\")");
    assert_eq!(s_("general.type"), "String(\"adapter\")");
    assert_eq!(s_("adapter.type"), "String(\"lora\")");
    assert_eq!(s_("adapter.lora.alpha"), "F32(4.0)");
    assert_eq!(c.tensor_infos.len(), 2 * 7 * SHAPE.layers);

    // ΔW = B·A from the file (Q/K rows put back) equals the merge's W − W0
    let want = merged_f32(&s);
    let base = Checkpoint::open(&s.base).unwrap();
    let dev = Device::Cpu;
    for (hf, w) in &want {
        let Some(g) = gguf_name(hf)
            .filter(|_| w.rank() == 2 && !hf.contains("embed") && !hf.starts_with("lm_head"))
        else {
            continue;
        };
        let a = c
            .tensor(&mut r, &format!("{g}.lora_a"), &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        let b = c
            .tensor(&mut r, &format!("{g}.lora_b"), &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        assert_eq!(a.dims(), &[4, w.dim(1).unwrap()], "{g}");
        assert_eq!(b.dims(), &[w.dim(0).unwrap(), 4], "{g}");
        let mut delta = b.matmul(&a).unwrap();
        if g.contains("attn_q") {
            delta = unpermute_qk(&delta, SHAPE.heads).unwrap();
        } else if g.contains("attn_k") {
            delta = unpermute_qk(&delta, SHAPE.kv_heads).unwrap();
        }
        let w0 = base.load(hf, &dev).unwrap();
        let diff = max_abs_diff(&(w0 + delta).unwrap(), w);
        assert!(diff < 1e-5, "{g}: {diff}");
    }
    // `permute_qk` is what llama.cpp's base file has: B of attn_q is permuted by rows
    let b = c
        .tensor(&mut r, "blk.0.attn_q.weight.lora_b", &dev)
        .unwrap()
        .dequantize(&dev)
        .unwrap();
    let plain = singlora::adapter::export::plain_lora_layer(
        &AdapterFile::read(&s.adapter, &dev).unwrap(),
        "model.layers.0.self_attn.q_proj",
        None,
    )
    .unwrap();
    assert_eq!(
        max_abs_diff(&b, &permute_qk(&plain.b, SHAPE.heads).unwrap()),
        0.0
    );

    // DoRA has no llama.cpp form
    let d = setup(SHAPE, AdapterKind::Dora);
    let e = singlora::gguf::lora::export_lora_gguf(
        &d.adapter,
        &d.root.join("d.gguf"),
        Some(&d.base),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("DoRA"), "{e}");
}

/// The `gguf` package's key names (scripts/gguf_keys.py writes them, `{arch}` as `llama`).
fn known_keys() -> std::collections::BTreeSet<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_keys.txt");
    std::fs::read_to_string(&p)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn written_keys_are_the_gguf_packages() {
    let known = known_keys();
    // what llama.cpp needs to run a LLaMA with a BPE vocabulary, and an adapter
    let required_model = [
        "general.architecture",
        "general.file_type",
        "general.quantization_version",
        "llama.context_length",
        "llama.embedding_length",
        "llama.block_count",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.rope.freq_base",
        "llama.rope.dimension_count",
        "llama.vocab_size",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ];
    let required_adapter = [
        "general.architecture",
        "general.type",
        "adapter.type",
        "adapter.lora.alpha",
    ];
    for k in required_model.iter().chain(&required_adapter) {
        assert!(
            known.contains(*k),
            "required key {k} is not a gguf package key"
        );
    }
    let s = setup(SHAPE, AdapterKind::SingLora);
    let model = s.root.join("m.gguf");
    let mut cfg = SHAPE.config();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0});
    std::fs::write(s.base.join("config.json"), cfg.to_string()).unwrap();
    merge_checkpoint(&s.base, &s.adapter, &model, &gguf_opts(GgufQuant::F16)).unwrap();
    let lora = s.root.join("a.gguf");
    singlora::gguf::lora::export_lora_gguf(&s.adapter, &lora, Some(&s.base), false).unwrap();
    for (file, required) in [
        (&model, &required_model[..]),
        (&lora, &required_adapter[..]),
    ] {
        let (c, _) = read_content(file);
        for k in c.metadata.keys() {
            assert!(
                known.contains(k) || k.starts_with("singlora."),
                "{}: key {k} is not a gguf package key",
                file.display()
            );
        }
        for k in required {
            assert!(c.metadata.contains_key(*k), "{}: no {k}", file.display());
        }
    }
    let (c, _) = read_content(&model);
    assert_eq!(
        format!("{:?}", c.metadata["llama.rope.scaling.type"]),
        "String(\"linear\")"
    );
    assert_eq!(
        format!("{:?}", c.metadata["llama.rope.scaling.factor"]),
        "F32(2.0)"
    );
    // the linear scaling reads back
    let g = load_gguf(&model, DType::F32).unwrap();
    assert_eq!(g.config["rope_scaling"]["factor"], 2.0);
}

#[test]
fn refusals_name_the_problem() {
    let s = setup(SHAPE, AdapterKind::SingLora);
    let opts = gguf_opts(GgufQuant::F16);
    // an output inside an input
    let e = merge_checkpoint(&s.base, &s.adapter, &s.adapter.join("m.gguf"), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--adapter") && e.contains("is inside"), "{e}");
    let e = singlora::gguf::lora::export_lora_gguf(
        &s.adapter,
        &s.base.join("a.gguf"),
        Some(&s.base),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--base"), "{e}");
    // a GGUF base as its own output
    let g = s.root.join("g.gguf");
    merge_checkpoint(&s.base, &s.adapter, &g, &opts).unwrap();
    let e = merge_checkpoint(
        &g,
        &s.adapter,
        &g,
        &MergeOptions {
            overwrite: true,
            ..opts.clone()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("is the input --base"), "{e}");
    // an existing output: refused without --overwrite, replaced with it when ours, never a
    // file singlora did not write
    let out = s.root.join("o.gguf");
    merge_checkpoint(&s.base, &s.adapter, &out, &opts).unwrap();
    let e = merge_checkpoint(&s.base, &s.adapter, &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--overwrite"), "{e}");
    let over = MergeOptions {
        overwrite: true,
        ..opts.clone()
    };
    merge_checkpoint(&s.base, &s.adapter, &out, &over).unwrap();
    let foreign = s.root.join("foreign.gguf");
    std::fs::write(&foreign, b"someone's notes").unwrap();
    let e = merge_checkpoint(&s.base, &s.adapter, &foreign, &over)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a GGUF file singlora wrote"), "{e}");
    assert_eq!(std::fs::read(&foreign).unwrap(), b"someone's notes");
    // --dtype belongs to safetensors
    let both = MergeOptions {
        dtype: Some(DType::F16),
        ..opts.clone()
    };
    assert!(merge_checkpoint(&s.base, &s.adapter, &s.root.join("x.gguf"), &both).is_err());

    // a merged weight past f16's range: refused by name, nothing written
    let mut af = AdapterFile::read(&s.adapter, &Device::Cpu).unwrap();
    let a = af.layers.get_mut("model.layers.1.mlp.up_proj").unwrap();
    let t = a.get_mut("singlora_A.weight").unwrap();
    *t = (t.clone() * 1e4).unwrap();
    let huge = s.root.join("huge");
    af.write(&huge, true).unwrap();
    let p = s.root.join("huge.gguf");
    let e = merge_checkpoint(&s.base, &huge, &p, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blk.1.ffn_up.weight") && e.contains("infinite"),
        "{e}"
    );
    assert!(!p.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&s.root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    // f32 holds it
    merge_checkpoint(&s.base, &huge, &p, &gguf_opts(GgufQuant::F32)).unwrap();

    // an architecture GGUF export does not write: refused, for the model and the adapter
    let mut cfg = SHAPE.config();
    cfg["model_type"] = serde_json::json!("olmo2");
    std::fs::write(s.base.join("config.json"), cfg.to_string()).unwrap();
    let e = merge_checkpoint(&s.base, &s.adapter, &s.root.join("q.gguf"), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("olmo2"), "{e}");
    let e = singlora::gguf::lora::export_lora_gguf(
        &s.adapter,
        &s.root.join("q-adapter.gguf"),
        Some(&s.base),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("olmo2"), "{e}");
}

/// Qwen2 (q/k/v biases) is written as llama.cpp's `llama` with the biases: Q's and K's rows
/// permuted like their weights, V's as they are, all f32.
#[test]
fn qwen2_biases_are_written_in_llama_cpps_order() {
    let s = setup(SHAPE, AdapterKind::SingLora);
    let mut cfg = SHAPE.config();
    cfg["model_type"] = serde_json::json!("qwen2");
    let mut tensors = SHAPE.tensors(3, DType::F32).unwrap();
    let hd = SHAPE.hidden / SHAPE.heads;
    for l in 0..SHAPE.layers {
        for (m, n) in [
            ("q", SHAPE.heads),
            ("k", SHAPE.kv_heads),
            ("v", SHAPE.kv_heads),
        ] {
            let b = Tensor::randn(0f32, 1., n * hd, &Device::Cpu).unwrap();
            tensors.insert(format!("model.layers.{l}.self_attn.{m}_proj.bias"), b);
        }
    }
    write_checkpoint(&s.base, &cfg, &tensors, 1).unwrap();
    let out = s.root.join("qwen2.gguf");
    merge_checkpoint(&s.base, &s.adapter, &out, &gguf_opts(GgufQuant::Q8_0)).unwrap();
    let (c, mut r) = read_content(&out);
    assert_eq!(
        format!("{:?}", c.metadata["general.architecture"]),
        "String(\"llama\")"
    );
    let dev = Device::Cpu;
    for l in 0..SHAPE.layers {
        for (m, g, heads) in [
            ("q", "attn_q", Some(SHAPE.heads)),
            ("k", "attn_k", Some(SHAPE.kv_heads)),
            ("v", "attn_v", None),
        ] {
            let name = format!("blk.{l}.{g}.bias");
            assert_eq!(c.tensor_infos[&name].ggml_dtype, GgmlDType::F32, "{name}");
            let got = c
                .tensor(&mut r, &name, &dev)
                .unwrap()
                .dequantize(&dev)
                .unwrap();
            let hf = &tensors[&format!("model.layers.{l}.self_attn.{m}_proj.bias")];
            let want = match heads {
                Some(n) => permute_qk(hf, n).unwrap(),
                None => hf.clone(),
            };
            assert_eq!(max_abs_diff(&got, &want), 0.0, "{name}");
        }
    }
}

/// Qwen3 is written as llama.cpp's `qwen3`: its own keys (with `key_length` for heads of 32 at
/// hidden 64 / 4 heads), the per-head q/k norms, Q/K rows in Hugging Face's order. Merged, it
/// reads back to the merged safetensors' tensors and logits; as an adapter GGUF, its B rows keep
/// Hugging Face's order too.
#[test]
fn qwen3_is_written_as_llama_cpps_qwen3() {
    let s = setup(SHAPE, AdapterKind::SingLora);
    let (hd, dev) = (32, Device::Cpu);
    let mut cfg = SHAPE.config();
    cfg["model_type"] = serde_json::json!("qwen3");
    cfg["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
    cfg["head_dim"] = serde_json::json!(hd);
    cfg["rope_theta"] = serde_json::json!(50000.0);
    let mut tensors = SHAPE.tensors(3, DType::F32).unwrap();
    let mut linears = vec![];
    for l in 0..SHAPE.layers {
        let p = format!("model.layers.{l}");
        for (m, shape) in [
            ("self_attn.q_proj", (SHAPE.heads * hd, SHAPE.hidden)),
            ("self_attn.k_proj", (SHAPE.kv_heads * hd, SHAPE.hidden)),
            ("self_attn.v_proj", (SHAPE.kv_heads * hd, SHAPE.hidden)),
            ("self_attn.o_proj", (SHAPE.hidden, SHAPE.heads * hd)),
        ] {
            let w = Tensor::randn(0f32, 0.2, shape, &dev).unwrap();
            tensors.insert(format!("{p}.{m}.weight"), w);
            linears.push((format!("{p}.{m}"), shape));
        }
        for m in ["q_norm", "k_norm"] {
            let w = (Tensor::randn(0f32, 0.2, hd, &dev).unwrap() + 1.0).unwrap();
            tensors.insert(format!("{p}.self_attn.{m}.weight"), w);
        }
    }
    write_checkpoint(&s.base, &cfg, &tensors, 1).unwrap();
    let targets = TargetSpec::parse("q_proj,k_proj,v_proj,o_proj", None).unwrap();
    let mut spec = AdapterSpec::new(AdapterKind::SingLora, 4, 8.0);
    spec.seed = 7;
    random_adapter(&spec, &linears, &targets, 3, 10)
        .unwrap()
        .write(&s.adapter, true)
        .unwrap();

    let out = s.root.join("qwen3.gguf");
    merge_checkpoint(&s.base, &s.adapter, &out, &gguf_opts(GgufQuant::F32)).unwrap();
    let (c, _) = read_content(&out);
    let key = |k: &str| format!("{:?}", c.metadata.get(k));
    assert_eq!(key("general.architecture"), "Some(String(\"qwen3\"))");
    assert_eq!(key("qwen3.attention.key_length"), "Some(U32(32))");
    assert_eq!(key("qwen3.attention.head_count_kv"), "Some(U32(2))");
    assert_eq!(key("qwen3.rope.freq_base"), "Some(F32(50000.0))");
    assert!(!c.metadata.keys().any(|k| k.starts_with("llama.")));
    // every key the `gguf` package's (its list spells the architecture's keys `llama.*`)
    let known = known_keys();
    for k in c.metadata.keys() {
        let generic = k.replacen("qwen3.", "llama.", 1);
        assert!(
            known.contains(&generic) || k.starts_with("singlora."),
            "{k} is not a gguf package key"
        );
    }
    for l in 0..SHAPE.layers {
        for g in ["attn_q_norm", "attn_k_norm"] {
            let info = &c.tensor_infos[&format!("blk.{l}.{g}.weight")];
            assert_eq!(info.ggml_dtype, GgmlDType::F32);
        }
    }
    // every tensor as merged, Q and K unpermuted (the reader leaves qwen3's rows alone)
    let want = merged_f32(&s);
    let g = load_gguf(&out, DType::F32).unwrap();
    assert_eq!(g.config["model_type"], "qwen3");
    assert_eq!(g.tensors.len(), want.len());
    for (name, t) in &want {
        assert_eq!(max_abs_diff(&g.tensors[name], t), 0.0, "{name}");
    }
    let ids = [5u32, 17, 99, 3, 250, 42, 7];
    let (a, b) = (logits(&out, &ids), logits(&s.root.join("merged-f32"), &ids));
    assert!(max_abs_diff(&a, &b) <= 1e-5 * max_abs(&b), "logits differ");

    // the adapter GGUF: qwen3, B as the adapter's (no permutation), its ΔW the merge's
    let lora = s.root.join("qwen3-adapter.gguf");
    singlora::gguf::lora::export_lora_gguf(&s.adapter, &lora, Some(&s.base), false).unwrap();
    let (c, mut r) = read_content(&lora);
    assert_eq!(
        format!("{:?}", c.metadata["general.architecture"]),
        "String(\"qwen3\")"
    );
    let read =
        |r: &mut BufReader<File>, n: &str| c.tensor(r, n, &dev).unwrap().dequantize(&dev).unwrap();
    for (module, g) in [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
    ] {
        let (a, b) = (
            read(&mut r, &format!("blk.1.{g}.weight.lora_a")),
            read(&mut r, &format!("blk.1.{g}.weight.lora_b")),
        );
        let delta = b.matmul(&a).unwrap();
        let name = format!("model.layers.1.{module}.weight");
        let change = (&want[&name] - &tensors[&name]).unwrap();
        assert!(
            max_abs_diff(&delta, &change) <= 1e-5 * max_abs(&change),
            "{name}: the adapter's B·A is not the merge's change"
        );
    }

    // sliding-window layers, which llama.cpp's qwen3 does not have: refused by name
    cfg["use_sliding_window"] = serde_json::json!(true);
    cfg["sliding_window"] = serde_json::json!(16);
    cfg["max_window_layers"] = serde_json::json!(0);
    std::fs::write(s.base.join("config.json"), cfg.to_string()).unwrap();
    let e = merge_checkpoint(
        &s.base,
        &s.adapter,
        &s.root.join("windowed.gguf"),
        &gguf_opts(GgufQuant::F32),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("use_sliding_window") && e.contains("config.json"),
        "{e}"
    );
    assert!(!s.root.join("windowed.gguf").exists());
}

/// LLaMA 3.1's RoPE scaling goes into the file as llama.cpp keeps it, the `rope_freqs` tensor of
/// per-frequency divisors; our reader turns it back into the same config and logits, and a
/// merge onto that GGUF file keeps the tensor.
#[test]
fn llama3_rope_scaling_is_written_as_rope_freqs() {
    use singlora::model::llama::{Rope, RopeScaling};
    let s = setup(SHAPE, AdapterKind::SingLora);
    let scaling = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let mut cfg = SHAPE.config();
    cfg["rope_theta"] = serde_json::json!(500000.0);
    cfg["rope_scaling"] = scaling.clone();
    write_checkpoint(&s.base, &cfg, &SHAPE.tensors(3, DType::F32).unwrap(), 1).unwrap();
    let out = s.root.join("llama3.gguf");
    merge_checkpoint(&s.base, &s.adapter, &out, &gguf_opts(GgufQuant::F32)).unwrap();

    let (c, mut r) = read_content(&out);
    let info = &c.tensor_infos["rope_freqs.weight"];
    assert_eq!(info.ggml_dtype, GgmlDType::F32);
    let stored = c
        .tensor(&mut r, "rope_freqs.weight", &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = Rope {
        theta: 500000.0,
        scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        },
    }
    .freq_factors(SHAPE.hidden / SHAPE.heads)
    .unwrap();
    assert_eq!(stored.len(), want.len());
    for (g, w) in stored.iter().zip(&want) {
        assert_eq!(*g, *w as f32);
    }
    assert!(stored[0] == 1.0 && stored[stored.len() - 1] == 8.0);
    assert!(!c.metadata.contains_key("llama.rope.scaling.type"));

    let g = load_gguf(&out, DType::F32).unwrap();
    assert_eq!(g.config["rope_scaling"], scaling);
    let ids = [5u32, 17, 99, 3, 250, 42, 7, 8, 9, 10, 11, 12];
    let merged = s.root.join("merged-f32");
    merged_f32(&s);
    let (a, b) = (logits(&out, &ids), logits(&merged, &ids));
    assert!(max_abs_diff(&a, &b) <= 1e-5 * max_abs(&b), "logits differ");

    // onto the GGUF file: the factors kept as they are
    let again = s.root.join("again.gguf");
    merge_checkpoint(&out, &s.adapter, &again, &gguf_opts(GgufQuant::F32)).unwrap();
    let (c2, mut r2) = read_content(&again);
    let kept = c2
        .tensor(&mut r2, "rope_freqs.weight", &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(kept, stored);
}

/// A LLaMA 2-style tokenizer.json: SentencePiece pieces (▁ for spaces, one put before the
/// text), byte fallback, `<unk>`, `<s>`, `</s>`, the 256 byte pieces, then 13 pieces and their
/// merges: 272 tokens, SHAPE's vocabulary.
fn write_spm_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    let mut add = |t: &str| {
        let id = vocab.len();
        vocab.insert(t.to_string(), serde_json::json!(id));
    };
    for t in ["<unk>", "<s>", "</s>"] {
        add(t);
    }
    for b in 0..256 {
        add(&format!("<0x{b:02X}>"));
    }
    for t in [
        "▁", "t", "h", "e", "a", "n", "i", "▁t", "he", "▁the", "an", "▁a", "in",
    ] {
        add(t);
    }
    let special = |id: usize, t: &str| {
        serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": vocab,
            "merges": [["▁", "t"], ["h", "e"], ["▁t", "he"], ["a", "n"], ["▁", "a"], ["i", "n"]]}
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    let tc = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": true, "add_eos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

/// A byte-fallback (LLaMA 2-style) vocabulary is written as llama.cpp's SentencePiece
/// tokenizer: pieces, scores in id order, byte / unknown / control types, the space prefix;
/// read back, it splits text into the Hugging Face tokenizer's ids (bytes for what no piece
/// covers). Other normalizers are refused by name.
#[test]
fn llama2_vocabulary_is_written_as_llama_cpps_sentencepiece() {
    let s = setup(SHAPE, AdapterKind::SingLora);
    std::fs::remove_file(s.base.join("tokenizer_config.json")).ok();
    write_spm_tokenizer(&s.base);
    let out = s.root.join("spm.gguf");
    merge_checkpoint(&s.base, &s.adapter, &out, &gguf_opts(GgufQuant::F32)).unwrap();
    let (c, _) = read_content(&out);
    let md = |k: &str| c.metadata.get(k).unwrap_or_else(|| panic!("no {k}"));
    assert_eq!(
        format!("{:?}", md("tokenizer.ggml.model")),
        "String(\"llama\")"
    );
    assert_eq!(
        format!("{:?}", md("tokenizer.ggml.add_space_prefix")),
        "Bool(true)"
    );
    assert_eq!(format!("{:?}", md("tokenizer.ggml.bos_token_id")), "U32(1)");
    assert_eq!(
        format!("{:?}", md("tokenizer.ggml.unknown_token_id")),
        "U32(0)"
    );
    assert!(!c.metadata.contains_key("tokenizer.ggml.merges"));
    let (Value::Array(types), Value::Array(scores)) =
        (md("tokenizer.ggml.token_type"), md("tokenizer.ggml.scores"))
    else {
        panic!("types and scores are arrays")
    };
    let ty = |i: usize| format!("{:?}", types[i]);
    assert_eq!(ty(0), "I32(2)"); // unknown
    assert_eq!(ty(1), "I32(3)"); // control
    assert_eq!(ty(3 + 0x41), "I32(6)"); // <0x41>: byte
    assert_eq!(ty(268), "I32(1)"); // ▁the: normal
                                   // a normal piece outranks every later one
    let score = |i: usize| match scores[i] {
        Value::F32(x) => x,
        _ => panic!("f32 scores"),
    };
    assert!((259..271).all(|i| score(i) > score(i + 1)));

    let g = load_gguf(&out, DType::F32).unwrap();
    let hf = tokenizers::Tokenizer::from_file(s.base.join("tokenizer.json")).unwrap();
    for text in [
        "the ant in the inn",
        "a then the",
        "ÿé 12 Hat",
        "  two  spaces",
    ] {
        let a = hf.encode(text, false).unwrap();
        let b = g.tokenizer.encode(text, false).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{text}");
    }
    assert_eq!(
        hf.encode("the", false).unwrap().get_tokens(),
        ["▁the"],
        "the fixture merges"
    );

    // spaces split otherwise (a Metaspace that splits): refused, naming the field
    let p = s.base.join("tokenizer.json");
    let mut tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    tj["normalizer"] = serde_json::Value::Null;
    tj["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "▁",
        "prepend_scheme": "always", "split": true});
    std::fs::write(&p, tj.to_string()).unwrap();
    let e = merge_checkpoint(
        &s.base,
        &s.adapter,
        &s.root.join("x.gguf"),
        &gguf_opts(GgufQuant::F32),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("normalizer"),
        "{e}"
    );
    // ... and one that does not: written, with the prefix
    tj["pre_tokenizer"]["split"] = serde_json::json!(false);
    std::fs::write(&p, tj.to_string()).unwrap();
    merge_checkpoint(
        &s.base,
        &s.adapter,
        &s.root.join("y.gguf"),
        &gguf_opts(GgufQuant::F32),
    )
    .unwrap();
}
