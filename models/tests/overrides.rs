//! `[model]` keys over a loaded folder (`registry::load_with`, as
//! `from_pretrained(dir, **kwargs)`): applied when they keep the weights' shapes, a new
//! head for new labels, a one-line error for any other change of shape.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::Device;
use kiln_models::registry::{find, load_with};
use kiln_models::{BertConfig, BertForSequenceClassification};
use kiln_test_support::tensors::f32_values;
use kiln_trainer::model::Model;
use kiln_trainer::rng::Rng;
use serde_json::{Map, Value, json};

fn keys(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn keys_over_a_folder_apply_renew_the_head_or_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = BertConfig {
        vocab_size: 50,
        hidden_size: 16,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 32,
        max_position_embeddings: 16,
        ..BertConfig::default()
    }
    .with_num_labels(3);
    let model =
        BertForSequenceClassification::new(config, &mut Rng::seed_from_u64(1), &Device::Cpu)
            .unwrap();
    kiln_trainer::weights::save_pretrained(&model, dir.path(), &Default::default()).unwrap();
    let arch = find("BertForSequenceClassification").unwrap();
    let load = |k: Value| {
        load_with(
            arch,
            dir.path(),
            &keys(k),
            &mut Rng::seed_from_u64(2),
            &Device::Cpu,
        )
    };

    let same = load(json!({"hidden_dropout_prob": 0.0})).unwrap();
    assert_eq!(same.model.config()["hidden_dropout_prob"], 0.0);
    assert!(same.info.fresh.is_empty(), "{:?}", same.info);
    assert_eq!(same.notes.len(), 1, "{:?}", same.notes);
    let weights = |m: &dyn Model| {
        m.parameters()
            .iter()
            .map(|(_, v)| f32_values(v))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        weights(same.model.as_ref()),
        weights(&model),
        "the weights are the folder's"
    );

    let relabelled = load(json!({"num_labels": 5})).unwrap();
    assert_eq!(
        relabelled.model.config()["id2label"]
            .as_object()
            .unwrap()
            .len(),
        5
    );
    assert_eq!(
        relabelled.info.fresh,
        ["classifier.weight", "classifier.bias"]
    );
    assert!(
        relabelled.notes.iter().any(|n| n.contains("afresh")),
        "{:?}",
        relabelled.notes
    );

    let err = load(json!({"hidden_size": 24, "num_attention_heads": 2}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hidden_size") && err.contains("shape") && !err.contains('\n'),
        "{err}"
    );
}
