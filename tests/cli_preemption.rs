//! A run owns its output_dir, and a signal saves before it exits: a second `kiln train`
//! into a live run's folder is refused (the first unharmed), a SIGKILLed holder frees it
//! at once, and SIGTERM / SIGINT at random moments leave a checkpoint at the step
//! reached from which `--resume_from_checkpoint last` ends bit-identical to an
//! uninterrupted run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{NO_EVAL, kiln, kiln_bin, resume_args, tiny_bert_args, weights_of};
use kiln::checkpoint::lock::{Holder, LOCK_NAME};
use kiln::checkpoint::scan::{last_checkpoint, list_checkpoints, verify_checkpoint};

/// A run long enough to be caught alive (evaluation off: [`NO_EVAL`]).
const LONG: [&str; 6] = [
    "--max_steps",
    "400",
    "--save_steps",
    "100",
    "--save_total_limit",
    "2",
];

fn long() -> Vec<&'static str> {
    [&LONG[..], &NO_EVAL[..]].concat()
}

fn spawn(args: &[String]) -> Child {
    Command::new(kiln_bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `out`'s lock file names `pid` (the run has taken its folder).
fn wait_for_lock(out: &Path, pid: u32) {
    let start = Instant::now();
    loop {
        let holder = std::fs::read_to_string(out.join(LOCK_NAME))
            .ok()
            .and_then(|t| serde_json::from_str::<Holder>(&t).ok());
        if holder.is_some_and(|h| h.pid == pid) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no lock taken");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn stderr_of(child: Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_live_runs_folder_is_refused_and_a_killed_holder_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dup");
    let first = spawn(&tiny_bert_args(&out, &long()));
    wait_for_lock(&out, first.id());
    let pid = first.id();

    let second = kiln(tiny_bert_args(&out, &["--overwrite_output_dir", "true"]));
    second.expect_code(1);
    let line = second
        .expect_error(&["in use", "another kiln run"])
        .to_string();
    assert!(line.contains(&format!("pid {pid}")), "{line}");

    // The first run is unharmed: it finishes and saves its model.
    let (code, err) = stderr_of(first);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.join("model.safetensors").exists());
    for c in list_checkpoints(&out).unwrap() {
        verify_checkpoint(&c.path).unwrap();
    }

    // A SIGKILLed holder leaves no stale lock: the next run starts at once.
    let killed = dir.path().join("killed");
    let mut holder = spawn(&tiny_bert_args(&killed, &long()));
    wait_for_lock(&killed, holder.id());
    holder.kill().unwrap();
    holder.wait().unwrap();
    kiln(tiny_bert_args(
        &killed,
        &["--max_steps", "2", "--overwrite_output_dir", "true"],
    ))
    .expect_success();
}

#[test]
fn a_signal_saves_the_step_reached_and_resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    // Checkpoints every 16 steps: a signal between two of them saves its own step.
    let extra = [
        &[
            "--max_steps",
            "64",
            "--save_steps",
            "16",
            "--save_total_limit",
            "3",
        ][..],
        &NO_EVAL[..],
    ]
    .concat();
    let straight = dir.path().join("straight");
    kiln(tiny_bert_args(&straight, &extra)).expect_success();

    let stopped = dir.path().join("stopped");
    let start = Instant::now();
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut stops = 0;
    loop {
        let child = spawn(&resume_args(&stopped, &extra));
        wait_for_lock(&stopped, child.id());
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(200 + seed % 900));
        let (name, code) = if stops % 3 == 2 {
            ("INT", 130)
        } else {
            ("TERM", 143)
        };
        signal(&child, name);
        let (status, err) = stderr_of(child);
        if status == Some(0) {
            break; // finished before the signal
        }
        assert_eq!(status, Some(code), "SIG{name}: {err}");
        let line = err.lines().last().unwrap();
        if line.contains(&format!("stopped by SIG{name} before its first step")) {
            continue; // still reading the data: nothing new to save
        }
        assert!(
            line.contains(&format!("stopped by SIG{name} after step")),
            "{err}"
        );
        // The step reached is saved, complete, and is what `last` resumes.
        let step: u64 = line
            .split("after step ")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .unwrap()
            .parse()
            .unwrap();
        let c = last_checkpoint(&stopped).unwrap().unwrap();
        assert!(c.ends_with(format!("checkpoint-{step}")), "{line}");
        verify_checkpoint(&c).unwrap();
        stops += 1;
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "did not finish after {stops} stops"
        );
        if stops >= 5 {
            kiln(resume_args(&stopped, &extra)).expect_success();
            break;
        }
    }
    println!("stopped {stops} times");
    assert!(stops > 0, "no signal landed during training");
    let (a, b) = (weights_of(&straight), weights_of(&stopped));
    let diffs = kiln::formats::compare::compare(&a, &b, Default::default()).unwrap();
    assert!(diffs.is_empty(), "after {stops} stops: {diffs:?}");
}

#[test]
fn a_second_signal_exits_at_once_and_save_on_signal_false_dies_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("twice");
    let child = spawn(&tiny_bert_args(&out, &long()));
    wait_for_lock(&out, child.id());
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "TERM");
    signal(&child, "TERM");
    let (code, err) = stderr_of(child);
    assert_eq!(code, Some(143), "{err}");
    // Whatever is visible under a final name is whole.
    for c in list_checkpoints(&out).unwrap() {
        assert!(c.is_complete(), "{:?}", c.completeness);
        verify_checkpoint(&c.path).unwrap();
    }

    let plain = dir.path().join("plain");
    let child = spawn(&tiny_bert_args(
        &plain,
        &[&long()[..], &["--save_on_signal", "false"]].concat(),
    ));
    wait_for_lock(&plain, child.id());
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "TERM");
    let out = child.wait_with_output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(15), "killed by the signal itself");
    for c in list_checkpoints(&plain).unwrap() {
        verify_checkpoint(&c.path).unwrap();
    }
}
