//! `singlora example`: the adapter-file path end to end on a tiny generated model.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use candle_core::{DType, Device};
use singlora::adapter::target::TargetSpec;
use singlora::adapter::{AdapterKind, AdapterSpec};
use singlora::checkpoint::Checkpoint;
use singlora::synthetic::{random_adapter, write_checkpoint, LlamaShape};

/// The example tokenizer's words.
const EXAMPLE_WORDS: &str = "the a an is are was of to in and or not it this that what who \
    where when how why yes no good bad great awful movie film book song day night cat dog \
    red blue green one two three four five capital city france paris italy rome water fire \
    hot cold big small fast slow happy sad answer question please thanks i you we they";

pub fn run(dir: Option<PathBuf>) -> Result<()> {
    let _keep;
    let dir = match dir {
        Some(d) => d,
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().to_path_buf();
            _keep = t;
            p
        }
    };
    let shape = LlamaShape {
        hidden: 64,
        intermediate: 172,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 128,
    };
    let base = dir.join("base");
    write_checkpoint(&base, &shape.config(), &shape.tensors(0, DType::BF16)?, 2)?;
    // a word-level vocabulary inside the model's 128 ids, so `train --task sft` runs on it
    let words: Vec<&str> = EXAMPLE_WORDS.split_whitespace().collect();
    singlora::synthetic::write_tokenizer(&base, &words, singlora::tokenize::TokenizerStyle::Llama)?;
    println!(
        "1. a LLaMA-shaped checkpoint (bf16, 2 shards, random weights, a tokenizer of {} words) \
         in {}",
        words.len(),
        base.display()
    );

    let targets = TargetSpec::parse(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        None,
    )?;
    let layers: Vec<_> = shape
        .linears()
        .into_iter()
        .filter(|(n, _)| targets.matches(n) && n != "lm_head")
        .collect();
    let mut spec = AdapterSpec::new(AdapterKind::SingLora, 8, 8.0);
    spec.seed = 1;
    let af = random_adapter(&spec, &layers, &targets, 5, 10)?;
    let adapter = dir.join("adapter");
    af.write(&adapter, true)?;
    println!(
        "2. a SingLoRA adapter (r = 8, alpha = 8, step 5 of a 10-step ramp) in {}\n",
        adapter.display()
    );

    println!(
        "$ singlora inspect --adapter {} --base {}",
        adapter.display(),
        base.display()
    );
    print!(
        "{}",
        singlora::inspect::inspect(&adapter, Some(&base))?.render()
    );

    let merged = dir.join("merged");
    let opts = singlora::merge::MergeOptions {
        overwrite: true,
        dtype: Some(DType::F32),
        ..Default::default()
    };
    println!(
        "\n$ singlora merge --base ... --adapter ... --out {} --dtype f32",
        merged.display()
    );
    let report = singlora::merge::merge_checkpoint(&base, &adapter, &merged, &opts)?;
    crate::print_merge(&merged, &report);

    let lora = dir.join("exported-lora");
    println!(
        "\n$ singlora export-lora --adapter ... --out {}",
        lora.display()
    );
    singlora::adapter::export::export_lora(&adapter, &lora, None, true)?;
    let merged_lora = dir.join("merged-from-lora");
    singlora::merge::merge_checkpoint(&base, &lora, &merged_lora, &opts)?;
    let (a, b) = (Checkpoint::open(&merged)?, Checkpoint::open(&merged_lora)?);
    let mut max = 0f64;
    for name in a.names() {
        let x = a.load(name, &Device::Cpu)?.to_dtype(DType::F64)?;
        let y = b.load(name, &Device::Cpu)?.to_dtype(DType::F64)?;
        max = max.max((x - y)?.abs()?.max_all()?.to_scalar::<f64>()?);
    }
    println!("merging the exported LoRA gives the same checkpoint: max difference {max:.2e}");
    ensure!(max < 1e-6, "exported LoRA merges differently ({max})");
    Ok(())
}
