//! `save_total_limit` rotation. PLACEHOLDER: being implemented.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Deletes the oldest complete checkpoints beyond `limit`, never the best nor the newest.
pub fn rotate(output_dir: &Path, limit: usize, best: Option<&Path>) -> Result<Vec<PathBuf>> {
    let _ = (limit, best);
    Err(Error::Invalid(format!("{}: not yet", output_dir.display())))
}
