//! SIGKILL at random moments: a child process (this test binary, re-executed with an
//! environment variable) saves, re-saves and rotates checkpoints of a few MB in a loop;
//! the parent kills it many times and checks after each kill that cleaning the
//! leftovers yields only complete checkpoints holding exactly what the child wrote.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Sizes, assert_content, names, save};
use kiln_checkpoint::rotate::rotate;
use kiln_checkpoint::scan::{clean_leftovers, last_checkpoint, list_checkpoints, parse_step};

const CHILD_ENV: &str = "KILN_TEST_CRASH_CHILD_DIR";
const SIZES: Sizes = Sizes {
    model: 2 << 20,
    extra: 1 << 20,
};
const KEEP: usize = 3;

fn step_of(path: &Path) -> u64 {
    parse_step(path.file_name().unwrap().to_str().unwrap()).unwrap()
}

/// The child: resumes after the last complete checkpoint and saves forever. Every third
/// step is saved twice (a re-save replaces an existing folder); rotation keeps 3 plus
/// checkpoint-2 as the "best". Does nothing when run as an ordinary test.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let out = PathBuf::from(dir);
    let best = out.join("checkpoint-2");
    let mut step = last_checkpoint(&out)
        .unwrap()
        .map_or(1, |p| step_of(&p) + 1);
    loop {
        save(&out, step, 0, SIZES).unwrap();
        if step.is_multiple_of(3) {
            save(&out, step, 0, SIZES).unwrap();
        }
        rotate(&out, KEEP, Some(&best)).unwrap();
        step += 1;
    }
}

#[test]
fn sigkill_at_random_moments_never_leaves_a_broken_checkpoint() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let exe = std::env::current_exe().unwrap();
    let mut seed = 0x5EED_u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let start = Instant::now();
    let (mut kills, mut cleanups, mut last_step, mut stuck) = (0, 0, 0, 0);
    while kills < 30 && start.elapsed() < Duration::from_secs(15) {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--test-threads=1", "--nocapture"])
            .env(CHILD_ENV, &out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Random moments; longer while the child makes no progress (a loaded machine
        // starts processes slowly), so that the loop always gets somewhere.
        std::thread::sleep(Duration::from_millis(10 + rand() % 250 + 100 * stuck));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        if status.signal() != Some(libc::SIGKILL) {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the child ended by itself ({status}): {err}");
        }
        kills += 1;

        cleanups += clean_leftovers(&out).unwrap().len();
        if !out.exists() {
            stuck += 1;
            continue;
        }
        let hidden: Vec<String> = names(&out)
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "left after cleaning: {hidden:?}");
        let list = list_checkpoints(&out).unwrap();
        for e in &list {
            assert!(e.is_complete(), "kill {kills}: {e:?}");
            assert_content(&e.path, e.step, 0, SIZES);
        }
        if let Some(newest) = list.last() {
            assert_eq!(last_checkpoint(&out).unwrap(), Some(newest.path.clone()));
            assert!(newest.step >= last_step, "a committed checkpoint vanished");
            stuck = if newest.step > last_step {
                0
            } else {
                stuck + 1
            };
            last_step = newest.step;
            // Rotation keeps KEEP plus the best; a kill between a commit and the
            // rotation after it leaves one more.
            assert!(list.len() <= KEEP + 2, "{list:?}");
        }
    }
    println!(
        "{kills} kills in {:?}, reached step {last_step}, {cleanups} leftovers cleaned",
        start.elapsed()
    );
    assert!(kills >= 10);
    assert!(
        last_step >= 3,
        "the child made too little progress to test anything"
    );
    assert!(cleanups > 0, "no kill landed in the middle of a save");
}
