//! For candle users with a training loop of their own (cargo feature `candle`): the
//! variables of a candle-nn [`VarMap`] as named host tensors, for a model folder or a
//! [`CheckpointSnapshot`](crate::training::CheckpointSnapshot), and a folder's weights
//! back into the `VarMap`.
//!
//! A `VarMap` is a hash map and has no order of its own, while a model folder's tensors
//! (and how they are split into shards) follow one; so [`varmap_tensors`] takes the
//! order to write in, as transformers follows `state_dict()` order, and sorts by name
//! when none is given, so that the same model always gives the same bytes.
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use kiln_checkpoint::candle::{load_varmap, save_varmap};
//! use kiln_checkpoint::model::SaveOptions;
//!
//! // A model whose variables live in a VarMap (candle draws their initial values).
//! let vars = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
//! let _classifier = candle_nn::linear(4, 2, vb.pp("classifier"))?;
//!
//! // Save it as a Hugging Face model folder: config.json + model.safetensors.
//! let dir = tempfile::tempdir()?;
//! let config = serde_json::json!({"architectures": ["TinyClassifier"], "model_type": "tiny"});
//! save_varmap(dir.path(), &vars, config, None, &SaveOptions::default())?;
//!
//! // The same model built again, with other initial values, then loaded back:
//! // all of the folder's values, or none.
//! let fresh = VarMap::new();
//! let vb = VarBuilder::from_varmap(&fresh, DType::F32, &Device::Cpu);
//! let _classifier = candle_nn::linear(4, 2, vb.pp("classifier"))?;
//! let report = load_varmap(dir.path(), &fresh)?;
//! assert!(report.is_clean());
//! let weight = |v: &VarMap| v.data().lock().unwrap()["classifier.weight"].to_vec2::<f32>();
//! assert_eq!(weight(&vars)?, weight(&fresh)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use kiln_formats::candle::{from_candle, from_candle_dtype, to_candle};
use kiln_formats::{TensorInfo, TensorMap};
use serde_json::Value;

use crate::commit::MANIFEST_NAME;
use crate::model::{LoadReport, ModelSave, SaveOptions, SavedModel, save_pretrained};
use crate::scan::{Completeness, completeness};
use crate::{Error, Result};

/// The variables of `vars`, sorted by name.
fn sorted_vars(vars: &VarMap) -> Result<Vec<(String, Var)>> {
    let map = vars
        .data()
        .lock()
        .map_err(|_| Error::Invalid("the VarMap's lock is poisoned".into()))?;
    let mut all: Vec<(String, Var)> = map.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(all)
}

/// Host copies of the variables of `vars`: in `order`, which must name every variable
/// exactly once, or sorted by name with `None` (a `VarMap` keeps no order).
///
/// The result goes into [`ModelSave::new`] or, in an `Arc`,
/// [`CheckpointSnapshot::new`](crate::training::CheckpointSnapshot::new).
pub fn varmap_tensors(vars: &VarMap, order: Option<&[&str]>) -> Result<TensorMap<'static>> {
    let all = sorted_vars(vars)?;
    let ordered = match order {
        None => all,
        Some(names) => in_order(all, names)?,
    };
    let mut map = TensorMap::new();
    for (name, var) in ordered {
        let view = from_candle(var.as_tensor()).map_err(|source| Error::Candle {
            name: name.clone(),
            source: Box::new(source),
        })?;
        map.insert(name, view)?;
    }
    Ok(map)
}

/// `all` rearranged into `names`, which must name each of them once.
fn in_order(all: Vec<(String, Var)>, names: &[&str]) -> Result<Vec<(String, Var)>> {
    let mut by_name: HashMap<String, Var> = all.into_iter().collect();
    let mut seen = HashSet::with_capacity(names.len());
    let mut out = Vec::with_capacity(names.len());
    for &name in names {
        if !seen.insert(name) {
            return Err(Error::Invalid(format!("the order names {name:?} twice")));
        }
        let var = by_name
            .remove(name)
            .ok_or_else(|| Error::Invalid(format!("the VarMap has no variable {name:?}")))?;
        out.push((name.to_string(), var));
    }
    let mut left: Vec<&String> = by_name.keys().collect();
    left.sort();
    if let Some(first) = left.first() {
        return Err(Error::Invalid(format!(
            "the order leaves out the VarMap's variable {first:?} ({} left out)",
            left.len()
        )));
    }
    Ok(out)
}

/// Saves `vars` as a model folder that transformers' `from_pretrained` reads:
/// `config.json` from `config` (it must name `model_type` and `architectures`) and the
/// weights in `order` (see [`varmap_tensors`]). For tied weights, tokenizer files and
/// the rest, build a [`ModelSave`] from [`varmap_tensors`] instead.
pub fn save_varmap(
    dir: impl AsRef<Path>,
    vars: &VarMap,
    config: Value,
    order: Option<&[&str]>,
    options: &SaveOptions,
) -> Result<SavedModel> {
    let weights = varmap_tensors(vars, order)?;
    save_pretrained(dir, &ModelSave::new(config, &weights), options)
}

/// Loads the weights of the model folder or checkpoint folder `dir` into every variable
/// of `vars`, converting each to its variable's dtype; returns what the folder held
/// beyond the `VarMap` (its `unexpected` tensors, which are left alone).
///
/// Every variable must be in the folder with its shape. All-or-nothing: every tensor is
/// read and converted before the first variable is set, so on an error the `VarMap` is
/// unchanged. A checkpoint folder that its commit did not complete is refused.
pub fn load_varmap(dir: impl AsRef<Path>, vars: &VarMap) -> Result<LoadReport> {
    let dir = dir.as_ref();
    if dir.join(MANIFEST_NAME).is_file()
        && let Completeness::Incomplete(reason) = completeness(dir)?
    {
        return Err(Error::Incomplete {
            path: dir.to_path_buf(),
            reason,
        });
    }
    let vars = sorted_vars(vars)?;
    let candle_err = |name: &str| {
        let name = name.to_string();
        move |source| Error::Candle {
            name,
            source: Box::new(source),
        }
    };
    let mut expected = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        expected.push(TensorInfo {
            name: name.clone(),
            dtype: from_candle_dtype(var.dtype()).map_err(candle_err(name))?,
            shape: var.dims().to_vec(),
        });
    }
    let loaded = crate::model::load_pretrained_any_dtype(dir, &expected, &[])?;
    if let Some(name) = loaded.report.missing.first() {
        return Err(Error::Incomplete {
            path: loaded.weights_path.clone(),
            reason: format!(
                "no tensor {name:?} for the VarMap ({} of its {} variables missing)",
                loaded.report.missing.len(),
                vars.len()
            ),
        });
    }
    let mut values: Vec<(&Var, Tensor)> = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        let view = loaded.weights.tensor(name).map_err(candle_err(name))?;
        let value = to_candle(&view, var.device())
            .and_then(|t| Ok(t.to_dtype(var.dtype())?))
            .map_err(candle_err(name))?;
        if !var.as_tensor().is_contiguous() {
            return Err(Error::Invalid(format!(
                "the VarMap's variable {name:?} is not contiguous and cannot be set"
            )));
        }
        values.push((var, value));
    }
    for ((name, _), (var, value)) in vars.iter().zip(values) {
        var.set(&value)
            .map_err(|e| candle_err(name)(kiln_formats::Error::Candle(e)))?;
    }
    Ok(loaded.report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;
    use kiln_formats::{DType as KDType, TensorCollection};

    use super::*;

    /// Two linear layers, "b" (3 → `wide`) then "a" (2 → 1), in `dtype`.
    fn model(vars: &VarMap, dtype: DType, wide: usize) {
        let vb = VarBuilder::from_varmap(vars, dtype, &Device::Cpu);
        candle_nn::linear(3, wide, vb.pp("b")).unwrap();
        candle_nn::linear(2, 1, vb.pp("a")).unwrap();
    }

    fn names(m: &TensorMap<'_>) -> Vec<String> {
        m.tensors().iter().map(|i| i.name.clone()).collect()
    }

    /// Every variable's (name, dtype, shape, bytes), sorted by name.
    fn values(vars: &VarMap) -> Vec<(String, KDType, Vec<usize>, Vec<u8>)> {
        let m = varmap_tensors(vars, None).unwrap();
        m.tensors()
            .iter()
            .map(|i| {
                let t = m.tensor(&i.name).unwrap();
                (
                    i.name.clone(),
                    t.dtype(),
                    t.shape().to_vec(),
                    t.data().to_vec(),
                )
            })
            .collect()
    }

    fn config() -> Value {
        serde_json::json!({"architectures": ["Tiny"], "model_type": "tiny"})
    }

    #[test]
    fn tensors_come_sorted_or_in_the_order_given() {
        let vars = VarMap::new();
        model(&vars, DType::F32, 2);
        let sorted = varmap_tensors(&vars, None).unwrap();
        assert_eq!(names(&sorted), ["a.bias", "a.weight", "b.bias", "b.weight"]);
        let order = ["b.weight", "b.bias", "a.weight", "a.bias"];
        let ordered = varmap_tensors(&vars, Some(&order)).unwrap();
        assert_eq!(names(&ordered), order);
        assert_eq!(ordered.tensor("b.weight").unwrap().shape(), &[2, 3]);
        assert_eq!(
            ordered.tensor("b.weight").unwrap(),
            sorted.tensor("b.weight").unwrap()
        );
    }

    #[test]
    fn a_bad_order_is_refused_naming_the_variable() {
        let vars = VarMap::new();
        model(&vars, DType::F32, 2);
        for (bad, says) in [
            (
                &["b.weight", "b.bias", "a.weight", "nope"][..],
                "no variable \"nope\"",
            ),
            (
                &["b.weight", "b.bias", "a.weight"],
                "leaves out the VarMap's variable \"a.bias\"",
            ),
            (
                &["b.weight", "b.weight", "a.weight", "a.bias"],
                "names \"b.weight\" twice",
            ),
        ] {
            let e = varmap_tensors(&vars, Some(bad)).unwrap_err().to_string();
            assert!(e.contains(says) && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn a_folder_loads_back_converting_dtypes() {
        let vars = VarMap::new();
        model(&vars, DType::F32, 2);
        let dir = tempfile::tempdir().unwrap();
        save_varmap(dir.path(), &vars, config(), None, &SaveOptions::default()).unwrap();
        let fresh = VarMap::new();
        model(&fresh, DType::F32, 2);
        assert_ne!(values(&vars), values(&fresh));
        assert!(load_varmap(dir.path(), &fresh).unwrap().is_clean());
        assert_eq!(values(&vars), values(&fresh));

        // Into a VarMap of f64 variables: the same numbers, in f64.
        let wide = VarMap::new();
        model(&wide, DType::F64, 2);
        load_varmap(dir.path(), &wide).unwrap();
        let w = wide.data().lock().unwrap()["b.weight"].clone();
        assert_eq!(w.dtype(), DType::F64);
        let v = vars.data().lock().unwrap()["b.weight"].clone();
        let back = w.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(back, v.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn extra_tensors_in_the_folder_are_reported_not_loaded() {
        let vars = VarMap::new();
        model(&vars, DType::F32, 2);
        let dir = tempfile::tempdir().unwrap();
        save_varmap(dir.path(), &vars, config(), None, &SaveOptions::default()).unwrap();
        let only_a = VarMap::new();
        let vb = VarBuilder::from_varmap(&only_a, DType::F32, &Device::Cpu);
        candle_nn::linear(2, 1, vb.pp("a")).unwrap();
        let report = load_varmap(dir.path(), &only_a).unwrap();
        assert_eq!(report.unexpected, ["b.bias", "b.weight"]);
        assert!(report.missing.is_empty());
    }

    #[test]
    fn a_failed_load_changes_nothing() {
        let vars = VarMap::new();
        model(&vars, DType::F32, 2);
        let dir = tempfile::tempdir().unwrap();
        save_varmap(dir.path(), &vars, config(), None, &SaveOptions::default()).unwrap();

        // "b" is wider than in the folder: refused, naming the tensor; "a", which
        // matches and comes first in name order, is not set either.
        let wide = VarMap::new();
        model(&wide, DType::F32, 5);
        let before = values(&wide);
        let e = load_varmap(dir.path(), &wide).unwrap_err();
        assert!(
            matches!(&e, Error::Shape { name, .. } if name == "b.bias"),
            "{e}"
        );
        assert_eq!(values(&wide), before);

        // A variable the folder lacks: refused, naming it.
        let more = VarMap::new();
        model(&more, DType::F32, 2);
        let vb = VarBuilder::from_varmap(&more, DType::F32, &Device::Cpu);
        candle_nn::linear(1, 1, vb.pp("c")).unwrap();
        let before = values(&more);
        let e = load_varmap(dir.path(), &more).unwrap_err().to_string();
        assert!(
            e.contains("no tensor \"c.bias\"") && !e.contains('\n'),
            "{e}"
        );
        assert_eq!(values(&more), before);
    }

    #[test]
    fn an_incomplete_checkpoint_is_refused() {
        use crate::commit::SingleProcess;
        use crate::training::CheckpointSnapshot;
        use std::sync::Arc;

        let vars = VarMap::new();
        model(&vars, DType::F32, 2);
        let out = tempfile::tempdir().unwrap();
        let weights = Arc::new(varmap_tensors(&vars, None).unwrap());
        let ckpt = CheckpointSnapshot::new(3, config(), weights)
            .write(out.path(), &SingleProcess)
            .unwrap();
        load_varmap(&ckpt, &vars).unwrap();
        std::fs::write(ckpt.join("model.safetensors"), b"torn").unwrap();
        let e = load_varmap(&ckpt, &vars).unwrap_err();
        assert!(matches!(e, Error::Incomplete { .. }), "{e}");
    }
}
