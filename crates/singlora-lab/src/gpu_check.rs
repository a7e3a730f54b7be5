//! `singlora-lab gpu-check`: the device path against the CPU on the same inputs.
//!
//! 1. Every adapter method, square / tall / wide: forward and all adapter gradients with a bf16
//!    frozen weight and bf16 activations on the device, against an f64 CPU reference.
//! 2. A few full training updates of a tiny BERT and a tiny LLaMA (classification and SFT) on
//!    the device against the same run on the CPU (f32): losses and the final adapters.
//! 3. Qwen3, Gemma 3, Phi-3 and GPT-2 bodies on the device against transformers' logits (f32 and bf16
//!    weights; generation's cached forward against the full one) and a PEFT LoRA step's loss and
//!    gradients: the golden files of
//!    tests/fixtures/decoders (the checks of crates/singlora/tests/decoders.rs, on any device).
//! 4. NF4 weights dequantised by the device's kernel against the CPU's, exactly; a few SFT
//!    updates on a 4-bit base on the device against the CPU's (part of 2).
//!
//! Prints a table of relative errors (‖device − reference‖ / ‖reference‖; max |device −
//! reference| / max |reference| for the golden logits and gradients) and fails when one exceeds
//! its bound or anything is not finite.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use singlora::adapter::file::AdapterFile;
use singlora::adapter::ramp::{RampClock, RampSchedule};
use singlora::adapter::{AdaptedLinear, Adapter, AdapterKind, AdapterSpec};
use singlora::checkpoint::Checkpoint;
use singlora::data::{collate, Encoded};
use singlora::linear::FrozenLinear;
use singlora::model::llama::Llama;
use singlora::model::weights::{ConfigReader, Weights};
use singlora::model::{Body, FastPath, Pooling, Task, TaskModel};
use singlora::synthetic::{write_checkpoint, write_tokenizer, BertShape, LlamaShape};
use singlora::tokenize::TokenizerStyle;
use singlora::train::{train, Silent, TrainConfig};

fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64> {
    let g = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let w = want.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let num = (&g - &w)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = w.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt().max(1e-30);
    let e = num / den;
    Ok(if e.is_finite() { e } else { f64::INFINITY })
}

/// max |got − want| / max |want| (on the CPU, in f64): how the golden decoder files are
/// compared (crates/singlora/tests/decoders.rs).
fn max_rel_err(got: &Tensor, want: &Tensor) -> Result<f64> {
    let g = got
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    let w = want
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    // a NaN could hide from `max`; it cannot from a sum
    let finite = g.sum_all()?.to_scalar::<f64>()?.is_finite();
    let num = (&g - &w)?.abs()?.max(0)?.to_scalar::<f64>()?;
    let den = w.abs()?.max(0)?.to_scalar::<f64>()?;
    let e = num / den;
    Ok(if finite && e.is_finite() {
        e
    } else {
        f64::INFINITY
    })
}

struct Row {
    what: String,
    err: f64,
    bound: f64,
}

/// The fused ops on the device (f32 and bf16) against their CPU f64 paths: values and the input
/// gradient of sum(op(x) ⊙ G).
fn op_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use candle_core::Var;
    let cpu = Device::Cpu;
    let w = (Tensor::randn(0f64, 0.2, 576, &cpu)? + 1.0)?;
    let cases: Vec<OpCase> = vec![
        (
            "masked softmax (causal, padded)",
            vec![2, 4, 64, 64],
            Box::new(|s: &Tensor| singlora::ops::masked_softmax(s, 0.125, &[64, 40], true)),
            Box::new(|s: &Tensor| singlora::ops::masked_softmax(s, 0.125, &[64, 40], true)),
        ),
        (
            "rms norm",
            vec![128, 576],
            {
                let w = w.clone();
                Box::new(move |x: &Tensor| singlora::ops::rms_norm(x, &w, 1e-5))
            },
            {
                let wd = w.to_dtype(DType::F32)?.to_device(device)?;
                Box::new(move |x: &Tensor| singlora::ops::rms_norm(x, &wd, 1e-5))
            },
        ),
        (
            "swiglu (gate, up stacked)",
            vec![2, 96, 344],
            Box::new(|x: &Tensor| singlora::ops::swiglu(&x.get(0)?, &x.get(1)?)),
            Box::new(|x: &Tensor| singlora::ops::swiglu(&x.get(0)?, &x.get(1)?)),
        ),
        {
            // 2 sequences of 48 positions, 6 heads of 32
            let inv: Vec<f64> = (0..16)
                .map(|i| 1.0 / 500f64.powf(i as f64 / 16.0))
                .collect();
            let (c64, s64) = singlora::ops::rope_tables(&inv, 48, DType::F64, &cpu)?;
            let (c32, s32) = singlora::ops::rope_tables(&inv, 48, DType::F32, device)?;
            (
                "rope + head split",
                vec![2, 48, 192],
                Box::new(move |x: &Tensor| {
                    singlora::ops::rope_split(x, &c64, &s64, 6, true)?
                        .contiguous()
                        .map_err(Into::into)
                }),
                Box::new(move |x: &Tensor| singlora::ops::rope_split(x, &c32, &s32, 6, true)),
            )
        },
        {
            // GQA (4 query heads on 2 KV heads of 16), causal, the second row padded
            let inv: Vec<f64> = (0..8).map(|i| 1.0 / 100f64.powf(i as f64 / 8.0)).collect();
            let (c64, s64) = singlora::ops::rope_tables(&inv, 40, DType::F64, &cpu)?;
            let (c32, s32) = singlora::ops::rope_tables(&inv, 40, DType::F32, device)?;
            let block = |x: &Tensor, c: &Tensor, s: &Tensor| -> singlora::Result<Tensor> {
                let q = x.narrow(2, 0, 64)?;
                let k = x.narrow(2, 64, 32)?;
                let v = x.narrow(2, 96, 32)?;
                let fast = FastPath::default();
                singlora::ops::attention_block(&q, &k, &v, (c, s), (4, 2), &[40, 29], true, &fast)
            };
            (
                "attention block (rope, GQA, causal, padded)",
                vec![2, 40, 128],
                Box::new(move |x: &Tensor| block(x, &c64, &s64)),
                Box::new(move |x: &Tensor| block(x, &c32, &s32)),
            )
        },
        fused_attention_case(
            "attention block, head size 64 (4 heads on 1 KV head, causal, padded, 100 positions)",
            (64, 4, 1, 100),
            &[100, 71],
            true,
            FastPath::default(),
            device,
        )?,
        fused_attention_case(
            "attention block, head size 128 (2 heads, not causal, padded, 80 positions)",
            (128, 2, 2, 80),
            &[80, 50],
            false,
            FastPath::default(),
            device,
        )?,
        fused_attention_case(
            "attention block, head size 48 with flash_48 (3 heads, not causal, padded, 90 positions)",
            (48, 3, 3, 90),
            &[90, 61],
            false,
            FastPath {
                flash_48: true,
                ..FastPath::default()
            },
            device,
        )?,
        fused_attention_case(
            "attention block, head size 80 with flash_80 (2 heads, not causal, padded, 70 positions)",
            (80, 2, 2, 70),
            &[70, 33],
            false,
            FastPath {
                flash_80: true,
                ..FastPath::default()
            },
            device,
        )?,
        fused_attention_case(
            "attention block, head size 160 on cuBLAS (2 heads, not causal, padded, 50 positions)",
            (160, 2, 2, 50),
            &[50, 27],
            false,
            FastPath::default(),
            device,
        )?,
        {
            let t: Vec<u32> = (0..64u32).map(|i| (i * 37 + 11) % 1000).collect();
            let t_cpu = Tensor::new(t.as_slice(), &cpu)?;
            let t_dev = Tensor::new(t.as_slice(), device)?;
            (
                "cross-entropy (64 rows of 1000)",
                vec![64, 1000],
                Box::new(move |x: &Tensor| singlora::ops::cross_entropy(x, &t_cpu, None)),
                Box::new(move |x: &Tensor| singlora::ops::cross_entropy(x, &t_dev, None)),
            )
        },
        (
            "head split (no rotation)",
            vec![2, 48, 192],
            Box::new(|x: &Tensor| {
                let t = Tensor::zeros((48, 32), DType::F64, x.device())?;
                singlora::ops::rope_split(x, &t, &t, 6, false)?
                    .contiguous()
                    .map_err(Into::into)
            }),
            {
                let t = Tensor::zeros((48, 32), DType::F32, device)?;
                Box::new(move |x: &Tensor| singlora::ops::rope_split(x, &t, &t, 6, false))
            },
        ),
    ];
    for (name, shape, on_cpu, on_dev) in cases {
        let x = Tensor::randn(0f64, 2.0, shape.as_slice(), &cpu)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F64)?;
        let xv = Var::from_tensor(&x)?;
        let y_ref = on_cpu(xv.as_tensor())?;
        let g = Tensor::randn(0f64, 1.0, y_ref.shape(), &cpu)?;
        let dx_ref = (&y_ref * &g)?
            .sum_all()?
            .backward()?
            .get(xv.as_tensor())
            .unwrap()
            .clone();
        for dt in [DType::F32, DType::BF16] {
            let xd = Var::from_tensor(&x.to_dtype(dt)?.to_device(device)?)?;
            let y = on_dev(xd.as_tensor())?;
            let gd = g.to_dtype(y.dtype())?.to_device(device)?;
            let dx = (&y * &gd)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .backward()?
                .get(xd.as_tensor())
                .cloned();
            let bound = if dt == DType::F32 { 1e-5 } else { 2e-2 };
            rows.push(Row {
                what: format!("{name} {dt:?} forward"),
                err: rel_err(&y, &y_ref)?,
                bound,
            });
            let err = match dx {
                Some(dx) => rel_err(&dx, &dx_ref)?,
                None => f64::INFINITY,
            };
            rows.push(Row {
                what: format!("{name} {dt:?} input gradient"),
                err,
                bound,
            });
        }
    }
    Ok(())
}

type OpCase = (
    &'static str,
    Vec<usize>,
    Box<dyn Fn(&Tensor) -> singlora::Result<Tensor>>,
    Box<dyn Fn(&Tensor) -> singlora::Result<Tensor>>,
);

/// An attention block case whose bf16 run takes the fused (flash) kernels: q, k, v side by side
/// in the input (2, t, (heads + 2·kv_heads)·hd); several 64-row tiles, a partial last one.
fn fused_attention_case(
    name: &'static str,
    (hd, heads, kv, t): (usize, usize, usize, usize),
    lens: &[usize],
    causal: bool,
    fast: FastPath,
    device: &Device,
) -> Result<OpCase> {
    let half = hd / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / half as f64))
        .collect();
    let (c64, s64) = singlora::ops::rope_tables(&inv, t, DType::F64, &Device::Cpu)?;
    let (c32, s32) = singlora::ops::rope_tables(&inv, t, DType::F32, device)?;
    let lens = lens.to_vec();
    let block = move |x: &Tensor, c: &Tensor, s: &Tensor| -> singlora::Result<Tensor> {
        let q = x.narrow(2, 0, heads * hd)?;
        let k = x.narrow(2, heads * hd, kv * hd)?;
        let v = x.narrow(2, (heads + kv) * hd, kv * hd)?;
        singlora::ops::attention_block(&q, &k, &v, (c, s), (heads, kv), &lens, causal, &fast)
    };
    let on_dev = block.clone();
    Ok((
        name,
        vec![2, t, (heads + 2 * kv) * hd],
        Box::new(move |x: &Tensor| block(x, &c64, &s64)),
        Box::new(move |x: &Tensor| on_dev(x, &c32, &s32)),
    ))
}

fn adapter_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    let cpu = Device::Cpu;
    for (kind, label) in [
        (AdapterKind::SingLora, "singlora"),
        (AdapterKind::Lora, "lora"),
        (AdapterKind::Dora, "dora"),
    ] {
        for (d_out, d_in) in [(256, 256), (512, 256), (256, 512)] {
            let w0 = (Tensor::randn(0f64, 0.02, (d_out, d_in), &cpu)?)
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F64)?;
            let x = Tensor::randn(0f64, 1.0, (64, d_in), &cpu)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F64)?;
            let g = Tensor::randn(0f64, 1.0, (64, d_out), &cpu)?;
            let clock = RampClock::new(RampSchedule::new(4), 1);
            clock.set_training(true);
            let mut spec = AdapterSpec::new(kind, 8, 16.0);
            spec.dtype = DType::F64;
            let reference = Adapter::init(&spec, "m", &w0, &clock)?;
            let mut tensors = BTreeMap::new();
            for p in reference.params() {
                let noisy = (p.var.as_tensor() + (Tensor::randn(0f64, 0.05, p.var.dims(), &cpu)?))?;
                p.var.set(&noisy)?;
                tensors.insert(
                    p.suffix.to_string(),
                    noisy.to_dtype(DType::F32)?.to_device(device)?,
                );
            }
            let layer = AdaptedLinear::new("m", FrozenLinear::new(w0.clone(), None))
                .with_adapter(reference.clone());
            let x_var = candle_core::Var::from_tensor(&x)?;
            let y_ref = layer.forward(x_var.as_tensor())?;
            let grads_ref = (&y_ref * &g)?.sum_all()?.backward()?;

            let w0_d = w0.to_dtype(DType::BF16)?.to_device(device)?;
            let adapter_d =
                Adapter::from_tensors(kind, "m", &tensors, &w0_d, 8, reference.scale(), &clock)?;
            let layer_d = AdaptedLinear::new("m", FrozenLinear::new(w0_d, None))
                .with_adapter(adapter_d.clone());
            let x_d = x.to_dtype(DType::BF16)?.to_device(device)?;
            let y_d = layer_d.forward(&x_d)?;
            let g_d = g.to_dtype(DType::F32)?.to_device(device)?;
            let grads_d = (y_d.to_dtype(DType::F32)? * &g_d)?.sum_all()?.backward()?;
            rows.push(Row {
                what: format!("{label} {d_out}x{d_in} forward"),
                err: rel_err(&y_d, &y_ref)?,
                bound: 2e-2,
            });
            for (pr, pd) in reference.params().iter().zip(adapter_d.params()) {
                let want = grads_ref
                    .get(pr.var.as_tensor())
                    .expect("reference gradient");
                let got = grads_d.get(pd.var.as_tensor()).ok_or_else(|| {
                    anyhow::anyhow!("{label}: no gradient for {} on the device", pd.suffix)
                })?;
                rows.push(Row {
                    what: format!("{label} {d_out}x{d_in} d{}", pd.suffix),
                    err: rel_err(got, want)?,
                    bound: 3e-2,
                });
            }
            // the backward written out by hand (the U-Net's one-op sublayers): the input's
            // gradient in one op, every variable's in one flat buffer
            let Some(low) = layer_d.as_low_rank(DType::BF16)? else {
                continue;
            };
            let (dx, grads) =
                low.backward_with_input(&x_d, &g.to_dtype(DType::BF16)?.to_device(device)?)?;
            let dx_ref = grads_ref
                .get(x_var.as_tensor())
                .expect("reference gradient");
            rows.push(Row {
                what: format!("{label} {d_out}x{d_in} written-out backward dx"),
                err: rel_err(&dx, dx_ref)?,
                bound: 2e-2,
            });
            for (pr, got) in reference.params().iter().zip(&grads) {
                let want = grads_ref
                    .get(pr.var.as_tensor())
                    .expect("reference gradient");
                rows.push(Row {
                    what: format!("{label} {d_out}x{d_in} written-out backward d{}", pr.suffix),
                    err: rel_err(got, want)?,
                    bound: 3e-2,
                });
            }
        }
    }
    Ok(())
}

/// tests/fixtures/decoders: under the current directory (the repository root, where the GPU
/// machine runs the binary), else under this crate's repository.
fn decoder_fixtures() -> Result<PathBuf> {
    let rel = Path::new("tests/fixtures/decoders");
    let here = std::env::current_dir()?.join(rel);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    for dir in [&here, &repo] {
        if dir.is_dir() {
            return Ok(dir.clone());
        }
    }
    bail!(
        "the decoder golden files are not found: searched {} and {}",
        here.display(),
        repo.display()
    )
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Qwen3, Gemma 3, Phi-3 and GPT-2 bodies on `device` against transformers and PEFT (the golden files
/// of tests/fixtures/decoders): logits with f32 and with bf16 weights, and the loss and adapter
/// gradients of one LoRA step loaded from PEFT's adapter file.
fn family_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    let root = decoder_fixtures()?;
    for name in ["qwen3", "gemma3", "phi3", "gpt2"] {
        let d = root.join(name);
        let load = |dtype: DType| -> Result<Llama> {
            let path = d.join("config.json");
            let value = read_json(&path)?;
            let cfg = Llama::config(&ConfigReader {
                path: &path,
                value: &value,
            })?;
            let weights = Weights::Checkpoint(Checkpoint::open(&d)?);
            Ok(Llama::load(&weights, cfg, dtype, device)?)
        };
        let golden_path = d.join("golden.json");
        let golden = read_json(&golden_path)?;
        let ids = golden["ids"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().map(|v| v as u32))
                    .collect::<Option<Vec<u32>>>()
            })
            .ok_or_else(|| anyhow!("{}: no token list `ids`", golden_path.display()))?;
        let want: Vec<Vec<f64>> = serde_json::from_value(golden["logits"].clone())
            .with_context(|| format!("{}: `logits`", golden_path.display()))?;
        let vocab = want.first().map_or(0, Vec::len);
        let want = Tensor::from_vec(want.concat(), (want.len(), vocab), &Device::Cpu)?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        if scale <= 0.5 {
            bail!("{name}: golden logits too small to tell anything ({scale})");
        }
        let items = vec![Encoded {
            ids: ids.clone(),
            type_ids: vec![0; ids.len()],
            label: None,
            target_mask: vec![1; ids.len()],
        }];
        let batch = collate(&items, &[0], 0, device)?;
        for (dtype, tag, bound) in [
            (DType::F32, "f32", 1e-4),
            (DType::BF16, "bf16 weights", 3e-2),
        ] {
            let model = load(dtype)?;
            let hidden = model.hidden_states(&batch, &FastPath::default())?;
            let logits = model.lm_logits(&hidden.reshape((ids.len(), hidden.dim(2)?))?)?;
            rows.push(Row {
                what: format!("{name} logits vs transformers ({tag})"),
                err: max_rel_err(&logits, &want)?,
                bound,
            });
            // generation's cached forward: the prompt's first half at once, then token by
            // token, each position against the full forward's logits
            let mut cache = model.new_cache();
            let half = ids.len() / 2;
            let mut worst: f64 = 0.0;
            let mut at = 0;
            for end in std::iter::once(half).chain(half + 1..=ids.len()) {
                let last = model.forward_cached(&ids[at..end], &mut cache)?;
                let got = model.lm_logits(&last)?.squeeze(0)?;
                worst = worst.max(max_rel_err(&got, &logits.get(end - 1)?)?);
                at = end;
            }
            rows.push(Row {
                what: format!("{name} cached decoding vs full forward ({tag})"),
                err: worst,
                bound: if dtype == DType::F32 { 1e-5 } else { 2e-2 },
            });
        }

        let mut model = TaskModel::new(
            Body::Llama(load(DType::F32)?),
            Task::Sft,
            None,
            Pooling::Last,
            0,
            device,
        )?;
        model.load_adapter(&AdapterFile::read(&d.join("adapter"), device)?)?;
        let (loss, grads) = model.loss_and_grads(&batch, 1.0)?;
        let loss_path = d.join("loss.json");
        let want_loss = read_json(&loss_path)?["loss"]
            .as_f64()
            .ok_or_else(|| anyhow!("{}: no number `loss`", loss_path.display()))?;
        rows.push(Row {
            what: format!("{name} LoRA loss vs PEFT"),
            err: rel_err(&loss, &Tensor::new(want_loss, &Device::Cpu)?)?,
            bound: 1e-5,
        });
        let want = candle_core::safetensors::load(d.join("grads.safetensors"), &Device::Cpu)?;
        let mut worst: f64 = 0.0;
        let mut seen = 0;
        for (layer, _, adapter) in model.adapters() {
            for p in adapter.params() {
                let key = format!("base_model.model.{layer}.{}", p.suffix);
                let theirs = want
                    .get(&key)
                    .ok_or_else(|| anyhow!("{name}: PEFT has no gradient {key}"))?;
                let ours = grads
                    .get(p.var.as_tensor())
                    .ok_or_else(|| anyhow!("{name}: no gradient for {key}"))?;
                worst = worst.max(max_rel_err(ours, theirs)?);
                seen += 1;
            }
        }
        if seen != want.len() {
            bail!(
                "{name}: {seen} adapter gradients against PEFT's {}",
                want.len()
            );
        }
        rows.push(Row {
            what: format!("{name} LoRA grads vs PEFT"),
            err: worst,
            bound: 1e-4,
        });
    }
    Ok(())
}

const WORDS: &[&str] = &[
    "the", "a", "movie", "was", "is", "very", "good", "great", "bad", "awful", "plot", "film",
];

fn write_data(dir: &Path) -> Result<()> {
    let mut cls = String::new();
    let mut sft = String::new();
    for i in 0..32 {
        let good = i % 2 == 0;
        let word = if good {
            ["good", "great"][i % 4 / 2]
        } else {
            ["bad", "awful"][i % 4 / 2]
        };
        let text = format!(
            "the {} {} {word}",
            ["movie", "film", "plot"][i % 3],
            ["was", "is"][i % 2]
        );
        let label = if good { "pos" } else { "neg" };
        cls += &format!("{}\n", serde_json::json!({"text": text, "label": label}));
        sft += &format!(
            "{}\n",
            serde_json::json!({"prompt": text, "completion": if good { "good" } else { "bad" }})
        );
    }
    std::fs::write(dir.join("cls.jsonl"), cls)?;
    std::fs::write(dir.join("sft.jsonl"), sft)?;
    Ok(())
}

/// A tiny BERT and a tiny LLaMA checkpoint (real file layouts, random weights) under `root`.
fn tiny_models(root: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let bert = root.join("bert");
    let s = BertShape::TINY;
    write_checkpoint(&bert, &s.config(), &s.tensors(1, DType::F32)?, 1)?;
    write_tokenizer(&bert, WORDS, TokenizerStyle::Bert)?;
    let llama = root.join("llama");
    let s = LlamaShape {
        vocab: 32,
        ..LlamaShape::TINY
    };
    let mut cfg = s.config();
    cfg["eos_token_id"] = 3.into();
    write_checkpoint(&llama, &cfg, &s.tensors(1, DType::F32)?, 1)?;
    write_tokenizer(&llama, WORDS, TokenizerStyle::Llama)?;
    Ok((bert, llama))
}

/// The training losses a run logged.
fn run_losses(dir: &Path) -> Result<Vec<f64>> {
    Ok(singlora::metrics::read_metrics(&dir.join("metrics.jsonl"))?
        .iter()
        .filter_map(|l| l.get("loss").and_then(|v| v.as_f64()))
        .collect())
}

/// The eval loss of the adapter in `run` on `data`, applied to `model` on the CPU in f32.
fn cpu_eval_loss(model: &Path, run: &Path, data: &Path) -> Result<f64> {
    let s = singlora::session::Session::load(model, run, Device::Cpu)?;
    let settings = singlora::data::DataSettings {
        max_length: 64,
        ..Default::default()
    };
    Ok(s.eval_file(data, &settings, 16)?.0.loss)
}

/// NF4 weights dequantised by the device's kernel against the CPU's dequantisation of the same
/// codes: f32 and bf16, a length the 8-wide kernel takes and one it does not. The kernel
/// computes the same f32 operations, so the bound is exact equality.
#[cfg(feature = "cuda")]
fn nf4_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use singlora::quant::nf4::Nf4Tensor;
    let Device::Cuda(dev) = device else {
        return Ok(());
    };
    for (what, dims) in [("8-wide", [96usize, 200]), ("scalar", [7, 9])] {
        let n = dims[0] * dims[1];
        let values: Vec<f32> = Tensor::randn(0f32, 0.05, n, &Device::Cpu)?.to_vec1()?;
        let q = Nf4Tensor::quantize(&values, &dims)?;
        let on_device = q.upload(dev)?;
        for dtype in [DType::F32, DType::BF16] {
            let want = q.to_tensor(dtype, &Device::Cpu)?.to_dtype(DType::F32)?;
            let got = on_device
                .to_tensor(dtype, device)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?;
            let diff = (got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            rows.push(Row {
                what: format!("NF4 dequantisation {what} {dtype:?} (max abs difference)"),
                err: diff as f64,
                bound: 0.0,
            });
        }
        // and back: the parts survive the round trip to the device
        let back = on_device.download()?;
        rows.push(Row {
            what: format!("NF4 parts copied to the device and back ({what})"),
            err: if back.parts() == q.parts() { 0.0 } else { 1.0 },
            bound: 0.0,
        });
    }
    Ok(())
}

/// FP8 with one scale per tensor: E4M3 codes from the device's kernel against candle's own
/// F8E4M3 conversion of the same scaled values on the CPU; a transpose; cuBLASLt's FP8 GEMM
/// (E4M3 × E4M3, and E5M2 × E4M3 as a gradient times a weight) against an f32 GEMM of the same
/// FP8 values, so that only the accumulation and the bf16 output differ.
#[cfg(feature = "cuda")]
fn fp8_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use singlora::ops::fp8;
    if device.is_cpu() {
        return Ok(());
    }
    let (m, n, k) = (128usize, 192usize, 256usize);
    let x = Tensor::randn(0f32, 1.0, (m, k), device)?.to_dtype(DType::BF16)?;
    let w = Tensor::randn(0f32, 0.02, (n, k), device)?.to_dtype(DType::BF16)?;
    let qx = fp8::quantize_tensor(&x, false)?;
    let back = fp8::dequantize_tensor(&qx, &x.to_dtype(DType::F32)?)?.to_device(&Device::Cpu)?;
    // the CPU reference: the same f32 scaling, then candle's F8E4M3 rounding
    let xc = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let amax = xc.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let inv = fp8::E4M3_MAX / amax;
    let want = xc
        .affine(inv as f64, 0.0)?
        .to_dtype(DType::F8E4M3)?
        .to_dtype(DType::F32)?
        .affine((amax / fp8::E4M3_MAX) as f64, 0.0)?;
    let diff = (&back - &want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    rows.push(Row {
        what: "FP8 E4M3 quantisation vs candle's F8E4M3 (max difference / amax)".into(),
        err: (diff / amax) as f64,
        bound: 1e-6,
    });
    // the 8-wide kernels the fast path takes: the same codes and scale
    for e5 in [false, true] {
        let q1 = fp8::quantize_tensor_with(&x, e5, false)?;
        let q8 = fp8::quantize_tensor_with(&x, e5, true)?;
        let like = x.to_dtype(DType::F32)?;
        rows.push(Row {
            what: format!(
                "FP8 {} quantisation, 8-wide kernels vs scalar",
                if e5 { "E5M2" } else { "E4M3" }
            ),
            err: rel_err(
                &fp8::dequantize_tensor(&q8, &like)?,
                &fp8::dequantize_tensor(&q1, &like)?,
            )?,
            bound: 0.0,
        });
    }
    let qt = fp8::transpose_tensor(&qx, &x)?;
    let like = x.to_dtype(DType::F32)?;
    let (d, dt) = (
        fp8::dequantize_tensor(&qx, &like)?,
        fp8::dequantize_tensor(&qt, &like)?,
    );
    rows.push(Row {
        what: "FP8 transpose".into(),
        err: rel_err(&dt.t()?.contiguous()?, &d)?,
        bound: 0.0,
    });
    let qw = fp8::quantize_tensor(&w, false)?;
    let wd = fp8::dequantize_tensor(&qw, &like)?;
    for (label, e5) in [("E4M3 x E4M3", false), ("E5M2 x E4M3", true)] {
        let qa = fp8::quantize_tensor(&x, e5)?;
        let ad = fp8::dequantize_tensor(&qa, &like)?;
        let got = fp8::matmul_nt(&qa, &qw, &x)?.to_dtype(DType::F32)?;
        let want = ad.matmul(&wd.t()?)?;
        rows.push(Row {
            what: format!("FP8 GEMM {label} vs f32 GEMM of the same values"),
            err: rel_err(&got, &want)?,
            bound: 1e-2,
        });
    }
    Ok(())
}

/// AdamW on the device (every f32 parameter in one launch, the clipping norm's sum of squares
/// in another) against the composed update on the CPU in f64: three updates of parameters of
/// the adapter roles (weight decay on A and B, LoRA+'s ratio on B), with the clipping off,
/// not reached and reached; the norms it returns; and a non-finite gradient, which must leave
/// every parameter as it was and say the loss diverged.
fn adamw_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use candle_core::Var;
    use singlora::adapter::{Param, ParamRole};
    use singlora::optim::{AdamW, AdamWConfig, GradAccumulator};
    let cpu = Device::Cpu;
    let shapes: [(&[usize], ParamRole); 4] = [
        (&[320, 8], ParamRole::A),
        (&[8, 768], ParamRole::B),
        (&[4096], ParamRole::Magnitude),
        (&[3, 5], ParamRole::HeadBias),
    ];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|(d, _)| Tensor::randn(0f64, 1.0, *d, &cpu))
        .collect::<candle_core::Result<_>>()?;
    let grads: Vec<Vec<Tensor>> = (0..3)
        .map(|_| init.iter().map(|t| t.randn_like(0.0, 0.05)).collect())
        .collect::<candle_core::Result<_>>()?;
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        lora_plus_ratio: Some(4.0),
        ..AdamWConfig::default()
    };
    let run = |d: &Device, dt: DType, clip: Option<f64>, grads: &[Vec<Tensor>]| {
        let vars: Vec<Var> = init
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dt)?.to_device(d)?))
            .collect::<candle_core::Result<_>>()?;
        let params = (vars.iter().zip(&shapes))
            .map(|(v, (_, role))| Param {
                suffix: "p",
                var: v.clone(),
                role: *role,
            })
            .collect();
        let mut opt = AdamW::new(params, cfg);
        let mut norms = vec![];
        let mut outcome = Ok(());
        for gs in grads {
            // the gradient of Σ v·g with respect to v is g
            let mut loss = Tensor::zeros((), dt, d)?;
            for (v, g) in vars.iter().zip(gs) {
                let g = g.to_dtype(dt)?.to_device(d)?;
                loss = (loss + (v.as_tensor() * g)?.sum_all()?)?;
            }
            let store = loss.backward()?;
            let mut acc = GradAccumulator::new(vars.clone());
            acc.add(&store)?;
            match opt.step(&mut acc, 1e-2, clip) {
                Ok(n) => norms.push(n.unwrap_or(0.0)),
                Err(e) => {
                    outcome = Err(e.to_string());
                    break;
                }
            }
        }
        let flat = vars
            .iter()
            .map(|v| {
                v.as_tensor()
                    .to_device(&cpu)?
                    .to_dtype(DType::F64)?
                    .flatten_all()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        anyhow::Ok((Tensor::cat(&flat, 0)?, norms, outcome))
    };
    // the gradients' global norm is about 0.05·√(12 815 elements) ≈ 6: 1 clips, 100 does not
    for (clip, what) in [
        (None, "no clipping"),
        (Some(100.0), "clipping not reached"),
        (Some(1.0), "clipping reached"),
    ] {
        let (got, gn, _) = run(device, DType::F32, clip, &grads)?;
        let (want, wn, _) = run(&cpu, DType::F64, clip, &grads)?;
        rows.push(Row {
            what: format!(
                "AdamW, 3 updates, {what} (F32, one launch) vs f64 on the CPU: parameters"
            ),
            err: rel_err(&got, &want)?,
            bound: 1e-6,
        });
        if clip.is_some() {
            let worst = (gn.iter().zip(&wn))
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-30))
                .fold(0f64, f64::max);
            rows.push(Row {
                what: format!("AdamW, 3 updates, {what} (F32, one launch) vs f64 on the CPU: the norms it returns"),
                err: worst,
                bound: 1e-5,
            });
        }
    }
    // a NaN in the second update's gradient: an error, and the parameters as after the first
    let mut bad = grads.clone();
    bad[1][2] = (&bad[1][2] * f64::NAN)?;
    let (got, _, outcome) = run(device, DType::F32, Some(1.0), &bad)?;
    let (want, _, _) = run(&cpu, DType::F64, Some(1.0), &grads[..1])?;
    let said = matches!(&outcome, Err(e) if e.contains("diverged"));
    rows.push(Row {
        what: "AdamW with a NaN gradient (F32, one launch): says the loss diverged (0 = yes)"
            .into(),
        err: if said { 0.0 } else { 1.0 },
        bound: 0.0,
    });
    rows.push(Row {
        what:
            "AdamW with a NaN gradient (F32, one launch): parameters as after the update before it"
                .into(),
        err: rel_err(&got, &want)?,
        bound: 1e-6,
    });
    Ok(())
}

/// The U-Net's convolution on the device (`ops::conv`: im2col and one GEMM) against candle's
/// convolution on the CPU in f64: each kernel size, stride and padding the U-Net and its input
/// gradients use, odd and even sides (widths that the 8-wide im2col takes and that it does
/// not), f32 and bf16; and the frozen convolution's input gradient against the CPU's, by
/// cuDNN where it is found and by the built-in convolution.
fn conv_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    let cpu = Device::Cpu;
    // the input gradient's kernel (transposed, taps reversed): one kernel on the device
    for k in [1, 3] {
        let wt = Tensor::randn(0f32, 1.0, (5, 6, k, k), &cpu)?;
        let got = singlora::ops::conv::flipped(&wt.to_device(device)?)?;
        rows.push(Row {
            what: format!("conv kernel flip {k}×{k} (F32) vs the CPU's (max abs difference)"),
            err: (got.to_device(&cpu)? - singlora::ops::conv::flipped(&wt)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()? as f64,
            bound: 0.0,
        });
    }
    // input gradients by cuDNN where it is found (the default), and by the built-in path
    let paths = match singlora::ops::conv::cudnn_version() {
        Some(v) => {
            eprintln!("convolutions' input gradients: cuDNN {v} found; both paths checked");
            vec![Some(v), None]
        }
        None => {
            eprintln!(
                "convolutions' input gradients: cuDNN not found (or SINGLORA_CUDNN=off); the built-in path only"
            );
            vec![None]
        }
    };
    for cudnn in paths {
        singlora::ops::conv::set_cudnn(cudnn.is_some());
        let path = match cudnn {
            Some(v) => format!("cuDNN {v}"),
            None => "built-in".to_string(),
        };
        let checked = conv_path_checks(device, &path, cudnn.is_none(), rows);
        singlora::ops::conv::set_cudnn(true);
        checked?;
    }
    Ok(())
}

/// [`conv_checks`]'s rows: the input gradients by the path switched on (`path` names it), and
/// the forward where `forward`.
fn conv_path_checks(device: &Device, path: &str, forward: bool, rows: &mut Vec<Row>) -> Result<()> {
    use candle_core::Var;
    use singlora::diffusion::unet::conv::frozen_conv2d;
    let cpu = Device::Cpu;
    for (k, stride, padding) in [(3, 1, 1), (1, 1, 0), (3, 2, 1), (3, 1, 2), (3, 1, 0)] {
        // 160 × 160: a padded plane larger than the shared memory the im2col kernel asks for, so
        // the kernels that read through the cache
        for (h, w) in [(8, 8), (7, 5), (9, 16), (160, 160)] {
            let x = Tensor::randn(0f64, 1.0, (2, 6, h, w), &cpu)?;
            let wt = Tensor::randn(0f64, 0.3, (5, 6, k, k), &cpu)?;
            let want = x.conv2d(&wt, padding, stride, 1, 1)?;
            let dtypes = [(DType::F32, 1e-5), (DType::BF16, 2e-2)];
            for (dtype, bound) in dtypes.into_iter().filter(|_| forward) {
                let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
                let got = singlora::ops::conv::conv2d(&on(&x)?, &on(&wt)?, padding, stride)?;
                rows.push(Row {
                    what: format!(
                        "conv2d {k}×{k} stride {stride} padding {padding}, {h}×{w} ({dtype:?}) vs f64 on the CPU"
                    ),
                    err: rel_err(&got, &want)?,
                    bound,
                });
            }
            // the input gradient of sum(y ⊙ G) through the frozen convolution
            let g = Tensor::randn(0f64, 1.0, want.dims(), &cpu)?;
            let grad_on = |d: &Device, dt: DType| -> Result<Tensor> {
                let xv = Var::from_tensor(&x.to_dtype(dt)?.to_device(d)?)?;
                let y = frozen_conv2d(&xv, &wt.to_dtype(dt)?.to_device(d)?, padding, stride)?;
                let grads = (y * g.to_dtype(dt)?.to_device(d)?)?.sum_all()?.backward()?;
                Ok(grads.get(&xv).context("no input gradient")?.clone())
            };
            let want = grad_on(&cpu, DType::F64)?;
            for (dtype, bound) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
                rows.push(Row {
                    what: format!(
                        "frozen conv2d {k}×{k} stride {stride} padding {padding}, {h}×{w}: input gradient ({path}, {dtype:?}) vs f64 on the CPU"
                    ),
                    err: rel_err(&grad_on(device, dtype)?, &want)?,
                    bound,
                });
            }
        }
    }
    Ok(())
}

/// Rows for a value and its input gradient against their references (f64 on the CPU).
fn both(
    rows: &mut Vec<Row>,
    what: &str,
    (y, d): (Tensor, Tensor),
    (yr, dr): (Tensor, Tensor),
    bound: f64,
) -> Result<()> {
    for (part, got, want) in [("value", y, yr), ("input gradient", d, dr)] {
        rows.push(Row {
            what: format!("{what} vs f64 on the CPU: {part}"),
            err: rel_err(&got, &want)?,
            bound,
        });
    }
    Ok(())
}

/// The gradients of `vars` in `grads`, each flattened, end to end, on the CPU in `dtype`.
fn flat_grads(
    grads: &candle_core::backprop::GradStore,
    vars: &[candle_core::Var],
    dtype: DType,
) -> Result<Tensor> {
    let flat = vars
        .iter()
        .map(|v| {
            let g = grads.get(v.as_tensor()).context("no adapter gradient")?;
            Ok(g.to_device(&Device::Cpu)?.to_dtype(dtype)?.flatten_all()?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&flat, 0)?)
}

/// One U-Net attention sublayer, x + attn(LayerNorm(x), ctx), at Stable Diffusion's head widths
/// and SingLoRA on its four projections: as one op on the device (bf16, the fused kernels
/// inside) against the sublayer recorded op by op in f64 on the CPU; the value, the input's
/// gradient and the adapters' gradients.
fn attention_sublayer_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use candle_core::Var;
    use singlora::adapter::inject::inject;
    use singlora::adapter::target::TargetSpec;
    use singlora::diffusion::unet::attention::{
        attention_sublayer, set_one_op_sublayers, Attention,
    };
    use singlora::diffusion::unet::norm::LayerNorm;
    let cpu = Device::Cpu;
    let (b, t, ctx_dim) = (2, 64, 48);
    for (what, c, heads, ctx_len) in [
        ("self-attention, heads of 40", 80, 2, None),
        ("self-attention, heads of 80", 160, 2, None),
        (
            "self-attention, heads of 160 (not padded: cuBLAS)",
            320,
            2,
            None,
        ),
        ("cross-attention to 77 keys, heads of 40", 80, 2, Some(77)),
    ] {
        let kv_dim = if ctx_len.is_some() { ctx_dim } else { c };
        let mut seed = 0u64;
        let mut rand = |dims: &[usize], std: f64| -> Result<Tensor> {
            seed += 1;
            let mut rng = singlora::rng::rng_for(seed, "gpu-check sublayer");
            Ok(singlora::rng::normal(
                &mut rng,
                std,
                dims,
                DType::F64,
                &cpu,
            )?)
        };
        let ws = [
            rand(&[c, c], 0.1)?,
            rand(&[c, kv_dim], 0.1)?,
            rand(&[c, kv_dim], 0.1)?,
            rand(&[c, c], 0.1)?,
        ];
        let bias = rand(&[c], 0.1)?;
        let (ln_w, ln_b) = ((rand(&[c], 0.2)? + 1.0)?, rand(&[c], 0.2)?);
        let x = rand(&[b, t, c], 1.0)?;
        let ctx = rand(&[b, ctx_len.unwrap_or(1), ctx_dim], 1.0)?;
        let g = rand(&[b, t, c], 1.0)?;
        let params: Vec<Tensor> = (0..4)
            .map(|_| rand(&[c.max(kv_dim), 8], 0.05))
            .collect::<Result<_>>()?;
        // value, input gradient and the adapters' gradients (concatenated) in `dt` on `dev`
        let run = |dt: DType, dev: &Device, one_op: bool| -> Result<(Tensor, Tensor, Tensor)> {
            let on = |t: &Tensor| t.to_dtype(dt).and_then(|t| t.to_device(dev));
            let names = ["to_q", "to_k", "to_v", "to_out.0"];
            let lins = [0, 1, 2, 3].map(|i| {
                let bias = (i == 3).then(|| on(&bias)).transpose();
                on(&ws[i])
                    .and_then(|w| Ok(AdaptedLinear::new(names[i], FrozenLinear::new(w, bias?))))
            });
            let [q, k, v, o] = lins;
            let mut attn = Attention::new([q?, k?, v?, o?], heads, false);
            let mut spec = AdapterSpec::new(AdapterKind::SingLora, 8, 8.0);
            if dt == DType::F64 {
                spec.dtype = DType::F64;
            }
            let clock = RampClock::new(RampSchedule::none(), 0);
            let mut ls = vec![];
            attn.linears_mut(&mut ls);
            let targets = TargetSpec::parse("to_q,to_k,to_v,to_out.0", None)?;
            inject(ls, &[], &spec, &targets, &clock)?;
            let mut ls = vec![];
            attn.linears(&mut ls);
            let vars: Vec<Var> = singlora::adapter::params_of(ls)
                .into_iter()
                .map(|p| p.var)
                .collect();
            for (v, p) in vars.iter().zip(&params) {
                let p = p.narrow(0, 0, v.dim(0)?)?;
                v.set(&p.to_dtype(v.dtype())?.to_device(dev)?)?;
            }
            let norm = LayerNorm::new(on(&ln_w)?, on(&ln_b)?, 1e-5);
            let xv = Var::from_tensor(&on(&x)?)?;
            let ctx = on(&ctx)?;
            set_one_op_sublayers(one_op);
            let y = attention_sublayer(&norm, &attn, &xv, ctx_len.map(|_| &ctx));
            set_one_op_sublayers(true);
            let y = y?;
            let gt = if dt == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            let grads = (y.to_dtype(gt)? * g.to_dtype(gt)?.to_device(dev)?)?
                .sum_all()?
                .backward()?;
            let dx = grads
                .get(xv.as_tensor())
                .context("no input gradient")?
                .clone();
            Ok((y, dx, flat_grads(&grads, &vars, DType::F64)?))
        };
        let (yr, dr, pr) = run(DType::F64, &cpu, false)?;
        let (y, d, p) = run(DType::BF16, device, true)?;
        let what = format!("U-Net attention sublayer as one op, {what} (BF16)");
        both(rows, &what, (y, d), (yr, dr), 3e-2)?;
        rows.push(Row {
            what: format!("{what} vs f64 on the CPU: adapter gradients"),
            err: rel_err(&p, &pr)?,
            bound: 3e-2,
        });
    }
    Ok(())
}

/// The cross-attention kernels (bf16) against the composed form in f64 on the CPU: the value
/// and the gradients of q, k and v, for each head width they are built for, a full context of
/// 77 keys, a short one and the most they take.
fn cross_attention_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use candle_core::Var;
    let cpu = Device::Cpu;
    // 150 and 33 queries: the kernels' tiles of 80 rows and of 16 a warp end part way
    for (d, s, t, heads) in [(40, 77, 150, 2), (64, 7, 33, 3), (80, 80, 64, 2)] {
        use singlora::diffusion::unet::attention::attend;
        use singlora::ops::cross_attention::cross_attention;
        let inner = heads * d;
        let mk = |n: usize| Tensor::randn(0f64, 1.0, (2, n, inner), &cpu);
        let (q, k, v) = (mk(t)?, mk(s)?, mk(s)?);
        let g = Tensor::randn(0f64, 1.0, (2, t, inner), &cpu)?;
        // the kernels on the device (called directly: they take no part in the U-Net until
        // these rows pass), the composed form on the CPU
        let run_on = |dev: &Device, dt: DType| -> Result<Vec<Tensor>> {
            let vars = [&q, &k, &v]
                .into_iter()
                .map(|x| Ok(Var::from_tensor(&x.to_dtype(dt)?.to_device(dev)?)?))
                .collect::<Result<Vec<Var>>>()?;
            let [qv, kv, vv] = [0, 1, 2].map(|i| vars[i].as_tensor());
            let y = match dev.is_cpu() {
                true => attend(qv, kv, vv, heads, false)?,
                false => cross_attention(qv, kv, vv, heads)?.with_context(|| {
                    format!("cross-attention: the kernels do not take heads of {d} with {s} keys")
                })?,
            };
            let grads = (y.to_dtype(DType::F64)? * g.to_device(dev)?)?
                .sum_all()?
                .backward()?;
            let mut out = vec![y];
            for x in [qv, kv, vv] {
                out.push(grads.get(x).context("no gradient")?.clone());
            }
            Ok(out)
        };
        let got = run_on(device, DType::BF16)?;
        let want = run_on(&cpu, DType::F64)?;
        for (part, a, b) in ["value", "dq", "dk", "dv"]
            .into_iter()
            .zip(&got)
            .zip(&want)
            .map(|((p, a), b)| (p, a, b))
        {
            rows.push(Row {
                what: format!("cross-attention fused, heads of {d}, {s} keys, {t} queries (BF16) vs f64 on the CPU: {part}"),
                err: rel_err(a, b)?,
                bound: 2e-2,
            });
        }
    }
    Ok(())
}

/// The U-Net's fused norms and GEGLU against their composed forms on the CPU in f64 (values
/// and the input gradient of sum(y ⊙ G)), and the tiny U-Net fixture on the device against diffusers' output
/// (f32 and bf16 weights) with its input gradient against the CPU's.
fn unet_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use candle_core::Var;
    use singlora::diffusion::unet::norm::{GroupNorm, LayerNorm};
    use singlora::diffusion::unet::UNet;
    let cpu = Device::Cpu;
    let w = (Tensor::randn(0f64, 0.3, 24, &cpu)? + 1.0)?;
    let b = Tensor::randn(0f64, 0.3, 24, &cpu)?;
    // rows of 6·35 elements, a block each; and of 6·1517, each split among 8 blocks (the last
    // chunk shorter)
    let mut images = Vec::new();
    for dims in [(3, 24, 5, 7), (2, 24, 37, 41)] {
        images.push((
            (Tensor::randn(0f64, 2.0, dims, &cpu)? + 0.5)?,
            Tensor::randn(0f64, 1.0, dims, &cpu)?,
        ));
    }
    let xt = (Tensor::randn(0f64, 2.0, (3, 9, 24), &cpu)? - 0.3)?;
    let gt = Tensor::randn(0f64, 1.0, (3, 9, 24), &cpu)?;
    let gt_geglu = Tensor::randn(0f64, 1.0, (3, 9, 12), &cpu)?;
    // halves of 16: the 8-wide kernels
    let xt_geglu16 = (Tensor::randn(0f64, 2.0, (3, 9, 32), &cpu)? - 0.3)?;
    let gt_geglu16 = Tensor::randn(0f64, 1.0, (3, 9, 16), &cpu)?;
    // value and input gradient of `f` on `x` with output gradient `g`
    let run = |f: &dyn Fn(&Tensor) -> singlora::error::Result<Tensor>,
               x: &Tensor,
               g: &Tensor|
     -> Result<(Tensor, Tensor)> {
        let v = Var::from_tensor(x)?;
        let y = f(v.as_tensor())?;
        let grads = (y.to_dtype(g.dtype())? * g)?.sum_all()?.backward()?;
        let dx = grads.get(&v).context("no input gradient")?.clone();
        Ok((y, dx))
    };
    for (dt, bound) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let on = |t: &Tensor| t.to_dtype(dt).and_then(|t| t.to_device(device));
        let gn_ref = GroupNorm::new(w.clone(), b.clone(), 4, 1e-5);
        let gn = GroupNorm::new(on(&w)?, on(&b)?, 4, 1e-5);
        for (silu, image) in [false, true].into_iter().flat_map(|s| [(s, 0), (s, 1)]) {
            let (x, g) = &images[image];
            let (yr, dr) = run(
                &|x| {
                    let y = gn_ref.forward_composed(x)?;
                    Ok(if silu { y.silu()? } else { y })
                },
                x,
                g,
            )?;
            let (y, d) = run(
                &|x| {
                    if silu {
                        gn.forward_silu(x)
                    } else {
                        gn.forward(x)
                    }
                },
                &on(x)?,
                &on(g)?,
            )?;
            let what = if silu {
                "GroupNorm + SiLU"
            } else {
                "GroupNorm"
            };
            let n = x.elem_count() / x.dim(0)? / 4;
            both(
                rows,
                &format!("U-Net {what} fused, rows of {n} ({dt:?})"),
                (y, d),
                (yr, dr),
                bound,
            )?;
        }
        let ln_ref = LayerNorm::new(w.clone(), b.clone(), 1e-5);
        let ln = LayerNorm::new(on(&w)?, on(&b)?, 1e-5);
        let (yr, dr) = run(&|x| ln_ref.forward(x), &xt, &gt)?;
        let (y, d) = run(&|x| ln.forward(x), &on(&xt)?, &on(&gt)?)?;
        let what = format!("U-Net LayerNorm fused ({dt:?})");
        both(rows, &what, (y, d), (yr, dr), bound)?;
        // GEGLU on h = [a | b] (3, 9, 2·12), and with halves of 16 (the 8-wide kernels): the
        // CPU's f64 is the composed form
        for (h, g, what) in [
            (&xt, &gt_geglu, "U-Net GEGLU fused"),
            (&xt_geglu16, &gt_geglu16, "U-Net GEGLU fused, halves of 16"),
        ] {
            let geglu = |h: &Tensor| singlora::ops::geglu::geglu(h);
            let (yr, dr) = run(&geglu, h, g)?;
            let (y, d) = run(&geglu, &on(h)?, &on(g)?)?;
            both(rows, &format!("{what} ({dt:?})"), (y, d), (yr, dr), bound)?;
        }
    }
    // the whole tiny U-Net: diffusers' output, and the sample's gradient against the CPU's
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../singlora/tests/fixtures/unet-tiny");
    let dir = if dir.is_dir() {
        dir
    } else {
        PathBuf::from("crates/singlora/tests/fixtures/unet-tiny")
    };
    let io = singlora::checkpoint::TensorFile::open(&dir.join("io.safetensors"))?.load_all(&cpu)?;
    let get = |k: &str| -> Result<Tensor> {
        Ok(io
            .get(k)
            .with_context(|| format!("io.safetensors: no {k}"))?
            .to_dtype(DType::F32)?)
    };
    let (sample, t, ctx) = (get("sample")?, get("timesteps")?, get("context")?);
    let want = get("out")?;
    let gs = Tensor::randn(0f32, 1.0, want.dims(), &cpu)?;
    let unet_cpu = UNet::load(&dir, DType::F32, &cpu)?;
    let (_, dref) = run(&|x| unet_cpu.forward(x, &t, &ctx, None), &sample, &gs)?;
    // bf16: every activation rounded to 8 bits of mantissa through the whole net; a wrong
    // kernel differs by the output's own size
    for (dt, bound) in [(DType::F32, 1e-4), (DType::BF16, 8e-2)] {
        let unet = UNet::load(&dir, dt, device)?;
        let (y, d) = run(
            &|x| unet.forward(x, &t.to_device(device)?, &ctx.to_device(device)?, None),
            &sample.to_device(device)?,
            &gs.to_device(device)?,
        )?;
        rows.push(Row {
            what: format!("tiny U-Net ({dt:?} weights) vs diffusers' output"),
            err: max_rel_err(&y, &want)?,
            bound,
        });
        rows.push(Row {
            what: format!("tiny U-Net ({dt:?} weights): the sample's gradient vs the CPU's (f32)"),
            err: rel_err(&d, &dref)?,
            bound,
        });
    }
    // SingLoRA on every attention projection, its factors moved off their init: the adapter
    // variables' gradients against the CPU's (f32, sublayers recorded), with the transformers'
    // sublayers recorded op by op and as one op each
    let adapter_grads = |dt: DType, dev: &Device, taped: bool| -> Result<Tensor> {
        use singlora::adapter::inject::inject;
        use singlora::adapter::target::TargetSpec;
        let mut unet = UNet::load(&dir, dt, dev)?;
        let spec = AdapterSpec::new(AdapterKind::SingLora, 2, 4.0);
        let clock = RampClock::new(RampSchedule::none(), 0);
        let targets = TargetSpec::parse("to_q,to_k,to_v,to_out.0", None)?;
        inject(unet.linears_mut(), &[], &spec, &targets, &clock)?;
        let vars: Vec<Var> = singlora::adapter::params_of(unet.linears())
            .into_iter()
            .map(|p| p.var)
            .collect();
        for (i, v) in vars.iter().enumerate() {
            let mut rng = singlora::rng::rng_for(i as u64, "gpu-check");
            let a = singlora::rng::normal(&mut rng, 0.3, v.dims(), DType::F32, &cpu)?;
            v.set(&a.to_device(dev)?.to_dtype(v.dtype())?)?;
        }
        let on = |x: &Tensor| x.to_dtype(dt).and_then(|x| x.to_device(dev));
        let g = gs.to_device(dev)?;
        let loss = |y: &Tensor| -> singlora::Result<(Tensor, ())> {
            Ok(((y.to_dtype(DType::F32)? * &g)?.sum_all()?, ()))
        };
        singlora::diffusion::unet::set_taped_steps(taped);
        if taped && !unet.tape_ready() {
            anyhow::bail!("the tiny U-Net with SingLoRA does not run on the U-Net's tape");
        }
        let inputs = (&on(&sample)?, &t.to_device(dev)?, &on(&ctx)?, None);
        let step = unet.taped_step(inputs, loss);
        // back to the library's default
        singlora::diffusion::unet::set_taped_steps(true);
        let (_, grads) = step?;
        flat_grads(&grads, &vars, DType::F32)
    };
    let want = adapter_grads(DType::F32, &cpu, false)?;
    for (one_op, taped) in [(false, false), (true, false), (true, true)] {
        singlora::diffusion::unet::attention::set_one_op_sublayers(one_op);
        let how = match (one_op, taped) {
            (false, _) => "sublayers recorded",
            (true, false) => "sublayers one op",
            (true, true) => "the step on the U-Net's tape",
        };
        for (dt, bound) in [(DType::F32, 1e-4), (DType::BF16, 8e-2)] {
            rows.push(Row {
                what: format!(
                    "tiny U-Net ({dt:?} weights), SingLoRA on q, k, v, out, {how}: adapter gradients vs the CPU's (f32)"
                ),
                err: rel_err(&adapter_grads(dt, device, taped)?, &want)?,
                bound,
            });
        }
    }
    singlora::diffusion::unet::attention::set_one_op_sublayers(true);
    Ok(())
}

fn training_checks(device_name: &str, rows: &mut Vec<Row>) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    write_data(root)?;
    let (bert, llama) = tiny_models(root)?;
    use singlora::quant::BaseDtype;
    for (model, data, task, method, base) in [
        (&bert, "cls.jsonl", "classify", "singlora", BaseDtype::Auto),
        (&llama, "cls.jsonl", "classify", "lora", BaseDtype::Auto),
        (&llama, "sft.jsonl", "sft", "singlora", BaseDtype::Auto),
        (&llama, "sft.jsonl", "sft", "dora", BaseDtype::Auto),
        // a 4-bit base: the device dequantises it with its kernel, the CPU on the host
        (&llama, "sft.jsonl", "sft", "singlora", BaseDtype::Nf4),
    ] {
        let run = |device: &str, out: &str| -> Result<Vec<f64>> {
            let cfg = TrainConfig {
                model: model.clone(),
                train: root.join(data),
                task: task.parse()?,
                method: method.parse()?,
                batch_size: 8,
                max_steps: Some(4),
                lr: Some(1e-2),
                device: device.parse()?,
                base_dtype: base,
                ..TrainConfig::default()
            };
            let dir = root.join(out);
            train(cfg, &dir, true, std::sync::Arc::new(Silent))?;
            run_losses(&dir)
        };
        let l_cpu = run("cpu", "cpu-run")?;
        let l_dev = run(device_name, "dev-run")?;
        let family = match (model == &bert, base) {
            (true, _) => "bert",
            (false, BaseDtype::Nf4) => "llama (NF4 base)",
            (false, _) => "llama",
        };
        let lc = Tensor::new(l_cpu.as_slice(), &Device::Cpu)?;
        let ld = Tensor::new(l_dev.as_slice(), &Device::Cpu)?;
        rows.push(Row {
            what: format!("{family} {task} {method}: losses of 4 updates"),
            err: rel_err(&ld, &lc)?,
            bound: 3e-2,
        });
        // the two adapters applied to the same (CPU, f32) model: does the device-trained one
        // compute the same function? (Adam's first steps from B = 0 move by ±lr whatever the
        // gradient's size, so comparing raw LoRA weights would flag bf16 rounding of tiny
        // gradients, not an error.)
        let eval = |dir: &str| cpu_eval_loss(model, &root.join(dir), &root.join(data));
        let (e_cpu, e_dev) = (eval("cpu-run")?, eval("dev-run")?);
        rows.push(Row {
            what: format!("{family} {task} {method}: model after 4 updates (eval loss)"),
            err: ((e_dev - e_cpu) / e_cpu).abs(),
            bound: 2e-2,
        });
    }
    Ok(())
}

/// The adapters' low-rank epilogue kernels (bf16, tensor-core products) against composed ops
/// in f32: r 8 and 16, h a column block of a wider buffer, a width and a row count that are
/// not multiples of the kernels' 32-column and 16-row tiles, a term on one SwiGLU input only.
#[cfg(feature = "cuda")]
fn low_rank_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    let (m, n) = (75, 200);
    let bf = |t: Tensor| t.to_dtype(DType::BF16);
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    for r in [8usize, 16] {
        let w = r + 8;
        let a = bf(Tensor::randn(0f32, 1.0, (m, n), device)?)?;
        let b = bf(Tensor::randn(0f32, 1.0, (m, n), device)?)?;
        let h = bf(Tensor::randn(0f32, 1.0, (m, w), device)?)?;
        let u = bf(Tensor::randn(0f32, 0.5, (n, r), device)?)?;
        let u2 = bf(Tensor::randn(0f32, 0.5, (n, r), device)?)?;
        let c = 0.75f32;
        // the term from columns 8..8 + r of h
        let term = |u: &Tensor| -> Result<Tensor> {
            Ok((f32_of(&h.narrow(1, 8, r)?)?.matmul(&f32_of(u)?.t()?)? * c as f64)?)
        };
        // g·U and out + c·gᵀ·h in one pass over g (300 × 200: partial 128-row and 64-column
        // tiles; out starts non-zero, as SingLoRA's dA does when dD is added first)
        {
            let g = bf(Tensor::randn(0f32, 1.0, (300, n), device)?)?;
            let hg = bf(Tensor::randn(0f32, 1.0, (300, r), device)?)?;
            let out = Tensor::randn(0f32, 1.0, (n, r), device)?;
            let (gu, du) = singlora::ops::g_pass_products(&g, &u, &hg, &out, c)?;
            let gu_want = f32_of(&g)?.matmul(&f32_of(&u)?)?;
            let du_want = (&out + (f32_of(&g)?.t()?.matmul(&f32_of(&hg)?)? * c as f64)?)?;
            for (what, got, want, bound) in [
                ("g·U", &gu, &gu_want, 1e-2),
                ("out + c·gᵀ·h", &du, &du_want, 1e-4),
            ] {
                rows.push(Row {
                    what: format!("one pass over g r={r}: {what}"),
                    err: rel_err(got, want)?,
                    bound,
                });
            }
        }
        let got = singlora::ops::add_low_rank(&a, &b, (&h, 8, &u, c))?;
        let want = ((f32_of(&a)? + f32_of(&b)?)? + term(&u)?)?;
        rows.push(Row {
            what: format!("low-rank epilogue r={r}: a + b + c·h·Uᵀ"),
            err: rel_err(&got, &want)?,
            bound: 1e-2,
        });
        let sigmoid = |x: &Tensor| -> Result<Tensor> { Ok((x.neg()?.exp()? + 1.0)?.recip()?) };
        // both terms written back over g and u; the gate's alone, g and u left as they were
        for both in [true, false] {
            let tg = (&h, 8, &u, c);
            let tu = (&h, 8, &u2, c);
            let (y, g2, u2o) = singlora::ops::swiglu_low_rank(
                &a,
                &b,
                (Some(tg), if both { Some(tu) } else { None }),
                both,
            )?;
            let gw = (f32_of(&a)? + term(&u)?)?;
            let uw = if both {
                (f32_of(&b)? + term(&u2)?)?
            } else {
                f32_of(&b)?
            };
            let yw = ((&gw * sigmoid(&gw)?)? * &uw)?;
            let (g_kept, u_kept) = if both {
                (gw.clone(), uw.clone())
            } else {
                (f32_of(&a)?, f32_of(&b)?)
            };
            let err = rel_err(&y, &yw)?
                .max(rel_err(&g2, &g_kept)?)
                .max(rel_err(&u2o, &u_kept)?);
            rows.push(Row {
                what: format!(
                    "low-rank epilogue r={r}: SwiGLU with {} (output, g, u)",
                    if both {
                        "both terms, written back"
                    } else {
                        "the gate's term"
                    }
                ),
                err,
                bound: 1e-2,
            });
        }
        // SwiGLU's backward with terms on g, u and dy, and on dy alone
        let dy = bf(Tensor::randn(0f32, 1.0, (m, n), device)?)?;
        let u3 = bf(Tensor::randn(0f32, 0.5, (n, r), device)?)?;
        for all in [true, false] {
            let (tg, tu) = (
                all.then_some((&h, 8, &u, c)),
                all.then_some((&h, 8, &u2, c)),
            );
            let (dg, du) =
                singlora::ops::swiglu_bwd_low_rank((&a, &b, &dy), [tg, tu, Some((&h, 8, &u3, c))])?;
            let (gw, uw) = if all {
                ((f32_of(&a)? + term(&u)?)?, (f32_of(&b)? + term(&u2)?)?)
            } else {
                (f32_of(&a)?, f32_of(&b)?)
            };
            let dw = (f32_of(&dy)? + term(&u3)?)?;
            let sg = sigmoid(&gw)?;
            let dg_w = ((&dw * &uw)? * (&sg * ((&gw * (1.0 - &sg)?)? + 1.0)?)?)?;
            let du_w = ((&dw * &gw)? * &sg)?;
            rows.push(Row {
                what: format!(
                    "low-rank epilogue r={r}: SwiGLU backward with {} (dg, du)",
                    if all {
                        "terms on g, u, dy"
                    } else {
                        "dy's term"
                    }
                ),
                err: rel_err(&dg, &dg_w)?.max(rel_err(&du, &du_w)?),
                bound: 1e-2,
            });
        }
        // RoPE and the head split with the term: 2 × 37 tokens, 3 heads of 64 and of 128
        for hd in [64usize, 128] {
            let (bt, t, heads) = (2, 37, 3);
            let w_ = heads * hd;
            let x = bf(Tensor::randn(0f32, 1.0, (bt * t, w_), device)?)?;
            let hh = bf(Tensor::randn(0f32, 1.0, (bt * t, r + 8), device)?)?;
            let uu = bf(Tensor::randn(0f32, 0.5, (w_, r), device)?)?;
            let inv: Vec<f64> = (0..hd / 2)
                .map(|i| 1.0 / 500f64.powf(2.0 * i as f64 / hd as f64))
                .collect();
            let cpu = Device::Cpu;
            let (c64, s64) = singlora::ops::rope_tables(&inv, t, DType::F64, &cpu)?;
            let (c32, s32) = singlora::ops::rope_tables(&inv, t, DType::F32, device)?;
            let full = (f32_of(&x)?
                + (f32_of(&hh.narrow(1, 8, r)?)?.matmul(&f32_of(&uu)?.t()?)? * c as f64)?)?
                .to_device(&cpu)?
                .to_dtype(DType::F64)?
                .reshape((bt, t, w_))?;
            for rotate in [true, false] {
                let got = singlora::ops::rope_low_rank(
                    &x.reshape((bt, t, w_))?,
                    (&c32, &s32),
                    heads,
                    rotate,
                    (&hh, 8, &uu, c),
                )?;
                let want = singlora::ops::rope_split(&full, &c64, &s64, heads, rotate)?;
                rows.push(Row {
                    what: format!(
                        "low-rank epilogue r={r}: {} with the term, head size {hd}",
                        if rotate { "RoPE and split" } else { "split" }
                    ),
                    err: rel_err(&got, &want)?,
                    bound: 1e-2,
                });
            }
        }
    }
    Ok(())
}

/// The small LLaMA of the fast-path checks: GQA, head size 64 (the q/k/v terms take the RoPE
/// kernel's epilogue), an MLP width that is not a multiple of the kernels' tiles.
const CHECK_SHAPE: LlamaShape = LlamaShape {
    hidden: 128,
    intermediate: 344,
    layers: 2,
    heads: 2,
    kv_heads: 1,
    vocab: 256,
};

/// The largest relative difference between two gradient stores over `model`'s parameters;
/// an error naming the parameter where either has none.
fn worst_grad_err(
    model: &TaskModel,
    a: &candle_core::backprop::GradStore,
    b: &candle_core::backprop::GradStore,
    label: &str,
) -> Result<f64> {
    let mut worst: f64 = 0.0;
    for p in model.params() {
        let (Some(x), Some(y)) = (a.get(p.var.as_tensor()), b.get(p.var.as_tensor())) else {
            bail!("{label}: no gradient for {}", p.suffix);
        };
        worst = worst.max(rel_err(x, y)?);
    }
    Ok(worst)
}

/// One `loss_and_grads` step of `model` on `batch`, with a row (with the `cuda` feature) that
/// the batch took the CUDA fast path, so that no comparison passes by comparing autograd with
/// itself.
fn fast_step(
    model: &TaskModel,
    batch: &singlora::data::Batch,
    what: &str,
    rows: &mut Vec<Row>,
) -> Result<(Tensor, candle_core::backprop::GradStore)> {
    #[cfg(feature = "cuda")]
    let before = singlora::model::llama::fast_forwards_run();
    let step = model.loss_and_grads(batch, 1.0)?;
    #[cfg(feature = "cuda")]
    rows.push(Row {
        what: format!("{what}: the batch took the fast path"),
        err: if singlora::model::llama::fast_forwards_run() > before {
            0.0
        } else {
            1.0
        },
        bound: 0.0,
    });
    #[cfg(not(feature = "cuda"))]
    let _ = (what, rows);
    Ok(step)
}

/// One `loss_and_grads` step of `model` on `batch` (the CUDA fast path) against candle's
/// autograd through the same model: rows that the batch took the fast path, for the loss and
/// for the worst adapter gradient, each named after `what`. Returns the fast path's loss and
/// gradients for further comparisons.
fn fast_against_autograd(
    model: &TaskModel,
    batch: &singlora::data::Batch,
    what: &str,
    rows: &mut Vec<Row>,
) -> Result<(Tensor, candle_core::backprop::GradStore)> {
    let (loss_f, g_f) = fast_step(model, batch, what, rows)?;
    let loss_a = model.loss(batch)?;
    let g_a = loss_a.backward()?;
    rows.push(Row {
        what: format!("{what}: loss"),
        err: rel_err(&loss_f, &loss_a)?,
        bound: 1e-2,
    });
    rows.push(Row {
        what: format!("{what}: adapter gradients (worst)"),
        err: worst_grad_err(model, &g_f, &g_a, what)?,
        bound: 3e-2,
    });
    Ok((loss_f, g_f))
}

/// The fast path on packed rows (several examples end to end in a row, attention within each,
/// positions from 0 at each start, a row ending in padding) against autograd on the same rows:
/// loss and adapter gradients, SingLoRA and LoRA (bf16 storage: the fused attention kernels).
fn packed_fast_path_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use singlora::data::{collate_rows, Encoded};
    use singlora_lab::bench::llama::{random_example, random_model};
    let shape = CHECK_SHAPE;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let items: Vec<Encoded> = [15usize, 25, 40, 10, 12, 8]
        .iter()
        .map(|&len| random_example(len, shape.vocab, &mut x))
        .collect();
    let batch = collate_rows(&items, &[vec![0, 1], vec![2], vec![3, 4, 5]], 0, device)?;
    if batch.segments.is_none() {
        bail!("packed check: the batch has no segments");
    }
    for method in ["singlora", "lora"] {
        let model = random_model("check", shape, Some(method.parse()?), 8, device)?;
        for p in model.params() {
            p.var.set(&p.var.as_tensor().randn_like(0.0, 0.02)?)?;
        }
        let what = format!("packed rows, fast path {method}");
        fast_against_autograd(&model, &batch, &what, rows)?;
    }
    Ok(())
}

/// The fast path with layer checkpointing (only each layer's input kept, the layer run again
/// in the backward) against the fast path keeping everything: the same kernels on the same
/// values, so the loss and every adapter gradient agree to rounding; plain and packed rows,
/// SingLoRA and DoRA.
fn checkpoint_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use singlora::data::{collate_rows, Encoded};
    use singlora_lab::bench::llama::{random_example, random_model, set_checkpoint_layers};
    let shape = CHECK_SHAPE;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let items: Vec<Encoded> = [15usize, 25, 40, 10, 12, 8]
        .iter()
        .map(|&len| random_example(len, shape.vocab, &mut x))
        .collect();
    let plain = collate_rows(&items, &[vec![0], vec![1], vec![2], vec![3]], 0, device)?;
    let packed = collate_rows(&items, &[vec![0, 1], vec![2], vec![3, 4, 5]], 0, device)?;
    for method in ["singlora", "dora"] {
        let mut model = random_model("check", shape, Some(method.parse()?), 8, device)?;
        for p in model.params() {
            p.var.set(&p.var.as_tensor().randn_like(0.0, 0.02)?)?;
        }
        for (rows_kind, batch) in [("plain", &plain), ("packed", &packed)] {
            set_checkpoint_layers(&mut model, false);
            let (loss_k, g_k) = model.loss_and_grads(batch, 1.0)?;
            set_checkpoint_layers(&mut model, true);
            let what = format!("layer checkpointing, {method}, {rows_kind} rows");
            let (loss_c, g_c) = fast_step(&model, batch, &what, rows)?;
            rows.push(Row {
                what: format!("{what}: loss vs keeping every layer"),
                err: rel_err(&loss_c, &loss_k)?,
                bound: 1e-6,
            });
            rows.push(Row {
                what: format!("{what}: adapter gradients vs keeping every layer (worst)"),
                err: worst_grad_err(&model, &g_c, &g_k, &what)?,
                bound: 1e-3,
            });
        }
        set_checkpoint_layers(&mut model, false);
    }
    Ok(())
}

/// The bound of the adapter gradients' relative error on an FP8 base against bf16 (below).
#[cfg(feature = "cuda")]
const FP8_GRAD_BOUND: f64 = 0.15;

/// The fast path on an FP8 base (its GEMMs on the FP8 tensor cores, activations in E4M3 and
/// output gradients in E5M2) against the fast path on a bf16 base holding the same weight
/// values: they differ by the activations' and gradients' FP8 rounding only; a wrong operand
/// or transpose would differ by the whole (a relative error near 1). The loss moves by well
/// under a percent. The adapter gradients go through E5M2, whose 2 mantissa bits round each
/// value by up to 12.5% (about 5% RMS), and the sums that make a gradient cancel, so their
/// relative error is about 0.1 (0.095 to 0.100 on an H100, either accumulation mode): the
/// bound for them is 0.15. Dimensions multiples of 16, as FP8
/// needs. Also that the step ran every frozen product in FP8 (the GEMM count).
#[cfg(feature = "cuda")]
fn fp8_fast_path_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use singlora_lab::bench::llama::{random_model, random_tokens};
    let shape = LlamaShape {
        intermediate: 352,
        ..CHECK_SHAPE
    };
    for method in ["singlora", "lora"] {
        let mut model = random_model("check", shape, Some(method.parse()?), 8, device)?;
        model.body.quantize_fp8()?;
        for p in model.params() {
            p.var.set(&p.var.as_tensor().randn_like(0.0, 0.02)?)?;
        }
        let batch = random_tokens(4, 32, shape.vocab, device)?;
        // the forward's GEMMs in the fast accumulation mode (an option)
        model.fast.fp8_fast_accum = true;
        let (loss_fa, g_fa) = model.loss_and_grads(&batch, 1.0)?;
        model.fast.fp8_fast_accum = false;
        let before = singlora::ops::fp8::gemms_run();
        let (loss_q, g_q) = model.loss_and_grads(&batch, 1.0)?;
        // 7 projections × 2 layers, forward and backward
        let gemms = singlora::ops::fp8::gemms_run() - before;
        for l in model.body.linears_mut() {
            if l.base().is_quantized() {
                let w = l.base().weight()?;
                l.base_mut().set_weight(w);
            }
        }
        let (loss_d, g_d) = model.loss_and_grads(&batch, 1.0)?;
        let loss_err = rel_err(&loss_q, &loss_d)?;
        rows.push(Row {
            what: format!("FP8 fast path {method} vs bf16 with the same weights: loss"),
            err: loss_err,
            bound: 2e-2,
        });
        rows.push(Row {
            what: format!("FP8 fast path {method} vs bf16 with the same weights: gradients"),
            err: worst_grad_err(&model, &g_q, &g_d, &format!("FP8 fast path {method}"))?,
            bound: FP8_GRAD_BOUND,
        });
        let what = format!("FP8 fast path {method}, fast accumulation");
        rows.push(Row {
            what: format!("{what}, vs bf16 with the same weights: loss"),
            err: rel_err(&loss_fa, &loss_d)?,
            bound: 2e-2,
        });
        rows.push(Row {
            what: format!("{what}, vs bf16 with the same weights: gradients"),
            err: worst_grad_err(&model, &g_fa, &g_d, &what)?,
            bound: FP8_GRAD_BOUND,
        });
        rows.push(Row {
            what: format!("FP8 fast path {method}: FP8 GEMMs run in one step ({gemms} of 28)"),
            err: if gemms == 28 { 0.0 } else { 1.0 },
            bound: 0.0,
        });
    }
    Ok(())
}

/// The fast path on an NF4 base (each weight dequantised into a scratch buffer just before its
/// product) against autograd on the same NF4 base, and against the fast path on a dense base
/// holding the same dequantised values (which must give the same numbers): SingLoRA and DoRA.
fn nf4_fast_path_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use singlora_lab::bench::llama::{random_model, random_tokens};
    let shape = CHECK_SHAPE;
    for method in ["singlora", "dora"] {
        let mut model = random_model("check", shape, Some(method.parse()?), 8, device)?;
        model.body.quantize_nf4()?;
        for p in model.params() {
            p.var.set(&p.var.as_tensor().randn_like(0.0, 0.02)?)?;
        }
        let batch = random_tokens(3, 40, shape.vocab, device)?;
        let (loss_q, g_q) = model.loss_and_grads(&batch, 1.0)?;
        let loss_a = model.loss(&batch)?;
        let g_a = loss_a.backward()?;
        // the same model with its NF4 weights replaced by their dequantised values
        for l in model.body.linears_mut() {
            if l.base().is_quantized() {
                let w = l.base().weight()?;
                l.base_mut().set_weight(w);
            }
        }
        let (loss_d, g_d) = model.loss_and_grads(&batch, 1.0)?;
        let label = format!("NF4 fast path {method}");
        let worst = |other| worst_grad_err(&model, &g_q, other, &label);
        rows.push(Row {
            what: format!("NF4 fast path {method} vs autograd on NF4: loss"),
            err: rel_err(&loss_q, &loss_a)?,
            bound: 1e-2,
        });
        rows.push(Row {
            what: format!("NF4 fast path {method} vs autograd on NF4: gradients (worst)"),
            err: worst(&g_a)?,
            bound: 3e-2,
        });
        rows.push(Row {
            what: format!("NF4 fast path {method} vs dense fast path, same values: loss"),
            err: rel_err(&loss_q, &loss_d)?,
            bound: 1e-6,
        });
        rows.push(Row {
            what: format!("NF4 fast path {method} vs dense fast path, same values: gradients"),
            err: worst(&g_d)?,
            bound: 1e-5,
        });
    }
    Ok(())
}

/// `--base-dtype same` on the GPU: a tiny LLaMA GGUF file in Q4_K_M, its projections kept as
/// blocks in the GPU's memory and dequantised by candle's kernels into the fast path's scratch
/// buffer just before each product, against the same file dequantised at load (on the CPU) and
/// run dense on the same device. The weights must agree to bf16's rounding (candle's GPU and
/// CPU dequantisation may round the last f32 bit differently, moving a rare bf16 weight by one
/// step), and so must the loss and every adapter gradient; and the batch must take the fast
/// path. SingLoRA, and DoRA (whose norms read the dequantised weight).
fn gguf_same_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use singlora::adapter::target::TargetSpec;
    use singlora::gguf::model::GgufQuant;
    use singlora::model::Pretrained;
    use singlora::quant::BaseDtype;
    use singlora_lab::bench::llama::random_tokens;
    let tmp = tempfile::tempdir()?;
    let shape = LlamaShape::K_BLOCKS;
    let base = tmp.path().join("llama");
    write_checkpoint(&base, &shape.config(), &shape.tensors(5, DType::F32)?, 1)?;
    singlora::synthetic::write_bpe_tokenizer(&base)?;
    let file = tmp.path().join("llama-q4_k_m.gguf");
    singlora::merge::gguf::convert_to_gguf(&base, &file, false, GgufQuant::Q4KM)?;
    let batch = random_tokens(3, 40, shape.vocab, device)?;
    for method in ["singlora", "dora"] {
        let model_of = |b: BaseDtype| -> Result<TaskModel> {
            let pre = Pretrained::load_as(&file, DType::BF16, device, b)?;
            let mut m = TaskModel::new(pre.body, Task::Sft, None, Pooling::Last, 0, device)?;
            let kind = method.parse::<singlora::adapter::Method>()?.kind();
            let targets = TargetSpec::parse(
                "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                None,
            )?;
            m.inject(
                &AdapterSpec::new(kind, 8, 8.0),
                &targets,
                RampClock::new(RampSchedule::none(), 0),
            )?;
            Ok(m)
        };
        let kept = model_of(BaseDtype::Same)?;
        let dense = model_of(BaseDtype::Auto)?;
        let what = format!("GGUF Q4_K base kept (same), {method}");
        let mut weight_err: f64 = 0.0;
        let mut n_kept = 0;
        for (k, d) in kept.body.linears().iter().zip(dense.body.linears()) {
            if k.base().is_quantized() {
                n_kept += 1;
                weight_err = weight_err.max(max_rel_err(&k.base().weight()?, &d.base().weight()?)?);
            }
        }
        rows.push(Row {
            what: format!("{what}: {n_kept} weights dequantised on the GPU vs on the CPU"),
            err: if n_kept == 0 { 1.0 } else { weight_err },
            bound: 1e-2,
        });
        // the same non-zero adapter values in both models, so every factor gets a gradient
        let (kp, dp) = (kept.params(), dense.params());
        for (a, b) in kp.iter().zip(&dp) {
            let v = a.var.as_tensor().randn_like(0.0, 0.02)?;
            a.var.set(&v)?;
            b.var.set(&v)?;
        }
        let (loss_k, g_k) = fast_step(&kept, &batch, &what, rows)?;
        let (loss_d, g_d) = dense.loss_and_grads(&batch, 1.0)?;
        rows.push(Row {
            what: format!("{what} vs the file dequantised at load: loss"),
            err: rel_err(&loss_k, &loss_d)?,
            bound: 1e-3,
        });
        let mut worst: f64 = 0.0;
        for (a, b) in kp.iter().zip(&dp) {
            let (Some(x), Some(y)) = (g_k.get(a.var.as_tensor()), g_d.get(b.var.as_tensor()))
            else {
                bail!("{what}: no gradient for {}", a.suffix);
            };
            worst = worst.max(rel_err(x, y)?);
        }
        rows.push(Row {
            what: format!("{what} vs the file dequantised at load: gradients (worst)"),
            err: worst,
            bound: 1e-2,
        });
    }
    Ok(())
}

/// The LLaMA layers' own forward and backward (the CUDA fast path of `loss_and_grads`)
/// against candle's autograd through the same model on the same device: loss and every
/// adapter gradient (GQA, a padded row, LoRA's B made non-zero so both factors get gradients).
fn fast_path_checks(device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use singlora_lab::bench::llama::{random_model, random_tokens};
    let shape = CHECK_SHAPE;
    for (method, label) in [
        ("singlora", "singlora"),
        ("lora", "lora"),
        ("rslora", "rslora"),
        ("dora", "dora"),
    ] {
        let mut model = random_model("check", shape, Some(method.parse()?), 8, device)?;
        for p in model.params() {
            if p.suffix.contains("lora_B") {
                p.var.set(&(p.var.as_tensor().randn_like(0.0, 0.02)?))?;
            }
        }
        let mut batch = random_tokens(3, 40, shape.vocab, device)?;
        // the last row padded after 25 tokens
        let mut mask = vec![1f32; 3 * 40];
        mask[2 * 40 + 25..].iter_mut().for_each(|m| *m = 0.0);
        batch.mask = Tensor::from_vec(mask, (3, 40), device)?;
        // the kernel-choice comparisons below use them (CUDA builds)
        #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
        let (loss_f, g_f) =
            fast_against_autograd(&model, &batch, &format!("fast path {label}"), rows)?;
        if method == "singlora" {
            // the fast path's other kernel choices against its default (all on)
            #[cfg(feature = "cuda")]
            {
                let mut with = |f: fn(&mut FastPath)| {
                    f(&mut model.fast);
                    let r = model.loss_and_grads(&batch, 1.0);
                    model.fast = FastPath::default();
                    r
                };
                let unflashed = with(|f| f.flash_attention = false);
                let two_gemms = with(|f| f.g_pass = false);
                // the 8-wide elementwise and RMSNorm kernels against the scalar ones, with the
                // adapters' terms by their own GEMMs in both (the scalar run has no epilogue
                // kernels); then the epilogue against those GEMMs
                let unfused = with(|f| f.fused_low_rank = false);
                let scalar = with(|f| {
                    f.fused_low_rank = false;
                    f.vectorised = false;
                });
                let (loss_u, g_u) = unfused?;
                let (loss_s, g_s) = scalar?;
                let (loss_n, g_n) = unflashed?;
                let (loss_2, g_2) = two_gemms?;
                for (what, (l1, g1), (l2, g2), bound) in [
                    (
                        "fast path: one pass over g vs two GEMMs (loss, gradients)",
                        (&loss_f, &g_f),
                        (&loss_2, &g_2),
                        1e-2,
                    ),
                    (
                        "fast path: fused attention vs GEMMs and softmax (loss, gradients)",
                        (&loss_f, &g_f),
                        (&loss_n, &g_n),
                        3e-2,
                    ),
                    (
                        "fast path: 8-wide kernels vs scalar (loss, gradients)",
                        (&loss_u, &g_u),
                        (&loss_s, &g_s),
                        1e-2,
                    ),
                    (
                        "fast path: low-rank epilogue vs its GEMMs (loss, gradients)",
                        (&loss_f, &g_f),
                        (&loss_u, &g_u),
                        3e-2,
                    ),
                ] {
                    let mut worst: f64 = rel_err(l1, l2)?;
                    for p in model.params() {
                        if let (Some(a), Some(b)) =
                            (g1.get(p.var.as_tensor()), g2.get(p.var.as_tensor()))
                        {
                            worst = worst.max(rel_err(a, b)?);
                        }
                    }
                    rows.push(Row {
                        what: what.into(),
                        err: worst,
                        bound,
                    });
                }
            }
            // attention probabilities recomputed in the backward instead of kept (on the
            // GEMM-and-softmax path: the fused attention kernels keep none)
            model.fast.flash_attention = false;
            let kept = model.loss_and_grads(&batch, 1.0);
            singlora_lab::bench::llama::set_recompute(&mut model, true);
            let recomputed = model.loss_and_grads(&batch, 1.0);
            model.fast = FastPath::default();
            let ((loss_k, g_k), (loss_r, g_r)) = (kept?, recomputed?);
            let mut worst: f64 = rel_err(&loss_k, &loss_r)?;
            for p in model.params() {
                if let (Some(a), Some(b)) = (g_k.get(p.var.as_tensor()), g_r.get(p.var.as_tensor()))
                {
                    worst = worst.max(rel_err(a, b)?);
                }
            }
            rows.push(Row {
                what: "fast path: attention recomputed vs kept (loss, gradients)".into(),
                err: worst,
                bound: 1e-6,
            });
        }
    }
    Ok(())
}

/// Data-parallel training over `devices` against training on the first of them alone, with
/// the same global batch: the losses of every update and the trained adapters' eval loss on
/// the CPU. 33 rows at batch 8 leave a last batch of one row (empty shards on every rank but
/// the first); a small bucket makes the LLaMA backward start several reductions.
fn data_parallel_checks(devices: &[String], rows: &mut Vec<Row>) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    write_data(root)?;
    // 33 rows: the 32 of write_data and one more
    for f in ["cls.jsonl", "sft.jsonl"] {
        let text = std::fs::read_to_string(root.join(f))?;
        let first = text.lines().next().unwrap_or_default().to_string();
        std::fs::write(root.join(f), format!("{text}{first}\n"))?;
    }
    let (bert, llama) = tiny_models(root)?;
    let n = devices.len();
    for (model, data, task, method, bucket) in [
        (&llama, "sft.jsonl", "sft", "singlora", 200),
        (
            &llama,
            "sft.jsonl",
            "sft",
            "lora",
            singlora::dist::default_bucket(),
        ),
        (&llama, "cls.jsonl", "classify", "singlora", 200),
        (
            &bert,
            "cls.jsonl",
            "classify",
            "lora",
            singlora::dist::default_bucket(),
        ),
    ] {
        let run = |devs: Option<Vec<String>>, out: &str| -> Result<Vec<f64>> {
            let cfg = TrainConfig {
                model: model.clone(),
                train: root.join(data),
                task: task.parse()?,
                method: method.parse()?,
                batch_size: 8,
                epochs: 2,
                ramp_steps: Some(2),
                lr: Some(1e-2),
                device: devices[0].parse()?,
                devices: devs
                    .map(|d| d.iter().map(|x| x.parse()).collect::<Result<Vec<_>, _>>())
                    .transpose()?,
                bucket_values: bucket,
                ..TrainConfig::default()
            };
            let dir = root.join(out);
            train(cfg, &dir, true, std::sync::Arc::new(Silent))?;
            run_losses(&dir)
        };
        let l1 = run(None, "one")?;
        let ln = run(Some(devices.to_vec()), "many")?;
        let family = if model == &bert { "bert" } else { "llama" };
        if l1.len() != ln.len() {
            bail!(
                "{family} {task} {method}: {} updates on one GPU, {} on {n}",
                l1.len(),
                ln.len()
            );
        }
        rows.push(Row {
            what: format!(
                "{n} ranks {family} {task} {method}: losses of {} updates",
                l1.len()
            ),
            err: rel_err(
                &Tensor::new(ln.as_slice(), &Device::Cpu)?,
                &Tensor::new(l1.as_slice(), &Device::Cpu)?,
            )?,
            bound: 3e-2,
        });
        let eval = |dir: &str| cpu_eval_loss(model, &root.join(dir), &root.join(data));
        let (e1, en) = (eval("one")?, eval("many")?);
        rows.push(Row {
            what: format!("{n} ranks {family} {task} {method}: trained model (eval loss)"),
            err: ((en - e1) / e1).abs(),
            bound: 2e-2,
        });
    }
    Ok(())
}

pub fn run(device_name: &str, devices: Option<&[String]>) -> Result<()> {
    let device = device_name
        .parse::<singlora::device::DeviceSpec>()?
        .open()?;
    let mut rows = vec![];
    if let Some(d) = devices {
        // the data-parallel checks alone (the single-device ones are a separate call)
        data_parallel_checks(d, &mut rows)?;
        return report(&rows, &d.join(","));
    }
    op_checks(&device, &mut rows)?;
    adapter_checks(&device, &mut rows)?;
    family_checks(&device, &mut rows)?;
    if !device.is_cpu() {
        #[cfg(feature = "cuda")]
        low_rank_checks(&device, &mut rows)?;
        fast_path_checks(&device, &mut rows)?;
        // the quantised bases and packed rows: a group that fails to run is a failed row, and
        // the checks after it still run
        type Group = fn(&Device, &mut Vec<Row>) -> Result<()>;
        #[allow(unused_mut)] // extended with the CUDA-only groups
        let mut groups: Vec<(&str, Group)> = vec![
            ("NF4 fast path", nf4_fast_path_checks),
            ("GGUF base kept on the GPU", gguf_same_checks),
            ("packed rows", packed_fast_path_checks),
            ("U-Net", unet_checks),
            ("U-Net convolution", conv_checks),
            ("AdamW", adamw_checks),
            ("cross-attention kernels", cross_attention_checks),
            ("U-Net attention sublayer", attention_sublayer_checks),
            ("layer checkpointing", checkpoint_checks),
        ];
        #[cfg(feature = "cuda")]
        groups.extend([
            ("NF4 kernel", nf4_checks as Group),
            ("FP8 kernels and GEMM", fp8_checks),
            ("FP8 fast path", fp8_fast_path_checks),
        ]);
        for (name, group) in groups {
            if let Err(e) = group(&device, &mut rows) {
                rows.push(Row {
                    what: format!("{name}: {e}"),
                    err: f64::INFINITY,
                    bound: 0.0,
                });
            }
        }
    }
    training_checks(device_name, &mut rows)?;
    report(&rows, device_name)
}

fn report(rows: &[Row], device_name: &str) -> Result<()> {
    let w = rows.iter().map(|r| r.what.len()).max().unwrap_or(10);
    println!(
        "{:<w$}  {:>10}  {:>8}  ok",
        "check (device vs CPU reference)", "rel. error", "bound"
    );
    let mut failed = 0;
    for r in rows {
        let ok = r.err.is_finite() && r.err <= r.bound;
        failed += usize::from(!ok);
        println!(
            "{:<w$}  {:>10.2e}  {:>8.0e}  {}",
            r.what,
            r.err,
            r.bound,
            if ok { "yes" } else { "NO" }
        );
    }
    if failed > 0 {
        bail!("{failed} of {} checks failed", rows.len());
    }
    println!("all {} checks passed on {device_name}", rows.len());
    Ok(())
}
