//! A diffusers `UNet2DConditionModel` config.json, read into per-block settings.
//!
//! Lists in the file (`attention_head_dim`, `transformer_layers_per_block`, …) may also be one
//! integer for every block; here each becomes one entry per down block. The up blocks use
//! them reversed, as diffusers does. diffusers' naming quirk: when `num_attention_heads` is
//! null, `attention_head_dim` holds the number of heads (not their width); a head's width is
//! the block's channels over its heads.
//!
//! Settings that change the model's math and that this U-Net does not implement (class
//! embeddings, other block or attention types, other activations, …) are refused with the
//! file and field named, never ignored.

use std::path::Path;

use serde_json::Value;

use crate::checkpoint::read_json;
use crate::error::{Error, Result};
use crate::model::weights::ConfigReader;

/// A down block's type: with transformers after each resnet (`CrossAttnDownBlock2D`) or
/// resnets only (`DownBlock2D`); the same for the up blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    CrossAttn,
    Plain,
}

/// The SDXL added conditioning (`addition_embed_type` "text_time"): the pooled text embedding
/// and the sinusoids of the six size/crop numbers, through an MLP into the time embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct TextTimeConfig {
    /// Width of each `time_ids` entry's sinusoid (`addition_time_embed_dim`).
    pub time_embed_dim: usize,
    /// The MLP's input width, pooled text width + 6·time_embed_dim
    /// (`projection_class_embeddings_input_dim`).
    pub input_dim: usize,
}

impl TextTimeConfig {
    /// The pooled text embedding's width.
    pub fn text_embeds_dim(&self) -> usize {
        self.input_dim - 6 * self.time_embed_dim
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_blocks: Vec<BlockKind>,
    pub up_blocks: Vec<BlockKind>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: Vec<usize>,
    /// Context width per down block.
    pub cross_attention_dim: Vec<usize>,
    /// Attention heads per down block.
    pub heads: Vec<usize>,
    /// Transformer blocks per attention, per down block (the mid block uses the last).
    pub transformer_layers_per_block: Vec<usize>,
    /// Linear (true) or 1×1-convolution projections into and out of each transformer.
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// The attention scores and softmax in f32 whatever the weights' dtype.
    pub upcast_attention: bool,
    /// The input mapped from [0, 1] to [−1, 1] first.
    pub center_input_sample: bool,
    pub text_time: Option<TextTimeConfig>,
}

/// Defaults of diffusers' `UNet2DConditionModel.__init__` for fields a config may leave out.
const DEFAULT_GROUPS: usize = 32;
const DEFAULT_EPS: f64 = 1e-5;

impl UNetConfig {
    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let value = read_json(&path)?;
        Self::parse(&ConfigReader {
            path: &path,
            value: &value,
        })
    }

    pub fn parse(r: &ConfigReader) -> Result<Self> {
        refuse_unsupported(r)?;
        let block_out_channels = usize_list(r, "block_out_channels")?;
        let n = block_out_channels.len();
        if n == 0 {
            return Err(Error::bad_field(r.path, "block_out_channels", "is empty"));
        }
        let down_blocks =
            block_kinds(r, "down_block_types", "CrossAttnDownBlock2D", "DownBlock2D")?;
        let up_blocks = block_kinds(r, "up_block_types", "CrossAttnUpBlock2D", "UpBlock2D")?;
        for (field, len) in [
            ("down_block_types", down_blocks.len()),
            ("up_block_types", up_blocks.len()),
        ] {
            if len != n {
                return Err(Error::bad_field(
                    r.path,
                    field,
                    format!("has {len} blocks but block_out_channels has {n}"),
                ));
            }
        }
        match r.str_or("mid_block_type", "UNetMidBlock2DCrossAttn")? {
            "UNetMidBlock2DCrossAttn" => {}
            _ => {
                return Err(r.unsupported(
                    "mid_block_type",
                    "the mid block must be UNetMidBlock2DCrossAttn",
                ))
            }
        }
        let per_block = |field: &str, default: Option<usize>| -> Result<Vec<usize>> {
            int_or_list(r, field, n, default)
        };
        let layers_per_block = per_block("layers_per_block", Some(2))?;
        let cross_attention_dim = per_block("cross_attention_dim", None)?;
        let transformer_layers_per_block = per_block("transformer_layers_per_block", Some(1))?;
        // diffusers: `num_attention_heads or attention_head_dim`, the latter being heads
        let heads = if r.get("num_attention_heads").is_some() {
            per_block("num_attention_heads", None)?
        } else {
            per_block("attention_head_dim", Some(8))?
        };
        let norm_num_groups = r.usize_or("norm_num_groups", Some(DEFAULT_GROUPS))?;
        let heads_field = if r.get("num_attention_heads").is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        for (i, &c) in block_out_channels.iter().enumerate() {
            if c == 0 || norm_num_groups == 0 || c % norm_num_groups != 0 {
                return Err(Error::bad_field(
                    r.path,
                    "norm_num_groups",
                    format!("{norm_num_groups} groups do not divide block {i}'s {c} channels"),
                ));
            }
            if heads[i] == 0 || c % heads[i] != 0 {
                return Err(Error::bad_field(
                    r.path,
                    heads_field,
                    format!("{} heads do not divide block {i}'s {c} channels", heads[i]),
                ));
            }
        }
        let text_time = match r.str_opt("addition_embed_type")? {
            None => None,
            Some("text_time") => {
                let time_embed_dim = r.usize("addition_time_embed_dim")?;
                let input_dim = r.usize("projection_class_embeddings_input_dim")?;
                if input_dim <= 6 * time_embed_dim {
                    return Err(Error::bad_field(
                        r.path,
                        "projection_class_embeddings_input_dim",
                        format!(
                            "{input_dim} leaves no room for the pooled text embedding next to \
                             6 × addition_time_embed_dim = {}",
                            6 * time_embed_dim
                        ),
                    ));
                }
                Some(TextTimeConfig {
                    time_embed_dim,
                    input_dim,
                })
            }
            Some(_) => {
                return Err(r.unsupported(
                    "addition_embed_type",
                    "supported: null (SD 1.x, 2.x) and \"text_time\" (SDXL)",
                ))
            }
        };
        if text_time.is_none() {
            r.refuse_unless(
                "projection_class_embeddings_input_dim",
                |_| false,
                "it projects class or added embeddings, which only addition_embed_type \
                 \"text_time\" uses here",
            )?;
        }
        Ok(Self {
            in_channels: r.usize_or("in_channels", Some(4))?,
            out_channels: r.usize_or("out_channels", Some(4))?,
            block_out_channels,
            down_blocks,
            up_blocks,
            layers_per_block,
            cross_attention_dim,
            heads,
            transformer_layers_per_block,
            use_linear_projection: r.bool_or("use_linear_projection", false)?,
            norm_num_groups,
            norm_eps: r.f64_or("norm_eps", DEFAULT_EPS)?,
            flip_sin_to_cos: r.bool_or("flip_sin_to_cos", true)?,
            freq_shift: r.f64_or("freq_shift", 0.0)?,
            upcast_attention: r.bool_or("upcast_attention", false)?,
            center_input_sample: r.bool_or("center_input_sample", false)?,
            text_time,
        })
    }

    /// The time embedding's width: 4 × the first block's channels.
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }

    /// Downsamplers between the blocks: the input's height and width must be multiples of
    /// 2 to this power.
    pub fn num_downsamplers(&self) -> usize {
        self.block_out_channels.len() - 1
    }
}

/// Fields whose other values change the math in ways not implemented here.
fn refuse_unsupported(r: &ConfigReader) -> Result<()> {
    let is_str = |s: &'static str| move |v: &Value| v.as_str() == Some(s);
    let is_num = |x: f64| move |v: &Value| v.as_f64() == Some(x);
    let is_false = |v: &Value| v.as_bool() == Some(false);
    r.refuse_unless(
        "_class_name",
        is_str("UNet2DConditionModel"),
        "this folder is not a UNet2DConditionModel",
    )?;
    r.refuse_unless("act_fn", is_str("silu"), "only silu")?;
    r.refuse_unless(
        "resnet_time_scale_shift",
        is_str("default"),
        "only \"default\" (the time embedding added, no scale-shift norm)",
    )?;
    r.refuse_unless(
        "time_embedding_type",
        is_str("positional"),
        "only \"positional\"",
    )?;
    r.refuse_unless("attention_type", is_str("default"), "only \"default\"")?;
    r.refuse_unless("conv_in_kernel", is_num(3.0), "only 3")?;
    r.refuse_unless("conv_out_kernel", is_num(3.0), "only 3")?;
    r.refuse_unless("downsample_padding", is_num(1.0), "only 1")?;
    r.refuse_unless("mid_block_scale_factor", is_num(1.0), "only 1")?;
    r.refuse_unless("resnet_out_scale_factor", is_num(1.0), "only 1")?;
    r.refuse_unless(
        "dropout",
        is_num(0.0),
        "only 0: dropout inside the U-Net is not implemented",
    )?;
    let bool_or_all_false = |v: &Value| match v {
        Value::Bool(b) => !b,
        Value::Array(a) => a.iter().all(is_false),
        _ => false,
    };
    r.refuse_unless(
        "only_cross_attention",
        bool_or_all_false,
        "only false (self- and cross-attention in every transformer block)",
    )?;
    r.refuse_unless(
        "mid_block_only_cross_attention",
        is_false,
        "only false or null",
    )?;
    r.refuse_unless("dual_cross_attention", is_false, "only false")?;
    r.refuse_unless("resnet_skip_time_act", is_false, "only false")?;
    r.refuse_unless("class_embeddings_concat", is_false, "only false")?;
    for field in [
        "class_embed_type",
        "num_class_embeds",
        "encoder_hid_dim",
        "encoder_hid_dim_type",
        "time_embedding_dim",
        "time_embedding_act_fn",
        "timestep_post_act",
        "time_cond_proj_dim",
        "cross_attention_norm",
        "reverse_transformer_layers_per_block",
    ] {
        r.refuse_unless(field, |_| false, "only null")?;
    }
    Ok(())
}

/// The list `field`, which must be there; `what` its items, for the error.
fn required_list<'a>(r: &'a ConfigReader, field: &str, what: &str) -> Result<&'a Vec<Value>> {
    let v = r
        .get(field)
        .ok_or_else(|| Error::bad_field(r.path, field, "is required but missing"))?;
    v.as_array().ok_or_else(|| {
        Error::bad_field(
            r.path,
            field,
            format!("must be a list of {what}, found {v}"),
        )
    })
}

fn usize_list(r: &ConfigReader, field: &str) -> Result<Vec<usize>> {
    required_list(r, field, "non-negative integers")?
        .iter()
        .map(|x| {
            x.as_u64().map(|x| x as usize).ok_or_else(|| {
                Error::bad_field(
                    r.path,
                    field,
                    format!("must be a list of non-negative integers, found {x} in it"),
                )
            })
        })
        .collect()
}

/// One integer for every block, or a list with one per block.
fn int_or_list(
    r: &ConfigReader,
    field: &str,
    n: usize,
    default: Option<usize>,
) -> Result<Vec<usize>> {
    match r.get(field) {
        Some(Value::Array(_)) => {
            let v = usize_list(r, field)?;
            if v.len() != n {
                return Err(Error::bad_field(
                    r.path,
                    field,
                    format!("has {} entries but the U-Net has {n} blocks", v.len()),
                ));
            }
            Ok(v)
        }
        _ => Ok(vec![r.usize_or(field, default)?; n]),
    }
}

fn block_kinds(r: &ConfigReader, field: &str, cross: &str, plain: &str) -> Result<Vec<BlockKind>> {
    required_list(r, field, "block types")?
        .iter()
        .map(|t| match t.as_str() {
            Some(s) if s == cross => Ok(BlockKind::CrossAttn),
            Some(s) if s == plain => Ok(BlockKind::Plain),
            _ => Err(r.unsupported(field, format!("block types: {cross}, {plain}; found {t}"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<UNetConfig> {
        UNetConfig::parse(&ConfigReader {
            path: Path::new("unet/config.json"),
            value: &v,
        })
    }

    fn sd() -> Value {
        json!({
            "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 24,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        })
    }

    #[test]
    fn heads_from_either_field() {
        let c = parse(sd()).unwrap();
        assert_eq!(c.heads, vec![4, 4]);
        assert_eq!(c.layers_per_block, vec![2, 2]);
        let mut v = sd();
        v["num_attention_heads"] = json!([2, 8]);
        assert_eq!(parse(v).unwrap().heads, vec![2, 8]);
    }

    #[test]
    fn refuses_what_it_does_not_implement() {
        for (field, value) in [
            ("class_embed_type", json!("timestep")),
            ("attention_type", json!("gated")),
            ("act_fn", json!("gelu")),
            ("addition_embed_type", json!("text")),
            (
                "down_block_types",
                json!(["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
            ),
        ] {
            let mut v = sd();
            v[field] = value;
            let e = parse(v).unwrap_err().to_string();
            assert!(
                e.contains("unet/config.json") && e.contains(&format!("`{field}`")),
                "{e}"
            );
        }
        let mut v = sd();
        v["attention_head_dim"] = json!(5);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("attention_head_dim"), "{e}");
    }
}
