//! kiln's BERT and GPT-2 against real transformers, both ways:
//!
//! - folders transformers initialised and saved (`fixtures/`, made by
//!   `fixtures/make_models.py`: safetensors, `.bin`, sharded `.bin` with the buffers
//!   older transformers kept) load in kiln and give transformers' logits and loss;
//! - folders kiln initialised and saved load in transformers' `Auto*` classes with no
//!   missing or unexpected keys and give kiln's logits, loss and greedy generations
//!   (`check_models.py`, one Python run; skipped with a printed reason without Python).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use kiln_checkpoint::model::SaveOptions;
use kiln_models::{
    BertConfig, BertForSequenceClassification, Gpt2Config, Gpt2LMHeadModel, ProblemType,
};
use kiln_test_support::max_abs_diff as max_diff;
use kiln_test_support::tensors::f32s as logits_of;
use kiln_trainer::model::{Batch, Model};
use kiln_trainer::rng::Rng;
use kiln_trainer::weights;
use serde_json::{Value, json};

const TOLERANCE: f32 = 1e-4;
/// Gradients of the loss, kiln vs torch (f32: the sums run in different orders).
const GRAD_TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn expected(arch: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(format!("{arch}.expected.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn u32_tensor(v: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = serde_json::from_value(v.clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
}

fn batch_of(inputs: &Value, labels: Option<Tensor>) -> Batch {
    Batch {
        input_ids: u32_tensor(&inputs["input_ids"]),
        attention_mask: inputs.get("attention_mask").map(u32_tensor),
        token_type_ids: inputs.get("token_type_ids").map(u32_tensor),
        labels,
    }
}

fn i64_labels(v: &Value) -> Tensor {
    match v {
        Value::Array(a) if a.first().is_some_and(Value::is_array) => {
            let rows: Vec<Vec<i64>> = serde_json::from_value(v.clone()).unwrap();
            let (b, t) = (rows.len(), rows[0].len());
            Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
        }
        _ => {
            let l: Vec<i64> = serde_json::from_value(v.clone()).unwrap();
            Tensor::new(l.as_slice(), &Device::Cpu).unwrap()
        }
    }
}

fn flat_f32(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat_f32).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        other => panic!("not a number: {other}"),
    }
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().map(|x| x.abs()).fold(0.0, f32::max)
}

fn scalar(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

// ---------------------------------------------------------------------------------
// (a) folders transformers wrote

#[test]
fn bert_folders_transformers_wrote_give_its_logits_and_loss() {
    let e = expected("bert");
    for dir in ["bert", "bert-bin"] {
        let mut rng = Rng::seed_from_u64(1);
        let (model, info) = BertForSequenceClassification::from_pretrained(
            fixtures().join(dir),
            &mut rng,
            &Device::Cpu,
        )
        .unwrap();
        assert!(
            info.fresh.is_empty() && info.unexpected.is_empty(),
            "{dir}: {info:?}"
        );
        assert!(
            info.renamed.is_empty() && info.retied.is_empty(),
            "{dir}: {info:?}"
        );
        if dir == "bert-bin" {
            assert_eq!(info.ignored, ["bert.embeddings.position_ids"]);
            assert!(info.weights_path.ends_with("pytorch_model.bin"));
        } else {
            assert!(info.ignored.is_empty());
        }
        assert_eq!(model.bert_config().num_labels(), 3);
        let batch = batch_of(&e["inputs"], Some(i64_labels(&e["labels"])));
        let out = model.forward(&batch, None).unwrap();
        assert_eq!(out.logits.dims(), &[3, 3]);
        let d = max_diff(&logits_of(&out.logits), &flat_f32(&e["logits"]));
        let loss = scalar(&out.loss.unwrap());
        let dl = (loss - e["loss"].as_f64().unwrap() as f32).abs();
        println!(
            "{dir}: max |logit diff| {d:.3e} (max |logit| {:.2}), |loss diff| {dl:.3e} (loss {loss:.4})",
            max_abs(&logits_of(&out.logits))
        );
        assert!(
            d < TOLERANCE && dl < TOLERANCE,
            "{dir}: logits {d}, loss {dl}"
        );
        assert_eq!(
            model.problem_type(),
            Some(ProblemType::SingleLabelClassification)
        );
    }
}

#[test]
fn gpt2_folders_transformers_wrote_give_its_logits_loss_and_generations() {
    let e = expected("gpt2");
    for dir in ["gpt2", "gpt2-bin"] {
        let mut rng = Rng::seed_from_u64(1);
        let (model, info) =
            Gpt2LMHeadModel::from_pretrained(fixtures().join(dir), &mut rng, &Device::Cpu).unwrap();
        assert!(
            info.fresh.is_empty() && info.unexpected.is_empty(),
            "{dir}: {info:?}"
        );
        if dir == "gpt2-bin" {
            assert!(info.weights_path.ends_with("pytorch_model.bin.index.json"));
            let mut ignored = info.ignored.clone();
            ignored.sort();
            assert_eq!(
                ignored,
                [
                    "transformer.h.0.attn.bias",
                    "transformer.h.0.attn.masked_bias",
                    "transformer.h.1.attn.bias",
                    "transformer.h.1.attn.masked_bias"
                ]
            );
        }
        let batch = batch_of(&e["inputs"], Some(i64_labels(&e["labels"])));
        let out = model.forward(&batch, None).unwrap();
        assert_eq!(out.logits.dims(), &[3, 8, 99]);
        let d = max_diff(&logits_of(&out.logits), &flat_f32(&e["logits"]));
        let loss = scalar(&out.loss.unwrap());
        let dl = (loss - e["loss"].as_f64().unwrap() as f32).abs();
        println!(
            "{dir}: max |logit diff| {d:.3e} (max |logit| {:.2}), |loss diff| {dl:.3e} (loss {loss:.4})",
            max_abs(&logits_of(&out.logits))
        );
        assert!(
            d < TOLERANCE && dl < TOLERANCE,
            "{dir}: logits {d}, loss {dl}"
        );

        let prompt = u32_tensor(&e["prompt"]);
        let max_new = e["max_new_tokens"].as_u64().unwrap() as usize;
        let generated = model.generate_greedy(&prompt, max_new).unwrap();
        let want: Vec<Vec<u32>> = serde_json::from_value(e["generate"].clone()).unwrap();
        assert_eq!(generated.to_vec2::<u32>().unwrap(), want, "{dir}");
    }
}

#[test]
fn parameter_names_order_and_shapes_are_transformers() {
    let device = Device::Cpu;
    for arch in ["bert", "gpt2"] {
        let e = expected(arch);
        let mut rng = Rng::seed_from_u64(0);
        let model: Box<dyn Model> = if arch == "bert" {
            Box::new(
                BertForSequenceClassification::from_pretrained(
                    fixtures().join(arch),
                    &mut rng,
                    &device,
                )
                .unwrap()
                .0,
            )
        } else {
            Box::new(
                Gpt2LMHeadModel::from_pretrained(fixtures().join(arch), &mut rng, &device)
                    .unwrap()
                    .0,
            )
        };
        let tied: Vec<(String, String)> = serde_json::from_value(e["tied"].clone()).unwrap();
        assert_eq!(model.tied_weights(), tied, "{arch}");
        let want: Vec<(String, Vec<usize>)> = e["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                assert_eq!(p["dtype"], "float32");
                (
                    p["name"].as_str().unwrap().to_string(),
                    serde_json::from_value(p["shape"].clone()).unwrap(),
                )
            })
            .filter(|(n, _)| !tied.iter().any(|(t, _)| t == n))
            .collect();
        let got: Vec<(String, Vec<usize>)> = model
            .parameters()
            .into_iter()
            .map(|(n, v)| (n, v.dims().to_vec()))
            .collect();
        assert_eq!(got, want, "{arch}");
    }
}

// ---------------------------------------------------------------------------------
// (b) folders kiln wrote, in transformers

/// Runs this crate's `tests/check_models.py` on `jobs` with real transformers; `None`
/// after a printed skip.
fn transformers_check(jobs: &[Value], work: &Path) -> Option<Vec<Value>> {
    kiln_test_support::transformers_check(Path::new(env!("CARGO_MANIFEST_DIR")), jobs, work)
}

struct Job {
    name: &'static str,
    model: Box<dyn Model>,
    batch: Batch,
    labels: Value,
    labels_dtype: &'static str,
    auto: &'static str,
    generate: Option<(Tensor, usize)>,
    options: SaveOptions,
}

fn tiny_bert(num_labels: usize) -> BertConfig {
    BertConfig {
        vocab_size: 99,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 32,
        initializer_range: 0.3,
        ..BertConfig::default()
    }
    .with_num_labels(num_labels)
}

fn tiny_gpt2(tied: bool) -> Gpt2Config {
    Gpt2Config {
        vocab_size: 99,
        n_positions: 32,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        n_inner: Some(64),
        bos_token_id: Some(98),
        eos_token_id: Some(kiln_models::TokenIds::One(98)),
        tie_word_embeddings: tied,
        initializer_range: 0.3,
        ..Gpt2Config::default()
    }
}

#[test]
fn folders_kiln_initialised_and_saved_load_in_transformers_with_kiln_logits() {
    let device = Device::Cpu;
    let bert_in = expected("bert")["inputs"].clone();
    let gpt2_e = expected("gpt2");
    let gpt2_in = gpt2_e["inputs"].clone();
    let lm_labels = gpt2_e["labels"].clone();
    let prompt = u32_tensor(&gpt2_e["prompt"]);

    let mut rng = Rng::seed_from_u64(7);
    let classes = json!([1, 2, 0]);
    let scores = json!([0.5, -1.25, 2.0]);
    let multi = json!([
        [1.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
        [1.0, 1.0, 0.0, 0.0]
    ]);
    let mut multi_cfg = tiny_bert(4);
    multi_cfg.problem_type = Some(ProblemType::MultiLabelClassification);
    let mut jobs = vec![
        Job {
            name: "bert",
            model: Box::new(
                BertForSequenceClassification::new(tiny_bert(3), &mut rng, &device).unwrap(),
            ),
            batch: batch_of(&bert_in, Some(i64_labels(&classes))),
            labels: classes,
            labels_dtype: "int64",
            auto: "AutoModelForSequenceClassification",
            generate: None,
            options: SaveOptions::default(),
        },
        Job {
            name: "bert-regression-bin",
            model: Box::new(
                BertForSequenceClassification::new(tiny_bert(1), &mut rng, &device).unwrap(),
            ),
            batch: batch_of(
                &bert_in,
                Some(Tensor::new(&[0.5f32, -1.25, 2.0], &device).unwrap()),
            ),
            labels: scores,
            labels_dtype: "float32",
            auto: "AutoModelForSequenceClassification",
            generate: None,
            options: SaveOptions::default().with_safetensors(false),
        },
        Job {
            name: "bert-multi-label-sharded",
            model: Box::new(
                BertForSequenceClassification::new(multi_cfg, &mut rng, &device).unwrap(),
            ),
            batch: batch_of(
                &bert_in,
                Some(Tensor::from_vec(flat_f32(&multi), (3, 4), &device).unwrap()),
            ),
            labels: multi,
            labels_dtype: "float32",
            auto: "AutoModelForSequenceClassification",
            generate: None,
            options: SaveOptions::default().with_max_shard_size(30_000),
        },
        Job {
            name: "gpt2-sharded",
            model: Box::new(Gpt2LMHeadModel::new(tiny_gpt2(true), &mut rng, &device).unwrap()),
            batch: batch_of(&gpt2_in, Some(i64_labels(&lm_labels))),
            labels: lm_labels.clone(),
            labels_dtype: "int64",
            auto: "AutoModelForCausalLM",
            generate: Some((prompt.clone(), 6)),
            options: SaveOptions::default().with_max_shard_size(30_000),
        },
        Job {
            name: "gpt2-bin",
            model: Box::new(Gpt2LMHeadModel::new(tiny_gpt2(true), &mut rng, &device).unwrap()),
            batch: batch_of(&gpt2_in, Some(i64_labels(&lm_labels))),
            labels: lm_labels.clone(),
            labels_dtype: "int64",
            auto: "AutoModelForCausalLM",
            generate: Some((prompt.clone(), 6)),
            options: SaveOptions::default().with_safetensors(false),
        },
        Job {
            name: "gpt2-untied",
            model: Box::new(Gpt2LMHeadModel::new(tiny_gpt2(false), &mut rng, &device).unwrap()),
            batch: batch_of(&gpt2_in, Some(i64_labels(&lm_labels))),
            labels: lm_labels,
            labels_dtype: "int64",
            auto: "AutoModelForCausalLM",
            generate: None,
            options: SaveOptions::default(),
        },
    ];

    let work = tempfile::tempdir().unwrap();
    let mut py_jobs = Vec::new();
    let mut kiln = Vec::new();
    for job in &mut jobs {
        let dir = work.path().join(job.name);
        let out = job.model.forward(&job.batch, None).unwrap();
        let grads = out.loss.as_ref().unwrap().backward().unwrap();
        let grads: Vec<(String, Vec<f32>)> = job
            .model
            .parameters()
            .into_iter()
            .map(|(name, var)| {
                let g = grads
                    .get(var.as_tensor())
                    .expect("every parameter has a gradient");
                (name, g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            })
            .collect();
        weights::save_pretrained(job.model.as_ref(), &dir, &job.options).unwrap();
        let mut inputs = json!({
            "input_ids": job.batch.input_ids.to_vec2::<u32>().unwrap(),
            "attention_mask": job.batch.attention_mask.as_ref().unwrap().to_vec2::<u32>().unwrap(),
        });
        if let Some(tt) = &job.batch.token_type_ids {
            inputs["token_type_ids"] = json!(tt.to_vec2::<u32>().unwrap());
        }
        let mut py = json!({"dir": dir, "auto": job.auto, "inputs": inputs,
                            "labels": job.labels, "labels_dtype": job.labels_dtype});
        let prompt = job.generate.as_ref().map(|(prompt, n)| {
            py["generate"] =
                json!({"prompt": prompt.to_vec2::<u32>().unwrap(), "max_new_tokens": n});
            prompt.clone()
        });
        py_jobs.push(py);
        kiln.push((
            logits_of(&out.logits),
            scalar(&out.loss.unwrap()),
            prompt,
            dir,
            grads,
        ));
    }
    // Generations are computed on reloaded models (exercising kiln's own round trip).
    let mut kiln_generated = Vec::new();
    for (job, (_, _, prompt, dir, _)) in jobs.iter().zip(&kiln) {
        kiln_generated.push(prompt.as_ref().map(|p| {
            let (m, info) =
                Gpt2LMHeadModel::from_pretrained(dir, &mut Rng::seed_from_u64(0), &device).unwrap();
            assert!(
                info.fresh.is_empty() && info.unexpected.is_empty(),
                "{}: {info:?}",
                job.name
            );
            m.generate_greedy(p, 6).unwrap().to_vec2::<u32>().unwrap()
        }));
    }

    let Some(results) = transformers_check(&py_jobs, work.path()) else {
        return;
    };
    for (((job, (logits, loss, _, _, grads)), generated), r) in
        jobs.iter().zip(&kiln).zip(&kiln_generated).zip(&results)
    {
        assert_eq!(r["missing"], json!([]), "{}: {r}", job.name);
        assert_eq!(r["unexpected"], json!([]), "{}: {r}", job.name);
        assert_eq!(r["mismatched"], json!([]), "{}: {r}", job.name);
        let config = job.model.config();
        assert_eq!(
            r["architecture"], config["architectures"][0],
            "{}",
            job.name
        );
        let d = max_diff(logits, &flat_f32(&r["logits"]));
        let dl = (loss - r["loss"].as_f64().unwrap() as f32).abs();
        println!(
            "{}: max |logit diff| {d:.3e} (max |logit| {:.2}), |loss diff| {dl:.3e} (loss {loss:.4})",
            job.name,
            max_abs(logits)
        );
        assert!(
            d < TOLERANCE && dl < TOLERANCE,
            "{}: logits {d}, loss {dl}",
            job.name
        );
        // kiln's backward passes (fused CPU kernels included) against torch's autograd:
        // every parameter torch lists (tied weights once, summed over both uses).
        let torch_grads = r["grads"].as_object().expect("torch's gradients");
        let (mut worst, mut largest) = (0f32, 0f32);
        for (name, want) in torch_grads {
            let (_, got) = grads
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{}: kiln has no parameter {name}", job.name));
            let want = flat_f32(want);
            let d = max_diff(got, &want);
            assert!(
                d < GRAD_TOLERANCE,
                "{}: gradient of {name} differs by {d}",
                job.name
            );
            worst = worst.max(d);
            largest = largest.max(max_abs(&want));
        }
        assert_eq!(
            torch_grads.len(),
            grads.len(),
            "{}: parameter counts",
            job.name
        );
        println!(
            "{}: max |gradient diff| {worst:.3e} over {} parameters (max |gradient| {largest:.3})",
            job.name,
            grads.len()
        );
        if let Some(g) = generated {
            let want: Vec<Vec<u32>> = serde_json::from_value(r["generate"].clone()).unwrap();
            assert_eq!(g, &want, "{}", job.name);
        }
        if job.name.starts_with("gpt2") && job.name != "gpt2-untied" {
            assert_eq!(r["tied_shares_storage"], json!(true), "{}", job.name);
        }
    }
    assert_eq!(results[1]["problem_type"], "regression");
    assert_eq!(results[2]["problem_type"], "multi_label_classification");
}
