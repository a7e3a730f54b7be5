//! `--base-dtype same`: a GGUF model's quantised linear weights kept as the file stores them
//! (Q4_K, Q6_K, Q8_0, …) compute what the same file dequantised at load computes (the weights,
//! every method's loss and adapter gradients), in LLaMA's layout (Q/K rows in llama.cpp's order) and
//! GPT-2's (Conv1D weights stored transposed), in a fraction of the memory.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use singlora::gguf::model::GgufQuant;
use singlora::merge::gguf::convert_to_gguf;
use singlora::model::Pretrained;
use singlora::quant::BaseDtype;
use singlora::synthetic::{write_bpe_tokenizer, write_checkpoint, LlamaShape};

mod common;
use common::max_abs_diff;

/// A LLaMA whose rows are whole Q4_K blocks (256 values), as a GGUF file in `quant`.
fn llama_gguf(dir: &Path, quant: GgufQuant) -> PathBuf {
    let shape = LlamaShape::K_BLOCKS;
    let base = dir.join("llama");
    write_checkpoint(
        &base,
        &shape.config(),
        &shape.tensors(5, DType::F32).unwrap(),
        1,
    )
    .unwrap();
    write_bpe_tokenizer(&base).unwrap();
    let out = dir.join(format!("llama-{quant}.gguf"));
    convert_to_gguf(&base, &out, false, quant).unwrap();
    out
}

/// The GPT-2 fixture (tests/fixtures/decoders/gpt2) as a GGUF file in `quant`.
fn gpt2_gguf(dir: &Path, quant: GgufQuant) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/decoders/gpt2");
    let base = dir.join("gpt2");
    std::fs::create_dir_all(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), base.join(f)).unwrap();
    }
    common::write_tiny_tokenizer(&base);
    let out = dir.join(format!("gpt2-{quant}.gguf"));
    convert_to_gguf(&base, &out, false, quant).unwrap();
    out
}

#[test]
fn kept_weights_compute_what_the_dequantised_file_computes() {
    let tmp = tempfile::tempdir().unwrap();
    // f32 bytes over kept bytes: Q4_K/Q6_K about 4.5–6.6 bits a value, Q8_0 8.5
    for (file, min_ratio) in [
        (llama_gguf(tmp.path(), GgufQuant::Q4KM), 5.0),
        (gpt2_gguf(tmp.path(), GgufQuant::Q8_0), 3.0),
    ] {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let kept = Pretrained::load_as(&file, DType::F32, &Device::Cpu, BaseDtype::Same).unwrap();
        let dense = Pretrained::load(&file, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(kept.num_params, dense.num_params, "{name}");
        let (bytes, f32_bytes) = kept.body.quantized_bytes(DType::F32).unwrap();
        assert!(
            bytes as f64 * min_ratio < f32_bytes as f64,
            "{name}: {bytes} bytes kept of {f32_bytes}"
        );
        // every kept weight dequantises to the dense load's weight (Q/K rows in HF's order)
        let mut n_kept = 0;
        for (k, d) in kept.body.linears().iter().zip(dense.body.linears()) {
            assert_eq!(k.name(), d.name());
            assert!(!d.base().is_quantized());
            if k.base().is_quantized() {
                n_kept += 1;
                let diff = max_abs_diff(&k.base().weight().unwrap(), &d.base().weight().unwrap());
                assert_eq!(diff, 0.0, "{name}: {}", k.name());
            }
        }
        let n = kept.body.linears().len();
        if name.starts_with("llama") {
            assert_eq!(
                n_kept, n,
                "{name}: every projection and the head are Q4_K/Q6_K"
            );
        } else {
            // GPT-2's MLP c_proj rows of 48 are not whole Q8_0 blocks: stored (and kept) as f16
            assert_eq!(n_kept, n - 2, "{name}");
        }
        for method in ["singlora", "lora", "dora"] {
            let kept =
                Pretrained::load_as(&file, DType::F32, &Device::Cpu, BaseDtype::Same).unwrap();
            let dense = Pretrained::load(&file, DType::F32, &Device::Cpu).unwrap();
            let vocab = dense.config["vocab_size"].as_u64().unwrap() as u32;
            let (q, d) = (
                common::sft_with_adapters(kept.body, method),
                common::sft_with_adapters(dense.body, method),
            );
            let ids: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % vocab).collect();
            common::assert_same_loss_and_grads(&q, &d, &ids, &format!("{name} {method}"));
        }
    }
}

/// The types are the file's: a float GGUF keeps nothing quantised, and a Hugging Face directory
/// is refused by name.
#[test]
fn same_keeps_only_quantised_types_and_needs_a_gguf_file() {
    let tmp = tempfile::tempdir().unwrap();
    let f16 = llama_gguf(tmp.path(), GgufQuant::F16);
    let pre = Pretrained::load_as(&f16, DType::F32, &Device::Cpu, BaseDtype::Same).unwrap();
    assert!(pre.body.quantized_bytes(DType::F32).is_none());
    let e = Pretrained::load_as(
        &tmp.path().join("llama"),
        DType::F32,
        &Device::Cpu,
        BaseDtype::Same,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("llama") && e.contains("--base-dtype same") && e.contains("not a GGUF"),
        "{e}"
    );
}

/// An FP8 base runs on a CUDA GPU only: on the CPU it is refused with a message that says so
/// and names what works there, for a GGUF file and a Hugging Face directory alike.
#[test]
fn fp8_is_refused_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let f16 = llama_gguf(tmp.path(), GgufQuant::F16);
    for path in [f16, tmp.path().join("llama")] {
        let e = Pretrained::load_as(&path, DType::F32, &Device::Cpu, BaseDtype::Fp8)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("--base-dtype fp8") && e.contains("CUDA") && e.contains("nf4"),
            "{e}"
        );
    }
    assert_eq!("fp8".parse::<BaseDtype>().unwrap(), BaseDtype::Fp8);
    assert_eq!(BaseDtype::Fp8.to_string(), "fp8");
    let e = "fp4".parse::<BaseDtype>().unwrap_err().to_string();
    assert!(e.contains("fp4") && e.contains("fp8"), "{e}");
}
