//! bf16 / fp16 mixed-precision training of BERT and GPT-2: the loss falls, f32 master
//! weights are saved and load back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use kiln_models::{
    BertConfig, BertForSequenceClassification, Gpt2Config, Gpt2LMHeadModel, LlamaConfig,
    LlamaForCausalLM,
};
use kiln_test_support::tensors::f32_values;
use kiln_trainer::model::{Batch, Model};
use kiln_trainer::rng::Rng;
use kiln_trainer::{BatchSource, Trainer, TrainingArguments};

/// BERT examples: label = first token mod 3 (the pooler reads the first position).
struct Classify(Vec<[u32; 6]>);

/// GPT-2 examples: counting sequences, each token the previous one plus 1.
struct Count(Vec<[u32; 8]>);

fn draws(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::seed_from_u64(seed);
    (0..n).map(|_| 1 + rng.below(80) as u32).collect()
}

impl BatchSource for Classify {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn batch(&self, idx: &[usize], device: &Device) -> kiln_trainer::Result<Batch> {
        let ids: Vec<u32> = idx.iter().flat_map(|&i| self.0[i]).collect();
        let labels: Vec<i64> = idx.iter().map(|&i| i64::from(self.0[i][0] % 3)).collect();
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (idx.len(), 6), device)?,
            attention_mask: None,
            token_type_ids: None,
            labels: Some(Tensor::new(labels, device)?),
        })
    }
}

impl BatchSource for Count {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn batch(&self, idx: &[usize], device: &Device) -> kiln_trainer::Result<Batch> {
        let ids: Vec<u32> = idx.iter().flat_map(|&i| self.0[i]).collect();
        let labels: Vec<i64> = ids.iter().map(|&x| i64::from(x)).collect();
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (idx.len(), 8), device)?,
            attention_mask: None,
            token_type_ids: None,
            labels: Some(Tensor::from_vec(labels, (idx.len(), 8), device)?),
        })
    }
}

fn bert() -> BertForSequenceClassification {
    let config = BertConfig {
        vocab_size: 99,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 16,
        ..BertConfig::default()
    }
    .with_num_labels(3);
    BertForSequenceClassification::new(config, &mut Rng::seed_from_u64(3), &Device::Cpu).unwrap()
}

fn gpt2() -> Gpt2LMHeadModel {
    let config = Gpt2Config {
        vocab_size: 99,
        n_positions: 16,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        n_inner: Some(64),
        bos_token_id: Some(98),
        eos_token_id: Some(kiln_models::TokenIds::One(98)),
        ..Gpt2Config::default()
    };
    Gpt2LMHeadModel::new(config, &mut Rng::seed_from_u64(3), &Device::Cpu).unwrap()
}

fn llama() -> LlamaForCausalLM {
    let config = LlamaConfig::from_json(&serde_json::json!({
        "model_type": "llama", "vocab_size": 99, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 16, "bos_token_id": 98, "eos_token_id": 98,
    }))
    .unwrap();
    LlamaForCausalLM::new(config, &mut Rng::seed_from_u64(4), &Device::Cpu).unwrap()
}

fn mp_args(out: &Path, flag: &str) -> TrainingArguments {
    let mut a = TrainingArguments::new(out.display().to_string());
    a.set(flag, "true").unwrap();
    a.per_device_train_batch_size = 8;
    a.per_device_eval_batch_size = 16;
    a.learning_rate = 3e-3;
    a.max_steps = 40;
    a.logging_steps = 10.0;
    a.save_steps = 40.0;
    a.disable_tqdm = true;
    a
}

/// Trains `model` for 40 steps in `flag` (bf16/fp16) and checks everything a
/// mixed-precision run promises; `reload` builds the model from a saved folder.
fn trains_in<M: Model>(
    model: M,
    data: Arc<dyn BatchSource>,
    flag: &str,
    dtype: DType,
    reload: impl Fn(&Path) -> Vec<(String, Var)>,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(model, mp_args(dir.path(), flag))
        .with_train_dataset(data.clone())
        .with_eval_dataset(data)
        .with_quiet(true);
    let before = t.evaluate().unwrap()["eval_loss"];
    // Evaluation already runs on the 16-bit working copy; the masters stay f32.
    assert!(
        t.model()
            .parameters()
            .iter()
            .all(|(_, v)| v.dtype() == dtype)
    );
    assert!(t.parameters().iter().all(|(_, v)| v.dtype() == DType::F32));
    let out = t.train(None).unwrap();
    assert_eq!(out.global_step, 40);
    let after = t.evaluate().unwrap()["eval_loss"];
    assert!(
        after < before * 0.8,
        "{flag}: eval loss {before} -> {after}"
    );
    let losses: Vec<f64> = t
        .state()
        .log_history
        .iter()
        .filter_map(|e| e.get("loss").and_then(|v| v.as_f64()))
        .collect();
    assert!(
        losses.len() == 4 && losses[3] < losses[0],
        "{flag}: {losses:?}"
    );

    // The masters hold updates a 16-bit copy cannot: they are not the working copy.
    let masters = t.parameters();
    let working = t.model().parameters();
    let differ = masters.iter().zip(&working).any(|((_, m), (_, w))| {
        f32_values(m) != f32_values(&Var::from_tensor(&w.to_dtype(DType::F32).unwrap()).unwrap())
    });
    assert!(differ, "{flag}: the masters must keep f32 precision");

    let saved = t.save_model(Some(&dir.path().join("final"))).unwrap();
    for folder in [saved.clone(), dir.path().join("checkpoint-40")] {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["dtype"], "float32", "{}", folder.display());
        assert!(config.get("torch_dtype").is_none());
        let files = kiln_formats::open(&folder).unwrap();
        assert!(
            files
                .tensors()
                .iter()
                .all(|i| i.dtype == kiln_formats::DType::F32),
            "{}",
            folder.display()
        );
        let loaded = reload(&folder);
        assert_eq!(loaded.len(), masters.len());
        for ((n, a), (m, b)) in loaded.iter().zip(&masters) {
            assert_eq!(n, m);
            assert_eq!(a.dtype(), DType::F32);
            assert_eq!(
                f32_values(a),
                f32_values(b),
                "{flag}: {n} in {}",
                folder.display()
            );
        }
    }
    let scaler = dir.path().join("checkpoint-40/scaler.json");
    assert_eq!(scaler.exists(), flag == "fp16", "{flag}");
}

#[test]
fn bf16_and_fp16_train_bert_gpt2_and_llama_and_save_f32_masters() {
    let classify = Arc::new(Classify(
        draws(64 * 6, 11)
            .chunks(6)
            .map(|c| std::array::from_fn(|i| c[i]))
            .collect(),
    ));
    let count = Arc::new(Count(
        draws(64, 12)
            .into_iter()
            .map(|start| std::array::from_fn(|i| start + i as u32))
            .collect(),
    ));
    for (flag, dtype) in [("bf16", DType::BF16), ("fp16", DType::F16)] {
        trains_in(bert(), classify.clone(), flag, dtype, |dir| {
            let (m, _) = BertForSequenceClassification::from_pretrained(
                dir,
                &mut Rng::seed_from_u64(0),
                &Device::Cpu,
            )
            .unwrap();
            m.parameters()
        });
        trains_in(gpt2(), count.clone(), flag, dtype, |dir| {
            let (m, _) =
                Gpt2LMHeadModel::from_pretrained(dir, &mut Rng::seed_from_u64(0), &Device::Cpu)
                    .unwrap();
            m.parameters()
        });
        trains_in(llama(), count.clone(), flag, dtype, |dir| {
            let (m, _) =
                LlamaForCausalLM::from_pretrained(dir, &mut Rng::seed_from_u64(0), &Device::Cpu)
                    .unwrap();
            m.parameters()
        });
    }
}
