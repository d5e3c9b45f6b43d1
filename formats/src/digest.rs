//! BLAKE3 digests of the files kiln's writers write, taken from the bytes as they go
//! out (never by reading a file back), for checkpoint manifests.
//!
//! A checkpoint save calls [`record`] for its staging folder; while the returned
//! [`Recording`] lives, every file that kiln's writers (safetensors, shard indexes, the
//! checkpoint crate's own JSON and staged files) write under that folder has its digest
//! kept in it by final path, for the commit to put in the manifest. Writers elsewhere
//! pay nothing: no recording covers them.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The digests of the files written under one folder while it is recorded.
#[derive(Debug)]
pub struct Recording {
    dir: PathBuf,
    digests: Mutex<BTreeMap<PathBuf, String>>,
}

/// The folders being recorded, in this process.
static ACTIVE: Mutex<Vec<Arc<Recording>>> = Mutex::new(Vec::new());

/// Keeps a folder recorded; dropping it ends the recording.
#[derive(Debug)]
pub struct RecordingGuard(Arc<Recording>);

impl RecordingGuard {
    /// The recording.
    pub fn recording(&self) -> &Recording {
        &self.0
    }
}

impl Drop for RecordingGuard {
    fn drop(&mut self) {
        if let Ok(mut active) = ACTIVE.lock() {
            active.retain(|r| !Arc::ptr_eq(r, &self.0));
        }
    }
}

/// Starts recording the digests of files written under `dir`.
pub fn record(dir: &Path) -> RecordingGuard {
    let r = Arc::new(Recording {
        dir: dir.to_path_buf(),
        digests: Mutex::new(BTreeMap::new()),
    });
    if let Ok(mut active) = ACTIVE.lock() {
        active.push(r.clone());
    }
    RecordingGuard(r)
}

/// The recording that covers `path`, if any.
pub fn recording_for(path: &Path) -> Option<Arc<Recording>> {
    let active = ACTIVE.lock().ok()?;
    active.iter().find(|r| path.starts_with(&r.dir)).cloned()
}

impl Recording {
    /// Keeps `digest` (lower-case hex) for `path`.
    pub fn insert(&self, path: &Path, digest: String) {
        if let Ok(mut d) = self.digests.lock() {
            d.insert(path.to_path_buf(), digest);
        }
    }

    /// The digest recorded for `path`.
    pub fn get(&self, path: &Path) -> Option<String> {
        self.digests.lock().ok()?.get(path).cloned()
    }
}

/// Records the digest of `bytes` for `path` when a recording covers it (for writers
/// that hold a file's whole content in memory).
pub fn note_bytes(path: &Path, bytes: &[u8]) {
    if let Some(r) = recording_for(path) {
        r.insert(path, blake3::hash(bytes).to_hex().to_string());
    }
}

/// A writer that hashes what passes through it when `hasher` is set.
#[derive(Debug)]
pub struct Hashing<W> {
    inner: W,
    hasher: Option<blake3::Hasher>,
}

impl<W: Write> Hashing<W> {
    /// Wraps `inner`; hashes only when `on`.
    pub fn new(inner: W, on: bool) -> Self {
        Hashing {
            inner,
            hasher: on.then(blake3::Hasher::new),
        }
    }

    /// The wrapped writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The digest of everything written (lower-case hex), if hashing.
    pub fn digest(&self) -> Option<String> {
        self.hasher
            .as_ref()
            .map(|h| h.finalize().to_hex().to_string())
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The BLAKE3 digest of a file's content (reading it: for verification, and for files
/// a recording did not see being written).
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            // A signal (kiln train handles SIGTERM) may interrupt the read: read again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}
