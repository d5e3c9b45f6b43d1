//! The bodies of kiln's fuzz targets.
//!
//! The harness lives in its own file so that the root crate's
//! `tests/fuzz_regressions.rs` replays the saved crash inputs through exactly the same
//! code (it includes `harness.rs` with `#[path]`).

pub mod harness;
