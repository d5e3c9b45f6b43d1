//! Loading a model folder that transformers (or kiln) wrote into a model's parameters.
//!
//! # Loading rules
//!
//! [`load_into`] maps each parameter to a tensor of the folder and reads it through
//! [`kiln_checkpoint::model::load_pretrained`] (which picks the weights file in
//! transformers' order of precedence and checks dtypes and shapes). It follows what
//! transformers' `from_pretrained` does; where it differs (missing weights, the
//! legacy buffers it drops silently) it is stricter or quieter, as said below:
//!
//! - **Names.** A parameter is found under its own name, else under the legacy
//!   LayerNorm names of old checkpoints (`LayerNorm.gamma` / `LayerNorm.beta` for
//!   `LayerNorm.weight` / `LayerNorm.bias`), else — when the model has a
//!   [`LoadRules::base_model_prefix`] — without that prefix, as a base model's folder
//!   stores it (`embeddings.word_embeddings.weight` for
//!   `bert.embeddings.word_embeddings.weight`, `wte.weight` for `transformer.wte.weight`).
//!   A parameter absent from the folder but tied to one present is read from it; a
//!   tied copy present in the folder (a `.bin` keeps both names) is not read again.
//! - **Missing weights are an error** naming them (transformers initialises them afresh
//!   with a warning), except the parameters under [`LoadRules::fresh`] prefixes — a task
//!   head such as `classifier.` — which keep the initialisation the model was built
//!   with and are listed in [`LoadInfo::fresh`]: building a classifier from a base
//!   model's folder gets a fresh head, as in transformers.
//! - **Unexpected tensors** (another head, a language-model head when loading a
//!   classifier) are left unused and listed in [`LoadInfo::unexpected`], as transformers
//!   reports them; those matching [`LoadRules::ignore`] (buffers older transformers
//!   saved, such as `bert.embeddings.position_ids` and GPT-2's `attn.bias` and
//!   `attn.masked_bias`) go to [`LoadInfo::ignored`] instead (transformers 5 drops the
//!   first two silently and reports `attn.masked_bias` as unexpected).
//! - **Shapes** must match (transformers errors too, unless `ignore_mismatched_sizes`).
//! - **Dtypes**: a folder saved in f16 or bf16 is read and converted to each parameter's
//!   dtype (f32 for kiln's models), as `from_pretrained` converts to the default dtype.
//!
//! Nothing is written into the parameters unless the whole folder loads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Var;
use kiln_checkpoint::model as ckpt;
use kiln_formats::TensorInfo;
use kiln_formats::candle::{from_candle_dtype, to_candle};

use crate::{Error, Result, ShapeMismatch};

/// How a model's parameters are found in a folder (see the [module docs](self)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadRules {
    /// The attribute holding the base model (transformers' `base_model_prefix`:
    /// `"bert"`, `"transformer"`): parameters under it are also looked for without it.
    pub base_model_prefix: Option<String>,
    /// Name prefixes of parameters that may be absent and then keep their
    /// initialisation (a task head: `"classifier."`).
    pub fresh: Vec<String>,
    /// Name endings of tensors that are dropped silently when the model does not use
    /// them (buffers older transformers saved: `".attn.bias"`).
    pub ignore: Vec<String>,
    /// Name prefixes of parameters initialised afresh even when the folder has them (a
    /// head whose size the config changed: another `num_labels`); the folder's tensors
    /// of those names are dropped.
    pub reinit: Vec<String>,
}

impl LoadRules {
    /// Sets the base model prefix.
    pub fn with_base_model_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.base_model_prefix = Some(prefix.into());
        self
    }

    /// Adds a prefix of parameters that may be initialised afresh.
    pub fn with_fresh(mut self, prefix: impl Into<String>) -> Self {
        self.fresh.push(prefix.into());
        self
    }

    /// Adds a name ending of tensors to drop silently.
    pub fn with_ignore(mut self, ending: impl Into<String>) -> Self {
        self.ignore.push(ending.into());
        self
    }

    /// Adds a prefix of parameters initialised afresh whatever the folder holds.
    pub fn with_reinit(mut self, prefix: impl Into<String>) -> Self {
        self.reinit.push(prefix.into());
        self
    }

    fn reinits(&self, name: &str) -> bool {
        self.reinit.iter().any(|p| name.starts_with(p.as_str()))
    }

    fn may_be_fresh(&self, name: &str) -> bool {
        self.fresh.iter().any(|p| name.starts_with(p.as_str()))
    }

    fn ignores(&self, name: &str) -> bool {
        self.ignore.iter().any(|e| name.ends_with(e.as_str()))
    }

    /// The names a parameter may have in a folder, in order of preference.
    fn candidates(&self, name: &str) -> Vec<String> {
        let mut names = vec![name.to_string()];
        names.extend(legacy_name(name));
        if let Some(stripped) = self
            .base_model_prefix
            .as_deref()
            .and_then(|p| name.strip_prefix(p))
            .and_then(|n| n.strip_prefix('.'))
        {
            names.push(stripped.to_string());
            names.extend(legacy_name(stripped));
        }
        names
    }
}

/// The name old checkpoints used for a LayerNorm parameter (TF-era `gamma`/`beta`).
fn legacy_name(name: &str) -> Option<String> {
    if let Some(stem) = name.strip_suffix("LayerNorm.weight") {
        Some(format!("{stem}LayerNorm.gamma"))
    } else {
        name.strip_suffix("LayerNorm.bias")
            .map(|stem| format!("{stem}LayerNorm.beta"))
    }
}

/// What [`load_into`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadInfo {
    /// The weights file or shard index read.
    pub weights_path: PathBuf,
    /// Parameters absent from the folder that kept their initialisation (a new head).
    pub fresh: Vec<String>,
    /// Parameters absent from the folder, read from the tensor they are tied to.
    pub retied: Vec<String>,
    /// (name in the folder, parameter) for parameters found under another name.
    pub renamed: Vec<(String, String)>,
    /// Tensors of the folder the model does not use.
    pub unexpected: Vec<String>,
    /// Tensors of the folder dropped silently ([`LoadRules::ignore`]).
    pub ignored: Vec<String>,
    /// Parameters converted from another dtype (name, dtype in the folder).
    pub converted: Vec<(String, String)>,
}

/// Loads the model folder `dir` into `params` (name, variable), whose tied copies are
/// `tied` ((tied name, source name)), following `rules` (see the [module docs](self)).
/// On error no parameter has changed.
pub fn load_into(
    params: &[(String, Var)],
    tied: &[(String, String)],
    dir: impl AsRef<Path>,
    rules: &LoadRules,
) -> Result<LoadInfo> {
    let dir = dir.as_ref();
    let file = kiln_formats::open(dir)?;
    let in_file = |n: &str| file.info(n).is_some();
    let resolve =
        |name: &str| -> Option<String> { rules.candidates(name).into_iter().find(|c| in_file(c)) };

    // The parameters' names as the folder has them (their own name when absent, so that
    // load_pretrained re-ties or reports them).
    let mut file_names: HashMap<&str, String> = HashMap::new();
    let mut info = LoadInfo::default();
    for (name, _) in params {
        let found = resolve(name);
        if let Some(f) = &found
            && f != name
        {
            info.renamed.push((f.clone(), name.clone()));
        }
        file_names.insert(name.as_str(), found.unwrap_or_else(|| name.clone()));
    }
    let as_in_file = |name: &str| -> String {
        file_names
            .get(name)
            .cloned()
            .or_else(|| resolve(name))
            .unwrap_or_else(|| name.to_string())
    };
    let ties: Vec<(String, String)> = tied
        .iter()
        .map(|(t, s)| (as_in_file(t), as_in_file(s)))
        .collect();

    let mut expected = Vec::with_capacity(params.len());
    for (name, var) in params {
        if rules.reinits(name) {
            info.fresh.push(name.clone());
            continue;
        }
        let fname = &file_names[name.as_str()];
        let dtype = from_candle_dtype(var.dtype())?;
        let source = file.info(fname).or_else(|| {
            ties.iter()
                .filter_map(|(t, s)| {
                    if t == fname {
                        Some(s)
                    } else if s == fname {
                        Some(t)
                    } else {
                        None
                    }
                })
                .find_map(|p| file.info(p))
        });
        let dtype = match source {
            Some(found) => {
                if found.shape != var.dims() {
                    let hint = if rules.may_be_fresh(name) {
                        "; the folder's head differs from the model's (another num_labels?)"
                    } else {
                        ""
                    };
                    return Err(Error::WeightShape(Box::new(ShapeMismatch {
                        dir: dir.to_path_buf(),
                        name: found.name.clone(),
                        expected: var.dims().to_vec(),
                        found: found.shape.clone(),
                        hint: hint.into(),
                    })));
                }
                if found.dtype.is_float() && dtype.is_float() && found.dtype != dtype {
                    info.converted.push((name.clone(), found.dtype.to_string()));
                    found.dtype
                } else {
                    dtype
                }
            }
            None => dtype,
        };
        expected.push(TensorInfo {
            name: fname.clone(),
            dtype,
            shape: var.dims().to_vec(),
        });
    }
    drop(file);

    let loaded = ckpt::load_pretrained(dir, &expected, &ties)?;
    let report = &loaded.report;
    let mut missing = Vec::new();
    for (name, _) in params {
        if report.missing.contains(&file_names[name.as_str()]) {
            if rules.may_be_fresh(name) {
                info.fresh.push(name.clone());
            } else {
                missing.push(name.clone());
            }
        } else if report.retied.contains(&file_names[name.as_str()]) {
            info.retied.push(name.clone());
        }
    }
    if !missing.is_empty() {
        return Err(Error::MissingWeights {
            dir: dir.to_path_buf(),
            names: missing,
        });
    }
    for name in &report.unexpected {
        if ties.iter().any(|(t, _)| t == name) {
            // A tied copy the folder keeps (`.bin` keeps both names): the source is read.
            continue;
        }
        if rules.ignores(name) || rules.reinits(name) {
            info.ignored.push(name.clone());
        } else {
            info.unexpected.push(name.clone());
        }
    }

    let mut values = Vec::with_capacity(params.len());
    for (name, var) in params {
        if info.fresh.contains(name) {
            continue;
        }
        let view = loaded.weights.tensor(&file_names[name.as_str()])?;
        let value = to_candle(&view, var.device())?.to_dtype(var.dtype())?;
        values.push((var, value));
    }
    for (var, value) in values {
        var.set(&value)?;
    }
    info.weights_path = loaded.weights_path;
    Ok(info)
}
