//! Write-then-rename: a file appears under its final name complete and synced, or not
//! at all.

use std::fs::File;
use std::path::Path;

use crate::digest::Hashing;
use crate::{Error, Result, ResultExt};

/// Writes `path` through `write`, into a hidden temporary sibling that is synced to disk
/// and then renamed over `path`; the parent folder is synced after the rename.
///
/// If `write` or any step fails, the temporary file is removed and `path` is untouched.
/// Under a [`digest::record`](crate::digest::record)ing, the bytes written through
/// `write`'s [`Sink`] are hashed on the way and the digest kept for `path`.
pub(crate) fn write_file(
    path: &Path,
    write: impl FnOnce(&mut Sink<'_>) -> Result<()>,
) -> Result<()> {
    let (parent, mut tmp) = temp_sibling(path)?;
    let recording = crate::digest::recording_for(path);
    let mut sink = Sink(Hashing::new(tmp.as_file_mut(), recording.is_some()));
    write(&mut sink)?;
    let digest = sink.0.digest();
    tmp.as_file().sync_all().in_file(path)?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    if let (Some(r), Some(d)) = (recording, digest) {
        r.insert(path, d);
    }
    sync_dir(parent)
}

/// [`write_file`] for a large file whose bytes the caller can feed again from memory:
/// under a recording, `rehash` feeds the same bytes, in the same order, to a hasher on
/// a second thread while this one writes and fsyncs the file, so that the digest costs
/// time only where it outlasts the write (and the file is never read back).
pub(crate) fn write_file_rehashed(
    path: &Path,
    write: impl FnOnce(&mut Sink<'_>) -> Result<()>,
    rehash: impl FnOnce(&mut blake3::Hasher) -> Result<()> + Send,
) -> Result<()> {
    let (parent, mut tmp) = temp_sibling(path)?;
    let recording = crate::digest::recording_for(path);
    let file = tmp.as_file_mut();
    let write_and_sync = |file: &mut File| -> Result<()> {
        write(&mut Sink(Hashing::new(&mut *file, false)))?;
        file.sync_all().in_file(path)
    };
    let digest = match &recording {
        None => {
            write_and_sync(file)?;
            None
        }
        Some(_) => {
            let (written, hashed) = std::thread::scope(|s| {
                let hash = s.spawn(|| {
                    let mut hasher = blake3::Hasher::new();
                    rehash(&mut hasher).map(|()| hasher.finalize())
                });
                let written = write_and_sync(file);
                let hashed = hash
                    .join()
                    .unwrap_or_else(|_| Err(Error::Argument("the hashing thread panicked".into())));
                (written, hashed)
            });
            written?;
            Some(hashed?.to_hex().to_string())
        }
    };
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    if let (Some(r), Some(d)) = (recording, digest) {
        r.insert(path, d);
    }
    sync_dir(parent)
}

/// The file a [`write_file`] closure writes: a `Write` (hashing when recorded) that can
/// also set the file's length ahead.
pub(crate) struct Sink<'a>(Hashing<&'a mut File>);

impl Sink<'_> {
    /// Sets the file's length (pre-allocation; writes still go from the start).
    pub(crate) fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.0.get_mut().set_len(len)
    }
}

impl std::io::Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// `path`'s folder and a hidden temporary file in it (removed unless persisted).
fn temp_sibling(path: &Path) -> Result<(&Path, tempfile::NamedTempFile)> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Argument(format!("{}: not a file path", path.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(parent)
        .in_file(parent)?;
    Ok((parent, tmp))
}

/// Syncs a folder so that renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).in_file(dir)?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
