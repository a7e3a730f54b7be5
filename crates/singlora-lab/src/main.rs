//! The `singlora-lab` command: the developer tooling (device check, benchmarks, the paper's
//! experiments); argument parsing and printing, the work is in `singlora_lab` and `singlora`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

// Benchmarks time training steps as `singlora train` runs them: with mimalloc, which keeps the
// activation buffers freed every step mapped instead of returning them to the kernel.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench_cmd;
mod example_adapters;
mod experiment_cmd;
mod gpu_check;

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
        Command::BenchScaling(args) => bench_cmd::scaling(args),
        Command::GpuCheck { device, devices } => gpu_check::run(&device, devices.as_deref()),
        Command::ExampleAdapters { base, out } => example_adapters::run(&base, &out),
    }
}

/// mimalloc's option index of `purge_delay` (mimalloc 2.x, `mi_option_purge_delay`).
const MI_OPTION_PURGE_DELAY: i32 = 15;

fn main() -> ExitCode {
    // Keep freed pages mapped for 10 s instead of 1: a training step (about a second on the
    // CPU) reuses the previous step's buffers, and purging them between steps made the kernel
    // zero-fill them again every step (~10% of a MiniLM step); idle memory still goes back.
    // SAFETY: called before any other thread exists; the option is a plain integer setting.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) };
    // candle sizes every CPU matmul by parsing /proc/cpuinfo unless RAYON_NUM_THREADS is set
    // (~10% of a MiniLM step); fix its own answer once, before any thread starts
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        );
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
