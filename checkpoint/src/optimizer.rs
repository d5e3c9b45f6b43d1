//! Optimizer state stored by parameter name, so it survives a change of parameter order
//! and can be consolidated across ranks.
//!
//! The file is `optimizer.safetensors`: one tensor per (parameter, slot), named
//! `<parameter>.<slot>` (`bert.pooler.dense.weight.exp_avg`); slot names contain no
//! dot, so the split is unambiguous. Everything else — the optimizer's kind, its
//! hyper-parameters, step counts — is JSON in the file's metadata under
//! `kiln.optimizer`, next to `format: kiln-optimizer`.
//!
//! transformers writes `optimizer.pt` (torch's `state_dict`, keyed by parameter
//! *index*); kiln does not, because indices break as soon as parameters are added,
//! removed or reordered, and a kiln run cannot resume torch's optimizer anyway.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_formats::{TensorCollection, TensorMap, TensorView};

use crate::{Error, Result};

/// The file name in a checkpoint.
pub const OPTIMIZER_NAME: &str = "optimizer.safetensors";
const FORMAT_TAG: &str = "kiln-optimizer";
const META_KEY: &str = "kiln.optimizer";

/// An optimizer's state: per-parameter tensors by name, plus JSON for the rest.
#[derive(Debug, Clone, Default)]
pub struct OptimizerState {
    /// The optimizer (`"adamw"`, `"sgd"`).
    pub kind: String,
    /// Hyper-parameters and scalar state (learning rate, betas, step count, …).
    pub meta: serde_json::Value,
    slots: BTreeMap<String, BTreeMap<String, TensorView<'static>>>,
}

impl OptimizerState {
    /// An empty state for optimizer `kind`.
    pub fn new(kind: impl Into<String>) -> Self {
        OptimizerState {
            kind: kind.into(),
            meta: serde_json::Value::Null,
            slots: BTreeMap::new(),
        }
    }

    /// Sets the JSON part.
    pub fn with_meta(mut self, meta: serde_json::Value) -> Self {
        self.meta = meta;
        self
    }

    /// Stores `slot` (e.g. `exp_avg`) of parameter `param`.
    pub fn insert(
        &mut self,
        param: impl Into<String>,
        slot: impl Into<String>,
        tensor: TensorView<'static>,
    ) -> Result<()> {
        let slot = slot.into();
        if slot.is_empty() || slot.contains('.') {
            return Err(Error::Invalid(format!(
                "optimizer slot name {slot:?} must be non-empty and dot-free"
            )));
        }
        self.slots
            .entry(param.into())
            .or_default()
            .insert(slot, tensor);
        Ok(())
    }

    /// The tensor of `slot` for `param`.
    pub fn get(&self, param: &str, slot: &str) -> Option<&TensorView<'static>> {
        self.slots.get(param)?.get(slot)
    }

    /// Parameter names that have state, sorted.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    /// Slots of one parameter, sorted by slot name.
    pub fn slots(&self, param: &str) -> impl Iterator<Item = (&str, &TensorView<'static>)> {
        self.slots
            .get(param)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v))
    }

    /// Total bytes of the tensors.
    pub fn nbytes(&self) -> u64 {
        self.slots
            .values()
            .flat_map(|s| s.values())
            .map(|t| t.data().len() as u64)
            .sum()
    }

    /// The tensors and metadata as they go into the file.
    fn to_map(&self) -> Result<TensorMap<'_>> {
        let mut map = TensorMap::new();
        for (param, slots) in &self.slots {
            for (slot, t) in slots {
                let view = TensorView::new(t.dtype(), t.shape().to_vec(), t.data())?;
                map.insert(format!("{param}.{slot}"), view)?;
            }
        }
        let meta = serde_json::json!({"kind": self.kind, "meta": self.meta});
        map.set_metadata("format", FORMAT_TAG);
        map.set_metadata(META_KEY, meta.to_string());
        Ok(map)
    }

    /// Writes the state to `path` (safetensors, atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        Ok(kiln_formats::safetensors::save(path, &self.to_map()?)?)
    }

    /// Reads a state that [`save`](Self::save) wrote.
    pub fn load(path: &Path) -> Result<Self> {
        let file = kiln_formats::safetensors::SafetensorsFile::open(path)?;
        let bad = |m: String| Error::json(path, m);
        if file.metadata().get("format").map(String::as_str) != Some(FORMAT_TAG) {
            return Err(bad(format!(
                "not a kiln optimizer state (metadata format != {FORMAT_TAG:?})"
            )));
        }
        let meta_text = file
            .metadata()
            .get(META_KEY)
            .ok_or_else(|| bad(format!("metadata has no {META_KEY:?}")))?;
        let meta: serde_json::Value =
            serde_json::from_str(meta_text).map_err(|e| bad(format!("{META_KEY}: {e}")))?;
        let kind = meta["kind"]
            .as_str()
            .ok_or_else(|| bad(format!("{META_KEY}: no \"kind\"")))?
            .to_string();
        let mut state = OptimizerState::new(kind).with_meta(meta["meta"].clone());
        for info in file.tensors() {
            let (param, slot) = info
                .name
                .rsplit_once('.')
                .ok_or_else(|| bad(format!("tensor {:?} is not <parameter>.<slot>", info.name)))?;
            state.insert(param, slot, file.tensor(&info.name)?.into_owned())?;
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_formats::DType;

    #[test]
    fn round_trips_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(OPTIMIZER_NAME);
        let mut s = OptimizerState::new("adamw")
            .with_meta(serde_json::json!({"lr": 1e-3, "step": 7, "betas": [0.9, 0.999]}));
        let t = |v: u8| TensorView::new(DType::F32, vec![2], vec![v; 8]).unwrap();
        s.insert("encoder.layer.0.weight", "exp_avg", t(1)).unwrap();
        s.insert("encoder.layer.0.weight", "exp_avg_sq", t(2))
            .unwrap();
        s.insert("head.bias", "exp_avg", t(3)).unwrap();
        assert!(s.insert("x", "a.b", t(0)).is_err());
        s.save(&p).unwrap();
        let back = OptimizerState::load(&p).unwrap();
        assert_eq!(back.kind, "adamw");
        assert_eq!(back.meta, s.meta);
        assert_eq!(
            back.params().collect::<Vec<_>>(),
            ["encoder.layer.0.weight", "head.bias"]
        );
        assert_eq!(
            back.get("encoder.layer.0.weight", "exp_avg_sq"),
            Some(&t(2))
        );
        assert_eq!(back.nbytes(), 24);
    }

    #[test]
    fn refuses_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let mut m = TensorMap::new();
        m.insert("w", TensorView::new(DType::U8, vec![1], vec![0]).unwrap())
            .unwrap();
        kiln_formats::safetensors::save(&p, &m).unwrap();
        let e = OptimizerState::load(&p).unwrap_err().to_string();
        assert!(e.contains("not a kiln optimizer state"), "{e}");
    }
}
