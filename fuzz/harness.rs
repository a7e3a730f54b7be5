//! The fuzz entry functions, shared by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) and
//! the regression test that replays the kept corpus and crash inputs under `cargo test`
//! (`crates/singlora/tests/fuzz_corpus.rs`). Each takes the raw input, runs the reader on it in
//! memory and may return any `Err`; a panic, abort, hang or runaway allocation is the bug.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use singlora::adapter::config::AdapterConfig;
use singlora::adapter::file::AdapterFile;
use singlora::checkpoint::{float_dtype, Checkpoint, TensorFile, INDEX_FILE, SINGLE_FILE};
use singlora::data::{load_dataset_bytes, Columns, LabelSet, Task};
use singlora::gguf::load_gguf_bytes;

/// The target names, as the folders under `fuzz/corpus/` and `fuzz/regressions/` are named.
pub const TARGETS: &[&str] = &[
    "safetensors",
    "checkpoint",
    "adapter_config",
    "adapter_file",
    "gguf",
    "rows",
];

/// Runs the entry function of `target` on `data` (`checkpoint` writes its files into `dir`).
pub fn run(target: &str, data: &[u8], dir: &Path) {
    match target {
        "safetensors" => safetensors(data),
        "checkpoint" => checkpoint_in(dir, data),
        "adapter_config" => adapter_config(data),
        "adapter_file" => adapter_file(data),
        "gguf" => gguf(data),
        "rows" => rows(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// Two files in one input: a little-endian u32 length, that many bytes of the first file, then
/// the second; `None` where the length runs past the input.
pub fn two_files(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    (len <= rest.len()).then(|| rest.split_at(len))
}

/// A safetensors file: header, tensor table, then every tensor loaded and cast to f32 as the
/// model loader does (`Weights::get`).
pub fn safetensors(data: &[u8]) {
    let Ok(file) = TensorFile::from_bytes(Path::new("fuzz.safetensors"), data.to_vec()) else {
        return;
    };
    let _ = file.metadata();
    let names: Vec<String> = file.names().map(str::to_string).collect();
    for name in &names {
        let meta = file.meta(name).expect("listed names have metadata");
        let Ok(t) = file.load(name, &Device::Cpu) else {
            continue;
        };
        assert_eq!(t.dims(), meta.shape.as_slice(), "{name}");
        if float_dtype(meta.dtype).is_some() {
            let _ = t.to_dtype(DType::F32);
        }
    }
}

/// A checkpoint directory in one input: a little-endian u32 length, that many bytes of
/// `model.safetensors.index.json`, then the one shard it may name,
/// `model-00001-of-00001.safetensors`; with a length of 0 there is no index and the rest is
/// `model.safetensors`. The files are written into a directory of this process's own.
pub fn checkpoint(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("singlora-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    });
    checkpoint_in(dir, data);
}

/// [`checkpoint`] in the directory `dir`.
pub fn checkpoint_in(dir: &Path, data: &[u8]) {
    let Some((index, shard)) = two_files(data) else {
        return;
    };
    for f in [INDEX_FILE, SINGLE_FILE, SHARD] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    if index.is_empty() {
        std::fs::write(dir.join(SINGLE_FILE), shard).unwrap();
    } else {
        std::fs::write(dir.join(INDEX_FILE), index).unwrap();
        std::fs::write(dir.join(SHARD), shard).unwrap();
    }
    let Ok(ck) = Checkpoint::open(dir) else {
        return;
    };
    let _ = ck.num_params();
    let _ = ck.matrices();
    let names: Vec<String> = ck.names().map(str::to_string).collect();
    for name in &names {
        assert!(
            ck.meta(name).is_some() && ck.file_of(name).is_some(),
            "{name}"
        );
        let _ = ck.load(name, &Device::Cpu);
    }
}

const SHARD: &str = "model-00001-of-00001.safetensors";

/// `adapter_config.json`: parsing, the per-module rank/alpha patterns, and writing it back.
pub fn adapter_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("adapter_config.json");
    let Ok(c) = AdapterConfig::from_json_str(text, path) else {
        return;
    };
    for module in ["model.layers.0.self_attn.q_proj", "q_proj", ""] {
        let _ = c.rank_for(module);
        let _ = c.alpha_for(module);
        let _ = c.scale_for(module);
    }
    let _ = c.u();
    // What is written must read back.
    if let Err(e) = AdapterConfig::from_json(&c.to_json(), path) {
        panic!("a config that was read does not read back after writing: {e}");
    }
}

/// An adapter directory in one input: a little-endian u32 length, that many bytes of
/// `adapter_config.json`, then `adapter_model.safetensors`.
pub fn adapter_file(data: &[u8]) {
    let Some((config, weights)) = two_files(data) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(config) else {
        return;
    };
    let Ok(config) = AdapterConfig::from_json_str(text, Path::new("adapter_config.json")) else {
        return;
    };
    let path = Path::new("adapter_model.safetensors");
    let Ok(file) = TensorFile::from_bytes(path, weights.to_vec()) else {
        return;
    };
    let Ok(af) = AdapterFile::from_parts(config, &file, &Device::Cpu) else {
        return;
    };
    let _ = af.num_adapter_params();
    for module in af.layers.keys() {
        let _ = af.layer_shape(module, None);
    }
}

/// A GGUF model: header, metadata, tensor table, dequantisation, and the tokenizer rebuilt
/// from the metadata, which then encodes and decodes a little text.
pub fn gguf(data: &[u8]) {
    let Ok(m) = load_gguf_bytes(Path::new("fuzz.gguf"), data, DType::F32) else {
        return;
    };
    for text in ["Hello world 123", "<|im_start|>ab ab a1c\n\n  x", ""] {
        for special in [false, true] {
            if let Ok(enc) = m.tokenizer.encode(text, special) {
                let _ = m.tokenizer.decode(enc.get_ids(), false);
            }
        }
    }
}

/// A data file. The first byte picks the format (bits 0-1: JSONL, CSV, TSV, JSONL), the task, `--skip-bad-rows`
/// and whether a `text_pair` column is required; the rest is the file.
pub fn rows(data: &[u8]) {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let path = Path::new(match sel & 0x03 {
        1 => "fuzz.csv",
        2 => "fuzz.tsv",
        _ => "fuzz.jsonl",
    });
    let task = if sel & 0x10 == 0 {
        Task::Classify
    } else {
        Task::Sft
    };
    let skip = sel & 0x20 != 0;
    // The default columns come from the CLI parser: made once, not per input.
    static COLUMNS: OnceLock<[Columns; 2]> = OnceLock::new();
    let columns = COLUMNS.get_or_init(|| {
        let pair = Columns {
            text_pair: Some("text_pair".into()),
            ..Columns::default()
        };
        [Columns::default(), pair]
    });
    let columns = &columns[usize::from(sel & 0x40 != 0)];
    let Ok(ds) = load_dataset_bytes(path, bytes, task, columns, skip) else {
        return;
    };
    assert!(!ds.is_empty());
    if task == Task::Classify {
        if let Ok(labels) = LabelSet::from_dataset(&ds) {
            let _ = labels.check(&ds);
            let _ = labels.describe();
        }
    }
}
