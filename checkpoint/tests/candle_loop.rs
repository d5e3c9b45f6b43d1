//! The `candle_loop` example: 20 steps at once, and 10 steps then 10 more resumed from
//! its checkpoint, give bit-identical final weights.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/candle_loop.rs"]
mod candle_loop;

use std::path::Path;

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    let path = path.as_ref();
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn twenty_steps_equal_ten_then_ten_more() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    assert_eq!(candle_loop::run(a.path(), 20).unwrap(), 0, "a fresh start");

    assert_eq!(candle_loop::run(b.path(), 10).unwrap(), 0);
    let ten = b.path().join("checkpoint-10");
    assert!(
        ten.join("kiln_checkpoint.json").is_file(),
        "checkpoint-10 committed"
    );
    assert_eq!(
        candle_loop::run(b.path(), 20).unwrap(),
        10,
        "resumed at step 10"
    );

    let final_a = read(a.path().join("final/model.safetensors"));
    let final_b = read(b.path().join("final/model.safetensors"));
    assert!(final_a == final_b, "the final weights differ");
    assert_eq!(
        read(a.path().join("final/config.json")),
        read(b.path().join("final/config.json"))
    );
    // The checkpoints on the way agree too, and training moved the weights.
    for step in [5, 10, 15, 20] {
        let name = format!("checkpoint-{step}/model.safetensors");
        assert!(
            read(a.path().join(&name)) == read(b.path().join(&name)),
            "{name}"
        );
    }
    assert_ne!(
        read(a.path().join("checkpoint-5/model.safetensors")),
        final_a
    );
    assert!(read(a.path().join("checkpoint-20/model.safetensors")) == final_a);
}

#[test]
fn a_run_past_the_requested_steps_is_refused() {
    let out = tempfile::tempdir().unwrap();
    candle_loop::run(out.path(), 10).unwrap();
    let e = candle_loop::run(out.path(), 5).unwrap_err().to_string();
    assert!(
        e.contains("already past step 5") && !e.contains('\n'),
        "{e}"
    );
}
