//! The `singlora` command: argument parsing and printing; the work is in the `singlora` crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use singlora::diffusion::files::ExportFormat;
use singlora::merge::{HeadPlacement, HEAD_FILE, HEAD_INFO};

mod demo;
mod diffusion_cmd;
mod example;
mod process;
mod progress;
mod train_cmd;

#[derive(Parser)]
#[command(
    name = "singlora",
    version,
    about = "Fine-tune transformers with SingLoRA (one-matrix low-rank adaptation) and its LoRA-family baselines",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a model with SingLoRA (or a baseline) on a JSONL/CSV file.
    Train(Box<train_cmd::TrainArgs>),
    /// Evaluate a trained adapter on a data file.
    Eval(train_cmd::EvalArgs),
    /// Predict with a trained adapter: labels for texts, or completions for prompts (arguments or stdin).
    Predict(train_cmd::PredictArgs),
    /// Fetch all-MiniLM-L6-v2 and Rotten Tomatoes once, then fine-tune SingLoRA on them.
    Demo(demo::DemoArgs),
    /// DreamBooth: fine-tune a Stable Diffusion U-Net on a folder of subject images.
    TrainDiffusion(Box<diffusion_cmd::TrainDiffusionArgs>),
    /// Generate images with a Stable Diffusion model (and a train-diffusion adapter).
    Generate(Box<diffusion_cmd::GenerateArgs>),
    /// Merge an adapter into its base checkpoint (or diffusers folder) and write a plain copy.
    Merge {
        /// The base checkpoint directory (config.json + *.safetensors).
        #[arg(long)]
        base: PathBuf,
        /// The adapter directory (adapter_config.json + adapter_model.safetensors). Without it
        /// (GGUF only) the base itself is written, for an adapter exported with
        /// `export-lora --format gguf`.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Where to write the merged checkpoint.
        #[arg(long)]
        out: PathBuf,
        /// Replace OUT if it exists.
        #[arg(long)]
        overwrite: bool,
        /// Cast the merged checkpoint to f32, bf16 or f16 (default: the base's dtypes).
        #[arg(long)]
        dtype: Option<String>,
        /// safetensors (a checkpoint directory) or gguf (one file for llama.cpp, Ollama and
        /// LM Studio; LLaMA-family models). Default: gguf when OUT ends in .gguf.
        #[arg(long)]
        format: Option<MergeFormat>,
        /// GGUF tensor types: f32, f16, bf16, q8_0, q4_0, q4_k_m (llama.cpp's mix) or same
        /// (each tensor as in the base). Norms stay f32.
        #[arg(long, default_value = "f16")]
        quant: singlora::gguf::model::GgufQuant,
    },
    /// Rewrite an adapter as a plain rank-r LoRA (SingLoRA: B = s·u·A_out, A = A_inᵀ): a PEFT
    /// directory, or for a Stable Diffusion U-Net the file diffusers or ComfyUI/A1111 loads.
    ExportLora {
        /// The adapter directory (a run directory, its best/ or a checkpoint).
        #[arg(long)]
        adapter: PathBuf,
        /// Where to write: a directory (peft, diffusers, kohya), or the file (gguf).
        #[arg(long)]
        out: PathBuf,
        /// peft (adapter_config.json + adapter_model.safetensors, SingLoRA adapters),
        /// diffusers (pytorch_lora_weights.safetensors, for pipe.load_lora_weights) or kohya
        /// (lora_kohya.safetensors, for ComfyUI and A1111) or gguf (one file OUT that llama.cpp's
        /// --lora loads onto a LLaMA-family GGUF base; needs --base when q_proj or k_proj are
        /// adapted).
        #[arg(long, default_value = "peft")]
        format: ExportFormat,
        /// A base checkpoint, needed only when the adapter does not record its layer shapes (and
        /// for gguf, for the attention head counts).
        #[arg(long)]
        base: Option<PathBuf>,
        /// Replace OUT if it exists.
        #[arg(long)]
        overwrite: bool,
    },
    /// Turn a single-file Stable Diffusion checkpoint (A1111 / ComfyUI .safetensors) into a
    /// diffusers folder that train-diffusion and generate take.
    ConvertSingleFile {
        /// The single-file checkpoint (.safetensors, the original LDM layout; SD 1.x, 2.x or SDXL).
        #[arg(long)]
        checkpoint: PathBuf,
        /// A diffusers folder of the same model family, for its configs, tokenizer and scheduler
        /// (its weights are not read).
        #[arg(long)]
        config: PathBuf,
        /// Where to write the diffusers folder.
        #[arg(long)]
        out: PathBuf,
        /// Replace OUT if it exists.
        #[arg(long)]
        overwrite: bool,
    },
    /// Show an adapter's method, rank, scale, ramp state and parameter counts.
    Inspect {
        /// The adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// The base checkpoint: checks the shapes and reports the trainable fraction.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Build a tiny LLaMA-shaped checkpoint and a SingLoRA adapter, then inspect, merge and
    /// export them: the whole adapter-file path on an embedded default.
    Example {
        /// Where to put the example (default: a fresh temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// What `merge` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum MergeFormat {
    Safetensors,
    Gguf,
}

/// The settings of the subcommand given on the command line (not defaults), by name.
fn given_settings(m: &clap::ArgMatches) -> Vec<String> {
    let Some((_, sub)) = m.subcommand() else {
        return vec![];
    };
    sub.ids()
        .filter(|id| sub.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect()
}

fn run(matches: clap::ArgMatches) -> Result<()> {
    let given = given_settings(&matches);
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Train(args) => train_cmd::train(*args, &given)?,
        Command::Eval(args) => train_cmd::eval(args, &given)?,
        Command::Predict(args) => train_cmd::predict(args)?,
        Command::Demo(args) => demo::run(args)?,
        Command::TrainDiffusion(args) => diffusion_cmd::train_diffusion(*args, &given)?,
        Command::Generate(args) => diffusion_cmd::generate(*args)?,
        Command::Merge {
            base,
            adapter,
            out,
            overwrite,
            dtype,
            format,
            quant,
        } => {
            let is_gguf_name = out
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
            let gguf = match format {
                Some(MergeFormat::Gguf) => true,
                Some(MergeFormat::Safetensors) => false,
                None => is_gguf_name,
            };
            let opts = singlora::merge::MergeOptions {
                overwrite,
                dtype: dtype
                    .as_deref()
                    .map(singlora::merge::parse_dtype)
                    .transpose()?,
                gguf: gguf.then_some(quant),
            };
            match (adapter, opts.gguf) {
                (Some(adapter), _) => {
                    let report = singlora::merge::merge_checkpoint(&base, &adapter, &out, &opts)?;
                    print_merge(&out, &report);
                }
                (None, Some(quant)) => {
                    anyhow::ensure!(
                        opts.dtype.is_none(),
                        "--dtype casts a safetensors checkpoint; a GGUF output takes its types from --quant"
                    );
                    let (_, cleaned) =
                        singlora::merge::gguf::convert_to_gguf(&base, &out, overwrite, quant)?;
                    print_cleaned(&cleaned);
                    println!("wrote the base model {} as {} ({quant})", base.display(), out.display());
                }
                (None, None) => anyhow::bail!(
                    "--adapter is required, except for a GGUF output (--format gguf), which can hold the base alone"
                ),
            }
        }
        Command::ConvertSingleFile {
            checkpoint,
            config,
            out,
            overwrite,
        } => {
            let c = singlora::diffusion::single_file::convert_single_file(
                &checkpoint,
                &config,
                &out,
                overwrite,
            )?;
            print_cleaned(&c.cleaned);
            let counts: Vec<String> = c
                .tensors
                .iter()
                .map(|(part, n)| format!("{part} {n}"))
                .collect();
            println!(
                "wrote {} : a diffusers folder ({} tensors; {} left out: the EMA copy, schedule buffers and what CLIPTextModel has no place for), configs, tokenizer and scheduler from {}",
                c.out.display(),
                counts.join(", "),
                c.skipped,
                config.display()
            );
        }
        Command::ExportLora {
            adapter,
            out,
            format: ExportFormat::Gguf,
            base,
            overwrite,
        } => {
            let (tensors, cleaned) =
                singlora::gguf::lora::export_lora_gguf(&adapter, &out, base.as_deref(), overwrite)?;
            print_cleaned(&cleaned);
            println!(
                "wrote {} : a llama.cpp LoRA adapter, {} layers, scale folded into lora_b (apply it at scale 1: --lora FILE)",
                out.display(),
                tensors.len() / 2
            );
        }
        Command::ExportLora {
            adapter,
            out,
            format,
            base: _,
            overwrite,
        } if format != ExportFormat::Peft => {
            let (file, cleaned) =
                singlora::diffusion::files::export(&adapter, &out, format, overwrite)?;
            print_cleaned(&cleaned);
            println!(
                "wrote {} : plain LoRA in the {format} layout, scale folded into B (alpha = r)",
                file.display()
            );
        }
        Command::ExportLora {
            adapter,
            out,
            base,
            overwrite,
            ..
        } => {
            let (lora, cleaned) =
                singlora::adapter::export::export_lora(&adapter, &out, base.as_deref(), overwrite)?;
            print_cleaned(&cleaned);
            println!(
                "wrote {} : plain LoRA, r = {}, lora_alpha = {} (scale 1), {} layers",
                out.display(),
                lora.config.r,
                lora.config.lora_alpha,
                lora.layers.len()
            );
        }
        Command::Inspect {
            adapter,
            base,
            json,
        } => {
            let info = singlora::inspect::inspect(&adapter, base.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.render());
            }
        }
        Command::Example { dir } => example::run(dir)?,
    }
    Ok(())
}

/// Says which temporary outputs of interrupted runs were removed.
fn print_cleaned(paths: &[PathBuf]) {
    for p in paths {
        eprintln!(
            "removed {}, left by an interrupted singlora process",
            p.display()
        );
    }
}

fn print_merge(out: &Path, r: &singlora::merge::MergeReport) {
    print_cleaned(&r.cleaned);
    println!(
        "merged {} layers (u = {:.4}, max |W - W0| = {:.3e}) into {} ({})",
        r.layers,
        r.u,
        r.max_abs_change,
        out.display(),
        r.files.join(", ")
    );
    match &r.head {
        Some(HeadPlacement::Checkpoint { architecture }) => println!(
            "wrote the classification head ({}) into the checkpoint as {architecture}, which transformers scores as singlora does",
            r.heads.join(", ")
        ),
        Some(HeadPlacement::Separate { pooling, reason }) => println!(
            "kept the classification head ({}, {pooling} pooling) out of the checkpoint's architecture: {reason}.\n\
             It is in {HEAD_FILE}, with the pooling and labels in {HEAD_INFO}; config.json is the base's",
            r.heads.join(", ")
        ),
        None if !r.heads.is_empty() => {
            println!("wrote head tensors: {}", r.heads.join(", "))
        }
        None => {}
    }
}

fn main() -> ExitCode {
    process::run(|| run(Cli::command().get_matches()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every option of every command says what it is for in `--help`.
    #[test]
    fn every_option_has_a_description() {
        let (mut missing, mut checked) = (vec![], 0);
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || arg.is_positional() {
                    continue;
                }
                checked += 1;
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{} --{id}", sub.get_name()));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "options without a description: {missing:?}"
        );
        // train's flattened settings and the other commands' own options are all seen
        let train = cli.find_subcommand("train").expect("a train command");
        assert!(
            train.get_arguments().any(|a| a.get_id() == "base_dtype"),
            "train's settings are not among its arguments"
        );
        assert!(checked > 100, "only {checked} options checked");
    }
}
