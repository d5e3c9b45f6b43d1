//! kiln's Llama family (Llama with GQA and llama3 / dynamic rope, Mistral with a sliding
//! window, Qwen2 with sliding layers and q/k/v biases, Qwen3 with q/k norms) against
//! real transformers, both ways, in one Python run (`check_llama.py`):
//!
//! - folders kiln initialised and saved load in `AutoModelForCausalLM` with no missing or
//!   unexpected keys and give kiln's logits, loss, every parameter's gradient and greedy
//!   generation (kiln's with its key/value cache);
//! - folders transformers initialised and saved in bf16, sharded (and one `.bin`) load in
//!   kiln and give transformers' logits, loss, gradients and generation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use candle_core::{Device, Tensor};
use kiln_checkpoint::model::SaveOptions;
use kiln_models::{LlamaConfig, LlamaForCausalLM};
use kiln_test_support::max_abs_diff;
use kiln_test_support::tensors::f32s;
use kiln_trainer::model::{Batch, Model};
use kiln_trainer::rng::Rng;
use kiln_trainer::weights;
use serde_json::{Value, json};

const TOLERANCE: f32 = 1e-4;

/// Small configs of every variant, in `config.json` form.
fn configs() -> Vec<(&'static str, Value)> {
    let base = json!({
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "initializer_range": 0.1,
        "bos_token_id": 1, "eos_token_id": 2,
    });
    let with = |extra: Value| {
        let mut c = base.clone();
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    vec![
        (
            "llama-gqa-llama3",
            with(json!({"model_type": "llama",
            "attention_bias": true, "mlp_bias": true,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}})),
        ),
        (
            "llama-tied-dynamic",
            with(json!({"model_type": "llama", "tie_word_embeddings": true,
            "num_key_value_heads": 4, "max_position_embeddings": 6,
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}})),
        ),
        (
            "llama-linear",
            with(json!({"model_type": "llama",
            "rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0}})),
        ),
        (
            "mistral-window",
            with(json!({"model_type": "mistral", "sliding_window": 3,
            "num_key_value_heads": 1})),
        ),
        (
            "qwen2-sliding",
            with(json!({"model_type": "qwen2", "use_sliding_window": true,
            "sliding_window": 4, "max_window_layers": 1})),
        ),
        (
            "qwen3-head-dim",
            with(json!({"model_type": "qwen3", "head_dim": 24})),
        ),
    ]
}

fn inputs() -> (Value, Value, Batch) {
    let ids: Vec<Vec<u32>> = vec![vec![1, 17, 33, 5, 90, 41, 8], vec![1, 60, 2, 77, 12, 0, 0]];
    let mask: Vec<Vec<u32>> = vec![vec![1; 7], vec![1, 1, 1, 1, 1, 0, 0]];
    let labels: Vec<Vec<i64>> = ids
        .iter()
        .zip(&mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .map(|(&i, &m)| if m == 1 { i as i64 } else { -100 })
                .collect()
        })
        .collect();
    let d = &Device::Cpu;
    let batch = Batch {
        input_ids: Tensor::from_vec(ids.concat(), (2, 7), d).unwrap(),
        attention_mask: Some(Tensor::from_vec(mask.concat(), (2, 7), d).unwrap()),
        token_type_ids: None,
        labels: Some(Tensor::from_vec(labels.concat(), (2, 7), d).unwrap()),
    };
    (
        json!({"input_ids": ids, "attention_mask": mask}),
        json!(labels),
        batch,
    )
}

const PROMPT: [u32; 5] = [1, 44, 9, 70, 23];
const NEW_TOKENS: usize = 6;

/// Logits, loss, gradients by name and greedy tokens of a kiln model.
struct Outcome {
    logits: Vec<f32>,
    loss: f32,
    grads: Vec<(String, Vec<f32>)>,
    generated: Vec<Vec<u32>>,
}

fn outcome(model: &LlamaForCausalLM, batch: &Batch) -> Outcome {
    let out = model.forward(batch, None).unwrap();
    let loss = out.loss.unwrap();
    let grads = loss.backward().unwrap();
    let grads = model
        .parameters()
        .into_iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .expect("every parameter has a gradient");
            (name, g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect();
    let prompt = Tensor::new(&PROMPT, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let generated = model
        .generate_greedy(&prompt, NEW_TOKENS)
        .unwrap()
        .to_vec2()
        .unwrap();
    Outcome {
        logits: f32s(&out.logits),
        loss: loss.to_scalar::<f32>().unwrap(),
        grads,
        generated,
    }
}

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        other => panic!("not a number: {other}"),
    }
}

/// kiln's outcome against transformers' report for the same weights.
fn compare(name: &str, kiln: &Outcome, r: &Value) {
    let d = max_abs_diff(&kiln.logits, &flat(&r["logits"]));
    let dl = (kiln.loss - r["loss"].as_f64().unwrap() as f32).abs();
    let torch_grads = r["grads"].as_object().expect("torch's gradients");
    assert_eq!(
        torch_grads.len(),
        kiln.grads.len(),
        "{name}: parameter counts"
    );
    let (mut worst, mut largest) = (0f32, 0f32);
    for (pname, want) in torch_grads {
        let (_, got) = kiln
            .grads
            .iter()
            .find(|(n, _)| n == pname)
            .unwrap_or_else(|| panic!("{name}: kiln has no parameter {pname}"));
        let want = flat(want);
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let g = max_abs_diff(got, &want);
        assert!(
            g < TOLERANCE * scale,
            "{name}: gradient of {pname} differs by {g} (max |gradient| {scale})"
        );
        worst = worst.max(g);
        largest = largest.max(scale);
    }
    println!(
        "{name}: max |logit diff| {d:.2e}, |loss diff| {dl:.2e} (loss {:.4}), max |grad diff| {worst:.2e} (max |grad| {largest:.2}) over {} parameters",
        kiln.loss,
        kiln.grads.len()
    );
    assert!(
        d < TOLERANCE && dl < TOLERANCE,
        "{name}: logits {d}, loss {dl}"
    );
    let want: Vec<Vec<u32>> = serde_json::from_value(r["generate"].clone()).unwrap();
    assert_eq!(kiln.generated, want, "{name}: greedy generation");
}

#[test]
fn the_llama_family_matches_transformers_both_ways() {
    let work = tempfile::tempdir().unwrap();
    let (inputs_json, labels_json, batch) = inputs();
    let generate = json!({"prompt": [PROMPT], "max_new_tokens": NEW_TOKENS});
    let mut jobs = Vec::new();
    let mut kiln_side = Vec::new();
    for (i, (name, config)) in configs().into_iter().enumerate() {
        // kiln → transformers.
        let dir = work.path().join(format!("kiln-{name}"));
        let c = LlamaConfig::from_json(&config).unwrap();
        let model =
            LlamaForCausalLM::new(c, &mut Rng::seed_from_u64(i as u64), &Device::Cpu).unwrap();
        let options = SaveOptions::default().with_max_shard_size(40_000);
        weights::save_pretrained(&model, &dir, &options).unwrap();
        // Reloaded by kiln, so its own round trip is in the comparison.
        let (model, info) =
            LlamaForCausalLM::from_pretrained(&dir, &mut Rng::seed_from_u64(9), &Device::Cpu)
                .unwrap();
        assert!(
            info.fresh.is_empty() && info.unexpected.is_empty(),
            "{name}: {info:?}"
        );
        kiln_side.push((name, outcome(&model, &batch)));
        jobs.push(json!({"load": dir, "inputs": inputs_json, "labels": labels_json, "generate": generate}));
        // transformers → kiln: bf16, sharded (one `.bin`).
        let made = work.path().join(format!("hf-{name}"));
        jobs.push(
            json!({"make": made, "config": config, "seed": i, "dtype": "bfloat16",
            "max_shard_size": "30kB", "safe": i != 1,
            "inputs": inputs_json, "labels": labels_json, "generate": generate}),
        );
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_llama.py");
    let Some(results) = kiln_test_support::run_checker(&script, &jobs, work.path()) else {
        return;
    };
    let configs = configs();
    for (i, ((name, kiln), pair)) in kiln_side.iter().zip(results.chunks(2)).enumerate() {
        let (theirs, made) = (&pair[0], &pair[1]);
        for key in ["missing", "unexpected", "mismatched"] {
            assert_eq!(theirs[key], json!([]), "{name}: {key}");
        }
        assert_eq!(
            theirs["architecture"],
            configs[i].1["model_type"]
                .as_str()
                .map(architecture)
                .unwrap(),
            "{name}"
        );
        compare(&format!("kiln-saved {name}"), kiln, theirs);

        let dir = work.path().join(format!("hf-{name}"));
        let (model, info) =
            LlamaForCausalLM::from_pretrained(&dir, &mut Rng::seed_from_u64(3), &Device::Cpu)
                .unwrap();
        assert!(
            info.fresh.is_empty() && info.unexpected.is_empty(),
            "{name}: {info:?}"
        );
        let index = if i == 1 {
            "pytorch_model.bin.index.json"
        } else {
            "model.safetensors.index.json"
        };
        assert!(
            info.weights_path.ends_with(index),
            "{name}: sharded: {info:?}"
        );
        assert!(
            info.converted.iter().all(|(_, dtype)| dtype.contains("16"))
                && !info.converted.is_empty(),
            "{name}: the bf16 weights are converted: {:?}",
            info.converted
        );
        compare(
            &format!("transformers-saved bf16 {name}"),
            &outcome(&model, &batch),
            made,
        );
    }
}

fn architecture(model_type: &str) -> Value {
    json!(match model_type {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        _ => "Qwen3ForCausalLM",
    })
}
