//! The configs of transformers' Llama-family causal LMs (`LlamaConfig`, `MistralConfig`,
//! `Qwen2Config`, `Qwen3Config`): one struct, each variant with its own keys and
//! defaults, read and written as transformers 5 does.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::rope::RopeParameters;
use crate::config::{self, TokenIds, check};
use crate::{Error, Result};

/// Which model of the family: the same code, a few switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlamaVariant {
    /// `LlamaForCausalLM` (Llama 2/3, SmolLM, TinyLlama): optional `attention_bias`,
    /// `mlp_bias`.
    Llama,
    /// `MistralForCausalLM`: Llama with a `sliding_window` on every layer.
    Mistral,
    /// `Qwen2ForCausalLM`: biases on the q/k/v projections; sliding layers by
    /// `layer_types`.
    Qwen2,
    /// `Qwen3ForCausalLM`: per-head RMSNorm on queries and keys before the rotation.
    Qwen3,
}

impl LlamaVariant {
    /// Every variant.
    pub const ALL: [LlamaVariant; 4] = [
        LlamaVariant::Llama,
        LlamaVariant::Mistral,
        LlamaVariant::Qwen2,
        LlamaVariant::Qwen3,
    ];

    /// transformers' class name (`architectures`).
    pub const fn architecture(self) -> &'static str {
        match self {
            LlamaVariant::Llama => "LlamaForCausalLM",
            LlamaVariant::Mistral => "MistralForCausalLM",
            LlamaVariant::Qwen2 => "Qwen2ForCausalLM",
            LlamaVariant::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// `config.json`'s `model_type`.
    pub const fn model_type(self) -> &'static str {
        match self {
            LlamaVariant::Llama => "llama",
            LlamaVariant::Mistral => "mistral",
            LlamaVariant::Qwen2 => "qwen2",
            LlamaVariant::Qwen3 => "qwen3",
        }
    }

    /// The variant of a `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.model_type() == model_type)
    }

    /// The config transformers 5.24 builds with no arguments, as its `to_dict` writes
    /// it (the keys of the file, less the file's own).
    fn defaults(self) -> Value {
        let common = json!({
            "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": null,
            "head_dim": null,
            "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
            "rms_norm_eps": 1e-6, "use_cache": true, "pad_token_id": null,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": false,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "attention_dropout": 0.0,
        });
        let specific = match self {
            LlamaVariant::Llama => json!({
                "attention_bias": false, "mlp_bias": false, "pretraining_tp": 1,
            }),
            LlamaVariant::Mistral => json!({
                "intermediate_size": 14336, "max_position_embeddings": 131072,
                "num_key_value_heads": 8, "sliding_window": 4096,
            }),
            LlamaVariant::Qwen2 | LlamaVariant::Qwen3 => {
                let mut q = json!({
                    "vocab_size": 151936, "intermediate_size": 22016,
                    "max_position_embeddings": 32768, "bos_token_id": null,
                    "eos_token_id": null, "sliding_window": 4096, "use_sliding_window": false,
                    "max_window_layers": 28, "num_key_value_heads": 32,
                });
                if self == LlamaVariant::Qwen3 {
                    q["attention_bias"] = Value::from(false);
                    q["head_dim"] = Value::from(128);
                }
                q
            }
        };
        let mut out = common;
        if let (Value::Object(o), Value::Object(s)) = (&mut out, specific) {
            o.extend(s);
        }
        out
    }

    /// The keys of this variant's config (others are the file's extra keys).
    fn has_key(self, key: &str) -> bool {
        match key {
            "attention_bias" => matches!(self, LlamaVariant::Llama | LlamaVariant::Qwen3),
            "mlp_bias" => self == LlamaVariant::Llama,
            "head_dim" => self != LlamaVariant::Qwen2,
            "sliding_window" => self != LlamaVariant::Llama,
            "use_sliding_window" | "max_window_layers" | "layer_types" => {
                matches!(self, LlamaVariant::Qwen2 | LlamaVariant::Qwen3)
            }
            _ => true,
        }
    }
}

/// transformers' Llama-family config, with its names, defaults (per variant) and JSON.
/// Keys kiln does not know (`pretraining_tp`, `quantization_config`, …) are kept in
/// [`LlamaConfig::extra`] and written back. Legacy rotary keys (4.x's `rope_theta` and
/// `rope_scaling`) are read into [`LlamaConfig::rope_parameters`], which is written as
/// transformers 5 writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Which model of the family.
    #[serde(skip, default = "default_variant")]
    pub variant: LlamaVariant,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// SwiGLU inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention; `None`: as many as query heads).
    pub num_key_value_heads: Option<usize>,
    /// Size of a head (`None`: `hidden_size / num_attention_heads`).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation (`silu`).
    pub hidden_act: String,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// Standard deviation of the initial weights.
    pub initializer_range: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Kept for transformers.
    pub use_cache: bool,
    /// Padding token id (the embedding's `padding_idx`).
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id(s).
    pub eos_token_id: Option<TokenIds>,
    /// `lm_head.weight` is `model.embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// The rotary embedding (`rope_type`, `rope_theta`, `factor`, …).
    pub rope_parameters: RopeParameters,
    /// Biases on the q/k/v/o projections (Llama, Qwen3; Qwen2 always has q/k/v biases).
    #[serde(default)]
    pub attention_bias: bool,
    /// Dropout on the attention probabilities.
    pub attention_dropout: f64,
    /// Biases on the MLP projections (Llama).
    #[serde(default)]
    pub mlp_bias: bool,
    /// Keys attended per query on sliding layers (Mistral: every layer).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen: whether `sliding_window` applies at all.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Qwen: layers from this index on slide (when `layer_types` is not given).
    #[serde(default)]
    pub max_window_layers: usize,
    /// Qwen: `full_attention` or `sliding_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Other keys of `config.json`, written back as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_variant() -> LlamaVariant {
    LlamaVariant::Llama
}

impl LlamaConfig {
    /// The default config of `variant` (transformers' `XConfig()`).
    pub fn default_for(variant: LlamaVariant) -> Self {
        // The defaults are valid JSON of this struct (tested).
        Self::from_json_as(&Value::Object(Map::new()), variant).unwrap_or_else(|_| {
            unreachable!("the built-in {} defaults parse", variant.model_type())
        })
    }

    /// Reads the `config.json` transformers wrote for `variant` (its `model_type`, if
    /// any, must match); absent keys take the variant's defaults.
    pub fn from_json_as(json: &Value, variant: LlamaVariant) -> Result<Self> {
        let Value::Object(file) = json else {
            return Err(Error::Config("a config must be a JSON object".into()));
        };
        let mut merged = variant.defaults();
        let mut file = file.clone();
        // 4.x spelling: rope_theta + rope_scaling, folded into rope_parameters as
        // transformers 5's `convert_rope_params_to_dict` does.
        let theta = file.remove("rope_theta");
        let scaling = file.remove("rope_scaling").filter(|s| !s.is_null());
        if let Some(scaling) = scaling
            && !file.contains_key("rope_parameters")
        {
            file.insert("rope_parameters".into(), scaling);
        }
        if let Some(Value::Object(rope)) = file.get_mut("rope_parameters") {
            if let Some(t) = theta.filter(|t| !t.is_null()) {
                rope.entry("rope_theta").or_insert(t);
            }
        } else if let Some(t) = theta.filter(|t| !t.is_null()) {
            file.insert(
                "rope_parameters".into(),
                json!({"rope_type": "default", "rope_theta": t}),
            );
        }
        if let Value::Object(m) = &mut merged {
            m.extend(file);
        }
        let mut c: LlamaConfig = config::read(&merged, variant.model_type())?;
        c.variant = variant;
        c.rope_parameters.standardize(c.max_position_embeddings);
        // transformers' __post_init__: Qwen drops the window unless it is used.
        if matches!(variant, LlamaVariant::Qwen2 | LlamaVariant::Qwen3) && !c.use_sliding_window {
            c.sliding_window = None;
        }
        // …and, like every variant's __post_init__, resolves the derived sizes.
        if matches!(variant, LlamaVariant::Qwen2 | LlamaVariant::Qwen3) && c.layer_types.is_none() {
            let types = (0..c.num_hidden_layers)
                .map(|i| match c.sliding_window {
                    Some(_) if i >= c.max_window_layers => "sliding_attention".to_string(),
                    _ => "full_attention".to_string(),
                })
                .collect();
            c.layer_types = Some(types);
        }
        if c.num_key_value_heads.is_none() {
            c.num_key_value_heads = Some(c.num_attention_heads);
        }
        if variant.has_key("head_dim") && c.head_dim.is_none() && c.num_attention_heads > 0 {
            c.head_dim = Some(c.hidden_size / c.num_attention_heads);
        }
        c.validate()?;
        Ok(c)
    }

    /// Reads a folder's `config.json`, the variant from its `model_type`.
    pub fn from_json(json: &Value) -> Result<Self> {
        let model_type = json["model_type"].as_str().unwrap_or("llama");
        let variant = LlamaVariant::from_model_type(model_type).ok_or_else(|| {
            Error::Config(format!(
                "model_type {model_type:?} is not one of llama, mistral, qwen2, qwen3"
            ))
        })?;
        Self::from_json_as(json, variant)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of one head.
    pub fn head_size(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether layer `i` attends through a sliding window, and its width.
    pub fn window(&self, layer: usize) -> Option<usize> {
        let window = self.sliding_window?;
        match self.variant {
            LlamaVariant::Llama => None,
            LlamaVariant::Mistral => Some(window),
            LlamaVariant::Qwen2 | LlamaVariant::Qwen3 => {
                let sliding = match &self.layer_types {
                    Some(types) => {
                        types.get(layer).map(String::as_str) == Some("sliding_attention")
                    }
                    None => layer >= self.max_window_layers,
                };
                sliding.then_some(window)
            }
        }
    }

    /// Whether the q/k/v projections have biases.
    pub fn qkv_bias(&self) -> bool {
        self.variant == LlamaVariant::Qwen2 || self.attention_bias
    }

    /// Whether `o_proj` has a bias.
    pub fn o_bias(&self) -> bool {
        self.variant != LlamaVariant::Qwen2 && self.attention_bias
    }

    /// Checks that kiln can build this config.
    pub fn validate(&self) -> Result<()> {
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        check(self.hidden_size > 0 && h > 0 && kv > 0, || {
            "hidden_size, num_attention_heads and num_key_value_heads must be positive".into()
        })?;
        check(
            self.head_dim.is_some() || self.hidden_size.is_multiple_of(h),
            || {
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {h}",
                    self.hidden_size
                )
            },
        )?;
        check(h.is_multiple_of(kv), || {
            format!("num_attention_heads {h} is not a multiple of num_key_value_heads {kv}")
        })?;
        check(
            self.head_size() >= 2 && self.head_size().is_multiple_of(2),
            || {
                format!(
                    "head_dim {} must be even for the rotary embedding",
                    self.head_size()
                )
            },
        )?;
        check(
            self.hidden_act == "silu" || self.hidden_act == "swish",
            || {
                format!(
                    "hidden_act {:?} is not supported (the family's MLP is SwiGLU: silu)",
                    self.hidden_act
                )
            },
        )?;
        check((0.0..=1.0).contains(&self.attention_dropout), || {
            format!(
                "attention_dropout must be in [0, 1], got {}",
                self.attention_dropout
            )
        })?;
        check(self.sliding_window != Some(0), || {
            "sliding_window must be at least 1".into()
        })?;
        if let Some(types) = &self.layer_types {
            check(types.len() == self.num_hidden_layers, || {
                format!(
                    "layer_types has {} entries for {} layers",
                    types.len(),
                    self.num_hidden_layers
                )
            })?;
            if let Some(bad) = types
                .iter()
                .find(|t| *t != "full_attention" && *t != "sliding_attention")
            {
                return Err(Error::Config(format!(
                    "layer_types entry {bad:?} is not supported (full_attention or sliding_attention)"
                )));
            }
        }
        if let Some(tp) = self.extra.get("pretraining_tp").and_then(Value::as_u64) {
            check(tp <= 1, || {
                format!(
                    "pretraining_tp {tp} is not supported (transformers 5 ignores it too; set 1)"
                )
            })?;
        }
        self.rope_parameters.validate()
    }

    /// The JSON transformers writes for this config (without `architectures` and
    /// `model_type`, which the model adds): this variant's keys and the extra ones.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.retain(|k, _| self.variant.has_key(k) || self.extra.contains_key(k));
            if self.variant.has_key("head_dim") {
                m.insert("head_dim".into(), Value::from(self.head_size()));
            }
            m.insert("num_key_value_heads".into(), Value::from(self.kv_heads()));
            if matches!(self.variant, LlamaVariant::Qwen2 | LlamaVariant::Qwen3) {
                let types: Vec<&str> = (0..self.num_hidden_layers)
                    .map(|i| match self.window(i) {
                        Some(_) => "sliding_attention",
                        None => "full_attention",
                    })
                    .collect();
                m.insert("layer_types".into(), Value::from(types));
            }
        }
        v
    }

    /// The number of parameters of this config (`None` if it overflows a u64).
    pub fn parameter_count(&self) -> Option<u64> {
        let (e, i, d) = (self.hidden_size, self.intermediate_size, self.head_size());
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        let qkv_bias = if self.qkv_bias() {
            h * d + 2 * kv * d
        } else {
            0
        };
        let norms = if self.variant == LlamaVariant::Qwen3 {
            2 * d
        } else {
            0
        };
        let layer = config::count(&[
            &[e, h, d],
            &[e, 2, kv, d],
            &[h, d, e],
            &[qkv_bias],
            &[3, e, i],
            &[2, e],
            &[norms],
        ])?;
        let head = if self.tie_word_embeddings {
            0
        } else {
            config::count(&[&[self.vocab_size, e]])?
        };
        config::count(&[&[self.vocab_size, e], &[e]])?
            .checked_add(layer.checked_mul(self.num_hidden_layers as u64)?)?
            .checked_add(head)
    }

    /// `generation_config.json` as transformers derives it from the model config.
    pub fn generation_config(&self) -> Value {
        let mut g = Map::new();
        g.insert("_from_model_config".into(), Value::from(true));
        if let Some(b) = self.bos_token_id {
            g.insert("bos_token_id".into(), Value::from(b));
        }
        if let Some(e) = &self.eos_token_id {
            g.insert(
                "eos_token_id".into(),
                serde_json::to_value(e).unwrap_or(Value::Null),
            );
        }
        g.insert("output_attentions".into(), Value::from(false));
        g.insert("output_hidden_states".into(), Value::from(false));
        if let Some(p) = self.pad_token_id {
            g.insert("pad_token_id".into(), Value::from(p));
        }
        g.insert("use_cache".into(), Value::from(self.use_cache));
        Value::Object(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_valid_defaults_that_round_trip() {
        for v in LlamaVariant::ALL {
            let c = LlamaConfig::default_for(v);
            assert_eq!(c.variant, v);
            let again = LlamaConfig::from_json_as(&c.to_json(), v).unwrap();
            assert_eq!(again, c, "{v:?}");
        }
        let mistral = LlamaConfig::default_for(LlamaVariant::Mistral);
        assert_eq!((mistral.kv_heads(), mistral.window(3)), (8, Some(4096)));
        let qwen = LlamaConfig::default_for(LlamaVariant::Qwen2);
        assert_eq!(qwen.window(30), None, "no window unless use_sliding_window");
        assert!(qwen.to_json().get("head_dim").is_none());
    }

    #[test]
    fn legacy_rope_keys_become_rope_parameters() {
        let c = LlamaConfig::from_json(&json!({
            "model_type": "llama", "rope_theta": 500000.0,
            "rope_scaling": {"type": "linear", "factor": 2.0},
        }))
        .unwrap();
        let rope = serde_json::to_value(&c.rope_parameters).unwrap();
        assert_eq!(rope["rope_type"], "linear");
        assert_eq!(rope["rope_theta"], 500000.0);
        assert_eq!(rope["factor"], 2.0);
        let out = c.to_json();
        assert!(out.get("rope_theta").is_none() && out.get("rope_scaling").is_none());
    }

    #[test]
    fn impossible_configs_are_one_line_errors() {
        let bad = |j: Value| LlamaConfig::from_json(&j).unwrap_err().to_string();
        assert!(
            bad(json!({"num_attention_heads": 6, "num_key_value_heads": 4})).contains("multiple")
        );
        assert!(bad(json!({"hidden_act": "gelu"})).contains("SwiGLU"));
        assert!(bad(json!({"model_type": "gpt2"})).contains("not one of"));
        assert!(
            bad(json!({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}})).contains("yarn")
        );
    }
}
