//! Adapter folders, as peft's `PeftModel.save_pretrained` writes them: the adapter's
//! weights in `adapter_model.safetensors` (metadata `{"format": "pt"}`; or
//! `adapter_model.bin`) and its configuration in `adapter_config.json`, and no
//! `config.json`: the base model lives elsewhere (`base_model_name_or_path`).
//!
//! A save is an adapter save when its config holds `peft_type`; loading reads an
//! adapter folder when it has `adapter_config.json` and no `config.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_formats::Format;
use kiln_formats::shard::SavedWeights;
use serde_json::Value;

use super::tied::{Inner, Selection};
use super::{ModelSave, SaveOptions, SavedModel, write_json};
use crate::{Error, Result};

/// peft's adapter configuration file.
pub const ADAPTER_CONFIG_NAME: &str = "adapter_config.json";
/// peft's adapter weights (safetensors).
pub const ADAPTER_WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// peft's adapter weights (torch pickle).
pub const ADAPTER_WEIGHTS_BIN_NAME: &str = "adapter_model.bin";

/// Whether `config` is an adapter's configuration (it names a `peft_type`).
pub fn is_adapter_config(config: &Value) -> bool {
    config.get("peft_type").is_some_and(Value::is_string)
}

/// Whether `dir` is an adapter folder: `adapter_config.json` and no `config.json`.
pub fn is_adapter_folder(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG_NAME).is_file() && !dir.join(super::CONFIG_NAME).is_file()
}

/// The adapter's weights file in `dir`: safetensors first, as peft looks.
pub fn adapter_weights_path(dir: &Path) -> Result<PathBuf> {
    [ADAPTER_WEIGHTS_NAME, ADAPTER_WEIGHTS_BIN_NAME]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Incomplete {
            path: dir.to_path_buf(),
            reason: format!("no {ADAPTER_WEIGHTS_NAME} or {ADAPTER_WEIGHTS_BIN_NAME}"),
        })
}

/// Writes an adapter folder (see the module docs): one weights file, never sharded
/// (peft does not shard adapters), with no tied weights; an earlier full model's
/// weights and `config.json` in the folder are removed.
pub(super) fn save(dir: &Path, model: &ModelSave<'_>, options: &SaveOptions) -> Result<SavedModel> {
    if !model.tied.is_empty() {
        return Err(Error::Invalid(
            "an adapter has no tied weights; tie them in the base model".into(),
        ));
    }
    if model.generation_config.is_some() {
        return Err(Error::Invalid(
            "an adapter folder has no generation_config.json; it belongs to the base model".into(),
        ));
    }
    super::check_file_names(&model.tokenizer_files)?;
    for (name, _) in &model.tokenizer_files {
        if name.starts_with("adapter_") {
            return Err(Error::Invalid(format!(
                "tokenizer file {name:?} would overwrite a file of the adapter itself"
            )));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_path = dir.join(ADAPTER_CONFIG_NAME);
    write_json(&config_path, &model.config)?;

    let format = options.format();
    let (name, stale) = match format {
        Format::Safetensors => (ADAPTER_WEIGHTS_NAME, ADAPTER_WEIGHTS_BIN_NAME),
        Format::PyTorch => (ADAPTER_WEIGHTS_BIN_NAME, ADAPTER_WEIGHTS_NAME),
    };
    let metadata = match format {
        Format::Safetensors => BTreeMap::from([("format".to_string(), "pt".to_string())]),
        Format::PyTorch => BTreeMap::new(),
    };
    let mut weights = Selection::new(Inner::Borrowed(model.weights), metadata);
    for info in model.weights.tensors() {
        weights.push(info.clone(), &info.name);
    }
    let path = dir.join(name);
    match format {
        Format::Safetensors => kiln_formats::safetensors::save(&path, &weights)?,
        Format::PyTorch => kiln_formats::torch::save(&path, &weights)?,
    }
    // The files of an earlier save there go, as for full saves: the adapter's other
    // format, and a full model's weights and config.json (beside which the folder
    // would not read as an adapter).
    let mut removed = kiln_formats::shard::remove_stale(dir, &[&path])?;
    for stale in [dir.join(stale), dir.join(super::CONFIG_NAME)] {
        if stale.is_file() {
            std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
            removed.push(stale);
        }
    }

    let (tokenizer_files, training_args) = super::write_extras(dir, model)?;
    super::sync_dir(dir)?;
    Ok(SavedModel {
        config: config_path,
        generation_config: None,
        weights: SavedWeights {
            files: vec![path],
            index: None,
            removed,
        },
        dropped_tied: Vec::new(),
        tokenizer_files,
        training_args,
    })
}

/// Reads an adapter folder's `adapter_config.json` (a JSON object with a `peft_type`).
pub fn read_adapter_config(dir: impl AsRef<Path>) -> Result<Value> {
    let dir = dir.as_ref();
    let path = dir.join(ADAPTER_CONFIG_NAME);
    if !path.is_file() {
        return Err(Error::Incomplete {
            path: dir.to_path_buf(),
            reason: format!("no {ADAPTER_CONFIG_NAME}"),
        });
    }
    let value = super::read_json_object(&path)?;
    if !is_adapter_config(&value) {
        return Err(Error::json(
            &path,
            "no \"peft_type\" (a string such as \"LORA\")",
        ));
    }
    Ok(value)
}

/// The files of an adapter saved earlier in `dir`, which a full model's save removes
/// (with them beside it, the folder would still be taken for that adapter by peft).
pub(super) fn remove_stale_adapter(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for name in [
        ADAPTER_CONFIG_NAME,
        ADAPTER_WEIGHTS_NAME,
        ADAPTER_WEIGHTS_BIN_NAME,
    ] {
        let p = dir.join(name);
        if p.is_file() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            removed.push(p);
        }
    }
    Ok(removed)
}
