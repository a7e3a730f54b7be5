//! `singlora-lab example-adapters`: random non-trivial adapters of every method for a base
//! checkpoint (a Hugging Face directory or a GGUF file), for the compatibility checks against
//! PEFT (`scripts/check_peft_loads.py`) and llama.cpp (`scripts/check_llama_cpp.py`).

use std::path::Path;

use anyhow::Result;
use candle_core::DType;
use singlora::adapter::target::TargetSpec;
use singlora::adapter::{AdapterKind, AdapterSpec};
use singlora::checkpoint::Checkpoint;
use singlora::synthetic::random_adapter;

/// Random non-trivial adapters of every method on the seven projections of `base`.
pub fn run(base: &Path, out: &Path) -> Result<()> {
    let matrices =
        match singlora::gguf::find_gguf(base).filter(|_| !base.join("config.json").exists()) {
            Some(g) => singlora::gguf::load_gguf(&g, DType::F32)?
                .tensors
                .into_iter()
                .filter(|(_, t)| t.rank() == 2)
                .map(|(n, t)| {
                    (
                        n.trim_end_matches(".weight").to_string(),
                        (t.dim(0).unwrap(), t.dim(1).unwrap()),
                    )
                })
                .collect(),
            None => Checkpoint::open(base)?.matrices(),
        };
    let targets = TargetSpec::parse(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        None,
    )?;
    let layers: Vec<_> = matrices
        .into_iter()
        .filter(|(n, _)| targets.matches(n))
        .collect();
    for (name, kind, rslora) in [
        ("lora", AdapterKind::Lora, false),
        ("rslora", AdapterKind::Lora, true),
        ("dora", AdapterKind::Dora, false),
        ("singlora", AdapterKind::SingLora, false),
    ] {
        let mut spec = AdapterSpec::new(kind, 4, 8.0);
        spec.rslora = rslora;
        spec.seed = 3;
        random_adapter(&spec, &layers, &targets, 3, 4)?.write(&out.join(name), true)?;
    }
    println!(
        "wrote lora, rslora, dora and singlora adapters under {}",
        out.display()
    );
    Ok(())
}
