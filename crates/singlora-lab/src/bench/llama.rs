//! The LLaMA-shaped training-step benchmark: random weights made on the device (bf16 frozen
//! base), batch × seq random tokens, causal-LM loss over every position, AdamW on the adapters
//! (r on q, k, v, o, gate, up, down), or no adapter at all (the frozen-base floor: the backward
//! still runs through every layer, from a leaf at the embedded input).

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::{time_steps, StepTiming};
use singlora::adapter::ramp::{RampClock, RampSchedule};
use singlora::adapter::target::TargetSpec;
use singlora::adapter::{AdapterSpec, Method};
use singlora::data::{collate, Encoded, Task};
use singlora::error::Result;
use singlora::model::llama::Llama;
use singlora::model::weights::{ConfigReader, Weights};
use singlora::model::{Body, FastPath, Pooling, TaskModel};
use singlora::synthetic::LlamaShape;

#[derive(Debug, Clone, Serialize)]
pub struct LlamaBench {
    pub shape: String,
    pub method: String,
    pub batch: usize,
    pub seq: usize,
    pub timing: StepTiming,
    pub trainable_params: usize,
    pub peak_memory_gib: Option<f64>,
    /// Model FLOPs of a step (4·N·T for the linear layers, input gradients only, plus attention).
    pub step_tflop: f64,
    pub tflops: f64,
}

/// FLOPs of one frozen-base training step (forward and input-gradient backward).
pub fn step_flops(shape: &LlamaShape, batch: usize, seq: usize) -> f64 {
    let n_linear: usize = shape.linears().iter().map(|(_, (o, i))| o * i).sum();
    let tokens = (batch * seq) as f64;
    let attention = 12.0
        * shape.layers as f64
        * batch as f64
        * (seq * seq) as f64
        * (shape.heads * (shape.hidden / shape.heads)) as f64;
    4.0 * n_linear as f64 * tokens + attention
}

/// Bytes in use on the device (CUDA only).
pub fn device_memory_used(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        let (free, total) =
            candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok()?;
        return Some((total - free) as u64);
    }
    let _ = device;
    None
}

/// `batch` rows of `seq` random token ids below `vocab`, all targets (SFT over every position).
pub fn random_tokens(
    batch: usize,
    seq: usize,
    vocab: usize,
    device: &Device,
) -> Result<singlora::data::Batch> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let items: Vec<Encoded> = (0..batch)
        .map(|_| random_example(seq, vocab, &mut x))
        .collect();
    let idx: Vec<usize> = (0..batch).collect();
    collate(&items, &idx, 0, device)
}

/// An SFT example of `len` token ids below `vocab` (every token a target), drawn from the
/// xorshift state `x`.
pub fn random_example(len: usize, vocab: usize, x: &mut u64) -> Encoded {
    let ids: Vec<u32> = (0..len)
        .map(|_| {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            (*x % vocab as u64) as u32
        })
        .collect();
    Encoded {
        type_ids: vec![0; len],
        label: None,
        target_mask: vec![1; len],
        ids,
    }
}

/// What the fast path recomputes in the backward instead of keeping from the forward.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recompute {
    /// The SwiGLU output and attention probabilities (`Llama::recompute`).
    pub activations: bool,
    /// Whole layers from their inputs (`Llama::checkpoint_layers`).
    pub layers: bool,
}

impl Recompute {
    fn apply(self, model: &mut TaskModel) {
        set_recompute(model, self.activations);
        set_checkpoint_layers(model, self.layers);
    }
}

/// Builds the model (`method` None = frozen base) and times `steps` training steps with the
/// kernel choices `fast`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    name: &str,
    shape: LlamaShape,
    method: Option<Method>,
    rank: usize,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    device: &Device,
    recompute: Recompute,
    fast: FastPath,
    base: &str,
) -> Result<LlamaBench> {
    let mut model = random_model_as(name, shape, method, rank, device, base)?;
    recompute.apply(&mut model);
    model.fast = fast;
    let trainable_params = model.params().iter().map(|p| p.var.elem_count()).sum();
    let b = random_tokens(batch, seq, shape.vocab, device)?;
    let dev = device.clone();
    let mut peak = 0u64;
    let timing = time_steps(&model, &b, warmup, steps, || {
        dev.synchronize()?;
        if let Some(m) = device_memory_used(&dev) {
            peak = peak.max(m);
        }
        Ok(())
    })?;
    let flops = step_flops(&shape, batch, seq);
    Ok(LlamaBench {
        shape: name.to_string(),
        method: format!(
            "{}{}",
            method.map_or("frozen base".to_string(), |m| m.to_string()),
            match base {
                "nf4" => " (NF4)",
                "q4k" => " (Q4_K)",
                "fp8" => " (FP8)",
                _ => "",
            }
        ),
        batch,
        seq,
        trainable_params,
        peak_memory_gib: (peak > 0).then(|| peak as f64 / (1u64 << 30) as f64),
        step_tflop: flops / 1e12,
        tflops: flops / (timing.median_ms / 1e3) / 1e12,
        timing,
    })
}

/// Switches the LLaMA body's activation recomputation (see `Llama::recompute`).
pub fn set_recompute(model: &mut TaskModel, on: bool) {
    if let Body::Llama(l) = &mut model.body {
        l.recompute = on;
    }
}

/// Switches the LLaMA body's layer checkpointing (see `Llama::checkpoint_layers`).
pub fn set_checkpoint_layers(model: &mut TaskModel, on: bool) {
    if let Body::Llama(l) = &mut model.body {
        l.checkpoint_layers = on;
    }
}

/// A LLaMA of `shape` with random weights (bf16 on a GPU, f32 on the CPU) for SFT, with
/// `method` adapters of rank `rank` on all seven projections (u = 1 from the start), or none
/// (then the embeddings take a gradient so a backward still runs through every layer).
pub fn random_model(
    name: &str,
    shape: LlamaShape,
    method: Option<Method>,
    rank: usize,
    device: &Device,
) -> Result<TaskModel> {
    random_model_as(name, shape, method, rank, device, "bf16")
}

/// [`random_model`] with its decoder layers' linear weights in `base`: "bf16" (the model's
/// type), "nf4" (random NF4 weights, [`crate::shapes::random_nf4`]; never dense, so a
/// 70B-shaped base fits one GPU), "q4k" (random Q4_K blocks as `--base-dtype same` keeps a GGUF
/// file's, [`crate::shapes::random_q4k`]) or "fp8" (the dense weights quantised to E4M3; CUDA
/// only).
pub fn random_model_as(
    name: &str,
    shape: LlamaShape,
    method: Option<Method>,
    rank: usize,
    device: &Device,
    base: &str,
) -> Result<TaskModel> {
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let config = shape.config();
    let path = std::path::PathBuf::from(format!("random-{name}"));
    let reader = ConfigReader {
        path: &path,
        value: &config,
    };
    let make = match base {
        "nf4" => Some(crate::shapes::random_nf4 as fn(_, _, &Device) -> _),
        "q4k" => Some(crate::shapes::random_q4k as fn(_, _, &Device) -> _),
        _ => None,
    };
    let weights = if let Some(make) = make {
        let (dense, quant) = crate::shapes::device_tensors_quant(&shape, dtype, device, make)?;
        Weights::Kept(path.clone(), dense, quant)
    } else {
        Weights::Memory(
            path.clone(),
            crate::shapes::device_tensors(&shape, dtype, device)?,
        )
    };
    let mut llama = Llama::load(&weights, Llama::config(&reader)?, dtype, device)?;
    drop(weights);
    llama.grad_from_embeddings = method.is_none();
    let mut model = TaskModel::new(
        Body::Llama(llama),
        Task::Sft,
        None,
        Pooling::Last,
        0,
        device,
    )?;
    if let Some(m) = method {
        let spec = AdapterSpec::new(m.kind(), rank, rank as f64);
        let targets = TargetSpec::parse(
            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
            None,
        )?;
        model.inject(&spec, &targets, RampClock::new(RampSchedule::none(), 0))?;
    }
    if base == "fp8" {
        #[cfg(feature = "cuda")]
        model.body.quantize_fp8()?;
        #[cfg(not(feature = "cuda"))]
        return Err(singlora::Error::msg("an FP8 base needs the cuda feature"));
    }
    Ok(model)
}

/// TFLOP/s of an n³ matmul in `dtype` on `device` (median of 5 after warm-up): the ceiling
/// utilisation is measured against.
pub fn matmul_ceiling(n: usize, dtype: DType, device: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let mut times = vec![];
    for i in 0..8 {
        device.synchronize()?;
        let t = std::time::Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        drop(c);
        if i >= 3 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|x, y| x.partial_cmp(y).unwrap());
    Ok(2.0 * (n as f64).powi(3) / times[times.len() / 2] / 1e12)
}

/// Milliseconds per stage (and how many gaps each had) of one training step's forward and
/// backward on the CUDA fast path, after two unprofiled steps, from timing events between
/// the stages, with the kernel choices `fast`.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn kernel_profile(
    name: &str,
    shape: LlamaShape,
    method: Option<Method>,
    rank: usize,
    batch: usize,
    seq: usize,
    device: &Device,
    recompute: Recompute,
    fast: FastPath,
    base: &str,
) -> Result<Vec<singlora::ops::prof::Stage>> {
    use singlora::ops::prof;
    let mut model = random_model_as(name, shape, method, rank, device, base)?;
    recompute.apply(&mut model);
    model.fast = fast;
    let b = random_tokens(batch, seq, shape.vocab, device)?;
    model.clock.set_training(true);
    for _ in 0..2 {
        model.loss_and_grads(&b, 1.0)?;
    }
    device.synchronize()?;
    prof::enable(true);
    let r = (|| {
        if let Device::Cuda(d) = device {
            prof::mark(d, "start")?;
        }
        let (_, g) = model.loss_and_grads(&b, 1.0)?;
        if let Device::Cuda(d) = device {
            prof::mark(d, "other")?;
        }
        device.synchronize()?;
        drop(g);
        prof::take()
    })();
    prof::enable(false);
    model.clock.set_training(false);
    r
}
