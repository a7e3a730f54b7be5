//! The U-Net's training step on its own record of the forward (`UNet::taped_step`) against
//! the same step through candle's autograd: the same loss and the same gradient for every
//! adapter variable. A test binary of its own: the one-op sublayer switch it needs on is
//! process-wide, and `tests/unet.rs` turns it off and on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use singlora::adapter::AdapterKind;
use singlora::checkpoint::TensorFile;
use singlora::diffusion::unet::AddedCond;

mod common;
use common::{max_abs, max_abs_diff};

/// Held by each test: the taped-steps switch is process-wide.
static SWITCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// SD- and SDXL-shaped tiny U-Nets (the latter with adapters on the linear proj_in and
/// proj_out too), SingLoRA and LoRA, f64: every adapter variable's gradient from the taped
/// step equals candle's autograd's to rounding, and so does the loss. DoRA cannot be taken
/// apart: the step falls back to candle's autograd and still gives its gradients.
#[test]
fn taped_step_matches_autograd() {
    let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    singlora::diffusion::unet::set_taped_steps(true);
    for (name, kind, targets, taped) in [
        (
            "unet-tiny",
            AdapterKind::SingLora,
            "to_q,to_k,to_v,to_out.0",
            true,
        ),
        (
            "unet-tiny",
            AdapterKind::Lora,
            "to_q,to_k,to_v,to_out.0",
            true,
        ),
        (
            "unet-tiny-xl",
            AdapterKind::SingLora,
            "to_q,to_v,to_out.0,proj_in,proj_out",
            true,
        ),
        ("unet-tiny", AdapterKind::Dora, "to_q,to_v", false),
    ] {
        let f = TensorFile::open(&fixture(name).join("io.safetensors")).unwrap();
        let io: BTreeMap<String, Tensor> = f
            .load_all(&dev)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
            .collect();
        let added = io.get("text_embeds").map(|e| AddedCond {
            text_embeds: e.clone(),
            time_ids: io["time_ids"].clone(),
        });
        let (unet, _, vars) = common::adapted_unet(&fixture(name), kind, targets);
        assert_eq!(unet.tape_ready(), taped, "{name} {kind:?}");
        let mut rng = singlora::rng::rng_for(0, "target");
        let n = io["out"].elem_count();
        let target = singlora::rng::normal(&mut rng, 1.0, (n, 1), DType::F64, &dev)
            .unwrap()
            .reshape(io["out"].dims())
            .unwrap();
        let loss = |y: &Tensor| -> singlora::Result<(Tensor, ())> {
            Ok(((y - &target)?.sqr()?.mean_all()?, ()))
        };
        let inputs = (
            &io["sample"],
            &io["timesteps"],
            &io["context"],
            added.as_ref(),
        );

        let y = unet
            .forward(inputs.0, inputs.1, inputs.2, inputs.3)
            .unwrap();
        let (want_loss, ()) = loss(&y).unwrap();
        let want = want_loss.backward().unwrap();
        let ((got_loss, ()), got) = unet.taped_step(inputs, loss).unwrap();

        let case = format!("{name} {kind:?}");
        let l = (
            got_loss.to_scalar::<f64>().unwrap(),
            want_loss.to_scalar::<f64>().unwrap(),
        );
        assert!((l.0 - l.1).abs() <= 1e-12 * l.1.abs(), "{case}: loss {l:?}");
        let mut worst = 0f64;
        for (i, v) in vars.iter().enumerate() {
            let w = want.get(v.as_tensor()).expect("an autograd gradient");
            let g = got
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{case}: no taped gradient for variable {i}"));
            assert_eq!(g.dims(), w.dims(), "{case}: variable {i}");
            let err = max_abs_diff(g, w) / max_abs(w).max(1e-30);
            worst = worst.max(err);
            assert!(
                err < 1e-10,
                "{case}: variable {i} off by {err:.2e} (relative)"
            );
        }
        eprintln!("{case}: taped {taped}, worst relative gradient difference {worst:.2e}");
    }
}

/// A DreamBooth run on the tiny pipeline (SingLoRA, min-SNR weighting) with its steps on the
/// tape ends with the adapter of the same run through candle's autograd, to f32 rounding.
#[test]
fn dreambooth_on_the_tape_trains_the_same_adapter() {
    use singlora::adapter::file::AdapterFile;
    use singlora::diffusion::config::DiffusionConfig;
    use singlora::diffusion::train::{train, QuietDiffusion};
    let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("subject");
    std::fs::create_dir_all(&images).unwrap();
    for k in 0..3u32 {
        let img = image::RgbImage::from_fn(40, 36, |x, y| {
            let v = ((x * (k + 1) * 5 + y * 3) % 256) as u8;
            image::Rgb([v, 255 - v, ((x + y) * 4 % 256) as u8])
        });
        img.save(images.join(format!("img-{k}.png"))).unwrap();
    }
    let mut cfg = DiffusionConfig {
        model: fixture("sd-tiny"),
        instance_images: images,
        instance_prompt: "a photo of sks dog".into(),
        rank: 4,
        alpha: 4.0,
        lr: Some(2e-3),
        max_steps: 4,
        batch_size: 2,
        sample_every: 0,
        snr_gamma: Some(5.0),
        ..Default::default()
    };
    cfg.method = "singlora".parse().unwrap();
    let run = |taped: bool| {
        singlora::diffusion::unet::set_taped_steps(taped);
        let dir = tmp.path().join(format!("run-{taped}"));
        train(cfg.clone(), &dir, false, &QuietDiffusion).unwrap();
        let af = AdapterFile::read(&dir, &Device::Cpu).unwrap();
        af.tensors()
    };
    let (taped, plain) = (run(true), run(false));
    singlora::diffusion::unet::set_taped_steps(true);
    assert_eq!(taped.len(), plain.len());
    let mut worst = 0f64;
    for ((name, a), (name_b, b)) in taped.iter().zip(&plain) {
        assert_eq!(name, name_b);
        let err = max_abs_diff(a, b) / max_abs(b).max(1e-30);
        worst = worst.max(err);
        assert!(
            err < 1e-4,
            "{name}: taped and autograd runs differ by {err:.2e} (relative)"
        );
    }
    eprintln!("taped and autograd DreamBooth runs: worst relative difference {worst:.2e}");
}
