//! kiln's Trainer against transformers' on the same run (tests/check_hf_trainer.py):
//! from one initial BERT folder (dropout off), full-batch AdamW steps with warmup and
//! linear decay end at the same weights and log the same losses, with and without
//! `label_smoothing_factor`, the same `num_input_tokens_seen` (all / non_padding) and
//! `eval_on_start` evaluation; and the smoothed run is far from the plain one, so the
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
        ("plain", &["--include_num_input_tokens_seen", "all"]),
        (
            "smoothed",
            &[
                "--label_smoothing_factor",
                "0.1",
                "--include_num_input_tokens_seen",
                "non_padding",
                "--eval_on_start",
                "true",
            ],
        ),
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
        let tokens = if name == "smoothed" {
            "non_padding"
        } else {
            "all"
        };
        job["args"]["include_num_input_tokens_seen"] = json!(tokens);
        if name == "smoothed" {
            job["other"] = json!(w.join("kiln-plain"));
            job["args"]["eval_on_start"] = json!(true);
            job["args"]["per_device_eval_batch_size"] = json!(64);
            job["eval_rows"] = json!(repo().join("cli/bundled/sentiment/validation.jsonl"));
            job["eval_n"] = json!(32);
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
        // Tokens seen, counted alike at every train log (kiln train's final evaluation
        // is an entry transformers' Trainer.train() does not make); eval_on_start's
        // entry at step 0.
        let train_logs = |h: &Value| -> Value {
            h.as_array()
                .unwrap()
                .iter()
                .filter(|e| e.get("loss").is_some())
                .cloned()
                .collect()
        };
        let (ta, tb) = (
            series(&train_logs(&ours), "num_input_tokens_seen"),
            series(&train_logs(&r["log_history"]), "num_input_tokens_seen"),
        );
        assert_eq!(ta.len(), STEPS as usize, "{name}: {ta:?}");
        assert_eq!(ta, tb, "{name}: num_input_tokens_seen");
        if *name == "smoothed" {
            let ea = series(&ours, "eval_loss");
            let eb = series(&r["log_history"], "eval_loss");
            assert_eq!(
                (ea.len(), eb.len(), ea[0].0, eb[0].0), // kiln train also evaluates at the end
                (2, 1, 0, 0),
                "{ea:?} {eb:?}"
            );
            assert!(
                (ea[0].1 - eb[0].1).abs() < 1e-5,
                "eval_on_start: {ea:?} vs {eb:?}"
            );
            println!(
                "eval_on_start: eval_loss {} (kiln) vs {} (transformers)",
                ea[0].1, eb[0].1
            );
        }
    }
    // Smoothing changes the run far beyond the agreement above.
    let apart = results[1]["other_diff"].as_f64().unwrap();
    println!("plain and smoothed kiln runs are {apart:.2e} apart");
    assert!(apart > 1e-3, "label smoothing changed nothing ({apart})");
}

/// (step, value) of every `log_history` entry that holds `key`.
fn series(history: &Value, key: &str) -> Vec<(u64, f64)> {
    history
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["step"].as_u64()?, e.get(key)?.as_f64()?)))
        .collect()
}

/// A tiny Llama fine-tuned on prompt/completion rows (completion-only loss: each row
/// has its own number of label tokens) with gradient accumulation: 2 micro-batches of
/// 8 rows per step. The loss is the mean over the 16 rows' label tokens, as TRL's
/// SFTTrainer (transformers' `num_items_in_batch`) has it, so the run equals one of
/// full batches of 16 and ends where TRL ends.
#[test]
fn accumulated_causal_lm_loss_is_the_token_mean_of_the_whole_batch() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let config = repo().join("data/configs/llama-sft.toml");
    let base = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "train".to_string(),
            config.display().to_string(),
            "--output_dir".into(),
            out.display().to_string(),
            "--train_file".into(),
            repo().join("data/sft/train.jsonl").display().to_string(),
            "--disable_tqdm".into(),
            "true".into(),
        ];
        a.extend(NO_EVAL.iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        kiln(a).expect_success();
    };
    let init = w.join("init");
    base(
        &init,
        &[
            "--learning_rate",
            "0",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
        ],
    );
    let run = |name: &str, batch: &str, ga: &str| {
        let out = w.join(name);
        let flags = [
            "--model_name_or_path",
            init.to_str().unwrap(),
            "--max_train_samples",
            "16",
            "--per_device_train_batch_size",
            batch,
            "--gradient_accumulation_steps",
            ga,
            "--max_steps",
            "3",
            "--learning_rate",
            "3e-3",
            "--warmup_steps",
            "1",
            "--lr_scheduler_type",
            "linear",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            // Some weights (a norm's) get gradients of ~3e-9, where AdamW's default eps
            // (1e-8) turns float noise in them into updates of a few % of lr; 1e-6 on
            // both sides keeps the comparison on the maths.
            "--adam_epsilon",
            "1e-6",
        ];
        base(&out, &flags);
        out
    };
    let accumulated = run("accumulated", "8", "2");
    let full = run("full", "16", "1");
    let job = json!({
        "kind": "sft", "init": init, "kiln": accumulated, "other": full, "out": w.join("trl"),
        "rows": repo().join("data/sft/train.jsonl"), "n": 16,
        "args": {"max_steps": 3, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
            "learning_rate": 3e-3, "warmup_steps": 1, "lr_scheduler_type": "linear", "weight_decay": 0.01,
            "logging_steps": 1, "seed": 42, "optim": "adamw_torch", "max_length": 64, "adam_epsilon": 1e-6},
    });
    let Some(results) = run_checker(&repo().join("tests/check_hf_trainer.py"), &[job], w) else {
        return;
    };
    let r = &results[0];
    assert_eq!(r["missing"], json!([]));
    let (diff, apart) = (
        r["max_diff"].as_f64().unwrap(),
        r["other_diff"].as_f64().unwrap(),
    );
    println!(
        "accumulated: weights within {diff:.2e} of TRL's, {apart:.2e} of kiln's full-batch run"
    );
    assert!(apart < 1e-5, "accumulation changed the run by {apart}");
    assert!(diff < 1e-5, "weights differ from TRL's by {diff}");
    let ours = read_json(&accumulated.join("trainer_state.json"))["log_history"].clone();
    let (a, b) = (series(&ours, "loss"), series(&r["log_history"], "loss"));
    assert_eq!(a.len(), 3, "{a:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() <= 1e-4, "losses {a:?} vs TRL {b:?}");
    }
}
