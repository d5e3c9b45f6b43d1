//! A model of your own in kiln: a tiny MLP classifier implementing
//! [`kiln_trainer::model::Model`], trained for a few steps, saved as a Hugging Face
//! style model folder and loaded back.
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
//! Saving is then `kiln_trainer::weights::save_pretrained(&model, dir, &options)`, and
//! loading `model.init_from(dir)` on a model built from the folder's `config.json`.

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use kiln_checkpoint::model::SaveOptions;
use kiln_trainer::model::{Batch, Model, Output};
use kiln_trainer::rng::Rng;
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

/// A toy task: does the sequence contain token 1?
fn toy_batch(rng: &mut Rng, device: &Device) -> candle_core::Result<Batch> {
    let (b, t) = (16, 6);
    let mut ids = Vec::with_capacity(b * t);
    let mut labels = Vec::with_capacity(b);
    for _ in 0..b {
        let row: Vec<u32> = (0..t).map(|_| rng.below(8) as u32).collect();
        labels.push(i64::from(row.contains(&1)));
        ids.extend(row);
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: None,
        token_type_ids: None,
        labels: Some(Tensor::new(labels.as_slice(), device)?),
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let mut rng = Rng::seed_from_u64(0);
    let config = json!({"vocab_size": 8, "hidden_size": 16, "num_labels": 2, "dropout": 0.1});
    let model = MlpClassifier::new(&config, &mut rng, &device)?;

    // A few steps of plain SGD (kiln's Trainer does this with AdamW, schedules, …).
    let vars: Vec<Var> = model.parameters().into_iter().map(|(_, v)| v).collect();
    let mut sgd = candle_nn::SGD::new(vars, 2.0)?;
    let mut data = Rng::with_stream(0, 1);
    for step in 0..100 {
        let batch = toy_batch(&mut data, &device)?;
        let loss = model
            .forward(&batch, Some(&mut rng))?
            .loss
            .ok_or("no loss")?;
        sgd.backward_step(&loss)?;
        if step % 25 == 0 || step == 99 {
            println!("step {step:2}: loss {:.4}", loss.to_scalar::<f32>()?);
        }
    }

    // Save as a model folder: config.json + model.safetensors.
    let dir = std::env::temp_dir().join(format!("kiln-custom-model-{}", std::process::id()));
    let saved = kiln_trainer::weights::save_pretrained(&model, &dir, &SaveOptions::default())?;
    for file in saved.files() {
        println!("wrote {}", file.display());
    }

    // Load it back: build from config.json (a different seed: every weight is replaced),
    // then read the weights.
    let config = kiln_checkpoint::model::read_config(&dir)?;
    let reloaded = MlpClassifier::new(&config, &mut Rng::seed_from_u64(99), &device)?;
    let info = reloaded.init_from(&dir)?;
    assert!(info.fresh.is_empty() && info.unexpected.is_empty());

    let batch = toy_batch(&mut data, &device)?;
    let before = model.forward(&batch, None)?.logits;
    let after = reloaded.forward(&batch, None)?.logits;
    let diff = (before - &after)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let predicted = after.argmax(D::Minus1)?.to_dtype(DType::I64)?;
    let labels = batch.labels.ok_or("no labels")?;
    let correct = predicted
        .eq(&labels)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    println!("reloaded: max |logit difference| {diff}, accuracy {correct}/16");
    assert_eq!(diff, 0.0);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
