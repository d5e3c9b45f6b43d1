//! The commit protocol: a checkpoint appears under its final name complete, or not at
//! all.
//!
//! # Protocol
//!
//! 1. [`Staging::begin`]: the main process removes a stale staging folder of the same
//!    step (a crashed earlier attempt) and creates the hidden sibling
//!    `output_dir/.checkpoint-<step>.tmp-kiln`; then every rank meets at a barrier. The
//!    name is deterministic so that every rank finds it without communicating.
//! 2. Every rank writes its files into [`Staging::dir`] (directly, with any writer
//!    such as `kiln_formats::safetensors::save`, or through [`Staging::write`] /
//!    [`Staging::create`], which go through the [`Fs`] layer).
//! 3. [`Staging::commit`]: a barrier (every rank has written); then the main process
//!    fsyncs every file (recursively), writes the manifest [`MANIFEST_NAME`] **last**
//!    (`{"kiln_version", "step", "files": {"relative/name": size}, "blake3": {"relative/name":
//!    hex}}`, covering every file; the digests are taken while the files are written,
//!    [`kiln_formats::digest`]), fsyncs it and every folder, renames the folder to `checkpoint-<step>` and
//!    fsyncs the parent; then a second barrier.
//!
//! Re-saving a step that already exists (a run resumed from an earlier checkpoint
//! reaches the same step again): the existing `checkpoint-<step>` is renamed to the
//! hidden `.checkpoint-<step>.old-kiln`, the new folder is renamed in, and the old one
//! is deleted. A crash between the two renames leaves no `checkpoint-<step>` but a
//! complete `.old-kiln`; [`crate::scan::clean_leftovers`] (and the next commit of that
//! step) renames it back. Deleting the old copy after a successful commit is best
//! effort: a leftover is removed by `clean_leftovers`.
//!
//! Any error fails the save: the staging folder is removed (best effort), an existing
//! `checkpoint-<step>` that had been moved aside is put back, and no other checkpoint
//! is touched. Dropping a [`Staging`] without committing removes the staging folder too.
//!
//! # Multi-process
//!
//! Only the main process ([`Coordinator::is_main`]) creates, fsyncs, renames and
//! deletes. Files written by other processes on the same node are made durable by the
//! main process's fsync (fsync flushes a file whatever descriptor wrote it); on a
//! network file system a rank must sync its own files before `commit`
//! ([`StagedFile::finish`] and kiln's tensor writers do). A non-main rank learns
//! whether the main process succeeded by looking for the manifest of the final folder
//! after the second barrier, and fails with [`Error::Coordination`] if it is absent.
//!
//! # Fault injection
//!
//! Every file-system operation of the protocol goes through the [`Fs`] trait, whose
//! default methods are the real operations ([`StdFs`]). [`FaultyFs`] runs the same
//! operations but fails the ones a test chooses (the Nth write, a rename, the manifest
//! write, …): tests exercise the production code path, not a copy of it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::error::IoContext;
use crate::{Error, Result};

/// The manifest written last into every checkpoint kiln commits: the files and their
/// sizes. Its presence and agreement with the folder is what "complete" means.
pub const MANIFEST_NAME: &str = "kiln_checkpoint.json";

/// `checkpoint-<step>`, the final name of a checkpoint folder (as transformers names it).
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// The hidden staging folder of a step.
pub(crate) fn staging_name(step: u64) -> String {
    format!(".checkpoint-{step}.tmp-kiln")
}

/// Where an existing checkpoint of the same step waits while a re-save is renamed in.
pub(crate) fn old_name(step: u64) -> String {
    format!(".checkpoint-{step}.old-kiln")
}

/// Where rotation moves a checkpoint before deleting it, so that a half-deleted folder
/// never carries a final name.
pub(crate) fn deleting_name(step: u64) -> String {
    format!(".checkpoint-{step}.del-kiln")
}

/// The content of [`MANIFEST_NAME`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Version of kiln that committed the checkpoint.
    pub kiln_version: String,
    /// The training step.
    pub step: u64,
    /// Every file of the checkpoint but the manifest, by path relative to the folder
    /// (`/`-separated), with its size in bytes.
    pub files: BTreeMap<String, u64>,
    /// The BLAKE3 digest (lower-case hex) of every file of `files`, taken while it was
    /// written; empty in manifests of kiln versions before content hashes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub blake3: BTreeMap<String, String>,
}

impl Manifest {
    /// Reads and parses the manifest of a checkpoint folder.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_NAME);
        let text = fs::read(&path).at(&path)?;
        serde_json::from_slice(&text).map_err(|e| Error::json(&path, e))
    }
}

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

/// The file-system operations of the commit protocol.
///
/// The default methods are the real operations, and [`StdFs`] uses them unchanged.
/// Implement the trait to observe or fail operations ([`FaultyFs`] does); every
/// method receives the path it acts on.
pub trait Fs: fmt::Debug + Send + Sync {
    /// Creates a folder and its missing parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }
    /// Creates one folder (its parent must exist; it must not).
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }
    /// Removes a folder and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    /// Creates (or truncates) a file for writing.
    fn create_file(&self, path: &Path) -> io::Result<File> {
        File::create(path)
    }
    /// Writes some bytes of `buf` to `file` (which is `path`), like [`Write::write`].
    fn write(&self, file: &mut File, path: &Path, buf: &[u8]) -> io::Result<usize> {
        let _ = path;
        file.write(buf)
    }
    /// Flushes an open file's data and metadata to disk.
    fn sync_file(&self, file: &File, path: &Path) -> io::Result<()> {
        let _ = path;
        file.sync_all()
    }
    /// Flushes a file, given by path, to disk.
    fn sync_path(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
    /// Flushes a folder's entries (creations, renames, removals) to disk.
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        #[cfg(unix)]
        File::open(path)?.sync_all()?;
        #[cfg(not(unix))]
        let _ = path;
        Ok(())
    }
    /// Renames `from` to `to` (atomically, within one file system).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdFs;

impl Fs for StdFs {}

/// A kind of [`Fs`] operation, for choosing which one a [`Fault`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Fs::create_dir_all`] and [`Fs::create_dir`].
    CreateDir,
    /// [`Fs::remove_dir_all`] and [`Fs::remove_file`].
    Remove,
    /// [`Fs::create_file`].
    CreateFile,
    /// [`Fs::write`].
    Write,
    /// [`Fs::sync_file`] and [`Fs::sync_path`].
    SyncFile,
    /// [`Fs::sync_dir`].
    SyncDir,
    /// [`Fs::rename`].
    Rename,
}

/// One planned failure of a [`FaultyFs`]: the `nth` operation (1-based) that matches
/// the kind (or any kind) and the path filter fails once with the given error kind.
#[derive(Debug, Clone)]
pub struct Fault {
    op: Option<Op>,
    path_contains: Option<String>,
    path_ends_with: Option<PathBuf>,
    nth: u64,
    kind: io::ErrorKind,
    seen: u64,
}

impl Fault {
    /// Fails the first operation of kind `op`.
    pub fn on(op: Op) -> Self {
        Fault {
            op: Some(op),
            path_contains: None,
            path_ends_with: None,
            nth: 1,
            kind: io::ErrorKind::Other,
            seen: 0,
        }
    }

    /// Fails the first operation of any kind.
    pub fn any() -> Self {
        Fault {
            op: None,
            ..Fault::on(Op::Write)
        }
    }

    /// Fails the `n`th matching operation instead (1-based; 0 is taken as 1).
    pub fn nth(mut self, n: u64) -> Self {
        self.nth = n.max(1);
        self
    }

    /// Counts only operations on a path whose text contains `part`.
    pub fn path_contains(mut self, part: impl Into<String>) -> Self {
        self.path_contains = Some(part.into());
        self
    }

    /// Counts only operations on a path that ends with the components of `tail`
    /// (`Path::ends_with`: `"out"` matches `/tmp/x/out`, not `/tmp/x/out/a`).
    pub fn path_ends_with(mut self, tail: impl Into<PathBuf>) -> Self {
        self.path_ends_with = Some(tail.into());
        self
    }

    /// The kind of the injected error (default [`io::ErrorKind::Other`]); e.g.
    /// [`io::ErrorKind::StorageFull`] to imitate a full disk.
    pub fn with_kind(mut self, kind: io::ErrorKind) -> Self {
        self.kind = kind;
        self
    }

    fn matches(&self, op: Op, path: &Path) -> bool {
        self.op.is_none_or(|o| o == op)
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| path.to_string_lossy().contains(p))
            && self
                .path_ends_with
                .as_deref()
                .is_none_or(|t| path.ends_with(t))
    }
}

/// An [`Fs`] that performs the real operations but fails the ones its [`Fault`]s
/// choose, and records every operation it was asked for (see [`FaultyFs::log`]).
///
/// Meant for tests of crash safety; it is an ordinary type, not `cfg(test)`, so that
/// integration tests and users' tests can use it.
#[derive(Debug, Default)]
pub struct FaultyFs {
    inner: Mutex<FaultState>,
}

#[derive(Debug, Default)]
struct FaultState {
    faults: Vec<Fault>,
    log: Vec<(Op, PathBuf)>,
    injected: Vec<(Op, PathBuf)>,
}

impl FaultyFs {
    /// A layer that fails nothing (it only records).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a planned failure.
    pub fn with_fault(self, fault: Fault) -> Self {
        self.lock().faults.push(fault);
        self
    }

    /// Every operation asked for so far (including the failed ones), in order.
    pub fn log(&self) -> Vec<(Op, PathBuf)> {
        self.lock().log.clone()
    }

    /// The operations that were failed on purpose.
    pub fn injected(&self) -> Vec<(Op, PathBuf)> {
        self.lock().injected.clone()
    }

    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, op: Op, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.log.push((op, path.to_path_buf()));
        let mut fail = None;
        for f in st.faults.iter_mut() {
            if f.matches(op, path) {
                f.seen += 1;
                if f.seen == f.nth && fail.is_none() {
                    fail = Some(f.kind);
                }
            }
        }
        match fail {
            Some(kind) => {
                st.injected.push((op, path.to_path_buf()));
                Err(io::Error::new(kind, format!("injected fault ({op:?})")))
            }
            None => Ok(()),
        }
    }
}

impl Fs for FaultyFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.check(Op::CreateDir, path)?;
        StdFs.create_dir_all(path)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.check(Op::CreateDir, path)?;
        StdFs.create_dir(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.check(Op::Remove, path)?;
        StdFs.remove_dir_all(path)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.check(Op::Remove, path)?;
        StdFs.remove_file(path)
    }
    fn create_file(&self, path: &Path) -> io::Result<File> {
        self.check(Op::CreateFile, path)?;
        StdFs.create_file(path)
    }
    fn write(&self, file: &mut File, path: &Path, buf: &[u8]) -> io::Result<usize> {
        self.check(Op::Write, path)?;
        StdFs.write(file, path, buf)
    }
    fn sync_file(&self, file: &File, path: &Path) -> io::Result<()> {
        self.check(Op::SyncFile, path)?;
        StdFs.sync_file(file, path)
    }
    fn sync_path(&self, path: &Path) -> io::Result<()> {
        self.check(Op::SyncFile, path)?;
        StdFs.sync_path(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.check(Op::SyncDir, path)?;
        StdFs.sync_dir(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check(Op::Rename, from)?;
        StdFs.rename(from, to)
    }
}

/// A file being written into a staging folder through the [`Fs`] layer.
///
/// Write with [`Write`]; [`finish`](StagedFile::finish) syncs it. Errors of the
/// `Write` methods are bare [`io::Error`]s; [`Staging::write`] adds the path.
#[derive(Debug)]
pub struct StagedFile {
    file: File,
    path: PathBuf,
    fs: Arc<dyn Fs>,
    hasher: blake3::Hasher,
}

impl StagedFile {
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the file to disk and closes it (its digest is kept for the manifest).
    pub fn finish(self) -> Result<()> {
        self.fs.sync_file(&self.file, &self.path).at(&self.path)?;
        if let Some(r) = kiln_formats::digest::recording_for(&self.path) {
            r.insert(&self.path, self.hasher.finalize().to_hex().to_string());
        }
        Ok(())
    }
}

impl Write for StagedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.fs.write(&mut self.file, &self.path, buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A checkpoint folder being written.
///
/// Dropping it without [`commit`](Staging::commit) removes the staging folder (on the
/// main process), as [`abort`](Staging::abort) does.
#[derive(Debug)]
pub struct Staging {
    output_dir: PathBuf,
    step: u64,
    final_dir: PathBuf,
    tmp_dir: PathBuf,
    fs: Arc<dyn Fs>,
    is_main: bool,
    armed: bool,
    /// The digests of the files written into the staging folder by this process.
    digests: kiln_formats::digest::RecordingGuard,
}

impl Staging {
    /// Starts `output_dir/checkpoint-<step>`: the main process creates `output_dir` if
    /// needed, removes a stale staging folder of this step and creates a fresh one;
    /// then every rank meets at a barrier.
    pub fn begin(output_dir: &Path, step: u64, coord: &dyn Coordinator) -> Result<Staging> {
        Self::begin_with(output_dir, step, coord, Arc::new(StdFs))
    }

    /// [`begin`](Staging::begin) with file-system operations going through `fs`.
    pub fn begin_with(
        output_dir: &Path,
        step: u64,
        coord: &dyn Coordinator,
        fs: Arc<dyn Fs>,
    ) -> Result<Staging> {
        let is_main = coord.is_main();
        let mut staging = Staging {
            output_dir: output_dir.to_path_buf(),
            step,
            final_dir: output_dir.join(checkpoint_name(step)),
            tmp_dir: output_dir.join(staging_name(step)),
            digests: kiln_formats::digest::record(&output_dir.join(staging_name(step))),
            fs,
            is_main,
            armed: false,
        };
        let prepared = if is_main {
            staging.armed = true;
            staging.prepare()
        } else {
            Ok(())
        };
        let met = coord.barrier();
        prepared?;
        met?;
        if !is_main && !staging.tmp_dir.is_dir() {
            return Err(Error::Coordination(format!(
                "{}: the main process did not create the staging folder",
                staging.tmp_dir.display()
            )));
        }
        Ok(staging)
    }

    fn prepare(&self) -> Result<()> {
        let fs = &*self.fs;
        fs.create_dir_all(&self.output_dir).at(&self.output_dir)?;
        match fs::symlink_metadata(&self.tmp_dir) {
            Ok(m) if m.is_dir() => fs.remove_dir_all(&self.tmp_dir).at(&self.tmp_dir)?,
            Ok(_) => fs.remove_file(&self.tmp_dir).at(&self.tmp_dir)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&self.tmp_dir, e)),
        }
        fs.create_dir(&self.tmp_dir).at(&self.tmp_dir)
    }

    /// The staging folder, where files go.
    pub fn dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// The name the checkpoint will have once committed.
    pub fn final_dir(&self) -> &Path {
        &self.final_dir
    }

    /// The step being saved.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Creates the file `rel` (a relative path; missing sub-folders are created) in
    /// the staging folder, for writing through the [`Fs`] layer.
    pub fn create(&self, rel: impl AsRef<Path>) -> Result<StagedFile> {
        let path = self.staged_path(rel.as_ref())?;
        if let Some(parent) = path.parent()
            && parent != self.tmp_dir
        {
            self.fs.create_dir_all(parent).at(parent)?;
        }
        let file = self.fs.create_file(&path).at(&path)?;
        Ok(StagedFile {
            file,
            path,
            fs: self.fs.clone(),
            hasher: blake3::Hasher::new(),
        })
    }

    /// Writes `bytes` as the file `rel` in the staging folder and syncs it.
    pub fn write(&self, rel: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
        let mut f = self.create(rel)?;
        let path = f.path.clone();
        f.write_all(bytes).at(&path)?;
        f.finish()
    }

    fn staged_path(&self, rel: &Path) -> Result<PathBuf> {
        let safe = rel.components().count() > 0
            && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !safe {
            return Err(Error::Invalid(format!(
                "{}: a file in a checkpoint must be a relative path without `..`",
                rel.display()
            )));
        }
        if rel == Path::new(MANIFEST_NAME) {
            return Err(Error::Invalid(format!(
                "{}: {MANIFEST_NAME} is reserved for the commit manifest",
                self.tmp_dir.join(rel).display()
            )));
        }
        Ok(self.tmp_dir.join(rel))
    }

    /// Syncs, writes the manifest, renames into place; returns the final folder.
    ///
    /// Every rank calls it after writing its files. On error the staging folder is
    /// removed and any earlier checkpoint of this step is left as it was.
    pub fn commit(mut self, coord: &dyn Coordinator) -> Result<PathBuf> {
        let arrived = coord.barrier();
        if !self.is_main {
            arrived?;
            coord.barrier()?;
            if !self.final_dir.join(MANIFEST_NAME).is_file() {
                return Err(Error::Coordination(format!(
                    "{}: the main process did not commit the checkpoint",
                    self.final_dir.display()
                )));
            }
            return Ok(self.final_dir.clone());
        }
        let result = arrived.and_then(|()| self.commit_main());
        match &result {
            Ok(_) => self.armed = false,
            Err(_) => self.remove_staging(),
        }
        let after = coord.barrier();
        let path = result?;
        after?;
        Ok(path)
    }

    /// Abandons the save: the main process removes the staging folder. Other ranks do
    /// nothing; there is no barrier (every rank decides to abort on its own).
    pub fn abort(mut self) -> Result<()> {
        if !self.armed {
            return Ok(());
        }
        self.armed = false;
        match self.fs.remove_dir_all(&self.tmp_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(&self.tmp_dir, e)),
            _ => Ok(()),
        }
    }

    fn remove_staging(&mut self) {
        if self.armed {
            self.armed = false;
            let _ = self.fs.remove_dir_all(&self.tmp_dir);
        }
    }

    fn commit_main(&self) -> Result<PathBuf> {
        let fs = &*self.fs;
        let mut files = BTreeMap::new();
        let mut dirs = Vec::new();
        walk_staged(&self.tmp_dir, "", &mut files, &mut dirs)?;
        if files.contains_key(MANIFEST_NAME) {
            let p = self.tmp_dir.join(MANIFEST_NAME);
            return Err(Error::Invalid(format!(
                "{}: {MANIFEST_NAME} is reserved for the commit manifest",
                p.display()
            )));
        }
        let mut blake3 = BTreeMap::new();
        for rel in files.keys() {
            let p = self.tmp_dir.join(rel);
            fs.sync_path(&p).at(&p)?;
            // Taken while the file was written; a file this process did not write
            // (another rank's, or a caller's own writer's) is read once here.
            let digest = match self.digests.recording().get(&p) {
                Some(d) => d,
                None => kiln_formats::digest::hash_file(&p).at(&p)?,
            };
            blake3.insert(rel.clone(), digest);
        }
        let manifest = Manifest {
            kiln_version: env!("CARGO_PKG_VERSION").to_string(),
            step: self.step,
            files,
            blake3,
        };
        let mpath = self.tmp_dir.join(MANIFEST_NAME);
        let mut text =
            serde_json::to_string_pretty(&manifest).map_err(|e| Error::json(&mpath, e))?;
        text.push('\n');
        let mut f = StagedFile {
            file: fs.create_file(&mpath).at(&mpath)?,
            path: mpath.clone(),
            fs: self.fs.clone(),
            hasher: blake3::Hasher::new(),
        };
        f.write_all(text.as_bytes()).at(&mpath)?;
        f.finish()?;
        for d in dirs.iter().rev() {
            fs.sync_dir(d).at(d)?;
        }
        fs.sync_dir(&self.tmp_dir).at(&self.tmp_dir)?;
        self.install()
    }

    /// Renames the synced staging folder to its final name, moving an existing
    /// checkpoint of the same step aside first.
    fn install(&self) -> Result<PathBuf> {
        let fs = &*self.fs;
        let parent = &self.output_dir;
        let old = parent.join(old_name(self.step));
        recover_old(fs, &self.final_dir, &old)?;
        let replacing = match fs::symlink_metadata(&self.final_dir) {
            Ok(m) if m.is_dir() => true,
            Ok(_) => {
                return Err(Error::Invalid(format!(
                    "{}: exists and is not a folder; not replacing it",
                    self.final_dir.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(&self.final_dir, e)),
        };
        let put_back = || {
            if replacing {
                let _ = fs.rename(&old, &self.final_dir);
                let _ = fs.sync_dir(parent);
            }
        };
        if replacing {
            rename(fs, &self.final_dir, &old)?;
            if let Err(e) = fs.sync_dir(parent) {
                put_back();
                return Err(Error::io(parent, e));
            }
        }
        if let Err(e) = rename(fs, &self.tmp_dir, &self.final_dir) {
            put_back();
            return Err(e);
        }
        if let Err(e) = fs.sync_dir(parent) {
            // The new folder may not be durable: undo, so that the caller's view (the
            // save failed) matches what is on disk.
            if fs.rename(&self.final_dir, &self.tmp_dir).is_ok() {
                put_back();
            }
            return Err(Error::io(parent, e));
        }
        if replacing {
            // Best effort: a leftover `.old-kiln` next to its final folder is removed
            // by `clean_leftovers`.
            let _ = fs.remove_dir_all(&old);
        }
        Ok(self.final_dir.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.remove_staging();
    }
}

/// A rename whose error names the destination and the source.
fn rename(fs: &dyn Fs, from: &Path, to: &Path) -> Result<()> {
    fs.rename(from, to).map_err(|e| {
        let kind = e.kind();
        Error::io(
            to,
            io::Error::new(kind, format!("renaming {} here: {e}", from.display())),
        )
    })
}

/// Resolves the leftover `.old-kiln` of an interrupted re-save: if the final folder
/// exists the leftover is stale and removed, otherwise it is the only copy and is
/// renamed back. Returns what it did (`None`: no leftover).
pub(crate) fn recover_old(fs: &dyn Fs, final_dir: &Path, old: &Path) -> Result<Option<bool>> {
    match fs::symlink_metadata(old) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(old, e)),
    }
    match fs::symlink_metadata(final_dir) {
        Ok(_) => {
            fs.remove_dir_all(old).at(old)?;
            Ok(Some(false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            rename(fs, old, final_dir)?;
            if let Some(parent) = final_dir.parent() {
                fs.sync_dir(parent).at(parent)?;
            }
            Ok(Some(true))
        }
        Err(e) => Err(Error::io(final_dir, e)),
    }
}

/// Lists the plain files under `dir` (relative, `/`-separated, with sizes) and its
/// sub-folders. Symbolic links and other special files are refused: a checkpoint must
/// be a self-contained tree whose content the fsyncs actually cover.
fn walk_staged(
    dir: &Path,
    prefix: &str,
    files: &mut BTreeMap<String, u64>,
    dirs: &mut Vec<PathBuf>,
) -> Result<()> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).at(dir)? {
        entries.push(entry.at(dir)?);
    }
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(Error::Invalid(format!(
                "{}: file names in a checkpoint must be UTF-8",
                path.display()
            )));
        };
        let rel = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        let meta = fs::symlink_metadata(&path).at(&path)?;
        if meta.is_dir() {
            dirs.push(path.clone());
            walk_staged(&path, &rel, files, dirs)?;
        } else if meta.is_file() {
            files.insert(rel, meta.len());
        } else {
            return Err(Error::Invalid(format!(
                "{}: not a plain file or folder (a checkpoint holds no symbolic links)",
                path.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_counts_matching_ops_only() {
        let fs = FaultyFs::new().with_fault(Fault::on(Op::Write).nth(2).path_contains("b"));
        let p = |s: &str| PathBuf::from(s);
        assert!(fs.check(Op::Write, &p("a")).is_ok());
        assert!(fs.check(Op::Write, &p("b")).is_ok());
        assert!(fs.check(Op::Rename, &p("b")).is_ok());
        assert!(fs.check(Op::Write, &p("b")).is_err());
        assert!(fs.check(Op::Write, &p("b")).is_ok(), "a fault fires once");
        assert_eq!(fs.log().len(), 5);
        assert_eq!(fs.injected(), vec![(Op::Write, p("b"))]);
    }

    #[test]
    fn staged_paths_must_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let s = Staging::begin(dir.path(), 1, &SingleProcess).unwrap();
        assert!(s.write("../x", b"").is_err());
        assert!(s.write("/etc/x", b"").is_err());
        assert!(s.write(MANIFEST_NAME, b"").is_err());
        s.write("sub/dir/x.json", b"{}").unwrap();
        let out = s.commit(&SingleProcess).unwrap();
        let m = Manifest::read(&out).unwrap();
        assert_eq!(m.files.get("sub/dir/x.json"), Some(&2));
        assert_eq!(m.step, 1);
    }

    #[test]
    fn drop_without_commit_removes_staging() {
        let dir = tempfile::tempdir().unwrap();
        let s = Staging::begin(dir.path(), 3, &SingleProcess).unwrap();
        s.write("a", b"1").unwrap();
        let tmp = s.dir().to_path_buf();
        assert!(tmp.is_dir());
        drop(s);
        assert!(!tmp.exists());
        assert!(!dir.path().join("checkpoint-3").exists());
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Staging::begin(dir.path(), 4, &SingleProcess).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", s.dir().join("link")).unwrap();
        let err = s.commit(&SingleProcess).unwrap_err().to_string();
        assert!(err.contains("symbolic"), "{err}");
        assert!(!dir.path().join("checkpoint-4").exists());
        assert!(!dir.path().join(".checkpoint-4.tmp-kiln").exists());
    }
}
