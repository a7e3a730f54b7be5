//! The frozen parts of a Stable Diffusion pipeline against what diffusers and transformers
//! compute on the same tiny components (`scripts/make_sd_parts_fixture.py` wrote them and the
//! expected outputs into `tests/fixtures/sd_parts/`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use singlora::diffusion::schedule::{guide, sampler, NoiseSchedule, PredictionType, SamplerKind};
use singlora::diffusion::text::{ClipTokenizer, TextEncoder};
use singlora::diffusion::vae::Vae;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd_parts")
}

fn expected_json() -> Value {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn expected_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("expected.safetensors"), &Device::Cpu).unwrap()
}

/// max |a − b| / max(1, max |b|): absolute error for values of order one, relative for large.
fn scaled_err(a: &Tensor, b: &Tensor) -> f32 {
    err_at_scale(a, b, 1.0)
}

/// max |a − b| / max(floor, max |b|).
fn err_at_scale(a: &Tensor, b: &Tensor, floor: f32) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let a: Vec<f32> = a.to_vec1().unwrap();
    let b: Vec<f32> = b.to_vec1().unwrap();
    let scale = b.iter().fold(floor, |m, x| m.max(x.abs()));
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err.is_finite(), "non-finite output");
    err / scale
}

fn scheduler_config(name: &str) -> (Value, PathBuf) {
    let path = fixture().join("scheduler").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap();
    (serde_json::from_str(&text).unwrap(), path)
}

const CONFIGS: &[&str] = &["sd15", "zero_snr", "cosine"];

#[test]
fn schedule_training_quantities_match_diffusers() {
    let exp = expected_tensors();
    let json = expected_json();
    let t: Vec<usize> = serde_json::from_value(json["sched_t"].clone()).unwrap();
    let (x0, noise) = (&exp["sched.x0"], &exp["sched.noise"]);
    let mut worst = [0f32; 3];
    for name in CONFIGS {
        let (cfg, path) = scheduler_config(name);
        let s = NoiseSchedule::from_config(&cfg, &path).unwrap();
        let acp = Tensor::new(s.alphas_cumprod(), &Device::Cpu).unwrap();
        let errs = [
            scaled_err(&acp, &exp[&format!("sched.{name}.alphas_cumprod")]),
            scaled_err(
                &s.add_noise(x0, noise, &t).unwrap(),
                &exp[&format!("sched.{name}.add_noise")],
            ),
            scaled_err(
                &s.velocity(x0, noise, &t).unwrap(),
                &exp[&format!("sched.{name}.velocity")],
            ),
        ];
        for (w, e) in worst.iter_mut().zip(errs) {
            *w = w.max(e);
        }
        let target = s.target(x0, noise, &t).unwrap();
        let want = match s.prediction_type {
            PredictionType::Epsilon => noise.clone(),
            PredictionType::VPrediction => s.velocity(x0, noise, &t).unwrap(),
        };
        assert_eq!(scaled_err(&target, &want), 0.0);
        let snr: Vec<f64> =
            serde_json::from_value(json[&format!("sched.{name}.snr")].clone()).unwrap();
        for (&ti, want) in t.iter().zip(snr) {
            let got = s.snr(ti).unwrap();
            // ᾱ in f64 here, f32 in diffusers: 1 − ᾱ loses 2⁻²⁴/(1 − ᾱ) of its precision there
            let ab = s.alphas_cumprod()[ti];
            assert!(
                (got - want).abs() <= (2e-5 + 1.2e-7 / (1.0 - ab)) * want,
                "{name}: snr({ti}) = {got}, diffusers {want}"
            );
            let gamma = 5.0;
            let w = s.min_snr_weight(ti, gamma).unwrap();
            let expect = match s.prediction_type {
                PredictionType::Epsilon if got == 0.0 => 1.0,
                PredictionType::Epsilon => got.min(gamma) / got,
                PredictionType::VPrediction => got.min(gamma) / (got + 1.0),
            };
            assert_eq!(w, expect);
        }
    }
    eprintln!(
        "max scaled error: alphas_cumprod {:.2e}, add_noise {:.2e}, velocity {:.2e}",
        worst[0], worst[1], worst[2]
    );
    assert!(worst.iter().all(|&e| e < 1e-5), "{worst:?}");
}

#[test]
fn samplers_match_diffusers_for_every_spacing_and_prediction() {
    let exp = expected_tensors();
    let json = expected_json();
    let steps = json["sched_steps"].as_u64().unwrap() as usize;
    let (x_init, outs) = (&exp["sched.x_init"], &exp["sched.model_outs"]);
    let mut worst: HashMap<&str, (f32, f32, f64)> = HashMap::new();
    for case in json["sampler_cases"].as_array().unwrap() {
        let (mut cfg, path) = scheduler_config(case["config"].as_str().unwrap());
        cfg["prediction_type"] = case["prediction_type"].clone();
        if !case["timestep_spacing"].is_null() {
            cfg["timestep_spacing"] = case["timestep_spacing"].clone();
        }
        let schedule = NoiseSchedule::from_config(&cfg, &path).unwrap();
        let kind: SamplerKind = case["sampler"].as_str().unwrap().parse().unwrap();
        let mut s = sampler(kind, &schedule, steps).unwrap();
        let want_t: Vec<f64> = serde_json::from_value(case["timesteps"].clone()).unwrap();
        assert_eq!(s.timesteps(), want_t.as_slice(), "{case}");
        let want_sigma = case["init_noise_sigma"].as_f64().unwrap();
        let sigma_err = (s.init_noise_sigma() - want_sigma).abs() / want_sigma;
        let mut x = (x_init * s.init_noise_sigma()).unwrap();
        let mut first = None;
        for i in 0..steps {
            let xin = s.scale_input(&x, i).unwrap();
            let out = (outs.get(i).unwrap() + (xin * 0.1).unwrap()).unwrap();
            x = s.step(&out, i, &x).unwrap();
            first.get_or_insert_with(|| x.clone());
        }
        let key = case["key"].as_str().unwrap();
        // diffusers steps in f32 from a sample of size σ_max, which bounds its rounding error
        let floor = want_sigma as f32
            * x_init
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
        let e_first = err_at_scale(
            &first.unwrap(),
            &exp[&format!("{key}.first")],
            floor.max(1.0),
        );
        let e_final = err_at_scale(&x, &exp[&format!("{key}.final")], floor.max(1.0));
        assert!(
            e_first < 2e-5 && e_final < 2e-5 && sigma_err < 1e-5,
            "{key}: first step {e_first:.2e}, final {e_final:.2e}, init sigma {sigma_err:.2e}"
        );
        let w = worst.entry(if kind == SamplerKind::Ddim {
            "ddim"
        } else {
            "euler"
        });
        let w = w.or_default();
        *w = (w.0.max(e_first), w.1.max(e_final), w.2.max(sigma_err));
    }
    eprintln!(
        "{} cases; max scaled error (first step, after all steps, init_noise_sigma): {worst:?}",
        json["sampler_cases"].as_array().unwrap().len()
    );
}

#[test]
fn guidance_mixes_predictions() {
    let d = Device::Cpu;
    let u = Tensor::new(&[1f32, 2.0], &d).unwrap();
    let c = Tensor::new(&[3f32, 0.0], &d).unwrap();
    let g: Vec<f32> = guide(&u, &c, 7.5).unwrap().to_vec1().unwrap();
    assert_eq!(g, vec![1.0 + 7.5 * 2.0, 2.0 - 7.5 * 2.0]);
    assert_eq!("euler".parse::<SamplerKind>().unwrap(), SamplerKind::Euler);
    assert!("dpm".parse::<SamplerKind>().is_err());
}

#[test]
fn unknown_beta_schedule_names_the_file_and_field() {
    let path = fixture().join("scheduler/bad_beta.json");
    let err = NoiseSchedule::from_dir(&path).unwrap_err().to_string();
    assert!(
        err.contains("bad_beta.json") && err.contains("beta_schedule") && err.contains("sigmoid"),
        "{err}"
    );
    let (mut cfg, path) = scheduler_config("sd15");
    cfg["_class_name"] = "FlowMatchEulerDiscreteScheduler".into();
    let err = NoiseSchedule::from_config(&cfg, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("_class_name"), "{err}");
    let (mut cfg, path) = scheduler_config("sd15");
    cfg["use_karras_sigmas"] = true.into();
    let s = NoiseSchedule::from_config(&cfg, &path).unwrap();
    assert!(sampler(SamplerKind::Ddim, &s, 10).is_ok());
    let err = sampler(SamplerKind::Euler, &s, 10)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("use_karras_sigmas"), "{err}");
    assert!(sampler(SamplerKind::Ddim, &s, 1001).is_err());
}

#[test]
fn clip_tokenizers_match_transformers() {
    let json = expected_json();
    let prompts: Vec<&str> = json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    // tokenizer/: vocab.json + merges.txt, pads with <|endoftext|>; tokenizer_2/: tokenizer.json,
    // pads with "!"
    for (folder, key) in [
        ("tokenizer", "tokenizer_ids"),
        ("tokenizer_2", "tokenizer_2_ids"),
    ] {
        let tok = ClipTokenizer::load(&fixture().join(folder)).unwrap();
        let want: Vec<Vec<u32>> = serde_json::from_value(json[key].clone()).unwrap();
        let got = tok.encode(&prompts).unwrap();
        for ((p, g), w) in prompts.iter().zip(&got).zip(&want) {
            assert_eq!(g.len(), 77);
            assert_eq!(g, w, "{folder}: {p:?}");
        }
    }
}

#[test]
fn clip_text_encoders_match_transformers() {
    let exp = expected_tensors();
    for name in ["text_encoder", "text_encoder_2"] {
        let enc = TextEncoder::load(&fixture().join(name), DType::F32, &Device::Cpu).unwrap();
        let ids = exp[&format!("{name}.ids")].to_dtype(DType::U32).unwrap();
        let out = enc.encode(&ids).unwrap();
        let errs = [
            scaled_err(&out.last_hidden, &exp[&format!("{name}.last_hidden")]),
            scaled_err(&out.penultimate, &exp[&format!("{name}.penultimate")]),
            scaled_err(&out.pooled, &exp[&format!("{name}.pooled")]),
        ];
        eprintln!(
            "{name}: max error last_hidden {:.2e}, penultimate {:.2e}, pooled {:.2e}",
            errs[0], errs[1], errs[2]
        );
        assert!(errs.iter().all(|&e| e < 1e-5), "{name}: {errs:?}");
    }
}

#[test]
fn vae_matches_diffusers() {
    let exp = expected_tensors();
    let vae = Vae::load(&fixture().join("vae"), DType::F32, &Device::Cpu).unwrap();
    let scale = vae.config().scaling_factor;
    assert_eq!(scale, 0.13025);
    let latents = vae.encode(&exp["vae.images"], None).unwrap();
    let e_mean = scaled_err(&latents, &exp["vae.latents"]);
    // a draw: mean + σ·n with n from the caller's generator
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut twin = rng.clone();
    let drawn = vae.encode(&exp["vae.images"], Some(&mut rng)).unwrap();
    let n: Vec<f32> = (0..latents.elem_count())
        .map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut twin))
        .collect();
    let n = Tensor::from_vec(n, latents.shape(), &Device::Cpu).unwrap();
    let want = (&exp["vae.latents"] + (exp["vae.std"].mul(&n).unwrap() * scale).unwrap()).unwrap();
    let e_sample = scaled_err(&drawn, &want);
    let decoded = vae.decode(&exp["vae.decode_in"]).unwrap();
    let e_decode = scaled_err(&decoded, &exp["vae.decoded"]);
    eprintln!("vae: max error encode mean {e_mean:.2e}, encode sample {e_sample:.2e}, decode {e_decode:.2e}");
    assert!(e_mean < 1e-5 && e_sample < 1e-5 && e_decode < 1e-5);
}

/// A copy of fixture folder `name` whose tensors `edit` changed.
fn edited_copy(
    name: &str,
    edit: impl Fn(&mut std::collections::BTreeMap<String, Tensor>),
) -> tempfile::TempDir {
    let src = fixture().join(name);
    let dir = tempfile::tempdir().unwrap();
    let file = ["model.safetensors", "diffusion_pytorch_model.safetensors"]
        .into_iter()
        .find(|f| src.join(f).exists())
        .unwrap();
    let mut tensors: std::collections::BTreeMap<String, Tensor> =
        candle_core::safetensors::load(src.join(file), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    edit(&mut tensors);
    singlora::checkpoint::write_safetensors(&dir.path().join(file), &tensors, None).unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    dir
}

#[test]
fn vae_reads_the_old_attention_names() {
    let exp = expected_tensors();
    let renamed = edited_copy("vae", |t| {
        for (new, old) in [
            ("to_q", "query"),
            ("to_k", "key"),
            ("to_v", "value"),
            ("to_out.0", "proj_attn"),
        ] {
            for part in ["encoder", "decoder"] {
                for p in ["weight", "bias"] {
                    let from = format!("{part}.mid_block.attentions.0.{new}.{p}");
                    let v = t.remove(&from).unwrap();
                    t.insert(format!("{part}.mid_block.attentions.0.{old}.{p}"), v);
                }
            }
        }
    });
    let vae = Vae::load(renamed.path(), DType::F32, &Device::Cpu).unwrap();
    let latents = vae.encode(&exp["vae.images"], None).unwrap();
    assert!(scaled_err(&latents, &exp["vae.latents"]) < 1e-5);
}

#[test]
fn missing_or_extra_tensors_are_named() {
    let gone = "decoder.up_blocks.0.resnets.1.conv1.weight";
    let dir = edited_copy("vae", |t| {
        t.remove(gone);
    });
    let err = Vae::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(gone), "{err}");

    let gone = "text_model.encoder.layers.2.mlp.fc2.bias";
    let dir = edited_copy("text_encoder_2", |t| {
        t.remove(gone);
    });
    let err = TextEncoder::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(gone), "{err}");

    let extra = "text_model.encoder.layers.3.mlp.fc2.bias";
    let dir = edited_copy("text_encoder_2", |t| {
        let v = t["text_model.encoder.layers.2.mlp.fc2.bias"].clone();
        t.insert(extra.into(), v);
    });
    let err = TextEncoder::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(extra), "{err}");

    let dir = edited_copy("vae", |_| {});
    let config = dir.path().join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    v["latents_mean"] = serde_json::json!([0.1, 0.2, 0.3, 0.4]);
    std::fs::write(&config, v.to_string()).unwrap();
    let err = Vae::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("latents_mean"),
        "{err}"
    );
}
