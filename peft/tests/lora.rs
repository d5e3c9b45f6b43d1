//! LoRA on kiln's models, in Rust: a fresh adapter leaves the outputs unchanged (B is
//! zero), backward computes gradients for the adapter's parameters and nothing else,
//! names and counts are peft's, merging gives the adapter's outputs, and options that
//! cannot work are one-line errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{Device, Tensor};
use kiln_models::{BertConfig, BertForSequenceClassification, Gpt2Config, Gpt2LMHeadModel};
use kiln_peft::{LoraConfig, PeftModel, Targets};
use kiln_trainer::Task;
use kiln_trainer::model::{Batch, Model};
use kiln_trainer::rng::Rng;

fn bert(rng: &mut Rng, labels: usize) -> BertForSequenceClassification {
    let config = BertConfig {
        vocab_size: 50,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 32,
        max_position_embeddings: 16,
        ..BertConfig::default()
    }
    .with_num_labels(labels);
    BertForSequenceClassification::new(config, rng, &Device::Cpu).unwrap()
}

fn gpt2_config() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 40,
        n_positions: 16,
        n_embd: 16,
        n_layer: 1,
        n_head: 2,
        ..Gpt2Config::default()
    }
}

fn batch(labels: bool) -> Batch {
    let d = Device::Cpu;
    Batch {
        input_ids: Tensor::new(&[[1u32, 7, 9, 3, 2], [4, 5, 6, 8, 2]], &d).unwrap(),
        attention_mask: None,
        token_type_ids: None,
        labels: labels.then(|| Tensor::new(&[0i64, 2], &d).unwrap()),
    }
}

fn logits(m: &dyn Model) -> Vec<f32> {
    m.forward(&batch(false), None)
        .unwrap()
        .logits
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn only_the_adapter_trains_and_merging_keeps_its_outputs() {
    let mut rng = Rng::seed_from_u64(3);
    let base = bert(&mut rng, 3);
    let before = logits(&base);
    let base_params = base.parameters();
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: Some(Targets::List(vec!["query".into(), "value".into()])),
        ..Default::default()
    };
    let model = PeftModel::new(base, config, Task::SequenceClassification, None, &mut rng).unwrap();
    // B is zero: a fresh adapter changes nothing.
    assert_eq!(logits(&model), before);
    let names: Vec<String> = model.parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names[..2],
        [
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight",
        ]
    );
    assert!(names.contains(&"base_model.model.classifier.weight".to_string()));
    assert_eq!(names.len(), 2 * 2 * 2 + 2, "{names:?}");
    let counts = model.counts();
    // 2 layers × (query, value) × (A 4×16 + B 16×4), the head 3×16 + 3.
    assert_eq!(counts.trainable, 4 * 128 + 51);
    assert!(
        counts
            .to_string()
            .starts_with("trainable params: 563 || all params: ")
    );

    // Backward: gradients for the adapter and the head only.
    let mut train = Rng::seed_from_u64(9);
    let loss = model
        .forward(&batch(true), Some(&mut train))
        .unwrap()
        .loss
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in model.parameters() {
        assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {name}");
    }
    for (name, v) in &base_params {
        if name.starts_with("classifier.") {
            continue;
        }
        assert!(
            grads.get(v.as_tensor()).is_none(),
            "frozen {name} has a gradient"
        );
    }

    // A trained adapter, merged: the same outputs from the base weights alone.
    for (name, v) in model.parameters() {
        if name.contains("lora_B") {
            v.set(&v.ones_like().unwrap()).unwrap();
        }
    }
    let adapted = logits(&model);
    assert!(
        adapted
            .iter()
            .zip(&before)
            .any(|(a, b)| (a - b).abs() > 1e-6),
        "{adapted:?} {before:?}"
    );
    let merged = model.merge_and_unload().unwrap();
    let after = logits(&merged);
    let d = adapted
        .iter()
        .zip(&after)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-5, "merged differs by {d}");
}

#[test]
fn conv1d_layers_merge_transposed_and_bad_targets_are_named() {
    let mut rng = Rng::seed_from_u64(5);
    let config = gpt2_config();
    let gpt2 = Gpt2LMHeadModel::new(config.clone(), &mut rng, &Device::Cpu).unwrap();
    let lora = LoraConfig {
        init_lora_weights: kiln_peft::InitLoraWeights::Bool(false),
        ..Default::default()
    };
    // init_lora_weights false: B is random too, so the adapter acts at once.
    let model = PeftModel::new(gpt2, lora, Task::CausalLm, None, &mut rng).unwrap();
    assert_eq!(
        model.resolved().target_names,
        ["transformer.h.0.attn.c_attn"]
    );
    assert!(model.resolved().fan_in_fan_out);
    let adapted = logits(&model);
    let merged = model.merge_and_unload().unwrap();
    let d = adapted
        .iter()
        .zip(logits(&merged))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-5, "merged differs by {d}");

    // bias lora_only: the adapted layer's bias trains, under peft's base_layer name.
    let gpt2 = Gpt2LMHeadModel::new(config.clone(), &mut rng, &Device::Cpu).unwrap();
    let lora = LoraConfig {
        bias: "lora_only".into(),
        ..Default::default()
    };
    let model = PeftModel::new(gpt2, lora, Task::CausalLm, None, &mut rng).unwrap();
    let names: Vec<String> = model.parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight",
            "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias",
        ]
    );

    let gpt2 = Gpt2LMHeadModel::new(config, &mut rng, &Device::Cpu).unwrap();
    let lora = LoraConfig {
        target_modules: Some(Targets::List(vec!["q_proj".into()])),
        ..Default::default()
    };
    let e = PeftModel::new(gpt2, lora, Task::CausalLm, None, &mut rng)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("q_proj") && e.contains("c_attn") && e.contains("c_fc"),
        "{e}"
    );
    assert!(!e.contains('\n'));
}

#[test]
fn a_classifier_adapter_on_new_labels_loads_back_onto_its_base() {
    let work = tempfile::tempdir().unwrap();
    let (base_dir, adapter_dir) = (work.path().join("base"), work.path().join("adapter"));
    let mut rng = Rng::seed_from_u64(11);
    // A base with 2 labels; the fine-tune classifies into 3 (a fresh, trained head).
    let base = bert(&mut rng, 2);
    kiln_trainer::weights::save_pretrained(&base, &base_dir, &Default::default()).unwrap();
    let arch = kiln_models::registry::find("BertForSequenceClassification").unwrap();
    let overrides = serde_json::json!({"num_labels": 3});
    let three = kiln_models::registry::load_with(
        arch,
        &base_dir,
        overrides.as_object().unwrap(),
        &mut rng,
        &Device::Cpu,
    )
    .unwrap()
    .model;
    let lora = LoraConfig {
        init_lora_weights: kiln_peft::InitLoraWeights::Bool(false),
        ..Default::default()
    };
    let base_name = Some(base_dir.display().to_string());
    let model = PeftModel::new(
        three,
        lora,
        Task::SequenceClassification,
        base_name,
        &mut rng,
    )
    .unwrap();
    kiln_trainer::weights::save_pretrained(&model, &adapter_dir, &Default::default()).unwrap();
    let expected = logits(&model);
    assert_eq!(expected.len(), 2 * 3);

    let loaded = kiln_peft::folder::load(&adapter_dir, None, &mut rng, &Device::Cpu).unwrap();
    assert_eq!(loaded.base_dir, base_dir);
    assert_eq!(logits(&loaded.model), expected);
    // Saving an adapter over a full model's folder leaves an adapter folder (the
    // model's weights and config.json go), and a full model over an adapter, a model.
    let mixed = work.path().join("mixed");
    kiln_trainer::weights::save_pretrained(loaded.model.base(), &mixed, &Default::default())
        .unwrap();
    kiln_trainer::weights::save_pretrained(&loaded.model, &mixed, &Default::default()).unwrap();
    assert!(kiln_peft::folder::is_adapter(&mixed));
    assert!(!mixed.join("model.safetensors").exists());
    kiln_trainer::weights::save_pretrained(loaded.model.base(), &mixed, &Default::default())
        .unwrap();
    assert!(!mixed.join("adapter_config.json").exists());
    assert!(!mixed.join("adapter_model.safetensors").exists());
    // An adapter folder is refused where a full model is expected, in one line.
    let e = BertForSequenceClassification::from_pretrained(&adapter_dir, &mut rng, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json") && !e.contains('\n'), "{e}");
}

/// A fresh adapter on every dense layer of a Llama leaves its logits unchanged, bit for
/// bit: the layers with adapters take the unfused path (their products, SwiGLU's gate,
/// the residual sums), the model without them the fused ops, which compute the same.
#[test]
fn a_fresh_adapter_on_every_llama_layer_changes_no_logit() {
    let mut rng = Rng::seed_from_u64(11);
    let config = kiln_models::LlamaConfig {
        vocab_size: 40,
        hidden_size: 32,
        intermediate_size: 88,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        max_position_embeddings: 16,
        ..kiln_models::LlamaConfig::default_for(kiln_models::LlamaVariant::Llama)
    };
    let base = kiln_models::LlamaForCausalLM::new(config, &mut rng, &Device::Cpu).unwrap();
    let before = logits(&base);
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(Targets::Pattern("all-linear".into())),
        ..Default::default()
    };
    let model = PeftModel::new(base, lora, Task::CausalLm, None, &mut rng).unwrap();
    assert_eq!(model.resolved().target_names.len(), 2 * 7);
    assert_eq!(logits(&model), before);
}
