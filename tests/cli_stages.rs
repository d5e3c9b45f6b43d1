//! `kiln train` as transformers' example scripts run: the stages `do_train`, `do_eval`
//! and `do_predict` select, the `*_results.json` files `save_metrics` writes and
//! `predict_results.txt`; and the arguments that shape what a run reports —
//! `skip_memory_metrics`, `log_level`, `label_names`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{NO_EVAL, causal_args, kiln, repo, tiny_bert_args};
use kiln_test_support::fs::read_json;
use serde_json::Value;

fn history(out: &Path) -> Vec<Value> {
    read_json(&out.join("trainer_state.json"))["log_history"]
        .as_array()
        .unwrap()
        .clone()
}

fn validation() -> String {
    repo()
        .join("cli/bundled/sentiment/validation.jsonl")
        .display()
        .to_string()
}

#[test]
fn stages_write_what_the_example_scripts_write() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // None set: train, evaluate, and the results files.
    let out = w.join("default");
    kiln(tiny_bert_args(&out, &[])).expect_success();
    let train = read_json(&out.join("train_results.json"));
    assert_eq!(train["train_samples"], 96);
    assert!(train["train_loss"].is_f64() && train["train_runtime"].is_f64());
    let eval = read_json(&out.join("eval_results.json"));
    assert_eq!(eval["eval_samples"], 32);
    let all = read_json(&out.join("all_results.json"));
    assert_eq!(all["train_loss"], train["train_loss"]);
    assert_eq!(all["eval_loss"], eval["eval_loss"]);
    let text = std::fs::read_to_string(out.join("train_results.json")).unwrap();
    assert!(text.starts_with("{\n    \""), "indent 4: {text}");

    // do_eval alone: the saved model evaluated, nothing trained or saved; the same
    // numbers as kiln eval over the same batches (the bundled config's 64; other
    // batches change the last bits, as the matrix kernels block rows differently).
    let only = w.join("eval-only");
    let run = kiln(tiny_bert_args(
        &only,
        &[
            "--model_name_or_path",
            out.to_str().unwrap(),
            "--do_eval",
            "true",
        ],
    ));
    run.expect_success();
    assert!(!run.stdout.contains("trained"), "{}", run.stdout);
    assert!(!only.join("model.safetensors").exists());
    assert!(!only.join("train_results.json").exists());
    let again = kiln([
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--validation_file",
        &validation(),
        "--max_eval_samples",
        "32",
        "--per_device_eval_batch_size",
        "64",
    ]);
    again.expect_success();
    let fresh: Value = serde_json::from_str(again.stdout.trim()).unwrap();
    assert_eq!(
        read_json(&only.join("eval_results.json"))["eval_loss"],
        fresh["eval_loss"]
    );

    // do_train and do_predict: predict_results.txt, one class name per test row.
    let predicted = w.join("predict");
    let mut flags = NO_EVAL.to_vec();
    let test_file = validation();
    flags.extend([
        "--do_train",
        "true",
        "--do_predict",
        "true",
        "--test_file",
        &test_file,
    ]);
    kiln(tiny_bert_args(&predicted, &flags)).expect_success();
    assert!(!predicted.join("eval_results.json").exists());
    let text = std::fs::read_to_string(predicted.join("predict_results.txt")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "index\tprediction");
    assert_eq!(lines.len(), 321);
    for (i, l) in lines[1..].iter().enumerate() {
        let (index, class) = l.split_once('\t').unwrap();
        assert_eq!(index, i.to_string());
        assert!(["negative", "positive"].contains(&class), "{l}");
    }

    // A stage without its data, or predicting with a language model: one line, nothing
    // written.
    let bad = w.join("bad");
    let mut flags = NO_EVAL.to_vec();
    flags.extend(["--do_predict", "true"]);
    let e = kiln(tiny_bert_args(&bad, &flags));
    assert!(
        e.one_stderr_line().contains("do_predict needs test_file"),
        "{}",
        e.stderr
    );
    assert!(!bad.exists());
    let config = w.join("no-eval.toml");
    let base = std::fs::read_to_string(repo().join("cli/bundled/bert-sentiment.toml")).unwrap();
    let kept: Vec<&str> = base
        .lines()
        .filter(|l| !l.starts_with("validation_file"))
        .collect();
    std::fs::write(&config, kept.join("\n")).unwrap();
    let mut args: Vec<String> = tiny_bert_args(&bad, &NO_EVAL)
        .into_iter()
        .filter(|a| !a.contains("validation"))
        .collect();
    args[1] = config.display().to_string();
    args.extend(["--do_eval".to_string(), "true".to_string()]);
    let e = kiln(&args);
    assert!(
        e.one_stderr_line().contains("needs validation_file"),
        "{}",
        e.stderr
    );
    assert!(!bad.exists());
    let bad = w.join("lm");
    let e = kiln(causal_args(
        "gpt2-corpus.toml",
        &bad,
        &["--do_predict", "true", "--test_file", &validation()],
    ));
    assert!(
        e.one_stderr_line()
            .contains("do_predict writes the classes"),
        "{}",
        e.stderr
    );
    assert!(!bad.exists());
}

#[test]
fn memory_metrics_log_levels_and_label_names() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // skip_memory_metrics false: transformers' keys, whole bytes, in the summary entry
    // and the results files.
    let out = w.join("memory");
    kiln(tiny_bert_args(&out, &["--skip_memory_metrics", "false"])).expect_success();
    let h = history(&out);
    let summary = h.iter().find(|e| e.get("train_loss").is_some()).unwrap();
    for key in [
        "train_mem_cpu_alloc_delta",
        "train_mem_cpu_peaked_delta",
        "init_mem_cpu_alloc_delta",
        "init_mem_cpu_peaked_delta",
    ] {
        assert!(summary[key].is_i64(), "{key}: {summary}");
    }
    assert!(summary["before_init_mem_cpu"].as_i64().unwrap() > 0);
    let eval = read_json(&out.join("eval_results.json"));
    assert!(eval["eval_mem_cpu_peaked_delta"].is_i64(), "{eval}");
    let plain = w.join("plain");
    kiln(tiny_bert_args(&plain, &[])).expect_success();
    let quiet = history(&plain);
    assert!(
        quiet
            .iter()
            .all(|e| e.get("train_mem_cpu_alloc_delta").is_none())
    );

    // log_level: informational lines go at error, the log entries stay.
    let loud = kiln(tiny_bert_args(
        &w.join("loud"),
        &["--dataloader_num_workers", "2"],
    ));
    loud.expect_success();
    assert!(loud.stderr.contains("loading best model from"));
    assert!(loud.stderr.contains("note: dataloader_num_workers 2"));
    let hushed = kiln(tiny_bert_args(
        &w.join("hushed"),
        &["--log_level", "error", "--dataloader_num_workers", "2"],
    ));
    hushed.expect_success();
    assert!(
        !hushed.stderr.contains("loading best model"),
        "{}",
        hushed.stderr
    );
    assert!(!hushed.stderr.contains("note: "), "{}", hushed.stderr);
    assert!(hushed.stderr.contains("\"loss\": "), "{}", hushed.stderr);
    let bad = kiln(tiny_bert_args(&w.join("bad"), &["--log_level", "loud"]));
    assert_ne!(bad.code, Some(0));
    assert!(bad.one_stderr_line().contains("loud"), "{}", bad.stderr);

    // label_names without the batches' `labels`: evaluations have no labels (no loss,
    // no accuracy), as in transformers; naming it changes nothing.
    let no_best = [
        "--load_best_model_at_end",
        "false",
        "--metric_for_best_model",
        "none",
    ];
    let unlabelled = w.join("unlabelled");
    let mut flags = no_best.to_vec();
    flags.extend(["--label_names", "label"]);
    kiln(tiny_bert_args(&unlabelled, &flags)).expect_success();
    let evals: Vec<Value> = history(&unlabelled)
        .into_iter()
        .filter(|e| e.get("eval_runtime").is_some())
        .collect();
    assert!(!evals.is_empty());
    for e in &evals {
        assert!(
            e.get("eval_loss").is_none() && e.get("eval_accuracy").is_none(),
            "{e}"
        );
    }
    let named = w.join("named");
    let mut flags = no_best.to_vec();
    flags.extend(["--label_names", "labels"]);
    kiln(tiny_bert_args(&named, &flags)).expect_success();
    assert!(history(&named).iter().any(|e| e["eval_accuracy"].is_f64()));
}
