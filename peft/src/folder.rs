//! Adapter folders onto their base model: kiln's own (`save_model` of a LoRA run, its
//! checkpoints) and peft's (`PeftModel.save_pretrained`).
//!
//! The base model is `base` when given, else the folder's `base_model_name_or_path`,
//! which must then be a local model folder (kiln reaches no hub).

use std::path::{Path, PathBuf};

use candle_core::Device;
use kiln_checkpoint::model as ckpt;
use kiln_models::registry::{self, Architecture, TaskModel};
use kiln_trainer::Task;
use kiln_trainer::rng::Rng;
use serde_json::{Map, Value};

use crate::{Error, LoraConfig, PeftModel, Result};

/// An adapter folder loaded onto its base.
#[derive(Debug)]
pub struct LoadedAdapter {
    /// The model, adapter weights loaded.
    pub model: PeftModel<Box<dyn TaskModel>>,
    /// The base model's architecture.
    pub architecture: &'static Architecture,
    /// The base model's folder.
    pub base_dir: PathBuf,
}

/// Whether `dir` is an adapter folder (`adapter_config.json`, no `config.json`).
pub fn is_adapter(dir: &Path) -> bool {
    ckpt::is_adapter_folder(dir)
}

/// The base model folder of the adapter in `dir`: `base`, else its
/// `base_model_name_or_path` (resolved against the current directory, then against the
/// adapter's own folder).
pub fn base_dir(dir: &Path, base: Option<&Path>) -> Result<PathBuf> {
    match base {
        Some(b) => Ok(b.to_path_buf()),
        None => named_base(dir, &ckpt::read_adapter_config(dir)?),
    }
}

/// The base folder an adapter's config (`config`, of the adapter in `dir`) names.
fn named_base(dir: &Path, config: &Value) -> Result<PathBuf> {
    let named = saved_base(config).ok_or_else(|| {
        Error::Config(format!(
            "{}: adapter_config.json names no base_model_name_or_path; give the base model with --base DIR",
            dir.display()
        ))
    })?;
    let candidates = [PathBuf::from(&named), dir.join(&named)];
    candidates
        .into_iter()
        .find(|p| p.join(ckpt::CONFIG_NAME).is_file())
        .ok_or_else(|| {
            Error::Config(format!(
                "{}: the base model {named:?} is not a local model folder; give it with --base DIR",
                dir.display()
            ))
        })
}

/// `base_model_name_or_path`, when the config names one.
fn saved_base(config: &Value) -> Option<String> {
    config
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The number of labels of the classifier head an adapter saved (`modules_to_save`),
/// when it has one: a classifier fine-tuned on new labels saves a head of another size
/// than its base's, which is then built with that many labels (their names live in no
/// adapter file: predictions are label indices then).
fn head_labels(dir: &Path) -> Result<Option<usize>> {
    let file = kiln_formats::open(ckpt::adapter_weights_path(dir)?)?;
    Ok(["classifier", "score"].iter().find_map(|head| {
        file.info(&format!("{}{head}.weight", crate::PREFIX))
            .and_then(|i| i.shape.first().copied())
    }))
}

/// A classifier config's number of labels, as transformers counts it.
fn labels_of(config: &Value) -> usize {
    match (config.get("id2label"), config.get("num_labels")) {
        (Some(Value::Object(m)), _) => m.len(),
        (_, Some(n)) => n.as_u64().unwrap_or(2) as usize,
        _ => 2,
    }
}

/// Builds the base model of `base_dir` (its config keys replaced by `overrides`, as
/// [`registry::load_with`] does) with the adapter described by `config` (fresh adapter
/// weights from `rng`); `saved_base` is recorded as `base_model_name_or_path`.
pub fn on_base(
    base_dir: &Path,
    config: LoraConfig,
    saved_base: Option<String>,
    overrides: &Map<String, Value>,
    rng: &mut Rng,
    device: &Device,
) -> Result<(PeftModel<Box<dyn TaskModel>>, &'static Architecture)> {
    let base_config = ckpt::read_config(base_dir)?;
    let architecture = registry::find(&registry::folder_architecture(&base_config, base_dir)?)?;
    let expected = match architecture.task {
        Task::SequenceClassification => "SEQ_CLS",
        Task::CausalLm => "CAUSAL_LM",
    };
    if let Some(t) = &config.task_type
        && t != expected
    {
        return Err(Error::Config(format!(
            "the adapter's task_type is {t}, but its base {} is a {} model ({expected})",
            architecture.name,
            base_dir.display()
        )));
    }
    let base = registry::load_with(architecture, base_dir, overrides, rng, device)?.model;
    let saved = saved_base.or_else(|| Some(base_dir.display().to_string()));
    let model = PeftModel::new(base, config, architecture.task, saved, rng)?;
    Ok((model, architecture))
}

/// Loads the adapter folder `dir` onto its base model (see the module docs).
pub fn load(
    dir: &Path,
    base: Option<&Path>,
    rng: &mut Rng,
    device: &Device,
) -> Result<LoadedAdapter> {
    load_with(dir, base, &Map::new(), rng, device)
}

/// [`load`], the base model's config keys replaced by `overrides` (a run's `[model]`
/// keys: dropout rates and the like).
pub fn load_with(
    dir: &Path,
    base: Option<&Path>,
    overrides: &Map<String, Value>,
    rng: &mut Rng,
    device: &Device,
) -> Result<LoadedAdapter> {
    let adapter_config = ckpt::read_adapter_config(dir)?;
    let config = LoraConfig::from_adapter_config(&adapter_config)?;
    let base_dir = match base {
        Some(b) => b.to_path_buf(),
        None => named_base(dir, &adapter_config)?,
    };
    let saved = saved_base(&adapter_config);
    let mut overrides = overrides.clone();
    let labels_given = ["num_labels", "id2label"]
        .iter()
        .any(|k| overrides.contains_key(*k));
    if !labels_given && let Some(n) = head_labels(dir)? {
        let base_config = ckpt::read_config(&base_dir)?;
        if n != labels_of(&base_config) {
            overrides.insert("num_labels".into(), Value::from(n));
        }
    }
    let (model, architecture) = on_base(&base_dir, config, saved, &overrides, rng, device)?;
    kiln_trainer::Model::init_from(&model, dir)?;
    Ok(LoadedAdapter {
        model,
        architecture,
        base_dir,
    })
}
