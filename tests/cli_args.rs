//! transformers' training arguments on `kiln train`'s command line and in `[training]`:
//! those that change nothing here run with one note each, refused ones stop the run in
//! one line before it writes anything, wrong types are refused as transformers refuses
//! them; and the fields implemented with transformers' semantics (`eval_on_start`,
//! `include_num_input_tokens_seen`, `run_name`, `use_cpu`, `prediction_loss_only`) do
//! what transformers does (tests/trainer_parity.rs runs some against its Trainer).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{kiln, logged_gpt2_args, repo, tiny_bert_args};
use kiln_test_support::fs::read_json;
use serde_json::Value;

fn history(out: &Path) -> Vec<Value> {
    read_json(&out.join("trainer_state.json"))["log_history"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn arguments_that_change_nothing_run_with_a_note_and_refused_ones_stop_in_one_line() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("run");
    let noted = [
        "--dataloader_num_workers",
        "4",
        "--full_determinism",
        "true",
        "--ddp_find_unused_parameters",
        "true",
        // transformers' defaults: silent.
        "--push_to_hub",
        "false",
        "--auto_find_batch_size",
        "false",
        "--dataloader_pin_memory",
        "true",
    ];
    let run = kiln(tiny_bert_args(&out, &noted));
    run.expect_success();
    let notes: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("note: "))
        .collect();
    assert_eq!(notes.len(), 3, "{notes:#?}");
    assert!(notes[0].starts_with("note: dataloader_num_workers 4 changes nothing here: "));
    assert!(
        notes[1]
            .contains("full_determinism true changes nothing here: kiln is always deterministic")
    );
    assert!(notes[2].contains("ddp_find_unused_parameters true changes nothing here"));

    for (flag, value, words) in [
        (
            "--push_to_hub",
            "true",
            "push_to_hub true: kiln does not push to the Hub",
        ),
        (
            "--auto_find_batch_size",
            "true",
            "auto_find_batch_size true: not implemented in kiln: give per_device_train_batch_size",
        ),
        (
            "--deepspeed",
            "ds.json",
            "deepspeed ds.json: kiln's ZeRO stage 1 is zero_stage = 1",
        ),
        (
            "--fsdp",
            "full_shard",
            "fsdp full_shard: kiln shards only the optimizer state",
        ),
        (
            "--dataloader_num_workers",
            "four",
            "dataloader_num_workers must be a whole number, got four",
        ),
        (
            "--torch_compile",
            "yes",
            "torch_compile true: there is no torch graph to compile",
        ),
    ] {
        let refused = work.path().join("refused");
        let e = kiln(tiny_bert_args(&refused, &[flag, value]));
        e.expect_code(2);
        assert!(
            e.one_stderr_line().contains(words),
            "{flag} {value}: {}",
            e.stderr
        );
        assert!(
            !refused.exists(),
            "{flag} {value} wrote {}",
            refused.display()
        );
    }

    // The same in a config's [training] table, with the file named.
    let config = work.path().join("c.toml");
    let base = std::fs::read_to_string(repo().join("cli/bundled/bert-sentiment.toml")).unwrap();
    std::fs::write(
        &config,
        base.replace("\n[training]\n", "\n[training]\nbf16_full_eval = true\n"),
    )
    .unwrap();
    let mut args = tiny_bert_args(&work.path().join("cfg"), &[]);
    args[1] = config.display().to_string();
    let e = kiln(&args);
    e.expect_code(1);
    let line = e.one_stderr_line();
    assert!(
        line.contains("c.toml: [training] bf16_full_eval true: not implemented in kiln yet"),
        "{line}"
    );
}

#[test]
fn eval_on_start_and_tokens_seen_are_logged_as_transformers_logs_them() {
    let work = tempfile::tempdir().unwrap();
    // GPT-2 on 32-token blocks, 4 per step, no padding: 128 tokens a step.
    let out = work.path().join("gpt2");
    let flags = [
        "--eval_on_start",
        "true",
        "--include_num_input_tokens_seen",
        "true",
        "--run_name",
        "tokens",
    ];
    kiln(logged_gpt2_args(&out, &flags)).expect_success();
    let h = history(&out);
    assert_eq!(h[0]["step"], 0);
    assert_eq!(h[0]["epoch"], 0.0);
    assert!(
        h[0]["eval_loss"].is_f64() && h[0].get("loss").is_none(),
        "{}",
        h[0]
    );
    assert_eq!(h[0]["num_input_tokens_seen"], 0);
    for e in &h[1..] {
        let step = e["step"].as_u64().unwrap();
        assert_eq!(e["num_input_tokens_seen"].as_u64(), Some(step * 128), "{e}");
        if e.get("loss").is_some() {
            assert!(e["train_tokens_per_second"].as_f64().unwrap() > 0.0, "{e}");
            assert!(e["train_runtime"].as_f64().is_some(), "{e}");
        }
    }
    let state = read_json(&out.join("trainer_state.json"));
    assert_eq!(state["num_input_tokens_seen"], 4 * 128);
    let args = read_json(&out.join("training_args.json"));
    assert_eq!(args["run_name"], "tokens");
    assert_eq!(args["include_num_input_tokens_seen"], "all");

    // Resumed from checkpoint-2: the count goes on from the checkpoint's.
    let resumed = work.path().join("resumed");
    let two = ["--max_steps", "2", "--include_num_input_tokens_seen", "all"];
    kiln(logged_gpt2_args(&resumed, &two)).expect_success();
    let more = [
        "--include_num_input_tokens_seen",
        "all",
        "--resume_from_checkpoint",
        "last",
    ];
    kiln(logged_gpt2_args(&resumed, &more)).expect_success();
    assert_eq!(
        read_json(&resumed.join("trainer_state.json"))["num_input_tokens_seen"],
        4 * 128
    );

    // A padded classifier: non_padding counts the attention mask's ones, fewer than all.
    let count = |what: &str| {
        let dir = work.path().join(what);
        let f = ["--include_num_input_tokens_seen", what, "--use_cpu", "true"];
        kiln(tiny_bert_args(&dir, &f)).expect_success();
        read_json(&dir.join("trainer_state.json"))["num_input_tokens_seen"]
            .as_u64()
            .unwrap()
    };
    let (all, real) = (count("all"), count("non_padding"));
    assert!(0 < real && real < all, "non_padding {real}, all {all}");

    // eval_on_start needs evaluation data (a config without a validation_file); use_cpu
    // and another device conflict.
    let config = work.path().join("no-eval.toml");
    let base = std::fs::read_to_string(repo().join("cli/bundled/bert-sentiment.toml")).unwrap();
    let kept: Vec<&str> = base
        .lines()
        .filter(|l| !l.starts_with("validation_file"))
        .collect();
    std::fs::write(&config, kept.join("\n")).unwrap();
    let x = work.path().join("x");
    let mut args: Vec<String> = tiny_bert_args(&x, &common::NO_EVAL)
        .into_iter()
        .filter(|a| !a.contains("validation"))
        .collect();
    args[1] = config.display().to_string();
    args.extend(["--eval_on_start".to_string(), "true".to_string()]);
    let e = kiln(&args);
    e.expect_error(&["eval_on_start needs evaluation data"]);
    assert!(!x.join("trainer_state.json").exists());
    let e = kiln(tiny_bert_args(
        &work.path().join("y"),
        &["--use_cpu", "true", "--device", "cuda"],
    ));
    assert!(
        e.one_stderr_line()
            .contains("use_cpu is set but device is \"cuda\""),
        "{}",
        e.stderr
    );

    // prediction_loss_only: evaluations log the loss, no metric; a metric cannot then
    // choose the best model.
    let lo = work.path().join("loss-only");
    let f = [
        "--prediction_loss_only",
        "true",
        "--metric_for_best_model",
        "loss",
    ];
    kiln(tiny_bert_args(&lo, &f)).expect_success();
    let evals: Vec<Value> = history(&lo)
        .into_iter()
        .filter(|e| e.get("eval_loss").is_some())
        .collect();
    assert!(!evals.is_empty());
    assert!(
        evals.iter().all(|e| e.get("eval_accuracy").is_none()),
        "{evals:?}"
    );
    let e = kiln(tiny_bert_args(
        &work.path().join("z"),
        &["--prediction_loss_only", "true"],
    ));
    assert!(
        e.one_stderr_line()
            .contains("metric_for_best_model accuracy is a metric"),
        "{}",
        e.stderr
    );
}

#[test]
fn neftune_noises_training_only_and_is_reproducible() {
    let work = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = work.path().join(name);
        kiln(logged_gpt2_args(&out, extra)).expect_success();
        (std::fs::read(out.join("model.safetensors")).unwrap(), out)
    };
    let (plain, _) = run("plain", &[]);
    let (noisy, out) = run("noisy", &["--neftune_noise_alpha", "5"]);
    let (again, _) = run("again", &["--neftune_noise_alpha", "5"]);
    assert_ne!(plain, noisy, "NEFTune changed nothing");
    assert_eq!(noisy, again, "the same seed gives the same noise");
    // The evaluation at the last step (neftune still on) saw no noise: it equals a
    // fresh evaluation of the saved model.
    let h = history(&out);
    let last = h
        .iter()
        .rfind(|e| e["step"] == 4 && e.get("eval_loss").is_some())
        .unwrap();
    let e = kiln([
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--validation_file",
        repo().join("data/corpus/validation.txt").to_str().unwrap(),
        "--block_size",
        "32",
        "--max_eval_samples",
        "8",
    ]);
    e.expect_success();
    let fresh: Value = serde_json::from_str(e.stdout.trim()).unwrap();
    assert_eq!(fresh["eval_loss"], last["eval_loss"], "{fresh} vs {last}");
    let bad = kiln(logged_gpt2_args(
        &work.path().join("bad"),
        &["--neftune_noise_alpha", "-1"],
    ));
    assert!(
        bad.one_stderr_line()
            .contains("neftune_noise_alpha must be > 0"),
        "{}",
        bad.stderr
    );
}
