//! `save_total_limit` rotation, as transformers 5 defines it and without its bugs.
//!
//! - Candidates are the folders [`list_checkpoints`] reports complete (kiln's, and
//!   whole transformers checkpoints): named `checkpoint-<digits>`, directly under the
//!   output folder, not symbolic links, ordered by **step**, never by modification time
//!   (transformers 4 sorts by mtime, which copies and restores scramble).
//! - Incomplete folders are neither counted nor deleted: they are not this run's
//!   committed checkpoints (a kiln save never leaves one under a final name), they may
//!   be a copy in progress or evidence of a crash, and deleting them is the user's call.
//!   Other names (`checkpoint-abc`, `checkpoint-5.bak`, plain files) are never touched.
//! - Protected: the newest complete checkpoint (what a resume needs) and the best one
//!   (`best_model_checkpoint`). The best is recognised after canonicalisation, so
//!   `./out/checkpoint-5`, `out/checkpoint-5`, an absolute path or a path through a
//!   link all match (transformers compares raw strings and misses `./out` vs `out`).
//!   A best path that does not exist protects nothing.
//! - `keep = max(limit, protected)`; the oldest unprotected checkpoints are deleted until
//!   `keep` remain. So `limit = 1` keeps 2 folders when the best is not the newest, and 1
//!   when it is.
//! - `limit = 0` disables rotation (transformers: `None` or `<= 0`).
//! - Deleting renames the folder to a hidden `.checkpoint-N.del-kiln` first, then removes
//!   it: a crash mid-deletion never leaves a half-deleted folder under a final name;
//!   [`clean_leftovers`](crate::scan::clean_leftovers) removes the rest.
//!
//! Run it on the main process only, after a commit.

use std::fs;
use std::path::{Path, PathBuf};

use crate::commit::{Fs, StdFs, deleting_name};
use crate::error::IoContext;
use crate::scan::list_checkpoints;
use crate::{Error, Result};

/// Deletes the oldest complete checkpoints beyond `limit`, never the best nor the newest.
/// Returns the deleted folders (their `checkpoint-N` paths), oldest first.
pub fn rotate(output_dir: &Path, limit: usize, best: Option<&Path>) -> Result<Vec<PathBuf>> {
    rotate_inner(output_dir, limit, best, None)
}

/// [`rotate`] right after `saved` was committed: `saved` is protected too, and the
/// checkpoints of later steps (left by an earlier, longer run that this one resumed
/// before its end) count only if their files match their manifest's digests — a
/// corrupt one is never the "newest" kept in place of a sound one, and, like an
/// incomplete folder, is neither counted nor deleted.
pub fn rotate_after_save(
    output_dir: &Path,
    limit: usize,
    best: Option<&Path>,
    saved: &Path,
) -> Result<Vec<PathBuf>> {
    rotate_inner(output_dir, limit, best, Some(saved))
}

fn rotate_inner(
    output_dir: &Path,
    limit: usize,
    best: Option<&Path>,
    saved: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let saved_step = saved
        .and_then(|p| p.file_name())
        .and_then(|n| crate::scan::parse_step(&n.to_string_lossy()));
    let mut complete = Vec::new();
    for e in list_checkpoints(output_dir)? {
        if !e.is_complete() {
            continue;
        }
        let later = saved_step.is_some_and(|s| e.step > s);
        if later && !crate::scan::sound(&e.path) {
            continue;
        }
        complete.push(e);
    }
    let Some(newest) = complete.last() else {
        return Ok(Vec::new());
    };
    let newest = newest.path.clone();
    let saved = saved.and_then(|p| fs::canonicalize(p).ok());
    let is_saved = |p: &Path| {
        saved
            .as_deref()
            .is_some_and(|s| fs::canonicalize(p).is_ok_and(|c| c == s))
    };
    let best = best.and_then(|b| fs::canonicalize(b).ok());
    let is_best = |p: &Path| {
        best.as_deref()
            .is_some_and(|b| fs::canonicalize(p).is_ok_and(|c| c == b))
    };
    let protected: Vec<bool> = complete
        .iter()
        .map(|e| e.path == newest || is_best(&e.path) || is_saved(&e.path))
        .collect();
    let n_protected = protected.iter().filter(|&&p| p).count();
    let keep = limit.max(n_protected);
    let mut excess = complete.len().saturating_sub(keep);
    let mut deleted = Vec::new();
    for (entry, protected) in complete.iter().zip(protected) {
        if excess == 0 {
            break;
        }
        if protected {
            continue;
        }
        delete_checkpoint(output_dir, entry.step, &entry.path)?;
        deleted.push(entry.path.clone());
        excess -= 1;
    }
    Ok(deleted)
}

/// Renames a checkpoint out of sight, syncs the parent, then removes it.
fn delete_checkpoint(output_dir: &Path, step: u64, path: &Path) -> Result<()> {
    let hidden = output_dir.join(deleting_name(step));
    if fs::symlink_metadata(&hidden).is_ok() {
        fs::remove_dir_all(&hidden).at(&hidden)?;
    }
    StdFs.rename(path, &hidden).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                e.kind(),
                format!("moving aside for deletion to {}: {e}", hidden.display()),
            ),
        )
    })?;
    StdFs.sync_dir(output_dir).at(output_dir)?;
    fs::remove_dir_all(&hidden).at(&hidden)
}
