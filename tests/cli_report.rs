//! `report_to tensorboard` through the `kiln` binary, read back by tensorboard's own
//! `EventAccumulator`: the scalar tags transformers' `TensorBoardCallback` writes, with
//! the values of `log_history` at the same steps, the arguments and model config as
//! text; `total_flos` as transformers counts it; other integrations refused in one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{kiln, logged_gpt2_args, repo};
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

#[test]
fn other_integrations_are_refused_in_one_line() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("run");
    kiln(logged_gpt2_args(&out, &["--report_to", "wandb"])).expect_error(&["wandb", "tensorboard"]);
    assert!(!out.exists() || kiln_test_support::fs::names(&out).is_empty());
}
