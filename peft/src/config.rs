//! `LoraConfig` with peft's names, defaults and meaning: the `[peft]` table of a kiln
//! run, and `adapter_config.json` read and written as peft 0.21 does.
//!
//! Decisions:
//! - The defaults are `LoraConfig`'s (`r` 8, `lora_alpha` 8, `lora_dropout` 0), for the
//!   `[peft]` table and the TRL-spelled flags alike (TRL's `ModelConfig` defaults to
//!   16/32/0.05: give them explicitly to match a TRL script).
//! - `target_modules` unset takes peft's default for the model type (BERT `query,value`,
//!   GPT-2 `c_attn`, the Llama family `q_proj,v_proj`); a string is a regular
//!   expression matched against the whole module name, `all-linear` every dense layer
//!   but the output layer, a list matches a module whose name is an entry or ends with
//!   `.entry`. A listed entry that matches no dense layer is an error naming the
//!   model's layer names (peft only fails when nothing matches).
//! - Features kiln does not implement are refused in one line, when given and when read
//!   from a peft adapter: DoRA, LoRA on embeddings, `layers_to_transform`, `lora_bias`,
//!   other initialisations than kaiming/zeros (`true`), `"gaussian"` and `false`.

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::{Error, Result};

/// `target_modules`: a regular expression, or a list of module names or suffixes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// A regular expression that must match the whole module name (`all-linear`: every
    /// dense layer but the output layer).
    Pattern(String),
    /// Module names, or the last components of module names.
    List(Vec<String>),
}

/// `init_lora_weights`: `true` (A kaiming-uniform, B zero), `false` (both as
/// `nn.Linear` initialises them), or `"gaussian"` (A normal(0, 1/r), B zero).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true` or `false`.
    Bool(bool),
    /// A named initialisation; kiln has `"gaussian"`.
    Name(String),
}

/// The LoRA options, as peft's `LoraConfig` names them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// The rank.
    pub r: usize,
    /// The scaling numerator: `scaling = lora_alpha / r` (`/ √r` with `use_rslora`).
    pub lora_alpha: f64,
    /// Dropout on the adapter's input, in training.
    pub lora_dropout: f64,
    /// Which dense layers get an adapter (unset: peft's default for the model type).
    pub target_modules: Option<Targets>,
    /// Modules trained in full and saved with the adapter (a classifier head).
    pub modules_to_save: Option<Vec<String>>,
    /// `scaling = lora_alpha / √r` (rank-stabilised LoRA).
    pub use_rslora: bool,
    /// Which biases train: `none`, `all`, or `lora_only` (those of adapted layers).
    pub bias: String,
    /// How A and B start.
    pub init_lora_weights: InitLoraWeights,
    /// Per-module ranks: key (a regular expression matching the end of a module name)
    /// → rank.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas, as `rank_pattern`.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// The base weight is stored `[in, out]`; kiln sets it from the layer (GPT-2's
    /// `Conv1D` is), as peft corrects it with a warning.
    pub fan_in_fan_out: bool,
    /// peft's task type (`SEQ_CLS`, `CAUSAL_LM`); unset: from the model's task.
    pub task_type: Option<String>,
    /// DoRA: refused.
    pub use_dora: bool,
    /// Only these layer indexes: refused when set.
    pub layers_to_transform: Option<Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            modules_to_save: None,
            use_rslora: false,
            bias: "none".into(),
            init_lora_weights: InitLoraWeights::Bool(true),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            fan_in_fan_out: false,
            task_type: None,
            use_dora: false,
            layers_to_transform: None,
        }
    }
}

/// The keys of `adapter_config.json` that peft writes and kiln reads or may ignore
/// (their values change nothing for LoRA as kiln runs it, or are checked below).
const IGNORED_KEYS: [&str; 16] = [
    "peft_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "layers_pattern",
    "exclude_modules",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "qalora_group_size",
    "ensure_weight_tying",
    "lora_ga_config",
];

/// Keys whose only value kiln accepts is "off" (null, false, empty): anything else
/// names a peft feature kiln does not implement.
const OFF_KEYS: [(&str, &str); 7] = [
    ("lora_bias", "a bias on lora_B (lora_bias)"),
    ("use_qalora", "QA-LoRA (use_qalora)"),
    (
        "target_parameters",
        "LoRA on parameters (target_parameters)",
    ),
    (
        "trainable_token_indices",
        "trainable tokens (trainable_token_indices)",
    ),
    ("layer_replication", "layer replication (layer_replication)"),
    (
        "alora_invocation_tokens",
        "activated LoRA (alora_invocation_tokens)",
    ),
    ("arrow_config", "Arrow routing (arrow_config)"),
];

fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

impl LoraConfig {
    /// Reads peft's `adapter_config.json` (its parsed object): every key kiln uses, the
    /// neutral rest ignored, a LoRA feature kiln lacks refused in one line.
    pub fn from_adapter_config(value: &Value) -> Result<Self> {
        let Value::Object(map) = value else {
            return Err(Error::Config("adapter_config.json is not an object".into()));
        };
        match map.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => {
                return Err(Error::Config(format!(
                    "adapter_config.json: peft_type {other:?}; kiln reads LoRA adapters (\"LORA\")"
                )));
            }
            None => return Err(Error::Config("adapter_config.json has no peft_type".into())),
        }
        let known = serde_json::to_value(LoraConfig::default()).unwrap_or(Value::Null);
        let mut keys = Map::new();
        for (k, v) in map {
            if IGNORED_KEYS.contains(&k.as_str()) {
                continue;
            }
            if let Some((_, what)) = OFF_KEYS.iter().find(|(n, _)| n == k) {
                if !is_off(v) {
                    return Err(Error::Config(format!(
                        "adapter_config.json uses {what}, which kiln does not implement"
                    )));
                }
                continue;
            }
            if known.get(k).is_none() {
                // Keys of newer peft versions: harmless when off, refused otherwise.
                if is_off(v) {
                    continue;
                }
                return Err(Error::Config(format!(
                    "adapter_config.json: {k} = {v} is a peft option kiln does not know"
                )));
            }
            // Nulls mean "peft's default" for the keys kiln knows too.
            if v.is_null() && k != "target_modules" && k != "modules_to_save" {
                continue;
            }
            keys.insert(k.clone(), v.clone());
        }
        let config: LoraConfig = serde_json::from_value(Value::Object(keys))
            .map_err(|e| Error::Config(format!("adapter_config.json: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values as peft does, and refuses what kiln does not implement.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.r == 0 {
            return bad("[peft] r must be a positive integer, got 0".into());
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return bad(format!(
                "[peft] rank_pattern {k:?}: the rank must be positive"
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "[peft] lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            ));
        }
        if !["none", "all", "lora_only"].contains(&self.bias.as_str()) {
            return bad(format!(
                "[peft] bias must be \"none\", \"all\" or \"lora_only\", got {:?}",
                self.bias
            ));
        }
        if self.use_dora {
            return bad("DoRA (use_dora) is not implemented in kiln; use plain LoRA".into());
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !is_off(v))
        {
            return bad(
                "layers_to_transform is not implemented in kiln; name the layers in target_modules (a regular expression)"
                    .into(),
            );
        }
        match &self.init_lora_weights {
            InitLoraWeights::Bool(_) => {}
            InitLoraWeights::Name(n) if n.eq_ignore_ascii_case("gaussian") => {}
            InitLoraWeights::Name(n) => {
                return bad(format!(
                    "init_lora_weights {n:?} is not implemented in kiln; it has true, false and \"gaussian\""
                ));
            }
        }
        for key in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            pattern_regex(key)?;
        }
        if let Some(Targets::Pattern(p)) = &self.target_modules
            && !p.eq_ignore_ascii_case(ALL_LINEAR)
        {
            full_regex(p)?;
        }
        Ok(())
    }

    /// The rank and alpha of module `name`: `rank_pattern` / `alpha_pattern` where a
    /// key matches (peft's `get_pattern_key`: the first key, in sorted order, that
    /// matches the end of the name), else `r` / `lora_alpha`.
    pub fn rank_and_alpha(&self, name: &str) -> (usize, f64) {
        let hit = |k: &&String| pattern_regex(k).is_ok_and(|re| re.is_match(name));
        let r = self
            .rank_pattern
            .iter()
            .find(|(k, _)| hit(k))
            .map_or(self.r, |(_, r)| *r);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| hit(k))
            .map_or(self.lora_alpha, |(_, a)| *a);
        (r, alpha)
    }

    /// `lora_alpha / r`, or `/ √r` with `use_rslora`.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// `adapter_config.json` as peft writes it for this adapter: every option, the
    /// resolved `target_modules`, `inference_mode` true.
    pub fn to_adapter_config(&self, resolved: &Resolved) -> Value {
        let number = |x: f64| {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                json!(x as i64)
            } else {
                json!(x)
            }
        };
        let targets = match &self.target_modules {
            Some(Targets::Pattern(p)) if !p.eq_ignore_ascii_case(ALL_LINEAR) => json!(p),
            Some(Targets::List(l)) => json!(l),
            // all-linear is saved as peft saves it: the module names it resolved to;
            // the model type's default as the list it stands for.
            Some(Targets::Pattern(_)) => json!(resolved.target_names),
            None => json!(resolved.default_targets),
        };
        let init = match &self.init_lora_weights {
            InitLoraWeights::Bool(b) => json!(b),
            InitLoraWeights::Name(n) => json!(n),
        };
        let alpha_pattern: Map<String, Value> = self
            .alpha_pattern
            .iter()
            .map(|(k, v)| (k.clone(), number(*v)))
            .collect();
        json!({
            "peft_type": "LORA",
            "task_type": resolved.task_type,
            "base_model_name_or_path": resolved.base_model_name_or_path,
            "revision": null,
            "r": self.r,
            "lora_alpha": number(self.lora_alpha),
            "lora_dropout": self.lora_dropout,
            "target_modules": targets,
            "exclude_modules": null,
            "modules_to_save": resolved.modules_to_save,
            "bias": self.bias,
            "fan_in_fan_out": resolved.fan_in_fan_out,
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "lora_bias": false,
            "init_lora_weights": init,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": alpha_pattern,
            "layers_to_transform": null,
            "layers_pattern": null,
            "inference_mode": true,
        })
    }
}

/// What a config came to on one model: the task type, the adapted layers' names, the
/// modules saved in full, where the base model lives.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolved {
    /// peft's task type (`SEQ_CLS`, `CAUSAL_LM`).
    pub task_type: String,
    /// The names of the adapted dense layers, in model order.
    pub target_names: Vec<String>,
    /// peft's default `target_modules` for the model type, when the config gave none.
    pub default_targets: Option<Vec<String>>,
    /// `modules_to_save` as saved (with the task's heads), `None` when empty.
    pub modules_to_save: Option<Vec<String>>,
    /// The base model's folder, as given.
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapted layers store their weight `[in, out]` (GPT-2).
    pub fan_in_fan_out: bool,
}

/// peft's shorthand for every dense layer but the output layer.
pub const ALL_LINEAR: &str = "all-linear";

/// peft's default `target_modules` for a `model_type`.
pub fn default_targets(model_type: &str) -> Option<Vec<String>> {
    let names: &[&str] = match model_type {
        "bert" => &["query", "value"],
        "gpt2" => &["c_attn"],
        "llama" | "mistral" | "qwen2" | "qwen3" => &["q_proj", "v_proj"],
        _ => return None,
    };
    Some(names.iter().map(|s| s.to_string()).collect())
}

/// A `target_modules` string: must match the whole name (`re.fullmatch`).
pub(crate) fn full_regex(pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        Error::Config(format!(
            "target_modules {pattern:?} is not a regular expression: {e}"
        ))
    })
}

/// A `rank_pattern` / `alpha_pattern` key: matches the end of a name after a dot
/// (`re.match(rf"(.*\.)?({key})$", name)`).
fn pattern_regex(key: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:.*\\.)?(?:{key})$")).map_err(|e| {
        Error::Config(format!(
            "rank_pattern/alpha_pattern key {key:?} is not a regular expression: {e}"
        ))
    })
}

/// Whether module `name` is (inside) a module to save: peft's
/// `re.match(rf"(^|.*\.){m}($|\..*)", name)`.
pub(crate) fn in_module(name: &str, module: &str) -> bool {
    name == module
        || name.ends_with(&format!(".{module}"))
        || name.starts_with(&format!("{module}."))
        || name.contains(&format!(".{module}."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_peft_matches_them() {
        let mut c = LoraConfig {
            r: 4,
            lora_alpha: 16.0,
            ..Default::default()
        };
        c.rank_pattern.insert("value".into(), 2);
        c.alpha_pattern.insert("layer\\.1\\..*query".into(), 3.0);
        assert_eq!(
            c.rank_and_alpha("bert.encoder.layer.0.attention.self.value"),
            (2, 16.0)
        );
        assert_eq!(
            c.rank_and_alpha("bert.encoder.layer.1.attention.self.query"),
            (4, 3.0)
        );
        assert_eq!(
            c.rank_and_alpha("bert.encoder.layer.0.attention.self.query"),
            (4, 16.0)
        );
        // A key matches whole components only.
        assert_eq!(c.rank_and_alpha("x.myvalue"), (4, 16.0));
        assert_eq!(c.scaling(4, 16.0), 4.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(4, 16.0), 8.0);
        assert!(in_module("classifier", "classifier"));
        assert!(in_module("base.classifier.dense", "classifier"));
        assert!(!in_module("myclassifier", "classifier"));
    }

    #[test]
    fn peft_configs_are_read_and_unsupported_features_refused() {
        let good = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"],
            "lora_bias": false, "use_dora": false, "peft_version": "0.21.2", "loftq_config": {},
            "layers_to_transform": null, "megatron_config": null, "task_type": "SEQ_CLS",
            "modules_to_save": ["classifier", "score"], "init_lora_weights": true});
        let c = LoraConfig::from_adapter_config(&good).unwrap();
        assert_eq!((c.r, c.lora_alpha), (4, 8.0));
        assert_eq!(c.target_modules, Some(Targets::List(vec!["query".into()])));
        for (key, value, words) in [
            ("use_dora", json!(true), "DoRA"),
            ("lora_bias", json!(true), "lora_bias"),
            ("init_lora_weights", json!("pissa"), "pissa"),
            ("layers_to_transform", json!([0]), "layers_to_transform"),
            ("peft_type", json!("IA3"), "IA3"),
            ("r", json!(0), "positive"),
            ("surprise", json!(1), "surprise"),
        ] {
            let mut v = good.clone();
            v[key] = value;
            let e = LoraConfig::from_adapter_config(&v).unwrap_err().to_string();
            assert!(e.contains(words), "{key}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
