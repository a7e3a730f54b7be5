//! The Stable Diffusion U-Net against diffusers itself (tiny random models that
//! `scripts/make_unet_fixture.py` built and ran), its adapter gradients against finite
//! differences, and its refusals of configs and checkpoints it cannot run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use singlora::adapter::AdapterKind;
use singlora::checkpoint::{Checkpoint, TensorFile};
use singlora::diffusion::unet::{AddedCond, UNet, UNetConfig};
use singlora::model::weights::Weights;

mod common;
use common::max_abs;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The fixture's inputs and diffusers' output, in `dtype`.
fn io(name: &str, dtype: DType) -> BTreeMap<String, Tensor> {
    let f = TensorFile::open(&fixture(name).join("io.safetensors")).unwrap();
    f.load_all(&Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect()
}

fn added(io: &BTreeMap<String, Tensor>) -> Option<AddedCond> {
    Some(AddedCond {
        text_embeds: io.get("text_embeds")?.clone(),
        time_ids: io.get("time_ids")?.clone(),
    })
}

/// Max |ours − diffusers'| relative to max |diffusers'|, our weights in `dtype`.
fn error_against_diffusers(name: &str, dtype: DType) -> f64 {
    let io = io(name, DType::F32);
    let unet = UNet::load(&fixture(name), dtype, &Device::Cpu).unwrap();
    let out = unet
        .forward(
            &io["sample"],
            &io["timesteps"],
            &io["context"],
            added(&io).as_ref(),
        )
        .unwrap();
    assert_eq!(out.dims(), io["out"].dims());
    assert_eq!(out.dtype(), dtype);
    let out = out.to_dtype(DType::F32).unwrap();
    let err = max_abs(&(&out - &io["out"]).unwrap()) / max_abs(&io["out"]);
    eprintln!("{name} in {dtype:?}: max error relative to diffusers' f32 output {err:.2e}");
    err
}

#[test]
fn sd_matches_diffusers() {
    let err = error_against_diffusers("unet-tiny", DType::F32);
    assert!(err < 1e-5, "unet-tiny differs from diffusers by {err:.2e}");
}

#[test]
fn sdxl_matches_diffusers() {
    let err = error_against_diffusers("unet-tiny-xl", DType::F32);
    assert!(
        err < 1e-5,
        "unet-tiny-xl differs from diffusers by {err:.2e}"
    );
}

#[test]
fn attention_layers_are_adaptable_by_diffusers_name() {
    let unet = UNet::load(&fixture("unet-tiny"), DType::F32, &Device::Cpu).unwrap();
    let names: Vec<&str> = unet.linears().iter().map(|l| l.name()).collect();
    // two transformers of one block each (down 0, mid, up 1 has two resnets: two more),
    // six linear layers a block, 1×1-conv projections (not adaptable)
    assert_eq!(names.len(), 4 * 10);
    let k = unet
        .linears()
        .into_iter()
        .find(|l| l.name() == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
        .expect("cross-attention key projection");
    assert_eq!(k.dims(), (16, 24));
    assert!(names.contains(&"unet.up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2"));
    let xl = UNet::load(&fixture("unet-tiny-xl"), DType::F32, &Device::Cpu).unwrap();
    let names: Vec<&str> = xl.linears().iter().map(|l| l.name()).collect();
    assert!(names.contains(&"unet.mid_block.attentions.0.proj_in"));
    assert!(names.contains(&"unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"));
    assert!(xl.num_params() > 90_000);
}

/// loss = mean((U(x) − target)²) with adapters on to_q, to_k, to_v and to_out.0 (and on the
/// transformers' linear proj_in and proj_out in the SDXL-shaped U-Net), in f64: the autograd
/// gradients of a spread of adapter entries against central differences, with the
/// transformers' sublayers recorded op by op and as one op each.
#[test]
fn adapter_gradients_match_finite_differences() {
    for one_op in [false, true] {
        // the switch is process-wide; both settings compute the same values
        singlora::diffusion::unet::attention::set_one_op_sublayers(one_op);
        adapter_gradients_against_finite_differences(one_op);
    }
}

fn adapter_gradients_against_finite_differences(one_op: bool) {
    let dev = Device::Cpu;
    for (name, kind, targets, count) in [
        (
            "unet-tiny",
            AdapterKind::Lora,
            "to_q,to_k,to_v,to_out.0",
            4 * 8,
        ),
        (
            "unet-tiny",
            AdapterKind::SingLora,
            "to_q,to_k,to_v,to_out.0",
            4 * 8,
        ),
        (
            "unet-tiny-xl",
            AdapterKind::SingLora,
            "to_q,to_v,to_out.0,proj_in,proj_out",
            0,
        ),
    ] {
        let io = io(name, DType::F64);
        let added = added(&io);
        let (unet, chosen, vars) = common::adapted_unet(&fixture(name), kind, targets);
        if count > 0 {
            assert_eq!(chosen.len(), count);
        } else {
            assert!(chosen.iter().any(|n| n.ends_with("proj_out")), "{chosen:?}");
        }
        let n = io["out"].elem_count();
        let mut rng = singlora::rng::rng_for(0, "target");
        let target = singlora::rng::normal(&mut rng, 1.0, (n, 1), DType::F64, &dev)
            .unwrap()
            .reshape(io["out"].dims())
            .unwrap();
        let loss = |unet: &UNet| {
            let y = unet
                .forward(
                    &io["sample"],
                    &io["timesteps"],
                    &io["context"],
                    added.as_ref(),
                )
                .unwrap();
            (y - &target).unwrap().sqr().unwrap().mean_all().unwrap()
        };
        let grads = loss(&unet).backward().unwrap();
        let mut worst = 0f64;
        // the first layer's (self-attention q), a cross-attention k in the middle, the last
        // layer's (an up block's output projection)
        for vi in [0, vars.len() / 2 + 1, vars.len() - 1] {
            let var = &vars[vi];
            let analytic = grads.get(var.as_tensor()).expect("an adapter gradient");
            let analytic = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let orig = var.as_tensor().copy().unwrap();
            let flat = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for j in (0..flat.len()).step_by((flat.len() / 4).max(1)) {
                let at = |d: f64| {
                    let mut f = flat.clone();
                    f[j] += d;
                    var.set(&Tensor::from_vec(f, orig.dims(), &dev).unwrap())
                        .unwrap();
                    let l = loss(&unet).to_scalar::<f64>().unwrap();
                    var.set(&orig).unwrap();
                    l
                };
                // f64 rounding of the loss, not truncation, limits the agreement at smaller steps
                let eps = 1e-4;
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                let err = (numeric - analytic[j]).abs() / (1e-6 + numeric.abs());
                worst = worst.max(err);
                assert!(
                    err < 1e-5,
                    "{name} {kind:?} (one op {one_op}) var {vi} entry {j}: autograd {} vs finite differences {numeric}",
                    analytic[j]
                );
            }
        }
        eprintln!("{name} {kind:?} (one op {one_op}): worst relative gradient error {worst:.2e}");
    }
}

/// A change to a config.json.
type Edit = fn(&mut serde_json::Value);

/// A copy of the fixture folder with config.json changed by `edit`.
fn with_config(edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("unet-tiny");
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        tmp.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut cfg);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    tmp
}

#[test]
fn refuses_configs_it_cannot_run() {
    let cases: [(&str, Edit); 4] = [
        ("down_block_types", |c| {
            c["down_block_types"] = serde_json::json!(["SimpleCrossAttnDownBlock2D", "DownBlock2D"])
        }),
        ("block_out_channels", |c| {
            c.as_object_mut().unwrap().remove("block_out_channels");
        }),
        ("class_embed_type", |c| {
            c["class_embed_type"] = serde_json::json!("timestep")
        }),
        ("attention_type", |c| {
            c["attention_type"] = serde_json::json!("gated")
        }),
    ];
    for (field, edit) in cases {
        let dir = with_config(edit);
        let e = UNet::load(dir.path(), DType::F32, &Device::Cpu)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("config.json") && e.contains(&format!("`{field}`")),
            "{field}: {e}"
        );
    }
}

#[test]
fn refuses_missing_and_surplus_tensors() {
    let dir = fixture("unet-tiny");
    let cfg = UNetConfig::read(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let all: BTreeMap<String, Tensor> = ckpt
        .names()
        .map(|n| (n.to_string(), ckpt.load(n, &Device::Cpu).unwrap()))
        .collect();
    let gone = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let mut missing = all.clone();
    missing.remove(gone).unwrap();
    let w = Weights::Memory(dir.join("diffusion_pytorch_model.safetensors"), missing);
    let e = UNet::from_weights(&w, cfg.clone(), DType::F32, &Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains(gone), "{e}");

    let extra = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.bias";
    let mut surplus = all;
    surplus.insert(
        extra.into(),
        Tensor::zeros(24, DType::F32, &Device::Cpu).unwrap(),
    );
    let w = Weights::Memory(dir.join("diffusion_pytorch_model.safetensors"), surplus);
    let e = UNet::from_weights(&w, cfg, DType::F32, &Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains(extra), "{e}");
}

#[test]
fn sdxl_needs_its_added_conditioning() {
    let io = io("unet-tiny-xl", DType::F32);
    let unet = UNet::load(&fixture("unet-tiny-xl"), DType::F32, &Device::Cpu).unwrap();
    let e = unet
        .forward(&io["sample"], &io["timesteps"], &io["context"], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("text_time"), "{e}");
    let sd = UNet::load(&fixture("unet-tiny"), DType::F32, &Device::Cpu).unwrap();
    let sd_io = self::io("unet-tiny", DType::F32);
    let e = sd
        .forward(
            &sd_io["sample"],
            &sd_io["timesteps"],
            &sd_io["context"],
            added(&io).as_ref(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("text_time"), "{e}");
}

/// Half-precision weights (f16 here: candle's CPU matmul has no bf16, the GPU's dtype): the
/// half-precision paths (norms and softmax widened to f32, `upcast_attention`'s f32 scores)
/// stay near diffusers' f32 output.
#[test]
fn half_precision_stays_near_diffusers() {
    for name in ["unet-tiny", "unet-tiny-xl"] {
        let err = error_against_diffusers(name, DType::F16);
        assert!(err < 1e-2, "{name} in f16 differs by {err:.2e}");
    }
}
