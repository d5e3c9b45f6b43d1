//! The [`Model`] trait: what the trainer needs from a model.
//!
//! kiln's own models (BERT for sequence classification, GPT-2 LM head) implement it, and
//! so can yours: name the parameters as transformers names them, describe `config.json`,
//! declare tied weights, and compute a loss in [`Model::forward`] when labels are given.
//! `trainer/examples/custom_model.rs` shows a complete one, trained by kiln's
//! [`Trainer`](crate::Trainer).
//!
//! Saving and loading model folders works for every implementation:
//! [`crate::weights::save_pretrained`] writes what transformers' `from_pretrained`
//! loads, and [`Model::init_from`] reads a folder back, following the model's
//! [`Model::load_rules`] (kiln's BERT and GPT-2 use them to read base-model folders and
//! the legacy names and buffers of older transformers).

use std::path::Path;

use candle_core::{DType, Tensor, Var};

use crate::rng::Rng;
use crate::weights::load::{LoadInfo, LoadRules, load_into};

/// One batch, as a collator makes it; every tensor on the model's device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids, u32 `[batch, seq]`.
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding, u32 `[batch, seq]`.
    pub attention_mask: Option<Tensor>,
    /// Segment ids (BERT), u32 `[batch, seq]`.
    pub token_type_ids: Option<Tensor>,
    /// Targets: i64 class ids `[batch]` (classification), f32 `[batch]` or
    /// `[batch, labels]` (regression), or i64 token ids `[batch, seq]` with -100 for
    /// positions to ignore (causal LM; the model shifts them).
    pub labels: Option<Tensor>,
}

impl Batch {
    /// Number of examples in the batch.
    pub fn len(&self) -> usize {
        self.input_ids.dims().first().copied().unwrap_or(0)
    }

    /// Whether the batch holds no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a model is trained for; it decides how data is read and batched and what
/// `kiln predict` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Texts with a class or a regression target (`...ForSequenceClassification`).
    SequenceClassification,
    /// A corpus cut into blocks for next-token prediction (`...LMHeadModel`,
    /// `...ForCausalLM`).
    CausalLm,
}

impl Task {
    /// The task of a transformers architecture name, by its suffix.
    pub fn for_architecture(architecture: &str) -> Option<Task> {
        if architecture.ends_with("ForSequenceClassification") {
            Some(Task::SequenceClassification)
        } else if architecture.ends_with("LMHeadModel") || architecture.ends_with("ForCausalLM") {
            Some(Task::CausalLm)
        } else {
            None
        }
    }
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct Output {
    /// The mean loss over the batch, when labels were given.
    pub loss: Option<Tensor>,
    /// The logits (`[batch, labels]`, or `[batch, seq, vocab]` for a language model).
    pub logits: Tensor,
}

/// A trainable model.
pub trait Model: Send {
    /// Runs the model. `train` carries the generator for dropout during training and is
    /// `None` in evaluation, where dropout is off.
    fn forward(&self, batch: &Batch, train: Option<&mut Rng>) -> candle_core::Result<Output>;

    /// The trainable parameters with transformers' names, in the order transformers'
    /// `state_dict()` lists them (sharding follows it), tied copies left out.
    fn parameters(&self) -> Vec<(String, Var)>;

    /// The keys of `config.json`, including `architectures` and `model_type`.
    fn config(&self) -> serde_json::Value;

    /// `generation_config.json`, for generative models.
    fn generation_config(&self) -> Option<serde_json::Value> {
        None
    }

    /// Tied weights as (tied name, source name), e.g.
    /// `("lm_head.weight", "transformer.wte.weight")`.
    fn tied_weights(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// How [`Model::init_from`] finds the parameters in a folder: by their own names
    /// only, unless the model says otherwise (a base model prefix, heads that may be
    /// initialised afresh, legacy buffers to drop).
    fn load_rules(&self) -> LoadRules {
        LoadRules::default()
    }

    /// Loads the weights of the model folder `dir` into the parameters (see
    /// [`crate::weights`] for the rules); on error no parameter has changed.
    ///
    /// This and [`Model::load_rules`] refine the trait the trainer started with: the
    /// trainer resumes and `kiln train --model DIR` loads any model, and transformers'
    /// architectures need per-model rules to read the folders transformers wrote.
    fn init_from(&self, dir: &Path) -> crate::Result<LoadInfo> {
        load_into(
            &self.parameters(),
            &self.tied_weights(),
            dir,
            &self.load_rules(),
        )
    }

    /// Replaces every parameter variable by the one `f` returns for it, given its name
    /// (as [`Model::parameters`] names it) and its current variable. The trainer's bf16
    /// and fp16 training calls it once to give the model a working copy of its
    /// parameters in the low-precision dtype (new variables): the variables handed out by
    /// [`Model::parameters`] before the call keep the f32 values and become the master
    /// weights the optimizer updates, and the working copy is refreshed from them after
    /// every optimizer step.
    ///
    /// A model whose forward pass should run in bf16 or f16 implements it by assigning
    /// each of its `Var` fields (`self.w = f("classifier.weight", &self.w)?;`) and makes
    /// its forward pass work with parameters of that dtype (kiln's models compute
    /// LayerNorm, softmax and losses in f32, as torch's autocast does). The default
    /// refuses, so bf16/fp16 training of a model without it is a clear error.
    fn map_parameters(
        &mut self,
        f: &mut dyn FnMut(&str, &Var) -> candle_core::Result<Var>,
    ) -> crate::Result<()> {
        let _ = f;
        Err(crate::Error::Config(
            "this model cannot train in bf16 or fp16: it does not implement Model::map_parameters"
                .into(),
        ))
    }

    /// The dtype `save_model` writes the weights in, when not the trainer's own: a model
    /// loaded from a folder of bf16 weights saves bf16 again, as transformers (which
    /// loads and trains in the folder's dtype) would. Checkpoints keep the f32 master
    /// weights, which exact resume needs. `None` (the default): as they are.
    fn saved_dtype(&self) -> Option<DType> {
        None
    }

    /// Whether weight decay skips this parameter. transformers skips biases and the
    /// parameters of normalisation layers; the default recognises their usual names.
    fn no_weight_decay(&self, name: &str) -> bool {
        default_no_weight_decay(name)
    }

    /// The floating-point operations of a forward and backward pass over `batch`, as
    /// transformers' `floating_point_ops` counts them: 6 × tokens (`input_ids`
    /// elements, padding included) × the parameters outside embedding tables (the
    /// default finds them by their usual names: `*embeddings.weight`, `wte`, `wpe`,
    /// `embed_tokens`). It feeds `total_flos`.
    fn floating_point_ops(&self, batch: &Batch) -> f64 {
        let embedding = |n: &str| {
            n.ends_with("embeddings.weight")
                || n.ends_with("wte.weight")
                || n.ends_with("wpe.weight")
                || n.ends_with("embed_tokens.weight")
        };
        let params: usize = self
            .parameters()
            .iter()
            .filter(|(n, _)| !embedding(n))
            .map(|(_, v)| v.elem_count())
            .sum();
        6.0 * batch.input_ids.elem_count() as f64 * params as f64
    }

    /// Calls `f` for every dense layer (in [`Model::parameters`] order) with the slot
    /// of its adapter, which `f` may read, set or clear; a layer with an adapter adds
    /// the adapter's output to its own ([`crate::adapter`]). The default: this model
    /// takes no adapters.
    fn visit_dense(&mut self, f: crate::adapter::DenseVisitor<'_>) -> crate::Result<()> {
        let _ = f;
        Err(crate::Error::Config(
            "this model takes no adapters: it does not implement Model::visit_dense".into(),
        ))
    }

    /// NEFTune (`neftune_noise_alpha`): while training, add uniform noise in
    /// `±alpha / sqrt(seq · hidden)` to the input embeddings' output, drawn from the
    /// training generator; `None` turns it off. Returns whether the model takes it
    /// (the default: no).
    fn set_neftune_noise_alpha(&mut self, alpha: Option<f64>) -> bool {
        let _ = alpha;
        false
    }

    /// Activation checkpointing (`activation_checkpointing`): while training, run
    /// every `n`-th repeated layer (layers 0, n, 2n, …) through
    /// [`crate::recompute::checkpoint`], so that backward recomputes its activations;
    /// `None` turns it off. Returns whether the model takes it (the default: no).
    fn set_activation_checkpointing(&mut self, every_n_layers: Option<usize>) -> bool {
        let _ = every_n_layers;
        false
    }

    /// Freezes the parameters (as [`Model::parameters`] names them) that `frozen`
    /// accepts and unfreezes the others: a frozen parameter is a constant of the
    /// forward pass, so no gradient is computed for it. The default refuses.
    fn freeze(&mut self, frozen: &dyn Fn(&str) -> bool) -> crate::Result<()> {
        let _ = frozen;
        Err(crate::Error::Config(
            "this model cannot freeze parameters: it does not implement Model::freeze".into(),
        ))
    }
}

/// transformers' no-decay rule for the usual names: biases and the parameters of
/// normalisation layers.
pub fn default_no_weight_decay(name: &str) -> bool {
    name.ends_with("bias")
        || name.contains("LayerNorm")
        || name.contains("layer_norm")
        || name.contains(".ln_")
        || name.starts_with("ln_")
}
