//! `singlora-lab example-adapters`: random non-trivial adapters of every method for a base
//! checkpoint, for the compatibility check against PEFT (`scripts/check_peft_loads.py`).

use std::path::Path;

use anyhow::Result;
use singlora::adapter::target::TargetSpec;
use singlora::adapter::{AdapterKind, AdapterSpec};
use singlora::checkpoint::Checkpoint;
use singlora::synthetic::random_adapter;

/// Random non-trivial adapters of every method on the seven projections of `base`.
pub fn run(base: &Path, out: &Path) -> Result<()> {
    let ckpt = Checkpoint::open(base)?;
    let targets = TargetSpec::parse(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        None,
    )?;
    let layers: Vec<_> = ckpt
        .matrices()
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
