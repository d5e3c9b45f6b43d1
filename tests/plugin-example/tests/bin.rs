//! The template's binary (`kiln_cli::main` with the plugins linked) lists and resolves
//! the backend plugin with `kiln backends`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

/// `kiln-example backends ARGS`.
fn kiln_null(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln-example"))
        .arg("backends")
        .args(args)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn json_lists_cpu_and_the_plugin() {
    let out = kiln_null(&["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cpu", "null"]);
    assert_eq!(v[1]["available"], true);
    assert_eq!(v[1]["reason"], serde_json::Value::Null);
    assert_eq!(v[1]["devices"][0]["ordinal"], 0);
}

#[test]
fn text_lists_the_plugin_and_what_is_not_compiled_in() {
    let out = kiln_null(&[]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("null (priority -10): available\n"), "{text}");
    assert!(
        text.contains("  null:0  candle's CPU device, under another name\n"),
        "{text}"
    );
    assert!(
        text.contains("cuda: not compiled into this build; rebuild with --features cuda\n"),
        "{text}"
    );
}

#[test]
fn devices_resolve_or_fail_in_one_line() {
    let out = kiln_null(&["--device", "null"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "null:0: candle's CPU device, under another name\n"
    );
    for (spec, code, want) in [
        ("null:4", 1, "kiln: null:4: only 1 device\n"),
        (
            "cuda",
            1,
            "kiln: cuda: not compiled into this build; rebuild with --features cuda\n",
        ),
    ] {
        let out = kiln_null(&["--device", spec]);
        assert_eq!(out.status.code(), Some(code), "{spec}");
        assert_eq!(stderr(&out), want, "{spec}");
    }
    // A malformed device string is a usage error, reported by the command line parser.
    let out = kiln_null(&["--device", "null:x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(
            "\"null:x\": not a device string; expected auto, a backend name (cpu, cuda, metal, …) or name:N such as cuda:1"
        ),
        "{}",
        stderr(&out)
    );
}
