//! A LoRA adapter as the GGUF file llama.cpp's `--lora` loads onto a LLaMA (or Qwen3) base, so
//! that one base file serves many adapters.
//!
//! llama.cpp adds `scale · B·(A·x)` to a weight's product, with `scale = s_user · α / r` (r the
//! rows of A; α = 0 reads as "no α": `scale = s_user`). Every method is written as plain LoRA
//! with its whole scale folded into B ([`crate::adapter::export::plain_lora_layer`]; SingLoRA:
//! B = s·u·A_out, A = A_inᵀ), and α = r, so at `--lora-scaled FILE 1` llama.cpp adds exactly
//! our ΔW. Per-layer ranks (`rank_pattern`) get α = 0, which gives the same scale 1.
//!
//! Metadata: `general.architecture` (the base's: `llama` without `--base`), `general.type = adapter`, `adapter.type = lora`,
//! `adapter.lora.alpha` (f32). Tensors: `<base tensor>.lora_a` of row-major shape (r, d_in)
//! and `<base tensor>.lora_b` (d_out, r), f32, named after llama.cpp's base tensor
//! (`blk.0.attn_q.weight.lora_a`). The rows of B for `attn_q` / `attn_k` are permuted as the
//! base's Q/K rows are ([`super::permute_qk`]), which needs the head counts: from `--base`
//! (Qwen3 keeps Hugging Face's row order).

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::model::{gguf_name_in, EXPORT_FAMILIES};
use super::write::{write_gguf_file, TensorInfo};
use super::{permute_qk, Arch};
use crate::adapter::export::plain_lora_layer;
use crate::adapter::file::AdapterFile;
use crate::adapter::AdapterKind;
use crate::error::{Error, Result};

/// What of the base an adapter's layout depends on: the architecture (tensor names, whether
/// Q/K rows are permuted) and the head counts a Q/K permutation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub arch: Arch,
    pub heads: usize,
    pub kv_heads: usize,
}

/// The architecture and attention head counts of a base (a GGUF file or a Hugging Face
/// directory); architectures GGUF export does not write are refused.
pub fn base_heads(base: &Path) -> Result<Heads> {
    let config = match super::find_gguf(base).filter(|_| !base.join("config.json").exists()) {
        Some(g) => super::load_gguf(&g, DType::F32)?.config,
        None => crate::checkpoint::read_json(&base.join("config.json"))?,
    };
    let path = base.join("config.json");
    let c = crate::model::weights::ConfigReader {
        path: &path,
        value: &config,
    };
    let model_type = c.str_or("model_type", "llama")?;
    let arch = Arch::of_model_type(model_type).ok_or_else(|| {
        Error::msg(format!(
            "{}: model_type `{model_type}`; llama.cpp adapters are written for {EXPORT_FAMILIES} bases only",
            base.display()
        ))
    })?;
    if arch == Arch::Gpt2 {
        let heads = c.usize("n_head")?;
        return Ok(Heads {
            arch,
            heads,
            kv_heads: heads,
        });
    }
    let heads = c.usize("num_attention_heads")?;
    Ok(Heads {
        arch,
        heads,
        kv_heads: c.usize_or("num_key_value_heads", Some(heads))?,
    })
}

/// The adapter's tensors as llama.cpp names and lays them out, f32, in module order.
pub fn lora_tensors(af: &AdapterFile, heads: Option<Heads>) -> Result<Vec<(String, Tensor)>> {
    if af.config.kind == AdapterKind::Dora {
        return Err(Error::msg(
            "llama.cpp's adapters are plain LoRA: a DoRA adapter's magnitude has no place there; merge it instead (singlora merge --format gguf)",
        ));
    }
    if !af.heads.is_empty() {
        return Err(Error::msg(
            "the adapter holds a classification head, which a llama.cpp LoRA adapter has no place for",
        ));
    }
    if af.layers.is_empty() {
        return Err(Error::msg("the adapter has no layers to export"));
    }
    // without a base the layout is LLaMA's, whose Q/K rows then need the head counts
    let arch = heads.map_or(Arch::Llama, |h| h.arch);
    let mut out = vec![];
    for module in af.layers.keys() {
        let base = gguf_name_in(arch, &format!("{module}.weight"))
            .filter(|g| g != "token_embd.weight" && !g.ends_with("_norm.weight"))
            .ok_or_else(|| {
                Error::msg(format!(
                    "layer `{module}` has no llama.cpp {} projection to attach to (the seven attention and MLP projections and lm_head can be adapted)",
                    arch.name()
                ))
            })?;
        let p = plain_lora_layer(af, module, None)?;
        let qk = if !arch.permutes_qk() {
            None
        } else if base.ends_with(".attn_q.weight") {
            Some(heads.map(|h| h.heads))
        } else if base.ends_with(".attn_k.weight") {
            Some(heads.map(|h| h.kv_heads))
        } else {
            None
        };
        let b = match qk {
            None => p.b,
            Some(Some(n)) => permute_qk(&p.b, n)?,
            Some(None) => {
                return Err(Error::msg(format!(
                    "layer `{module}`: llama.cpp stores Q and K with each head's rows reordered, so the adapter's B must be too, which needs the number of attention heads; pass --base (the model the adapter was trained on)"
                )))
            }
        };
        out.push((format!("{base}.lora_a"), p.a.to_dtype(DType::F32)?));
        out.push((format!("{base}.lora_b"), b.to_dtype(DType::F32)?));
    }
    Ok(out)
}

/// The adapter's metadata; α = r when every layer has rank r, else 0 (scale 1 either way).
pub fn lora_metadata(
    af: &AdapterFile,
    tensors: &[(String, Tensor)],
    name: &str,
    arch: Arch,
) -> Vec<(String, Value)> {
    let ranks: std::collections::BTreeSet<usize> = tensors
        .iter()
        .filter(|(n, _)| n.ends_with(".lora_a"))
        .filter_map(|(_, t)| t.dims().first().copied())
        .collect();
    let alpha = match ranks.iter().collect::<Vec<_>>().as_slice() {
        [r] => **r as f32,
        _ => 0.0,
    };
    let mut md = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.name().into()),
        ),
        ("general.type".to_string(), Value::String("adapter".into())),
        ("general.name".to_string(), Value::String(name.into())),
        ("adapter.type".to_string(), Value::String("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha)),
    ];
    if let Some(base) = af.config.base_model_name_or_path.as_deref() {
        md.push(("general.base_model.count".into(), Value::U32(1)));
        md.push((
            "general.base_model.0.name".into(),
            Value::String(base.into()),
        ));
    }
    md
}

/// `export-lora --format gguf`: reads `adapter` and writes the adapter GGUF `out` (staged; never
/// over an input; `--overwrite` replaces only singlora's own file). `base` gives the head
/// counts the Q/K permutation needs. Returns the tensors written and what interrupted writes
/// had left and was removed.
pub fn export_lora_gguf(
    adapter: &Path,
    out: &Path,
    base: Option<&Path>,
    overwrite: bool,
) -> Result<(Vec<TensorInfo>, Vec<PathBuf>)> {
    let af = AdapterFile::read(adapter, &Device::Cpu)?;
    let heads = base.map(base_heads).transpose()?;
    let tensors = lora_tensors(&af, heads)?;
    for (name, t) in &tensors {
        crate::adapter::check_finite(t, name)?;
    }
    let name = adapter
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let md = lora_metadata(&af, &tensors, &name, heads.map_or(Arch::Llama, |h| h.arch));
    let infos: Vec<TensorInfo> = tensors
        .iter()
        .map(|(n, t)| TensorInfo {
            name: n.clone(),
            shape: t.dims().to_vec(),
            dtype: GgmlDType::F32,
        })
        .collect();
    let mut inputs = vec![("--adapter", adapter)];
    inputs.extend(base.map(|b| ("--base", b)));
    let cleaned = write_gguf_file(out, overwrite, &inputs, &md, &infos, |i, _| {
        let v = tensors[i].1.flatten_all()?.to_vec1::<f32>()?;
        Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    })?;
    Ok((infos, cleaned))
}
