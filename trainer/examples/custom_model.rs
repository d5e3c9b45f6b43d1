//! A model of your own in kiln: a tiny MLP classifier implementing
//! [`kiln_trainer::model::Model`], trained by kiln's [`Trainer`] on a [`BatchSource`]
//! of its own (with evaluation and checkpoints), saved as a Hugging Face style model
//! folder and loaded back.
//!
//! ```text
//! cargo run -p kiln-trainer --example custom_model
//! ```
//!
//! What the trait asks of a model:
//!
//! - `forward(batch, train)`: logits, and the mean loss when the batch has labels. `train`
//!   is `Some(rng)` in training: draw dropout masks from it (never from candle's
//!   generator, which cannot be seeded), so that a resumed run repeats them exactly.
//! - `parameters()`: every trainable tensor as a `candle_core::Var`, named as the
//!   checkpoint should name it, in a fixed order (sharding follows it).
//! - `config()`: the `config.json` keys, with `model_type` and `architectures`.
//! - optionally `tied_weights()`, `generation_config()`, `no_weight_decay(name)` and
//!   `load_rules()` (how `init_from` finds parameters stored under other names).
//!
//! Saving is then `trainer.save_model(..)` (or `kiln_trainer::weights::save_pretrained`
//! without a trainer), and loading `model.init_from(dir)` on a model built from the
//! folder's `config.json`. To train it with `kiln train` too, register it as an
//! architecture (`tests/plugin-example`).

use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor, Var};
use kiln_trainer::args::Strategy;
use kiln_trainer::model::{Batch, Model, Output};
use kiln_trainer::rng::Rng;
use kiln_trainer::{BatchSource, Trainer, TrainingArguments, accuracy};
use serde_json::{Value, json};

/// Mean of the token embeddings (padding left out) → dense + ReLU → dropout → classes.
struct MlpClassifier {
    vocab_size: usize,
    hidden_size: usize,
    num_labels: usize,
    dropout: f64,
    embed: Var,
    hidden_weight: Var,
    hidden_bias: Var,
    out_weight: Var,
    out_bias: Var,
}

impl MlpClassifier {
    /// A new model: weights normal(0, 0.1) drawn from kiln's seeded `Rng`, biases zero.
    fn new(config: &Value, rng: &mut Rng, device: &Device) -> kiln_trainer::Result<Self> {
        let get = |key: &str| {
            config[key].as_u64().map(|v| v as usize).ok_or_else(|| {
                kiln_trainer::Error::Config(format!("config.json: {key} must be a number"))
            })
        };
        let (vocab_size, hidden_size, num_labels) =
            (get("vocab_size")?, get("hidden_size")?, get("num_labels")?);
        let normal = |rng: &mut Rng, shape: &[usize]| -> candle_core::Result<Var> {
            Var::from_tensor(&rng.normal_tensor(shape, 0.0, 0.1, device)?)
        };
        Ok(MlpClassifier {
            vocab_size,
            hidden_size,
            num_labels,
            dropout: config["dropout"].as_f64().unwrap_or(0.0),
            embed: normal(rng, &[vocab_size, hidden_size])?,
            // torch's nn.Linear layout: [out, in].
            hidden_weight: normal(rng, &[hidden_size, hidden_size])?,
            hidden_bias: Var::zeros(hidden_size, DType::F32, device)?,
            out_weight: normal(rng, &[num_labels, hidden_size])?,
            out_bias: Var::zeros(num_labels, DType::F32, device)?,
        })
    }
}

impl Model for MlpClassifier {
    fn forward(&self, batch: &Batch, train: Option<&mut Rng>) -> candle_core::Result<Output> {
        let (b, t) = batch.input_ids.dims2()?;
        let tokens = self
            .embed
            .as_tensor()
            .index_select(&batch.input_ids.flatten_all()?, 0)?
            .reshape((b, t, self.hidden_size))?;
        let mask = match &batch.attention_mask {
            Some(m) => m.to_dtype(DType::F32)?,
            None => Tensor::ones((b, t), DType::F32, batch.input_ids.device())?,
        };
        let summed = tokens.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
        let pooled = summed.broadcast_div(&mask.sum_keepdim(1)?)?;
        let hidden = pooled
            .matmul(&self.hidden_weight.as_tensor().t()?)?
            .broadcast_add(self.hidden_bias.as_tensor())?
            .relu()?;
        let hidden = match train {
            // Dropout only in training, with a mask from kiln's Rng.
            Some(rng) if self.dropout > 0.0 => {
                (hidden.clone()
                    * rng.dropout_mask(hidden.dims(), self.dropout, hidden.device())?)?
            }
            _ => hidden,
        };
        let logits = hidden
            .matmul(&self.out_weight.as_tensor().t()?)?
            .broadcast_add(self.out_bias.as_tensor())?;
        let loss = match &batch.labels {
            Some(labels) => Some(candle_nn::loss::cross_entropy(&logits, labels)?),
            None => None,
        };
        Ok(Output { loss, logits })
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        vec![
            ("embed.weight".into(), self.embed.clone()),
            ("hidden.weight".into(), self.hidden_weight.clone()),
            ("hidden.bias".into(), self.hidden_bias.clone()),
            ("out.weight".into(), self.out_weight.clone()),
            ("out.bias".into(), self.out_bias.clone()),
        ]
    }

    fn config(&self) -> Value {
        json!({
            "model_type": "kiln-mlp",
            "architectures": ["KilnMlpClassifier"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_labels": self.num_labels,
            "dropout": self.dropout,
        })
    }
}

/// A toy task: does the sequence contain token 1? `n` examples drawn from a seeded
/// stream, as a [`BatchSource`] the trainer batches (and shuffles per epoch).
struct ToyData {
    rows: Vec<Vec<u32>>,
    labels: Vec<i64>,
}

impl ToyData {
    fn new(n: usize, stream: u64) -> Self {
        let mut rng = Rng::with_stream(0, stream);
        let rows: Vec<Vec<u32>> = (0..n)
            .map(|_| (0..6).map(|_| rng.below(8) as u32).collect())
            .collect();
        let labels = rows.iter().map(|r| i64::from(r.contains(&1))).collect();
        ToyData { rows, labels }
    }
}

impl BatchSource for ToyData {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn batch(&self, indices: &[usize], device: &Device) -> kiln_trainer::Result<Batch> {
        let ids: Vec<u32> = indices.iter().flat_map(|&i| self.rows[i].clone()).collect();
        let labels: Vec<i64> = indices.iter().map(|&i| self.labels[i]).collect();
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (indices.len(), 6), device)?,
            attention_mask: None,
            token_type_ids: None,
            labels: Some(Tensor::new(labels.as_slice(), device)?),
        })
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let mut rng = Rng::seed_from_u64(0);
    let config = json!({"vocab_size": 8, "hidden_size": 16, "num_labels": 2, "dropout": 0.1});
    let model = MlpClassifier::new(&config, &mut rng, &device)?;

    // kiln's Trainer: AdamW with a linear schedule, evaluation and a checkpoint every
    // epoch (the newest two kept), then the model folder in output_dir.
    let out = std::env::temp_dir().join(format!("kiln-custom-model-{}", std::process::id()));
    let mut args = TrainingArguments::new(out.display().to_string());
    args.num_train_epochs = 5.0;
    args.per_device_train_batch_size = 16;
    args.learning_rate = 2e-2;
    args.eval_strategy = Strategy::Epoch;
    args.save_strategy = Strategy::Epoch;
    args.save_total_limit = Some(2);
    args.logging_steps = 20.0;
    args.disable_tqdm = true;
    let mut trainer = Trainer::new(model, args)
        .with_train_dataset(Arc::new(ToyData::new(256, 1)))
        .with_eval_dataset(Arc::new(ToyData::new(64, 2)))
        .with_compute_metrics(accuracy);
    let result = trainer.train(None)?;
    println!(
        "trained {} steps, loss {:.4}",
        result.global_step, result.training_loss
    );
    let dir = trainer.save_model(None)?;
    println!("model folder: {}", dir.display());

    // Load it back: build from config.json (a different seed: every weight is replaced),
    // then read the weights.
    let config = kiln_checkpoint::model::read_config(&dir)?;
    let reloaded = MlpClassifier::new(&config, &mut Rng::seed_from_u64(99), &device)?;
    let info = reloaded.init_from(&dir)?;
    assert!(info.fresh.is_empty() && info.unexpected.is_empty());

    let eval = ToyData::new(64, 2);
    let batch = eval.batch(&(0..64).collect::<Vec<_>>(), &device)?;
    let before = trainer.model().forward(&batch, None)?.logits;
    let after = reloaded.forward(&batch, None)?.logits;
    let diff = (before - &after)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let predicted = after.argmax(D::Minus1)?.to_dtype(DType::I64)?;
    let labels = batch.labels.ok_or("no labels")?;
    let correct = predicted
        .eq(&labels)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    println!("reloaded: max |logit difference| {diff}, accuracy {correct}/64");
    assert_eq!(diff, 0.0);
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
