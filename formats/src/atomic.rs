//! Write-then-rename: a file appears under its final name complete and synced, or not
//! at all.

use std::fs::File;
use std::path::Path;

use crate::{Error, Result, ResultExt};

/// Writes `path` through `write`, into a hidden temporary sibling that is synced to disk
/// and then renamed over `path`; the parent folder is synced after the rename.
///
/// If `write` or any step fails, the temporary file is removed and `path` is untouched.
pub(crate) fn write_file(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Argument(format!("{}: not a file path", path.display())))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(parent)
        .in_file(parent)?;
    write(tmp.as_file_mut())?;
    tmp.as_file().sync_all().in_file(path)?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    sync_dir(parent)
}

/// Syncs a folder so that renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).in_file(dir)?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
