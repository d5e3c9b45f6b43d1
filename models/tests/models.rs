//! kiln's BERT and GPT-2 on their own: initialisation, dropout, gradients, configs and
//! the loading rules (base-model folders, legacy names, fresh heads, missing weights,
//! shape mismatches, f16 folders).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use kiln_checkpoint::model::{self as ckpt, ModelSave, SaveOptions};
use kiln_formats::candle::{from_candle, to_candle};
use kiln_formats::{TensorCollection, TensorMap};
use kiln_models::{
    BertConfig, BertForSequenceClassification, Gpt2Config, Gpt2LMHeadModel, ProblemType, TokenIds,
};
use kiln_test_support::tensors::f32_values as values;
use kiln_trainer::Error;
use kiln_trainer::model::{Batch, Model};
use kiln_trainer::rng::Rng;
use kiln_trainer::weights;
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn bert_config() -> BertConfig {
    BertConfig {
        vocab_size: 99,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 32,
        ..BertConfig::default()
    }
    .with_num_labels(3)
}

fn gpt2_config() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 99,
        n_positions: 32,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        n_inner: Some(64),
        bos_token_id: Some(98),
        eos_token_id: Some(TokenIds::One(98)),
        ..Gpt2Config::default()
    }
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    Tensor::from_vec(rows.concat(), (rows.len(), t), &Device::Cpu).unwrap()
}

/// Two sequences, the second right-padded, with both segment types.
fn bert_batch(labels: bool) -> Batch {
    Batch {
        input_ids: ids(&[&[5, 17, 42, 8, 91, 33], &[7, 23, 56, 0, 0, 0]]),
        attention_mask: Some(ids(&[&[1, 1, 1, 1, 1, 1], &[1, 1, 1, 0, 0, 0]])),
        token_type_ids: Some(ids(&[&[0, 0, 0, 1, 1, 1], &[0, 1, 1, 0, 0, 0]])),
        labels: labels.then(|| Tensor::new(&[2i64, 0], &Device::Cpu).unwrap()),
    }
}

fn gpt2_batch(labels: bool) -> Batch {
    Batch {
        input_ids: ids(&[&[5, 17, 42, 8, 91, 33], &[7, 23, 56, 0, 0, 0]]),
        attention_mask: Some(ids(&[&[1, 1, 1, 1, 1, 1], &[1, 1, 1, 0, 0, 0]])),
        token_type_ids: None,
        labels: labels.then(|| {
            Tensor::new(
                &[[5i64, 17, 42, 8, 91, 33], [7, 23, 56, -100, -100, -100]],
                &Device::Cpu,
            )
            .unwrap()
        }),
    }
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
    let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn all_equal(a: &Tensor, b: &Tensor) -> bool {
    a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

// ---------------------------------------------------------------------------------
// initialisation

#[test]
fn bert_init_follows_transformers() {
    let config = BertConfig {
        vocab_size: 2000,
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 256,
        ..BertConfig::default()
    };
    let model =
        BertForSequenceClassification::new(config, &mut Rng::seed_from_u64(3), &Device::Cpu)
            .unwrap();
    for (name, var) in model.parameters() {
        let v = values(&var);
        if name.ends_with("bias") {
            assert!(v.iter().all(|x| *x == 0.0), "{name}");
        } else if name.contains("LayerNorm") {
            assert!(v.iter().all(|x| *x == 1.0), "{name}");
        } else if name == "bert.embeddings.word_embeddings.weight" {
            assert!(
                v[..64].iter().all(|x| *x == 0.0),
                "padding row (pad_token_id 0) is zero"
            );
            let (mean, std) = mean_std(&v[64..]);
            assert!(
                mean.abs() < 1e-3 && (std - 0.02).abs() < 0.0005,
                "{name}: {mean} {std}"
            );
        } else if v.len() >= 4096 {
            let (mean, std) = mean_std(&v);
            assert!(
                mean.abs() < 2e-3 && (std - 0.02).abs() < 0.001,
                "{name}: {mean} {std}"
            );
        }
    }
}

#[test]
fn gpt2_init_scales_the_residual_projections() {
    let config = Gpt2Config {
        n_embd: 64,
        n_layer: 8,
        n_head: 4,
        vocab_size: 1000,
        n_positions: 64,
        ..Gpt2Config::default()
    };
    let model = Gpt2LMHeadModel::new(config, &mut Rng::seed_from_u64(3), &Device::Cpu).unwrap();
    let proj = 0.02 / (16f64).sqrt();
    for (name, var) in model.parameters() {
        let v = values(&var);
        if name.ends_with("bias") {
            assert!(v.iter().all(|x| *x == 0.0), "{name}");
        } else if name.contains(".ln_") {
            assert!(v.iter().all(|x| *x == 1.0), "{name}");
        } else {
            let want = if name.ends_with("c_proj.weight") {
                proj
            } else {
                0.02
            };
            let (mean, std) = mean_std(&v);
            assert!(
                mean.abs() < 2e-3 && (std - want).abs() < want * 0.05,
                "{name}: {mean} {std} vs {want}"
            );
        }
    }
    assert_eq!(
        model.tied_weights(),
        [(
            "lm_head.weight".to_string(),
            "transformer.wte.weight".to_string()
        )]
    );
    assert!(
        !model
            .parameters()
            .iter()
            .any(|(n, _)| n == "lm_head.weight")
    );
}

#[test]
fn same_seed_same_weights() {
    let device = Device::Cpu;
    let a = BertForSequenceClassification::new(bert_config(), &mut Rng::seed_from_u64(9), &device)
        .unwrap();
    let b = BertForSequenceClassification::new(bert_config(), &mut Rng::seed_from_u64(9), &device)
        .unwrap();
    let c = BertForSequenceClassification::new(bert_config(), &mut Rng::seed_from_u64(10), &device)
        .unwrap();
    for ((pa, pb), pc) in a
        .parameters()
        .iter()
        .zip(b.parameters())
        .zip(c.parameters())
    {
        assert_eq!(values(&pa.1), values(&pb.1), "{}", pa.0);
        if pa.0.ends_with("weight") && !pa.0.contains("LayerNorm") {
            assert_ne!(values(&pa.1), values(&pc.1), "{}", pa.0);
        }
    }
    let g1 = Gpt2LMHeadModel::new(gpt2_config(), &mut Rng::seed_from_u64(9), &device).unwrap();
    let g2 = Gpt2LMHeadModel::new(gpt2_config(), &mut Rng::seed_from_u64(9), &device).unwrap();
    for (pa, pb) in g1.parameters().iter().zip(g2.parameters()) {
        assert_eq!(values(&pa.1), values(&pb.1), "{}", pa.0);
    }
}

// ---------------------------------------------------------------------------------
// dropout

fn dropout_behaviour(model: &dyn Model, batch: &Batch) {
    let eval1 = model.forward(batch, None).unwrap().logits;
    let eval2 = model.forward(batch, None).unwrap().logits;
    assert!(all_equal(&eval1, &eval2), "evaluation is deterministic");

    let mut rng = Rng::seed_from_u64(5);
    let state = rng.state();
    let train1 = model.forward(batch, Some(&mut rng)).unwrap().logits;
    let after = rng.state();
    assert_ne!(state, after, "training draws dropout masks from the Rng");
    let mut again = Rng::from_state(&state).unwrap();
    let train2 = model.forward(batch, Some(&mut again)).unwrap().logits;
    assert!(all_equal(&train1, &train2), "same Rng state, same output");
    assert_eq!(again.state(), after);
    assert!(!all_equal(&train1, &eval1), "dropout is on in training");
    let train3 = model.forward(batch, Some(&mut rng)).unwrap().logits;
    assert!(
        !all_equal(&train1, &train3),
        "a later Rng state gives other masks"
    );
}

#[test]
fn dropout_only_in_training_and_from_the_rng() {
    let device = Device::Cpu;
    let bert =
        BertForSequenceClassification::new(bert_config(), &mut Rng::seed_from_u64(1), &device)
            .unwrap();
    dropout_behaviour(&bert, &bert_batch(false));
    let gpt2 = Gpt2LMHeadModel::new(gpt2_config(), &mut Rng::seed_from_u64(1), &device).unwrap();
    dropout_behaviour(&gpt2, &gpt2_batch(false));

    // With every dropout probability 0, training equals evaluation and draws nothing.
    let config = BertConfig {
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        ..bert_config()
    };
    let bert =
        BertForSequenceClassification::new(config, &mut Rng::seed_from_u64(1), &device).unwrap();
    let mut rng = Rng::seed_from_u64(5);
    let state = rng.state();
    let train = bert
        .forward(&bert_batch(false), Some(&mut rng))
        .unwrap()
        .logits;
    let eval = bert.forward(&bert_batch(false), None).unwrap().logits;
    assert!(all_equal(&train, &eval));
    assert_eq!(rng.state(), state);
}

// ---------------------------------------------------------------------------------
// gradients

fn assert_every_parameter_gets_a_gradient(
    model: &dyn Model,
    batch: &Batch,
) -> candle_core::backprop::GradStore {
    let loss = model
        .forward(batch, Some(&mut Rng::seed_from_u64(2)))
        .unwrap()
        .loss
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in model.parameters() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dims(), var.dims(), "{name}");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm² {norm}"
        );
    }
    grads
}

#[test]
fn gradients_reach_every_parameter() {
    let device = Device::Cpu;
    let bert =
        BertForSequenceClassification::new(bert_config(), &mut Rng::seed_from_u64(1), &device)
            .unwrap();
    assert_every_parameter_gets_a_gradient(&bert, &bert_batch(true));
    let gpt2 = Gpt2LMHeadModel::new(gpt2_config(), &mut Rng::seed_from_u64(1), &device).unwrap();
    assert_every_parameter_gets_a_gradient(&gpt2, &gpt2_batch(true));
}

#[test]
fn tied_embedding_gets_the_input_and_output_contributions() {
    let device = Device::Cpu;
    let tied = Gpt2LMHeadModel::new(gpt2_config(), &mut Rng::seed_from_u64(1), &device).unwrap();
    let config = Gpt2Config {
        tie_word_embeddings: false,
        ..gpt2_config()
    };
    let untied = Gpt2LMHeadModel::new(config, &mut Rng::seed_from_u64(2), &device).unwrap();
    let source: std::collections::HashMap<String, Var> = tied.parameters().into_iter().collect();
    for (name, var) in untied.parameters() {
        let from = if name == "lm_head.weight" {
            "transformer.wte.weight"
        } else {
            name.as_str()
        };
        var.set(source[from].as_tensor()).unwrap();
    }
    let batch = gpt2_batch(true);
    let a = tied.forward(&batch, None).unwrap();
    let b = untied.forward(&batch, None).unwrap();
    assert!(all_equal(&a.logits, &b.logits));
    let ga = a.loss.unwrap().backward().unwrap();
    let gb = b.loss.unwrap().backward().unwrap();
    let wte_tied = ga
        .get(source["transformer.wte.weight"].as_tensor())
        .unwrap();
    let params: std::collections::HashMap<String, Var> = untied.parameters().into_iter().collect();
    let input = gb
        .get(params["transformer.wte.weight"].as_tensor())
        .unwrap();
    let output = gb.get(params["lm_head.weight"].as_tensor()).unwrap();
    let diff = (wte_tied - (input + output).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "{diff}");
}

// ---------------------------------------------------------------------------------
// configs

#[test]
fn configs_read_and_write_transformers_json() {
    let text = std::fs::read_to_string(fixtures().join("bert/config.json")).unwrap();
    let file: Value = serde_json::from_str(&text).unwrap();
    let c = BertConfig::from_json(&file).unwrap();
    assert_eq!(
        (c.num_labels(), c.hidden_size, c.initializer_range),
        (3, 32, 0.3)
    );
    let model =
        BertForSequenceClassification::new(c.clone(), &mut Rng::seed_from_u64(0), &Device::Cpu)
            .unwrap();
    let written = model.config();
    assert_eq!(
        written["architectures"],
        json!(["BertForSequenceClassification"])
    );
    assert_eq!(
        written["id2label"],
        json!({"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"})
    );
    assert_eq!(written["label2id"]["LABEL_2"], 2);
    assert!(written.get("problem_type").is_none());
    // Every key transformers wrote comes back, with its value, but the file's own.
    for (k, v) in file.as_object().unwrap() {
        if ["transformers_version", "dtype"].contains(&k.as_str()) {
            assert!(written.get(k).is_none(), "{k}");
        } else {
            assert_eq!(written.get(k), Some(v), "{k}");
        }
    }
    assert_eq!(BertConfig::from_json(&written).unwrap(), c);

    // Extra keys survive; num_labels and id2label decide the labels.
    let c = BertConfig::from_json(
        &json!({"model_type": "bert", "num_labels": 5, "foo": [1, 2], "_name_or_path": "x"}),
    )
    .unwrap();
    assert_eq!(c.num_labels(), 5);
    assert_eq!(c.extra.get("foo"), Some(&json!([1, 2])));
    assert!(c.extra.get("_name_or_path").is_none());
    let c = BertConfig::from_json(&json!({"id2label": {"1": "pos", "0": "neg"}})).unwrap();
    assert_eq!(c.labels, ["neg", "pos"]);
    assert!(matches!(
        BertConfig::from_json(&json!({"model_type": "gpt2"})),
        Err(kiln_models::Error::Config(_))
    ));
    assert!(BertConfig::from_json(&json!({"hidden_size": 30, "num_attention_heads": 4})).is_err());
    assert!(BertConfig::from_json(&json!({"hidden_act": "nope"})).is_err());
    assert!(BertConfig::from_json(&json!({"position_embedding_type": "relative_key"})).is_err());

    let text = std::fs::read_to_string(fixtures().join("gpt2/config.json")).unwrap();
    let file: Value = serde_json::from_str(&text).unwrap();
    let c = Gpt2Config::from_json(&file).unwrap();
    let model = Gpt2LMHeadModel::new(c.clone(), &mut Rng::seed_from_u64(0), &Device::Cpu).unwrap();
    let written = model.config();
    for (k, v) in file.as_object().unwrap() {
        if ["transformers_version", "dtype"].contains(&k.as_str()) {
            assert!(written.get(k).is_none(), "{k}");
        } else {
            assert_eq!(written.get(k), Some(v), "{k}");
        }
    }
    assert_eq!(
        written.as_object().unwrap().len() + 2,
        file.as_object().unwrap().len()
    );
    let text = std::fs::read_to_string(fixtures().join("gpt2/generation_config.json")).unwrap();
    let mut want: Value = serde_json::from_str(&text).unwrap();
    want.as_object_mut().unwrap().remove("transformers_version");
    assert_eq!(model.generation_config().unwrap(), want);
    let list = Gpt2Config::from_json(&json!({"eos_token_id": [1, 2]})).unwrap();
    assert_eq!(list.eos_token_id, Some(TokenIds::Many(vec![1, 2])));
}

#[test]
fn problem_type_is_decided_by_the_first_labels_and_written() {
    let device = Device::Cpu;
    let model =
        BertForSequenceClassification::new(bert_config(), &mut Rng::seed_from_u64(0), &device)
            .unwrap();
    assert_eq!(model.problem_type(), None);
    let mut batch = bert_batch(false);
    batch.labels = Some(Tensor::new(&[[1f32, 0., 1.], [0., 1., 0.]], &device).unwrap());
    let loss = model.forward(&batch, None).unwrap().loss.unwrap();
    assert!(loss.to_scalar::<f32>().unwrap() > 0.0);
    assert_eq!(
        model.problem_type(),
        Some(ProblemType::MultiLabelClassification)
    );
    assert_eq!(model.config()["problem_type"], "multi_label_classification");

    let regression = BertForSequenceClassification::new(
        bert_config().with_num_labels(1),
        &mut Rng::seed_from_u64(0),
        &device,
    )
    .unwrap();
    batch.labels = Some(Tensor::new(&[0.5f32, 2.0], &device).unwrap());
    let out = regression.forward(&batch, None).unwrap();
    let logits = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = ((logits[0] - 0.5).powi(2) + (logits[1] - 2.0).powi(2)) / 2.0;
    assert!((out.loss.unwrap().to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
    assert_eq!(regression.config()["problem_type"], "regression");
}

// ---------------------------------------------------------------------------------
// loading rules

/// Writes a model folder holding the tensors of fixture `name`, renamed (or dropped
/// when `rename` gives `None`) and converted to `dtype`.
fn rewrite(
    name: &str,
    out: &Path,
    config: Value,
    rename: impl Fn(&str) -> Option<String>,
    dtype: DType,
) {
    let file = kiln_formats::open(fixtures().join(name)).unwrap();
    let mut map = TensorMap::new();
    for info in file.tensors() {
        if let Some(new) = rename(&info.name) {
            let view = file.tensor(&info.name).unwrap();
            let t = to_candle(&view, &Device::Cpu).unwrap();
            let t = if t.dtype().is_float() {
                t.to_dtype(dtype).unwrap()
            } else {
                t
            };
            map.insert(new, from_candle(&t).unwrap()).unwrap();
        }
    }
    ckpt::save_pretrained(out, &ModelSave::new(config, &map), &SaveOptions::default()).unwrap();
}

fn fixture_config(name: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(name).join("config.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn a_base_bert_folder_with_legacy_names_gets_a_fresh_classifier() {
    let device = Device::Cpu;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("base");
    let mut config = fixture_config("bert");
    config["architectures"] = json!(["BertModel"]);
    rewrite(
        "bert",
        &dir,
        config,
        |n| {
            let n = n.strip_prefix("bert.")?;
            Some(
                n.replace("LayerNorm.weight", "LayerNorm.gamma")
                    .replace("LayerNorm.bias", "LayerNorm.beta"),
            )
        },
        DType::F32,
    );
    let (model, info) =
        BertForSequenceClassification::from_pretrained(&dir, &mut Rng::seed_from_u64(4), &device)
            .unwrap();
    assert_eq!(info.fresh, ["classifier.weight", "classifier.bias"]);
    assert!(
        info.unexpected.is_empty() && info.ignored.is_empty(),
        "{info:?}"
    );
    assert!(info.renamed.contains(&(
        "embeddings.LayerNorm.gamma".into(),
        "bert.embeddings.LayerNorm.weight".into()
    )));
    assert!(info.renamed.contains(&(
        "pooler.dense.weight".into(),
        "bert.pooler.dense.weight".into()
    )));

    let (original, _) = BertForSequenceClassification::from_pretrained(
        fixtures().join("bert"),
        &mut Rng::seed_from_u64(0),
        &device,
    )
    .unwrap();
    // The body is the folder's; the head is what the Rng drew for a new model.
    let fresh = BertForSequenceClassification::new(
        BertConfig::from_pretrained(&dir).unwrap(),
        &mut Rng::seed_from_u64(4),
        &device,
    )
    .unwrap();
    for (((name, loaded), (_, orig)), (_, new)) in model
        .parameters()
        .iter()
        .zip(original.parameters())
        .zip(fresh.parameters())
    {
        let want = if name.starts_with("classifier.") {
            &new
        } else {
            &orig
        };
        assert_eq!(values(loaded), values(want), "{name}");
    }
    // The classifier's folder holds a head that BERT's base folder does not use.
    let (_, info) = kiln_models::BertForSequenceClassification::from_pretrained(
        fixtures().join("bert"),
        &mut Rng::seed_from_u64(0),
        &device,
    )
    .unwrap();
    assert!(info.fresh.is_empty());
}

#[test]
fn unused_heads_are_reported_and_missing_or_misshapen_weights_are_errors() {
    let device = Device::Cpu;
    let work = tempfile::tempdir().unwrap();

    // A folder with an extra (masked-LM) head: loaded, the head reported unexpected.
    let extra = work.path().join("extra");
    rewrite(
        "bert",
        &extra,
        fixture_config("bert"),
        |n| Some(n.to_string()),
        DType::F32,
    );
    let with_head = work.path().join("with-head");
    {
        let file = kiln_formats::open(&extra).unwrap();
        let mut map = TensorMap::new();
        for info in file.tensors() {
            map.insert(
                info.name.clone(),
                file.tensor(&info.name).unwrap().into_owned(),
            )
            .unwrap();
        }
        let t = Tensor::zeros(99, DType::F32, &device).unwrap();
        map.insert("cls.predictions.bias", from_candle(&t).unwrap())
            .unwrap();
        ckpt::save_pretrained(
            &with_head,
            &ModelSave::new(fixture_config("bert"), &map),
            &SaveOptions::default(),
        )
        .unwrap();
    }
    let (_, info) = BertForSequenceClassification::from_pretrained(
        &with_head,
        &mut Rng::seed_from_u64(0),
        &device,
    )
    .unwrap();
    assert_eq!(info.unexpected, ["cls.predictions.bias"]);

    // A body weight missing: an error naming it, and nothing loaded.
    let missing = work.path().join("missing");
    rewrite(
        "bert",
        &missing,
        fixture_config("bert"),
        |n| (!n.contains("layer.1.attention.self.key")).then(|| n.to_string()),
        DType::F32,
    );
    let model =
        BertForSequenceClassification::new(bert_config(), &mut Rng::seed_from_u64(0), &device)
            .unwrap();
    let before: Vec<Vec<f32>> = model.parameters().iter().map(|p| values(&p.1)).collect();
    let err = model.init_from(&missing).unwrap_err();
    match &err {
        Error::MissingWeights { names, .. } => assert_eq!(
            names,
            &[
                "bert.encoder.layer.1.attention.self.key.weight",
                "bert.encoder.layer.1.attention.self.key.bias"
            ]
        ),
        other => panic!("{other}"),
    }
    assert!(
        err.to_string()
            .contains("bert.encoder.layer.1.attention.self.key.weight"),
        "{err}"
    );
    let after: Vec<Vec<f32>> = model.parameters().iter().map(|p| values(&p.1)).collect();
    assert_eq!(before, after);

    // A classifier for 5 labels cannot take the folder's 3-label head.
    let five = BertForSequenceClassification::new(
        bert_config().with_num_labels(5),
        &mut Rng::seed_from_u64(0),
        &device,
    )
    .unwrap();
    let err = five.init_from(&fixtures().join("bert")).unwrap_err();
    assert!(
        matches!(&err, Error::WeightShape(m)
            if m.name == "classifier.weight" && m.expected == [5, 32] && m.found == [3, 32]),
        "{err}"
    );
    assert!(err.to_string().contains("num_labels"), "{err}");
}

#[test]
fn a_base_gpt2_folder_in_f16_loads_converted() {
    let device = Device::Cpu;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("base-f16");
    let mut config = fixture_config("gpt2");
    config["architectures"] = json!(["GPT2Model"]);
    rewrite(
        "gpt2",
        &dir,
        config,
        |n| n.strip_prefix("transformer.").map(str::to_string),
        DType::F16,
    );
    let (model, info) =
        Gpt2LMHeadModel::from_pretrained(&dir, &mut Rng::seed_from_u64(0), &device).unwrap();
    assert!(
        info.fresh.is_empty() && info.unexpected.is_empty(),
        "{info:?}"
    );
    assert_eq!(info.converted.len(), model.parameters().len());
    assert!(
        info.converted.iter().all(|(_, d)| d == "F16"),
        "{:?}",
        info.converted
    );
    assert_eq!(
        info.renamed[0],
        (
            "wte.weight".to_string(),
            "transformer.wte.weight".to_string()
        )
    );
    let (original, _) = Gpt2LMHeadModel::from_pretrained(
        fixtures().join("gpt2"),
        &mut Rng::seed_from_u64(0),
        &device,
    )
    .unwrap();
    let batch = gpt2_batch(false);
    let a = original.forward(&batch, None).unwrap().logits;
    let b = model.forward(&batch, None).unwrap().logits;
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 0.0 && diff < 0.05, "f16 rounding only: {diff}");
}

#[test]
fn export_holds_the_parameters_without_tied_copies() {
    let model =
        Gpt2LMHeadModel::new(gpt2_config(), &mut Rng::seed_from_u64(0), &Device::Cpu).unwrap();
    let export = weights::export(&model).unwrap();
    let names: Vec<&str> = export
        .weights
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    let params: Vec<String> = model.parameters().into_iter().map(|p| p.0).collect();
    assert_eq!(names, params);
    assert_eq!(export.tied, model.tied_weights());
    assert_eq!(
        export.generation_config.as_ref().unwrap()["eos_token_id"],
        98
    );
    let work = tempfile::tempdir().unwrap();
    let saved = weights::save_pretrained(&model, work.path(), &SaveOptions::default()).unwrap();
    assert_eq!(saved.dropped_tied, Vec::<String>::new());
    assert!(work.path().join("generation_config.json").is_file());
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let device = Device::Cpu;
    let bert =
        BertForSequenceClassification::new(bert_config(), &mut Rng::seed_from_u64(0), &device)
            .unwrap();
    let mut batch = bert_batch(false);
    batch.input_ids = ids(&[&[5, 17, 400]]);
    batch.attention_mask = None;
    batch.token_type_ids = None;
    assert!(
        bert.forward(&batch, None).is_err(),
        "token id beyond the vocabulary"
    );
    batch.input_ids = Tensor::zeros((1, 40), DType::U32, &device).unwrap();
    assert!(
        bert.forward(&batch, None).is_err(),
        "longer than max_position_embeddings"
    );
    let mut batch = bert_batch(true);
    batch.labels = Some(Tensor::new(&[7i64, 0], &device).unwrap());
    assert!(
        bert.forward(&batch, None).is_err(),
        "label beyond num_labels"
    );
    let gpt2 = Gpt2LMHeadModel::new(gpt2_config(), &mut Rng::seed_from_u64(0), &device).unwrap();
    assert!(
        gpt2.generate_greedy(&ids(&[&[1, 2, 3]]), 40).is_err(),
        "past n_positions"
    );
}

fn element_count(model: &dyn Model) -> u64 {
    model
        .parameters()
        .iter()
        .map(|(_, v)| v.elem_count() as u64)
        .sum()
}

#[test]
fn parameter_counts_are_those_of_the_built_models() {
    let mut rng = Rng::seed_from_u64(0);
    let bert = BertForSequenceClassification::new(bert_config(), &mut rng, &Device::Cpu).unwrap();
    assert_eq!(bert_config().parameter_count(), Some(element_count(&bert)));
    for tied in [true, false] {
        let c = Gpt2Config {
            tie_word_embeddings: tied,
            ..gpt2_config()
        };
        let gpt2 = Gpt2LMHeadModel::new(c.clone(), &mut rng, &Device::Cpu).unwrap();
        assert_eq!(
            c.parameter_count(),
            Some(element_count(&gpt2)),
            "tied {tied}"
        );
    }
}

#[test]
fn configs_too_large_for_the_machine_are_refused_before_allocating() {
    let mut rng = Rng::seed_from_u64(0);
    // 2^40 tokens of 32 floats: 128 TiB, more than any machine this runs on.
    let huge = BertConfig {
        vocab_size: 1 << 40,
        ..bert_config()
    };
    let e = BertForSequenceClassification::new(huge, &mut rng, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("more than the") && e.contains("GiB of memory"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    // So large that the count itself overflows.
    let overflow = Gpt2Config {
        n_embd: 1 << 40,
        n_head: 1,
        ..gpt2_config()
    };
    assert_eq!(overflow.parameter_count(), None);
    let e = Gpt2LMHeadModel::new(overflow, &mut rng, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("more parameters than can be counted"), "{e}");
    // And from a folder: config.json alone decides, before any weights are read.
    let dir = tempfile::tempdir().unwrap();
    let mut config = bert_config().to_json();
    config["vocab_size"] = json!(1u64 << 40);
    config["architectures"] = json!(["BertForSequenceClassification"]);
    config["model_type"] = json!("bert");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = BertForSequenceClassification::from_pretrained(dir.path(), &mut rng, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("refusing to build it"), "{e}");
}
