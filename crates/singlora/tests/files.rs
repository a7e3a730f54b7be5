//! Adapter files and merges: PEFT 0.21's own files and merged weights (golden fixtures), round
//! trips, export to plain LoRA, sharded and low-precision bases, and every error path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use singlora::adapter::file::AdapterFile;
use singlora::adapter::target::TargetSpec;
use singlora::adapter::{AdapterKind, AdapterSpec};
use singlora::checkpoint::{Checkpoint, TensorFile};
use singlora::merge::{merge_checkpoint, merged_weights, MergeOptions};
use singlora::synthetic::{random_adapter, write_checkpoint, LlamaShape};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

const SEVEN: &str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";

#[test]
fn peft_golden_files_load_and_merge_to_peft_weights() {
    let base = Checkpoint::open(&fixtures().join("base")).unwrap();
    for (case, kind, rslora) in [
        ("lora", AdapterKind::Lora, false),
        ("rslora", AdapterKind::Lora, true),
        ("dora", AdapterKind::Dora, false),
        ("lora_patterns", AdapterKind::Lora, false),
    ] {
        let dir = fixtures().join(case);
        let af = AdapterFile::read(&dir, &Device::Cpu).unwrap();
        assert_eq!(af.config.kind, kind, "{case}");
        assert_eq!(af.config.use_rslora, rslora, "{case}");
        assert_eq!(af.layers.len(), 14, "{case}: 7 projections x 2 layers");
        let (merged, _) = merged_weights(&base, &af).unwrap();
        let peft = TensorFile::open(&dir.join("merged.safetensors")).unwrap();
        let mut compared = 0;
        for name in peft.names() {
            let want = peft.load(name, &Device::Cpu).unwrap();
            let got = match merged.get(name) {
                Some(t) => t.clone(),
                None => base.load(name, &Device::Cpu).unwrap(),
            };
            let d = max_diff(&got, &want);
            assert!(d < 2e-6, "{case}: {name} differs from PEFT's merge by {d}");
            compared += 1;
        }
        assert_eq!(compared, base.names().count(), "{case}");
        // and the merge really changed something
        let name = "model.layers.0.mlp.down_proj.weight";
        assert!(max_diff(&merged[name], &base.load(name, &Device::Cpu).unwrap()) > 1e-3);
    }
    // rank_pattern / alpha_pattern were honoured
    let af = AdapterFile::read(&fixtures().join("lora_patterns"), &Device::Cpu).unwrap();
    assert_eq!(af.config.rank_for("model.layers.0.mlp.down_proj"), 2);
    assert_eq!(af.config.alpha_for("model.layers.1.self_attn.q_proj"), 3.0);
}

fn tiny_base(dir: &Path, dtype: DType, shards: usize) -> LlamaShape {
    let shape = LlamaShape::TINY;
    write_checkpoint(
        dir,
        &shape.config(),
        &shape.tensors(3, dtype).unwrap(),
        shards,
    )
    .unwrap();
    shape
}

fn adapter_for(shape: &LlamaShape, kind: AdapterKind, step: u64, ramp: u64) -> AdapterFile {
    let targets = TargetSpec::parse(SEVEN, None).unwrap();
    let layers: Vec<_> = shape
        .linears()
        .into_iter()
        .filter(|(n, _)| targets.matches(n))
        .collect();
    let mut spec = AdapterSpec::new(kind, 4, 8.0);
    spec.seed = 9;
    random_adapter(&spec, &layers, &targets, step, ramp).unwrap()
}

#[test]
fn round_trip_keeps_every_tensor_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let shape = LlamaShape::TINY;
    for kind in [AdapterKind::SingLora, AdapterKind::Lora, AdapterKind::Dora] {
        let af = adapter_for(&shape, kind, 7, 20);
        let dir = tmp.path().join(kind.to_string());
        af.write(&dir, false).unwrap();
        let back = AdapterFile::read(&dir, &Device::Cpu).unwrap();
        assert_eq!(back.config.kind, kind);
        assert_eq!(back.layers.len(), af.layers.len());
        for (m, ts) in &af.layers {
            for (s, t) in ts {
                assert_eq!(max_diff(t, &back.layers[m][s]), 0.0, "{m}.{s}");
            }
        }
        if kind == AdapterKind::SingLora {
            assert_eq!((back.config.step, back.config.ramp_steps), (7, 20));
            assert_eq!(back.config.u(), 0.35);
            assert_eq!(back.config.layer_shapes, af.config.layer_shapes);
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(cfg["peft_type"], "SINGLORA");
            assert_eq!(cfg["init"], "kaiming_width");
            // one (max(d_in, d_out), r) f32 tensor per layer under PEFT's key scheme
            let f = TensorFile::open(&dir.join("adapter_model.safetensors")).unwrap();
            let m = f
                .meta("base_model.model.model.layers.0.mlp.up_proj.singlora_A.weight")
                .unwrap();
            assert_eq!(m.shape, vec![24, 4]);
            assert_eq!(m.dtype, safetensors::Dtype::F32);
        }
    }
}

#[test]
fn merge_keeps_names_dtypes_and_sharding() {
    let tmp = tempfile::tempdir().unwrap();
    for (dtype, shards) in [(DType::F32, 1), (DType::BF16, 3), (DType::F16, 2)] {
        let base = tmp.path().join(format!("base-{dtype:?}-{shards}"));
        let shape = tiny_base(&base, dtype, shards);
        std::fs::write(base.join("tokenizer.json"), "{}").unwrap();
        let adapter = tmp.path().join(format!("ad-{dtype:?}"));
        adapter_for(&shape, AdapterKind::SingLora, 5, 10)
            .write(&adapter, false)
            .unwrap();
        let out = tmp.path().join(format!("merged-{dtype:?}"));
        let report = merge_checkpoint(&base, &adapter, &out, &MergeOptions::default()).unwrap();
        assert_eq!(report.layers, 14);
        assert_eq!(report.u, 0.5);
        assert!(out.join("config.json").exists() && out.join("tokenizer.json").exists());
        let (b, m) = (
            Checkpoint::open(&base).unwrap(),
            Checkpoint::open(&out).unwrap(),
        );
        assert_eq!(b.names().collect::<Vec<_>>(), m.names().collect::<Vec<_>>());
        assert_eq!(b.files().len(), m.files().len());
        for name in b.names() {
            assert_eq!(
                b.meta(name).unwrap().dtype,
                m.meta(name).unwrap().dtype,
                "{name}"
            );
            let same_file = |c: &Checkpoint| {
                c.file_of(name)
                    .unwrap()
                    .path()
                    .file_name()
                    .unwrap()
                    .to_owned()
            };
            assert_eq!(same_file(&b), same_file(&m));
        }
        // W = W0 + s·u·A_out·A_inᵀ on one tall layer, by hand
        let af = AdapterFile::read(&adapter, &Device::Cpu).unwrap();
        let module = "model.layers.1.mlp.gate_proj";
        let a = af.layers[module]["singlora_A.weight"]
            .to_dtype(DType::F64)
            .unwrap();
        let delta = (a
            .narrow(0, 0, 24)
            .unwrap()
            .matmul(&a.narrow(0, 0, 16).unwrap().t().unwrap())
            .unwrap()
            * (2.0 * 0.5))
            .unwrap();
        let w0 = b
            .load(&format!("{module}.weight"), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let expect = (w0 + delta).unwrap().to_dtype(dtype).unwrap();
        let got = m.load(&format!("{module}.weight"), &Device::Cpu).unwrap();
        assert_eq!(
            max_diff(&got, &expect),
            0.0,
            "{dtype:?}: cast once from the f64 result"
        );
    }
}

#[test]
fn merge_with_dtype_and_head() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let shape = tiny_base(&base, DType::F32, 2);
    singlora::synthetic::write_tokenizer(
        &base,
        &["a", "b"],
        singlora::tokenize::TokenizerStyle::Llama,
    )
    .unwrap();
    let mut af = adapter_for(&shape, AdapterKind::Lora, 0, 0);
    af.config.modules_to_save = vec!["score".into()];
    af.config.labels = Some(vec!["neg".into(), "pos".into()]);
    af.heads.insert(
        "score.weight".into(),
        Tensor::ones((2, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    let adapter = tmp.path().join("ad");
    af.write(&adapter, false).unwrap();
    let out = tmp.path().join("merged");
    let opts = MergeOptions {
        overwrite: false,
        dtype: Some(DType::BF16),
        ..Default::default()
    };
    merge_checkpoint(&base, &adapter, &out, &opts).unwrap();
    let m = Checkpoint::open(&out).unwrap();
    assert!(m
        .names()
        .all(|n| m.meta(n).unwrap().dtype == safetensors::Dtype::BF16));
    assert_eq!(
        m.load("score.weight", &Device::Cpu).unwrap().dims(),
        &[2, 16]
    );
    let cfg = m.config();
    assert_eq!(cfg["id2label"]["1"], "pos");
    assert_eq!(cfg["label2id"]["neg"], 0);
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["pad_token_id"], 0);
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert!(index["weight_map"]["score.weight"].is_string());
}

#[test]
fn exported_lora_merges_like_singlora() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let shape = tiny_base(&base, DType::F32, 1);
    let mut af = adapter_for(&shape, AdapterKind::SingLora, 3, 4);
    af.config.rank_pattern = vec![("down_proj".into(), 4)];
    let adapter = tmp.path().join("ad");
    af.write(&adapter, false).unwrap();
    let lora_dir = tmp.path().join("lora");
    let (lora, _) =
        singlora::adapter::export::export_lora(&adapter, &lora_dir, None, false).unwrap();
    assert_eq!(lora.config.kind, AdapterKind::Lora);
    assert_eq!(lora.config.lora_alpha, 4.0);
    assert_eq!(lora.config.alpha_for("model.layers.0.mlp.down_proj"), 4.0);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lora_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["use_rslora"], false);
    assert_eq!(cfg["lora_alpha"], 4);
    let ck = Checkpoint::open(&base).unwrap();
    let (a, _) = merged_weights(&ck, &AdapterFile::read(&adapter, &Device::Cpu).unwrap()).unwrap();
    let (b, _) = merged_weights(&ck, &AdapterFile::read(&lora_dir, &Device::Cpu).unwrap()).unwrap();
    for (name, t) in &a {
        assert!(max_diff(t, &b[name]) < 1e-6, "{name}");
    }
    // export needs shapes: from the file, or else from --base
    let mut bare = AdapterFile::read(&adapter, &Device::Cpu).unwrap();
    bare.config.layer_shapes.clear();
    let err = singlora::adapter::export::to_lora(&bare, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--base"), "{err}");
    singlora::adapter::export::to_lora(&bare, Some(&ck)).unwrap();
}

// ---- error paths: a clear message naming the culprit, and nothing written ----

struct Setup {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    adapter: PathBuf,
    out: PathBuf,
}

fn setup(kind: AdapterKind) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let shape = tiny_base(&base, DType::F32, 1);
    let adapter = tmp.path().join("adapter");
    adapter_for(&shape, kind, 1, 2)
        .write(&adapter, false)
        .unwrap();
    let out = tmp.path().join("out");
    Setup {
        base,
        adapter,
        out,
        _tmp: tmp,
    }
}

fn merge_err(s: &Setup) -> String {
    merge_err_with(s, &MergeOptions::default())
}

/// The error of a merge that must fail, having checked that it left nothing behind.
fn merge_err_with(s: &Setup, opts: &MergeOptions) -> String {
    let err = merge_checkpoint(&s.base, &s.adapter, &s.out, opts)
        .unwrap_err()
        .to_string();
    assert!(!s.out.exists(), "a failed merge left {}", s.out.display());
    let leftovers: Vec<_> = std::fs::read_dir(s.out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("out"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    err
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn truncated_safetensors_is_refused() {
    let s = setup(AdapterKind::SingLora);
    let p = s.adapter.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let err = merge_err(&s);
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
    // a base shard truncated inside its header
    let s = setup(AdapterKind::SingLora);
    let p = s.base.join("model.safetensors");
    std::fs::write(&p, &std::fs::read(&p).unwrap()[..50]).unwrap();
    let err = merge_err(&s);
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}

#[test]
fn header_that_lies_about_sizes_is_refused() {
    let s = setup(AdapterKind::Lora);
    let p = s.adapter.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    // claim a larger shape for one tensor than its bytes hold, keeping the header length
    let forged = header.replacen("[4,16]", "[5,16]", 1);
    assert_ne!(forged, header);
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(forged.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
    let err = merge_err(&s);
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}

#[test]
fn index_naming_a_file_elsewhere_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    tiny_base(&base, DType::F32, 2);
    let index_path = base.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let (name, shard) = {
        let map = index["weight_map"].as_object().unwrap();
        let (k, v) = map.iter().next().unwrap();
        (k.clone(), v.as_str().unwrap().to_string())
    };
    for elsewhere in [format!("../base/{shard}"), format!("/{shard}"), "..".into()] {
        index["weight_map"][&name] = serde_json::json!(elsewhere);
        std::fs::write(&index_path, index.to_string()).unwrap();
        let err = Checkpoint::open(&base).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors.index.json")
                && err.contains(&format!("weight_map.{name}"))
                && err.contains("beside the index"),
            "{err}"
        );
    }
}

#[test]
fn adapter_that_does_not_fit_the_base_is_refused() {
    let s = setup(AdapterKind::SingLora);
    // a base whose up_proj is 20 wide instead of 24
    let shape = LlamaShape {
        intermediate: 20,
        ..LlamaShape::TINY
    };
    std::fs::remove_dir_all(&s.base).unwrap();
    write_checkpoint(
        &s.base,
        &shape.config(),
        &shape.tensors(3, DType::F32).unwrap(),
        1,
    )
    .unwrap();
    let err = merge_err(&s);
    assert!(
        err.contains("singlora_A.weight") && err.contains("shape [24, 4]"),
        "{err}"
    );
    assert!(err.contains("[20, 4]"), "{err}");
}

#[test]
fn layer_missing_from_base_is_refused() {
    let s = setup(AdapterKind::Lora);
    let shape = LlamaShape {
        layers: 1,
        ..LlamaShape::TINY
    };
    std::fs::remove_dir_all(&s.base).unwrap();
    write_checkpoint(
        &s.base,
        &shape.config(),
        &shape.tensors(3, DType::F32).unwrap(),
        1,
    )
    .unwrap();
    let err = merge_err(&s);
    assert!(
        err.contains("model.layers.1.") && err.contains("has no tensor"),
        "{err}"
    );
}

#[test]
fn config_errors_name_file_and_field() {
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "peft_type",
            Box::new(|v| v["peft_type"] = "PREFIX_TUNING".into()),
            "PREFIX_TUNING",
        ),
        (
            "r",
            Box::new(|v| v["r"] = "four".into()),
            "non-negative integer",
        ),
        (
            "lora_alpha",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("lora_alpha");
            }),
            "missing",
        ),
        (
            "step",
            Box::new(|v| v["step"] = 1.5.into()),
            "non-negative integer",
        ),
        (
            "use_rslora",
            Box::new(|v| v["use_rslora"] = 1.into()),
            "true or false",
        ),
        (
            "layers_to_transform",
            Box::new(|v| v["layers_to_transform"] = serde_json::json!([0])),
            "not supported",
        ),
        (
            "bias",
            Box::new(|v| v["bias"] = "lora_only".into()),
            "not supported",
        ),
    ];
    for (field, edit, want) in cases {
        let s = setup(AdapterKind::SingLora);
        edit_config(&s.adapter, edit);
        let err = merge_err(&s);
        assert!(err.contains("adapter_config.json"), "{field}: {err}");
        assert!(
            err.contains(&format!("`{field}`")) || err.contains(field),
            "{field}: {err}"
        );
        assert!(err.contains(want), "{field}: {err}");
    }
    let s = setup(AdapterKind::SingLora);
    std::fs::write(s.adapter.join("adapter_config.json"), "{ not json").unwrap();
    assert!(merge_err(&s).contains("not valid JSON"));
}

#[test]
fn non_finite_adapter_is_refused() {
    let s = setup(AdapterKind::Lora);
    let mut af = AdapterFile::read(&s.adapter, &Device::Cpu).unwrap();
    let t = &af.layers["model.layers.0.self_attn.q_proj"]["lora_B.weight"];
    let mut v = t.to_vec2::<f32>().unwrap();
    v[3][1] = f32::NAN;
    let bad = Tensor::new(v, &Device::Cpu).unwrap();
    af.layers
        .get_mut("model.layers.0.self_attn.q_proj")
        .unwrap()
        .insert("lora_B.weight".into(), bad.clone());
    // our writer refuses too ...
    let err = af.write(&s.adapter, true).unwrap_err().to_string();
    assert!(
        err.contains("q_proj.lora_B.weight") && err.contains("NaN"),
        "{err}"
    );
    // ... so forge the file directly
    let mut tensors: BTreeMap<String, Tensor> = af.tensors();
    tensors.insert(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".into(),
        bad,
    );
    singlora::checkpoint::write_safetensors(
        &s.adapter.join("adapter_model.safetensors"),
        &tensors,
        None,
    )
    .unwrap();
    let err = merge_err(&s);
    assert!(
        err.contains("q_proj.lora_B.weight") && err.contains("1 NaN"),
        "{err}"
    );
}

#[test]
fn unknown_tensor_in_adapter_is_refused() {
    let s = setup(AdapterKind::SingLora);
    let af = AdapterFile::read(&s.adapter, &Device::Cpu).unwrap();
    let mut tensors = af.tensors();
    tensors.insert(
        "base_model.model.model.layers.0.mlp.up_proj.lora_E".into(),
        Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
    );
    singlora::checkpoint::write_safetensors(
        &s.adapter.join("adapter_model.safetensors"),
        &tensors,
        None,
    )
    .unwrap();
    let err = merge_err(&s);
    assert!(err.contains("lora_E"), "{err}");
}

#[test]
fn existing_output_is_kept_unless_overwrite() {
    let s = setup(AdapterKind::SingLora);
    std::fs::create_dir_all(&s.out).unwrap();
    std::fs::write(s.out.join("precious"), "keep me").unwrap();
    let err = merge_checkpoint(&s.base, &s.adapter, &s.out, &MergeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already exists") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(s.out.join("precious")).unwrap(),
        "keep me"
    );
    // a failing merge with --overwrite keeps the old output too
    let p = s.adapter.join("adapter_model.safetensors");
    std::fs::write(&p, b"garbage").unwrap();
    let opts = MergeOptions {
        overwrite: true,
        dtype: None,
        ..Default::default()
    };
    assert!(merge_checkpoint(&s.base, &s.adapter, &s.out, &opts).is_err());
    assert_eq!(
        std::fs::read_to_string(s.out.join("precious")).unwrap(),
        "keep me"
    );
}

/// The tensor a message names in backquotes, and the element count of that tensor in `ckpt`.
fn named_tensor(err: &str, ckpt: &Checkpoint) -> (String, usize) {
    let name = err.split('`').nth(1).unwrap_or_default().to_string();
    let meta = ckpt
        .meta(&name)
        .unwrap_or_else(|| panic!("`{name}` is no tensor of the base: {err}"));
    (name, meta.shape.iter().product())
}

/// Replaces tensors of the adapter file (keys without the `base_model.model.` prefix).
fn replace_adapter_tensors(dir: &Path, with: &[(&str, Tensor)]) {
    let af = AdapterFile::read(dir, &Device::Cpu).unwrap();
    let mut tensors = af.tensors();
    for (k, t) in with {
        tensors.insert(format!("base_model.model.{k}"), t.clone());
    }
    singlora::checkpoint::write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, None)
        .unwrap();
}

#[test]
fn merge_refuses_values_the_output_dtype_cannot_hold() {
    // a scale finite in f64 and far beyond f32 is refused as a mistake before any merging
    let s = setup(AdapterKind::Lora);
    edit_config(&s.adapter, |v| v["lora_alpha"] = 1e300.into());
    let err = merge_err(&s);
    assert!(err.contains("lora_alpha"), "{err}");

    // adapter values finite in f32 whose product is not: every merged value of the layer
    // overflows (s = 8 / 4 = 2, ΔW = 2 · 4 · 1 · 1e38 = 8e38 everywhere)
    let s = setup(AdapterKind::Lora);
    let module = "model.layers.0.self_attn.q_proj";
    replace_adapter_tensors(
        &s.adapter,
        &[
            (
                &format!("{module}.lora_A.weight"),
                Tensor::ones((4, 16), DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                &format!("{module}.lora_B.weight"),
                (Tensor::ones((16, 4), DType::F32, &Device::Cpu).unwrap() * 1e38).unwrap(),
            ),
        ],
    );
    let err = merge_err(&s);
    let base = Checkpoint::open(&s.base).unwrap();
    let (name, n) = named_tensor(&err, &base);
    assert_eq!(name, format!("{module}.weight"), "{err}");
    assert!(
        err.contains(&format!("{n} of {n}")) && err.contains("f32"),
        "{err}"
    );

    // one base weight of 3e38 pushed past f32's largest value by a uniform ΔW of 1e38
    let s = setup(AdapterKind::Lora);
    let module = "model.layers.0.self_attn.q_proj";
    let mut tensors = TensorFile::open(&s.base.join("model.safetensors"))
        .unwrap()
        .load_all(&Device::Cpu)
        .unwrap();
    let mut w = tensors[&format!("{module}.weight")]
        .to_vec2::<f32>()
        .unwrap();
    w[2][5] = 3e38;
    tensors.insert(
        format!("{module}.weight"),
        Tensor::new(w, &Device::Cpu).unwrap(),
    );
    singlora::checkpoint::write_safetensors(&s.base.join("model.safetensors"), &tensors, None)
        .unwrap();
    // s = 8 / 4 = 2, ΔW = 2 · 4 · 1 · 1.25e37 = 1e38 everywhere
    replace_adapter_tensors(
        &s.adapter,
        &[
            (
                &format!("{module}.lora_A.weight"),
                Tensor::ones((4, 16), DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                &format!("{module}.lora_B.weight"),
                (Tensor::ones((16, 4), DType::F32, &Device::Cpu).unwrap() * 1.25e37).unwrap(),
            ),
        ],
    );
    let err = merge_err(&s);
    assert!(
        err.contains(&format!("`{module}.weight`")) && err.contains("1 of 256"),
        "{err}"
    );

    // SingLoRA entries of 200 merged with --dtype f16: ΔW = s·u·r·200² = 160000 > 65504
    let s = setup(AdapterKind::SingLora);
    let module = "model.layers.1.mlp.up_proj";
    replace_adapter_tensors(
        &s.adapter,
        &[(
            &format!("{module}.singlora_A.weight"),
            (Tensor::ones((24, 4), DType::F32, &Device::Cpu).unwrap() * 200.0).unwrap(),
        )],
    );
    let f16 = MergeOptions {
        overwrite: false,
        dtype: Some(DType::F16),
        ..Default::default()
    };
    let err = merge_err_with(&s, &f16);
    assert!(
        err.contains(&format!("`{module}.weight`")) && err.contains("384 of 384"),
        "{err}"
    );
    assert!(err.contains("f16"), "{err}");

    // a tensor the merge does not touch, out of f16's range after the cast
    let s = setup(AdapterKind::SingLora);
    let mut tensors = TensorFile::open(&s.base.join("model.safetensors"))
        .unwrap()
        .load_all(&Device::Cpu)
        .unwrap();
    let emb = "model.embed_tokens.weight";
    let mut e = tensors[emb].to_vec2::<f32>().unwrap();
    e[0][0] = 1e5;
    e[3][1] = -7e4;
    tensors.insert(emb.into(), Tensor::new(e, &Device::Cpu).unwrap());
    singlora::checkpoint::write_safetensors(&s.base.join("model.safetensors"), &tensors, None)
        .unwrap();
    let err = merge_err_with(&s, &f16);
    assert!(
        err.contains(&format!("`{emb}`")) && err.contains("2 of 512"),
        "{err}"
    );
}

/// A tensor of `dtype` with raw little-endian bytes, written straight through safetensors.
fn forge_adapter_tensor(dir: &Path, key: &str, dtype: safetensors::Dtype, shape: &[usize]) {
    let p = dir.join("adapter_model.safetensors");
    let file = TensorFile::open(&p).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = vec![];
    for name in file.names() {
        let t = file.load(name, &Device::Cpu).unwrap();
        let bytes: Vec<u8> = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        owned.push((
            name.to_string(),
            safetensors::Dtype::F32,
            t.dims().to_vec(),
            bytes,
        ));
    }
    let n: usize = shape.iter().product();
    let bytes: Vec<u8> = (0..n as i32)
        .flat_map(|i| {
            let v = i * 7 - 3;
            match dtype.bitsize() / 8 {
                1 => vec![v as u8],
                2 => (v as i16).to_le_bytes().to_vec(),
                4 => v.to_le_bytes().to_vec(),
                _ => (v as i64).to_le_bytes().to_vec(),
            }
        })
        .collect();
    owned.retain(|(k, ..)| k != key);
    owned.push((key.to_string(), dtype, shape.to_vec(), bytes));
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    drop(file);
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(&p, bytes).unwrap();
}

#[test]
fn adapter_tensors_must_be_float() {
    for (kind, suffix, shape) in [
        (AdapterKind::Lora, "lora_B.weight", [16usize, 4]),
        (AdapterKind::SingLora, "singlora_A.weight", [16, 4]),
    ] {
        for dtype in [
            safetensors::Dtype::I32,
            safetensors::Dtype::I64,
            safetensors::Dtype::U8,
        ] {
            let s = setup(kind);
            let key = format!("base_model.model.model.layers.0.self_attn.q_proj.{suffix}");
            forge_adapter_tensor(&s.adapter, &key, dtype, &shape);
            let err = merge_err(&s);
            assert!(
                err.contains("adapter_model.safetensors")
                    && err.contains(&format!("`{key}`"))
                    && err.contains(&format!("{dtype:?}")),
                "{dtype:?}: {err}"
            );
            // every reader refuses it the same way
            let err = AdapterFile::read(&s.adapter, &Device::Cpu)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("{dtype:?}")), "{err}");
        }
    }
    // a head stored as integers
    let s = setup(AdapterKind::Lora);
    edit_config(&s.adapter, |v| {
        v["modules_to_save"] = serde_json::json!(["score"]);
        v["labels"] = serde_json::json!(["a", "b"]);
    });
    forge_adapter_tensor(
        &s.adapter,
        "base_model.model.score.weight",
        safetensors::Dtype::I32,
        &[2, 16],
    );
    let err = merge_err(&s);
    assert!(
        err.contains("`base_model.model.score.weight`") && err.contains("I32"),
        "{err}"
    );
}

#[test]
fn integer_base_weight_of_an_adapted_layer_is_refused() {
    let s = setup(AdapterKind::Lora);
    let mut tensors = TensorFile::open(&s.base.join("model.safetensors"))
        .unwrap()
        .load_all(&Device::Cpu)
        .unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    tensors.insert(
        name.into(),
        Tensor::ones((16, 24), DType::I64, &Device::Cpu).unwrap(),
    );
    // an integer buffer the merge does not touch is copied unchanged
    let buffer = Tensor::new(&[3i64, -1, 7], &Device::Cpu).unwrap();
    tensors.insert("model.rope_buffer".into(), buffer.clone());
    singlora::checkpoint::write_safetensors(&s.base.join("model.safetensors"), &tensors, None)
        .unwrap();
    let err = merge_err(&s);
    assert!(
        err.contains(&format!("`{name}`"))
            && err.contains("I64")
            && err.contains("model.safetensors"),
        "{err}"
    );

    let s = setup(AdapterKind::Lora);
    let mut tensors = TensorFile::open(&s.base.join("model.safetensors"))
        .unwrap()
        .load_all(&Device::Cpu)
        .unwrap();
    tensors.insert("model.rope_buffer".into(), buffer.clone());
    singlora::checkpoint::write_safetensors(&s.base.join("model.safetensors"), &tensors, None)
        .unwrap();
    for dtype in [None, Some(DType::BF16)] {
        let out = s.out.with_extension(format!("{dtype:?}"));
        let opts = MergeOptions {
            overwrite: false,
            dtype,
            ..Default::default()
        };
        merge_checkpoint(&s.base, &s.adapter, &out, &opts).unwrap();
        let m = Checkpoint::open(&out).unwrap();
        let got = m.load("model.rope_buffer", &Device::Cpu).unwrap();
        assert_eq!(got.dtype(), DType::I64);
        assert_eq!(got.to_vec1::<i64>().unwrap(), vec![3, -1, 7]);
    }
}

/// Removes the tensors of `module` from an adapter file, leaving its config as it is.
fn drop_layer_from_file(dir: &Path, module: &str) {
    let af = AdapterFile::read(dir, &Device::Cpu).unwrap();
    let prefix = format!("base_model.model.{module}.");
    let tensors: BTreeMap<String, Tensor> = af
        .tensors()
        .into_iter()
        .filter(|(k, _)| !k.starts_with(&prefix))
        .collect();
    singlora::checkpoint::write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, None)
        .unwrap();
}

/// Every way an adapter directory is read refuses it with `want` in the message: merge,
/// export-lora, inspect and the loader behind eval and predict.
fn refused_everywhere(s: &Setup, want: &[&str]) {
    let check = |what: &str, err: String| {
        for w in want {
            assert!(err.contains(w), "{what}: `{w}` not in: {err}");
        }
    };
    check("merge", merge_err(s));
    let out = s.out.with_file_name("exported");
    let err = singlora::adapter::export::export_lora(&s.adapter, &out, Some(&s.base), false);
    if let Err(e) = err {
        check("export-lora", e.to_string());
    } else {
        panic!("export-lora accepted the adapter");
    }
    assert!(!out.exists());
    match singlora::inspect::inspect(&s.adapter, Some(&s.base)) {
        Err(e) => check("inspect", e.to_string()),
        Ok(_) => panic!("inspect accepted the adapter"),
    }
    match AdapterFile::read(&s.adapter, &Device::Cpu) {
        Err(e) => check("AdapterFile::read", e.to_string()),
        Ok(_) => panic!("the loader accepted the adapter"),
    }
}

#[test]
fn adapter_config_and_file_must_name_the_same_layers() {
    // layer_shapes lists 14 layers, the file holds 13
    let s = setup(AdapterKind::SingLora);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(s.adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["layer_shapes"].as_object().unwrap().len(), 14);
    let missing = "model.layers.1.self_attn.v_proj";
    drop_layer_from_file(&s.adapter, missing);
    refused_everywhere(
        &s,
        &[
            &format!("`{missing}`"),
            "layer_shapes",
            "adapter_model.safetensors",
        ],
    );

    // the file holds a layer layer_shapes does not list
    let s = setup(AdapterKind::SingLora);
    let extra = "model.layers.0.mlp.gate_proj";
    edit_config(&s.adapter, |v| {
        v["layer_shapes"].as_object_mut().unwrap().remove(extra);
    });
    refused_everywhere(
        &s,
        &[&format!("`{extra}`"), "layer_shapes", "adapter_config.json"],
    );

    // a LoRA file with a layer its target_modules do not select
    let s = setup(AdapterKind::Lora);
    edit_config(&s.adapter, |v| {
        v["target_modules"] = serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj"]);
    });
    refused_everywhere(
        &s,
        &[
            "`model.layers.0.mlp.down_proj`",
            "target_modules",
            "adapter_config.json",
        ],
    );
    // ... or that exclude_modules leaves out
    let s = setup(AdapterKind::Dora);
    edit_config(&s.adapter, |v| {
        v["exclude_modules"] = serde_json::json!(["layers.1.mlp.up_proj"]);
    });
    refused_everywhere(
        &s,
        &[
            "`model.layers.1.mlp.up_proj`",
            "target_modules",
            "adapter_config.json",
        ],
    );

    // modules_to_save names a head the file does not hold
    let s = setup(AdapterKind::Lora);
    edit_config(&s.adapter, |v| {
        v["modules_to_save"] = serde_json::json!(["score"]);
        v["labels"] = serde_json::json!(["a", "b"]);
    });
    refused_everywhere(&s, &["`score`", "modules_to_save"]);
}

#[cfg(unix)]
#[path = "support/modes.rs"]
mod modes;

#[cfg(unix)]
#[test]
fn outputs_are_readable_as_the_umask_allows() {
    use modes::{assert_default_modes, expected_modes};
    let tmp = tempfile::tempdir().unwrap();
    let modes = expected_modes(tmp.path());
    let base = tmp.path().join("base");
    let shape = tiny_base(&base, DType::F32, 2);
    assert_default_modes(&base, modes);
    let adapter = tmp.path().join("adapter");
    adapter_for(&shape, AdapterKind::SingLora, 3, 4)
        .write(&adapter, false)
        .unwrap();
    assert_default_modes(&adapter, modes);
    let out = tmp.path().join("merged");
    merge_checkpoint(&base, &adapter, &out, &MergeOptions::default()).unwrap();
    assert_default_modes(&out, modes);
    let lora = tmp.path().join("lora");
    singlora::adapter::export::export_lora(&adapter, &lora, None, false).unwrap();
    assert_default_modes(&lora, modes);
    // a single file written in place
    let single = tmp.path().join("single.safetensors");
    singlora::checkpoint::write_safetensors(
        &single,
        &BTreeMap::from([(
            "x".to_string(),
            Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
        )]),
        None,
    )
    .unwrap();
    assert_eq!(modes::mode(&single), modes.0);
}

/// `fan_in_fan_out` (weights stored transposed, as GPT-2's Conv1D) cannot describe a LLaMA
/// weight: merging or loading such an adapter onto a LLaMA model is refused, naming a layer.
#[test]
fn fan_in_fan_out_on_llama_weights_is_refused() {
    for kind in [AdapterKind::SingLora, AdapterKind::Lora] {
        let s = setup(kind);
        edit_config(&s.adapter, |v| v["fan_in_fan_out"] = true.into());
        let err = merge_err(&s);
        assert!(
            err.contains("fan_in_fan_out") && err.contains("model.layers.0."),
            "{err}"
        );
        singlora::synthetic::write_tokenizer(
            &s.base,
            &["a", "b"],
            singlora::tokenize::TokenizerStyle::Llama,
        )
        .unwrap();
        let err = match singlora::session::Session::load(&s.base, &s.adapter, Device::Cpu) {
            Ok(_) => panic!("{kind}: an adapter with fan_in_fan_out was loaded onto LLaMA"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("adapter_config.json") && err.contains("fan_in_fan_out"),
            "{err}"
        );
    }
}
