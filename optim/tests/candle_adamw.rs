//! The candle_adamw example resumes bit for bit: 20 steps at once and 10 + 10 steps from
//! its checkpoint give the same final weights and the same optimizer state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/candle_adamw.rs"]
mod candle_adamw;

#[test]
fn twenty_steps_equal_ten_then_ten_more() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    assert_eq!(candle_adamw::run(a.path(), 20).unwrap(), 0);
    assert_eq!(candle_adamw::run(b.path(), 10).unwrap(), 0);
    assert!(b.path().join("checkpoint-10").is_dir());
    assert_eq!(
        candle_adamw::run(b.path(), 20).unwrap(),
        10,
        "resumed at step 10"
    );
    for file in ["final/model.safetensors", "checkpoint-20/optimizer.pt"] {
        let x = std::fs::read(a.path().join(file)).unwrap();
        let y = std::fs::read(b.path().join(file)).unwrap();
        assert!(x == y, "{file} differs");
    }
    // And training moved the weights (the files are not trivially equal).
    let first = std::fs::read(a.path().join("checkpoint-5/model.safetensors")).unwrap();
    let last = std::fs::read(a.path().join("final/model.safetensors")).unwrap();
    assert_ne!(first, last);
}
