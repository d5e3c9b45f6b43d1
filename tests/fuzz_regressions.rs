//! Replays every input the fuzzers found a bug with (`fuzz/artifacts-regressions/<target>/`)
//! and the committed seed corpus (`fuzz/corpus/<target>/`) through the fuzz targets' own
//! code (`fuzz/src/harness.rs`, included below), so a fixed crash stays fixed without
//! cargo fuzz: no panic (errors are fine), no allocation over 1 GiB, no input over 20 s.
//! The valid seeds must also be accepted, so the targets are known to reach past the
//! parsers into reading and round trips.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../fuzz/src/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// libFuzzer's `-malloc_limit_mb=1024`, as the fuzz runs use it.
const MAX_ALLOCATION: usize = 1 << 30;
/// Allocations this large fail outright, so a regression cannot take the machine down.
const REFUSED_ALLOCATION: usize = 8 << 30;
/// A generous bound for one input in a debug build (the fuzz runs allow 10 s, optimised).
const MAX_TIME: Duration = Duration::from_secs(20);

/// The system allocator, recording the largest request made on each thread.
struct Recording;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) -> bool {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    size < REFUSED_ALLOCATION
}

// SAFETY: forwards every call to `System` unchanged, or fails an allocation (null),
// which the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !record(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !record(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !record(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Recording = Recording;

fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for folder in ["artifacts-regressions", "corpus"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(folder).join(target)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.') {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// Runs `target` on each of its saved inputs on this thread; returns how many.
fn replay(target: &str) -> usize {
    let run = harness::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|t| t.1)
        .unwrap();
    let files = inputs(target);
    for path in &files {
        let data = std::fs::read(path).unwrap();
        LARGEST.with(|l| l.set(0));
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(|| {
            run(&data);
        });
        let took = start.elapsed();
        let largest = LARGEST.with(Cell::get);
        assert!(outcome.is_ok(), "{target}: {} panicked", path.display());
        assert!(
            largest <= MAX_ALLOCATION,
            "{target}: {} allocated {largest} bytes at once",
            path.display()
        );
        assert!(
            took <= MAX_TIME,
            "{target}: {} took {took:?}",
            path.display()
        );
    }
    files.len()
}

macro_rules! replay_tests {
    ($($target:ident),*) => {$(
        #[test]
        fn $target() {
            let n = replay(stringify!($target));
            eprintln!("{}: replayed {n} inputs", stringify!($target));
        }
    )*};
}

replay_tests!(
    safetensors,
    pickle,
    zip,
    shard_index,
    config,
    trainer_state,
    optimizer,
    inspect,
    gguf
);

/// Seeds (`fuzz/make_seeds.py`) that are valid input for their target.
const VALID_SEEDS: [(&str, &[&str]); 9] = [
    ("safetensors", &["st_all_dtypes", "st_shapes", "model"]),
    (
        "pickle",
        &["all_dtypes", "nested", "optimizer", "views", "protocol4"],
    ),
    (
        "zip",
        &[
            "all_dtypes",
            "views",
            "optimizer",
            "checkpoint",
            "nested_tree",
        ],
    ),
    ("shard_index", &["harness_shards", "harness_bin"]),
    ("config", &["gpt2", "bert-seqcls", "tiny-gpt2"]),
    ("trainer_state", &["trainer_state_example", "nan_inf"]),
    ("optimizer", &["adamw", "empty"]),
    (
        "inspect",
        &[
            "harness_index",
            "optimizer",
            "all_dtypes",
            "st_shapes",
            "gguf",
        ],
    ),
    ("gguf", &["all_types", "version2", "align64", "empty"]),
];

#[test]
fn valid_seeds_are_accepted() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, seeds) in VALID_SEEDS {
        let run = harness::TARGETS.iter().find(|t| t.0 == target).unwrap().1;
        for seed in seeds {
            let path = corpus.join(target).join(format!("seed-{seed}"));
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(run(&data), "{target} refuses {}", path.display());
        }
    }
}

#[test]
fn every_target_has_a_corpus_and_a_test() {
    for (name, _) in harness::TARGETS {
        assert!(!inputs(name).is_empty(), "fuzz/corpus/{name} is empty");
    }
    let folders = ["artifacts-regressions", "corpus"];
    for folder in folders {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(folder);
        for e in std::fs::read_dir(&dir).into_iter().flatten() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                harness::TARGETS.iter().any(|t| t.0 == name),
                "fuzz/{folder}/{name} is no target's folder"
            );
        }
    }
}
