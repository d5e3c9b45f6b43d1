//! The run config: what `kiln train`, `kiln eval` and `kiln predict` read.
//!
//! A run is described by a TOML config with three tables (a fourth, `[peft]`, for
//! LoRA: [`PeftSection`]), spelled as transformers spells things:
//!
//! ```toml
//! [model]
//! architecture = "BertForSequenceClassification"   # a registered class name
//! hidden_size = 64                                 # any key of that config.json
//! # init_from = "path/to/a/saved/model"            # instead: fine-tune a saved model
//!
//! [data]                                           # kiln_data::DataArgs
//! train_file = "cli/bundled/sentiment/train.jsonl"
//! validation_file = "cli/bundled/sentiment/validation.jsonl"
//!
//! [training]                                       # TrainingArguments fields
//! output_dir = "out"
//! ```
//!
//! Every field can also be set with a flag (`--save_steps 10`, `--train_file x.jsonl`,
//! `--hidden_size 32`): a `TrainingArguments` field first, then a `[data]` key, else a
//! `[model]` key. Relative paths resolve against the current directory, as in
//! transformers' example scripts. The bundled default run
//! ([`RunConfig::bundled_default`]) is embedded in the binary: its data files are used
//! where a kiln checkout has them, and written out of the binary otherwise, so `kiln
//! train` works from anywhere.

use std::path::{Path, PathBuf};

use kiln_data::DataArgs;
use kiln_trainer::TrainingArguments;
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};

/// The bundled default config (`cli/bundled/bert-sentiment.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../bundled/bert-sentiment.toml");

/// The bundled default run's data files: their path in the config, their content.
const BUNDLED_DATA: [(&str, &str); 2] = [
    (
        "cli/bundled/sentiment/train.jsonl",
        include_str!("../bundled/sentiment/train.jsonl"),
    ),
    (
        "cli/bundled/sentiment/validation.jsonl",
        include_str!("../bundled/sentiment/validation.jsonl"),
    ),
];

/// The `[model]` table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelSection {
    /// The transformers class name (`BertForSequenceClassification`, `GPT2LMHeadModel`).
    pub architecture: Option<String>,
    /// A saved model folder to start from (its config and weights; its tokenizer too);
    /// also spelled `model_name_or_path`, as in transformers' scripts.
    pub init_from: Option<String>,
    /// The other keys: that architecture's `config.json` keys (with `init_from`, they
    /// override the folder's, as `from_pretrained(dir, **kwargs)` does).
    pub keys: Map<String, Value>,
}

/// The `[peft]` table: LoRA fine-tuning, with peft's `LoraConfig` names (`r`,
/// `lora_alpha`, `target_modules`, …; see [`kiln_peft::LoraConfig`]) plus `use_peft`.
/// The table turns LoRA on unless `use_peft = false`; the TRL-spelled flags set it too
/// (`--use_peft true --lora_r 16 --lora_alpha 32 --lora_dropout 0.05
/// --lora_target_modules q_proj,v_proj` or `all-linear`, `--lora_modules_to_save`,
/// `--use_rslora`, `--use_dora`, `--lora_task_type`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeftSection {
    /// `use_peft`: on or off; unset, on when the table has keys.
    pub use_peft: Option<bool>,
    /// The `LoraConfig` keys given.
    pub keys: Map<String, Value>,
}

impl PeftSection {
    /// Whether the run trains LoRA adapters.
    pub fn enabled(&self) -> bool {
        self.use_peft.unwrap_or(!self.keys.is_empty())
    }

    /// The LoRA options (peft's defaults for the keys not given).
    pub fn lora_config(&self) -> Result<kiln_peft::LoraConfig> {
        let config: kiln_peft::LoraConfig =
            serde_json::from_value(Value::Object(self.keys.clone()))
                .map_err(|e| Error::Config(format!("[peft]: {e}")))?;
        config
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(config)
    }

    /// Sets one flag in TRL's spelling; `false` when `name` is no peft flag.
    fn set(&mut self, name: &str, value: &str) -> Result<bool> {
        let bool_of = |v: &str| {
            v.parse::<bool>()
                .map_err(|_| Error::Config(format!("--{name} takes true or false, got {v:?}")))
        };
        let list = |v: &str| -> Value {
            json!(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
            )
        };
        let (key, parsed) = match name {
            "use_peft" => {
                self.use_peft = Some(bool_of(value)?);
                return Ok(true);
            }
            "lora_r" => ("r", parse_json_like(&json!(0), value)),
            "lora_alpha" | "lora_dropout" => (name, parse_json_like(&json!(0), value)),
            "lora_target_modules" if value.eq_ignore_ascii_case(kiln_peft::ALL_LINEAR) => {
                ("target_modules", json!(value))
            }
            "lora_target_modules" => ("target_modules", list(value)),
            "lora_modules_to_save" => ("modules_to_save", list(value)),
            "use_rslora" | "use_dora" => (name, json!(bool_of(value)?)),
            "lora_task_type" => ("task_type", json!(value)),
            _ => return Ok(false),
        };
        self.keys.insert(key.to_string(), parsed);
        Ok(true)
    }
}

/// A whole run: model, data and training arguments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunConfig {
    /// `[model]`.
    pub model: ModelSection,
    /// `[peft]`.
    pub peft: PeftSection,
    /// The base model of an adapter folder given as `init_from` (`--base DIR`), when
    /// not its `base_model_name_or_path`.
    pub base: Option<String>,
    /// `[data]`.
    pub data: DataArgs,
    /// `[training]`.
    pub training: TrainingArguments,
    /// transformers arguments that were set but change nothing here, each with why
    /// (`kiln_trainer::parity`); printed once when the run starts.
    pub notices: Vec<String>,
}

fn toml_to_json(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => json!(i),
        toml::Value::Float(f) => json!(f),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

impl RunConfig {
    /// Parses a config's text (`origin` names it in errors).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let table: toml::Table = text
            .parse()
            .map_err(|e| Error::Config(format!("{origin}: {}", one_line(&e))))?;
        let mut cfg = RunConfig::default();
        for (section, value) in table {
            let toml::Value::Table(t) = value else {
                return Err(Error::Config(format!(
                    "{origin}: {section} must be a table ([{section}])"
                )));
            };
            let obj: Map<String, Value> =
                t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect();
            match section.as_str() {
                "model" => {
                    let mut keys = obj;
                    let take = |keys: &mut Map<String, Value>, k: &str| -> Result<Option<String>> {
                        match keys.remove(k) {
                            None => Ok(None),
                            Some(Value::String(s)) => Ok(Some(s)),
                            Some(v) => Err(Error::Config(format!(
                                "{origin}: [model] {k} must be a string, got {v}"
                            ))),
                        }
                    };
                    cfg.model.architecture = take(&mut keys, "architecture")?;
                    cfg.model.init_from = take(&mut keys, "init_from")?;
                    // transformers' example scripts call it model_name_or_path.
                    if let Some(dir) = take(&mut keys, "model_name_or_path")? {
                        cfg.model.init_from = Some(dir);
                    }
                    cfg.model.keys = keys;
                }
                "data" => {
                    cfg.data = serde_json::from_value(Value::Object(obj))
                        .map_err(|e| Error::Config(format!("{origin}: [data]: {e}")))?;
                }
                "peft" => {
                    let mut keys = obj;
                    cfg.peft.use_peft = match keys.remove("use_peft") {
                        None => None,
                        Some(Value::Bool(b)) => Some(b),
                        Some(v) => {
                            return Err(Error::Config(format!(
                                "{origin}: [peft] use_peft must be true or false, got {v}"
                            )));
                        }
                    };
                    cfg.peft.keys = keys;
                    cfg.peft
                        .lora_config()
                        .map_err(|e| Error::Config(format!("{origin}: {e}")))?;
                }
                "training" => {
                    let mut obj = obj;
                    for f in kiln_trainer::parity::FIELDS {
                        if let Some(v) = obj.remove(f.name) {
                            cfg.note_transformers_field(f, &v)
                                .map_err(|e| Error::Config(format!("{origin}: [training] {e}")))?;
                        }
                    }
                    cfg.training = serde_json::from_value(Value::Object(obj))
                        .map_err(|e| Error::Config(format!("{origin}: [training]: {e}")))?;
                }
                other => {
                    return Err(Error::Config(format!(
                        "{origin}: unknown table [{other}]; a config has [model], [data], [training] and [peft]"
                    )));
                }
            }
        }
        Ok(cfg)
    }

    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The bundled default: a small BERT sentiment classifier on the bundled
    /// sentiment set. Its data files are read where the config names them when they
    /// exist there (the current directory is a kiln checkout), and otherwise from copies
    /// that this binary writes out of itself into [`bundled_data_dir`].
    pub fn bundled_default() -> Result<Self> {
        let mut cfg = Self::from_toml(DEFAULT_CONFIG, "cli/bundled/bert-sentiment.toml")?;
        for file in [&mut cfg.data.train_file, &mut cfg.data.validation_file] {
            if let Some(f) = file
                && !Path::new(f).exists()
            {
                *f = materialize(f)?.display().to_string();
            }
        }
        Ok(cfg)
    }

    /// Sets one field from a flag: a training argument, else a `[data]` key, else
    /// (`init_from`, `architecture` or) a `[model]` key.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        if TrainingArguments::has_field(name) {
            return Ok(self.training.set(name, value)?);
        }
        if let Some(f) = kiln_trainer::parity::field(name) {
            let v = kiln_trainer::parity::parse(f, value);
            return self
                .note_transformers_field(f, &v)
                .map_err(|e| Error::Config(format!("--{e}")));
        }
        let data = serde_json::to_value(&self.data).map_err(|e| Error::Config(e.to_string()))?;
        if let Some(current) = data.get(name) {
            let parsed = parse_json_like(current, value);
            let mut obj = data.as_object().cloned().unwrap_or_default();
            obj.insert(name.to_string(), parsed);
            self.data = serde_json::from_value(Value::Object(obj))
                .map_err(|e| Error::Config(format!("--{name} {value}: {e}")))?;
            return Ok(());
        }
        if self.peft.set(name, value)? {
            return Ok(());
        }
        match name {
            "base" => self.base = Some(value.to_string()),
            "architecture" => self.model.architecture = Some(value.to_string()),
            "init_from" | "model_name_or_path" => self.model.init_from = Some(value.to_string()),
            _ if self.model.keys.contains_key(name) || is_model_config_key(name) => {
                let current = self.model.keys.get(name).cloned().unwrap_or(Value::Null);
                self.model
                    .keys
                    .insert(name.to_string(), parse_json_like(&current, value));
            }
            _ => {
                return Err(Error::Config(format!(
                    "unknown flag --{name}: not a training argument, a [data] key nor a key of the model's config"
                )));
            }
        }
        Ok(())
    }
}

impl RunConfig {
    /// A transformers argument kiln has no field for: its default passes, a value that
    /// changes nothing is noted (once per field), a refused one is the error's line.
    fn note_transformers_field(
        &mut self,
        f: &kiln_trainer::parity::Field,
        v: &Value,
    ) -> std::result::Result<(), String> {
        self.notices
            .retain(|n| !n.starts_with(&format!("{} ", f.name)));
        if let Some(line) = kiln_trainer::parity::check(f, v)? {
            self.notices.push(line);
        }
        Ok(())
    }
}

/// Whether `name` is a `config.json` key of a registered architecture (or one every
/// transformers config has), so that a mistyped flag is an error rather than a silently
/// ignored model key.
fn is_model_config_key(name: &str) -> bool {
    const COMMON: [&str; 8] = [
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
    ];
    COMMON.contains(&name)
        || kiln_models::registry::architectures()
            .iter()
            .any(|a| (a.default_config)().get(name).is_some())
}

/// Where the bundled default run's data files are written when the current directory
/// has none: `<temp>/kiln-bundled-<version>/`.
pub fn bundled_data_dir() -> PathBuf {
    std::env::temp_dir().join(format!("kiln-bundled-{}", env!("CARGO_PKG_VERSION")))
}

/// The bundled file that the default config names `name`, written into
/// [`bundled_data_dir`] unless a copy with the same bytes is there (written to a
/// temporary name and renamed, so that concurrent runs never read half a file).
fn materialize(name: &str) -> Result<PathBuf> {
    let (_, text) = BUNDLED_DATA
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| Error::Config(format!("{name}: not a bundled file")))?;
    let rel = name.strip_prefix("cli/bundled/").unwrap_or(name);
    let path = bundled_data_dir().join(rel);
    if std::fs::read(&path).is_ok_and(|b| b == text.as_bytes()) {
        return Ok(path);
    }
    let io = |p: &Path, e: std::io::Error| Error::Config(format!("{}: {e}", p.display()));
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    Ok(path)
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A flag's text as JSON: a number, a boolean, JSON, or else a string.
fn parse_json_like(current: &Value, text: &str) -> Value {
    if current.is_string() {
        return Value::String(text.to_string());
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}
