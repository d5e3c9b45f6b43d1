//! Ownership of an output folder: one run at a time writes checkpoints and the model
//! into it.
//!
//! [`OutputDirLock::acquire`] takes an exclusive advisory lock (`flock`, through
//! [`File::try_lock`]) on [`LOCK_NAME`] inside the folder and writes the holder's pid,
//! host and start time into it. The kernel releases the lock when the process ends,
//! however it ends (a SIGKILLed run leaves no stale lock: the file stays, unlocked, and
//! the next run takes it at once). A second run finds the lock held and is refused with
//! the holder's pid and host. The `kiln` command holds it for a whole run; code that
//! drives `kiln_trainer::Trainer` itself holds an `OutputDirLock` the same way (the
//! trainer does not take one: a second lock on the same file from one process would
//! conflict with the caller's).
//!
//! What it protects: runs on one machine, and runs on several machines sharing a file
//! system whose `flock` is coherent across clients (NFSv4 with Linux clients, where
//! the kernel maps it to a byte-range lock held on the server; Lustre and GPFS mounted
//! with their lock options). What it does not: file systems where `flock` is only local
//! to each client (NFSv3 mounted with `nolock` or `local_lock=flock`, most FUSE and
//! object-store mounts such as s3fs or gcsfuse), where two machines may both "hold" it.
//! The file is never deleted: unlinking a lock file while another process waits on it
//! would let two runs hold locks on different files of the same name.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::IoContext;
use crate::{Error, Result};

/// The lock file inside an output folder.
pub const LOCK_NAME: &str = ".kiln-run.lock";

/// Who holds an output folder (the lock file's content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The holder's process id.
    pub pid: u32,
    /// The holder's host name.
    pub host: String,
    /// When it took the lock (Unix seconds).
    pub since: u64,
}

/// An exclusive hold on an output folder, released when dropped (or when the process
/// ends).
#[derive(Debug)]
pub struct OutputDirLock {
    file: File,
    path: PathBuf,
}

impl OutputDirLock {
    /// Creates `output_dir` if needed and takes its lock; a folder another live process
    /// holds is [`Error::InUse`], naming it.
    pub fn acquire(output_dir: &Path) -> Result<OutputDirLock> {
        let shown = output_dir.display();
        if output_dir.exists() && !output_dir.is_dir() {
            return Err(Error::Invalid(format!(
                "output_dir {shown} is a file; give a folder"
            )));
        }
        std::fs::create_dir_all(output_dir)
            .map_err(|e| Error::Invalid(format!("output_dir {shown} cannot be created: {e}")))?;
        let path = output_dir.join(LOCK_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::Invalid(format!("output_dir {shown} is not writable: {e}")))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| serde_json::from_str::<Holder>(&text).ok());
                return Err(Error::InUse {
                    dir: output_dir.to_path_buf(),
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let holder = Holder {
            pid: std::process::id(),
            host: host_name(),
            since: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let text = serde_json::to_string(&holder).map_err(|e| Error::json(&path, e))?;
        file.set_len(0).at(&path)?;
        file.seek(SeekFrom::Start(0)).at(&path)?;
        file.write_all(format!("{text}\n").as_bytes()).at(&path)?;
        Ok(OutputDirLock { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputDirLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes it immediate
        // even if a clone of the descriptor lives on in a child process.
        let _ = self.file.unlock();
    }
}

/// This machine's name: `/proc/sys/kernel/hostname`, else `$HOSTNAME`, else `unknown`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_folder_is_refused_with_its_holder_and_free_again_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let first = OutputDirLock::acquire(&out).unwrap();
        let text = std::fs::read_to_string(first.path()).unwrap();
        let holder: Holder = serde_json::from_str(&text).unwrap();
        assert_eq!(holder.pid, std::process::id());
        let e = OutputDirLock::acquire(&out).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains(&holder.host), "{e}");
        assert!(!e.contains('\n'));
        drop(first);
        let again = OutputDirLock::acquire(&out).unwrap();
        drop(again);
        assert!(out.join(LOCK_NAME).exists(), "the file stays");
    }
}
