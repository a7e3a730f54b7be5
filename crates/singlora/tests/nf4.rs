//! NF4 frozen weights (`--base-dtype nf4`): the quantisation against bitsandbytes' own
//! (tests/fixtures/nf4, made by its make_nf4_golden.py), adapters on a quantised base against
//! the same base dequantised, and training runs on one.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use singlora::linear::FrozenLinear;
use singlora::quant::nf4::{dynamic_map, Nf4Tensor, NF4_LEVELS};

mod common;
use common::{max_abs, max_abs_diff};

fn fixture() -> std::collections::HashMap<String, Tensor> {
    let p: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/nf4/nf4.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn vec_u8(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn code_books_are_bitsandbytes() {
    let f = fixture();
    assert_eq!(vec_f32(&f["nf4_code"]), NF4_LEVELS.to_vec());
    // bitsandbytes builds its map in f32 arithmetic, this one in f64 rounded once: they may
    // differ in the last bit
    let theirs = vec_f32(&f["dynamic_code"]);
    for (i, (a, b)) in dynamic_map().iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() <= 1.5 * f32::EPSILON * b.abs(),
            "dynamic map {i}: {a} against {b}"
        );
    }
}

#[test]
fn quantisation_matches_bitsandbytes() {
    let f = fixture();
    for case in ["a", "b"] {
        let w = &f[&format!("{case}.weight")];
        let q = Nf4Tensor::from_tensor(w).unwrap();
        let (codes, absmax_codes, scales, offset) = q.parts();
        let want_offset = vec_f32(&f[&format!("{case}.offset")])[0];
        assert!(
            (offset - want_offset).abs() <= 1e-6 * want_offset,
            "{case}: offset {offset} against {want_offset}"
        );
        let want_scales = vec_f32(&f[&format!("{case}.absmax_scales")]);
        assert_eq!(scales.len(), want_scales.len(), "{case}: groups");
        for (a, b) in scales.iter().zip(&want_scales) {
            assert!(
                (a - b).abs() <= 1e-6 * b,
                "{case}: group scale {a} against {b}"
            );
        }
        // a scale's code may differ by one where ours is the nearer map value (bitsandbytes'
        // search does not always land on the nearest); those blocks are left out below
        let want_absmax = vec_u8(&f[&format!("{case}.absmax_codes")]);
        assert_eq!(absmax_codes.len(), want_absmax.len());
        let map = dynamic_map();
        let values = vec_f32(w);
        let mut tied = vec![];
        for (b, (&a, &t)) in absmax_codes.iter().zip(&want_absmax).enumerate() {
            if a == t {
                continue;
            }
            let amax = values[b * 64..((b + 1) * 64).min(values.len())]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            let x = (amax - offset) / scales[b / 256];
            let (ours, theirs) = (map[a as usize], map[t as usize]);
            assert!(
                a.abs_diff(t) == 1 && (x - ours).abs() <= (x - theirs).abs(),
                "{case}: block {b}: {x} coded {a} ({ours}) against bitsandbytes' {t} ({theirs})"
            );
            tied.push(b);
        }
        assert!(
            tied.len() * 100 <= absmax_codes.len(),
            "{case}: {} ties",
            tied.len()
        );
        let want_codes = vec_u8(&f[&format!("{case}.codes")]);
        assert_eq!(codes.len(), want_codes.len(), "{case}: packed length");
        let got = q.dequantize();
        let want = vec_f32(&f[&format!("{case}.dequantized")]);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut compared = 0;
        for i in (0..values.len()).filter(|i| !tied.contains(&(i / 64))) {
            let (ours, theirs) = (codes[i / 2], want_codes[i / 2]);
            let nibble = |c: u8| if i % 2 == 0 { c >> 4 } else { c & 15 };
            assert_eq!(nibble(ours), nibble(theirs), "{case}: value {i}'s code");
            assert!(
                (got[i] - want[i]).abs() <= 1e-6 * scale,
                "{case}: value {i}: {} against {}",
                got[i],
                want[i]
            );
            compared += 1;
        }
        assert!(
            compared * 100 >= values.len() * 99,
            "{case}: {compared} values compared"
        );
    }
}

/// A layer on an NF4 weight computes what a dense layer on the dequantised weight computes,
/// forward and the input's gradient, and gives the weight no gradient.
#[test]
fn nf4_linear_is_the_dequantised_linear() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.1, (48, 70), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.1, 48, &dev).unwrap();
    let mut q = FrozenLinear::new(w.clone(), Some(b.clone()));
    q.quantize_nf4().unwrap();
    assert!(q.is_quantized() && q.dims() == (48, 70));
    assert!(
        q.weight_bytes() * 7 < 48 * 70 * 4,
        "{} bytes",
        q.weight_bytes()
    );
    let dense = FrozenLinear::new(q.weight().unwrap(), Some(b));
    let x = Var::randn(0f32, 1.0, (3, 5, 70), &dev).unwrap();
    let (yq, yd) = (q.forward(&x).unwrap(), dense.forward(&x).unwrap());
    let diff = max_abs_diff(&yq, &yd);
    assert!(diff < 1e-5, "forward {diff}");
    let g = Tensor::randn(0f32, 1.0, yq.dims(), &dev).unwrap();
    let gq = (yq * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let gd = (yd * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let (a, b) = (gq.get(&x).unwrap(), gd.get(&x).unwrap());
    let diff = max_abs_diff(a, b);
    assert!(diff < 1e-5, "input gradient {diff}");
    // and the quantisation is close to the weight it came from (4 bits: a few % of its scale)
    let err = max_abs_diff(&q.weight().unwrap(), &w);
    let amax = max_abs(&w);
    assert!(
        err < 0.2 * amax && err > 0.0,
        "quantisation error {err} of {amax}"
    );
}

/// The weights and config of the tiny decoder `name` of tests/fixtures/decoders.
fn decoder_parts(
    name: &str,
) -> (
    singlora::model::weights::Weights,
    singlora::model::llama::LlamaConfig,
) {
    use singlora::checkpoint::Checkpoint;
    use singlora::model::llama::Llama;
    use singlora::model::weights::{ConfigReader, Weights};
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/decoders")
        .join(name);
    let path = d.join("config.json");
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cfg = Llama::config(&ConfigReader {
        path: &path,
        value: &value,
    })
    .unwrap();
    (Weights::Checkpoint(Checkpoint::open(&d).unwrap()), cfg)
}

fn decoder_fixture(name: &str) -> singlora::model::llama::Llama {
    let (w, cfg) = decoder_parts(name);
    singlora::model::llama::Llama::load(&w, cfg, DType::F32, &Device::Cpu).unwrap()
}

/// Every method's loss and adapter gradients on an NF4 base equal those on the same base
/// dequantised into dense weights (Qwen3 and GPT-2 layouts).
#[test]
fn adapters_on_an_nf4_base_train_as_on_its_dequantised_weights() {
    use singlora::model::Body;
    for family in ["qwen3", "gpt2"] {
        for method in ["singlora", "lora", "dora"] {
            let mut quantised = Body::Llama(decoder_fixture(family));
            let (after, before) = quantised.quantize_nf4().unwrap();
            assert!(after * 6 < before, "{family}: {after} bytes from {before}");
            let mut dense = Body::Llama(decoder_fixture(family));
            for (d, q) in dense.linears_mut().into_iter().zip(quantised.linears()) {
                assert_eq!(d.name(), q.name());
                if q.base().is_quantized() {
                    d.base_mut().set_weight(q.base().weight().unwrap());
                }
            }
            let (q, d) = (
                common::sft_with_adapters(quantised, method),
                common::sft_with_adapters(dense, method),
            );
            let ids: Vec<u32> = (0..10).map(|i| (i * 7 + 3) % 40).collect();
            common::assert_same_loss_and_grads(&q, &d, &ids, &format!("{family} {method}"));
        }
    }
}

/// Quantising each linear weight as it loads (`Weights::Nf4`, what `--base-dtype nf4` does)
/// gives the model that quantising after loading gives: the same layers quantised, to the same
/// values, and a model's own vocabulary projection left dense (Qwen3 with its own head, Phi-3's
/// fused projections).
#[test]
fn quantising_while_loading_equals_quantising_after() {
    use singlora::model::llama::Llama;
    use singlora::model::weights::Weights;
    use singlora::model::Body;
    for family in ["qwen3", "phi3"] {
        let (w, cfg) = decoder_parts(family);
        let w = Weights::Nf4(Box::new(w));
        assert!(w.quantizes_nf4());
        let while_loading = Body::Llama(Llama::load(&w, cfg, DType::F32, &Device::Cpu).unwrap());
        let mut after = Body::Llama(decoder_fixture(family));
        after.quantize_nf4().unwrap();
        let (a, b) = (while_loading.linears(), after.linears());
        assert_eq!(a.len(), b.len());
        let mut quantised = 0;
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.name(), y.name());
            assert_eq!(
                x.base().is_quantized(),
                y.base().is_quantized(),
                "{family}: {}",
                x.name()
            );
            if x.name() == "lm_head" {
                assert!(!x.base().is_quantized(), "{family}: the head was quantised");
            }
            if x.base().is_quantized() {
                quantised += 1;
                assert_eq!(x.base().weight_bytes(), y.base().weight_bytes());
                assert_eq!(
                    vec_f32(&x.base().weight().unwrap()),
                    vec_f32(&y.base().weight().unwrap()),
                    "{family}: {}",
                    x.name()
                );
            }
        }
        assert!(quantised >= 4, "{family}: {quantised} layers quantised");
    }
}
