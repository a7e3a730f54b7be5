//! One rank's training loop: optimizer updates from micro-batches (this rank's shard of each
//! global batch in a data-parallel run), evaluation and the best adapter, checkpoints, and the
//! final outputs (rank 0 writes every file).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use serde_json::{json, Value};

use super::observer::{Observer, UpdateReport};
use super::rundir::RunDir;
use super::setup::{setup, Setup};
use super::state::{self, TrainerState};
use super::{schedule::lr_at, TrainConfig, TrainSummary};
use crate::adapter::file::AdapterFile;
use crate::atomic::StagedDir;
use crate::data::{self, Encoded, Task};
use crate::dist::{self, Collective, MakeCollective};
use crate::error::{Error, IoContext, Result};
use crate::eval::EvalResult;
use crate::metrics::MetricsLog;
use crate::optim::{AdamW, AdamWConfig, GradAccumulator};

/// A rank's place in a data-parallel run.
pub(super) struct RankCtx {
    pub rank: usize,
    pub world: usize,
    pub make: MakeCollective,
}

/// What a rank's share of the global mean loss counts: rows (classification) or target tokens
/// (SFT, whose loss is the mean over completion tokens).
/// An example's first token is never a target, packed or not.
fn loss_count(item: &Encoded, task: Task) -> usize {
    match task {
        Task::Classify => 1,
        Task::Sft => item.target_mask.iter().skip(1).filter(|&&m| m > 0).count(),
    }
}

/// One rank's run, from set-up to its summary.
pub(super) struct Trainer<'a> {
    s: Setup,
    cfg: TrainConfig,
    out: PathBuf,
    rank: usize,
    world: usize,
    group: Option<Box<dyn Collective>>,
    opt: AdamW,
    acc: GradAccumulator,
    /// The variables whose gradients are summed over the ranks.
    dp_vars: Vec<Var>,
    st: TrainerState,
    /// metrics.jsonl, on rank 0.
    log: Option<MetricsLog>,
    obs: &'a dyn Observer,
    /// The run directory, held (locked) by rank 0 for the run's life.
    _run_dir: Option<RunDir>,
}

/// How a rank starts.
pub(super) enum Start {
    /// A fresh run; rank 0 makes the run directory once the set-up has succeeded.
    Fresh { overwrite: bool },
    /// A resumed run; rank 0 holds the directory.
    Resume(Option<RunDir>),
}

/// One optimizer update's sums over its micro-batches (and the ranks).
struct UpdateSums {
    loss: f64,
    tokens: usize,
    stop: bool,
}

impl<'a> Trainer<'a> {
    /// Sets the run up: a fresh run directory with its `run.json`, or the newest checkpoint
    /// of `out` when resuming.
    pub(super) fn start(
        cfg: TrainConfig,
        out: &Path,
        start: Start,
        dist: Option<RankCtx>,
        obs: &'a dyn Observer,
    ) -> Result<Self> {
        let mut s = setup(cfg)?;
        let cfg = s.cfg.clone();
        let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank, d.world));
        if rank == 0 {
            for w in &s.warnings {
                obs.warning(w);
            }
            if !s.data.report.is_empty() {
                obs.rows_report(&s.data.report);
            }
        }
        let group = match dist {
            Some(d) => Some((d.make)(&s.device)?),
            None => None,
        };
        let mut st = TrainerState {
            step: 0,
            epoch: 0,
            next_batch: 0,
            seed: cfg.seed,
            best_eval_loss: None,
            tokens_seen: 0,
            elapsed_s: 0.0,
        };
        let opt_cfg = AdamWConfig {
            lr: cfg.learning_rate(),
            weight_decay: cfg.weight_decay,
            lora_plus_ratio: cfg.method.b_lr_ratio(cfg.lora_plus_ratio),
            ..Default::default()
        };
        let mut opt = AdamW::new(s.model.params(), opt_cfg);
        let mut run_dir = None;
        if let Start::Resume(held) = start {
            run_dir = held;
            // the newest checkpoint that loads whole; a damaged one is passed over and said
            let found = state::list(out)?;
            if found.is_empty() {
                return Err(Error::msg(format!(
                    "{}: no checkpoint to resume from",
                    out.display()
                )));
            }
            let mut loaded = None;
            for (step, dir) in found.iter().rev() {
                let attempt = state::load(dir, &s.device).and_then(|(af, opt_state, saved)| {
                    s.model.load_adapter(&af)?;
                    let mut o = AdamW::new(s.model.params(), opt_cfg);
                    o.load_state(opt_state)?;
                    Ok((o, saved))
                });
                match attempt {
                    Ok(x) => {
                        loaded = Some((*step, x));
                        break;
                    }
                    Err(e) if rank == 0 => obs.skipped_checkpoint(dir, &e.to_string()),
                    Err(_) => {}
                }
            }
            let (step, (o, saved)) = loaded.ok_or_else(|| {
                Error::msg(format!(
                    "{}: none of its {} checkpoints can be read (see above)",
                    out.display(),
                    found.len()
                ))
            })?;
            opt = o;
            st = saved;
            if rank == 0 {
                obs.resumed(out, step);
            }
        } else if let (Start::Fresh { overwrite }, 0) = (start, rank) {
            let mut inputs = vec![("--model", cfg.model.as_path()), ("--train", &cfg.train)];
            inputs.extend(cfg.eval.as_deref().map(|e| ("--eval", e)));
            let held = RunDir::create(out, overwrite, &inputs)?;
            if !held.cleaned.is_empty() {
                obs.cleaned(&held.cleaned);
            }
            write_run_json(&s, out, world)?;
            run_dir = Some(held);
        }
        let opt = opt.with_clock(s.model.clock.clone());
        let log = if rank == 0 {
            Some(MetricsLog::append_to(
                &out.join("metrics.jsonl"),
                Some(st.step),
            )?)
        } else {
            None
        };
        Ok(Self {
            acc: GradAccumulator::new(opt.vars()),
            dp_vars: opt.vars(),
            s,
            cfg,
            out: out.to_path_buf(),
            rank,
            world,
            group,
            opt,
            st,
            log,
            obs,
            _run_dir: run_dir,
        })
    }

    fn lead(&self) -> bool {
        self.rank == 0
    }

    fn log(&mut self, line: &Value) -> Result<()> {
        match self.log.as_mut() {
            Some(l) => l.write(line),
            None => Ok(()),
        }
    }

    /// Trains to the planned number of updates, or until asked to stop.
    pub(super) fn run(mut self) -> Result<TrainSummary> {
        let baseline_eval = if self.st.step == 0 && self.lead() {
            self.announce_eval();
            self.s.evaluate()?
        } else {
            None
        };
        if let Some(e) = &baseline_eval {
            self.obs.evaluated(0, e);
            self.log(&e.to_json(0))?;
        }
        if self.lead() {
            self.obs.started(&self.s.plan, self.st.step);
        }
        let total = self.s.plan.total_updates;
        // batches of rows (one example each, or several with --packing), by total length
        let d = &self.s.data;
        let lengths: Vec<usize> = d
            .train_rows
            .iter()
            .map(|r| r.iter().map(|&i| d.train_items[i].len()).sum())
            .collect();
        let started = Instant::now();
        let elapsed0 = self.st.elapsed_s;
        let mut final_eval = None;
        let mut last_loss = None;
        let mut window_start = Instant::now();
        let mut last_save = Instant::now();
        let mut stopped_early = false;

        'outer: while self.st.step < total {
            let cfg = &self.cfg;
            let batches =
                data::epoch_batches(&lengths, cfg.batch_size, cfg.seed, self.st.epoch, true);
            let n_batches = batches.len();
            let epoch = self.st.epoch;
            while self.st.epoch == epoch && self.st.next_batch < n_batches && self.st.step < total {
                // one optimizer update from up to grad_accum micro-batches
                let end = (self.st.next_batch + self.cfg.grad_accum).min(n_batches);
                let micro = end - self.st.next_batch;
                self.s.model.clock.set_training(true);
                let sums = self.accumulate(&batches[self.st.next_batch..end])?;
                if !sums.loss.is_finite() {
                    return Err(Error::msg(format!(
                        "the training loss is {} at update {}: the run diverged (try a lower --lr)",
                        sums.loss,
                        self.st.step + 1
                    )));
                }
                self.st.tokens_seen += sums.tokens as u64;
                let plan = &self.s.plan;
                let lr = lr_at(
                    plan.lr,
                    self.cfg.schedule,
                    plan.warmup_updates,
                    total,
                    self.st.step + 1,
                );
                let u = self.s.model.clock.u();
                let grad_norm = self.opt.step(&mut self.acc, lr, self.cfg.clip())?;
                self.s.model.clock.set_training(false);
                self.st.step += 1;
                self.st.next_batch = end;
                let loss = sums.loss / micro as f64;
                last_loss = Some(loss);
                let secs = window_start.elapsed().as_secs_f64().max(1e-9);
                window_start = Instant::now();
                let report = UpdateReport {
                    step: self.st.step,
                    total,
                    epoch: self.st.epoch as f64 + self.st.next_batch as f64 / n_batches as f64,
                    loss,
                    lr,
                    u,
                    tokens: sums.tokens,
                    tokens_per_s: sums.tokens as f64 / secs,
                    grad_norm,
                };
                self.log(&update_line(&report))?;
                if self.lead() {
                    self.obs.updated(&report);
                }

                let at_epoch_end = self.st.next_batch >= n_batches;
                let is_last = self.st.step >= total;
                let eval_now = match self.cfg.eval_every {
                    Some(n) if n > 0 => self.st.step % n == 0 || is_last,
                    _ => at_epoch_end || is_last,
                };
                if eval_now && self.lead() {
                    if let Some(e) = self.evaluate_and_keep_best()? {
                        if is_last {
                            final_eval = Some(e);
                        }
                    }
                }
                if at_epoch_end {
                    self.st.epoch += 1;
                    self.st.next_batch = 0;
                }
                self.st.elapsed_s = elapsed0 + started.elapsed().as_secs_f64();
                let save_now = self
                    .cfg
                    .save_every
                    .is_some_and(|n| n > 0 && self.st.step % n == 0)
                    || (self.cfg.save_minutes > 0.0
                        && last_save.elapsed().as_secs_f64() >= 60.0 * self.cfg.save_minutes);
                let stop = sums.stop || self.cfg.stop_after.is_some_and(|n| self.st.step >= n);
                if self.lead() && (save_now || stop || is_last) {
                    state::save(
                        &self.out,
                        &self.s.adapter_file()?,
                        &self.opt.state()?,
                        &self.st,
                        self.cfg.keep_checkpoints.max(1),
                    )?;
                    last_save = Instant::now();
                }
                if stop && !is_last {
                    stopped_early = true;
                    break 'outer;
                }
            }
        }

        if self.lead() && !stopped_early {
            self.write_outputs(final_eval.as_ref(), last_loss)?;
        }
        let summary = TrainSummary {
            run_dir: self.out.clone(),
            steps: self.st.step,
            total_steps: total,
            interrupted: stopped_early,
            final_eval,
            baseline_eval,
            trainable_params: self.s.plan.adapter_params + self.s.plan.head_params,
            adapted: self.s.plan.adapted_modules.clone(),
            train_loss: last_loss,
        };
        if self.lead() {
            self.obs.finished(&summary);
        }
        Ok(summary)
    }

    /// The gradients of one update's micro-batches into the accumulator; the ranks agree on
    /// the summed loss, the tokens and whether to stop.
    fn accumulate(&mut self, micro_batches: &[Vec<usize>]) -> Result<UpdateSums> {
        let micro = micro_batches.len();
        let mut loss_sum = 0.0;
        let mut tokens = 0usize;
        for idx in micro_batches {
            let (loss, n) = match self.group.is_some() {
                false => self.micro_batch(idx, 1.0 / micro as f64)?,
                true => self.micro_batch_shard(idx, micro)?,
            };
            loss_sum += loss;
            tokens += n;
        }
        let mut stop = self.obs.stop_requested();
        if let Some(g) = &self.group {
            let v = Tensor::new(
                &[loss_sum as f32, tokens as f32, f32::from(u8::from(stop))],
                &self.s.device,
            )?;
            let v = g.all_reduce_sum(&v)?.to_vec1::<f32>()?;
            loss_sum = v[0] as f64;
            tokens = v[1].round() as usize;
            stop = v[2] > 0.0;
        }
        Ok(UpdateSums {
            loss: loss_sum,
            tokens,
            stop,
        })
    }

    /// The batch of the training rows `idx`.
    fn collate(&self, idx: &[usize]) -> Result<data::Batch> {
        let d = &self.s.data;
        let rows: Vec<Vec<usize>> = idx.iter().map(|&r| d.train_rows[r].clone()).collect();
        data::collate_rows(&d.train_items, &rows, d.pad_id, &self.s.device)
    }

    /// One micro-batch (rows `idx`) on one device: its loss and tokens.
    fn micro_batch(&mut self, idx: &[usize], scale: f64) -> Result<(f64, usize)> {
        let batch = self.collate(idx)?;
        let (loss, grads) = self.s.model.loss_and_grads(&batch, scale)?;
        self.acc.add(&grads)?;
        Ok((
            loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            batch.n_tokens,
        ))
    }

    /// This rank's shard of a micro-batch, weighted by its share of the global batch's loss,
    /// with the gradients summed over the ranks: its weighted loss and tokens. A rank left
    /// without rows (or without completion tokens) runs one row at weight 0, so every rank
    /// makes the same reductions.
    fn micro_batch_shard(&mut self, idx: &[usize], micro: usize) -> Result<(f64, usize)> {
        let g = self
            .group
            .as_ref()
            .expect("a data-parallel rank has a group");
        let task = self.cfg.task;
        let (items, train_rows) = (&self.s.data.train_items, &self.s.data.train_rows);
        let row_count = |r: usize| -> usize {
            train_rows[r]
                .iter()
                .map(|&i| loss_count(&items[i], task))
                .sum()
        };
        let count = |rows: &[usize]| -> usize { rows.iter().map(|&r| row_count(r)).sum() };
        let total_count = count(idx);
        let mine = dist::shard(idx, self.rank, self.world);
        let mine_count = count(mine);
        let (rows, weight) = if mine_count > 0 {
            (mine, dist::shard_weight(mine_count, total_count))
        } else {
            let any = idx.iter().position(|&r| row_count(r) > 0).unwrap_or(0);
            (&idx[any..any + 1], 0.0)
        };
        let batch = self.collate(rows)?;
        let (loss, mut grads, summed) =
            self.s
                .model
                .loss_and_grads_synced(&batch, weight / micro as f64, g.as_grad_sync())?;
        dist::all_reduce_grads(&self.dp_vars, &mut grads, &summed, g.as_ref())?;
        self.acc.add(&grads)?;
        let loss = weight * loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((loss, if weight > 0.0 { batch.n_tokens } else { 0 }))
    }

    /// Tells the observer an evaluation starts, where there is eval data.
    fn announce_eval(&self) {
        let n = self.s.data.eval_items.len();
        if n > 0 {
            self.obs.evaluating(self.st.step, n);
        }
    }

    /// An evaluation (rank 0): logged, reported, and the adapter kept in `best/` when its
    /// loss is the lowest so far.
    fn evaluate_and_keep_best(&mut self) -> Result<Option<EvalResult>> {
        self.announce_eval();
        let Some(e) = self.s.evaluate()? else {
            return Ok(None);
        };
        self.obs.evaluated(self.st.step, &e);
        self.log(&e.to_json(self.st.step))?;
        if self.st.best_eval_loss.is_none_or(|b| e.loss < b) {
            self.st.best_eval_loss = Some(e.loss);
            let staged = StagedDir::new(&self.out.join("best"), true)?;
            self.s.adapter_file()?.write_into(staged.path())?;
            staged.commit()?;
        }
        Ok(Some(e))
    }

    /// The final adapter, curves.svg, for classification eval_report.txt, and the end of the
    /// run in run.json (rank 0).
    fn write_outputs(
        &self,
        final_eval: Option<&EvalResult>,
        train_loss: Option<f64>,
    ) -> Result<()> {
        let out = &self.out;
        write_adapter_in_place(&self.s.adapter_file()?, out)?;
        let lines = crate::metrics::read_metrics(&out.join("metrics.jsonl"))?;
        let title = format!(
            "{} r={} on {}",
            self.cfg.method,
            self.cfg.rank,
            super::rundir::model_name(&self.cfg.model)
        );
        crate::plot::write_curves(&out.join("curves.svg"), &lines, &title)?;
        let eval_source = match (&self.cfg.eval, self.cfg.eval_fraction) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(f)) => format!(
                "{} of the rows of {} held out (--eval-fraction)",
                f,
                self.cfg.train.display()
            ),
            (None, None) => "the eval split".to_string(),
        };
        if let (Some(e), Some(labels)) = (final_eval, &self.s.data.labels) {
            if let Some(m) = &e.metrics {
                let report = m.render(&labels.names);
                let header = format!(
                    "The adapter after update {} of {}, on {} ({} examples).\n\n",
                    self.st.step, self.s.plan.total_updates, eval_source, e.n
                );
                crate::atomic::write_file(
                    &out.join("eval_report.txt"),
                    format!("{header}{report}").as_bytes(),
                )?;
                self.obs.class_report(&report);
            }
        }
        super::rundir::finish_run_json(
            out,
            json!({
                "step": self.st.step,
                "train_loss": train_loss,
                "eval": final_eval.map(|e| e.to_json(self.st.step)),
                "eval_data": final_eval.map(|_| eval_source),
            }),
        )
    }
}

/// An update's line of metrics.jsonl.
fn update_line(r: &UpdateReport) -> Value {
    let mut line = json!({
        "step": r.step, "epoch": r.epoch, "loss": r.loss, "lr": r.lr, "u": r.u,
        "tokens": r.tokens, "tokens_per_s": r.tokens_per_s
    });
    if let Some(g) = r.grad_norm {
        line["grad_norm"] = json!(g);
    }
    line
}

/// `run.json`: every setting, the plan, the data's fingerprints and the versions.
fn write_run_json(s: &Setup, out: &Path, world: usize) -> Result<()> {
    let cfg = &s.cfg;
    super::rundir::write_run_json(
        out,
        json!({
            "config": cfg,
            "plan": s.plan,
            "seed": cfg.seed,
            "data": {
                "train": file_fingerprint(&cfg.train),
                "eval": cfg.eval.as_ref().map(|p| file_fingerprint(p)),
            },
            "world_size": world,
        }),
    )
}

/// Writes the adapter files into `dir` (created if needed), each atomically.
pub(crate) fn write_adapter_in_place(af: &AdapterFile, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).at(dir)?;
    let staged = StagedDir::new(&dir.join(".adapter"), true)?;
    af.write_into(staged.path())?;
    let mut files = vec![
        crate::adapter::config::CONFIG_FILE,
        crate::adapter::config::WEIGHTS_FILE,
    ];
    if af.chat_template.is_some() {
        files.push(crate::model::CHAT_TEMPLATE_FILE);
    }
    for f in files {
        std::fs::rename(staged.path().join(f), dir.join(f)).at(&dir.join(f))?;
    }
    Ok(())
}

fn file_fingerprint(path: &Path) -> Value {
    use sha2::{Digest, Sha256};
    match std::fs::read(path) {
        Ok(bytes) => json!({
            "path": path,
            "bytes": bytes.len(),
            "sha256": format!("{:x}", Sha256::digest(&bytes)),
        }),
        Err(_) => json!({"path": path}),
    }
}
