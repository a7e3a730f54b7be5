//! `singlora bench`: timed training steps (benchmarks print tables; tests never time).

use std::path::PathBuf;

use anyhow::Result;
use candle_core::DType;
use clap::Args;
use singlora::adapter::{AdapterSpec, Method};
use singlora::data::Task;
use singlora::model::{Pretrained, TaskModel};
use singlora::ramp::{RampClock, RampSchedule};
use singlora::target::TargetSpec;
use singlora::train::parse_device;

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
    device: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn step(a: StepArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let pre = Pretrained::load(&a.model, dtype, &device)?;
    let pooling = pre.default_pooling();
    let vocab = pre.tokenizer.get_vocab_size(true);
    let mut model = TaskModel::new(pre.body, Task::Classify, Some(2), pooling, 0, &device)?;
    let method: Method = a.method.parse()?;
    let spec = AdapterSpec::new(method.kind(), a.rank, a.rank as f64);
    model.inject(
        &spec,
        &TargetSpec::parse(&a.targets, None)?,
        RampClock::new(RampSchedule::none(), 0),
    )?;
    let batch = singlora::bench::random_batch(a.batch, a.seq, vocab, 2, &device)?;
    let dev = device.clone();
    let t =
        singlora::bench::time_steps(&model, &batch, a.warmup, a.steps, || Ok(dev.synchronize()?))?;
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
