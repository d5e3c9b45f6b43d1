//! What the configs of kiln's models share: reading the JSON transformers writes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// One token id or several (transformers allows a list for `eos_token_id`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids, in order.
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// transformers' `problem_type` of a sequence classifier: which loss it computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemType {
    /// Mean squared error on f32 labels (`num_labels == 1` implies it).
    Regression,
    /// Cross-entropy on integer class ids, ignoring -100.
    SingleLabelClassification,
    /// Binary cross-entropy with logits on f32 multi-hot labels.
    MultiLabelClassification,
}

/// Keys of `config.json` that describe the file rather than the architecture; they are
/// not kept as extra keys (kiln writes its own).
const FILE_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "kiln_version",
    "_name_or_path",
];

/// Reads a config of `model_type` from the JSON transformers wrote (extra keys are kept
/// by the config's flattened map; the file's own keys are dropped).
pub(crate) fn read<T: DeserializeOwned>(json: &Value, model_type: &str) -> Result<T> {
    let Value::Object(map) = json else {
        return Err(Error::Config(format!(
            "a {model_type} config must be a JSON object"
        )));
    };
    if let Some(found) = map.get("model_type")
        && found.as_str() != Some(model_type)
    {
        return Err(Error::Config(format!(
            "config.json has model_type {found}, expected \"{model_type}\""
        )));
    }
    let mut map = map.clone();
    for key in FILE_KEYS {
        map.remove(*key);
    }
    serde_json::from_value(Value::Object(map))
        .map_err(|e| Error::Config(format!("{model_type} config: {e}")))
}

/// Takes the label keys out of a config's extra keys: the labels (`id2label` in index
/// order, or `LABEL_i` for `num_labels`), or `None` when the config gives neither.
pub(crate) fn take_labels(extra: &mut Map<String, Value>) -> Result<Option<Vec<String>>> {
    let count = match extra
        .remove("num_labels")
        .or_else(|| extra.remove("_num_labels"))
    {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n >= 1)
                .ok_or_else(|| Error::Config(format!("num_labels must be at least 1, got {v}")))?
                as usize,
        ),
    };
    extra.remove("label2id");
    let labels = match extra.remove("id2label") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            let mut pairs = Vec::with_capacity(m.len());
            for (k, v) in m {
                let i: usize = k
                    .parse()
                    .map_err(|_| Error::Config(format!("id2label key {k:?} is not an index")))?;
                let label = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                pairs.push((i, label));
            }
            pairs.sort();
            if pairs.iter().enumerate().any(|(n, (i, _))| n != *i) {
                return Err(Error::Config(
                    "id2label keys must be the indices 0, 1, … without gaps".into(),
                ));
            }
            Some(pairs.into_iter().map(|(_, l)| l).collect::<Vec<_>>())
        }
        Some(other) => {
            return Err(Error::Config(format!(
                "id2label must be an object, got {other}"
            )));
        }
    };
    Ok(match (count, labels) {
        (Some(n), Some(l)) if l.len() == n => Some(l),
        (Some(n), _) => Some(default_labels(n)),
        (None, Some(l)) if !l.is_empty() => Some(l),
        (None, _) => None,
    })
}

/// transformers' default labels: `LABEL_0`, `LABEL_1`, …
pub(crate) fn default_labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("LABEL_{i}")).collect()
}

/// `id2label` and `label2id` as transformers writes them (string keys "0", "1", …).
pub(crate) fn label_maps(labels: &[String]) -> (Value, Value) {
    let id2label: Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), Value::from(l.clone())))
        .collect();
    let label2id: Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), Value::from(i)))
        .collect();
    (Value::Object(id2label), Value::Object(label2id))
}

/// `config()`'s JSON: `architectures` and `model_type` first, then the config's keys.
pub(crate) fn with_file_keys(architecture: &str, model_type: &str, keys: Value) -> Value {
    let mut out = Map::new();
    out.insert("architectures".into(), Value::from(vec![architecture]));
    out.insert("model_type".into(), Value::from(model_type));
    if let Value::Object(m) = keys {
        out.extend(m);
    }
    Value::Object(out)
}

/// An error unless `ok`.
pub(crate) fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Config(what()))
    }
}

/// A parameter count from a config's sizes: `Σ factors` of products, in u64 with
/// overflow checks (`None` when it does not fit).
pub(crate) fn count(terms: &[&[usize]]) -> Option<u64> {
    terms.iter().try_fold(0u64, |sum, factors| {
        let product = factors
            .iter()
            .try_fold(1u64, |p, &f| p.checked_mul(u64::try_from(f).ok()?))?;
        sum.checked_add(product)
    })
}

/// Refuses, before anything is allocated, a model whose parameters (f32, `count` of
/// them; `None`: more than a u64 counts) would not fit in the memory of `device`, as
/// its backend reports it (a CPU's is the machine's). A hostile or mistaken
/// `config.json` (a vocabulary of 2^40 tokens) then gets one clear line instead of an
/// allocation failure that aborts the process. Devices without memory figures are only
/// checked for overflow.
pub(crate) fn check_size(
    model: &str,
    count: Option<u64>,
    device: &candle_core::Device,
) -> Result<()> {
    let bytes = count.and_then(|c| c.checked_mul(4));
    let Some(bytes) = bytes else {
        return Err(Error::Config(format!(
            "the {model} config describes more parameters than can be counted (over 2^62): \
             refusing to build it"
        )));
    };
    let ordinal = match device.location() {
        candle_core::DeviceLocation::Cpu => 0,
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        candle_core::DeviceLocation::Metal { gpu_id } => gpu_id,
    };
    let total = kiln_trainer::precision::backend_for(device)
        .and_then(|b| b.devices().into_iter().find(|d| d.ordinal == ordinal))
        .and_then(|d| d.memory_total);
    if let Some(total) = total
        && bytes > total
    {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(Error::Config(format!(
            "the {model} config describes {} parameters ({:.1} GiB in f32), more than the \
             {:.1} GiB of memory of {device:?}: refusing to build it",
            count.unwrap_or(0),
            gib(bytes),
            gib(total)
        )));
    }
    Ok(())
}
