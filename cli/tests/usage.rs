//! Usage errors exit 2 with a message; help exits 0. (This test also makes
//! `cargo test --workspace` build the `kiln` binary that the top-level tests run.)

#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::path::Path;

fn kiln(args: &[&str]) -> std::process::Output {
    kiln_test_support::bin::run(Path::new(env!("CARGO_BIN_EXE_kiln")), args)
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["inspect"],
        &["diff", "a"],
        &["convert", "a", "b", "--to", "zip"],
        &["convert", "a", "b.safetensors", "--max-shard-size", "5XB"],
    ] {
        let out = kiln(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.is_empty() && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn help_and_version_exit_0() {
    let out = kiln(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["inspect", "convert", "verify", "diff", "backends"] {
        assert!(text.contains(cmd), "{text}");
    }
    assert_eq!(kiln(&["--version"]).status.code(), Some(0));
}

#[test]
fn runtime_errors_exit_1_with_one_line() {
    let out = kiln(&["inspect", "/nonexistent/model.safetensors"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/model.safetensors"), "{err}");
}
