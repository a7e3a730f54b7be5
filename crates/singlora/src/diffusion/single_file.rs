//! Single-file Stable Diffusion checkpoints (the `.safetensors` that A1111 and ComfyUI users
//! keep, in the original LDM layout) turned into a diffusers folder that the rest of singlora
//! loads: `singlora convert-single-file --checkpoint FILE --config SD_DIR --out DIR`.
//!
//! A single file holds weights only, so the configurations, tokenizer and scheduler come from a
//! diffusers folder of the same model family (`--config`; its weights, if any, are not read),
//! as diffusers' own `from_single_file(config=...)` does. Stable Diffusion 1.x (CLIP's text
//! encoder in Hugging Face's naming), 2.x (OpenCLIP's) and SDXL (`conditioner.embedders.0`:
//! CLIP ViT-L in Hugging Face's naming; `.1`: OpenCLIP ViT-bigG with its projection) are read.
//!
//! Names (LDM → diffusers), for a U-Net of `n` levels with `l` layers a level:
//! - `model.diffusion_model.`: `time_embed.{0,2}` → `time_embedding.linear_{1,2}`,
//!   `input_blocks.0.0` → `conv_in`; then per level b the `l` layers `input_blocks.i.0`
//!   (ResNet) → `down_blocks.b.resnets.j`, `input_blocks.i.1` → `down_blocks.b.attentions.j`,
//!   and below the last level `input_blocks.i.0.op` → `down_blocks.b.downsamplers.0.conv`;
//!   `middle_block.{0,1,2}` → `mid_block.{resnets.0, attentions.0, resnets.1}`; per level b the
//!   `l + 1` layers `output_blocks.i.0` → `up_blocks.b.resnets.j`, `.1` → `attentions.j`, the
//!   last one's `.1.conv` or `.2.conv` (after an attention) → `upsamplers.0.conv`;
//!   `out.{0,2}` → `conv_norm_out`, `conv_out`. Inside a ResNet: `in_layers.{0,2}` →
//!   `norm1`, `conv1`, `emb_layers.1` → `time_emb_proj`, `out_layers.{0,3}` → `norm2`,
//!   `conv2`, `skip_connection` → `conv_shortcut`.
//! - `first_stage_model.`: `encoder.down.b.block.j` → `encoder.down_blocks.b.resnets.j`,
//!   `encoder.down.b.downsample.conv` → `…downsamplers.0.conv`, `decoder.up.b` →
//!   `decoder.up_blocks.{n−1−b}` (upsample likewise), `mid.block_{1,2}` →
//!   `mid_block.resnets.{0,1}`, `mid.attn_1.{norm,q,k,v,proj_out}` →
//!   `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (1×1 convolutions stored as
//!   linear weights), `norm_out` → `conv_norm_out`, `nin_shortcut` → `conv_shortcut`.
//! - `cond_stage_model.transformer.` is Hugging Face's `CLIPTextModel` already;
//!   `cond_stage_model.model.` is OpenCLIP's: `token_embedding`, `positional_embedding`,
//!   `ln_final` → `embeddings.*`, `final_layer_norm`; `transformer.resblocks.i.{ln_1, ln_2,
//!   attn.out_proj, mlp.c_fc, mlp.c_proj}` → `encoder.layers.i.{layer_norm1, layer_norm2,
//!   self_attn.out_proj, mlp.fc1, mlp.fc2}`, the fused `attn.in_proj_{weight,bias}` cut into
//!   q, k and v; CLIP's `text_projection` and `logit_scale`, and a last layer beyond the
//!   config's (SD 2.x uses the penultimate layer, so diffusers' encoder is a layer shorter),
//!   left out.
//!
//! Left out on purpose: the EMA copy (`model_ema.*`), the schedule buffers the training code
//! kept (`betas`, `alphas_cumprod`, …; the scheduler comes from `--config`) and the text
//! encoder's `position_ids`. Anything else unknown is refused, listed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::atomic::StagedDir;
use crate::checkpoint::{read_json, write_safetensors, TensorFile};
use crate::error::{Error, IoContext, Result};

/// The diffusion schedule's buffers an LDM checkpoint carries; the scheduler config replaces
/// them.
const SCHEDULE_BUFFERS: [&str; 13] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
];

/// What a conversion wrote.
#[derive(Debug)]
pub struct Converted {
    pub out: PathBuf,
    /// Tensors written per component (unet, vae, text_encoder).
    pub tensors: BTreeMap<&'static str, usize>,
    /// Tensors of the file left out on purpose (EMA copy, schedule buffers, position ids).
    pub skipped: usize,
    /// What interrupted writes had left beside `out` and was removed.
    pub cleaned: Vec<PathBuf>,
}

/// The U-Net's LDM module prefixes and their diffusers names, from its config.
fn unet_prefixes(cfg: &Value, path: &Path) -> Result<Vec<(String, String)>> {
    let num = |k: &str| {
        cfg.get(k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| Error::bad_field(path, k, "is missing or not a number"))
    };
    let lpb = num("layers_per_block")?;
    let types = |k: &str| -> Result<Vec<bool>> {
        cfg.get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|t| t.as_str().is_some_and(|s| s.starts_with("CrossAttn")))
                    .collect()
            })
            .ok_or_else(|| Error::bad_field(path, k, "is missing or not a list"))
    };
    let (down, up) = (types("down_block_types")?, types("up_block_types")?);
    let n = down.len();
    if up.len() != n {
        return Err(Error::bad_field(
            path,
            "up_block_types",
            format!("has {} levels, down_block_types {n}", up.len()),
        ));
    }
    let mut m: Vec<(String, String)> = [
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
        ("middle_block.0", "mid_block.resnets.0"),
        ("middle_block.1", "mid_block.attentions.0"),
        ("middle_block.2", "mid_block.resnets.1"),
        // SDXL's added conditioning
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let mut i = 1;
    for (b, &attn) in down.iter().enumerate() {
        for j in 0..lpb {
            m.push((
                format!("input_blocks.{i}.0"),
                format!("down_blocks.{b}.resnets.{j}"),
            ));
            if attn {
                m.push((
                    format!("input_blocks.{i}.1"),
                    format!("down_blocks.{b}.attentions.{j}"),
                ));
            }
            i += 1;
        }
        if b + 1 < n {
            m.push((
                format!("input_blocks.{i}.0.op"),
                format!("down_blocks.{b}.downsamplers.0.conv"),
            ));
            i += 1;
        }
    }
    let mut i = 0;
    for (b, &attn) in up.iter().enumerate() {
        for j in 0..=lpb {
            m.push((
                format!("output_blocks.{i}.0"),
                format!("up_blocks.{b}.resnets.{j}"),
            ));
            if attn {
                m.push((
                    format!("output_blocks.{i}.1"),
                    format!("up_blocks.{b}.attentions.{j}"),
                ));
            }
            if j == lpb && b + 1 < n {
                let k = if attn { 2 } else { 1 };
                m.push((
                    format!("output_blocks.{i}.{k}.conv"),
                    format!("up_blocks.{b}.upsamplers.0.conv"),
                ));
            }
            i += 1;
        }
    }
    Ok(m)
}

/// A ResNet's LDM parameter name (after the block) in diffusers' naming.
fn resnet_param(rest: &str) -> Option<String> {
    const NAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    NAMES
        .iter()
        .find_map(|(l, d)| rest.strip_prefix(l).map(|p| format!("{d}{p}")))
}

/// The diffusers name of U-Net tensor `name` (after `model.diffusion_model.`).
fn unet_name(prefixes: &[(String, String)], name: &str) -> Option<String> {
    // the longest LDM prefix that the name continues
    let (ldm, diffusers) = prefixes
        .iter()
        .filter(|(p, _)| {
            name.strip_prefix(p.as_str())
                .is_some_and(|r| r.starts_with('.'))
        })
        .max_by_key(|(p, _)| p.len())?;
    let rest = &name[ldm.len() + 1..];
    if diffusers.contains(".resnets.") {
        return Some(format!("{diffusers}.{}", resnet_param(rest)?));
    }
    Some(format!("{diffusers}.{rest}"))
}

/// The diffusers name of VAE tensor `name` (after `first_stage_model.`) for a VAE of `levels`
/// levels, and whether it is a 1×1 convolution diffusers keeps as a linear weight.
fn vae_name(name: &str, levels: usize) -> Option<(String, bool)> {
    let (side, rest) = match name.split_once('.')? {
        (s @ ("encoder" | "decoder"), r) => (s, r),
        ("quant_conv" | "post_quant_conv", _) => return Some((name.to_string(), false)),
        _ => return None,
    };
    let shortcut = |s: &str| s.replace("nin_shortcut", "conv_shortcut");
    let mapped = if let Some(r) = rest
        .strip_prefix("down.")
        .or_else(|| rest.strip_prefix("up."))
    {
        let up = rest.starts_with("up.");
        let (b, r) = r.split_once('.')?;
        let mut b: usize = b.parse().ok()?;
        if b >= levels {
            return None;
        }
        if up {
            b = levels - 1 - b;
        }
        let blocks = if up { "up_blocks" } else { "down_blocks" };
        if let Some(r) = r.strip_prefix("block.") {
            let (j, p) = r.split_once('.')?;
            format!("{blocks}.{b}.resnets.{j}.{}", shortcut(p))
        } else if let Some(p) = r
            .strip_prefix("downsample.conv.")
            .or_else(|| r.strip_prefix("upsample.conv."))
        {
            let sampler = if up { "upsamplers" } else { "downsamplers" };
            format!("{blocks}.{b}.{sampler}.0.conv.{p}")
        } else {
            return None;
        }
    } else if let Some(r) = rest.strip_prefix("mid.") {
        if let Some(p) = r.strip_prefix("block_1.") {
            format!("mid_block.resnets.0.{}", shortcut(p))
        } else if let Some(p) = r.strip_prefix("block_2.") {
            format!("mid_block.resnets.1.{}", shortcut(p))
        } else {
            let p = r.strip_prefix("attn_1.")?;
            let (module, param) = p.split_once('.')?;
            let to = match module {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            let linear = module != "norm" && param == "weight";
            return Some((
                format!("{side}.mid_block.attentions.0.{to}.{param}"),
                linear,
            ));
        }
    } else if let Some(p) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{p}")
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_string()
    } else {
        return None;
    };
    Some((format!("{side}.{mapped}"), false))
}

/// What becomes of an OpenCLIP text encoder tensor (after `cond_stage_model.model.`), for a
/// text encoder of `layers` layers.
enum OpenClip {
    /// Hugging Face's name.
    One(String),
    /// A fused q/k/v projection: the three names its thirds (along the rows) go to.
    Split([String; 3]),
    /// Hugging Face's name of its transpose.
    Transposed(String),
    /// Not part of `CLIPTextModel`: the projection and temperature of CLIP's contrastive head,
    /// and the last layer, which SD 2.x does not use (it takes the penultimate layer's output;
    /// diffusers' text encoder has one layer fewer than the checkpoint).
    Skip,
}

/// `projection`: the encoder is a `CLIPTextModelWithProjection` (SDXL's second), which keeps
/// CLIP's projection as `text_projection.weight`, transposed ([`OpenClip::Transposed`]).
fn openclip_name(name: &str, layers: usize, projection: bool) -> Option<OpenClip> {
    let one = |s: &str| Some(OpenClip::One(format!("text_model.{s}")));
    if projection && name == "text_projection" {
        return Some(OpenClip::Transposed("text_projection.weight".into()));
    }
    match name {
        "token_embedding.weight" => return one("embeddings.token_embedding.weight"),
        "positional_embedding" => return one("embeddings.position_embedding.weight"),
        "ln_final.weight" => return one("final_layer_norm.weight"),
        "ln_final.bias" => return one("final_layer_norm.bias"),
        "text_projection" | "logit_scale" | "attn_mask" => return Some(OpenClip::Skip),
        _ => {}
    }
    let rest = name.strip_prefix("transformer.resblocks.")?;
    let (i, p) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    if i == layers {
        return Some(OpenClip::Skip);
    }
    if i > layers {
        return None;
    }
    let l = format!("text_model.encoder.layers.{i}");
    if let Some(kind) = p.strip_prefix("attn.in_proj_") {
        return Some(OpenClip::Split(
            ["q", "k", "v"].map(|x| format!("{l}.self_attn.{x}_proj.{kind}")),
        ));
    }
    const NAMES: [(&str, &str); 5] = [
        ("attn.out_proj.", "self_attn.out_proj."),
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ];
    NAMES.iter().find_map(|(o, h)| {
        p.strip_prefix(o)
            .map(|k| OpenClip::One(format!("{l}.{h}{k}")))
    })
}

/// Why a tensor of a single file is not converted: None when it is converted.
fn foreign(name: &str, xl: bool) -> Option<&'static str> {
    if !xl && name.starts_with("conditioner.embedders.") {
        Some("SDXL's two text encoders (`conditioner.embedders`), but --config is not an SDXL folder (no text_encoder_2)")
    } else if xl && name.starts_with("cond_stage_model.") {
        Some("an SD 1.x/2.x text encoder (`cond_stage_model`), but --config is an SDXL folder")
    } else {
        None
    }
}

/// Converts the single-file checkpoint `checkpoint` into the diffusers folder `out`, with the
/// configs, tokenizer and scheduler of the diffusers folder `config`. Every written tensor's
/// shape is checked by loading the result before it is moved into place.
pub fn convert_single_file(
    checkpoint: &Path,
    config: &Path,
    out: &Path,
    overwrite: bool,
) -> Result<Converted> {
    let inputs = [("--checkpoint", checkpoint), ("--config", config)];
    let index_path = config.join("model_index.json");
    if !index_path.is_file() {
        return Err(Error::msg(format!(
            "{}: not a diffusers folder (no model_index.json); --config takes a diffusers folder of the checkpoint's model family, for its configs, tokenizer and scheduler",
            config.display()
        )));
    }
    let index = read_json(&index_path)?;
    let xl = super::pipeline::has_text_encoder_2(&index);
    let unet_cfg_path = config.join("unet").join("config.json");
    let vae_cfg_path = config.join("vae").join("config.json");
    let prefixes = unet_prefixes(&read_json(&unet_cfg_path)?, &unet_cfg_path)?;
    let vae_cfg = read_json(&vae_cfg_path)?;
    let levels = vae_cfg
        .get("block_out_channels")
        .and_then(Value::as_array)
        .map(Vec::len)
        .ok_or_else(|| Error::bad_field(&vae_cfg_path, "block_out_channels", "is missing"))?;

    let layers_of = |dir: &str| -> Result<usize> {
        let p = config.join(dir).join("config.json");
        read_json(&p)?
            .get("num_hidden_layers")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| Error::bad_field(&p, "num_hidden_layers", "is missing"))
    };
    // SD 1.x/2.x: one text encoder; SDXL: CLIP ViT-L (`conditioner.embedders.0`, Hugging
    // Face's names) and OpenCLIP ViT-bigG with its projection (`conditioner.embedders.1`)
    let (hf_text, openclip_text) = if xl {
        (
            "conditioner.embedders.0.transformer.",
            (
                "conditioner.embedders.1.model.",
                "text_encoder_2",
                layers_of("text_encoder_2")?,
            ),
        )
    } else {
        (
            "cond_stage_model.transformer.",
            (
                "cond_stage_model.model.",
                "text_encoder",
                layers_of("text_encoder")?,
            ),
        )
    };

    let file = TensorFile::open(checkpoint)?;
    let mut parts: BTreeMap<&'static str, BTreeMap<String, Tensor>> = BTreeMap::new();
    let (mut skipped, mut unknown, mut refused) = (0, vec![], None);
    for name in file.names() {
        let load = || file.load(name, &Device::Cpu);
        let (part, mapped, squeeze) = if let Some(n) = name.strip_prefix("model.diffusion_model.") {
            ("unet", unet_name(&prefixes, n), false)
        } else if let Some(n) = name.strip_prefix("first_stage_model.") {
            match vae_name(n, levels) {
                Some((m, sq)) => ("vae", Some(m), sq),
                None => ("vae", None, false),
            }
        } else if let Some(n) = name.strip_prefix(hf_text) {
            if n.ends_with("embeddings.position_ids") {
                skipped += 1;
                continue;
            }
            let n = n.strip_prefix("text_model.").unwrap_or(n);
            ("text_encoder", Some(format!("text_model.{n}")), false)
        } else if let Some(n) = name.strip_prefix(openclip_text.0) {
            let (part, layers) = (openclip_text.1, openclip_text.2);
            match openclip_name(n, layers, xl) {
                Some(OpenClip::One(m)) => (part, Some(m), false),
                Some(OpenClip::Transposed(m)) => {
                    let t = load()?.t()?.contiguous()?;
                    parts.entry(part).or_default().insert(m, t);
                    continue;
                }
                Some(OpenClip::Split(names)) => {
                    let t = load()?;
                    let rows = t.dim(0)?;
                    if rows % 3 != 0 {
                        return Err(Error::bad_tensor(
                            name,
                            format!("has {rows} rows, not three equal q/k/v parts"),
                        ));
                    }
                    let dest = parts.entry(part).or_default();
                    for (i, m) in names.into_iter().enumerate() {
                        dest.insert(m, t.narrow(0, i * rows / 3, rows / 3)?.contiguous()?);
                    }
                    continue;
                }
                Some(OpenClip::Skip) => {
                    skipped += 1;
                    continue;
                }
                None => (part, None, false),
            }
        } else if name.starts_with("model_ema.") || SCHEDULE_BUFFERS.contains(&name) {
            skipped += 1;
            continue;
        } else {
            if let Some(why) = foreign(name, xl) {
                refused.get_or_insert(why);
            }
            unknown.push(name.to_string());
            continue;
        };
        let Some(mapped) = mapped else {
            unknown.push(name.to_string());
            continue;
        };
        let mut t = load()?;
        if squeeze {
            // a 1×1 convolution (c, c, 1, 1) as diffusers' linear (c, c)
            let d = t.dims().to_vec();
            if d.len() == 4 && d[2] == 1 && d[3] == 1 {
                t = t.reshape((d[0], d[1]))?;
            }
        }
        parts.entry(part).or_default().insert(mapped, t);
    }
    if let Some(why) = refused {
        return Err(Error::bad_file(checkpoint, why));
    }
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(8).map(String::as_str).collect();
        return Err(Error::bad_file(
            checkpoint,
            format!(
                "{} tensors have no place in a Stable Diffusion model of {}'s shape: {}{}",
                unknown.len(),
                config.display(),
                shown.join(", "),
                if unknown.len() > 8 { ", …" } else { "" }
            ),
        ));
    }
    let wanted: &[&str] = if xl {
        &["unet", "vae", "text_encoder", "text_encoder_2"]
    } else {
        &["unet", "vae", "text_encoder"]
    };
    for part in wanted {
        if !parts.contains_key(part) {
            return Err(Error::bad_file(
                checkpoint,
                format!("holds no {part} tensors; is it a Stable Diffusion checkpoint?"),
            ));
        }
    }

    let (staged, cleaned) = StagedDir::output(out, overwrite, &inputs)?;
    let root = staged.path();
    let weights_file = |part: &str| match part {
        "text_encoder" | "text_encoder_2" => "model.safetensors",
        _ => "diffusion_pytorch_model.safetensors",
    };
    let mut counts = BTreeMap::new();
    for (part, tensors) in &parts {
        let dir = root.join(part);
        std::fs::create_dir_all(&dir).at(&dir)?;
        copy_file(
            &config.join(part).join("config.json"),
            &dir.join("config.json"),
        )?;
        write_safetensors(&dir.join(weights_file(part)), tensors, None)?;
        counts.insert(*part, tensors.len());
    }
    copy_file(&index_path, &root.join("model_index.json"))?;
    let extra: &[&str] = if xl {
        &["tokenizer", "tokenizer_2", "scheduler"]
    } else {
        &["tokenizer", "scheduler"]
    };
    for dir in extra {
        let src = config.join(dir);
        let entries = std::fs::read_dir(&src).at(&src)?;
        std::fs::create_dir_all(root.join(dir)).at(&root.join(dir))?;
        for e in entries {
            let p = e.at(&src)?.path();
            if p.is_file() {
                copy_file(&p, &root.join(dir).join(p.file_name().unwrap()))?;
            }
        }
    }
    // every tensor in its place and shape, and none missing, before the folder is committed
    super::pipeline::Pipeline::load(root, candle_core::DType::F32, &Device::Cpu).map_err(|e| {
        Error::msg(format!(
            "{} converted with {}'s configs does not load: {e}",
            checkpoint.display(),
            config.display()
        ))
    })?;
    let out = staged.commit()?;
    Ok(Converted {
        out,
        tensors: counts,
        skipped,
        cleaned,
    })
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).at(from)?;
    Ok(())
}
