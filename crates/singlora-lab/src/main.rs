//! The `singlora-lab` command: the developer tooling (device check, benchmarks, the paper's
//! experiments); argument parsing and printing, the work is in `singlora_lab` and `singlora`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench_cmd;
mod example_adapters;
mod experiment_cmd;
mod gpu_check;
#[path = "../../singlora-cli/src/process.rs"]
mod process;

#[derive(Parser)]
#[command(
    name = "singlora-lab",
    version,
    about = "singlora's developer tooling: the device check, benchmarks and the paper's experiments",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time training steps of a model (a benchmark; prints a line or JSON).
    #[command(name = "bench-step")]
    BenchStep(bench_cmd::StepArgs),
    /// Time LLaMA-shaped training steps with random weights (TinyLlama / 7B shapes).
    #[command(name = "bench-llama")]
    BenchLlama(bench_cmd::LlamaArgs),
    /// Data-parallel scaling: tokens/s of a LLaMA-shaped step on 1, 2, 4, … GPUs (NCCL).
    #[command(name = "bench-scaling")]
    BenchScaling(bench_cmd::ScalingArgs),
    /// Time DreamBooth training steps of a Stable Diffusion U-Net (diffusers unet/ folder).
    #[command(name = "bench-unet")]
    BenchUnet(bench_cmd::UNetArgs),
    /// Where a LLaMA step's time goes, by op class (components timed alone at the model's shape).
    #[command(name = "bench-profile")]
    BenchProfile(bench_cmd::ProfileArgs),
    /// Check the device path against the CPU: adapters, gradients and training steps.
    #[command(name = "gpu-check")]
    GpuCheck {
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Also check data-parallel training over these GPUs (cuda:0,cuda:1,...) against one.
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<String>>,
    },
    /// Reproduce the paper's experiments: `attention-fit` (figure 1), `param-counts`.
    Experiment(experiment_cmd::ExperimentArgs),
    /// Write random LoRA, rsLoRA, DoRA and SingLoRA adapters for a base (for compatibility checks).
    #[command(hide = true)]
    ExampleAdapters {
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Experiment(args) => experiment_cmd::run(args),
        Command::BenchStep(args) => bench_cmd::step(args),
        Command::BenchLlama(args) => bench_cmd::llama(args),
        Command::BenchProfile(args) => bench_cmd::profile(args),
        Command::BenchUnet(args) => bench_cmd::unet(args),
        Command::BenchScaling(args) => bench_cmd::scaling(args),
        Command::GpuCheck { device, devices } => gpu_check::run(&device, devices.as_deref()),
        Command::ExampleAdapters { base, out } => example_adapters::run(&base, &out),
    }
}

fn main() -> ExitCode {
    process::run(|| run(Cli::parse()))
}
