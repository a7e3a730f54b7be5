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

/// A byte-level BPE tokenizer.json of the decoder fixtures' 40 tokens (`<bos>`, `<eos>`, `Ġ`,
/// a–z, x0–x10).
#[allow(dead_code)]
pub fn write_tiny_tokenizer(dir: &std::path::Path) {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<bos>", "<eos>", "Ġ"]
        .into_iter()
        .map(str::to_string)
        .chain(('a'..='z').map(String::from))
        .chain((0..11).map(|i| format!("x{i}")))
        .enumerate()
    {
        vocab.insert(t, serde_json::json!(i));
    }
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true,
            "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
}
