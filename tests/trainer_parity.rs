//! kiln's Trainer against transformers' on the same run (tests/check_hf_trainer.py):
//! from one initial BERT folder (dropout off), full-batch AdamW steps with warmup and
//! linear decay end at the same weights and log the same losses, with and without
//! `label_smoothing_factor`; and the smoothed run is far from the plain one, so the
//! agreement is not by chance.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{NO_EVAL, kiln, repo, tiny_bert_args};
use kiln_test_support::fs::read_json;
use kiln_test_support::run_checker;
use serde_json::{Value, json};

const ROWS: usize = 64;
const STEPS: u64 = 6;

/// kiln fine-tunes `init` for [`STEPS`] full batches of [`ROWS`] rows.
fn fine_tune(init: &Path, out: &Path, extra: &[&str]) {
    let steps = STEPS.to_string();
    let rows = ROWS.to_string();
    let mut flags = vec![
        "--model_name_or_path",
        init.to_str().unwrap(),
        "--max_train_samples",
        &rows,
        "--per_device_train_batch_size",
        &rows,
        "--max_steps",
        &steps,
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "2",
        "--weight_decay",
        "0.01",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        // The bundled config's [model] keys apply over the folder's: dropout off again.
        "--hidden_dropout_prob",
        "0",
        "--attention_probs_dropout_prob",
        "0",
    ];
    flags.extend_from_slice(&NO_EVAL);
    flags.extend_from_slice(extra);
    kiln(tiny_bert_args(out, &flags)).expect_success();
}

#[test]
fn full_batch_runs_end_where_transformers_ends() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // The initial folder: a kiln BERT with dropout off, saved after one step at lr 0.
    let init = w.join("init");
    let zero = [
        "--learning_rate",
        "0",
        "--max_steps",
        "1",
        "--hidden_dropout_prob",
        "0",
        "--attention_probs_dropout_prob",
        "0",
        "--save_strategy",
        "no",
    ];
    kiln(tiny_bert_args(&init, &[&zero[..], &NO_EVAL[..]].concat())).expect_success();

    let cases: [(&str, &[&str]); 2] = [
        ("plain", &[]),
        ("smoothed", &["--label_smoothing_factor", "0.1"]),
    ];
    let mut jobs = Vec::new();
    for (name, extra) in cases {
        let out = w.join(format!("kiln-{name}"));
        fine_tune(&init, &out, extra);
        let eps = if name == "smoothed" { 0.1 } else { 0.0 };
        let mut job = json!({
            "init": init, "kiln": out, "out": w.join(format!("hf-{name}")),
            "rows": repo().join("cli/bundled/sentiment/train.jsonl"), "n": ROWS, "max_length": 64,
            "args": {"max_steps": STEPS, "per_device_train_batch_size": ROWS, "learning_rate": 1e-3,
                "warmup_steps": 2, "weight_decay": 0.01, "lr_scheduler_type": "linear",
                "logging_steps": 1, "seed": 42, "optim": "adamw_torch", "label_smoothing_factor": eps},
        });
        if name == "smoothed" {
            job["other"] = json!(w.join("kiln-plain"));
        }
        jobs.push(job);
    }
    let Some(results) = run_checker(&repo().join("tests/check_hf_trainer.py"), &jobs, w) else {
        return;
    };
    for ((name, _), r) in cases.iter().zip(&results) {
        assert_eq!(r["missing"], json!([]), "{name}");
        let diff = r["max_diff"].as_f64().unwrap();
        let moved = r["moved"].as_f64().unwrap();
        println!(
            "{name}: weights within {diff:.2e} of transformers' (training moved them {moved:.2e})"
        );
        assert!(diff < 1e-5, "{name}: weights differ by {diff}");
        let ours =
            read_json(&w.join(format!("kiln-{name}/trainer_state.json")))["log_history"].clone();
        let losses = |h: &Value| -> Vec<f64> {
            h.as_array()
                .unwrap()
                .iter()
                .filter_map(|e| e.get("loss")?.as_f64())
                .collect()
        };
        let (a, b) = (losses(&ours), losses(&r["log_history"]));
        assert_eq!(a.len(), STEPS as usize, "{name}: {a:?}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-4,
                "{name}: losses {a:?} vs transformers {b:?}"
            );
        }
    }
    // Smoothing changes the run far beyond the agreement above.
    let apart = results[1]["other_diff"].as_f64().unwrap();
    println!("plain and smoothed kiln runs are {apart:.2e} apart");
    assert!(apart > 1e-3, "label smoothing changed nothing ({apart})");
}
