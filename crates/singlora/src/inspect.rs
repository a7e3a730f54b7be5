//! `singlora inspect`: what an adapter is and what it costs.
//!
//! Parameter counts come from shapes alone: SingLoRA n·r with n = max(d_in, d_out), LoRA
//! r·(d_in + d_out), DoRA that plus d_out. For LLaMA-7B's seven projections at r = 8 that is
//! 12,648,448 against 19,988,480 (see the tests).

use std::fmt::Write;
use std::path::Path;

use candle_core::Device;
use serde::Serialize;

use crate::adapter::file::AdapterFile;
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::merge::base_weight;

/// LLaMA-family linear shapes (d_out, d_in) of q, k, v, o, gate, up, down in one block.
pub fn llama_block_shapes(
    hidden: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
) -> Vec<(usize, usize)> {
    let head_dim = hidden / heads;
    let kv = kv_heads * head_dim;
    vec![
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (intermediate, hidden),
        (intermediate, hidden),
        (hidden, intermediate),
    ]
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub module: String,
    /// (d_out, d_in) when known.
    pub shape: Option<(usize, usize)>,
    pub r: usize,
    pub scale: f64,
    pub params: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub method: String,
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub scale: f64,
    pub ramp_steps: Option<u64>,
    pub step: Option<u64>,
    pub u: f64,
    pub init: Option<String>,
    pub target_modules: serde_json::Value,
    pub layers: Vec<LayerInfo>,
    pub adapter_params: usize,
    pub head_params: usize,
    pub labels: Option<Vec<String>>,
    pub base_params: Option<usize>,
    /// (adapter + head parameters) / base parameters.
    pub trainable_fraction: Option<f64>,
}

pub fn inspect(adapter: &Path, base: Option<&Path>) -> Result<Inspection> {
    let af = AdapterFile::read(adapter, &Device::Cpu)?;
    let ckpt = base.map(Checkpoint::open).transpose()?;
    let c = &af.config;
    let mut layers = vec![];
    for (module, t) in &af.layers {
        let shape = af.layer_shape(module, ckpt.as_ref())?;
        if let Some(ck) = &ckpt {
            // refuses an adapter whose shapes do not fit the base
            let w0 = base_weight(ck, module, c.fan_in_fan_out)?;
            af.build_adapter(module, &w0, &af.clock())?;
        }
        layers.push(LayerInfo {
            module: module.clone(),
            shape,
            r: c.rank_for(module),
            scale: c.scale_for(module),
            params: t.values().map(|x| x.elem_count()).sum(),
        });
    }
    let adapter_params = af.num_adapter_params();
    let head_params: usize = af.heads.values().map(|t| t.elem_count()).sum();
    let base_params = ckpt.as_ref().map(Checkpoint::num_params);
    let ramps = c.kind.ramps();
    Ok(Inspection {
        method: c.kind.method(c.use_rslora).to_string(),
        peft_type: c.peft_type().into(),
        r: c.r,
        lora_alpha: c.lora_alpha,
        use_rslora: c.use_rslora,
        scale: crate::adapter::scale(c.lora_alpha, c.r, c.use_rslora),
        ramp_steps: ramps.then_some(c.ramp_steps),
        step: ramps.then_some(c.step),
        u: c.u(),
        init: c.init.clone(),
        target_modules: c.target_modules.clone(),
        layers,
        adapter_params,
        head_params,
        labels: c.labels.clone(),
        base_params,
        trainable_fraction: base_params.map(|b| (adapter_params + head_params) as f64 / b as f64),
    })
}

/// Groups thousands for people: 12648448 → 12,648,448.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

impl Inspection {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "method        {} (peft_type {})",
            self.method, self.peft_type
        );
        let _ = writeln!(
            s,
            "rank          r = {}, lora_alpha = {}, scale = {:.6} ({})",
            self.r,
            self.lora_alpha,
            self.scale,
            if self.use_rslora {
                "alpha/sqrt(r)"
            } else {
                "alpha/r"
            }
        );
        if let (Some(t), Some(step)) = (self.ramp_steps, self.step) {
            let _ = writeln!(
                s,
                "ramp          step t = {step}, ramp_steps T = {t}, u(t) = {:.6}{}",
                self.u,
                if t == 0 { " (no ramp)" } else { "" }
            );
            if let Some(init) = &self.init {
                let _ = writeln!(s, "init          {init}");
            }
        }
        let _ = writeln!(s, "targets       {}", self.target_modules);
        let _ = writeln!(s, "layers        {}", self.layers.len());
        let w = self
            .layers
            .iter()
            .map(|l| l.module.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let _ = writeln!(
            s,
            "  {:<w$}  {:>13}  {:>4}  {:>9}  {:>10}",
            "module", "d_out x d_in", "r", "scale", "params"
        );
        for l in &self.layers {
            let shape = l
                .shape
                .map_or("?".to_string(), |(o, i)| format!("{o} x {i}"));
            let _ = writeln!(
                s,
                "  {:<w$}  {:>13}  {:>4}  {:>9.4}  {:>10}",
                l.module,
                shape,
                l.r,
                l.scale,
                thousands(l.params)
            );
        }
        let _ = writeln!(s, "adapter params {}", thousands(self.adapter_params));
        if self.head_params > 0 {
            let _ = writeln!(s, "head params    {}", thousands(self.head_params));
        }
        if let Some(labels) = &self.labels {
            let _ = writeln!(s, "labels         {}", labels.join(", "));
        }
        if let (Some(b), Some(f)) = (self.base_params, self.trainable_fraction) {
            let _ = writeln!(s, "base params    {}", thousands(b));
            let _ = writeln!(s, "trainable      {:.4}% of the base", 100.0 * f);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::AdapterKind;

    #[test]
    fn llama_7b_counts() {
        let shapes = llama_block_shapes(4096, 11008, 32, 32);
        let count = |k| -> usize {
            32 * shapes
                .iter()
                .map(|(o, i)| AdapterKind::param_count(k, *o, *i, 8))
                .sum::<usize>()
        };
        assert_eq!(count(AdapterKind::SingLora), 12_648_448);
        assert_eq!(count(AdapterKind::Lora), 19_988_480);
        assert_eq!(thousands(12_648_448), "12,648,448");
        assert_eq!(thousands(999), "999");
    }
}
