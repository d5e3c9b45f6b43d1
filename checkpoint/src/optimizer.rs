//! Optimizer state stored by parameter name, so it survives a change of parameter order
//! and can be consolidated across ranks.
//!
//! The file is `optimizer.safetensors`: one tensor per (parameter, slot), named
//! `<parameter>.<slot>` (`bert.pooler.dense.weight.exp_avg`); slot names contain no
//! dot, so the split is unambiguous. Everything else — the optimizer's kind, its
//! hyper-parameters, step counts — is JSON in the file's metadata under
//! `kiln.optimizer`, next to `format: kiln-optimizer`.
//!
//! # Sharded state (ZeRO stage 1)
//!
//! When every rank of a data-parallel run keeps the state of only its own parameters,
//! each writes `optimizer.rank<r>-of-<w>.safetensors` ([`sharded_optimizer_name`]) with
//! the same layout. Parameters are never split between ranks, so consolidating is the
//! union of the shards ([`OptimizerState::merge`]) and re-splitting for another world
//! size is a selection by name ([`OptimizerState::retain`]); [`load_optimizer`] reads
//! whichever form a checkpoint holds.
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
/// The shard of rank `rank` among `world_size` in a checkpoint with sharded optimizer
/// state: `optimizer.rank<r>-of-<w>.safetensors`.
pub fn sharded_optimizer_name(rank: usize, world_size: usize) -> String {
    format!("optimizer.rank{rank}-of-{world_size}.safetensors")
}

/// `(rank, world_size)` of a shard's file name; `None` for any other name.
pub fn parse_sharded_optimizer_name(name: &str) -> Option<(usize, usize)> {
    let rest = name
        .strip_prefix("optimizer.rank")?
        .strip_suffix(".safetensors")?;
    let (r, w) = rest.split_once("-of-")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(r) || !digits(w) {
        return None;
    }
    let (r, w) = (r.parse().ok()?, w.parse().ok()?);
    (r < w).then_some((r, w))
}

/// The optimizer state of checkpoint folder `dir`, consolidated: `optimizer.safetensors`
/// if present, else the union of a complete set of `optimizer.rank<r>-of-<w>` shards;
/// `None` when the checkpoint has no optimizer state. A partial set of shards, shards
/// of two world sizes, or shards that disagree (kind, step) are refused.
pub fn load_optimizer(dir: &Path) -> Result<Option<OptimizerState>> {
    let whole = dir.join(OPTIMIZER_NAME);
    if whole.exists() {
        return OptimizerState::load(&whole).map(Some);
    }
    let mut found: BTreeMap<usize, usize> = BTreeMap::new();
    let mut world = None;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((r, w)) = parse_sharded_optimizer_name(&name) {
            if world.is_some_and(|ws| ws != w) {
                return Err(Error::Invalid(format!(
                    "{}: optimizer shards of two world sizes ({} and {w})",
                    dir.display(),
                    world.unwrap_or(w)
                )));
            }
            world = Some(w);
            found.insert(r, w);
        }
    }
    let Some(world) = world else {
        return Ok(None);
    };
    if found.len() != world {
        let missing: Vec<String> = (0..world)
            .filter(|r| !found.contains_key(r))
            .map(|r| sharded_optimizer_name(r, world))
            .collect();
        return Err(Error::Invalid(format!(
            "{}: optimizer state is sharded over {world} ranks but {} is missing",
            dir.display(),
            missing.join(", ")
        )));
    }
    let mut merged: Option<OptimizerState> = None;
    for r in 0..world {
        let shard = OptimizerState::load(&dir.join(sharded_optimizer_name(r, world)))?;
        merged = Some(match merged {
            None => shard,
            Some(mut m) => {
                m.merge(shard).map_err(|e| match e {
                    Error::Invalid(msg) => Error::Invalid(format!("{}: {msg}", dir.display())),
                    other => other,
                })?;
                m
            }
        });
    }
    Ok(merged)
}

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

    /// Adds the parameters of another rank's shard (consolidation). Both must be the
    /// same optimizer at the same step, and no parameter may be in both. The JSON lists
    /// that name parameters (`no_decay`) are joined; other JSON must agree.
    pub fn merge(&mut self, other: OptimizerState) -> Result<()> {
        if other.kind != self.kind {
            return Err(Error::Invalid(format!(
                "optimizer shards disagree: {:?} and {:?}",
                self.kind, other.kind
            )));
        }
        let (mut mine, theirs) = (self.meta.clone(), other.meta.clone());
        let mut joined = Vec::new();
        if let (Some(a), Some(b)) = (mine.as_object_mut(), theirs.as_object()) {
            for (k, v) in b {
                match (a.get_mut(k), v) {
                    (Some(serde_json::Value::Array(x)), serde_json::Value::Array(y))
                        if k == "no_decay" =>
                    {
                        x.extend(y.iter().cloned());
                        joined.push(k.clone());
                    }
                    // The parameter order: shards hold consecutive parameters, merged
                    // in rank order.
                    (Some(serde_json::Value::Array(x)), serde_json::Value::Array(y))
                        if k == "params" =>
                    {
                        x.extend(
                            y.iter()
                                .filter(|n| !x.contains(n))
                                .cloned()
                                .collect::<Vec<_>>(),
                        );
                    }
                    (Some(x), y) if x == y => {}
                    (Some(x), y) => {
                        return Err(Error::Invalid(format!(
                            "optimizer shards disagree on {k:?}: {x} and {y}"
                        )));
                    }
                    (None, y) => {
                        a.insert(k.clone(), y.clone());
                    }
                }
            }
        } else if mine != theirs {
            return Err(Error::Invalid(
                "optimizer shards disagree on their metadata".into(),
            ));
        }
        for k in joined {
            if let Some(serde_json::Value::Array(x)) = mine.get_mut(&k) {
                x.sort_by_key(|v| v.to_string());
                x.dedup();
            }
        }
        for (param, slots) in other.slots {
            if self.slots.contains_key(&param) {
                return Err(Error::Invalid(format!(
                    "parameter {param:?} has state in two optimizer shards"
                )));
            }
            self.slots.insert(param, slots);
        }
        self.meta = mine;
        Ok(())
    }

    /// Keeps only the parameters for which `keep` is true (re-splitting consolidated
    /// state for one rank); the `no_decay` and `params` lists in the JSON are filtered
    /// the same way.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.slots.retain(|param, _| keep(param));
        for key in ["no_decay", "params"] {
            if let Some(serde_json::Value::Array(list)) = self.meta.get_mut(key) {
                list.retain(|v| v.as_str().is_some_and(&mut keep));
            }
        }
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
