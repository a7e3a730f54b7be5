//! `adapter_config.json`: PEFT's LoRA conventions for LoRA/rsLoRA/DoRA, and `SINGLORA` for ours.
//!
//! Reading checks every field's type and names the field at fault. Unknown fields are ignored
//! (as PEFT ignores them); a PEFT option that changes what the adapter computes and that
//! singlora does not implement (`layers_to_transform`, a non-default `bias`, …) is refused,
//! never silently dropped. `rank_pattern` / `alpha_pattern` are honoured with PEFT's rule: the
//! first key `k` (in file order) for which the module path matches `(.*\.)?(k)$`.
//!
//! [`AdapterConfig::validate`] (run on every file read) refuses values no adapter means: a
//! `lora_alpha` that is not positive or scales the update beyond [`MAX_SCALE`], and an `init`
//! that names no initialisation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::{json, Map, Value};

use crate::adapter::init::SingLoraInit;
use crate::adapter::ramp::RampSchedule;
use crate::adapter::target::TargetSpec;
use crate::adapter::{scale, AdapterKind, AdapterSpec, MAX_SCALE};
use crate::error::{Error, Result};
use crate::model::Family;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The settings of one adapter directory.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub kind: AdapterKind,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    /// `target_modules` as written (a list of names or one regex).
    pub target_modules: Value,
    pub exclude_modules: Value,
    pub base_model_name_or_path: Option<String>,
    pub task_type: Option<String>,
    /// SingLoRA: T and t.
    pub ramp_steps: u64,
    pub step: u64,
    /// SingLoRA: how A was drawn (informational).
    pub init: Option<String>,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    /// Fully trained modules stored beside the adapter (a classification head).
    pub modules_to_save: Vec<String>,
    /// Ordered label names of a classification head.
    pub labels: Option<Vec<String>>,
    /// How the classification head pools the sequence (`cls`, `mean`, `last`).
    pub pooling: Option<String>,
    /// SingLoRA: (d_out, d_in) of each adapted weight, so export needs no base.
    pub layer_shapes: BTreeMap<String, (usize, usize)>,
    /// The file it was read from (for messages).
    pub source: Option<PathBuf>,
}

/// PEFT options that change the computation and that singlora does not implement: refused when
/// set to anything but their default.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "layers_to_transform",
        "adapters on a subset of layers by index; use target regexes instead",
    ),
    ("layers_pattern", "only meaningful with layers_to_transform"),
    ("layer_replication", "layer replication is not implemented"),
    ("use_qalora", "QALoRA is not implemented"),
    ("lora_bias", "a trainable bias on lora_B is not implemented"),
    (
        "target_parameters",
        "adapters on nn.Parameter targets are not implemented",
    ),
    (
        "trainable_token_indices",
        "trainable token embeddings are not implemented",
    ),
    (
        "alora_invocation_tokens",
        "activated LoRA is not implemented",
    ),
    ("arrow_config", "Arrow routing is not implemented"),
    ("use_bdlora", "block-diagonal LoRA is not implemented"),
    ("kasa_config", "KaSA is not implemented"),
    ("velora_config", "VeLoRA is not implemented"),
    ("monteclora_config", "MonteCLoRA is not implemented"),
    (
        "megatron_config",
        "Megatron parallel layers are not implemented",
    ),
];

fn is_default(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(_) => false,
    }
}

struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn bad(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::bad_field(self.path, field, msg)
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn required(&self, field: &str) -> Result<&Value> {
        self.get(field)
            .ok_or_else(|| self.bad(field, "is required but missing"))
    }

    fn uint(&self, v: &Value, field: &str) -> Result<u64> {
        v.as_u64()
            .ok_or_else(|| self.bad(field, format!("must be a non-negative integer, found {v}")))
    }

    fn uint_field(&self, field: &str, default: Option<u64>) -> Result<u64> {
        match (self.get(field), default) {
            (Some(v), _) => self.uint(v, field),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(self.bad(field, "is required but missing")),
        }
    }

    fn rank(&self, v: &Value, field: &str) -> Result<usize> {
        let r = self.uint(v, field)?;
        if r == 0 {
            return Err(self.bad(field, "must be at least 1"));
        }
        Ok(r as usize)
    }

    fn number(&self, v: &Value, field: &str) -> Result<f64> {
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| self.bad(field, format!("must be a number, found {v}")))
    }

    fn boolean(&self, field: &str) -> Result<bool> {
        match self.get(field) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.bad(field, format!("must be true or false, found {v}"))),
        }
    }

    fn string(&self, field: &str) -> Result<Option<String>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.bad(field, format!("must be a string, found {v}"))),
        }
    }

    fn string_list(&self, field: &str) -> Result<Vec<String>> {
        match self.get(field) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.bad(field, format!("must hold strings, found {x}")))
                })
                .collect(),
            Some(v) => Err(self.bad(field, format!("must be a list of strings, found {v}"))),
        }
    }

    fn pattern_map<T>(
        &self,
        field: &str,
        f: impl Fn(&Value, &str) -> Result<T>,
    ) -> Result<Vec<(String, T)>> {
        match self.get(field) {
            None => Ok(vec![]),
            Some(Value::Object(o)) => o
                .iter()
                .map(|(k, v)| Ok((k.clone(), f(v, &format!("{field}.{k}"))?)))
                .collect(),
            Some(v) => Err(self.bad(field, format!("must be an object, found {v}"))),
        }
    }
}

/// PEFT's rule for `rank_pattern` / `alpha_pattern` keys.
fn pattern_matches(key: &str, module: &str) -> bool {
    Regex::new(&format!("^(?:.*\\.)?(?:{key})$"))
        .map(|re| re.is_match(module))
        .unwrap_or(false)
}

impl AdapterConfig {
    /// A SingLoRA config.
    pub fn singlora(r: usize, lora_alpha: f64, ramp: RampSchedule, targets: &TargetSpec) -> Self {
        let (target_modules, exclude_modules) = targets.to_json();
        Self {
            kind: AdapterKind::SingLora,
            r,
            lora_alpha,
            use_rslora: false,
            fan_in_fan_out: false,
            target_modules,
            exclude_modules,
            base_model_name_or_path: None,
            task_type: None,
            ramp_steps: ramp.ramp_steps,
            step: 0,
            init: None,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            modules_to_save: vec![],
            labels: None,
            pooling: None,
            layer_shapes: BTreeMap::new(),
            source: None,
        }
    }

    /// A LoRA (or rsLoRA / DoRA) config.
    pub fn lora(
        kind: AdapterKind,
        r: usize,
        lora_alpha: f64,
        use_rslora: bool,
        targets: &TargetSpec,
    ) -> Self {
        let mut c = Self::singlora(r, lora_alpha, RampSchedule::none(), targets);
        c.kind = kind;
        c.use_rslora = use_rslora;
        c
    }

    /// The config of adapters made from `spec` on the modules `targets` selects, ramping by
    /// `ramp` where the method ramps, recording SingLoRA's initialisation.
    pub fn for_spec(spec: &AdapterSpec, ramp: RampSchedule, targets: &TargetSpec) -> Self {
        let ramp = if spec.kind.ramps() {
            ramp
        } else {
            RampSchedule::none()
        };
        let mut c = Self::singlora(spec.r, spec.alpha, ramp, targets);
        c.kind = spec.kind;
        c.use_rslora = spec.rslora;
        if spec.kind == AdapterKind::SingLora {
            c.init = Some(spec.init.to_string());
        }
        c
    }

    pub fn ramp(&self) -> RampSchedule {
        if self.kind.ramps() {
            RampSchedule::new(self.ramp_steps)
        } else {
            RampSchedule::none()
        }
    }

    /// u after the saved number of updates (1 for LoRA-family adapters).
    pub fn u(&self) -> f64 {
        self.ramp().u(self.step)
    }

    pub fn rank_for(&self, module: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map_or(self.r, |(_, r)| *r)
    }

    pub fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map_or(self.lora_alpha, |(_, a)| *a)
    }

    /// s for `module`: α/r or α/√r with that module's r and α.
    pub fn scale_for(&self, module: &str) -> f64 {
        scale(
            self.alpha_for(module),
            self.rank_for(module),
            self.use_rslora,
        )
    }

    pub fn peft_type(&self) -> &'static str {
        match self.kind {
            AdapterKind::SingLora => "SINGLORA",
            _ => "LORA",
        }
    }

    /// Parses a config already read as JSON; `path` names it in errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::bad_file(path, "must hold a JSON object"))?;
        let f = Fields { path, obj };
        let peft_type = match f.required("peft_type")? {
            Value::String(s) => s.as_str(),
            v => return Err(f.bad("peft_type", format!("must be a string, found {v}"))),
        };
        let use_dora = f.boolean("use_dora")?;
        let kind = match peft_type {
            "SINGLORA" => AdapterKind::SingLora,
            "LORA" if use_dora => AdapterKind::Dora,
            "LORA" => AdapterKind::Lora,
            other => {
                return Err(f.bad(
                    "peft_type",
                    format!("`{other}` is not an adapter singlora reads (expected \"SINGLORA\" or \"LORA\")"),
                ))
            }
        };
        for (field, hint) in UNSUPPORTED {
            if let Some(v) = obj.get(*field) {
                if !is_default(v) {
                    return Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        field: field.to_string(),
                        value: v.to_string(),
                        hint: hint.to_string(),
                    });
                }
            }
        }
        if let Some(v) = obj.get("bias") {
            if !(v.is_null() || v.as_str() == Some("none")) {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    field: "bias".into(),
                    value: v.to_string(),
                    hint: "only bias = \"none\" is implemented".into(),
                });
            }
        }
        let r = f.rank(f.required("r")?, "r")?;
        let lora_alpha = f.number(f.required("lora_alpha")?, "lora_alpha")?;
        let target_modules = f.required("target_modules")?.clone();
        let exclude_modules = obj.get("exclude_modules").cloned().unwrap_or(Value::Null);
        TargetSpec::from_json(&target_modules, Some(&exclude_modules))
            .map_err(|msg| f.bad("target_modules", msg))?;
        let (ramp_steps, step) = match kind {
            AdapterKind::SingLora => (
                f.uint_field("ramp_steps", None)?,
                f.uint_field("step", None)?,
            ),
            _ => (0, 0),
        };
        let mut layer_shapes = BTreeMap::new();
        if let Some(v) = f.get("layer_shapes") {
            let o = v
                .as_object()
                .ok_or_else(|| f.bad("layer_shapes", "must be an object"))?;
            for (k, s) in o {
                let dims: Option<Vec<usize>> = s.as_array().map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64().map(|x| x as usize))
                        .collect()
                });
                match dims.as_deref() {
                    Some([o, i]) => {
                        layer_shapes.insert(k.clone(), (*o, *i));
                    }
                    _ => return Err(f.bad(&format!("layer_shapes.{k}"), "must be [d_out, d_in]")),
                }
            }
        }
        let config = Self {
            kind,
            r,
            lora_alpha,
            use_rslora: f.boolean("use_rslora")?,
            fan_in_fan_out: f.boolean("fan_in_fan_out")?,
            target_modules,
            exclude_modules,
            base_model_name_or_path: f.string("base_model_name_or_path")?,
            task_type: f.string("task_type")?,
            ramp_steps,
            step,
            init: f.string("init")?,
            rank_pattern: f.pattern_map("rank_pattern", |v, k| f.rank(v, k))?,
            alpha_pattern: f.pattern_map("alpha_pattern", |v, k| f.number(v, k))?,
            modules_to_save: f.string_list("modules_to_save")?,
            labels: match f.get("labels") {
                None => None,
                Some(_) => Some(f.string_list("labels")?),
            },
            pooling: f.string("pooling")?,
            layer_shapes,
            source: Some(path.to_path_buf()),
        };
        config.validate()?;
        Ok(config)
    }

    /// The file the config was read from, or its usual name.
    fn path(&self) -> &Path {
        self.source.as_deref().unwrap_or(Path::new(CONFIG_FILE))
    }

    /// Refuses values no adapter means, naming the file and field: a `lora_alpha` (or
    /// `alpha_pattern` value) that is not positive or whose scale α/r (α/√r with rsLoRA)
    /// exceeds [`MAX_SCALE`], and an `init` that names no initialisation.
    pub fn validate(&self) -> Result<()> {
        let alphas = std::iter::once(("lora_alpha".to_string(), self.lora_alpha, self.r)).chain(
            self.alpha_pattern
                .iter()
                .map(|(k, a)| (format!("alpha_pattern.{k}"), *a, self.rank_for(k))),
        );
        for (field, alpha, r) in alphas {
            let s = scale(alpha, r, self.use_rslora);
            let why = if !(alpha.is_finite() && alpha > 0.0) {
                format!("must be a positive number, found {alpha} (the update is scaled by α/r)")
            } else if s > MAX_SCALE {
                format!(
                    "{alpha} scales the update by {s:e} at r = {r}; scales above {MAX_SCALE} are \
                     taken for a mistake"
                )
            } else {
                continue;
            };
            return Err(Error::bad_field(self.path(), field, why));
        }
        if let Some(init) = &self.init {
            if let Err(e) = init.parse::<SingLoraInit>() {
                return Err(Error::bad_field(self.path(), "init", e.to_string()));
            }
        }
        Ok(())
    }

    /// Refuses a `fan_in_fan_out` that contradicts how a model of `family` stores its linear
    /// weights: (d_in, d_out) for GPT-2's Conv1D, (d_out, d_in) for the others; `layer`, an
    /// adapted layer, is named in the message. A model of no family singlora knows (`None`)
    /// may be either.
    pub fn check_weight_layout(
        &self,
        family: Option<Family>,
        layer: Option<&String>,
    ) -> Result<()> {
        let layer = layer.map_or("", String::as_str);
        match family {
            Some(family) if self.fan_in_fan_out != family.transposed_weights() => {
                let (stored, set) = if family.transposed_weights() {
                    ("(in, out), as GPT-2's Conv1D keeps them", "true")
                } else {
                    ("(out, in)", "false")
                };
                Err(Error::Unsupported {
                    path: self.path().to_path_buf(),
                    field: "fan_in_fan_out".into(),
                    value: self.fan_in_fan_out.to_string(),
                    hint: format!(
                        "{family:?}-family weights such as `{layer}` are stored {stored}; set it \
                         to {set}"
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    /// Reads `DIR/adapter_config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&text, &path)
    }

    /// Parses the text of an `adapter_config.json`; `path` names it in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::bad_file(path, format!("is not valid JSON: {e}")))?;
        Self::from_json(&value, path)
    }

    /// The JSON that is written: PEFT's full LoRA field set for LoRA-family adapters (so PEFT
    /// loads it unchanged), the `SINGLORA` fields for ours.
    pub fn to_json(&self) -> Value {
        let patterns_r: Map<String, Value> = self
            .rank_pattern
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let patterns_a: Map<String, Value> = self
            .alpha_pattern
            .iter()
            .map(|(k, v)| (k.clone(), json_number(*v)))
            .collect();
        let modules_to_save = if self.modules_to_save.is_empty() {
            Value::Null
        } else {
            json!(self.modules_to_save)
        };
        let mut v = match self.kind {
            AdapterKind::SingLora => json!({
                "peft_type": "SINGLORA",
                "task_type": self.task_type,
                "base_model_name_or_path": self.base_model_name_or_path,
                "r": self.r,
                "lora_alpha": json_number(self.lora_alpha),
                "use_rslora": self.use_rslora,
                "ramp_steps": self.ramp_steps,
                "step": self.step,
                "init": self.init,
                "target_modules": self.target_modules,
                "exclude_modules": self.exclude_modules,
                "fan_in_fan_out": self.fan_in_fan_out,
                "rank_pattern": patterns_r,
                "alpha_pattern": patterns_a,
                "modules_to_save": modules_to_save,
                "inference_mode": true,
                "layer_shapes": self.layer_shapes.iter()
                    .map(|(k, (o, i))| (k.clone(), json!([o, i])))
                    .collect::<Map<String, Value>>(),
            }),
            AdapterKind::Lora | AdapterKind::Dora => json!({
                "peft_type": "LORA",
                "task_type": self.task_type,
                "base_model_name_or_path": self.base_model_name_or_path,
                "revision": null,
                "inference_mode": true,
                "r": self.r,
                "lora_alpha": json_number(self.lora_alpha),
                "lora_dropout": 0.0,
                "use_rslora": self.use_rslora,
                "use_dora": self.kind == AdapterKind::Dora,
                "target_modules": self.target_modules,
                "exclude_modules": self.exclude_modules,
                "fan_in_fan_out": self.fan_in_fan_out,
                "bias": "none",
                "modules_to_save": modules_to_save,
                "init_lora_weights": true,
                "layers_to_transform": null,
                "layers_pattern": null,
                "rank_pattern": patterns_r,
                "alpha_pattern": patterns_a,
                "megatron_config": null,
                "megatron_core": "megatron.core",
                "loftq_config": {},
                "layer_replication": null,
                "use_qalora": false,
                "lora_bias": false,
            }),
        };
        if let Some(labels) = &self.labels {
            v["labels"] = json!(labels);
        }
        if let Some(p) = &self.pooling {
            v["pooling"] = json!(p);
        }
        v
    }
}

/// Integers stay integers in JSON (PEFT writes `"lora_alpha": 16`).
fn json_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<AdapterConfig> {
        AdapterConfig::from_json(&v, Path::new("cfg.json"))
    }

    fn base() -> Value {
        json!({"peft_type": "SINGLORA", "r": 8, "lora_alpha": 16, "ramp_steps": 10, "step": 3,
               "target_modules": ["q_proj"], "init": "kaiming_width"})
    }

    #[test]
    fn reads_singlora() -> Result<()> {
        let c = parse(base())?;
        assert_eq!(c.kind, AdapterKind::SingLora);
        assert_eq!((c.r, c.lora_alpha, c.ramp_steps, c.step), (8, 16.0, 10, 3));
        assert!((c.u() - 0.3).abs() < 1e-15);
        assert_eq!(c.scale_for("x.q_proj"), 2.0);
        Ok(())
    }

    #[test]
    fn field_errors_name_the_field() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("r", json!("8"), "non-negative integer"),
            ("r", json!(0), "at least 1"),
            ("r", json!(2.5), "non-negative integer"),
            ("lora_alpha", json!("x"), "number"),
            ("use_rslora", json!("yes"), "true or false"),
            ("ramp_steps", json!(-1), "non-negative integer"),
            ("step", Value::Null, "required"),
            ("target_modules", json!(3), "list of strings"),
            ("peft_type", json!("IA3"), "IA3"),
        ];
        for (field, value, want) in cases {
            let mut v = base();
            v[field] = value;
            let err = parse(v).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{field}`")) && err.contains(want),
                "{field}: {err}"
            );
            assert!(err.contains("cfg.json"), "{err}");
        }
    }

    /// Values a file can hold but no adapter can mean: refused naming the file and field.
    #[test]
    fn values_no_adapter_means_are_refused() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("lora_alpha", json!(0), "lora_alpha"),
            ("lora_alpha", json!(-16), "lora_alpha"),
            ("lora_alpha", json!(1e12), "lora_alpha"),
            (
                "alpha_pattern",
                json!({"q_proj": 0}),
                "alpha_pattern.q_proj",
            ),
            ("init", json!("bogus"), "init"),
        ];
        for (field, value, named) in cases {
            let mut v = base();
            v[field] = value.clone();
            let err = match parse(v) {
                Ok(_) => panic!("{field} = {value} was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains("cfg.json") && err.contains(&format!("`{named}`")),
                "{field} = {value}: {err}"
            );
        }
        // a LoRA file may leave `init` out, and any positive alpha of sane size is fine
        let mut v = base();
        v["lora_alpha"] = json!(0.5);
        v["init"] = json!("gaussian:0.01");
        parse(v).unwrap();
    }

    #[test]
    fn unsupported_options_are_refused() {
        for (field, value) in [
            ("layers_to_transform", json!([0, 1])),
            ("bias", json!("all")),
            ("use_qalora", json!(true)),
            ("layer_replication", json!([[0, 2]])),
        ] {
            let mut v = base();
            v[field] = value;
            let err = parse(v).unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains("not supported"),
                "{err}"
            );
        }
        // defaults are fine
        let mut v = base();
        v["layers_to_transform"] = Value::Null;
        v["bias"] = json!("none");
        v["loftq_config"] = json!({});
        v["some_future_field"] = json!(42);
        parse(v).unwrap();
    }

    #[test]
    fn rank_and_alpha_patterns() -> Result<()> {
        let mut v = base();
        v["rank_pattern"] = json!({"down_proj": 2});
        v["alpha_pattern"] = json!({"layers.1.self_attn.q_proj": 3});
        let c = parse(v)?;
        assert_eq!(c.rank_for("model.layers.0.mlp.down_proj"), 2);
        assert_eq!(c.rank_for("model.layers.0.mlp.up_proj"), 8);
        assert_eq!(c.alpha_for("model.layers.1.self_attn.q_proj"), 3.0);
        assert_eq!(c.alpha_for("model.layers.11.self_attn.q_proj"), 16.0);
        Ok(())
    }

    #[test]
    fn json_round_trip() -> Result<()> {
        for kind in [AdapterKind::SingLora, AdapterKind::Lora, AdapterKind::Dora] {
            let targets = TargetSpec::parse("q_proj,v_proj", None)?;
            let mut c = AdapterConfig::lora(kind, 4, 8.0, kind == AdapterKind::Lora, &targets);
            c.ramp_steps = 7;
            c.step = 2;
            c.labels = Some(vec!["neg".into(), "pos".into()]);
            let back = parse(c.to_json())?;
            assert_eq!(back.kind, kind);
            assert_eq!(back.use_rslora, c.use_rslora);
            assert_eq!(back.labels, c.labels);
            if kind == AdapterKind::SingLora {
                assert_eq!((back.ramp_steps, back.step), (7, 2));
            }
        }
        Ok(())
    }
}
