//! `kiln backends`: the listing, its JSON, and device selection that fails in one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Output;

use kiln_test_support::bin::text;

fn kiln(args: &[&str]) -> std::process::Output {
    kiln_test_support::bin::run(Path::new(env!("CARGO_BIN_EXE_kiln")), args)
}

fn stdout(out: &Output) -> String {
    text(&out.stdout)
}

fn stderr(out: &Output) -> String {
    text(&out.stderr)
}

#[test]
fn lists_cpu_and_the_backends_not_compiled_in() {
    let out = kiln(&["backends"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("cpu (priority 0): available\n"), "{text}");
    assert!(text.contains("  cpu:0  "), "{text}");
    if !cfg!(feature = "cuda") {
        assert!(
            text.contains("cuda: not compiled into this build; rebuild with --features cuda\n"),
            "{text}"
        );
    }
}

#[test]
fn json_is_an_array_of_backends() {
    let out = kiln(&["backends", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cpu = v
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "cpu")
        .unwrap();
    assert_eq!(cpu["available"], true);
    assert_eq!(cpu["reason"], serde_json::Value::Null);
    assert_eq!(cpu["devices"][0]["ordinal"], 0);
    assert!(cpu["capabilities"]["threads"].as_u64().unwrap() >= 1);
    assert_eq!(cpu["capabilities"]["deterministic"], true);
}

#[test]
fn a_device_that_exists_is_printed() {
    for spec in ["cpu", "CPU:0", "auto"] {
        let out = kiln(&["backends", "--device", spec]);
        assert_eq!(out.status.code(), Some(0), "{spec}: {}", stderr(&out));
        if spec != "auto" {
            assert!(stdout(&out).starts_with("cpu:0: "), "{}", stdout(&out));
        }
    }
    let out = kiln(&["backends", "--device", "cpu", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["device"].as_str(), v["backend"].as_str()),
        (Some("cpu:0"), Some("cpu"))
    );
}

#[test]
fn an_unavailable_device_fails_in_one_line_with_exit_1() {
    let mut cases = vec![
        ("cpu:3", "kiln: cpu:3: only 1 device\n"),
        ("npu", "kiln: npu: unknown backend (this build has: "),
    ];
    if !cfg!(feature = "cuda") {
        cases.push((
            "cuda:1",
            "kiln: cuda: not compiled into this build; rebuild with --features cuda\n",
        ));
    }
    if !cfg!(feature = "metal") {
        cases.push(("metal", "kiln: metal: not compiled into this build; "));
    }
    for (spec, want) in cases {
        let out = kiln(&["backends", "--device", spec]);
        assert_eq!(out.status.code(), Some(1), "{spec}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{spec}: {err}");
        assert!(err.starts_with(want), "{spec}: {err}");
        assert!(stdout(&out).is_empty());
    }
}

#[test]
fn a_malformed_device_string_is_a_usage_error() {
    for spec in ["cuda:x", "auto:1", ""] {
        let out = kiln(&["backends", "--device", spec]);
        assert_eq!(out.status.code(), Some(2), "{spec}");
        assert!(
            stderr(&out).contains("not a device string"),
            "{}",
            stderr(&out)
        );
    }
}
