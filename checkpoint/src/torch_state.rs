//! The training state as transformers' Trainer keeps it beside the weights of a
//! `checkpoint-N`, in torch's files, so that either framework resumes the other's
//! checkpoints:
//!
//! | file | holds |
//! |---|---|
//! | `optimizer.pt` | torch's `AdamW` (or `SGD`) `state_dict()`: per-parameter `step`, `exp_avg`, `exp_avg_sq` by index, and the two parameter groups of transformers' `create_optimizer` |
//! | `scheduler.pt` | `LambdaLR.state_dict()`: the schedule's position (`last_epoch`) |
//! | `scaler.pt` | `GradScaler.state_dict()` (fp16) |
//!
//! They are written with kiln's torch-zip writer (`torch.load(weights_only=True)` loads
//! them) and read with its weights-only reader, which executes nothing. Parameters are
//! numbered as transformers numbers them: group 0 holds the trainable parameters with
//! weight decay, group 1 those without, each in the model's `named_parameters()` order
//! ([`transformers_groups`]); the files carry indices, not names, so the reader is given
//! the model's parameters to name them. `rng_state.pth` (torch's, Python's and numpy's
//! generators) is not written: kiln's generators are its own, and transformers resumes
//! without the file.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_formats::torch::{StorageMap, TorchFile, Value};
use kiln_formats::{DType, TensorView};
use serde_json::json;

use crate::optimizer::OptimizerState;
use crate::{Error, Result};

/// `optimizer.pt`.
pub const OPTIMIZER_PT_NAME: &str = "optimizer.pt";
/// `scheduler.pt`.
pub const SCHEDULER_PT_NAME: &str = "scheduler.pt";
/// `scaler.pt`.
pub const SCALER_PT_NAME: &str = "scaler.pt";

/// The file of torch's generator states transformers writes for `rank` of `world_size`
/// processes: `rng_state.pth`, or `rng_state_<rank>.pth` with several.
pub fn rng_state_pth_name(rank: usize, world_size: usize) -> String {
    if world_size <= 1 {
        "rng_state.pth".into()
    } else {
        format!("rng_state_{rank}.pth")
    }
}

/// transformers' two parameter groups for `params` (name, whether weight decay
/// applies), in order: the names with decay, then those without.
pub fn transformers_groups(params: &[(String, bool)]) -> [Vec<String>; 2] {
    let pick = |decay: bool| {
        params
            .iter()
            .filter(|(_, d)| *d == decay)
            .map(|(n, _)| n.clone())
            .collect()
    };
    [pick(true), pick(false)]
}

/// Which torch optimizer a state dict is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TorchKind {
    /// `torch.optim.AdamW`.
    AdamW {
        /// `betas`.
        betas: (f64, f64),
        /// `eps`.
        eps: f64,
        /// `fused` (`adamw_torch_fused`: true; `adamw_torch`: false or unset).
        fused: Option<bool>,
    },
    /// `torch.optim.SGD` without momentum.
    Sgd,
}

/// One parameter group of a torch optimizer.
#[derive(Clone, Debug, PartialEq)]
pub struct TorchGroup {
    /// The learning rate of the next step.
    pub lr: f64,
    /// The schedule's base learning rate (`initial_lr`, set by torch's schedulers).
    pub initial_lr: Option<f64>,
    /// Weight decay of the group.
    pub weight_decay: f64,
    /// Parameter indices.
    pub params: Vec<usize>,
}

/// One parameter's optimizer state (AdamW's; SGD without momentum keeps none).
#[derive(Clone, Debug, PartialEq)]
pub struct TorchParamState {
    /// Steps taken for this parameter.
    pub step: f64,
    /// The first moment.
    pub exp_avg: TensorView<'static>,
    /// The second moment.
    pub exp_avg_sq: TensorView<'static>,
}

/// torch's optimizer `state_dict()`, as `optimizer.pt` holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct TorchOptimizer {
    /// The optimizer and its hyper-parameters.
    pub kind: TorchKind,
    /// The parameter groups.
    pub groups: Vec<TorchGroup>,
    /// Per-parameter state, by index.
    pub state: BTreeMap<usize, TorchParamState>,
}

fn meta_f64(state: &OptimizerState, key: &str) -> Result<f64> {
    state.meta[key]
        .as_f64()
        .ok_or_else(|| Error::Invalid(format!("optimizer state: no {key:?} in its metadata")))
}

fn meta_names(state: &OptimizerState, key: &str) -> Result<Vec<String>> {
    state.meta[key]
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| Error::Invalid(format!("optimizer state: no {key:?} list in its metadata")))
}

impl TorchOptimizer {
    /// kiln's optimizer state as torch's: its metadata must name the parameters in
    /// order (`params`), those without decay (`no_decay`), the `step` and the learning
    /// rate `lr` of the next step (`initial_lr`, the schedule's base, defaults to it);
    /// AdamW's also `betas` and `eps` (and `torch_fused`, written as `fused`).
    pub fn from_kiln(state: &OptimizerState) -> Result<Self> {
        let kind = match state.kind.as_str() {
            "adamw" => {
                let betas = state.meta["betas"]
                    .as_array()
                    .and_then(|b| Some((b.first()?.as_f64()?, b.get(1)?.as_f64()?)))
                    .ok_or_else(|| Error::Invalid("optimizer state: no betas".into()))?;
                TorchKind::AdamW {
                    betas,
                    eps: meta_f64(state, "eps")?,
                    fused: state.meta["torch_fused"].as_bool(),
                }
            }
            "sgd" => TorchKind::Sgd,
            other => {
                return Err(Error::Invalid(format!(
                    "optimizer {other:?} has no torch state dict kiln can write"
                )));
            }
        };
        let order = meta_names(state, "params")?;
        let no_decay = meta_names(state, "no_decay")?;
        let decayed: Vec<(String, bool)> = order
            .iter()
            .map(|n| (n.clone(), !no_decay.contains(n)))
            .collect();
        let lr = meta_f64(state, "lr")?;
        let initial_lr = meta_f64(state, "initial_lr").unwrap_or(lr);
        let step = meta_f64(state, "step")?;
        let wd = meta_f64(state, "weight_decay")?;
        let mut groups = Vec::new();
        let mut index = 0;
        let mut per_param = BTreeMap::new();
        for (g, names) in transformers_groups(&decayed).iter().enumerate() {
            let mut params = Vec::new();
            for name in names {
                if let (Some(m), Some(v)) =
                    (state.get(name, "exp_avg"), state.get(name, "exp_avg_sq"))
                {
                    per_param.insert(
                        index,
                        TorchParamState {
                            step,
                            exp_avg: m.clone(),
                            exp_avg_sq: v.clone(),
                        },
                    );
                }
                params.push(index);
                index += 1;
            }
            groups.push(TorchGroup {
                lr,
                initial_lr: Some(initial_lr),
                weight_decay: if g == 0 { wd } else { 0.0 },
                params,
            });
        }
        Ok(TorchOptimizer {
            kind,
            groups,
            state: per_param,
        })
    }

    /// The state as kiln's optimizer takes it, naming the indices by transformers'
    /// groups of `params` (the model's trainable parameters in order, each with whether
    /// weight decay applies). Group sizes that differ from the model's, tensors of the
    /// wrong shape count, or per-parameter step counts that differ (kiln's AdamW keeps
    /// one) are refused.
    pub fn to_kiln(&self, params: &[(String, bool)]) -> Result<OptimizerState> {
        let groups = transformers_groups(params);
        let sizes: Vec<usize> = self.groups.iter().map(|g| g.params.len()).collect();
        let ours = [groups[0].len(), groups[1].len()];
        if sizes != ours {
            return Err(Error::Invalid(format!(
                "its parameter groups hold {sizes:?} parameters, and this model's (with weight \
                 decay, without, as transformers groups them) {ours:?}: it was saved for \
                 another model or another set of trainable parameters"
            )));
        }
        let mut names: BTreeMap<usize, &str> = BTreeMap::new();
        for (group, names_of) in self.groups.iter().zip(&groups) {
            for (index, name) in group.params.iter().zip(names_of) {
                names.insert(*index, name);
            }
        }
        let kind = match self.kind {
            TorchKind::AdamW { .. } => "adamw",
            TorchKind::Sgd => "sgd",
        };
        let mut steps = self.state.values().map(|s| s.step);
        let step = steps.next().unwrap_or(0.0);
        if let Some(other) = steps.find(|s| *s != step) {
            return Err(Error::Invalid(format!(
                "its parameters have taken different numbers of steps ({step} and {other}); \
                 kiln's AdamW keeps one step count for all"
            )));
        }
        let (betas, eps, fused) = match self.kind {
            TorchKind::AdamW { betas, eps, fused } => {
                (json!([betas.0, betas.1]), json!(eps), json!(fused))
            }
            TorchKind::Sgd => (
                serde_json::Value::Null,
                serde_json::Value::Null,
                serde_json::Value::Null,
            ),
        };
        let mut out = OptimizerState::new(kind).with_meta(json!({
            "step": step as u64,
            "betas": betas,
            "eps": eps,
            "weight_decay": self.groups.first().map_or(0.0, |g| g.weight_decay),
            "no_decay": groups[1],
            "params": params.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            "torch_fused": fused,
        }));
        for (index, s) in &self.state {
            let name = names.get(index).ok_or_else(|| {
                Error::Invalid(format!("state of parameter {index}, which no group holds"))
            })?;
            out.insert(*name, "exp_avg", s.exp_avg.clone())?;
            out.insert(*name, "exp_avg_sq", s.exp_avg_sq.clone())?;
        }
        Ok(out)
    }

    /// Writes `optimizer.pt` at `path`, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut storages = StorageMap::new();
        let mut state = Vec::new();
        for (index, s) in &self.state {
            let key = |slot: &str| format!("{index}.{slot}");
            let step = TensorView::new(DType::F32, vec![], (s.step as f32).to_le_bytes().to_vec())?;
            state.push((
                Value::Int(*index as i64),
                Value::Dict(vec![
                    (text("step"), storages.insert_tensor(key("step"), step)),
                    (
                        text("exp_avg"),
                        storages.insert_tensor(key("exp_avg"), borrowed(&s.exp_avg)?),
                    ),
                    (
                        text("exp_avg_sq"),
                        storages.insert_tensor(key("exp_avg_sq"), borrowed(&s.exp_avg_sq)?),
                    ),
                ]),
            ));
        }
        let groups = self.groups.iter().map(|g| self.group_value(g)).collect();
        let root = Value::Dict(vec![
            (text("state"), Value::Dict(state)),
            (text("param_groups"), Value::List(groups)),
        ]);
        Ok(kiln_formats::torch::save_value(path, &root, &storages)?)
    }

    /// A group as torch's `state_dict()` writes it, keys in its order.
    fn group_value(&self, g: &TorchGroup) -> Value {
        let f = Value::Float;
        let mut items = vec![
            (text("weight_decay"), f(g.weight_decay)),
            (text("lr"), f(g.lr)),
        ];
        match self.kind {
            TorchKind::AdamW { betas, eps, fused } => {
                items.extend([
                    (text("betas"), Value::Tuple(vec![f(betas.0), f(betas.1)])),
                    (text("eps"), f(eps)),
                    (text("amsgrad"), Value::Bool(false)),
                    (text("maximize"), Value::Bool(false)),
                    (text("foreach"), Value::None),
                    (text("capturable"), Value::Bool(false)),
                    (text("differentiable"), Value::Bool(false)),
                    (text("fused"), fused.map_or(Value::None, Value::Bool)),
                    (text("decoupled_weight_decay"), Value::Bool(true)),
                ]);
            }
            TorchKind::Sgd => {
                items.extend([
                    (text("momentum"), Value::Int(0)),
                    (text("dampening"), Value::Int(0)),
                    (text("nesterov"), Value::Bool(false)),
                    (text("maximize"), Value::Bool(false)),
                    (text("foreach"), Value::None),
                    (text("differentiable"), Value::Bool(false)),
                    (text("fused"), Value::None),
                ]);
            }
        }
        if let Some(lr) = g.initial_lr {
            items.push((text("initial_lr"), f(lr)));
        }
        items.push((
            text("params"),
            Value::List(g.params.iter().map(|&i| Value::Int(i as i64)).collect()),
        ));
        Value::Dict(items)
    }

    /// Reads `optimizer.pt` (weights-only: nothing in it is executed). Only what kiln's
    /// optimizers can continue is accepted: torch's AdamW without `amsgrad`, and SGD
    /// without momentum; anything else is refused naming what it is.
    pub fn load(path: &Path) -> Result<Self> {
        let file = TorchFile::open(path)?;
        let bad = |m: String| Error::json(path, m);
        let root = file.root();
        let groups_v = root
            .get("param_groups")
            .and_then(Value::as_sequence)
            .ok_or_else(|| bad("not an optimizer state dict (no param_groups list)".into()))?;
        let state_v = root
            .get("state")
            .and_then(Value::as_dict)
            .ok_or_else(|| bad("not an optimizer state dict (no state dict)".into()))?;
        let first = groups_v
            .first()
            .ok_or_else(|| bad("param_groups is empty".into()))?;
        let num = |g: &Value, k: &str| g.get(k).and_then(Value::as_f64);
        let flag = |g: &Value, k: &str| g.get(k).and_then(Value::as_int).unwrap_or(0) != 0;
        let kind = if first.get("betas").is_some() {
            if first.get("decoupled_weight_decay").is_some()
                && !flag(first, "decoupled_weight_decay")
            {
                return Err(bad(
                    "it is torch's Adam (weight decay not decoupled); kiln continues AdamW and SGD"
                        .into(),
                ));
            }
            if flag(first, "amsgrad") || flag(first, "maximize") {
                return Err(bad(
                    "its AdamW uses amsgrad or maximize, which kiln's AdamW does not".into(),
                ));
            }
            let betas = first
                .get("betas")
                .and_then(Value::as_sequence)
                .and_then(|b| Some((b.first()?.as_f64()?, b.get(1)?.as_f64()?)))
                .ok_or_else(|| bad("betas is not a pair of numbers".into()))?;
            TorchKind::AdamW {
                betas,
                eps: num(first, "eps").ok_or_else(|| bad("AdamW group without eps".into()))?,
                fused: match first.get("fused") {
                    Some(Value::Bool(b)) => Some(*b),
                    _ => None,
                },
            }
        } else if first.get("momentum").is_some() {
            if num(first, "momentum") != Some(0.0) || flag(first, "nesterov") {
                return Err(bad(
                    "its SGD uses momentum, which kiln's SGD (transformers' optim sgd) does not"
                        .into(),
                ));
            }
            TorchKind::Sgd
        } else {
            let keys: Vec<String> = first
                .as_dict()
                .unwrap_or_default()
                .iter()
                .filter_map(|(k, _)| k.as_str().map(str::to_string))
                .collect();
            return Err(bad(format!(
                "an optimizer kiln does not have (group keys: {}); kiln continues AdamW and SGD",
                keys.join(", ")
            )));
        };
        let mut groups = Vec::new();
        for g in groups_v {
            let params = g
                .get("params")
                .and_then(Value::as_sequence)
                .and_then(|p| {
                    p.iter()
                        .map(|i| i.as_int().and_then(|i| usize::try_from(i).ok()))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| bad("a group's params is not a list of indices".into()))?;
            groups.push(TorchGroup {
                lr: num(g, "lr").ok_or_else(|| bad("a group without lr".into()))?,
                initial_lr: num(g, "initial_lr"),
                weight_decay: num(g, "weight_decay").unwrap_or(0.0),
                params,
            });
        }
        let mut state = BTreeMap::new();
        for (k, v) in state_v {
            let index = k
                .as_int()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(|| bad(format!("state key {k:?} is not a parameter index")))?;
            let tensor = |slot: &str| -> Result<TensorView<'static>> {
                let t = v.get(slot).and_then(Value::as_tensor).ok_or_else(|| {
                    bad(format!("state of parameter {index} has no {slot} tensor"))
                })?;
                Ok(file.read_tensor(t)?.into_owned())
            };
            if matches!(kind, TorchKind::Sgd) {
                if v.get("momentum_buffer").is_some_and(|m| *m != Value::None) {
                    return Err(bad("its SGD state holds momentum buffers".into()));
                }
                continue;
            }
            let step = match v.get("step") {
                Some(Value::Tensor(t)) => {
                    let view = file.read_tensor(t)?;
                    scalar(&view)
                        .ok_or_else(|| bad(format!("parameter {index}: step is not a number")))?
                }
                Some(other) => other
                    .as_f64()
                    .ok_or_else(|| bad(format!("parameter {index}: step is not a number")))?,
                None => return Err(bad(format!("state of parameter {index} has no step"))),
            };
            state.insert(
                index,
                TorchParamState {
                    step,
                    exp_avg: tensor("exp_avg")?,
                    exp_avg_sq: tensor("exp_avg_sq")?,
                },
            );
        }
        Ok(TorchOptimizer {
            kind,
            groups,
            state,
        })
    }
}

/// A key of a state dict.
fn text(s: &str) -> Value {
    Value::String(s.to_string())
}

/// A view borrowing `t`'s bytes.
fn borrowed<'a>(t: &'a TensorView<'static>) -> Result<TensorView<'a>> {
    Ok(TensorView::new(t.dtype(), t.shape().to_vec(), t.data())?)
}

/// The value of a one-element float tensor.
fn scalar(t: &TensorView<'_>) -> Option<f64> {
    let d = t.data();
    match t.dtype() {
        DType::F32 => Some(f32::from_le_bytes(d.get(..4)?.try_into().ok()?) as f64),
        DType::F64 => Some(f64::from_le_bytes(d.get(..8)?.try_into().ok()?)),
        DType::I64 => Some(i64::from_le_bytes(d.get(..8)?.try_into().ok()?) as f64),
        _ => None,
    }
}

/// `scheduler.pt`: a `LambdaLR` (transformers' schedules) after `last_epoch` steps.
#[derive(Clone, Debug, PartialEq)]
pub struct TorchScheduler {
    /// Steps the schedule has taken.
    pub last_epoch: u64,
    /// The base learning rate of each group.
    pub base_lrs: Vec<f64>,
    /// The learning rate of each group now (for the next step).
    pub last_lr: Vec<f64>,
}

impl TorchScheduler {
    /// Writes `scheduler.pt` at `path`, as `LambdaLR.state_dict()`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let floats = |v: &[f64]| Value::List(v.iter().map(|x| Value::Float(*x)).collect());
        let root = Value::Dict(vec![
            (text("base_lrs"), floats(&self.base_lrs)),
            (text("last_epoch"), Value::Int(self.last_epoch as i64)),
            (text("_step_count"), Value::Int(self.last_epoch as i64 + 1)),
            (text("_is_initial"), Value::Bool(false)),
            (text("_get_lr_called_within_step"), Value::Bool(false)),
            (text("_last_lr"), floats(&self.last_lr)),
            (
                text("lr_lambdas"),
                Value::List(self.base_lrs.iter().map(|_| Value::Dict(vec![])).collect()),
            ),
        ]);
        Ok(kiln_formats::torch::save_value(
            path,
            &root,
            &StorageMap::new(),
        )?)
    }

    /// Reads `scheduler.pt` (weights-only).
    pub fn load(path: &Path) -> Result<Self> {
        let file = TorchFile::open(path)?;
        let root = file.root();
        let bad = |m: &str| Error::json(path, m);
        let last_epoch = root
            .get("last_epoch")
            .and_then(Value::as_int)
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| bad("not a scheduler state dict (no last_epoch of 0 or more)"))?;
        if root.get("lr_lambdas").is_none() {
            return Err(bad("not a LambdaLR state dict (no lr_lambdas)"));
        }
        let floats = |k: &str| -> Vec<f64> {
            root.get(k)
                .and_then(Value::as_sequence)
                .map(|v| v.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        };
        Ok(TorchScheduler {
            last_epoch,
            base_lrs: floats("base_lrs"),
            last_lr: floats("_last_lr"),
        })
    }
}

/// Writes `scaler.pt` at `path` from the loss scaler's state (torch's `GradScaler`
/// `state_dict()` keys, as kiln's `scaler.json` holds them).
pub fn save_scaler_pt(path: &Path, state: &serde_json::Value) -> Result<()> {
    let obj = state
        .as_object()
        .ok_or_else(|| Error::Invalid("the loss scaler's state is not an object".into()))?;
    let items = obj
        .iter()
        .map(|(k, v)| {
            let value = match v {
                serde_json::Value::Number(n) if n.is_i64() => Value::Int(n.as_i64().unwrap_or(0)),
                serde_json::Value::Number(n) => Value::Float(n.as_f64().unwrap_or(0.0)),
                serde_json::Value::Bool(b) => Value::Bool(*b),
                other => {
                    return Err(Error::Invalid(format!(
                        "loss scaler state {k}: {other} is not a number"
                    )));
                }
            };
            Ok((text(k), value))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(kiln_formats::torch::save_value(
        path,
        &Value::Dict(items),
        &StorageMap::new(),
    )?)
}

/// Reads `scaler.pt` into the JSON form of kiln's `scaler.json`.
pub fn load_scaler_pt(path: &Path) -> Result<serde_json::Value> {
    let file = TorchFile::open(path)?;
    let items = file
        .root()
        .as_dict()
        .ok_or_else(|| Error::json(path, "not a GradScaler state dict"))?;
    let mut out = serde_json::Map::new();
    for (k, v) in items {
        let key = k
            .as_str()
            .ok_or_else(|| Error::json(path, "a key is not a string"))?;
        let value = match v {
            Value::Int(i) => json!(i),
            Value::Float(f) => json!(f),
            Value::Bool(b) => json!(b),
            other => {
                return Err(Error::json(
                    path,
                    format!("{key} is a {}, not a number", other.type_name()),
                ));
            }
        };
        out.insert(key.to_string(), value);
    }
    Ok(serde_json::Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(values: &[f32]) -> TensorView<'static> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorView::new(DType::F32, vec![values.len()], bytes).unwrap()
    }

    fn kiln_state() -> OptimizerState {
        let mut s = OptimizerState::new("adamw").with_meta(json!({
            "step": 3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
            "no_decay": ["a.bias"], "params": ["a.weight", "a.bias", "b.weight"],
            "lr": 5e-4, "initial_lr": 1e-3, "torch_fused": true,
        }));
        for (name, base) in [("a.weight", 1.0), ("a.bias", 2.0), ("b.weight", 3.0)] {
            s.insert(name, "exp_avg", view(&[base, base + 0.5]))
                .unwrap();
            s.insert(name, "exp_avg_sq", view(&[base * 0.1])).unwrap();
        }
        s
    }

    /// kiln's state → optimizer.pt → kiln's state: transformers' numbering (decay
    /// group first), the same tensors and hyper-parameters.
    #[test]
    fn optimizer_state_round_trips_through_torch_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OPTIMIZER_PT_NAME);
        let torch = TorchOptimizer::from_kiln(&kiln_state()).unwrap();
        assert_eq!(torch.groups[0].params, [0, 1]);
        assert_eq!(torch.groups[1].params, [2]);
        assert_eq!(torch.groups[1].weight_decay, 0.0);
        torch.save(&path).unwrap();
        let back = TorchOptimizer::load(&path).unwrap();
        assert_eq!(back, torch);
        let params = [
            ("a.weight".to_string(), true),
            ("a.bias".to_string(), false),
            ("b.weight".to_string(), true),
        ];
        let state = back.to_kiln(&params).unwrap();
        assert_eq!(state.get("a.bias", "exp_avg"), Some(&view(&[2.0, 2.5])));
        assert_eq!(state.get("b.weight", "exp_avg_sq"), Some(&view(&[0.3])));
        assert_eq!(state.meta["step"], 3);
        assert_eq!(state.meta["no_decay"], json!(["a.bias"]));
        // Another model's parameters: refused.
        let e = back.to_kiln(&params[..2]).unwrap_err().to_string();
        assert!(e.contains("parameter groups hold [2, 1]"), "{e}");
    }

    #[test]
    fn scheduler_and_scaler_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SCHEDULER_PT_NAME);
        let s = TorchScheduler {
            last_epoch: 7,
            base_lrs: vec![1e-3, 1e-3],
            last_lr: vec![5e-4, 5e-4],
        };
        s.save(&path).unwrap();
        assert_eq!(TorchScheduler::load(&path).unwrap(), s);
        let scaler = json!({"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
            "growth_interval": 2000, "_growth_tracker": 3});
        let path = dir.path().join(SCALER_PT_NAME);
        save_scaler_pt(&path, &scaler).unwrap();
        assert_eq!(load_scaler_pt(&path).unwrap(), scaler);
        let e = TorchOptimizer::load(&path).unwrap_err().to_string();
        assert!(e.contains("no param_groups"), "{e}");
    }
}
