//! Finding checkpoints in an output folder. PLACEHOLDER: being implemented.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One `checkpoint-<step>` folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointEntry {
    /// The step in its name.
    pub step: u64,
    /// Its path.
    pub path: PathBuf,
    /// Total bytes of its files.
    pub bytes: u64,
    /// `Ok` if complete, else why not.
    pub complete: std::result::Result<(), String>,
}

/// Every folder named `checkpoint-<digits>` under `output_dir`, ordered by step.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<CheckpointEntry>> {
    Err(Error::Invalid(format!("{}: not yet", output_dir.display())))
}

/// The complete checkpoint with the highest step, if any.
pub fn last_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Err(Error::Invalid(format!("{}: not yet", output_dir.display())))
}
