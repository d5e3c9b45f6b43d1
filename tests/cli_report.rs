//! `report_to tensorboard` through the `kiln` binary, read back by tensorboard's own
//! `EventAccumulator`: the scalar tags transformers' `TensorBoardCallback` writes, with
//! the values of `log_history` at the same steps, the arguments and model config as
//! text; `total_flos` as transformers counts it; a SIGKILLed run's curves kept and its
//! resumed run's added; other integrations refused in one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{kiln, logged_gpt2_args, repo};
use kiln::checkpoint::scan::{last_checkpoint, parse_step};
use kiln_test_support::fs::read_json;
use kiln_test_support::run_checker;
use serde_json::{Value, json};

#[test]
fn tensorboard_reads_kilns_event_files_as_transformers_writes_them() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("run");
    let logdir = work.path().join("tb");
    kiln(logged_gpt2_args(
        &out,
        &[
            "--report_to",
            "tensorboard",
            "--logging_dir",
            logdir.to_str().unwrap(),
        ],
    ))
    .expect_success();
    let files: Vec<String> = kiln_test_support::fs::names(&logdir);
    assert!(
        files.len() == 1 && files[0].starts_with("events.out.tfevents."),
        "{files:?}"
    );
    // Without logging_dir: transformers' default folder, output_dir/runs/<time>_<host>.
    let default = work.path().join("default");
    kiln(logged_gpt2_args(
        &default,
        &["--report_to", "all", "--max_steps", "1"],
    ))
    .expect_success();
    let runs = kiln_test_support::fs::names(&default.join("runs"));
    assert_eq!(runs.len(), 1, "{runs:?}");

    let jobs = [
        json!({"kind": "events", "logdir": logdir}),
        json!({"kind": "flos_params", "model": out}),
    ];
    let Some(results) = run_checker(&repo().join("tests/check_report.py"), &jobs, work.path())
    else {
        return;
    };
    let (scalars, texts) = (&results[0]["scalars"], &results[0]["texts"]);
    let history = read_json(&out.join("trainer_state.json"))["log_history"].clone();
    let checked = assert_logged(&history, scalars);
    assert!(checked > 20, "{checked} values checked");
    for tag in [
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "eval/loss",
    ] {
        assert!(
            scalars.get(tag).is_some(),
            "no {tag} in {:?}",
            scalars.as_object().unwrap().keys()
        );
    }
    let args: Value = serde_json::from_str(texts["args/text_summary"].as_str().unwrap()).unwrap();
    assert_eq!(args["max_steps"], 4);
    let config: Value =
        serde_json::from_str(texts["model_config/text_summary"].as_str().unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");

    // total_flos: 6 × tokens × parameters outside the embeddings, as transformers counts.
    let params = results[1]["params"].as_f64().unwrap();
    let state = read_json(&out.join("trainer_state.json"));
    let tokens = 4.0 * 4.0 * 32.0;
    assert_eq!(state["total_flos"].as_f64().unwrap(), 6.0 * tokens * params);
}

/// Asserts that every number of `log_history` is a scalar of the event files at its
/// step, under transformers' tag (`eval_loss` → `eval/loss`, `loss` → `train/loss`);
/// returns how many were checked.
fn assert_logged(history: &Value, scalars: &Value) -> usize {
    let mut checked = 0;
    for entry in history.as_array().unwrap() {
        let step = entry["step"].as_u64().unwrap();
        for (key, value) in entry.as_object().unwrap() {
            let Some(v) = value.as_f64() else { continue };
            if key == "step" {
                continue;
            }
            let tag = match key.strip_prefix("eval_") {
                Some(k) => format!("eval/{k}"),
                None => format!("train/{key}"),
            };
            let points = scalars[&tag]
                .as_array()
                .unwrap_or_else(|| panic!("no {tag}"));
            let found = points.iter().any(|p| {
                p[0].as_u64() == Some(step)
                    && (p[1].as_f64().unwrap() - v).abs() <= 1e-6 * v.abs().max(1.0)
            });
            assert!(found, "{tag} = {v} at step {step} is not in {points:?}");
            checked += 1;
        }
    }
    checked
}

/// A run killed with SIGKILL keeps the curves it logged (each log is flushed), and its
/// resumed run writes a second event file beside the first (as transformers does):
/// TensorBoard, reading the folder, has every value of the final log_history.
#[test]
fn a_killed_runs_curves_survive_and_its_resumed_run_adds_a_file() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("run");
    let tb = work.path().join("tb");
    let tb_flags = [
        "--report_to",
        "tensorboard",
        "--logging_dir",
        tb.to_str().unwrap(),
    ];
    let endless = ["--max_steps", "1000000", "--save_steps", "2"];
    let mut child = std::process::Command::new(kiln_test_support::bin::kiln_bin())
        .args(logged_gpt2_args(
            &out,
            &[&endless[..], &tb_flags[..]].concat(),
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while last_checkpoint(&out).ok().flatten().is_none() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("kiln train ended ({status}) before its first checkpoint: {err}");
        }
        assert!(start.elapsed().as_secs() < 120, "no checkpoint saved");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(kiln_test_support::fs::names(&tb).len(), 1);

    // Resume the newest checkpoint for 3 more steps, logging into the same folder.
    let newest = last_checkpoint(&out).unwrap().unwrap();
    let step = parse_step(newest.file_name().unwrap().to_str().unwrap()).unwrap();
    let max = (step + 3).to_string();
    let resume = ["--max_steps", &max, "--save_steps", "2"];
    let last = ["--resume_from_checkpoint", "last"];
    kiln(logged_gpt2_args(
        &out,
        &[&resume[..], &tb_flags[..], &last[..]].concat(),
    ))
    .expect_success();
    assert_eq!(kiln_test_support::fs::names(&tb).len(), 2);

    let jobs = [json!({"kind": "events", "logdir": tb})];
    let Some(results) = run_checker(&repo().join("tests/check_report.py"), &jobs, work.path())
    else {
        return;
    };
    let history = read_json(&out.join("trainer_state.json"))["log_history"].clone();
    let steps: Vec<u64> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("loss").is_some())
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    // The killed run's steps (in the first file only) and the resumed run's.
    assert_eq!(steps, (1..=step + 3).collect::<Vec<_>>());
    let checked = assert_logged(&history, &results[0]["scalars"]);
    assert!(checked >= steps.len() * 3, "{checked} values checked");
    println!("killed after checkpoint-{step}: {checked} values of log_history in 2 event files");
}

#[test]
fn other_integrations_are_refused_in_one_line() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("run");
    kiln(logged_gpt2_args(&out, &["--report_to", "wandb"])).expect_error(&["wandb", "tensorboard"]);
    assert!(!out.exists() || kiln_test_support::fs::names(&out).is_empty());
}
