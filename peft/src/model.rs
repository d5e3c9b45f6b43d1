//! [`PeftModel`]: a model with LoRA adapters on its dense layers and every other
//! weight frozen, which the trainer trains, checkpoints and saves as peft's adapter.
//!
//! Its [`Model::parameters`] are only what trains, under the names peft saves
//! (`base_model.model.{layer}.lora_A.weight`, `base_model.model.classifier.weight` for
//! a module to save), so the optimizer holds state for them alone, checkpoints hold
//! them alone, and [`Model::config`] is the adapter's `adapter_config.json`:
//! kiln-checkpoint saves such a model as an adapter folder. The base weights are
//! frozen ([`Model::freeze`]): no gradient is computed for them, none is stored.

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use kiln_models::registry::TaskModel;
use kiln_trainer::Task;
use kiln_trainer::adapter::{AdapterSlot, DenseAdapter, DenseLayer};
use kiln_trainer::model::{Batch, Model, Output};
use kiln_trainer::rng::Rng;
use serde_json::Value;

use crate::config::{
    ALL_LINEAR, LoraConfig, Resolved, Targets, default_targets, full_regex, in_module,
};
use crate::lora::LoraAdapter;
use crate::{Error, Result};

/// The prefix peft's saved names carry (`PeftModel.base_model.model`).
pub const PREFIX: &str = "base_model.model.";

/// peft's `SEQ_CLS` heads, added to `modules_to_save` for sequence classification.
const SEQ_CLS_HEADS: [&str; 2] = ["classifier", "score"];

/// Head names peft (0.22) adds for sequence classification whatever the model has
/// (DistilBERT's `pre_classifier` besides these): in an adapter's `modules_to_save`,
/// they may name no module, as peft matches them where they exist.
const PEFT_CLASSIFIER_NAMES: [&str; 3] = ["classifier", "score", "pre_classifier"];

/// A model with LoRA adapters (see the module docs).
#[derive(Debug)]
pub struct PeftModel<M: Model> {
    base: M,
    config: LoraConfig,
    resolved: Resolved,
    /// (layer, its adapter), in model order.
    adapters: Vec<(DenseLayer, Arc<LoraAdapter>)>,
    /// The base model's own parameters that train (modules to save, biases).
    trainable: HashSet<String>,
    /// The parameters peft adds to its base (the adapters, the copies of the modules to
    /// save), which transformers' `floating_point_ops` counts: fixed once built.
    added_params: usize,
}

/// What [`PeftModel::counts`] counts, as peft's `print_trainable_parameters` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParameterCounts {
    /// Parameters that train.
    pub trainable: usize,
    /// All parameters (the base's, the adapters', and peft's copy of each module to
    /// save).
    pub all: usize,
}

impl std::fmt::Display for ParameterCounts {
    /// `trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330`, as peft
    /// prints it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = 100.0 * self.trainable as f64 / self.all.max(1) as f64;
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {pct:.4}",
            thousands(self.trainable),
            thousands(self.all)
        )
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn candle(e: candle_core::Error) -> Error {
    Error::Candle(e)
}

impl<M: Model> PeftModel<M> {
    /// Adds fresh adapters to `base` as `config` says (drawing A and B from `rng`) and
    /// freezes the rest. `task` decides peft's task type (and the heads saved with a
    /// classifier's adapter); `base_dir` is saved as `base_model_name_or_path`.
    pub fn new(
        mut base: M,
        config: LoraConfig,
        task: Task,
        base_dir: Option<String>,
        rng: &mut Rng,
    ) -> Result<Self> {
        config.validate()?;
        let model_config = base.config();
        let model_type = model_config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let architecture = model_config["architectures"][0]
            .as_str()
            .unwrap_or("the model")
            .to_string();
        let task_type = match (&config.task_type, task) {
            (Some(t), _) => t.clone(),
            (None, Task::SequenceClassification) => "SEQ_CLS".into(),
            (None, Task::CausalLm) => "CAUSAL_LM".into(),
        };
        let mut layers = Vec::new();
        base.visit_dense(&mut |layer: &DenseLayer, _: &mut AdapterSlot| {
            layers.push(layer.clone());
            Ok(())
        })?;
        let param_names: Vec<String> = base.parameters().into_iter().map(|(n, _)| n).collect();

        // modules_to_save, with the classifier heads peft adds for SEQ_CLS.
        let mut modules = config.modules_to_save.clone().unwrap_or_default();
        for m in &modules {
            // peft adds (and saves) both SEQ_CLS head names, whichever the model has.
            let added_head = task_type == "SEQ_CLS" && PEFT_CLASSIFIER_NAMES.contains(&m.as_str());
            if !added_head && !param_names.iter().any(|p| in_module(p, m)) {
                return Err(Error::Config(format!(
                    "modules_to_save {m:?} names no module of {architecture}"
                )));
            }
        }
        if task_type == "SEQ_CLS" {
            for head in SEQ_CLS_HEADS {
                if !modules.iter().any(|m| m == head) {
                    modules.push(head.to_string());
                }
            }
        }
        let to_save = |name: &str| modules.iter().any(|m| in_module(name, m));

        let targets = resolve_targets(
            &config,
            &layers,
            &param_names,
            &model_type,
            &architecture,
            task,
        )?;
        let chosen: Vec<&DenseLayer> = layers
            .iter()
            .filter(|l| targets(&l.name) && !to_save(&l.name))
            .collect();
        if chosen.is_empty() {
            return Err(Error::Config(format!(
                "target_modules matches no dense layer of {architecture}; its dense layers are named {}",
                layer_names(&layers)
            )));
        }
        let device = base
            .parameters()
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(Device::Cpu);
        let mut adapters = Vec::with_capacity(chosen.len());
        for layer in &chosen {
            let (r, alpha) = config.rank_and_alpha(&layer.name);
            let adapter = LoraAdapter::new(
                layer,
                r,
                config.scaling(r, alpha),
                config.lora_dropout,
                &config.init_lora_weights,
                rng,
                &device,
            )
            .map_err(candle)?;
            adapters.push(((*layer).clone(), Arc::new(adapter)));
        }

        let adapted: HashSet<&str> = chosen.iter().map(|l| l.name.as_str()).collect();
        let trainable: HashSet<String> = param_names
            .iter()
            .filter(|p| {
                let module = p.rsplit_once('.').map(|(m, _)| m).unwrap_or("");
                to_save(p)
                    || (config.bias == "all" && p.ends_with(".bias"))
                    || (config.bias == "lora_only"
                        && p.ends_with(".bias")
                        && adapted.contains(module))
            })
            .cloned()
            .collect();
        let fan_in_fan_out = chosen.iter().any(|l| l.fan_in_fan_out);
        let saved_modules: Vec<String> = modules
            .iter()
            .filter(|m| param_names.iter().any(|p| in_module(p, m)) || task_type == "SEQ_CLS")
            .cloned()
            .collect();
        let resolved = Resolved {
            task_type,
            target_names: chosen.iter().map(|l| l.name.clone()).collect(),
            default_targets: match config.target_modules {
                None => default_targets(&model_type),
                Some(_) => None,
            },
            modules_to_save: (!saved_modules.is_empty()).then_some(saved_modules),
            base_model_name_or_path: base_dir,
            fan_in_fan_out,
        };
        let mut model = PeftModel {
            base,
            config,
            resolved,
            adapters,
            trainable,
            added_params: 0,
        };
        model.added_params = model.counts().all - model.base_count();
        model.attach()?;
        let trainable = model.trainable.clone();
        model.base.freeze(&|name| !trainable.contains(name))?;
        Ok(model)
    }

    /// Puts the adapters into their layers' slots.
    fn attach(&mut self) -> Result<()> {
        let adapters = &self.adapters;
        self.base
            .visit_dense(&mut |layer: &DenseLayer, slot: &mut AdapterSlot| {
                if let Some((_, a)) = adapters.iter().find(|(l, _)| l.name == layer.name) {
                    *slot = Some(a.clone() as Arc<dyn DenseAdapter>);
                }
                Ok(())
            })?;
        Ok(())
    }

    /// The LoRA options.
    pub fn lora_config(&self) -> &LoraConfig {
        &self.config
    }

    /// What the options came to on this model.
    pub fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    /// The base model (adapters attached).
    pub fn base(&self) -> &M {
        &self.base
    }

    /// The adapted layers and their adapters.
    pub fn adapters(&self) -> impl Iterator<Item = (&DenseLayer, &LoraAdapter)> {
        self.adapters.iter().map(|(l, a)| (l, a.as_ref()))
    }

    /// Trainable and total parameter counts.
    pub fn counts(&self) -> ParameterCounts {
        let base = self.base_count();
        let trainable: usize = self.parameters().iter().map(|(_, v)| v.elem_count()).sum();
        let lora: usize = self
            .adapters
            .iter()
            .map(|(_, a)| a.a.elem_count() + a.b.elem_count())
            .sum();
        // peft trains a copy of each module to save and keeps the original: both count.
        let copies: usize = self
            .base
            .parameters()
            .iter()
            .filter(|(n, _)| self.is_saved_module(n))
            .map(|(_, v)| v.elem_count())
            .sum();
        ParameterCounts {
            trainable,
            all: base + lora + copies,
        }
    }

    /// The name peft saves a trainable base parameter under: a bias of an adapted
    /// layer is its `base_layer`'s (`….query.base_layer.bias`), the rest keep theirs.
    fn saved_name(&self, name: &str) -> String {
        if let Some((module, leaf)) = name.rsplit_once('.')
            && self.adapters.iter().any(|(l, _)| l.name == module)
        {
            return format!("{PREFIX}{module}.base_layer.{leaf}");
        }
        format!("{PREFIX}{name}")
    }

    /// The base model's parameter count.
    fn base_count(&self) -> usize {
        self.base
            .parameters()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    fn is_saved_module(&self, name: &str) -> bool {
        self.resolved
            .modules_to_save
            .as_ref()
            .is_some_and(|m| m.iter().any(|m| in_module(name, m)))
    }

    /// Merges the adapters into the base weights (`W += B·A·scaling`, transposed for
    /// `Conv1D`), as peft's `merge_and_unload`; the trained modules to save are already
    /// the base's. Returns the base model, unfrozen and without adapters.
    pub fn merge_and_unload(mut self) -> Result<M> {
        let params = self.base.parameters();
        for (layer, adapter) in &self.adapters {
            let name = format!("{}.weight", layer.name);
            let (_, w) = params.iter().find(|(n, _)| *n == name).ok_or_else(|| {
                Error::Config(format!("merge: the base model has no parameter {name}"))
            })?;
            let delta = adapter.delta_weight().map_err(candle)?;
            let delta = if layer.fan_in_fan_out {
                delta.t().map_err(candle)?
            } else {
                delta
            };
            let merged = (w.as_tensor().to_dtype(DType::F32).map_err(candle)?
                + delta.to_dtype(DType::F32).map_err(candle)?)
            .and_then(|t| t.to_dtype(w.dtype()))
            .map_err(candle)?;
            w.set(&merged).map_err(candle)?;
        }
        self.base
            .visit_dense(&mut |_: &DenseLayer, slot: &mut AdapterSlot| {
                *slot = None;
                Ok(())
            })?;
        self.base.freeze(&|_| false)?;
        Ok(self.base)
    }
}

/// Whether a module name is targeted.
type Matcher = Box<dyn Fn(&str) -> bool>;

/// Which dense layers the config targets.
fn resolve_targets(
    config: &LoraConfig,
    layers: &[DenseLayer],
    params: &[String],
    model_type: &str,
    architecture: &str,
    task: Task,
) -> Result<Matcher> {
    let list = |names: Vec<String>| -> Result<Matcher> {
        for t in &names {
            if !layers.iter().any(|l| matches_entry(&l.name, t)) {
                if let Some(module) = params
                    .iter()
                    .filter_map(|p| p.rsplit_once('.').map(|(m, _)| m))
                    .find(|m| matches_entry(m, t))
                {
                    return Err(Error::Config(format!(
                        "target module {t:?} is {module}, which is not a dense layer: kiln applies LoRA to dense layers \
                         only (LoRA on embeddings is not implemented); its dense layers are named {}",
                        layer_names(layers)
                    )));
                }
                return Err(Error::Config(format!(
                    "target module {t:?} is no dense layer of {architecture}; its dense layers are named {}",
                    layer_names(layers)
                )));
            }
        }
        Ok(Box::new(move |name: &str| {
            names.iter().any(|t| matches_entry(name, t))
        }))
    };
    match &config.target_modules {
        Some(Targets::Pattern(p)) if p.eq_ignore_ascii_case(ALL_LINEAR) => {
            // peft leaves out the output layer: the LM head, or a classifier's head.
            let heads: Vec<String> = match task {
                Task::CausalLm => vec!["lm_head".into()],
                Task::SequenceClassification => {
                    SEQ_CLS_HEADS.iter().map(|s| s.to_string()).collect()
                }
            };
            Ok(Box::new(move |name: &str| !heads.iter().any(|h| h == name)))
        }
        Some(Targets::Pattern(p)) => {
            let re = full_regex(p)?;
            Ok(Box::new(move |name: &str| re.is_match(name)))
        }
        Some(Targets::List(names)) => list(names.clone()),
        None => {
            let names = default_targets(model_type).ok_or_else(|| {
                Error::Config(format!(
                    "peft has no default target_modules for model_type {model_type:?}; give target_modules \
                     (its dense layers are named {})",
                    layer_names(layers)
                ))
            })?;
            list(names)
        }
    }
}

/// peft's list match: the module is the entry, or ends with `.entry`.
fn matches_entry(name: &str, entry: &str) -> bool {
    name == entry || name.ends_with(&format!(".{entry}"))
}

/// The distinct last components of the dense layers' names, for error messages.
fn layer_names(layers: &[DenseLayer]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for l in layers {
        let last = l.name.rsplit('.').next().unwrap_or(&l.name);
        if !names.contains(&last) {
            names.push(last);
        }
    }
    names.join(", ")
}

impl<M: Model> Model for PeftModel<M> {
    fn forward(&self, batch: &Batch, train: Option<&mut Rng>) -> candle_core::Result<Output> {
        self.base.forward(batch, train)
    }

    /// The adapters' A and B and the base's trainable parameters, in the base model's
    /// order, under peft's saved names.
    fn parameters(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (name, var) in self.base.parameters() {
            if let Some(layer) = name.strip_suffix(".weight")
                && let Some((_, a)) = self.adapters.iter().find(|(l, _)| l.name == layer)
            {
                out.push((format!("{PREFIX}{layer}.lora_A.weight"), a.a.clone()));
                out.push((format!("{PREFIX}{layer}.lora_B.weight"), a.b.clone()));
            }
            if self.trainable.contains(&name) {
                out.push((self.saved_name(&name), var));
            }
        }
        out
    }

    fn config(&self) -> Value {
        self.config.to_adapter_config(&self.resolved)
    }

    /// The adapters get the working copies `f` gives; the frozen base weights are cast
    /// to the same dtype (they have no master copy: they never change).
    fn map_parameters(
        &mut self,
        f: &mut dyn FnMut(&str, &Var) -> candle_core::Result<Var>,
    ) -> kiln_trainer::Result<()> {
        let mut dtype = None;
        for (layer, adapter) in &mut self.adapters {
            let a = f(&format!("{PREFIX}{}.lora_A.weight", layer.name), &adapter.a)?;
            let b = f(&format!("{PREFIX}{}.lora_B.weight", layer.name), &adapter.b)?;
            dtype = Some(a.dtype());
            *adapter = Arc::new(LoraAdapter {
                a,
                b,
                ..adapter.as_ref().clone()
            });
        }
        let names: std::collections::HashMap<String, String> = self
            .trainable
            .iter()
            .map(|n| (n.clone(), self.saved_name(n)))
            .collect();
        self.base.map_parameters(&mut |name, var| {
            if let Some(saved) = names.get(name) {
                f(saved, var)
            } else {
                Var::from_tensor(&var.to_dtype(dtype.unwrap_or(var.dtype()))?)
            }
        })?;
        self.attach()
            .map_err(|e| kiln_trainer::Error::Config(e.to_string()))
    }

    /// Reads an adapter folder's weights: every adapter tensor must be there, and
    /// nothing else may be (a name without peft's prefix would otherwise be ignored, as
    /// peft ignores it with only a warning).
    fn init_from(
        &self,
        dir: &std::path::Path,
    ) -> kiln_trainer::Result<kiln_trainer::weights::LoadInfo> {
        let info =
            kiln_trainer::weights::load_into(&self.parameters(), &[], dir, &Default::default())?;
        // peft's bias="all" also saves the biases inside its modules-to-save wrappers
        // (`classifier.original_module.bias`, `classifier.modules_to_save.bias`):
        // copies of what it loads under the module's own name, ignored as peft does.
        let unexpected: Vec<&str> = info
            .unexpected
            .iter()
            .map(String::as_str)
            .filter(|n| !n.contains(".original_module.") && !n.contains(".modules_to_save."))
            .collect();
        if !unexpected.is_empty() {
            return Err(kiln_trainer::Error::Config(format!(
                "{}: the adapter's files hold tensors its adapter_config.json does not describe: {}",
                dir.display(),
                unexpected.join(", ")
            )));
        }
        Ok(info)
    }

    /// As transformers counts a PEFT model (its base's `floating_point_ops`, adapters
    /// inside): the base's count plus 6 × tokens × the adapters' parameters and peft's
    /// copies of the modules to save.
    fn floating_point_ops(&self, batch: &Batch) -> f64 {
        self.base.floating_point_ops(batch)
            + 6.0 * batch.input_ids.elem_count() as f64 * self.added_params as f64
    }

    fn no_weight_decay(&self, name: &str) -> bool {
        match name.strip_prefix(PREFIX) {
            Some(n) if n.contains(".lora_") => false,
            Some(n) => self.base.no_weight_decay(n),
            None => self.base.no_weight_decay(name),
        }
    }

    /// The base's input embeddings (transformers hooks a PEFT model's the same way).
    fn set_neftune_noise_alpha(&mut self, alpha: Option<f64>) -> bool {
        self.base.set_neftune_noise_alpha(alpha)
    }

    /// The base's layers, with their adapters.
    fn set_activation_checkpointing(&mut self, every_n_layers: Option<usize>) -> bool {
        self.base.set_activation_checkpointing(every_n_layers)
    }
}

impl<M: TaskModel> TaskModel for PeftModel<M> {
    fn generate_greedy(
        &self,
        input_ids: &Tensor,
        max_new_tokens: usize,
    ) -> candle_core::Result<Tensor> {
        self.base.generate_greedy(input_ids, max_new_tokens)
    }

    fn set_generation_config(&mut self, generation_config: Value) {
        self.base.set_generation_config(generation_config)
    }
}
