//! Pretrained transformers with adapters, written for training: loading (safetensors or GGUF),
//! adapter injection by target matching, task heads and losses.
//!
//! - Classification: a fully trained head (`classifier` for BERT-family, `score` for
//!   LLaMA-family, as transformers names them) on a pooled representation ([CLS] through the
//!   pooler, the mean of the real tokens, or the last real token for decoders); cross-entropy.
//! - SFT (decoders): causal-LM cross-entropy on the completion tokens only; the vocabulary
//!   projection is computed only at those positions.
//!
//! Frozen weights are plain tensors (never variables) and every linear layer goes through
//! [`crate::linear::frozen_matmul`], so no weight gradient is ever computed for them.

pub mod bert;
pub mod llama;
pub mod weights;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

pub use crate::data::{Batch, Task};
pub use crate::ops::FastPath;

use crate::adapter::file::AdapterFile;
use crate::adapter::ramp::RampClock;
use crate::adapter::target::TargetSpec;
use crate::adapter::{inject, AdaptedLinear, Adapter, AdapterSpec, Param, ParamRole};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::linear::FrozenLinear;
use crate::ops::cross_entropy;
use crate::quant::QuantWeight;
use crate::rng::{normal, rng_for};
use bert::Bert;
use llama::Llama;
use weights::{ConfigReader, Weights};

/// Loads a frozen linear layer `name.weight` (d_out, d_in) and, if asked, `name.bias`; the
/// weight quantised to NF4 where the weights say so ([`Weights::Nf4`]).
pub(crate) fn load_linear(
    w: &Weights,
    name: &str,
    d_out: usize,
    d_in: usize,
    bias: bool,
    dtype: DType,
    device: &Device,
) -> Result<AdaptedLinear> {
    let nf4 = w.quantizes_nf4();
    load_linear_as(w, name, (d_out, d_in), bias, nf4, dtype, device)
}

/// [`load_linear`], the weight quantised to NF4 when `nf4` (read in f32 on the host, quantised
/// there and kept where `device` is); never for a vocabulary projection, which stays dense.
pub(crate) fn load_linear_as(
    w: &Weights,
    name: &str,
    (d_out, d_in): (usize, usize),
    bias: bool,
    nf4: bool,
    dtype: DType,
    device: &Device,
) -> Result<AdaptedLinear> {
    let bias = if bias {
        Some(w.get_shaped(&format!("{name}.bias"), &[d_out], dtype, device)?)
    } else {
        None
    };
    if let Some(q) = kept_weight(w, &format!("{name}.weight"), d_out, d_in)? {
        return Ok(AdaptedLinear::new(
            name,
            FrozenLinear::quantized(q, bias, dtype, device),
        ));
    }
    let wname = format!("{name}.weight");
    if nf4 {
        let t = w.get_shaped(&wname, &[d_out, d_in], DType::F32, &Device::Cpu)?;
        let q = crate::quant::nf4::Nf4Tensor::from_tensor(&t).map_err(|e| {
            Error::bad_tensor(
                &wname,
                format!(
                    "in {} cannot be quantised to NF4: {e}",
                    w.source().display()
                ),
            )
        })?;
        let base = FrozenLinear::quantized(crate::linear::nf4_on(q, device)?, bias, dtype, device);
        return Ok(AdaptedLinear::new(name, base));
    }
    let weight = w.get_shaped(&wname, &[d_out, d_in], dtype, device)?;
    Ok(AdaptedLinear::new(name, FrozenLinear::new(weight, bias)))
}

/// The weight `name` (d_out, d_in) where the weights keep it quantised (`--base-dtype same`),
/// its shape checked.
pub(crate) fn kept_weight(
    w: &Weights,
    name: &str,
    d_out: usize,
    d_in: usize,
) -> Result<Option<std::sync::Arc<dyn QuantWeight>>> {
    let Some(q) = w.kept(name) else {
        return Ok(None);
    };
    if q.dims() != (d_out, d_in) {
        return Err(Error::bad_tensor(
            name,
            format!(
                "in {} has shape {:?} but config.json implies {:?}",
                w.source().display(),
                q.dims(),
                (d_out, d_in)
            ),
        ));
    }
    Ok(Some(q))
}

/// The architecture family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Bert,
    Llama,
    /// GPT-2: a decoder run by the LLaMA-family code, with Conv1D weights stored (d_in, d_out).
    Gpt2,
}

impl Family {
    /// From config.json's `model_type`.
    pub fn detect(config: &Value, path: &Path) -> Result<Self> {
        let mt = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        match mt {
            "bert" | "roberta" | "xlm-roberta" | "camembert" | "minilm" | "electra" => {
                Ok(Family::Bert)
            }
            "llama" | "mistral" | "qwen2" | "qwen3" | "gemma3_text" | "gemma3" | "phi3"
            | "smollm" | "smollm2" => Ok(Family::Llama),
            "gpt2" => Ok(Family::Gpt2),
            "" => Err(Error::bad_field(path, "model_type", "is missing")),
            other => Err(Error::bad_field(
                path,
                "model_type",
                format!(
                    "`{other}` is not supported (BERT-family: bert, roberta; LLaMA-family: \
                     llama, mistral, qwen2, qwen3, gemma3_text, phi3; gpt2)"
                ),
            )),
        }
    }

    /// The paper's settings: query/key/value/attention output for encoders, all seven
    /// projections for decoders.
    pub fn default_targets(&self) -> &'static str {
        match self {
            Family::Bert => "query,key,value,attention.output.dense",
            Family::Llama => "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
            // PEFT's default for GPT-2: the fused query/key/value projection
            Family::Gpt2 => "c_attn",
        }
    }

    /// Whether linear weights are stored (d_in, d_out) (GPT-2's Conv1D; PEFT's
    /// `fan_in_fan_out`) rather than (d_out, d_in).
    pub fn transposed_weights(&self) -> bool {
        *self == Family::Gpt2
    }

    /// transformers' name for the classification head.
    pub fn head_name(&self) -> &'static str {
        match self {
            Family::Bert => "classifier",
            Family::Llama | Family::Gpt2 => "score",
        }
    }
}

/// How a sequence becomes one vector for classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// [CLS] through the pooler (BertForSequenceClassification).
    Cls,
    /// Mean over real tokens (sentence-transformers).
    Mean,
    /// The last real token (LlamaForSequenceClassification).
    Last,
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
            Pooling::Last => "last",
        })
    }
}

impl FromStr for Pooling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            "last" => Ok(Pooling::Last),
            _ => Err(Error::msg(format!(
                "unknown pooling `{s}`: expected cls, mean or last"
            ))),
        }
    }
}

crate::serde_via_str!(Pooling);

impl Pooling {
    /// A classifier's pooling when none is asked for: the last token for decoders; for
    /// encoders the mean on sentence-transformers models, else [CLS] through the pooler where
    /// the checkpoint has one, else the mean.
    pub fn default_for(family: Family, has_pooler: bool, sentence_transformers: bool) -> Self {
        match family {
            Family::Llama | Family::Gpt2 => Pooling::Last,
            Family::Bert if sentence_transformers => Pooling::Mean,
            Family::Bert if has_pooler => Pooling::Cls,
            Family::Bert => Pooling::Mean,
        }
    }
}

pub enum Body {
    Bert(Bert),
    Llama(Llama),
}

impl Body {
    /// [`Family::default_targets`] for this model: Phi-3's fused projections in place of the
    /// split ones.
    pub fn default_targets(&self) -> &'static str {
        match self {
            Body::Llama(l) if l.cfg.fused_projections && !l.cfg.gpt2 => {
                "qkv_proj,o_proj,gate_up_proj,down_proj"
            }
            _ => self.family().default_targets(),
        }
    }

    pub fn family(&self) -> Family {
        match self {
            Body::Bert(_) => Family::Bert,
            Body::Llama(l) if l.cfg.gpt2 => Family::Gpt2,
            Body::Llama(_) => Family::Llama,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Body::Bert(b) => b.cfg.hidden,
            Body::Llama(l) => l.cfg.hidden,
        }
    }

    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        match self {
            Body::Bert(b) => b.linears(),
            Body::Llama(l) => l.linears(),
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        match self {
            Body::Bert(b) => b.linears_mut(),
            Body::Llama(l) => l.linears_mut(),
        }
    }

    /// Keeps the linear layers' weights in NF4 (`--base-dtype nf4`), all but the vocabulary
    /// projection; returns the bytes they take now and took before.
    pub fn quantize_nf4(&mut self) -> Result<(usize, usize)> {
        self.quantize_linears(FrozenLinear::quantize_nf4)
    }

    /// Keeps the linear layers' weights in FP8 (`--base-dtype fp8`, CUDA), all but the
    /// vocabulary projection; returns the bytes they take now and took before.
    #[cfg(feature = "cuda")]
    pub fn quantize_fp8(&mut self) -> Result<(usize, usize)> {
        self.quantize_linears(FrozenLinear::quantize_fp8)
    }

    fn quantize_linears(
        &mut self,
        quantize: fn(&mut FrozenLinear) -> Result<()>,
    ) -> Result<(usize, usize)> {
        let (mut before, mut after) = (0, 0);
        for l in self.linears_mut() {
            if l.name() == "lm_head" {
                continue;
            }
            before += l.base().weight_bytes();
            let name = l.name().to_string();
            quantize(l.base_mut()).map_err(|e| Error::bad_tensor(name, e.to_string()))?;
            after += l.base().weight_bytes();
        }
        Ok((after, before))
    }

    /// The bytes the quantised linear weights take and would take dense in `dtype`; None when
    /// none is quantised.
    pub fn quantized_bytes(&self, dtype: DType) -> Option<(usize, usize)> {
        let (mut kept, mut dense) = (0, 0);
        for l in self.linears() {
            if l.base().is_quantized() {
                let (o, i) = l.base().dims();
                kept += l.base().weight_bytes();
                dense += o * i * dtype.size_in_bytes();
            }
        }
        (kept > 0).then_some((kept, dense))
    }

    /// Layers that `all-linear` leaves alone (output projections and poolers).
    pub fn output_layers(&self) -> Vec<String> {
        self.linears()
            .iter()
            .map(|l| l.name().to_string())
            .filter(|n| n == "lm_head" || n.ends_with("pooler.dense"))
            .collect()
    }

    /// `fast` chooses the CUDA kernels (LLaMA's attention).
    pub fn hidden_states(&self, batch: &Batch, fast: &FastPath) -> Result<Tensor> {
        match self {
            Body::Bert(_) if batch.segments.is_some() => Err(Error::msg(
                "packed rows need a decoder: an encoder attends across its whole row",
            )),
            Body::Bert(b) => b.hidden_states(batch),
            Body::Llama(l) => l.hidden_states(batch, fast),
        }
    }
}

/// A pretrained checkpoint as loaded: body, config.json, tokenizer.
pub struct Pretrained {
    pub body: Body,
    pub config: Value,
    pub tokenizer: tokenizers::Tokenizer,
    pub source: PathBuf,
    pub gguf: bool,
    pub chat_template: Option<String>,
    /// sentence-transformers checkpoints pool by the mean.
    pub mean_pooling_hint: bool,
    /// Parameters in the checkpoint (embeddings included).
    pub num_params: usize,
}

impl Pretrained {
    /// Loads a Hugging Face directory (config.json, *.safetensors, tokenizer.json) or a GGUF
    /// file (or a directory holding one). Frozen weights go to `device` in `dtype`.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_as(path, dtype, device, crate::quant::BaseDtype::Auto)
    }

    /// The GGUF file `path` stands for (a file, or a directory holding one and no config.json).
    pub fn gguf_file(path: &Path) -> Option<PathBuf> {
        crate::gguf::find_gguf(path)
            .filter(|p| crate::gguf::is_gguf(p) && !path.join("config.json").exists())
    }

    /// [`Pretrained::load`] with the frozen linear weights kept as `base` says: `same` keeps a
    /// GGUF file's quantised ones as stored (refused for a Hugging Face directory), `nf4`
    /// quantises each as it loads, on the host, and keeps it where `device` is (on a GPU,
    /// dequantised there by a kernel where it is used); `same` keeps a GGUF weight's blocks
    /// where `device` is too (candle's kernels dequantise them on a GPU).
    pub fn load_as(
        path: &Path,
        dtype: DType,
        device: &Device,
        base: crate::quant::BaseDtype,
    ) -> Result<Self> {
        if base == crate::quant::BaseDtype::Fp8 && (device.is_cpu() || dtype != DType::BF16) {
            return Err(Error::msg(
                "--base-dtype fp8 runs on a CUDA GPU with the bf16 model (the FP8 tensor cores): \
                 on the CPU use auto or nf4",
            ));
        }
        let gguf_path = Self::gguf_file(path);
        let keep = base == crate::quant::BaseDtype::Same;
        if keep && gguf_path.is_none() {
            return Err(Error::msg(format!(
                "{}: --base-dtype same keeps a GGUF file's quantised weights as stored, and this \
                 is not a GGUF file (use --base-dtype nf4 for a 4-bit base from safetensors)",
                path.display()
            )));
        }
        let (weights, config, config_path, tokenizer, chat_template, gguf) = match gguf_path {
            Some(p) if keep => {
                let g = crate::gguf::load_gguf_keeping(&p, DType::F32)?;
                // on a GPU the blocks move there, one weight at a time
                let kept = g
                    .kept
                    .into_iter()
                    .map(|(k, v)| {
                        let w: std::sync::Arc<dyn QuantWeight> = if device.is_cpu() {
                            v
                        } else {
                            std::sync::Arc::new(v.to_device(device).map_err(|e| {
                                Error::bad_file(&p, format!("tensor `{k}` to {device:?}: {e}"))
                            })?)
                        };
                        Ok((k, w))
                    })
                    .collect::<Result<_>>()?;
                (
                    Weights::Kept(p.clone(), g.tensors, kept),
                    g.config,
                    p.clone(),
                    g.tokenizer,
                    g.chat_template,
                    true,
                )
            }
            Some(p) => {
                let g = crate::gguf::load_gguf(&p, DType::F32)?;
                (
                    Weights::Memory(p.clone(), g.tensors),
                    g.config,
                    p.clone(),
                    g.tokenizer,
                    g.chat_template,
                    true,
                )
            }
            None => {
                let ckpt = Checkpoint::open(path)?;
                let config = ckpt.config().clone();
                let tokenizer = crate::tokenize::load_tokenizer(path)?;
                let template = read_chat_template(path);
                (
                    Weights::Checkpoint(ckpt),
                    config,
                    path.join("config.json"),
                    tokenizer,
                    template,
                    false,
                )
            }
        };
        // NF4: each frozen linear weight quantised as it loads (the rest by quantize_nf4 below)
        let weights = if base == crate::quant::BaseDtype::Nf4 {
            Weights::Nf4(Box::new(weights))
        } else {
            weights
        };
        let num_params = weights.num_params();
        let reader = ConfigReader {
            path: &config_path,
            value: &config,
        };
        let mut body = match Family::detect(&config, &config_path)? {
            Family::Bert => {
                Body::Bert(Bert::load(&weights, Bert::config(&reader)?, dtype, device)?)
            }
            Family::Llama | Family::Gpt2 => Body::Llama(Llama::load(
                &weights,
                Llama::config(&reader)?,
                dtype,
                device,
            )?),
        };
        if base == crate::quant::BaseDtype::Nf4 {
            body.quantize_nf4()?;
        }
        if base == crate::quant::BaseDtype::Fp8 {
            #[cfg(feature = "cuda")]
            body.quantize_fp8()?;
            #[cfg(not(feature = "cuda"))]
            return Err(Error::msg(
                "--base-dtype fp8 needs singlora built with the cuda feature",
            ));
        }
        let mean_pooling_hint = is_sentence_transformers(path);
        Ok(Self {
            body,
            config,
            tokenizer,
            source: path.to_path_buf(),
            gguf,
            chat_template,
            mean_pooling_hint,
            num_params,
        })
    }

    /// The model's chat template (from tokenizer_config.json or the GGUF metadata), compiled
    /// with its bos/eos token strings; None when the model has none.
    pub fn chat_template(&self) -> Result<Option<crate::chat::ChatTemplate>> {
        let Some(src) = &self.chat_template else {
            return Ok(None);
        };
        let special = crate::tokenize::special_tokens(&self.tokenizer, Some(&self.config));
        Ok(Some(crate::chat::ChatTemplate::for_tokenizer(
            src,
            &self.tokenizer,
            &special,
        )?))
    }

    /// The pooling a classifier on this model uses by default.
    pub fn default_pooling(&self) -> Pooling {
        let has_pooler = matches!(&self.body, Body::Bert(b) if b.has_pooler());
        Pooling::default_for(self.body.family(), has_pooler, self.mean_pooling_hint)
    }
}

/// Whether `dir` is a sentence-transformers model (whose embeddings pool by the mean).
pub fn is_sentence_transformers(dir: &Path) -> bool {
    dir.join("1_Pooling").is_dir() || dir.join("modules.json").exists()
}

/// A Hugging Face directory's chat template: the `chat_template.jinja` file that transformers
/// 5 writes beside the tokenizer (which, like transformers, we prefer), else `chat_template`
/// in tokenizer_config.json (a string, or a list of named templates of which `default` is
/// taken).
fn read_chat_template(dir: &Path) -> Option<String> {
    if let Ok(t) = std::fs::read_to_string(dir.join(CHAT_TEMPLATE_FILE)) {
        return Some(t);
    }
    let from_config = crate::checkpoint::read_json(&dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|cfg| match cfg.get("chat_template")? {
            Value::String(s) => Some(s.clone()),
            Value::Array(named) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string),
            _ => None,
        });
    from_config
}

/// The file a chat template is kept in beside a model or an adapter (transformers' name).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// A trained-in-full linear head (n_labels × hidden), saved like PEFT's `modules_to_save`.
pub struct ClassifierHead {
    pub name: String,
    pub weight: Var,
    pub bias: Option<Var>,
}

impl ClassifierHead {
    /// N(0, 0.02²) weights (transformers' initializer_range), zero bias.
    pub fn init(
        name: &str,
        n_labels: usize,
        hidden: usize,
        bias: bool,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let w = normal(
            &mut rng_for(seed, name),
            0.02,
            (n_labels, hidden),
            dtype,
            device,
        )?;
        Ok(Self {
            name: name.to_string(),
            weight: Var::from_tensor(&w)?,
            bias: if bias {
                Some(Var::zeros(n_labels, dtype, device)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.to_dtype(self.weight.dtype())?.matmul(&self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    pub fn params(&self) -> Vec<Param> {
        let mut p = vec![Param {
            suffix: "weight",
            var: self.weight.clone(),
            role: ParamRole::HeadWeight,
        }];
        if let Some(b) = &self.bias {
            p.push(Param {
                suffix: "bias",
                var: b.clone(),
                role: ParamRole::HeadBias,
            });
        }
        p
    }
}

/// The hidden rows that predict completion tokens, and those tokens (SFT).
struct LmIndex {
    rows: Vec<u32>,
    targets: Vec<u32>,
}

/// A pretrained body with adapters and, for classification, a head.
pub struct TaskModel {
    pub body: Body,
    pub task: Task,
    pub head: Option<ClassifierHead>,
    pub pooling: Pooling,
    pub clock: RampClock,
    /// Which fast-path implementations training uses (all on by default).
    pub fast: FastPath,
}

/// Evaluation sums of one batch.
#[derive(Debug, Clone, Default)]
pub struct EvalSums {
    pub nll_sum: f64,
    pub count: usize,
    /// Classification: predicted and true label per row.
    pub preds: Vec<usize>,
    pub labels: Vec<usize>,
    /// Classification: probabilities per row.
    pub probs: Vec<Vec<f32>>,
}

/// `loss · scale` for a backward. A scale of 0 (a data-parallel rank without rows of its own)
/// multiplies by a zero tensor: candle prunes `x · 0.0` from the graph, which would leave no
/// gradients at all, where every rank must produce (zero) gradients for the same variables.
fn scaled(loss: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(if scale == 0.0 {
        loss.broadcast_mul(&loss.zeros_like()?)?
    } else {
        (loss * scale)?
    })
}

impl TaskModel {
    pub fn new(
        body: Body,
        task: Task,
        n_labels: Option<usize>,
        pooling: Pooling,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let head = match (task, n_labels) {
            (Task::Classify, Some(n)) => {
                let family = body.family();
                Some(ClassifierHead::init(
                    family.head_name(),
                    n,
                    body.hidden_size(),
                    family == Family::Bert,
                    seed,
                    DType::F32,
                    device,
                )?)
            }
            (Task::Classify, None) => return Err(Error::msg("classification needs a label set")),
            (Task::Sft, _) => match &body {
                Body::Llama(l) if !l.has_vocab_head() => return Err(l.no_vocab_head()),
                Body::Llama(_) => None,
                Body::Bert(_) => {
                    return Err(Error::msg(
                        "--task sft needs a decoder (LLaMA-family) model",
                    ))
                }
            },
        };
        Ok(Self {
            body,
            task,
            head,
            pooling,
            clock: RampClock::new(crate::adapter::ramp::RampSchedule::none(), 0),
            fast: FastPath::default(),
        })
    }

    /// Puts fresh adapters on the modules `targets` selects; returns their names.
    pub fn inject(
        &mut self,
        spec: &AdapterSpec,
        targets: &TargetSpec,
        clock: RampClock,
    ) -> Result<Vec<String>> {
        let outputs = self.body.output_layers();
        let chosen = inject::inject(self.body.linears_mut(), &outputs, spec, targets, &clock)?;
        self.clock = clock;
        Ok(chosen)
    }

    /// Loads an adapter file (and its head) onto the model.
    pub fn load_adapter(&mut self, af: &AdapterFile) -> Result<()> {
        af.config
            .check_weight_layout(Some(self.body.family()), af.layers.keys().next())?;
        let clock = af.clock();
        inject::load(self.body.linears_mut(), af, &clock)?;
        if let Some(head) = &self.head {
            for p in head.params() {
                let key = format!("{}.{}", head.name, p.suffix);
                let t = af.heads.get(&key).ok_or_else(|| {
                    Error::msg(format!("the adapter has no head tensor `{key}` (was it trained for classification?)"))
                })?;
                if t.dims() != p.var.dims() {
                    return Err(Error::bad_tensor(
                        &key,
                        format!(
                            "has shape {:?}, the head needs {:?}",
                            t.dims(),
                            p.var.dims()
                        ),
                    ));
                }
                p.var
                    .set(&t.to_dtype(DType::F32)?.to_device(p.var.device())?)?;
            }
        }
        self.clock = clock;
        Ok(())
    }

    /// (name, (d_out, d_in), adapter) for every adapted layer, in model order.
    pub fn adapters(&self) -> Vec<(&str, (usize, usize), &Adapter)> {
        self.body
            .linears()
            .into_iter()
            .filter_map(|l| l.adapter().map(|a| (l.name(), l.dims(), a)))
            .collect()
    }

    /// Every trainable tensor: adapters in model order, then the head.
    pub fn params(&self) -> Vec<Param> {
        let mut p: Vec<Param> = self
            .adapters()
            .iter()
            .flat_map(|(_, _, a)| a.params())
            .collect();
        if let Some(h) = &self.head {
            p.extend(h.params());
        }
        p
    }

    /// The head's tensors under their model names (for `modules_to_save`).
    pub fn head_tensors(&self) -> std::collections::BTreeMap<String, Tensor> {
        self.head
            .iter()
            .flat_map(|h| {
                h.params().into_iter().map(move |p| {
                    (
                        format!("{}.{}", h.name, p.suffix),
                        p.var.as_tensor().clone(),
                    )
                })
            })
            .collect()
    }

    fn pooled(&self, batch: &Batch, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        match (self.pooling, &self.body) {
            (Pooling::Cls, Body::Bert(bert)) => bert.cls_pooled(hidden),
            (Pooling::Cls, _) => Err(Error::msg("cls pooling needs a BERT-family model")),
            (Pooling::Mean, _) => {
                let m = batch.mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
                let s = hidden.broadcast_mul(&m)?.sum(1)?;
                Ok(s.broadcast_div(&m.sum(1)?.maximum(1.0)?)?)
            }
            (Pooling::Last, _) => {
                let lens: Vec<f32> = batch.mask.sum(1)?.to_dtype(DType::F32)?.to_vec1()?;
                let rows: Vec<u32> = lens
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (i * t + (*l as usize).max(1) - 1) as u32)
                    .collect();
                let idx = Tensor::new(rows, hidden.device())?;
                Ok(hidden.reshape((b * t, h))?.index_select(&idx, 0)?)
            }
        }
    }

    /// Classification logits (b, n_labels), f32.
    pub fn class_logits(&self, batch: &Batch) -> Result<Tensor> {
        let hidden = self.body.hidden_states(batch, &self.fast)?;
        self.class_logits_from(batch, &hidden)
    }

    fn class_logits_from(&self, batch: &Batch, hidden: &Tensor) -> Result<Tensor> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| Error::msg("this model has no classification head"))?;
        head.forward(&self.pooled(batch, hidden)?)
    }

    /// SFT: hidden rows that predict a completion token, and those tokens.
    /// Which hidden rows predict a completion token, and those tokens: row i·t + j − 1
    /// predicts token j of row i. Read on the host (a device sync), so the CUDA fast path
    /// asks before its forward rather than stalling the device between forward and head.
    fn lm_row_index(batch: &Batch) -> Result<LmIndex> {
        let (b, t) = batch.ids.dims2()?;
        let tm = batch
            .target_mask
            .as_ref()
            .ok_or_else(|| Error::msg("an SFT batch needs a target mask"))?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let ids = batch.ids.to_vec2::<u32>()?;
        let mut rows = vec![];
        let mut targets = vec![];
        for i in 0..b {
            for j in 1..t {
                if tm[i][j] > 0.0 {
                    rows.push((i * t + j - 1) as u32);
                    targets.push(ids[i][j]);
                }
            }
        }
        if rows.is_empty() {
            return Err(Error::msg("a batch has no completion tokens to learn from"));
        }
        Ok(LmIndex { rows, targets })
    }

    fn lm_rows(
        &self,
        batch: &Batch,
        hidden: &Tensor,
        index: Option<LmIndex>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t, h) = hidden.dims3()?;
        let LmIndex { rows, targets } = match index {
            Some(ix) => ix,
            None => Self::lm_row_index(batch)?,
        };
        let dev = hidden.device();
        let sel = hidden
            .reshape((b * t, h))?
            .index_select(&Tensor::new(rows, dev)?, 0)?;
        Ok((sel, Tensor::new(targets, dev)?))
    }

    fn lm_logits(&self, rows: &Tensor) -> Result<Tensor> {
        match &self.body {
            Body::Llama(l) => l.lm_logits(rows),
            Body::Bert(_) => Err(Error::msg("SFT needs a decoder model")),
        }
    }

    /// The training loss of a batch (mean over rows, or over completion tokens for SFT).
    pub fn loss(&self, batch: &Batch) -> Result<Tensor> {
        self.loss_from(batch, &self.body.hidden_states(batch, &self.fast)?, None)
    }

    /// The loss of a batch times `scale` (1/micro-batches under accumulation) and the
    /// gradients of everything trainable. On CUDA a LLaMA body's layers run their own forward
    /// and backward (`model/llama/fast.rs`), and so do the final norm, head and loss of SFT
    /// with a frozen head; candle's autograd covers a classification head, and the whole
    /// model elsewhere. Returns the unscaled loss.
    pub fn loss_and_grads(
        &self,
        batch: &Batch,
        scale: f64,
    ) -> Result<(Tensor, candle_core::backprop::GradStore)> {
        let (loss, grads, _) = self.loss_and_grads_synced(batch, scale, None)?;
        Ok((loss, grads))
    }

    /// [`TaskModel::loss_and_grads`] for data parallelism: where the backward can (the CUDA
    /// LLaMA path), it sums finished adapter gradients over the ranks through `sync` as it
    /// goes, and returns which variables' gradients are so summed; the rest are the caller's.
    pub fn loss_and_grads_synced(
        &self,
        batch: &Batch,
        scale: f64,
        sync: Option<&dyn crate::dist::GradSync>,
    ) -> Result<(
        Tensor,
        candle_core::backprop::GradStore,
        std::collections::HashSet<candle_core::TensorId>,
    )> {
        if let Body::Llama(l) = &self.body {
            // the CUDA layers below do not pass through `hidden_states`, which checks this too
            l.check_len(batch.ids.dim(1)?)?;
        }
        #[cfg(feature = "cuda")]
        if let Body::Llama(l) = &self.body {
            let index = match self.task {
                Task::Sft => Some(Self::lm_row_index(batch)?),
                Task::Classify => None,
            };
            if let Some(tape) = l.fast_forward(batch, &self.fast)? {
                let dev = batch.ids.device();
                // SFT with a frozen head: the head and loss on the fast path too
                if let Some(ix) = &index {
                    if let Some((loss, d_last)) = tape.lm_loss(l, &ix.rows, &ix.targets, scale)? {
                        let mut grads = candle_core::backprop::GradStore::default();
                        grads.insert(tape.leaf.as_tensor(), d_last);
                        let summed = tape.backward(&mut grads, sync)?;
                        return Ok((loss, grads, summed));
                    }
                }
                let hidden = l.final_norm(tape.leaf.as_tensor())?;
                crate::ops::mark_on(dev, "head: final norm fwd")?;
                let loss = self.loss_from(batch, &hidden, index)?;
                crate::ops::mark_on(dev, "head: logits and loss fwd")?;
                let mut grads = scaled(&loss, scale)?.backward()?;
                crate::ops::mark_on(dev, "head: backward (autograd)")?;
                let summed = tape.backward(&mut grads, sync)?;
                return Ok((loss, grads, summed));
            }
            let loss =
                self.loss_from(batch, &self.body.hidden_states(batch, &self.fast)?, index)?;
            let grads = scaled(&loss, scale)?.backward()?;
            return Ok((loss, grads, Default::default()));
        }
        let _ = sync;
        if self.fast.cpu_encoder {
            if let Some((loss, grads)) = self.bert_fast_loss_and_grads(batch, scale)? {
                return Ok((loss, grads, Default::default()));
            }
        }
        let loss = self.loss(batch)?;
        let grads = scaled(&loss, scale)?.backward()?;
        Ok((loss, grads, Default::default()))
    }

    /// A BERT-family body on the CPU: the encoder layers' own forward and backward
    /// (`model/bert/fast.rs`), candle's autograd for the pooling, head and loss from its output;
    /// None where that path does not take the model.
    fn bert_fast_loss_and_grads(
        &self,
        batch: &Batch,
        scale: f64,
    ) -> Result<Option<(Tensor, candle_core::backprop::GradStore)>> {
        let Body::Bert(bert) = &self.body else {
            return Ok(None);
        };
        if self.task != Task::Classify {
            return Ok(None);
        }
        let Some(tape) = bert.fast_forward(batch)? else {
            return Ok(None);
        };
        let loss = self.loss_from(batch, tape.leaf.as_tensor(), None)?;
        let mut grads = scaled(&loss, scale)?.backward()?;
        tape.backward(&mut grads)?;
        Ok(Some((loss, grads)))
    }

    fn loss_from(&self, batch: &Batch, hidden: &Tensor, index: Option<LmIndex>) -> Result<Tensor> {
        match self.task {
            Task::Classify => {
                let logits = self.class_logits_from(batch, hidden)?;
                let labels = batch
                    .labels
                    .as_ref()
                    .ok_or_else(|| Error::msg("a classification batch needs labels"))?;
                cross_entropy(&logits, labels, None)
            }
            Task::Sft => {
                let (rows, targets) = self.lm_rows(batch, hidden, index)?;
                cross_entropy(&self.lm_logits(&rows)?, &targets, None)
            }
        }
    }

    /// Next-token logits (vocab) after the last position of a one-row batch.
    /// An empty key/value cache for [`TaskModel::next_token_logits_cached`] (decoders only).
    pub fn new_cache(&self) -> Result<llama::KvCache> {
        match &self.body {
            Body::Llama(l) => Ok(l.new_cache()),
            Body::Bert(_) => Err(Error::msg("generation needs a decoder model")),
        }
    }

    /// The next token's logits (vocab) after `ids`, which continue the positions in `cache`
    /// (empty for the prompt); the cache takes their keys and values.
    pub fn next_token_logits_cached(
        &self,
        ids: &[u32],
        cache: &mut llama::KvCache,
    ) -> Result<Tensor> {
        let last = match &self.body {
            Body::Llama(l) => l.forward_cached(ids, cache)?,
            Body::Bert(_) => return Err(Error::msg("generation needs a decoder model")),
        };
        Ok(self.lm_logits(&last)?.squeeze(0)?)
    }

    pub fn next_token_logits(&self, batch: &Batch) -> Result<Tensor> {
        let hidden = self.body.hidden_states(batch, &self.fast)?.detach();
        let (b, t, h) = hidden.dims3()?;
        let last = hidden.narrow(1, t - 1, 1)?.reshape((b, h))?;
        Ok(self.lm_logits(&last)?.squeeze(0)?)
    }

    /// Losses, predictions and probabilities of a batch, without a graph.
    pub fn eval_batch(&self, batch: &Batch) -> Result<EvalSums> {
        let mut out = EvalSums::default();
        match self.task {
            Task::Classify => {
                let logits = self.class_logits(batch)?.detach();
                let probs = crate::ops::reference::softmax_last(&logits)?;
                out.probs = probs.to_vec2::<f32>()?;
                out.preds = logits
                    .argmax(1)?
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|x| x as usize)
                    .collect();
                if let Some(labels) = &batch.labels {
                    let nll = crate::ops::nll_rows(&logits, labels)?.to_vec1::<f32>()?;
                    out.nll_sum = nll.iter().map(|x| *x as f64).sum();
                    out.count = nll.len();
                    out.labels = labels
                        .to_vec1::<u32>()?
                        .into_iter()
                        .map(|x| x as usize)
                        .collect();
                }
            }
            Task::Sft => {
                let hidden = self.body.hidden_states(batch, &self.fast)?.detach();
                let (rows, targets) = self.lm_rows(batch, &hidden, None)?;
                let nll =
                    crate::ops::nll_rows(&self.lm_logits(&rows)?, &targets)?.to_vec1::<f32>()?;
                out.nll_sum = nll.iter().map(|x| *x as f64).sum();
                out.count = nll.len();
            }
        }
        Ok(out)
    }
}
