//! Helpers shared by the integration tests.

/// A training run that reports nothing: a fresh one, or the run in `out` resumed (with `cfg`'s
/// `stop_after`).
#[allow(dead_code)]
pub fn run_train(
    cfg: singlora::train::TrainConfig,
    out: &std::path::Path,
    resume: bool,
    overwrite: bool,
) -> singlora::Result<singlora::train::TrainSummary> {
    let silent = std::sync::Arc::new(singlora::train::Silent);
    if resume {
        let changes = singlora::train::ResumeChanges {
            stop_after: cfg.stop_after,
            ..Default::default()
        };
        singlora::train::resume(out, &changes, silent)
    } else {
        singlora::train::train(cfg, out, overwrite, silent)
    }
}

/// The largest |x| of a tensor of any float dtype, in f64.
#[allow(dead_code)]
pub fn max_abs(t: &candle_core::Tensor) -> f64 {
    t.to_dtype(candle_core::DType::F64)
        .and_then(|t| t.abs()?.max_all()?.to_scalar::<f64>())
        .unwrap()
}

/// The largest |a − b|, computed in f64.
#[allow(dead_code)]
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    let f64 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    max_abs(&(f64(a) - f64(b)).unwrap())
}

/// A byte-level BPE tokenizer.json of the decoder fixtures' 40 tokens (`<bos>`, `<eos>`, `Ġ`,
/// a–z, x0–x10).
#[allow(dead_code)]
pub fn write_tiny_tokenizer(dir: &std::path::Path) {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<bos>", "<eos>", "Ġ"]
        .into_iter()
        .map(str::to_string)
        .chain(('a'..='z').map(String::from))
        .chain((0..11).map(|i| format!("x{i}")))
        .enumerate()
    {
        vocab.insert(t, serde_json::json!(i));
    }
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true,
            "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
}

/// An SFT model of `body` with `method`'s adapters (r = 2, α = 4, seed 3, no ramp) on every
/// linear layer.
#[allow(dead_code)]
pub fn sft_with_adapters(body: singlora::model::Body, method: &str) -> singlora::model::TaskModel {
    use singlora::adapter::ramp::{RampClock, RampSchedule};
    let spec = singlora::adapter::AdapterSpec {
        kind: method.parse::<singlora::adapter::Method>().unwrap().kind(),
        r: 2,
        alpha: 4.0,
        rslora: false,
        init: "kaiming_width".parse().unwrap(),
        seed: 3,
        dtype: candle_core::DType::F32,
    };
    let mut m = singlora::model::TaskModel::new(
        body,
        singlora::data::Task::Sft,
        None,
        singlora::model::Pooling::Last,
        0,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let targets = singlora::adapter::target::TargetSpec::parse("all-linear", None).unwrap();
    m.inject(&spec, &targets, RampClock::new(RampSchedule::none(), 0))
        .unwrap();
    m
}

/// Two models built alike from bases that should compute the same (`what` names the case):
/// the SFT loss on the sequence `ids` within 1e-5 (relative), every adapter gradient within
/// 1e-4 of its tensor's largest value.
#[allow(dead_code)]
pub fn assert_same_loss_and_grads(
    a: &singlora::model::TaskModel,
    b: &singlora::model::TaskModel,
    ids: &[u32],
    what: &str,
) {
    let items = vec![singlora::data::Encoded {
        ids: ids.to_vec(),
        type_ids: vec![0; ids.len()],
        label: None,
        target_mask: vec![1; ids.len()],
    }];
    let batch = singlora::data::collate(&items, &[0], 0, &candle_core::Device::Cpu).unwrap();
    let (la, ga) = a.loss_and_grads(&batch, 1.0).unwrap();
    let (lb, gb) = b.loss_and_grads(&batch, 1.0).unwrap();
    let (la, lb) = (
        la.to_scalar::<f32>().unwrap(),
        lb.to_scalar::<f32>().unwrap(),
    );
    assert!(
        (la - lb).abs() <= 1e-5 * lb.abs(),
        "{what}: loss {la} against {lb}"
    );
    let mut checked = 0;
    for ((layer, _, x), (_, _, y)) in a.adapters().iter().zip(b.adapters().iter()) {
        for (px, py) in x.params().iter().zip(y.params()) {
            let gx = ga.get(px.var.as_tensor()).unwrap();
            let gy = gb.get(py.var.as_tensor()).unwrap();
            let scale = max_abs(gy);
            let diff = max_abs_diff(gx, gy);
            assert!(
                diff <= 1e-4 * scale.max(1e-6),
                "{what} {layer}.{}: {diff:e} of {scale:e}",
                px.suffix
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "{what}: no adapter gradients");
}

/// The tiny U-Net fixture at `dir` in f64 with adapters of `kind` (rank 2, α 4, the ramp at
/// its first step) on `targets`, every adapter variable moved off its initial value by
/// N(0, 0.1) noise (LoRA's B starts at zero, so each path carries signal): the U-Net, the
/// modules chosen and the variables.
#[allow(dead_code)]
pub fn adapted_unet(
    dir: &std::path::Path,
    kind: singlora::adapter::AdapterKind,
    targets: &str,
) -> (
    singlora::diffusion::unet::UNet,
    Vec<String>,
    Vec<candle_core::Var>,
) {
    use candle_core::{DType, Device};
    use singlora::adapter::ramp::{RampClock, RampSchedule};
    let dev = Device::Cpu;
    let mut unet = singlora::diffusion::unet::UNet::load(dir, DType::F64, &dev).unwrap();
    let mut spec = singlora::adapter::AdapterSpec::new(kind, 2, 4.0);
    spec.dtype = DType::F64;
    let clock = RampClock::new(RampSchedule::new(4), 1);
    clock.set_training(true);
    let targets = singlora::adapter::target::TargetSpec::parse(targets, None).unwrap();
    let chosen =
        singlora::adapter::inject::inject(unet.linears_mut(), &[], &spec, &targets, &clock)
            .unwrap();
    let vars: Vec<candle_core::Var> = singlora::adapter::params_of(unet.linears())
        .into_iter()
        .map(|p| p.var)
        .collect();
    for (i, v) in vars.iter().enumerate() {
        let mut rng = singlora::rng::rng_for(i as u64, "noise");
        let noise = singlora::rng::normal(&mut rng, 0.1, v.dims(), DType::F64, &dev).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
    (unet, chosen, vars)
}
