//! Helpers shared by the integration tests.

/// A training run that reports nothing: a fresh one, or the run in `out` resumed (with `cfg`'s
/// `stop_after`).
pub fn run_train(
    cfg: singlora::train::TrainConfig,
    out: &std::path::Path,
    resume: bool,
    overwrite: bool,
) -> singlora::Result<singlora::train::TrainSummary> {
    let silent = std::sync::Arc::new(singlora::train::Silent);
    if resume {
        let changes = singlora::train::ResumeChanges {
            stop_after: cfg.stop_after,
            ..Default::default()
        };
        singlora::train::resume(out, &changes, silent)
    } else {
        singlora::train::train(cfg, out, overwrite, silent)
    }
}
