//! `singlora train`, `eval` and `predict`: argument parsing and printing.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use singlora::data::{list_rows, DataSettings, RowReport, Truncation};
use singlora::device::DeviceSpec;
use singlora::eval::EvalResult;
use singlora::session::Session;
use singlora::train::{
    resume as resume_run, setup, train as run_training, Observer, Plan, ResumeChanges, TrainConfig,
    TrainSummary, UpdateReport,
};

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    config: TrainConfig,
    /// Shorthand for --devices cuda:0,...,cuda:N-1.
    #[arg(long, conflicts_with_all = ["device", "devices"])]
    gpus: Option<usize>,
    /// Print the modules that match, the parameter count and the plan; train nothing.
    #[arg(long)]
    dry_run: bool,
    /// The run directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in RUN_DIR (or --out) from its newest checkpoint, with the settings in
    /// its run.json; only --max-steps, --epochs, --save-every, --keep-checkpoints,
    /// --eval-every, --device/--devices/--gpus and --recompute may change.
    #[arg(long, value_name = "RUN_DIR", num_args = 0..=1)]
    resume: Option<Option<PathBuf>>,
    /// Replace an existing --out (only a run directory singlora wrote).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

/// The command-line flag of a setting (its `run.json` key).
fn flag(key: &str) -> String {
    match key {
        "chat_template" => "--no-chat-template".into(),
        k => format!("--{}", k.replace('_', "-")),
    }
}

impl TrainArgs {
    /// The settings as given, with --gpus and the environment's CPU-path switch applied.
    fn config(&self) -> Result<TrainConfig> {
        let mut cfg = self.config.clone();
        match self.gpus {
            Some(0) => bail!("--gpus must be at least 1"),
            Some(n) => cfg.devices = Some((0..n).map(DeviceSpec::Cuda).collect()),
            None => {}
        }
        // the documented way to train BERT-family encoders through candle's autograd instead
        // of their own CPU forward and backward
        if std::env::var_os("SINGLORA_CPU_AUTOGRAD").is_some_and(|v| v == "1") {
            cfg.fast.cpu_encoder = false;
        }
        Ok(cfg)
    }

    /// The run directory: --resume's, or --out.
    fn run_dir(&self) -> Result<PathBuf> {
        match (&self.resume, &self.out) {
            (Some(Some(r)), Some(o)) if r != o => {
                bail!(
                    "--resume {} and --out {} name different runs",
                    r.display(),
                    o.display()
                )
            }
            (Some(Some(r)), _) => Ok(r.clone()),
            (_, Some(o)) => Ok(o.clone()),
            (Some(None), None) => bail!("--resume needs the run directory: --resume RUN_DIR"),
            (None, None) => bail!("--out is required: the run directory to write"),
        }
    }

    /// What a resume changes: the resumable settings given on the command line; any other
    /// setting given must equal the run's, else the resume is refused naming it.
    fn resume_changes(&self, run: &TrainConfig, given: &[String]) -> Result<ResumeChanges> {
        let cfg = self.config()?;
        let mine = serde_json::to_value(&cfg)?;
        let theirs = serde_json::to_value(run)?;
        let mut changes = ResumeChanges {
            fast: cfg.fast,
            ..Default::default()
        };
        for key in given {
            let key = if key == "gpus" {
                "devices"
            } else {
                key.as_str()
            };
            if ResumeChanges::KEYS.contains(&key) {
                match key {
                    "max_steps" => changes.max_steps = cfg.max_steps,
                    "epochs" => changes.epochs = Some(cfg.epochs),
                    "save_every" => changes.save_every = cfg.save_every,
                    "save_minutes" => changes.save_minutes = Some(cfg.save_minutes),
                    "keep_checkpoints" => changes.keep_checkpoints = Some(cfg.keep_checkpoints),
                    "eval_every" => changes.eval_every = cfg.eval_every,
                    "device" => changes.device = Some(cfg.device),
                    "devices" => changes.devices = cfg.devices.clone(),
                    "recompute_layers" => changes.recompute_layers = Some(cfg.recompute_layers),
                    _ => changes.recompute = Some(cfg.recompute),
                }
                continue;
            }
            let (Some(a), Some(b)) = (mine.get(key), theirs.get(key)) else {
                continue;
            };
            if a != b {
                bail!(
                    "{} {a} conflicts with the run's {b} (its run.json): a resumed run keeps its settings; only {} may change",
                    flag(key),
                    ResumeChanges::KEYS.map(flag).join(", ")
                );
            }
        }
        Ok(changes)
    }
}

pub fn train(args: TrainArgs, given: &[String]) -> Result<()> {
    let out = args.run_dir()?;
    if args.resume.is_some() {
        let run = singlora::train::run_config(&out)?;
        let changes = args.resume_changes(&run, given)?;
        if args.dry_run {
            let mut cfg = run;
            cfg.max_steps = changes.max_steps.or(cfg.max_steps);
            return dry_run(cfg, args.quiet);
        }
        let summary = resume_run(&out, &changes, progress(args.quiet)?)?;
        return report(&summary);
    }
    let cfg = args.config()?;
    for (field, value) in [("--model", &cfg.model), ("--train", &cfg.train)] {
        if value.as_os_str().is_empty() {
            bail!("{field} is required (or --resume RUN_DIR to continue a run)");
        }
    }
    if args.dry_run {
        return dry_run(cfg, args.quiet);
    }
    let summary = run_training(cfg, &out, args.overwrite, progress(args.quiet)?)?;
    report(&summary)
}

/// Prints the plan, with the warnings and the rows left out or cut, and trains nothing.
fn dry_run(cfg: TrainConfig, quiet: bool) -> Result<()> {
    let s = setup(cfg)?;
    let said = Progress::new(quiet)?;
    for w in &s.warnings {
        said.warning(w);
    }
    if !s.data.report.is_empty() {
        said.rows_report(&s.data.report);
    }
    print!("{}", s.plan.render());
    println!("(dry run: nothing trained)");
    Ok(())
}

/// What a finished or interrupted run says on stdout; a run a signal stopped (with its
/// checkpoint written) ends the process with the signal's exit code.
fn report(summary: &TrainSummary) -> Result<()> {
    // the other processes of a launched group leave the report to rank 0
    let follower = singlora::dist::launch::from_env()
        .ok()
        .flatten()
        .is_some_and(|l| l.rank != 0);
    if summary.interrupted {
        if !follower {
            println!(
                "interrupted after {} of {} updates; resume with: singlora train --resume {}",
                summary.steps,
                summary.total_steps,
                summary.run_dir.display()
            );
        }
        if let Some(code) = Signals::get()?.exit_code() {
            use std::io::Write;
            std::io::stdout().flush()?;
            std::process::exit(code);
        }
        return Ok(());
    }
    if follower {
        return Ok(());
    }
    println!(
        "trained {} updates, {} trainable parameters on {} modules",
        summary.steps,
        summary.trainable_params,
        summary.adapted.len()
    );
    if let Some(e) = &summary.baseline_eval {
        println!("before: {}", e.summary());
    }
    if let Some(e) = &summary.final_eval {
        println!("after:  {}", e.summary());
    }
    println!(
        "adapter: {0}/adapter_model.safetensors; metrics: {0}/metrics.jsonl; curves: {0}/curves.svg",
        summary.run_dir.display()
    );
    Ok(())
}

/// Stop requests from signals: Ctrl-C (SIGINT) or SIGTERM (what schedulers and `docker stop`
/// send) asks a run to stop at the next update with a checkpoint; the same signal again ends
/// the process at once. Installed once per process.
pub(crate) struct Signals {
    int: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
}

impl Signals {
    pub(crate) fn get() -> Result<&'static Signals> {
        static SIGNALS: std::sync::OnceLock<std::result::Result<Signals, String>> =
            std::sync::OnceLock::new();
        SIGNALS
            .get_or_init(|| Signals::install().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("could not install the signal handlers: {e}"))
    }

    /// Forgets earlier signals (a run starts).
    pub(crate) fn reset(&self) {
        self.int.store(false, Ordering::SeqCst);
        self.term.store(false, Ordering::SeqCst);
    }

    fn install() -> std::io::Result<Signals> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        let int = Arc::new(AtomicBool::new(false));
        let term = Arc::new(AtomicBool::new(false));
        // the first action sees the flag the second sets: set already means a second signal
        flag::register_conditional_shutdown(SIGINT, 130, Arc::clone(&int))?;
        flag::register(SIGINT, Arc::clone(&int))?;
        flag::register_conditional_shutdown(SIGTERM, 143, Arc::clone(&term))?;
        flag::register(SIGTERM, Arc::clone(&term))?;
        Ok(Signals { int, term })
    }

    /// The shell's exit code for the signal that stopped a run: 130 (SIGINT) or 143 (SIGTERM).
    pub(crate) fn exit_code(&self) -> Option<i32> {
        if self.int.load(Ordering::SeqCst) {
            Some(130)
        } else if self.term.load(Ordering::SeqCst) {
            Some(143)
        } else {
            None
        }
    }
}

/// The observer of a `train` run: progress on stderr (none when `quiet`), Ctrl-C as a stop.
pub fn progress(quiet: bool) -> Result<Arc<dyn Observer>> {
    Ok(Arc::new(Progress::new(quiet)?))
}

/// Training progress on stderr (see [`crate::progress`]) and Ctrl-C as a stop.
struct Progress {
    line: crate::progress::Progress,
    signals: &'static Signals,
}

impl Progress {
    fn new(quiet: bool) -> Result<Self> {
        Ok(Self {
            line: crate::progress::Progress::new(quiet),
            signals: {
                let s = Signals::get()?;
                s.reset();
                s
            },
        })
    }

    fn say(&self, text: &str) {
        self.line.say(text);
    }
}

impl Observer for Progress {
    fn started(&self, plan: &Plan, from_step: u64) {
        self.line.start(plan.total_updates, from_step);
    }

    fn warning(&self, text: &str) {
        self.say(&format!("warning: {text}"));
    }

    fn rows_report(&self, report: &RowReport) {
        self.say(rows_text(report).trim_end());
    }

    fn resumed(&self, run_dir: &Path, step: u64) {
        self.line.resumed(run_dir, step);
    }

    fn updated(&self, r: &UpdateReport) {
        let msg = format!(
            "loss {:.4} lr {:.2e} u {:.3} {:.0} tok/s",
            r.loss, r.lr, r.u, r.tokens_per_s
        );
        self.line.update(r.step, r.total, msg);
    }

    fn evaluating(&self, step: u64, n: usize) {
        self.line.activity(&match step {
            0 => format!("evaluating the model before training on {n} examples…"),
            _ => format!("evaluating update {step} on {n} examples…"),
        });
    }

    fn evaluated(&self, step: u64, e: &EvalResult) {
        match step {
            0 => self.say(&format!("before training: {}", e.summary())),
            _ => self.say(&format!("update {step}: {}", e.summary())),
        }
    }

    fn cleaned(&self, paths: &[std::path::PathBuf]) {
        for p in paths {
            self.say(&format!(
                "removed {}, left by an interrupted singlora process",
                p.display()
            ));
        }
    }

    fn skipped_checkpoint(&self, dir: &Path, why: &str) {
        self.line.skipped_checkpoint(dir, why);
    }

    fn class_report(&self, text: &str) {
        self.say(text);
    }

    fn finished(&self, s: &TrainSummary) {
        self.line.finish();
        if s.interrupted {
            self.say(&format!(
                "stopped at update {} of {}; the checkpoint is saved: resume with singlora train --resume {}",
                s.steps,
                s.total_steps,
                s.run_dir.display()
            ));
        }
    }

    fn stop_requested(&self) -> bool {
        self.signals.exit_code().is_some()
    }
}

/// Which rows were left out or cut, and why: the first of each kind by `FILE:LINE`.
fn rows_text(r: &RowReport) -> String {
    let rows = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let mut s = String::new();
    if !r.skipped.is_empty() {
        s += &format!(
            "{} left out (--skip-bad-rows):{}\n",
            rows(r.skipped.len(), "malformed row"),
            list_rows(&r.skipped)
        );
    }
    if !r.truncated.is_empty() {
        s += &format!(
            "{} cut to --max-length {} tokens (--truncation {}):{}\n",
            rows(r.truncated.len(), "row"),
            r.max_length,
            r.truncation,
            list_rows(&r.truncated)
        );
    }
    if !r.dropped.is_empty() {
        s += &format!(
            "{} longer than --max-length {} tokens left out (--truncation drop):{}\n",
            rows(r.dropped.len(), "row"),
            r.max_length,
            list_rows(&r.dropped)
        );
    }
    s
}

/// The settings of the run `adapter` belongs to (a run directory, its best/ or a checkpoint).
fn run_of(adapter: &Path) -> Result<Option<TrainConfig>> {
    match singlora::train::run_of_adapter(adapter) {
        Some(run) => Ok(Some(singlora::train::run_config(&run)?)),
        None => Ok(None),
    }
}

/// The model with the adapter, its base kept as the run kept it where the device allows (NF4
/// anywhere; a GGUF file's own types on the CPU and FP8 on a GPU, the full-precision base
/// elsewhere, said on stderr).
fn load_session(
    model: &Path,
    adapter: &Path,
    device: candle_core::Device,
    run: Option<&TrainConfig>,
) -> Result<Session> {
    use singlora::quant::BaseDtype;
    let mut base = run.map_or(BaseDtype::Auto, |r| r.base_dtype);
    if base == BaseDtype::Fp8 && device.is_cpu() {
        eprintln!(
            "note: the adapter was trained on an FP8 base (--base-dtype fp8), which runs on a \
             CUDA GPU only; using the full-precision base"
        );
        base = BaseDtype::Auto;
    }
    if base == BaseDtype::Same && singlora::model::Pretrained::gguf_file(model).is_none() {
        eprintln!(
            "note: the adapter was trained on a GGUF file's quantised weights; {} is not a GGUF \
             file, so its own weights are used",
            model.display()
        );
        base = BaseDtype::Auto;
    }
    Ok(Session::load_as(model, adapter, device, base)?)
}

/// `--model`, or the run's.
fn model_of(model: &Option<PathBuf>, adapter: &Path, run: Option<&TrainConfig>) -> Result<PathBuf> {
    match (model, run) {
        (Some(m), _) => Ok(m.clone()),
        (None, Some(r)) => Ok(r.model.clone()),
        (None, None) => bail!(
            "--model is required: {} is not in a run directory, whose run.json would name the model",
            adapter.display()
        ),
    }
}

/// The run's data settings (the defaults outside a run), with those given on the command line
/// (`given`, by name) taken from `mine`.
fn with_given(
    run: Option<&TrainConfig>,
    mine: &DataSettings,
    given: &[String],
) -> Result<DataSettings> {
    let Some(run) = run else {
        return Ok(mine.clone());
    };
    let mut settings = serde_json::to_value(&run.data)?;
    let mine = serde_json::to_value(mine)?;
    for key in given {
        if let Some(v) = mine.get(key) {
            settings[key] = v.clone();
        }
    }
    Ok(serde_json::from_value(settings)?)
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The base model (default: the one the adapter's run was trained on).
    #[arg(long)]
    model: Option<PathBuf>,
    /// An adapter directory (a run directory, or its best/ or a checkpoint).
    #[arg(long)]
    adapter: PathBuf,
    /// The data to evaluate on (JSONL or CSV, in the layout the run was trained on).
    #[arg(long)]
    data: PathBuf,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// How the data is read and tokenized: an adapter in a run takes the run's settings, and
    /// flags given here override them.
    #[command(
        flatten,
        next_help_heading = "Data settings (default for an adapter in a run: the run's)"
    )]
    settings: DataSettings,
}

pub fn eval(a: EvalArgs, given: &[String]) -> Result<()> {
    let run = run_of(&a.adapter)?;
    let model = model_of(&a.model, &a.adapter, run.as_ref())?;
    let mut settings = with_given(run.as_ref(), &a.settings, given)?;
    let mut s = load_session(&model, &a.adapter, a.device.open()?, run.as_ref())?;
    // the run's own template travels with its adapter; a file given here replaces it
    if given.iter().any(|k| k == "chat_template_file") {
        if let Some(p) = &settings.chat_template_file {
            s.set_chat_template_file(p)?;
        }
    }
    settings.chat_template_file = None;
    let (r, rows) = s.eval_file(&a.data, &settings, a.batch_size)?;
    if !rows.is_empty() {
        eprint!("{}", rows_text(&rows));
    }
    if a.json {
        let mut v = r.to_json(s.adapter.config.step);
        if let (Some(m), Some(l)) = (&r.metrics, &s.labels) {
            v["per_class"] = serde_json::json!(l
                .names
                .iter()
                .zip(&m.per_class)
                .map(|(n, c)| serde_json::json!({"label": n, "precision": c.precision, "recall": c.recall, "f1": c.f1, "support": c.support}))
                .collect::<Vec<_>>());
            v["confusion"] = serde_json::json!(m.confusion);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", r.summary());
        if let (Some(m), Some(l)) = (&r.metrics, &s.labels) {
            print!("{}", m.render(&l.names));
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// The base model (default: the one the adapter's run was trained on).
    #[arg(long)]
    model: Option<PathBuf>,
    /// An adapter directory (a run directory, or its best/ or a checkpoint).
    #[arg(long)]
    adapter: PathBuf,
    /// Texts (classification) or prompts (SFT); read from stdin, one per line, when none given.
    texts: Vec<String>,
    /// Tokens per text (default: the run's --max-length, else 128).
    #[arg(long)]
    max_length: Option<usize>,
    /// The end of a long text kept: right or left (default: the run's --truncation; its drop
    /// keeps the start).
    #[arg(long)]
    truncation: Option<Truncation>,
    /// SFT: most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// SFT: 0 picks the most likely token every time (greedy); above 0 samples, lower values
    /// sharper.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// SFT, sampling: only among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// SFT, sampling: only among the most likely tokens that make up this probability.
    #[arg(long)]
    top_p: Option<f64>,
    /// SFT, sampling: the seed (the same seed, prompt and settings give the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// SFT: stop before this string (repeatable); it is left out of the completion.
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// SFT with a chat template: a system turn before each prompt.
    #[arg(long)]
    system: Option<String>,
    /// SFT: print each prompt before its completion (by default only the completion).
    #[arg(long)]
    echo: bool,
    /// A JSONL file of inputs, one object a line: {"text"} (classification) or {"prompt"} with
    /// an optional {"system"} (SFT); implies --json.
    #[arg(long, conflicts_with = "texts")]
    input: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Print JSON lines.
    #[arg(long)]
    json: bool,
    /// SFT: send prompts as they are, not in the model's chat template (default: as the run
    /// was trained).
    #[arg(long)]
    no_chat_template: bool,
    /// SFT: a Jinja chat template to use instead of the adapter's or the model's.
    #[arg(long, value_name = "FILE", conflicts_with = "no_chat_template")]
    chat_template: Option<PathBuf>,
}

/// The inputs of `predict --input FILE`: each line's "text" (classification) or "prompt" and
/// optional "system" (SFT); a bad line is named.
fn read_predict_input(path: &Path, classify: bool) -> Result<(Vec<String>, Vec<Option<String>>)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let key = if classify { "text" } else { "prompt" };
    let (mut inputs, mut systems) = (vec![], vec![]);
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{at}: not JSON ({e})"))?;
        let input = v
            .get(key)
            .and_then(|x| x.as_str())
            .ok_or_else(|| anyhow::anyhow!("{at}: no string field `{key}`"))?;
        let system = match v.get("system") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => bail!("{at}: `system` must be a string"),
        };
        inputs.push(input.to_string());
        systems.push(system);
    }
    Ok((inputs, systems))
}

pub fn predict(a: PredictArgs) -> Result<()> {
    let run = run_of(&a.adapter)?;
    let model = model_of(&a.model, &a.adapter, run.as_ref())?;
    let settings = run.as_ref().map(|r| r.data.clone()).unwrap_or_default();
    let mut s = load_session(&model, &a.adapter, a.device.open()?, run.as_ref())?;
    if let Some(p) = &a.chat_template {
        s.set_chat_template_file(p)?;
    } else if a.no_chat_template || !settings.chat_template {
        s.chat = None;
    }
    let max_length = a.max_length.unwrap_or(settings.max_length);
    let truncation = a.truncation.unwrap_or(settings.truncation);
    // per-input system turns of a JSONL input
    let mut systems: Vec<Option<String>> = vec![];
    let json = a.json || a.input.is_some();
    let texts = if let Some(path) = &a.input {
        let (texts, sys) = read_predict_input(path, s.labels.is_some())?;
        systems = sys;
        texts
    } else if a.texts.is_empty() {
        if std::io::stdin().is_terminal() {
            eprintln!("(reading texts from stdin, one per line; end with Ctrl-D)");
        }
        std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<Vec<_>>>()?
    } else {
        a.texts.clone()
    };
    let texts: Vec<String> = if a.input.is_some() {
        texts
    } else {
        texts.into_iter().filter(|t| !t.trim().is_empty()).collect()
    };
    if texts.is_empty() {
        bail!("no texts to predict");
    }
    if s.labels.is_some() {
        for (t, p) in texts
            .iter()
            .zip(s.classify(&texts, max_length, truncation)?)
        {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"text": t, "label": p.label, "probabilities": p.probabilities.iter().map(|(l, x)| (l.clone(), serde_json::json!(x))).collect::<serde_json::Map<_, _>>()})
                );
            } else {
                let probs: Vec<String> = p
                    .probabilities
                    .iter()
                    .map(|(l, x)| format!("{l} {x:.3}"))
                    .collect();
                println!("{}\t{}\t{}", p.label, probs.join(", "), t);
            }
        }
    } else {
        let opts = singlora::generate::GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            stop: a.stop.clone(),
        };
        opts.check()?;
        let (mut tokens, t0) = (0usize, std::time::Instant::now());
        for (i, t) in texts.iter().enumerate() {
            let system = systems
                .get(i)
                .and_then(|s| s.as_deref())
                .or(a.system.as_deref());
            if json {
                let c = s.generate_with(system, t, &opts, &mut |_| {})?;
                tokens += c.tokens;
                println!(
                    "{}",
                    serde_json::json!({"prompt": t, "completion": c.text, "tokens": c.tokens,
                        "stop_reason": c.stop_reason})
                );
                continue;
            }
            if i > 0 {
                println!();
            }
            if a.echo {
                println!("{t}\n---");
            }
            let mut out = std::io::stdout();
            let c = s.generate_with(system, t, &opts, &mut |piece| {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            })?;
            println!();
            tokens += c.tokens;
        }
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "generated {tokens} tokens in {secs:.1} s ({:.1} tokens/s)",
            tokens as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}
