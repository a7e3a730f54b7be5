//! Stable Diffusion end to end on tiny pipelines that diffusers made
//! (`scripts/make_tiny_pipeline.py`, `scripts/make_lora_step_fixture.py`): sampling against
//! diffusers' pipelines, a LoRA loss and its gradients against diffusers + PEFT, DreamBooth
//! training that lowers the loss, bit-identical resume, and the files diffusers, ComfyUI and
//! `merge` consume.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use singlora::adapter::file::AdapterFile;
use singlora::diffusion::config::DiffusionConfig;
use singlora::diffusion::pipeline::{GenerateRequest, Pipeline};
use singlora::diffusion::schedule::SamplerKind;
use singlora::diffusion::train::{resume, train, DiffusionResume, QuietDiffusion};

mod common;
use common::{max_abs, max_abs_diff};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

fn load_expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn request(sampler: SamplerKind) -> GenerateRequest {
    GenerateRequest {
        prompts: vec!["a photo of sks dog".into(), "a red cat".into()],
        negative: String::new(),
        seeds: vec![0, 1],
        steps: 4,
        guidance: 7.5,
        sampler,
        size: 32,
    }
}

fn check_sampling(pipeline: &str) {
    let pipe = Pipeline::load(&fixture(pipeline), DType::F32, &Device::Cpu).unwrap();
    let expected = load_expected(&format!("{pipeline}.expected.safetensors"));
    let latents = &expected["latents"];
    for (name, sampler) in [("ddim", SamplerKind::Ddim), ("euler", SamplerKind::Euler)] {
        let got = pipe.generate_from(&request(sampler), latents).unwrap();
        let want = &expected[&format!("images.{name}")];
        assert_eq!(got.dims(), want.dims());
        let err = max_abs_diff(&got, want);
        assert!(
            err < 5e-4,
            "{pipeline} {name}: max |ours − diffusers| = {err}"
        );
    }
}

#[test]
fn sd_sampling_matches_diffusers() {
    check_sampling("sd-tiny");
}

#[test]
fn sdxl_sampling_matches_diffusers() {
    check_sampling("sd-tiny-xl");
}

#[test]
fn seeds_fix_the_images() {
    let pipe = Pipeline::load(&fixture("sd-tiny"), DType::F32, &Device::Cpu).unwrap();
    let mut req = request(SamplerKind::Ddim);
    req.steps = 2;
    let a = pipe.generate(&req).unwrap();
    let b = pipe.generate(&req).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    req.seeds = vec![5, 6];
    let c = pipe.generate(&req).unwrap();
    assert!(max_abs_diff(&a, &c) > 1e-2);
    req.size = 18;
    let e = pipe.generate(&req).unwrap_err().to_string();
    assert!(e.contains("image size 18"), "{e}");
}

/// One LoRA loss and every adapter gradient, against torch autograd through diffusers' U-Net
/// with PEFT's LoRA layers.
#[test]
fn lora_loss_and_gradients_match_peft() {
    let mut pipe = Pipeline::load(&fixture("sd-tiny"), DType::F32, &Device::Cpu).unwrap();
    let dir = fixture("lora-step");
    pipe.load_adapter(&dir.join("adapter")).unwrap();
    let io = load_expected("lora-step/io.safetensors");
    let ts: Vec<usize> = io["t"]
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&t| t as usize)
        .collect();
    let xt = pipe.schedule.add_noise(&io["x0"], &io["eps"], &ts).unwrap();
    let pred = pipe.unet.forward(&xt, &io["t"], &io["ctx"], None).unwrap();
    let loss = (pred - &io["eps"])
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let want = io["loss"].to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got - want).abs() < 1e-5 * want.abs().max(1.0),
        "loss {got} vs {want}"
    );
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for l in pipe.unet.linears() {
        let Some(a) = l.adapter() else { continue };
        for p in a.params() {
            let key = format!("grad.{}.{}", l.name(), p.suffix);
            let want = &io[&key];
            let got = grads.get(p.var.as_tensor()).expect("a gradient");
            let scale = max_abs(want);
            let err = max_abs_diff(got, want);
            assert!(
                err <= 1e-4 * scale.max(1e-6),
                "{key}: max err {err} (scale {scale})"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 64, "32 layers × (A, B)");
}

/// A folder of `n` small distinct images.
fn instance_images(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for k in 0..n {
        let img = image::RgbImage::from_fn(40, 36, |x, y| {
            let v = ((x * (k as u32 + 1) * 5 + y * 3) % 256) as u8;
            image::Rgb([v, 255 - v, ((x + y) * 4 % 256) as u8])
        });
        img.save(dir.join(format!("img-{k}.png"))).unwrap();
    }
    std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
}

fn config(model: &Path, images: &Path, method: &str) -> DiffusionConfig {
    let mut cfg = DiffusionConfig {
        model: model.to_path_buf(),
        instance_images: images.to_path_buf(),
        instance_prompt: "a photo of sks dog".into(),
        rank: 4,
        alpha: 4.0,
        lr: Some(2e-3),
        max_steps: 6,
        batch_size: 2,
        sample_every: 0,
        sample_steps: 2,
        samples_per_prompt: 2,
        ..Default::default()
    };
    cfg.method = method.parse().unwrap();
    cfg
}

fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let af = AdapterFile::read(dir, &Device::Cpu).unwrap();
    af.tensors()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn dreambooth_run_writes_every_output_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("subject");
    instance_images(&images, 3);
    let model = fixture("sd-tiny");
    let cfg = config(&model, &images, "singlora");

    let full = tmp.path().join("full");
    let s = train(cfg.clone(), &full, false, &QuietDiffusion).unwrap();
    assert_eq!(s.steps, 6);
    assert!(!s.interrupted);
    for f in [
        "run.json",
        "metrics.jsonl",
        "curves.svg",
        "adapter_config.json",
        "adapter_model.safetensors",
        "pytorch_lora_weights.safetensors",
        "lora_kohya.safetensors",
        "samples/step-000000.png",
        "samples/step-000006.png",
    ] {
        assert!(full.join(f).is_file(), "{f} missing");
    }
    let grid = image::open(full.join("samples/step-000006.png")).unwrap();
    assert_eq!(
        (grid.width(), grid.height()),
        (64, 32),
        "2 samples of 32 px side by side"
    );
    let lines = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6);

    let part = tmp.path().join("part");
    let mut c = cfg.clone();
    c.stop_after = Some(2);
    let s = train(c, &part, false, &QuietDiffusion).unwrap();
    assert!(s.interrupted);
    assert_eq!(s.steps, 2);
    let s = resume(&part, &DiffusionResume::default(), &QuietDiffusion).unwrap();
    assert_eq!(s.steps, 6);
    assert_eq!(adapter_tensors(&full), adapter_tensors(&part));

    // an existing run is not replaced without --overwrite
    let e = train(cfg, &full, false, &QuietDiffusion)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
}

/// The mean denoising loss of the subject images over fixed (t, ε) draws, with the pipeline
/// as it is.
fn fixed_loss(pipe: &Pipeline, images: &Path) -> f32 {
    let files = singlora::diffusion::images::list_images(images).unwrap();
    let mut total = 0.0;
    let mut n = 0;
    let cond = pipe
        .encode(&["a photo of sks dog".to_string()], 32)
        .unwrap();
    for (i, f) in files.iter().enumerate() {
        let img = singlora::diffusion::images::load_square(f, 32).unwrap();
        let (mean, _) = pipe.latent_moments(&img.unsqueeze(0).unwrap()).unwrap();
        for (j, t) in [50usize, 200, 400, 600, 800, 950].iter().enumerate() {
            let mut rng = singlora::rng::rng_for((i * 10 + j) as u64, "fixed-loss");
            let eps = singlora::rng::normal(&mut rng, 1.0, mean.dims(), DType::F32, &Device::Cpu)
                .unwrap();
            let xt = pipe.schedule.add_noise(&mean, &eps, &[*t]).unwrap();
            let tt = Tensor::new(&[*t as f32], &Device::Cpu).unwrap();
            let pred = pipe.unet.forward(&xt, &tt, &cond.context, None).unwrap();
            total += (pred - eps)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            n += 1;
        }
    }
    total / n as f32
}

#[test]
fn dreambooth_lowers_the_denoising_loss_for_every_method() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("subject");
    instance_images(&images, 2);
    let model = fixture("sd-tiny");
    let base = Pipeline::load(&model, DType::F32, &Device::Cpu).unwrap();
    let before = fixed_loss(&base, &images);
    for method in ["singlora", "lora", "dora"] {
        let out = tmp.path().join(method);
        let mut cfg = config(&model, &images, method);
        cfg.max_steps = 40;
        cfg.lr = Some(3e-3);
        cfg.sample_steps = 1;
        cfg.samples_per_prompt = 1;
        train(cfg, &out, false, &QuietDiffusion).unwrap();
        let mut pipe = Pipeline::load(&model, DType::F32, &Device::Cpu).unwrap();
        pipe.load_adapter(&out).unwrap();
        let after = fixed_loss(&pipe, &images);
        assert!(
            after < 0.9 * before,
            "{method}: fixed-draw loss {before} -> {after}"
        );
    }
}

#[test]
fn prior_preservation_generates_class_images_once() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("subject");
    instance_images(&images, 2);
    let mut cfg = config(&fixture("sd-tiny"), &images, "lora");
    cfg.prior_preservation = true;
    cfg.class_prompt = Some("a photo of a dog".into());
    cfg.num_class_images = 3;
    cfg.max_steps = 2;
    cfg.stop_after = Some(1);
    let out = tmp.path().join("run");
    train(cfg, &out, false, &QuietDiffusion).unwrap();
    let gen = singlora::diffusion::images::list_images(&out.join("class_images")).unwrap();
    assert_eq!(gen.len(), 3);
    let stamp = std::fs::metadata(&gen[0]).unwrap().modified().unwrap();
    let s = resume(&out, &DiffusionResume::default(), &QuietDiffusion).unwrap();
    assert_eq!(s.steps, 2);
    let again = std::fs::metadata(&gen[0]).unwrap().modified().unwrap();
    assert_eq!(stamp, again, "the class images are reused, not regenerated");
    let m = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(m.contains("\"prior_loss\":"), "{m}");

    let mut bad = config(&fixture("sd-tiny"), &images, "lora");
    bad.prior_preservation = true;
    let e = train(bad, &tmp.path().join("bad"), false, &QuietDiffusion)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--class-prompt"), "{e}");
}

/// The diffusers and kohya files hold exactly ΔW = B·A of every layer, and `merge` writes a
/// diffusers folder whose U-Net computes what the adapted one does.
#[test]
fn exported_files_and_merged_pipeline_agree_with_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("subject");
    instance_images(&images, 2);
    let model = fixture("sd-tiny");
    let run = tmp.path().join("run");
    let mut cfg = config(&model, &images, "singlora");
    cfg.max_steps = 3;
    cfg.ramp_steps = Some(6);
    train(cfg, &run, false, &QuietDiffusion).unwrap();
    let af = AdapterFile::read(&run, &Device::Cpu).unwrap();
    assert!(
        (af.config.u() - 0.5).abs() < 1e-12,
        "the ramp stands at 3/6"
    );

    let diff =
        candle_core::safetensors::load(run.join("pytorch_lora_weights.safetensors"), &Device::Cpu)
            .unwrap();
    let kohya =
        candle_core::safetensors::load(run.join("lora_kohya.safetensors"), &Device::Cpu).unwrap();
    let mut pipe = Pipeline::load(&model, DType::F32, &Device::Cpu).unwrap();
    pipe.load_adapter(&run).unwrap();
    for l in pipe.unet.linears() {
        let Some(a) = l.adapter() else { continue };
        let want = a.delta_weight().unwrap().to_dtype(DType::F32).unwrap();
        let m = l.name();
        let b = &diff[&format!("{m}.lora_B.weight")];
        let a_ = &diff[&format!("{m}.lora_A.weight")];
        let got = b.matmul(a_).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6, "{m}: diffusers ΔW");
        let k = singlora::diffusion::files::kohya_name(m);
        assert!(k.starts_with("lora_unet_") && !k.contains('.'), "{k}");
        let up = &kohya[&format!("{k}.lora_up.weight")];
        let down = &kohya[&format!("{k}.lora_down.weight")];
        let alpha = kohya[&format!("{k}.alpha")].to_scalar::<f32>().unwrap();
        assert_eq!(alpha as usize, down.dim(0).unwrap(), "alpha = r: scale 1");
        assert!(
            max_abs_diff(&up.matmul(down).unwrap(), &want) < 1e-6,
            "{m}: kohya ΔW"
        );
    }

    let merged = tmp.path().join("merged");
    let report =
        singlora::merge::merge_checkpoint(&model, &run, &merged, &Default::default()).unwrap();
    assert_eq!(report.layers, 32);
    for f in [
        "model_index.json",
        "vae/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(merged.join(f).is_file(), "{f} not copied");
    }
    let plain = Pipeline::load(&merged, DType::F32, &Device::Cpu).unwrap();
    let mut rng = singlora::rng::rng_for(3, "merge-check");
    let x = singlora::rng::normal(&mut rng, 1.0, (1, 4, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let c = singlora::rng::normal(&mut rng, 1.0, (1, 5, 32), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(&[321f32], &Device::Cpu).unwrap();
    let y_adapted = pipe.unet.forward(&x, &t, &c, None).unwrap();
    let y_merged = plain.unet.forward(&x, &t, &c, None).unwrap();
    let base = Pipeline::load(&model, DType::F32, &Device::Cpu).unwrap();
    let y_base = base.unet.forward(&x, &t, &c, None).unwrap();
    let effect = max_abs_diff(&y_adapted, &y_base);
    assert!(effect > 1e-3, "the adapter changes the output ({effect})");
    // the fixture's weights are f16, so the merged U-Net is rounded to f16 once
    let err = max_abs_diff(&y_adapted, &y_merged);
    assert!(
        err < 0.05 * effect,
        "merged vs adapted: {err} (effect {effect})"
    );
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Pipeline::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model_index.json"), "{e}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let cfg = config(&fixture("sd-tiny"), &empty, "lora");
    let e = train(cfg, &tmp.path().join("run"), false, &QuietDiffusion)
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds no images"), "{e}");
    assert!(!tmp.path().join("run").exists(), "nothing is left behind");
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("broken.png"), b"not a png").unwrap();
    let cfg = config(&fixture("sd-tiny"), &bad, "lora");
    let e = train(cfg, &tmp.path().join("run2"), false, &QuietDiffusion)
        .unwrap_err()
        .to_string();
    assert!(e.contains("broken.png"), "{e}");
    let mut cfg = config(&fixture("sd-tiny"), &tmp.path().join("empty"), "lora");
    instance_images(&cfg.instance_images, 1);
    cfg.resolution = Some(18);
    let e = train(cfg, &tmp.path().join("run3"), false, &QuietDiffusion)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resolution: image size 18"), "{e}");
    assert!(!tmp.path().join("run3").exists(), "nothing is left behind");
}

/// A pixel-space pipeline (no VAE: `"vae": [null, null]`) made from the tiny one by cutting its
/// U-Net's input and output convolutions to three channels: DreamBooth and sampling run on the
/// images themselves.
#[test]
fn pixel_space_pipelines_train_and_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("pixel");
    for d in ["unet", "text_encoder", "tokenizer", "scheduler"] {
        copy_dir(&fixture("sd-tiny").join(d), &model.join(d));
    }
    let mut index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("sd-tiny/model_index.json")).unwrap(),
    )
    .unwrap();
    index["vae"] = serde_json::json!([null, null]);
    std::fs::write(model.join("model_index.json"), index.to_string()).unwrap();
    let unet_file = model.join("unet/diffusion_pytorch_model.safetensors");
    let mut t = candle_core::safetensors::load(&unet_file, &Device::Cpu).unwrap();
    for (k, dim) in [
        ("conv_in.weight", 1),
        ("conv_out.weight", 0),
        ("conv_out.bias", 0),
    ] {
        let v = t[k].narrow(dim, 0, 3).unwrap().contiguous().unwrap();
        t.insert(k.to_string(), v);
    }
    candle_core::safetensors::save(&t, &unet_file).unwrap();
    let cfg_path = model.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["in_channels"] = serde_json::json!(3);
    cfg["out_channels"] = serde_json::json!(3);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();

    let pipe = Pipeline::load(&model, DType::F32, &Device::Cpu).unwrap();
    assert!(pipe.vae.is_none());
    assert_eq!(
        pipe.default_size(),
        16,
        "sample_size 16, one pixel per cell"
    );
    let images = tmp.path().join("subject");
    instance_images(&images, 2);
    let mut c = config(&model, &images, "singlora");
    c.max_steps = 2;
    let out = tmp.path().join("run");
    let s = train(c, &out, false, &QuietDiffusion).unwrap();
    assert_eq!(s.steps, 2);
    let grid = image::open(out.join("samples/step-000002.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (32, 16));
}

/// Repositories that ship only the half-precision variant (`*.fp16.safetensors`) load too.
#[test]
fn fp16_variant_files_load() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("sd");
    copy_dir(&fixture("sd-tiny"), &model);
    for (d, f) in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ] {
        std::fs::rename(
            model.join(d).join(format!("{f}.safetensors")),
            model.join(d).join(format!("{f}.fp16.safetensors")),
        )
        .unwrap();
    }
    let a = Pipeline::load(&model, DType::F32, &Device::Cpu).unwrap();
    let b = Pipeline::load(&fixture("sd-tiny"), DType::F32, &Device::Cpu).unwrap();
    let mut req = request(SamplerKind::Ddim);
    req.steps = 1;
    assert_eq!(
        max_abs_diff(&a.generate(&req).unwrap(), &b.generate(&req).unwrap()),
        0.0
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Every tensor of `part` in the diffusers folder `want` is in the converted folder `got`,
/// equal, under the name the conversion gives it (a text encoder's under `text_model.`, as the
/// bare names transformers 5 writes are not); returns how many.
fn assert_part_converted(want: &Path, got: &Path, part: &str) -> usize {
    let file = if part.starts_with("text_encoder") {
        "model.safetensors"
    } else {
        "diffusion_pytorch_model.safetensors"
    };
    let want = candle_core::safetensors::load(want.join(part).join(file), &Device::Cpu).unwrap();
    let got = candle_core::safetensors::load(got.join(part).join(file), &Device::Cpu).unwrap();
    assert_eq!(got.len(), want.len(), "{part}");
    for (k, w) in &want {
        let bare = part.starts_with("text_encoder")
            && !k.starts_with("text_model.")
            && !k.starts_with("text_projection.");
        let name = if bare {
            format!("text_model.{k}")
        } else {
            k.clone()
        };
        let g = got
            .get(&name)
            .unwrap_or_else(|| panic!("{part}: no {name}"));
        assert_eq!(g.dims(), w.dims(), "{part} {k}");
        assert_eq!(max_abs_diff(g, w), 0.0, "{part} {k}");
    }
    want.len()
}

/// The pipeline in `dir` samples the DDIM images diffusers made (`expected`).
fn assert_samples_like_diffusers(dir: &Path, expected: &str) {
    let pipe = Pipeline::load(dir, DType::F32, &Device::Cpu).unwrap();
    let expected = load_expected(expected);
    let got = pipe
        .generate_from(&request(SamplerKind::Ddim), &expected["latents"])
        .unwrap();
    let err = max_abs_diff(&got, &expected["images.ddim"]);
    assert!(
        err < 5e-4,
        "{}: {err} from diffusers' images",
        dir.display()
    );
}

/// A single-file checkpoint in the original LDM layout (`sd-tiny-single.safetensors`, made by
/// scripts/make_single_file_fixture.py and read back exactly by diffusers' own
/// `from_single_file`) becomes a diffusers folder: every tensor the folder fixture's, and the
/// converted pipeline samples diffusers' images. Foreign or unknown tensors, a missing config
/// folder and an output over an input are refused by name, with nothing written.
#[test]
fn single_file_checkpoints_convert_to_the_diffusers_folder() {
    use singlora::diffusion::single_file::convert_single_file;
    let tmp = tempfile::tempdir().unwrap();
    let single = fixture("sd-tiny-single.safetensors");
    let out = tmp.path().join("converted");
    let c = convert_single_file(&single, &fixture("sd-tiny"), &out, false).unwrap();
    assert_eq!(c.skipped, 3, "EMA decay, alphas_cumprod, position_ids");
    for part in ["unet", "vae", "text_encoder"] {
        let n = assert_part_converted(&fixture("sd-tiny"), &out, part);
        assert_eq!(c.tensors[part], n, "{part}");
    }
    assert_samples_like_diffusers(&out, "sd-tiny.expected.safetensors");

    // SD 2.x's layout of the text encoder (OpenCLIP, fused q/k/v; diffusers reads this file
    // back to the folder too), with what real SD 2.x files add: CLIP's projection and
    // temperature and a last layer that SD 2.x does not use
    let openclip = fixture("sd-tiny-single-openclip.safetensors");
    let mut t = candle_core::safetensors::load(&openclip, &Device::Cpu).unwrap();
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F16, &Device::Cpu).unwrap();
    t.insert(
        "cond_stage_model.model.text_projection".into(),
        zeros(&[32, 32]),
    );
    t.insert("cond_stage_model.model.logit_scale".into(), zeros(&[]));
    let extra_layer: Vec<String> = t
        .keys()
        .filter(|k| k.starts_with("cond_stage_model.model.transformer.resblocks.1."))
        .cloned()
        .collect();
    for k in &extra_layer {
        let v = t[k].clone();
        t.insert(k.replace("resblocks.1.", "resblocks.2."), v);
    }
    let sd2 = tmp.path().join("sd2.safetensors");
    candle_core::safetensors::save(&t, &sd2).unwrap();
    let out2 = tmp.path().join("converted-sd2");
    let c2 = convert_single_file(&sd2, &fixture("sd-tiny"), &out2, false).unwrap();
    assert_eq!(c2.skipped, 2 + 2 + extra_layer.len());
    assert_part_converted(&fixture("sd-tiny"), &out2, "text_encoder");
    // two layers beyond the config's: not SD 2.x's one unused layer, refused
    for k in &extra_layer {
        let v = t[k].clone();
        t.insert(k.replace("resblocks.1.", "resblocks.3."), v);
    }
    let sd2_bad = tmp.path().join("sd2-bad.safetensors");
    candle_core::safetensors::save(&t, &sd2_bad).unwrap();
    let e = convert_single_file(&sd2_bad, &fixture("sd-tiny"), &tmp.path().join("x"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("resblocks.3"), "{e}");

    // SDXL: two text encoders (the second OpenCLIP's, with its projection) and the U-Net's
    // added conditioning; the converted pipeline samples diffusers' SDXL images
    let out_xl = tmp.path().join("converted-xl");
    convert_single_file(
        &fixture("sd-tiny-xl-single.safetensors"),
        &fixture("sd-tiny-xl"),
        &out_xl,
        false,
    )
    .unwrap();
    for part in ["unet", "text_encoder_2"] {
        assert_part_converted(&fixture("sd-tiny-xl"), &out_xl, part);
    }
    assert_samples_like_diffusers(&out_xl, "sd-tiny-xl.expected.safetensors");
    // an SDXL file with an SD 1.x config, and the other way round: refused by name
    let e = convert_single_file(
        &fixture("sd-tiny-xl-single.safetensors"),
        &fixture("sd-tiny"),
        &tmp.path().join("x"),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("SDXL") && e.contains("text_encoder_2"), "{e}");

    // refusals
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    let with = |name: &str| {
        let mut t = tensors.clone();
        t.insert(
            name.into(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        );
        let p = tmp
            .path()
            .join(format!("{}.safetensors", name.replace('.', "_")));
        candle_core::safetensors::save(&t, &p).unwrap();
        p
    };
    let dest = tmp.path().join("refused");
    let e = convert_single_file(
        &with("model.diffusion_model.extra.weight"),
        &fixture("sd-tiny"),
        &dest,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("model.diffusion_model.extra.weight"), "{e}");
    let e = convert_single_file(
        &with("conditioner.embedders.0.transformer.x"),
        &fixture("sd-tiny"),
        &dest,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("SDXL's two text encoders"), "{e}");
    let e = convert_single_file(&single, tmp.path(), &dest, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_index.json"), "{e}");
    // a config of another family: the file's tensors do not fit it
    let e = convert_single_file(&single, &fixture("sd-tiny-xl"), &dest, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("SDXL folder"), "{e}");
    assert!(!dest.exists());
    let e = convert_single_file(&single, &fixture("sd-tiny"), &fixture("sd-tiny"), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--config"), "{e}");
    // an existing output is kept unless --overwrite
    let e = convert_single_file(&single, &fixture("sd-tiny"), &out, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("converted"), "{e}");
    convert_single_file(&single, &fixture("sd-tiny"), &out, true).unwrap();
}
