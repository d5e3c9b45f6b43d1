//! Helpers shared by the tests of several kiln crates (a dev-dependency only).
//!
//! The interop tests run real Python (torch, transformers, safetensors): [`python`]
//! finds it, [`python_or_skip`] turns its absence into a printed skip — or a failure
//! under `KILN_REQUIRE_PYTHON=1`, as CI sets — and [`run_checker`] runs one of the
//! tests' checker scripts over a JSON list of jobs ([`transformers_check`]: a crate's
//! `tests/check_models.py`).
//!
//! Beside it: [`fs`] (copying and listing test folders), [`bin`] (finding and running
//! the `kiln` binary, checking its exit and messages), [`tensors`] (tensor values as
//! numbers), [`backend`] (an f32-only backend), [`max_abs_diff`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod backend;
pub mod bin;
pub mod fs;
pub mod tensors;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// Python with torch, safetensors and transformers: `$KILN_PYTHON`, else the venv
/// `.ci/run` creates (`~/.cache/kiln/venv`). `Err` says why there is none.
pub fn python() -> Result<PathBuf, String> {
    static PY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PY.get_or_init(|| {
        let (py, from) = match std::env::var_os("KILN_PYTHON") {
            Some(p) if !p.is_empty() => (PathBuf::from(p), "KILN_PYTHON"),
            _ => {
                let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
                (
                    Path::new(&home).join(".cache/kiln/venv/bin/python"),
                    "the default venv",
                )
            }
        };
        let out = Command::new(&py)
            .args(["-c", "import torch, safetensors, transformers"])
            .output()
            .map_err(|e| format!("no Python at {} ({from}): {e}", py.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().last().unwrap_or("").to_string();
            return Err(format!(
                "{} ({from}) cannot import torch, safetensors, transformers: {last}",
                py.display()
            ));
        }
        Ok(py)
    })
    .clone()
}

/// Whether CI asked for Python to be a requirement (`KILN_REQUIRE_PYTHON=1`).
pub fn python_required() -> bool {
    std::env::var_os("KILN_REQUIRE_PYTHON").is_some_and(|v| v == "1")
}

/// [`python`], or `None` after printing `skipping: <reason>`; panics instead under
/// `KILN_REQUIRE_PYTHON=1`.
pub fn python_or_skip() -> Option<PathBuf> {
    match python() {
        Ok(py) => Some(py),
        Err(why) if python_required() => panic!("KILN_REQUIRE_PYTHON=1 but {why}"),
        Err(why) => {
            println!("skipping: {why}");
            None
        }
    }
}

/// Runs the checker `script` on `jobs` (written to `work/jobs.json`; one Python process
/// for all, since importing torch takes seconds) and returns its `results`. The script
/// prints one JSON line last: `{"results": [...]}`, or `{"skip": "<reason>"}` (a
/// missing module), which is a printed skip here (`None`) — a failure under
/// `KILN_REQUIRE_PYTHON=1`, like a missing Python. A failing script panics with its
/// output.
pub fn run_checker(script: &Path, jobs: &[Value], work: &Path) -> Option<Vec<Value>> {
    let python = python_or_skip()?;
    let jobs_path = work.join("jobs.json");
    std::fs::write(&jobs_path, serde_json::to_string(jobs).unwrap()).unwrap();
    let out = Command::new(&python)
        .arg(script)
        .arg(&jobs_path)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    if let Some(why) = report.get("skip") {
        assert!(!python_required(), "KILN_REQUIRE_PYTHON=1 but {why}");
        println!("skipping: {why}");
        return None;
    }
    Some(report["results"].as_array().unwrap().clone())
}

/// Runs `<crate_dir>/tests/check_models.py` (the checker of that crate's tests, with
/// real transformers) on `jobs`; see [`run_checker`].
pub fn transformers_check(crate_dir: &Path, jobs: &[Value], work: &Path) -> Option<Vec<Value>> {
    run_checker(&crate_dir.join("tests/check_models.py"), jobs, work)
}

/// The largest absolute difference between two equally long lists of values.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "different lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
