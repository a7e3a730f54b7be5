//! Helpers shared by the integration tests.

/// A training run that reports nothing: a fresh one, or the run in `out` resumed (with `cfg`'s
/// `stop_after`).
#[allow(dead_code)]
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

/// The largest |x| of a tensor of any float dtype, in f64.
#[allow(dead_code)]
pub fn max_abs(t: &candle_core::Tensor) -> f64 {
    t.to_dtype(candle_core::DType::F64)
        .and_then(|t| t.abs()?.max_all()?.to_scalar::<f64>())
        .unwrap()
}

/// The largest |a − b|, computed in f64.
#[allow(dead_code)]
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    let f64 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    max_abs(&(f64(a) - f64(b)).unwrap())
}
