//! The progress display every training command shares: on a terminal a bar with the update
//! count, ETA and a message; elsewhere a line every 10 updates; nothing when quiet. Messages
//! print above the bar.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    quiet: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            bar: Mutex::new(None),
        }
    }

    /// A message (above the bar when there is one).
    pub fn say(&self, text: &str) {
        if self.quiet {
            return;
        }
        match &*self.bar.lock().unwrap() {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// What is going on between updates (in the bar's message, or on a line of its own).
    pub fn activity(&self, text: &str) {
        if self.quiet {
            return;
        }
        match &*self.bar.lock().unwrap() {
            Some(b) => b.set_message(text.to_string()),
            None => eprintln!("{text}"),
        }
    }

    /// A run of `total` updates starts after update `from`.
    pub fn start(&self, total: u64, from: u64) {
        if self.quiet || !std::io::stderr().is_terminal() {
            return;
        }
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} updates ({eta} left) {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        b.set_position(from);
        *self.bar.lock().unwrap() = Some(b);
    }

    /// Update `step` of `total` is done; `msg` says how it went.
    pub fn update(&self, step: u64, total: u64, msg: String) {
        if self.quiet {
            return;
        }
        match &*self.bar.lock().unwrap() {
            Some(b) => {
                b.set_position(step);
                b.set_message(msg);
            }
            None if step % 10 == 0 || step == total => eprintln!("step {step}/{total} {msg}"),
            None => {}
        }
    }

    /// The run in `run_dir` resumes after update `step`.
    pub fn resumed(&self, run_dir: &std::path::Path, step: u64) {
        self.say(&format!(
            "resuming {} from update {step}",
            run_dir.display()
        ));
    }

    /// The checkpoint `dir` could not be read (`why`); an older one is tried.
    pub fn skipped_checkpoint(&self, dir: &std::path::Path, why: &str) {
        self.say(&format!(
            "checkpoint {} cannot be read ({why}); resuming from the one before",
            dir.display()
        ));
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap().take() {
            b.finish_and_clear();
        }
    }
}
