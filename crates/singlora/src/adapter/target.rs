//! Which modules get an adapter, written the way PEFT users write it.
//!
//! A module matches a name `t` when its path equals `t` or ends with `.t` (so `q_proj` picks
//! every `model.layers.N.self_attn.q_proj`); a regex must match the whole path (PEFT uses
//! `re.fullmatch`); `all-linear` is every linear layer except the output head. Exclusions use
//! the same rules and win over targets.
//!
//! ```
//! use singlora::adapter::target::TargetSpec;
//! let spec = TargetSpec::parse("q_proj,re:.*\\.mlp\\.(up|down)_proj", Some("layers.0.self_attn.q_proj"))?;
//! assert!(spec.matches("model.layers.1.self_attn.q_proj"));
//! assert!(!spec.matches("model.layers.0.self_attn.q_proj"));
//! assert!(spec.matches("model.layers.0.mlp.up_proj"));
//! assert!(!spec.matches("model.layers.0.mlp.gate_proj"));
//! # Ok::<(), singlora::Error>(())
//! ```

use regex::Regex;
use serde_json::Value;

use crate::error::{Error, Result};

/// One pattern: a name (exact or suffix) or a whole-path regex.
#[derive(Debug, Clone)]
pub enum Pattern {
    Name(String),
    Regex(String, Regex),
}

impl Pattern {
    pub fn name(name: &str) -> Self {
        Pattern::Name(name.to_string())
    }

    pub fn regex(src: &str) -> Result<Self> {
        let re = Regex::new(&format!("^(?:{src})$"))
            .map_err(|e| Error::msg(format!("bad target regex `{src}`: {e}")))?;
        Ok(Pattern::Regex(src.to_string(), re))
    }

    pub fn matches(&self, module: &str) -> bool {
        match self {
            Pattern::Name(n) => module == n || module.ends_with(&format!(".{n}")),
            Pattern::Regex(_, re) => re.is_match(module),
        }
    }

    /// How a user wrote it on the command line.
    pub fn describe(&self) -> String {
        match self {
            Pattern::Name(n) => format!("`{n}`"),
            Pattern::Regex(s, _) => format!("`re:{s}`"),
        }
    }
}

/// The modules to adapt.
#[derive(Debug, Clone)]
pub enum Targets {
    Patterns(Vec<Pattern>),
    AllLinear,
}

#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub targets: Targets,
    pub exclude: Vec<Pattern>,
}

fn parse_list(s: &str) -> Result<Vec<Pattern>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.strip_prefix("re:") {
            Some(re) => Pattern::regex(re),
            None => Ok(Pattern::name(p)),
        })
        .collect()
}

impl TargetSpec {
    /// Parses the CLI form: comma-separated names or suffixes, `re:PATTERN`, or `all-linear`.
    pub fn parse(targets: &str, exclude: Option<&str>) -> Result<Self> {
        let targets = if targets.trim() == "all-linear" {
            Targets::AllLinear
        } else {
            let p = parse_list(targets)?;
            if p.is_empty() {
                return Err(Error::msg("no target modules given"));
            }
            Targets::Patterns(p)
        };
        let exclude = match exclude {
            Some(e) => parse_list(e)?,
            None => vec![],
        };
        Ok(Self { targets, exclude })
    }

    pub fn from_names(names: &[&str]) -> Self {
        Self {
            targets: Targets::Patterns(names.iter().map(|n| Pattern::name(n)).collect()),
            exclude: vec![],
        }
    }

    /// Reads PEFT's `target_modules` / `exclude_modules` JSON values (a list of names or one
    /// regex string).
    pub fn from_json(
        targets: &Value,
        exclude: Option<&Value>,
    ) -> std::result::Result<Self, String> {
        fn one(v: &Value, what: &str) -> std::result::Result<Vec<Pattern>, String> {
            match v {
                Value::String(s) if s == "all-linear" && what == "target_modules" => Ok(vec![]),
                Value::String(s) => Ok(vec![Pattern::regex(s).map_err(|e| e.to_string())?]),
                Value::Array(a) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(Pattern::name)
                            .ok_or_else(|| format!("`{what}` must hold strings, found {x}"))
                    })
                    .collect(),
                other => Err(format!(
                    "`{what}` must be a list of strings or a regex string, found {other}"
                )),
            }
        }
        let targets = if targets.as_str() == Some("all-linear") {
            Targets::AllLinear
        } else {
            Targets::Patterns(one(targets, "target_modules")?)
        };
        let exclude = match exclude {
            None | Some(Value::Null) => vec![],
            Some(v) => one(v, "exclude_modules")?,
        };
        Ok(Self { targets, exclude })
    }

    /// The JSON form PEFT writes: a list of names, or one regex string when any pattern is a
    /// regex (names are folded into it with PEFT's suffix rule).
    pub fn to_json(&self) -> (Value, Value) {
        fn one(p: &[Pattern]) -> Value {
            if p.iter().all(|p| matches!(p, Pattern::Name(_))) {
                Value::Array(
                    p.iter()
                        .map(|p| match p {
                            Pattern::Name(n) => Value::String(n.clone()),
                            Pattern::Regex(..) => unreachable!(),
                        })
                        .collect(),
                )
            } else {
                let alts: Vec<String> = p
                    .iter()
                    .map(|p| match p {
                        Pattern::Name(n) => format!("(?:.*\\.)?{}", regex::escape(n)),
                        Pattern::Regex(s, _) => format!("(?:{s})"),
                    })
                    .collect();
                Value::String(alts.join("|"))
            }
        }
        let targets = match &self.targets {
            Targets::AllLinear => Value::String("all-linear".into()),
            Targets::Patterns(p) => one(p),
        };
        let exclude = if self.exclude.is_empty() {
            Value::Null
        } else {
            one(&self.exclude)
        };
        (targets, exclude)
    }

    fn excluded(&self, module: &str) -> bool {
        self.exclude.iter().any(|p| p.matches(module))
    }

    /// Whether `module` (a linear layer's path) is selected, `all-linear` counting every one.
    pub fn matches(&self, module: &str) -> bool {
        if self.excluded(module) {
            return false;
        }
        match &self.targets {
            Targets::AllLinear => true,
            Targets::Patterns(p) => p.iter().any(|p| p.matches(module)),
        }
    }

    /// Selects from the model's linear layers (`all-linear` skips `output_layers`, the heads).
    /// Every pattern must select something: a typo is an error naming it.
    pub fn select(
        &self,
        linear_modules: &[String],
        output_layers: &[String],
    ) -> Result<Vec<String>> {
        let example = linear_modules.first().cloned().unwrap_or_default();
        if let Targets::Patterns(patterns) = &self.targets {
            for p in patterns {
                if !linear_modules.iter().any(|m| p.matches(m)) {
                    return Err(Error::NoTargetMatch {
                        pattern: p.describe(),
                        example,
                    });
                }
            }
        }
        let chosen: Vec<String> = linear_modules
            .iter()
            .filter(|m| self.matches(m))
            .filter(|m| !(matches!(self.targets, Targets::AllLinear) && output_layers.contains(m)))
            .cloned()
            .collect();
        if chosen.is_empty() {
            return Err(Error::NoTargetMatch {
                pattern: "(after exclusions)".into(),
                example,
            });
        }
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules() -> Vec<String> {
        let mut v = vec![];
        for l in 0..2 {
            for p in ["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"] {
                v.push(format!("model.layers.{l}.{p}"));
            }
        }
        v.push("lm_head".into());
        v
    }

    #[test]
    fn exact_suffix_regex_all_linear_and_exclude() -> Result<()> {
        let m = modules();
        let heads = vec!["lm_head".to_string()];
        let s = TargetSpec::parse("q_proj", None)?;
        assert_eq!(s.select(&m, &heads)?.len(), 2);
        let s = TargetSpec::parse("model.layers.1.mlp.up_proj", None)?;
        assert_eq!(s.select(&m, &heads)?, vec!["model.layers.1.mlp.up_proj"]);
        // a suffix must end at a dot: `proj` alone is not `q_proj`.
        assert!(TargetSpec::parse("proj", None)?.select(&m, &heads).is_err());
        let s = TargetSpec::parse("re:.*layers\\.0\\..*", None)?;
        assert_eq!(s.select(&m, &heads)?.len(), 3);
        let s = TargetSpec::parse("all-linear", Some("k_proj"))?;
        let chosen = s.select(&m, &heads)?;
        assert_eq!(chosen.len(), 4);
        assert!(!chosen.contains(&"lm_head".to_string()));
        Ok(())
    }

    #[test]
    fn typo_is_named() {
        let err = TargetSpec::parse("q_proj,qq_proj", None)
            .unwrap()
            .select(&modules(), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`qq_proj`"), "{err}");
        assert!(err.contains("model.layers.0.self_attn.q_proj"), "{err}");
    }

    #[test]
    fn json_round_trip() -> Result<()> {
        let s = TargetSpec::parse("q_proj,re:.*up_proj", Some("layers.0.mlp.up_proj"))?;
        let (t, e) = s.to_json();
        let back = TargetSpec::from_json(&t, Some(&e)).unwrap();
        for m in modules() {
            assert_eq!(s.matches(&m), back.matches(&m), "{m}");
        }
        Ok(())
    }
}
