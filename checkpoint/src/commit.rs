//! The commit protocol: a checkpoint is written into a hidden temporary sibling
//! (`.checkpoint-<step>.tmp-kiln`), every file and the folder are synced, a manifest
//! listing every file is written last, and the folder is renamed into place and its
//! parent synced. A folder that is not complete is never visible under its final name.
//!
//! PLACEHOLDER: signatures only; being implemented.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The manifest written last into every checkpoint kiln commits: the files and their
/// sizes. Its presence and agreement with the folder is what "complete" means.
pub const MANIFEST_NAME: &str = "kiln_checkpoint.json";

/// Rank, world size and barrier of a (possibly multi-process) run.
///
/// Only the main process (global rank 0) commits; other ranks write their own files
/// (e.g. `rng_state_<rank>.json`) into the staging folder before the barrier.
pub trait Coordinator: Send + Sync {
    /// Global rank of this process.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// Rank within this node.
    fn local_rank(&self) -> usize {
        self.rank()
    }
    /// Waits until every process reaches the barrier; fails (rather than hanging
    /// forever) if one does not.
    fn barrier(&self) -> Result<()>;
    /// Whether this process commits (global rank 0).
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
}

/// The coordinator of a single-process run.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Coordinator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// A checkpoint folder being written.
#[derive(Debug)]
pub struct Staging {
    final_dir: PathBuf,
    tmp_dir: PathBuf,
}

impl Staging {
    /// Starts `output_dir/checkpoint-<step>`: creates the hidden staging folder.
    pub fn begin(output_dir: &Path, step: u64, coord: &dyn Coordinator) -> Result<Staging> {
        let _ = coord;
        let final_dir = output_dir.join(format!("checkpoint-{step}"));
        let tmp_dir = output_dir.join(format!(".checkpoint-{step}.tmp-kiln"));
        Err(Error::Invalid(format!(
            "{} {}: not yet",
            final_dir.display(),
            tmp_dir.display()
        )))
    }

    /// The staging folder, where files go.
    pub fn dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// The name the checkpoint will have once committed.
    pub fn final_dir(&self) -> &Path {
        &self.final_dir
    }

    /// Syncs, writes the manifest, renames into place; returns the final folder.
    pub fn commit(self, coord: &dyn Coordinator) -> Result<PathBuf> {
        let _ = coord;
        Err(Error::Invalid("not yet".into()))
    }
}
