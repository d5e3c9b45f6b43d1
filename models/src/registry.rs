//! The architecture registry: every architecture registers itself with `inventory`
//! under the class name that `config.json`'s `architectures` holds, so `kiln train`,
//! `eval` and `predict` build and load models by name, and a plugin crate adds one
//! without touching kiln (`tests/plugin-example` shows it).
//!
//! ```
//! let bert = kiln_models::registry::find("BertForSequenceClassification")?;
//! assert_eq!(bert.task, kiln_trainer::Task::SequenceClassification);
//! # Ok::<(), kiln_models::Error>(())
//! ```

use std::path::Path;

use candle_core::{Device, Tensor, Var};
use kiln_trainer::Task;
use kiln_trainer::model::{Batch, Model, Output};
use kiln_trainer::rng::Rng;
use kiln_trainer::weights::{LoadInfo, LoadRules};
use serde_json::Value;

use crate::{Error, Result};

/// A model that a registered architecture builds: a [`Model`] plus what `kiln predict`
/// asks of a model of its task.
pub trait TaskModel: Model {
    /// Greedy continuation of `input_ids` (`[1, seq]`) by `max_new_tokens` tokens,
    /// prompt included; causal language models implement it.
    fn generate_greedy(
        &self,
        input_ids: &Tensor,
        max_new_tokens: usize,
    ) -> candle_core::Result<Tensor> {
        let _ = (input_ids, max_new_tokens);
        Err(candle_core::Error::Msg(format!(
            "{} does not generate text",
            self.config()["architectures"][0]
                .as_str()
                .unwrap_or("this model")
        )))
    }
}

/// Builds a model afresh from its `config.json` keys, drawing its initialisation from
/// the generator.
pub type BuildFn = fn(config: &Value, rng: &mut Rng, device: &Device) -> Result<Box<dyn TaskModel>>;
/// Loads a model folder (a fresh task head where the folder has none, as
/// transformers' `from_pretrained`).
pub type LoadFn =
    fn(dir: &Path, rng: &mut Rng, device: &Device) -> Result<(Box<dyn TaskModel>, LoadInfo)>;

/// One registered architecture.
#[derive(Debug)]
#[non_exhaustive]
pub struct Architecture {
    /// The class name in `config.json`'s `architectures` (`GPT2LMHeadModel`).
    pub name: &'static str,
    /// What it trains for, which decides how data is read and batched.
    pub task: Task,
    /// The tokenizer family trained for it when no tokenizer is given (a name kiln-data's
    /// `TokenizerKind::for_architecture` knows: `bert` or `gpt2`).
    pub tokenizer: &'static str,
    /// Its `config.json` with every key at its default (the `[model]` keys it accepts).
    pub default_config: fn() -> Value,
    /// Builds a fresh model.
    pub build: BuildFn,
    /// Loads a model folder.
    pub load: LoadFn,
}

impl Architecture {
    /// An architecture to register with `inventory::submit!`.
    pub const fn new(
        name: &'static str,
        task: Task,
        tokenizer: &'static str,
        default_config: fn() -> Value,
        build: BuildFn,
        load: LoadFn,
    ) -> Self {
        Architecture {
            name,
            task,
            tokenizer,
            default_config,
            build,
            load,
        }
    }
}

inventory::collect!(Architecture);

/// Every architecture linked into this program, by name.
pub fn architectures() -> Vec<&'static Architecture> {
    let mut all: Vec<_> = inventory::iter::<Architecture>.into_iter().collect();
    all.sort_by_key(|a| a.name);
    all
}

/// The architecture registered as `name`; the error lists the registered names.
pub fn find(name: &str) -> Result<&'static Architecture> {
    let all = architectures();
    all.iter().copied().find(|a| a.name == name).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|a| a.name).collect();
        Error::Config(format!(
            "architecture {name:?} is not registered; this build has: {}",
            names.join(", ")
        ))
    })
}

/// The class name a model folder's `config.json` names first in `architectures`.
pub fn folder_architecture(config: &Value, dir: &Path) -> Result<String> {
    config["architectures"][0]
        .as_str()
        .map(String::from)
        .ok_or_else(|| {
            Error::Config(format!(
                "{}: config.json names no architectures",
                dir.display()
            ))
        })
}

/// A boxed model is a model: the trainer trains whatever the registry built.
impl Model for Box<dyn TaskModel> {
    fn forward(&self, batch: &Batch, train: Option<&mut Rng>) -> candle_core::Result<Output> {
        (**self).forward(batch, train)
    }
    fn parameters(&self) -> Vec<(String, Var)> {
        (**self).parameters()
    }
    fn config(&self) -> Value {
        (**self).config()
    }
    fn generation_config(&self) -> Option<Value> {
        (**self).generation_config()
    }
    fn tied_weights(&self) -> Vec<(String, String)> {
        (**self).tied_weights()
    }
    fn load_rules(&self) -> LoadRules {
        (**self).load_rules()
    }
    fn init_from(&self, dir: &Path) -> kiln_trainer::Result<LoadInfo> {
        (**self).init_from(dir)
    }
    fn map_parameters(
        &mut self,
        f: &mut dyn FnMut(&str, &Var) -> candle_core::Result<Var>,
    ) -> kiln_trainer::Result<()> {
        (**self).map_parameters(f)
    }
    fn no_weight_decay(&self, name: &str) -> bool {
        (**self).no_weight_decay(name)
    }
}
