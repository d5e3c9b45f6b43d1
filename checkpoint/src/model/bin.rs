//! `.bin` model weights with tied names on one storage, as transformers writes them.
//!
//! transformers' `.bin` keeps both names of a tie (`lm_head.weight` and
//! `transformer.wte.weight`) on one storage, and `huggingface_hub` shards it by
//! storage: a tied name goes into the shard of its source and its size is not counted
//! again. kiln does the same: the shards are planned over the untied tensors, each
//! tied name joins its source's shard, and the torch writer is handed one state dict
//! per shard in which the tied name's tensor views its source's storage.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_formats::shard::{self, SavedWeights};
use kiln_formats::torch::{self, StorageSource, TensorRef, Value};
use kiln_formats::{Format, TensorCollection, TensorInfo};
use serde_json::json;

use super::tied::Ties;
use crate::Result;

/// Storages read from the weights by name: the storage key is the name of the tensor
/// (the source, for tied names) whose bytes it holds.
struct ByName<'a>(&'a dyn TensorCollection);

impl StorageSource for ByName<'_> {
    fn storage_bytes(&self, key: &str) -> kiln_formats::Result<Cow<'_, [u8]>> {
        Ok(self.0.tensor(key)?.into_data())
    }
}

/// Writes `weights` (every name, tied ones included, in parameter order) into `dir` as
/// `pytorch_model.bin` or shards plus `pytorch_model.bin.index.json`, each tied name on
/// its source's storage, and removes the weight files of earlier saves.
pub(super) fn save(
    dir: &Path,
    weights: &dyn TensorCollection,
    ties: &Ties,
    max_shard_size: u64,
) -> Result<SavedWeights> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let infos = weights.tensors();
    let untied: Vec<TensorInfo> = infos
        .iter()
        .filter(|t| !ties.is_tied(&t.name))
        .cloned()
        .collect();
    let plan = shard::plan(&untied, max_shard_size);
    let n = plan.len();
    let mut shard_of: HashMap<&str, usize> = HashMap::new();
    for (i, members) in plan.iter().enumerate() {
        for &k in members {
            shard_of.insert(&untied[k].name, i);
        }
    }
    // (name, storage key) per shard, in parameter order.
    let mut shards: Vec<Vec<(&TensorInfo, &str)>> = vec![Vec::new(); n];
    for info in infos {
        let key = ties.source_of(&info.name).unwrap_or(&info.name);
        let i = shard_of.get(key).copied().ok_or_else(|| {
            crate::Error::Invalid(format!(
                "tied tensor {:?} has no source to share",
                info.name
            ))
        })?;
        shards[i].push((info, key));
    }

    let source = ByName(weights);
    let mut files = Vec::with_capacity(n);
    let mut weight_map = serde_json::Map::new();
    for (i, entries) in shards.iter().enumerate() {
        let name = shard::shard_name(Format::PyTorch, i, n);
        let path = dir.join(&name);
        let state_dict = Value::OrderedDict(
            entries
                .iter()
                .map(|(info, key)| {
                    let t = TensorRef::contiguous(*key, info.dtype, info.shape.clone());
                    (Value::String(info.name.clone()), Value::Tensor(Box::new(t)))
                })
                .collect(),
        );
        torch::save_value(&path, &state_dict, &source)?;
        for (info, _) in entries {
            weight_map.insert(info.name.clone(), json!(name));
        }
        files.push(path);
    }
    let index = if n > 1 {
        let params = untied.iter().map(|t| t.numel() as u64).sum();
        let bytes = untied.iter().map(|t| t.nbytes() as u64).sum();
        Some(shard::write_index(
            dir,
            Format::PyTorch,
            weight_map,
            params,
            bytes,
        )?)
    } else {
        None
    };
    let keep: Vec<&Path> = files
        .iter()
        .map(PathBuf::as_path)
        .chain(index.as_deref())
        .collect();
    let removed = shard::remove_stale(dir, &keep)?;
    Ok(SavedWeights {
        files,
        index,
        removed,
    })
}
