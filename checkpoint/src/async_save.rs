//! Saving in the background, with a bounded number of saves in flight.
//!
//! The caller copies what it saves into host memory (the *snapshot*: tensors off the
//! device, optimizer state, RNG state, …); that copy is the only part that must stop
//! training. The rest (serialising, writing, fsync, commit, rotation) runs on a
//! background thread as a [`SaveJob`].
//!
//! ```no_run
//! use kiln_checkpoint::async_save::{AsyncSaver, SaveJob};
//! use kiln_checkpoint::commit::{SingleProcess, Staging};
//! # fn main() -> kiln_checkpoint::Result<()> {
//! let mut saver = AsyncSaver::new(1);
//! for step in 1..=3u64 {
//!     // ... train ...
//!     let job = SaveJob::snapshot(
//!         format!("out/checkpoint-{step}"),
//!         || Ok(vec![step as u8; 1024]), // copy to host memory: the stall
//!         move |bytes| {
//!             let s = Staging::begin("out".as_ref(), step, &SingleProcess)?;
//!             s.write("weights.bin", &bytes)?;
//!             s.commit(&SingleProcess)
//!         },
//!     )?;
//!     saver.submit(job)?; // returns an earlier save's error, if any
//! }
//! for report in saver.finish()? {
//!     println!("{}: {} bytes, stalled {:?}", report.path.display(), report.bytes, report.stall());
//! }
//! # Ok(()) }
//! ```
//!
//! # Decisions
//!
//! - **Backpressure.** At most `max_in_flight` saves run at once (at least 1); `submit`
//!   blocks while that many are running. The time it blocked is returned and recorded in
//!   the save's [`SaveReport::wait`]; [`SaveReport::stall`] is snapshot + wait, what the
//!   training loop lost.
//! - **Errors are never lost.** A failed (or panicked) background save is kept and
//!   returned, wrapped in [`Error::Background`] with the checkpoint's path, by the next
//!   [`submit`](AsyncSaver::submit), [`wait`](AsyncSaver::wait) or
//!   [`finish`](AsyncSaver::finish). When several failed, one error carries them all
//!   (the first as the source, the others in its message). A `submit` that returns an
//!   earlier error does **not** start its own job: the caller decides whether to go on.
//! - **Reports** of successful saves are returned by `wait`/`finish`, or drained as they
//!   complete with [`reports`](AsyncSaver::reports). `bytes` is the size on disk of the
//!   path the job returned (the checkpoint folder).
//! - **Drop waits** for the saves in flight, so returning from `main` normally never
//!   cuts a save short. Drop cannot return an error: it prints unreported failures to
//!   stderr. Call `finish` to handle them.
//! - One thread per save (at most `max_in_flight` alive): a save lasts seconds, thread
//!   creation microseconds, and there is no idle pool to shut down.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Error, Result};

type WriteFn = Box<dyn FnOnce() -> Result<PathBuf> + Send + 'static>;

/// One save: a snapshot already in host memory, and the work that writes and commits
/// it (moved to a background thread).
pub struct SaveJob {
    path: PathBuf,
    snapshot: Duration,
    write: WriteFn,
}

impl std::fmt::Debug for SaveJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveJob")
            .field("path", &self.path)
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}

impl SaveJob {
    /// A job that writes the checkpoint `path` (used in error messages until the job
    /// returns the path it actually wrote) by calling `write`, which owns the snapshot.
    pub fn new(
        path: impl Into<PathBuf>,
        write: impl FnOnce() -> Result<PathBuf> + Send + 'static,
    ) -> Self {
        SaveJob {
            path: path.into(),
            snapshot: Duration::ZERO,
            write: Box::new(write),
        }
    }

    /// Records how long taking the snapshot took (it is part of the stall).
    pub fn with_snapshot_time(mut self, snapshot: Duration) -> Self {
        self.snapshot = snapshot;
        self
    }

    /// Takes the snapshot now with `take` (timed: the stall), and makes a job that
    /// hands it to `write` on the background thread.
    pub fn snapshot<S: Send + 'static>(
        path: impl Into<PathBuf>,
        take: impl FnOnce() -> Result<S>,
        write: impl FnOnce(S) -> Result<PathBuf> + Send + 'static,
    ) -> Result<Self> {
        let start = Instant::now();
        let snap = take()?;
        let snapshot = start.elapsed();
        Ok(SaveJob::new(path, move || write(snap)).with_snapshot_time(snapshot))
    }

    /// The checkpoint path it was created with.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// What one completed background save cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveReport {
    /// The path the job returned (the committed checkpoint).
    pub path: PathBuf,
    /// Bytes on disk under that path.
    pub bytes: u64,
    /// Taking the snapshot (in the training loop).
    pub snapshot: Duration,
    /// Blocked in `submit` waiting for a free slot (in the training loop).
    pub wait: Duration,
    /// Writing and committing (in the background).
    pub write: Duration,
}

impl SaveReport {
    /// Time the training loop lost to this save: snapshot plus backpressure wait.
    pub fn stall(&self) -> Duration {
        self.snapshot + self.wait
    }

    /// Write throughput in bytes per second (0 for an instant write).
    pub fn write_bytes_per_sec(&self) -> f64 {
        let s = self.write.as_secs_f64();
        if s > 0.0 { self.bytes as f64 / s } else { 0.0 }
    }
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    reports: VecDeque<SaveReport>,
    errors: Vec<(PathBuf, Error)>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_until(&self, mut done: impl FnMut(&State) -> bool) -> MutexGuard<'_, State> {
        let mut st = self.lock();
        while !done(&st) {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st
    }
}

/// Runs [`SaveJob`]s on background threads, at most `max_in_flight` at a time.
#[derive(Debug)]
pub struct AsyncSaver {
    max_in_flight: usize,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Default for AsyncSaver {
    /// One save in flight.
    fn default() -> Self {
        Self::new(1)
    }
}

impl AsyncSaver {
    /// A saver running at most `max_in_flight` saves at once (0 is taken as 1). With 1,
    /// a save must finish before the next one starts; memory holds at most
    /// `max_in_flight` snapshots plus the one being submitted.
    pub fn new(max_in_flight: usize) -> Self {
        AsyncSaver {
            max_in_flight: max_in_flight.max(1),
            shared: Arc::default(),
            threads: Vec::new(),
        }
    }

    /// The bound on saves in flight.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Saves running now.
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }

    /// Starts `job` in the background, first blocking while `max_in_flight` saves are
    /// running; returns how long it blocked.
    ///
    /// If an earlier background save failed, returns that error and does not start
    /// `job`.
    pub fn submit(&mut self, job: SaveJob) -> Result<Duration> {
        let start = Instant::now();
        let max = self.max_in_flight;
        let mut blocked = false;
        let mut st = self.shared.wait_until(|s| {
            let ready = !s.errors.is_empty() || s.in_flight < max;
            blocked |= !ready;
            ready
        });
        take_error(&mut st)?;
        // Only real backpressure counts, not taking an uncontended lock.
        let wait = if blocked {
            start.elapsed()
        } else {
            Duration::ZERO
        };
        st.in_flight += 1;
        drop(st);
        self.threads.retain(|t| !t.is_finished());
        let shared = self.shared.clone();
        let SaveJob {
            path,
            snapshot,
            write,
        } = job;
        let thread_path = path.clone();
        let spawned = std::thread::Builder::new()
            .name("kiln-save".into())
            .spawn(move || run_job(&shared, thread_path, snapshot, wait, write));
        match spawned {
            Ok(handle) => {
                self.threads.push(handle);
                Ok(wait)
            }
            Err(e) => {
                self.shared.lock().in_flight -= 1;
                Err(Error::Background {
                    path,
                    source: Box::new(Error::Invalid(format!("cannot start a save thread: {e}"))),
                })
            }
        }
    }

    /// Blocks until every save in flight is done; returns the reports not yet drained,
    /// or the error of any failed save.
    pub fn wait(&mut self) -> Result<Vec<SaveReport>> {
        let mut st = self.shared.wait_until(|s| s.in_flight == 0);
        let result = take_error(&mut st).map(|()| st.reports.drain(..).collect());
        drop(st);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        result
    }

    /// Reports of the saves completed so far (not blocking), oldest first.
    pub fn reports(&mut self) -> Vec<SaveReport> {
        self.shared.lock().reports.drain(..).collect()
    }

    /// Waits for every save and ends: the reports not yet drained, or the error of any
    /// failed save.
    pub fn finish(mut self) -> Result<Vec<SaveReport>> {
        self.wait()
    }
}

impl Drop for AsyncSaver {
    fn drop(&mut self) {
        let mut st = self.shared.wait_until(|s| s.in_flight == 0);
        if let Err(e) = take_error(&mut st) {
            eprintln!("kiln: {e}");
        }
        drop(st);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Turns the pending errors into one error (none: `Ok`).
fn take_error(st: &mut State) -> Result<()> {
    let mut errors = std::mem::take(&mut st.errors).into_iter();
    let Some((path, first)) = errors.next() else {
        return Ok(());
    };
    let rest: Vec<String> = errors
        .map(|(p, e)| format!("{}: {e}", p.display()))
        .collect();
    let source = if rest.is_empty() {
        first
    } else {
        Error::Invalid(format!(
            "{first}; {} more background saves failed: {}",
            rest.len(),
            rest.join("; ")
        ))
    };
    Err(Error::Background {
        path,
        source: Box::new(source),
    })
}

fn run_job(shared: &Shared, path: PathBuf, snapshot: Duration, wait: Duration, write: WriteFn) {
    let start = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(write));
    let write_time = start.elapsed();
    let result = match outcome {
        Ok(Ok(written)) => Ok(SaveReport {
            bytes: crate::scan::dir_bytes(&written).unwrap_or(0),
            path: written,
            snapshot,
            wait,
            write: write_time,
        }),
        Ok(Err(e)) => Err(e),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Invalid(format!("the save panicked: {msg}")))
        }
    };
    let mut st = shared.lock();
    match result {
        Ok(report) => st.reports.push_back(report),
        Err(e) => st.errors.push((path, e)),
    }
    st.in_flight -= 1;
    drop(st);
    shared.changed.notify_all();
}
