//! `kiln checkpoints` and `kiln verify` on training output folders.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use kiln::checkpoint::commit::SingleProcess;
use kiln::checkpoint::state::TrainerState;
use kiln::checkpoint::training::CheckpointSnapshot;
use kiln::formats::{DType, TensorMap, TensorView};
use kiln_test_support::bin::kiln_bin;

fn snapshot(step: u64, best: Option<&Path>) -> CheckpointSnapshot {
    let mut weights = TensorMap::new();
    weights
        .insert(
            "w",
            TensorView::new(DType::F32, vec![4], vec![step as u8; 16]).unwrap(),
        )
        .unwrap();
    let config = serde_json::json!({"architectures": ["Tiny"], "model_type": "tiny"});
    CheckpointSnapshot::new(step, config, std::sync::Arc::new(weights))
        .with_scheduler(serde_json::json!({"step": step}))
        .with_state(TrainerState {
            global_step: step,
            best_model_checkpoint: best.map(|b| b.display().to_string()),
            ..Default::default()
        })
}

#[test]
fn lists_marks_and_verifies_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    for step in [5, 10] {
        snapshot(step, None).write(out, &SingleProcess).unwrap();
    }
    snapshot(15, Some(&out.join("checkpoint-5")))
        .write(out, &SingleProcess)
        .unwrap();
    // A folder copied in half: named like a checkpoint, no manifest, no state.
    std::fs::create_dir(out.join("checkpoint-20")).unwrap();
    std::fs::write(out.join("checkpoint-20/config.json"), "{}").unwrap();

    let run = Command::new(kiln_bin())
        .args(["checkpoints", "--json"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let steps: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [5, 10, 15, 20]);
    assert_eq!(list[0]["best"], true);
    assert_eq!(list[2]["last"], true);
    assert_eq!(list[3]["complete"], false);
    assert!(list[3]["reason"].as_str().unwrap().len() > 5);

    let text = Command::new(kiln_bin())
        .arg("checkpoints")
        .arg(out)
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("incomplete"), "{text}");

    let ok = Command::new(kiln_bin())
        .arg("verify")
        .arg(out.join("checkpoint-10"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = Command::new(kiln_bin())
        .arg("verify")
        .arg(out.join("checkpoint-20"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    // Corrupt a committed checkpoint: verify names the problem in one line.
    let st = out.join("checkpoint-15/model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&st, bytes).unwrap();
    let bad = Command::new(kiln_bin())
        .arg("verify")
        .arg(out.join("checkpoint-15"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8(bad.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");

    let missing = Command::new(kiln_bin())
        .arg("checkpoints")
        .arg(out.join("nope"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
}
