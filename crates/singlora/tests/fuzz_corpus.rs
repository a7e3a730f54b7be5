//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) and every input that once crashed a reader
//! (`fuzz/regressions/<target>/`) through the same entry functions the cargo-fuzz targets call
//! (`fuzz/harness.rs`), on stable and in seconds. A reader may refuse an input with an error;
//! it must not panic. See `docs/fuzzing.md`.

use std::path::{Path, PathBuf};

#[path = "../../../fuzz/harness.rs"]
mod harness;

fn inputs(target: &str, kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return vec![];
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let corpus = inputs(target, "corpus");
    assert!(
        !corpus.is_empty(),
        "no corpus for fuzz target `{target}` under fuzz/corpus/{target}"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut failed = vec![];
    for path in corpus.iter().chain(&inputs(target, "regressions")) {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| harness::run(target, &data, dir.path())).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "fuzz target `{target}` panics on: {failed:#?}"
    );
}

#[test]
fn fuzz_safetensors() {
    replay("safetensors");
}

#[test]
fn fuzz_checkpoint() {
    replay("checkpoint");
}

#[test]
fn fuzz_adapter_config() {
    replay("adapter_config");
}

#[test]
fn fuzz_adapter_file() {
    replay("adapter_file");
}

#[test]
fn fuzz_gguf() {
    replay("gguf");
}

#[test]
fn fuzz_rows() {
    replay("rows");
}

/// Every folder of inputs belongs to a target that a test above replays.
#[test]
fn every_folder_is_replayed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    for kind in ["corpus", "regressions"] {
        for e in std::fs::read_dir(root.join(kind)).unwrap() {
            let name = e.unwrap().file_name();
            let name = name.to_str().unwrap();
            assert!(harness::TARGETS.contains(&name), "fuzz/{kind}/{name}");
        }
    }
}

/// Each kept crash input is now refused with an error that names the file and the fault.
#[test]
fn crash_inputs_are_refused_with_a_message() {
    use candle_core::{DType, Device};
    use singlora::adapter::config::AdapterConfig;
    use singlora::adapter::file::AdapterFile;
    use singlora::checkpoint::TensorFile;
    use singlora::gguf::load_gguf_bytes;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let gguf = |f: &str| {
        load_gguf_bytes(Path::new("in.gguf"), &read(f), DType::F32)
            .unwrap_err()
            .to_string()
    };
    let safetensors = |f: &str| {
        TensorFile::from_bytes(Path::new("in.safetensors"), read(f))
            .unwrap_err()
            .to_string()
    };
    let adapter = |f: &str| {
        let data = read(f);
        let (config, weights) = harness::two_files(&data).unwrap();
        let config = std::str::from_utf8(config).unwrap();
        let config =
            AdapterConfig::from_json_str(config, Path::new("adapter_config.json")).unwrap();
        let path = Path::new("in.safetensors");
        let file = TensorFile::from_bytes(path, weights.to_vec()).unwrap();
        AdapterFile::from_parts(config, &file, &Device::Cpu)
            .unwrap_err()
            .to_string()
    };
    let cases = [
        (
            gguf("gguf/alignment-zero"),
            "in.gguf: metadata `general.alignment` = 0",
        ),
        (
            gguf("gguf/block-count-huge"),
            "in.gguf: llama.block_count = 1099511627776 layers",
        ),
        (
            gguf("gguf/block-count-more-than-tensors"),
            "in.gguf: llama.block_count = 4194305 layers, but the file holds only 12 tensors",
        ),
        (
            gguf("gguf/key-length-overflow"),
            "in.gguf: 2 heads of size 9223372036854775808",
        ),
        (
            gguf("gguf/tensor-elements-overflow"),
            "is larger than the file",
        ),
        (
            safetensors("safetensors/offsets-overflow"),
            "in.safetensors: is not a valid",
        ),
        (
            adapter("adapter_file/lora-A-1d"),
            "lora_A.weight` has shape [6], not 2-D",
        ),
        (
            adapter("adapter_file/lora-B-scalar"),
            "lora_B.weight` has shape [], not 2-D",
        ),
    ];
    for (err, want) in cases {
        assert!(err.contains(want), "{err}\nshould contain: {want}");
        assert!(err.contains("in."), "{err} does not name the file");
    }
}
