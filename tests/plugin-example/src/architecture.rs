//! The architecture plugin: a model kiln does not have, registered under the class name
//! its `config.json` carries, so `kiln train`, `eval` and `predict` find it.
//!
//! What makes it a kiln architecture:
//! 1. it implements [`kiln_trainer::Model`] (a forward pass with a loss when labels are
//!    given, parameters by name, `config.json`) and [`kiln_models::TaskModel`];
//! 2. it registers a [`kiln_models::Architecture`] with `inventory::submit!`: the task
//!    (classification: the data is read as texts with labels), the tokenizer family kiln
//!    trains for it (`bert`: WordPiece), a default config, and how to build it afresh
//!    or load it from a folder;
//! 3. the binary references this crate, as for a backend.
//!
//! The model: `logits = W · mean(embeddings of the real tokens) + b`. Its weights are
//! drawn from kiln's seeded [`Rng`], so a run is reproducible.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use kiln_models::{Architecture, TaskModel};
use kiln_trainer::Task;
use kiln_trainer::model::{Batch, Model, Output};
use kiln_trainer::rng::Rng;
use serde_json::{Value, json};

/// The class name in `config.json`.
pub const NAME: &str = "BagOfWordsForSequenceClassification";

/// A bag-of-words classifier.
#[derive(Debug)]
pub struct BagOfWords {
    config: Value,
    embeddings: Var,
    weight: Var,
    bias: Var,
}

/// A `usize` key of the config, or its default.
fn size(config: &Value, key: &str, default: usize) -> kiln_models::Result<usize> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| {
                kiln_models::Error::Config(format!("{key} must be a positive integer, got {v}"))
            }),
    }
}

impl BagOfWords {
    /// A fresh model for `config` (`vocab_size`, `hidden_size`, `id2label` or
    /// `num_labels`, `initializer_range`).
    pub fn new(config: &Value, rng: &mut Rng, device: &Device) -> kiln_models::Result<Self> {
        let vocab = size(config, "vocab_size", 1000)?;
        let hidden = size(config, "hidden_size", 32)?;
        let labels = match config.get("id2label").and_then(Value::as_object) {
            Some(m) => m.len(),
            None => size(config, "num_labels", 2)?,
        };
        let std = config["initializer_range"].as_f64().unwrap_or(0.02);
        let mut config = config.clone();
        if let Value::Object(m) = &mut config {
            m.insert("architectures".into(), json!([NAME]));
            m.insert("model_type".into(), json!("bag-of-words"));
            m.insert("vocab_size".into(), json!(vocab));
            m.insert("hidden_size".into(), json!(hidden));
            m.insert("num_labels".into(), json!(labels));
        }
        Ok(BagOfWords {
            config,
            embeddings: Var::from_tensor(&rng.normal_tensor(
                &[vocab, hidden],
                0.0,
                std,
                device,
            )?)?,
            weight: Var::from_tensor(&rng.normal_tensor(&[labels, hidden], 0.0, std, device)?)?,
            bias: Var::zeros(labels, DType::F32, device)?,
        })
    }

    /// The model a folder's `config.json` describes, with the folder's weights.
    pub fn from_pretrained(
        dir: &Path,
        rng: &mut Rng,
        device: &Device,
    ) -> kiln_models::Result<(Self, kiln_trainer::weights::LoadInfo)> {
        let config = kiln_checkpoint::model::read_config(dir)?;
        let model = BagOfWords::new(&config, rng, device)?;
        let info = model.init_from(dir)?;
        Ok((model, info))
    }
}

impl Model for BagOfWords {
    fn forward(&self, batch: &Batch, _train: Option<&mut Rng>) -> candle_core::Result<Output> {
        let (b, s) = batch.input_ids.dims2()?;
        let ids = batch.input_ids.flatten_all()?;
        let hidden = self.embeddings.dim(1)?;
        let tokens = self
            .embeddings
            .index_select(&ids, 0)?
            .reshape((b, s, hidden))?;
        let mask = match &batch.attention_mask {
            Some(m) => m.to_dtype(DType::F32)?,
            None => Tensor::ones((b, s), DType::F32, tokens.device())?,
        };
        let summed = tokens.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
        let counts = mask.sum_keepdim(1)?.clamp(1.0, f64::MAX)?;
        let pooled = summed.broadcast_div(&counts)?;
        let logits = pooled
            .matmul(&self.weight.t()?)?
            .broadcast_add(self.bias.as_tensor())?;
        let loss = match &batch.labels {
            Some(labels) => Some(candle_nn::loss::cross_entropy(
                &logits,
                &labels.to_dtype(DType::U32)?,
            )?),
            None => None,
        };
        Ok(Output { loss, logits })
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        vec![
            ("embeddings.weight".into(), self.embeddings.clone()),
            ("classifier.weight".into(), self.weight.clone()),
            ("classifier.bias".into(), self.bias.clone()),
        ]
    }

    fn config(&self) -> Value {
        self.config.clone()
    }
}

impl TaskModel for BagOfWords {}

inventory::submit! {
    Architecture::new(
        NAME,
        Task::SequenceClassification,
        "bert",
        || json!({"vocab_size": 1000, "hidden_size": 32, "num_labels": 2, "initializer_range": 0.02}),
        |config, rng, device| Ok(Box::new(BagOfWords::new(config, rng, device)?)),
        |dir, rng, device| {
            let (model, info) = BagOfWords::from_pretrained(dir, rng, device)?;
            Ok((Box::new(model), info))
        },
    )
}
