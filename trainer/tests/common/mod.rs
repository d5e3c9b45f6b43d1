//! A tiny classifier and synthetic data for the trainer's tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use kiln_trainer::model::{Batch, Model, Output};
use kiln_trainer::rng::Rng;
use kiln_trainer::{BatchSource, TrainingArguments};

/// Embedding → mean pool → dropout → linear, with transformers-style names.
pub struct Tiny {
    emb: Var,
    w: Var,
    b: Var,
    pub dropout: f64,
    /// Multiplies the loss (1: none); a large value makes fp16 gradients overflow.
    pub loss_scale: f64,
}

pub const VOCAB: usize = 16;
pub const HIDDEN: usize = 8;

impl Tiny {
    pub fn new(seed: u64) -> Self {
        let mut rng = Rng::seed_from_u64(seed);
        let d = Device::Cpu;
        Tiny {
            emb: Var::from_tensor(&rng.normal_tensor(&[VOCAB, HIDDEN], 0.0, 0.5, &d).unwrap())
                .unwrap(),
            w: Var::from_tensor(&rng.normal_tensor(&[2, HIDDEN], 0.0, 0.5, &d).unwrap()).unwrap(),
            b: Var::from_tensor(&Tensor::zeros(2, DType::F32, &d).unwrap()).unwrap(),
            dropout: 0.2,
            loss_scale: 1.0,
        }
    }
}

impl Model for Tiny {
    fn forward(&self, batch: &Batch, train: Option<&mut Rng>) -> candle_core::Result<Output> {
        let (b, t) = batch.input_ids.dims2()?;
        let x = self
            .emb
            .as_tensor()
            .embedding(&batch.input_ids.flatten_all()?)?
            .reshape((b, t, HIDDEN))?;
        let mut x = x.mean(1)?;
        if let Some(rng) = train {
            let mask = rng.dropout_mask(&[b, HIDDEN], self.dropout, &Device::Cpu)?;
            x = (&x * mask.to_dtype(x.dtype())?)?;
        }
        let logits = x
            .matmul(&self.w.as_tensor().t()?)?
            .broadcast_add(self.b.as_tensor())?;
        let loss = match &batch.labels {
            Some(l) => {
                let loss = candle_nn::loss::cross_entropy(
                    &logits.to_dtype(DType::F32)?,
                    &l.to_dtype(DType::U32)?,
                )?;
                Some(if self.loss_scale == 1.0 {
                    loss
                } else {
                    loss.affine(self.loss_scale, 0.0)?
                })
            }
            None => None,
        };
        Ok(Output { loss, logits })
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        vec![
            ("embeddings.weight".into(), self.emb.clone()),
            ("classifier.weight".into(), self.w.clone()),
            ("classifier.bias".into(), self.b.clone()),
        ]
    }

    fn map_parameters(
        &mut self,
        f: &mut dyn FnMut(&str, &Var) -> candle_core::Result<Var>,
    ) -> kiln_trainer::Result<()> {
        self.emb = f("embeddings.weight", &self.emb)?;
        self.w = f("classifier.weight", &self.w)?;
        self.b = f("classifier.bias", &self.b)?;
        Ok(())
    }

    fn config(&self) -> serde_json::Value {
        serde_json::json!({"architectures": ["TinyForTests"], "model_type": "tiny", "vocab_size": VOCAB, "hidden_size": HIDDEN})
    }
}

/// `n` sequences of 4 ids; label 1 when their sum is at least 30 (the mean).
pub struct Synthetic {
    pub ids: Vec<[u32; 4]>,
}

impl Synthetic {
    pub fn new(n: usize, seed: u64) -> Arc<Self> {
        let mut rng = Rng::seed_from_u64(seed);
        Arc::new(Synthetic {
            ids: (0..n)
                .map(|_| std::array::from_fn(|_| rng.below(VOCAB as u64) as u32))
                .collect(),
        })
    }
}

impl BatchSource for Synthetic {
    fn len(&self) -> usize {
        self.ids.len()
    }
    fn batch(&self, indices: &[usize], device: &Device) -> kiln_trainer::Result<Batch> {
        let flat: Vec<u32> = indices.iter().flat_map(|&i| self.ids[i]).collect();
        let labels: Vec<i64> = indices
            .iter()
            .map(|&i| i64::from(self.ids[i].iter().sum::<u32>() >= 30))
            .collect();
        Ok(Batch {
            input_ids: Tensor::from_vec(flat, (indices.len(), 4), device)?,
            attention_mask: None,
            token_type_ids: None,
            labels: Some(Tensor::new(labels, device)?),
        })
    }
}

pub fn args(out: &Path) -> TrainingArguments {
    let mut a = TrainingArguments::new(out.display().to_string());
    a.per_device_train_batch_size = 8;
    a.per_device_eval_batch_size = 16;
    a.learning_rate = 0.05;
    a.num_train_epochs = 3.0;
    a.logging_steps = 5.0;
    a.save_steps = 10.0;
    a.disable_tqdm = true;
    a
}

pub fn weights(model: &Tiny) -> Vec<Vec<f32>> {
    model
        .parameters()
        .iter()
        .map(|(_, v)| kiln_test_support::tensors::f32_values(v))
        .collect()
}

/// log_history without timing values (and entries that only held timings).
pub fn history_without_timings(
    s: &kiln_checkpoint::state::TrainerState,
) -> Vec<std::collections::BTreeMap<String, kiln_formats::pyjson::PyValue>> {
    let timing =
        |k: &str| k.ends_with("_runtime") || k.ends_with("_per_second") || k.starts_with("save_");
    s.log_history
        .iter()
        .map(|e| {
            e.iter()
                .filter(|(k, _)| !timing(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<std::collections::BTreeMap<_, _>>()
        })
        .filter(|e| e.keys().any(|k| k != "epoch" && k != "step"))
        .collect()
}
