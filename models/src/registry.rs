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

    /// Keeps a folder's `generation_config.json` (generative models save it again and
    /// generate with it); others ignore it.
    fn set_generation_config(&mut self, generation_config: Value) {
        let _ = generation_config;
    }

    /// Remembers the dtype the folder stored its weights in, for
    /// [`Model::saved_dtype`]; models that save as they train ignore it.
    fn set_stored_dtype(&mut self, dtype: candle_core::DType) {
        let _ = dtype;
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
    /// How its folders become GGUF (`kiln convert DIR OUT.gguf`); `None` where
    /// llama.cpp has no such architecture (BERT classifiers).
    pub gguf: Option<crate::gguf::GgufLayoutFn>,
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
            gguf: None,
        }
    }

    /// The same, exportable to GGUF through `layout`.
    pub const fn with_gguf(mut self, layout: crate::gguf::GgufLayoutFn) -> Self {
        self.gguf = Some(layout);
        self
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

/// What [`load_with`] loaded, and what it changed on the way.
#[derive(Debug)]
pub struct Loaded {
    /// The model.
    pub model: Box<dyn TaskModel>,
    /// How its weights were found.
    pub info: LoadInfo,
    /// One line for each thing a user should know: keys applied over the folder's
    /// config, a head initialised afresh.
    pub notes: Vec<String>,
}

/// Keys whose change gives a classifier another head (its size follows the labels).
const LABEL_KEYS: [&str; 3] = ["num_labels", "id2label", "label2id"];

/// Loads a model folder as `from_pretrained(dir, **overrides)` does: the `overrides`
/// (a run's `[model]` keys) replace the folder's `config.json` keys before the model is
/// built, so dropout rates and the like take effect; a new `num_labels`/`id2label` gets a
/// freshly initialised head (with a note); any other key that would change the shape of
/// a weight the folder holds is a one-line error naming the key and the weight. Without
/// overrides this is the architecture's own `load`.
pub fn load_with(
    arch: &Architecture,
    dir: &Path,
    overrides: &serde_json::Map<String, Value>,
    rng: &mut Rng,
    device: &Device,
) -> Result<Loaded> {
    if overrides.is_empty() {
        let (model, info) = (arch.load)(dir, rng, device)?;
        return Ok(Loaded {
            model,
            info,
            notes: Vec::new(),
        });
    }
    let folder = kiln_checkpoint::model::read_config(dir)?;
    let mut merged = folder.clone();
    let Value::Object(m) = &mut merged else {
        return Err(Error::Config(format!(
            "{}: config.json is not an object",
            dir.display()
        )));
    };
    let changed: Vec<&str> = overrides
        .iter()
        .filter(|(k, v)| m.get(*k) != Some(*v))
        .map(|(k, _)| k.as_str())
        .collect();
    let labels_changed = changed.iter().any(|k| LABEL_KEYS.contains(k));
    if labels_changed {
        // The new labels replace the old ones wholesale (a num_labels alone drops id2label).
        for k in LABEL_KEYS {
            m.remove(k);
        }
    }
    m.extend(overrides.clone());
    let mut model = (arch.build)(&merged, rng, device)?;
    let mut rules = model.load_rules();
    if labels_changed {
        rules.reinit = mismatched_heads(model.as_ref(), dir, &rules)?;
    }
    let info = kiln_trainer::weights::load_into(
        &model.parameters(),
        &model.tied_weights(),
        dir,
        &rules,
    )
    .map_err(|e| match e {
        kiln_trainer::Error::WeightShape(s) => Error::Config(format!(
            "[model] {} with init_from would change the shape of {} from the folder's {:?} to {:?}; \
             only keys that keep every loaded weight's shape can be given with init_from",
            changed.join(", "),
            s.name,
            s.found,
            s.expected
        )),
        other => other.into(),
    })?;
    if let Some(g) = crate::generation::read_generation_config(dir)? {
        model.set_generation_config(g);
    }
    if let Some(dtype) = stored_dtype(&info) {
        model.set_stored_dtype(dtype);
    }
    let mut notes = Vec::new();
    if !changed.is_empty() {
        notes.push(format!(
            "[model] keys over {}/config.json: {}",
            dir.display(),
            changed.join(", ")
        ));
    }
    if labels_changed && !info.fresh.is_empty() {
        notes.push(format!(
            "new labels: {} initialised afresh (the folder's head is dropped)",
            info.fresh.join(", ")
        ));
    }
    Ok(Loaded { model, info, notes })
}

/// The parameters that may be initialised afresh (the task head) whose shape differs
/// from the folder's tensor of that name: the head that new labels replace.
fn mismatched_heads(model: &dyn TaskModel, dir: &Path, rules: &LoadRules) -> Result<Vec<String>> {
    let file = kiln_formats::open(dir).map_err(kiln_checkpoint::Error::from)?;
    let prefix = rules.base_model_prefix.as_deref().map(|p| format!("{p}."));
    Ok(model
        .parameters()
        .into_iter()
        .filter(|(name, _)| rules.fresh.iter().any(|f| name.starts_with(f.as_str())))
        .filter(|(name, var)| {
            let stripped = prefix.as_deref().and_then(|p| name.strip_prefix(p));
            let found = file
                .info(name)
                .or_else(|| stripped.and_then(|n| file.info(n)));
            found.is_some_and(|t| t.shape != var.dims())
        })
        .map(|(name, _)| name)
        .collect())
}

/// The one float dtype every converted weight of a load had (`None`: the folder held
/// the trainer's f32, or a mix).
pub fn stored_dtype(info: &LoadInfo) -> Option<candle_core::DType> {
    let first = info.converted.first()?.1.as_str();
    if info.converted.iter().any(|(_, d)| d != first) {
        return None;
    }
    match first {
        "BF16" => Some(candle_core::DType::BF16),
        "F16" => Some(candle_core::DType::F16),
        "F64" => Some(candle_core::DType::F64),
        _ => None,
    }
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
    fn saved_dtype(&self) -> Option<candle_core::DType> {
        (**self).saved_dtype()
    }
    fn visit_dense(
        &mut self,
        f: kiln_trainer::adapter::DenseVisitor<'_>,
    ) -> kiln_trainer::Result<()> {
        (**self).visit_dense(f)
    }
    fn freeze(&mut self, frozen: &dyn Fn(&str) -> bool) -> kiln_trainer::Result<()> {
        (**self).freeze(frozen)
    }
    fn set_neftune_noise_alpha(&mut self, alpha: Option<f64>) -> bool {
        (**self).set_neftune_noise_alpha(alpha)
    }
    fn set_activation_checkpointing(&mut self, every_n_layers: Option<usize>) -> bool {
        (**self).set_activation_checkpointing(every_n_layers)
    }
    fn floating_point_ops(&self, batch: &Batch) -> f64 {
        (**self).floating_point_ops(batch)
    }
}

/// A boxed model is a task model (so that wrappers such as kiln-peft's adapters take one).
impl TaskModel for Box<dyn TaskModel> {
    fn generate_greedy(
        &self,
        input_ids: &Tensor,
        max_new_tokens: usize,
    ) -> candle_core::Result<Tensor> {
        (**self).generate_greedy(input_ids, max_new_tokens)
    }
    fn set_generation_config(&mut self, generation_config: Value) {
        (**self).set_generation_config(generation_config)
    }
    fn set_stored_dtype(&mut self, dtype: candle_core::DType) {
        (**self).set_stored_dtype(dtype)
    }
}

impl std::fmt::Debug for dyn TaskModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.config()["architectures"][0])
    }
}
