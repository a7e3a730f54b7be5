//! `singlora-lab bench-*`: timed training steps (benchmarks print tables; tests never time).

use std::path::PathBuf;

use anyhow::Result;
use candle_core::DType;
use clap::Args;
use singlora::adapter::ramp::{RampClock, RampSchedule};
use singlora::adapter::target::TargetSpec;
use singlora::adapter::{AdapterSpec, Method};
use singlora::data::Task;
use singlora::device::DeviceSpec;
use singlora::model::{FastPath, Pretrained, TaskModel};
use singlora::synthetic::LlamaShape;
use singlora_lab::shapes;

#[derive(Args, Debug)]
pub struct StepArgs {
    /// A checkpoint directory (e.g. all-MiniLM-L6-v2).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value = "singlora")]
    method: String,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value = "query,key,value,attention.output.dense")]
    targets: String,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// BERT-family encoders on the CPU: candle's autograd instead of the layers' own forward
    /// and backward (what `SINGLORA_CPU_AUTOGRAD=1` does to `singlora train`).
    #[arg(long)]
    cpu_autograd: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn step(a: StepArgs) -> Result<()> {
    let device = a.device.open()?;
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let pre = Pretrained::load(&a.model, dtype, &device)?;
    let pooling = pre.default_pooling();
    let vocab = pre.tokenizer.get_vocab_size(true);
    let mut model = TaskModel::new(pre.body, Task::Classify, Some(2), pooling, 0, &device)?;
    model.fast.cpu_encoder = !a.cpu_autograd;
    let method: Method = a.method.parse()?;
    let spec = AdapterSpec::new(method.kind(), a.rank, a.rank as f64);
    model.inject(
        &spec,
        &TargetSpec::parse(&a.targets, None)?,
        RampClock::new(RampSchedule::none(), 0),
    )?;
    let batch = singlora_lab::bench::random_batch(a.batch, a.seq, vocab, 2, &device)?;
    let dev = device.clone();
    let t = singlora_lab::bench::time_steps(&model, &batch, a.warmup, a.steps, || {
        Ok(dev.synchronize()?)
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&t)?);
    } else {
        println!(
            "{} r={} batch {}x{}: median {:.1} ms/step (min {:.1}; forward {:.1}, backward {:.1}, optimizer {:.1}), {:.0} tokens/s over {} steps",
            a.method, a.rank, a.batch, a.seq, t.median_ms, t.min_ms, t.forward_ms, t.backward_ms, t.optimizer_ms, t.tokens_per_s, t.steps
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct LlamaArgs {
    /// tinyllama, 7b, 70b (LLaMA-2-70B's shape), or tiny (a test-sized model).
    #[arg(long, default_value = "tinyllama")]
    shape: String,
    /// The frozen base's linear weights: bf16 (f32 on the CPU), nf4 (random NF4 weights, made
    /// from their parts: the dense base is never held), q4k (random Q4_K blocks, kept as
    /// `--base-dtype same` keeps a GGUF file's) or fp8 (the bf16 weights quantised to E4M3,
    /// multiplied on the FP8 tensor cores; CUDA).
    #[arg(long, default_value = "bf16")]
    base_dtype: String,
    /// Comma-separated: base (the frozen-base floor), singlora, lora, rslora, lora-plus, dora.
    #[arg(long, default_value = "base,singlora,lora,dora")]
    methods: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 512)]
    seq: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value = "cuda")]
    device: DeviceSpec,
    /// Also measure the bf16 matmul ceiling (8192³) for the utilisation column.
    #[arg(long)]
    ceiling: bool,
    /// Print one JSON line per method.
    #[arg(long)]
    json: bool,
    /// Instead of timing steps, time the stages of one step (CUDA fast path) from events.
    #[arg(long)]
    kernel_profile: bool,
    /// Recompute activations in the backward instead of keeping them: the SwiGLU output, and
    /// the attention probabilities on the GEMM-and-softmax path (the fused bf16 attention
    /// kernels never keep them).
    /// Keep only each layer's input in the forward and run the layer again in the backward
    /// (activation checkpointing; the CUDA fast path).
    #[arg(long)]
    checkpoint_layers: bool,
    #[arg(long, alias = "recompute-attention")]
    recompute: bool,
    #[command(flatten)]
    fast: FastArgs,
}

/// The CUDA fast path's kernel choices, each on unless turned off here (to compare: every
/// choice computes the same function).
#[derive(Args, Debug)]
pub struct FastArgs {
    /// Separate GEMMs for each adapter of q, k, v (and gate, up) instead of one shared per input.
    #[arg(long)]
    no_grouped: bool,
    /// The adapters' rank-r terms by GEMMs of their own instead of in the kernels that read the
    /// projections' outputs next.
    #[arg(long)]
    no_fused_low_rank: bool,
    /// An adapter's g·U and gᵀ·h by two GEMMs instead of one pass over g.
    #[arg(long)]
    no_g_pass: bool,
    /// GEMMs and a softmax instead of the fused (flash) attention kernels.
    #[arg(long)]
    no_flash_attention: bool,
    /// Query heads per block of the fused attention's dK/dV kernel (a divisor of the query
    /// heads per KV head; otherwise the default).
    #[arg(long)]
    flash_heads: Option<usize>,
    /// The scalar element-wise and row-wise kernels instead of the 8-wide ones.
    #[arg(long)]
    no_vectorised: bool,
    /// FP8 base: the forward's GEMMs in cuBLASLt's fast accumulation mode.
    #[arg(long)]
    fp8_fast_accum: bool,
}

impl FastArgs {
    fn fast_path(&self) -> FastPath {
        FastPath {
            grouped: !self.no_grouped,
            fused_low_rank: !self.no_fused_low_rank,
            g_pass: !self.no_g_pass,
            flash_attention: !self.no_flash_attention,
            flash_heads: self.flash_heads,
            vectorised: !self.no_vectorised,
            fp8_fast_accum: self.fp8_fast_accum,
            ..FastPath::default()
        }
    }
}

pub fn llama(a: LlamaArgs) -> Result<()> {
    use singlora_lab::bench::llama::{matmul_ceiling, run, Recompute};
    let device = a.device.open()?;
    let fast = a.fast.fast_path();
    let shape = shape_of(&a.shape)?;
    let base = match a.base_dtype.as_str() {
        "bf16" | "nf4" | "q4k" | "fp8" => a.base_dtype.as_str(),
        other => anyhow::bail!("--base-dtype {other}: bf16, nf4, q4k or fp8"),
    };
    if a.kernel_profile {
        return kernel_profile(&a, shape, &device);
    }
    let ceiling = if a.ceiling {
        Some(matmul_ceiling(
            8192,
            if device.is_cpu() {
                DType::F32
            } else {
                DType::BF16
            },
            &device,
        )?)
    } else {
        None
    };
    if let (Some(c), false) = (ceiling, a.json) {
        println!("matmul ceiling (8192^3, bf16): {c:.0} TFLOP/s");
    }
    if !a.json {
        println!(
            "{:<10} {:<18} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>6}",
            "shape",
            "method",
            "ms/step",
            "fwd ms",
            "bwd ms",
            "opt ms",
            "tokens/s",
            "trainable",
            "peak GiB",
            "MFU"
        );
    }
    for (_, method) in methods_of(&a.methods)? {
        let r = run(
            &a.shape,
            shape,
            method,
            a.rank,
            a.batch,
            a.seq,
            a.warmup,
            a.steps,
            &device,
            Recompute {
                activations: a.recompute,
                layers: a.checkpoint_layers,
            },
            fast,
            base,
        )?;
        if a.json {
            let mut v = serde_json::to_value(&r)?;
            v["impl"] = serde_json::json!("singlora");
            v["recompute"] = serde_json::json!(a.recompute);
            v["checkpoint_layers"] = serde_json::json!(a.checkpoint_layers);
            if fast != FastPath::default() {
                v["fast"] = serde_json::json!(format!("{fast:?}"));
            }
            if let Some(c) = ceiling {
                v["ceiling_tflops"] = serde_json::json!(c);
                v["mfu"] = serde_json::json!(r.tflops / c);
            }
            println!("{}", serde_json::to_string(&v)?);
        } else {
            println!(
                "{:<10} {:<18} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.0} {:>12} {:>10} {:>6}",
                r.shape,
                r.method,
                r.timing.median_ms,
                r.timing.forward_ms,
                r.timing.backward_ms,
                r.timing.optimizer_ms,
                r.timing.tokens_per_s,
                r.trainable_params,
                r.peak_memory_gib.map_or("-".into(), |g| format!("{g:.1}")),
                ceiling.map_or("-".into(), |c| format!("{:.0}%", 100.0 * r.tflops / c)),
            );
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// tinyllama, 7b, or tiny.
    #[arg(long, default_value = "7b")]
    shape: String,
    /// base, singlora, lora, dora, …
    #[arg(long, default_value = "singlora")]
    method: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 512)]
    seq: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value = "cuda")]
    device: DeviceSpec,
    #[arg(long)]
    json: bool,
}

pub fn profile(a: ProfileArgs) -> Result<()> {
    let device = a.device.open()?;
    let shape = shape_of(&a.shape)?;
    let method = method_of(&a.method)?;
    let rows =
        singlora_lab::bench::profile::profile(shape, method, a.rank, a.batch, a.seq, &device)?;
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    let total: f64 = rows
        .iter()
        .filter(|r| r.per_step > 0 && r.class != "attention (part)")
        .map(|r| r.step_ms)
        .sum();
    println!("| class | component | fwd ms | bwd ms | per step | ms per step | share |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let share = if r.class == "attention (part)" {
            "(in attention)".to_string()
        } else if r.per_step == 0 {
            "(a part)".to_string()
        } else {
            format!("{:.1}%", 100.0 * r.step_ms / total)
        };
        println!(
            "| {} | {} | {:.2} | {:.2} | {} | {:.1} | {} |",
            r.class, r.component, r.forward_ms, r.backward_ms, r.per_step, r.step_ms, share
        );
    }
    println!("| total | | | | | {total:.1} | 100% |");
    Ok(())
}

#[derive(Args, Debug)]
pub struct ScalingArgs {
    /// tinyllama, 7b, or tiny.
    #[arg(long, default_value = "7b")]
    shape: String,
    /// base, singlora, lora, dora, …
    #[arg(long, default_value = "singlora")]
    method: String,
    /// Rows per GPU (the global batch grows with the GPUs, as with PyTorch DDP).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 512)]
    seq: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// The GPUs; rows are measured on the first 1, 2, 4, … of them (and all).
    #[arg(long, value_delimiter = ',', default_value = "cuda:0,cuda:1")]
    devices: Vec<DeviceSpec>,
    /// f32 values per gradient bucket.
    #[arg(long, default_value_t = singlora::dist::default_bucket())]
    bucket: usize,
    #[arg(long)]
    json: bool,
}

/// `base` (the frozen-base floor, no adapter) or an adapter method.
fn method_of(name: &str) -> Result<Option<Method>> {
    Ok(if name == "base" {
        None
    } else {
        Some(name.parse()?)
    })
}

/// The comma-separated `--methods` list: each name with its method (None for `base`).
fn methods_of(list: &str) -> Result<Vec<(&str, Option<Method>)>> {
    list.split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| Ok((m, method_of(m)?)))
        .collect()
}

fn shape_of(name: &str) -> Result<LlamaShape> {
    Ok(match name {
        "tinyllama" => shapes::TINYLLAMA,
        "7b" => shapes::LLAMA_7B,
        "70b" => shapes::LLAMA_70B,
        "tiny-k" => LlamaShape::K_BLOCKS,
        "tiny" => LlamaShape {
            hidden: 64,
            intermediate: 176,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 256,
        },
        other => anyhow::bail!("unknown shape `{other}`: tinyllama, 7b, 70b or tiny"),
    })
}

/// Data-parallel scaling: the same per-GPU step on 1, 2, 4, … GPUs, adapter gradients summed
/// over NCCL (overlapping the backward) before every update.
pub fn scaling(a: ScalingArgs) -> Result<()> {
    use singlora_lab::bench::llama::{random_model, random_tokens};
    let shape = shape_of(&a.shape)?;
    let method = method_of(&a.method)?;
    let mut counts: Vec<usize> = std::iter::successors(Some(1usize), |n| Some(n * 2))
        .take_while(|&n| n <= a.devices.len())
        .collect();
    if counts.last() != Some(&a.devices.len()) {
        counts.push(a.devices.len());
    }
    if !a.json {
        println!(
            "{:<8} {:<10} {:>5} {:>10} {:>12} {:>12} {:>10} {:>10}",
            "shape", "method", "GPUs", "ms/step", "tokens/s", "per GPU", "scaling", "peak GiB"
        );
    }
    let mut one_gpu = None;
    for &n in &counts {
        let devices = &a.devices[..n];
        let makers: Vec<Option<singlora::dist::MakeCollective>> = if n == 1 {
            vec![None]
        } else {
            singlora::dist::group_makers(devices, a.bucket)?
                .into_iter()
                .map(Some)
                .collect()
        };
        let results: Vec<Result<(singlora_lab::bench::StepTiming, Option<u64>)>> =
            std::thread::scope(|s| {
                let hs: Vec<_> = devices
                    .iter()
                    .zip(makers)
                    .map(|(dev, make)| {
                        let a = &a;
                        s.spawn(move || -> Result<_> {
                            let device = dev.open()?;
                            let model = random_model(&a.shape, shape, method, a.rank, &device)?;
                            let group = match make {
                                Some(m) => Some(m(&device)?),
                                None => None,
                            };
                            let b = random_tokens(a.batch, a.seq, shape.vocab, &device)?;
                            let mut peak = 0u64;
                            let d = device.clone();
                            let t = singlora_lab::bench::time_steps_in(
                                &model,
                                &b,
                                a.warmup,
                                a.steps,
                                || {
                                    d.synchronize()?;
                                    if let Some(m) =
                                        singlora_lab::bench::llama::device_memory_used(&d)
                                    {
                                        peak = peak.max(m);
                                    }
                                    Ok(())
                                },
                                group.as_deref(),
                            )?;
                            Ok((t, (peak > 0).then_some(peak)))
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("a rank panicked")))
                    })
                    .collect()
            });
        let mut timings = vec![];
        for (i, r) in results.into_iter().enumerate() {
            timings.push(r.map_err(|e| anyhow::anyhow!("{}: {e}", devices[i]))?);
        }
        // a step is as slow as its slowest rank
        let ms = timings.iter().map(|(t, _)| t.median_ms).fold(0.0, f64::max);
        let peak = timings.iter().filter_map(|(_, p)| *p).max();
        let tps = (n * a.batch * a.seq) as f64 / (ms / 1e3);
        let base = *one_gpu.get_or_insert(tps);
        let eff = tps / (n as f64 * base);
        let method_name = method.map_or("base".to_string(), |m| m.to_string());
        if a.json {
            println!(
                "{}",
                serde_json::json!({"impl": "singlora", "shape": a.shape, "method": method_name,
                    "gpus": n, "batch_per_gpu": a.batch, "seq": a.seq, "median_ms": ms,
                    "tokens_per_s": tps, "scaling_efficiency": eff,
                    "peak_memory_gib": peak.map(|p| p as f64 / (1u64 << 30) as f64)})
            );
        } else {
            println!(
                "{:<8} {:<10} {:>5} {:>10.1} {:>12.0} {:>12.0} {:>9.1}% {:>10}",
                a.shape,
                method_name,
                n,
                ms,
                tps,
                tps / n as f64,
                100.0 * eff,
                peak.map_or("-".into(), |p| format!(
                    "{:.1}",
                    p as f64 / (1u64 << 30) as f64
                )),
            );
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn kernel_profile(a: &LlamaArgs, shape: LlamaShape, device: &candle_core::Device) -> Result<()> {
    use singlora_lab::bench::llama::Recompute;
    for (m, method) in methods_of(&a.methods)? {
        let rows = singlora_lab::bench::llama::kernel_profile(
            &a.shape,
            shape,
            method,
            a.rank,
            a.batch,
            a.seq,
            device,
            Recompute {
                activations: a.recompute,
                layers: a.checkpoint_layers,
            },
            a.fast.fast_path(),
            &a.base_dtype,
        )?;
        let total: f64 = rows.iter().map(|r| r.ms).sum();
        if a.json {
            for r in &rows {
                println!(
                    "{}",
                    serde_json::json!({"shape": a.shape, "method": m, "stage": r.label, "ms": r.ms, "host_ms": r.host_ms, "count": r.count})
                );
            }
            continue;
        }
        println!(
            "{} {m}, {} base, batch {} x {}: one step's forward and backward by stage",
            a.shape, a.base_dtype, a.batch, a.seq
        );
        println!("| stage | ms | host ms | times | share |");
        println!("|---|---|---|---|---|");
        let mut sorted = rows.clone();
        sorted.sort_by(|x, y| y.ms.total_cmp(&x.ms));
        for r in sorted {
            println!(
                "| {} | {:.2} | {:.2} | {} | {:.1}% |",
                r.label,
                r.ms,
                r.host_ms,
                r.count,
                100.0 * r.ms / total
            );
        }
        println!("| total | {total:.2} | | | 100% |");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn kernel_profile(_: &LlamaArgs, _: LlamaShape, _: &candle_core::Device) -> Result<()> {
    anyhow::bail!("--kernel-profile times the CUDA fast path: build with the `cuda` feature")
}

#[derive(Args, Debug)]
pub struct UNetArgs {
    /// A diffusers unet/ folder (bench/unet_step.py --write makes a random SD 1.5-shaped one).
    #[arg(long)]
    unet: PathBuf,
    /// Comma-separated methods: singlora, lora, rslora, lora-plus, dora.
    #[arg(long, default_value = "singlora,lora")]
    methods: String,
    /// Comma-separated batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value = "to_q,to_k,to_v,to_out.0")]
    targets: String,
    /// Latent side (64 for 512-pixel images).
    #[arg(long, default_value_t = 64)]
    latent: usize,
    /// Text context length.
    #[arg(long, default_value_t = 77)]
    context: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value = "cuda")]
    device: DeviceSpec,
    /// Print one JSON line per configuration.
    #[arg(long)]
    json: bool,
    /// Also time one step's stages on CUDA (the forward by block kind, the backward, the
    /// update) and the U-Net's building blocks alone (forward, forward + backward), and print
    /// them.
    #[arg(long)]
    profile: bool,
    /// Record the transformers' attention sublayers, entries and exits op by op instead of as
    /// one autograd op each (the library's default).
    #[arg(long)]
    recorded_sublayers: bool,
    /// Run each step through candle's autograd between the blocks instead of the U-Net's own
    /// record of the forward (the library's default), for comparison.
    #[arg(long)]
    no_tape: bool,
}

/// Which convolution the U-Net's steps take on `device`: cuDNN's (with its version) or the
/// built-in one.
fn conv_path(device: &candle_core::Device) -> String {
    match (device.is_cuda(), singlora::ops::conv::cudnn_version()) {
        (true, Some(v)) => format!("cuDNN {v}"),
        (true, None) => "im2col + cuBLAS".to_string(),
        (false, _) => "candle".to_string(),
    }
}

pub fn unet(a: UNetArgs) -> Result<()> {
    let device = a.device.open()?;
    singlora::diffusion::unet::attention::set_one_op_sublayers(!a.recorded_sublayers);
    singlora::diffusion::unet::set_taped_steps(!a.no_tape);
    if a.profile {
        for &b in &a.batch {
            for (name, fwd, both) in singlora_lab::bench::unet::components(b, &device)? {
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({"component": name, "batch": b, "forward_ms": fwd, "forward_backward_ms": both})
                    );
                } else {
                    println!("batch {b:>2}  {name:<40} fwd {fwd:>8.2} ms  fwd+bwd {both:>8.2} ms");
                }
            }
        }
    }
    if !a.json {
        println!("convolutions: {}", conv_path(&device));
        println!(
            "{:<10} {:>5} {:>10} {:>10} {:>10} {:>12} {:>10}",
            "method", "batch", "ms/step", "min ms", "img/s", "trainable", "peak GiB"
        );
    }
    for m in a
        .methods
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
    {
        let method: Method = m.parse()?;
        for &b in &a.batch {
            let r = singlora_lab::bench::unet::run(
                &a.unet,
                method,
                a.rank,
                &a.targets,
                b,
                (a.latent, a.context),
                (a.warmup, a.steps),
                &device,
                a.profile,
            )?;
            if a.json {
                let mut v = serde_json::to_value(&r)?;
                v["impl"] = serde_json::json!("singlora");
                v["convolutions"] = serde_json::json!(conv_path(&device));
                println!("{v}");
            } else {
                println!(
                    "{:<10} {:>5} {:>10.1} {:>10.1} {:>10.2} {:>12} {:>10}",
                    r.method,
                    r.batch,
                    r.median_ms,
                    r.min_ms,
                    r.images_per_s,
                    r.trainable_params,
                    r.peak_memory_gib
                        .map_or("-".to_string(), |g| format!("{g:.1}"))
                );
                println!("  forward alone: {:.1} ms", r.forward_ms);
                for (label, ms, n, host) in r.profile.iter().flatten() {
                    println!("  {label:<40} {ms:>9.2} ms {n:>6} gaps  (host {host:.2} ms)");
                }
            }
        }
    }
    Ok(())
}
