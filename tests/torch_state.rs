//! transformers' training-state files and kiln's, value for value: the committed
//! `optimizer.pt`, `scheduler.pt` and `scaler.pt` torch wrote
//! (tests/fixtures/hf_training_state, with the script that made them) read by kiln's
//! weights-only reader and named by transformers' parameter groups; and the same state
//! written by kiln, loaded by torch with `weights_only=True` into an AdamW, a
//! `LambdaLR` and a `GradScaler` (tests/check_torch_state.py), bit-equal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::{repo, sha256_hex};
use kiln::checkpoint::torch_state::{
    TorchOptimizer, TorchScheduler, load_scaler_pt, save_scaler_pt,
};
use kiln_test_support::fs::read_json;
use kiln_test_support::run_checker;
use serde_json::{Value, json};

fn fixture() -> PathBuf {
    repo().join("tests/fixtures/hf_training_state")
}

/// The fixture model's parameters, in order, with whether weight decay applies.
fn params(manifest: &Value) -> Vec<(String, bool)> {
    manifest["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["decay"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn transformers_files_read_by_kiln_by_parameter_name() {
    let manifest = read_json(&fixture().join("manifest.json"));
    let torch = TorchOptimizer::load(&fixture().join("optimizer.pt")).unwrap();
    assert_eq!(torch.groups.len(), 2);
    assert_eq!(torch.groups[0].lr, manifest["lr"].as_f64().unwrap());
    let state = torch.to_kiln(&params(&manifest)).unwrap();
    assert_eq!(state.kind, "adamw");
    assert_eq!(state.meta["torch_fused"], true);
    assert_eq!(
        state.meta["no_decay"],
        json!(["fc.bias", "norm.weight", "norm.bias", "head.bias"])
    );
    for (name, want) in manifest["state"].as_object().unwrap() {
        for slot in ["exp_avg", "exp_avg_sq"] {
            let t = state.get(name, slot).unwrap();
            assert_eq!(sha256_hex(t.data()), want[slot], "{name}.{slot}");
        }
        assert_eq!(state.meta["step"].as_f64(), want["step"].as_f64(), "{name}");
    }
    let sched = TorchScheduler::load(&fixture().join("scheduler.pt")).unwrap();
    assert_eq!(sched.last_epoch, manifest["scheduler"]["last_epoch"]);
    assert_eq!(json!(sched.last_lr), manifest["scheduler"]["last_lr"]);
    assert_eq!(
        load_scaler_pt(&fixture().join("scaler.pt")).unwrap(),
        manifest["scaler"]
    );
    // Parameters another model would have: one line naming the difference.
    let mut wrong = params(&manifest);
    wrong[1].1 = true;
    let e = torch.to_kiln(&wrong).unwrap_err().to_string();
    assert!(
        e.contains("hold [2, 4] parameters") && e.contains("[3, 3]"),
        "{e}"
    );
}

#[test]
fn kiln_files_load_in_torch_bit_equal() {
    let manifest = read_json(&fixture().join("manifest.json"));
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    // The state kiln read, written again by kiln: what torch loads must be the bytes
    // torch wrote in the first place.
    let mut state = TorchOptimizer::load(&fixture().join("optimizer.pt"))
        .unwrap()
        .to_kiln(&params(&manifest))
        .unwrap();
    state.meta["lr"] = manifest["lr"].clone();
    state.meta["initial_lr"] = json!(1e-3);
    TorchOptimizer::from_kiln(&state)
        .unwrap()
        .save(&dir.join("optimizer.pt"))
        .unwrap();
    let sched = TorchScheduler::load(&fixture().join("scheduler.pt")).unwrap();
    sched.save(&dir.join("scheduler.pt")).unwrap();
    save_scaler_pt(&dir.join("scaler.pt"), &manifest["scaler"]).unwrap();
    let job = json!({"dir": dir, "manifest": fixture().join("manifest.json")});
    let Some(results) = run_checker(&repo().join("tests/check_torch_state.py"), &[job], dir) else {
        return;
    };
    let r = &results[0];
    for (name, want) in manifest["state"].as_object().unwrap() {
        let got = &r["state"][name];
        assert_eq!(got["exp_avg"], want["exp_avg"], "{name}");
        assert_eq!(got["exp_avg_sq"], want["exp_avg_sq"], "{name}");
        assert_eq!(got["step"], want["step"], "{name}");
        assert_eq!(got["step_dtype"], "torch.float32", "{name}");
    }
    let groups = r["param_groups"].as_array().unwrap();
    assert_eq!(groups[0]["params"], json!([0, 1]));
    assert_eq!(groups[1]["params"], json!([2, 3, 4, 5]));
    assert_eq!(groups[0]["fused"], true);
    assert_eq!(groups[0]["betas"], json!([0.9, 0.999]));
    assert_eq!(groups[1]["weight_decay"], 0.0);
    assert_eq!(r["lr"], manifest["lr"]);
    assert_eq!(r["last_epoch"], sched.last_epoch + 1, "one more step");
    assert_eq!(r["scale"], manifest["scaler"]["scale"]);
    assert_eq!(r["growth_tracker"], 3);
}
