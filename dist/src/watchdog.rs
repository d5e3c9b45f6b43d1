//! A watchdog for blocking collective calls, as torch's NCCL watchdog: an operation that
//! has not finished within `ddp_timeout` means another rank died or hangs, and waiting
//! longer helps nobody, so the watchdog thread ends the run with a clear line instead
//! of leaving every rank blocked forever.
//!
//! Blocking MPI calls cannot be cancelled or given a deadline, and their non-blocking
//! forms progress only while polled (OpenMPI's libnbc), which would cost every gradient
//! all-reduce its latency. So the training thread makes the blocking call as before,
//! inside [`Watchdog::enter`]; a thread of the watchdog sleeps until the deadline of the
//! operation in flight and, if that operation is still the one in flight then, calls
//! the action it was given (MPI: print the reason, `MPI_Abort`).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct State {
    /// The operation in flight: its number, when it started and what it is.
    current: Option<(u64, Instant, &'static str)>,
    next: u64,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Watches one thread's blocking operations (see the module docs).
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog").finish_non_exhaustive()
    }
}

/// An operation in flight; dropping it tells the watchdog that the operation finished.
#[must_use = "the operation is watched only while the guard lives"]
pub struct Watched<'a> {
    shared: &'a Shared,
    id: u64,
}

impl std::fmt::Debug for Watched<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").field("id", &self.id).finish()
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if state.current.is_some_and(|(id, _, _)| id == self.id) {
            state.current = None;
        }
    }
}

impl Watchdog {
    /// Starts the watchdog thread. `on_timeout(what, waited)` runs on that thread when an
    /// operation has been in flight for `timeout`; it is meant to end the process (it
    /// runs once: the watchdog stops after it).
    pub fn start(
        timeout: Duration,
        on_timeout: impl FnOnce(&'static str, Duration) + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                current: None,
                next: 0,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let watched = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-watchdog".into())
            .spawn(move || {
                let mut state = watched.lock();
                loop {
                    if state.stop {
                        return;
                    }
                    match state.current {
                        None => {
                            state = watched.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                        }
                        Some((_, started, what)) => {
                            let waited = started.elapsed();
                            if waited >= timeout {
                                drop(state);
                                on_timeout(what, waited);
                                return;
                            }
                            state = watched
                                .wake
                                .wait_timeout(state, timeout - waited)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                    }
                }
            })?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Marks the start of a blocking operation (`what`, e.g. "a gradient all-reduce");
    /// it is watched until the returned guard is dropped.
    pub fn enter(&self, what: &'static str) -> Watched<'_> {
        let mut state = self.shared.lock();
        let id = state.next;
        state.next += 1;
        state.current = Some((id, Instant::now(), what));
        drop(state);
        self.shared.wake.notify_one();
        Watched {
            shared: &self.shared,
            id,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn quick_operations_never_fire() {
        let (tx, rx) = mpsc::channel();
        let dog = Watchdog::start(Duration::from_millis(200), move |what, _| {
            let _ = tx.send(what);
        })
        .unwrap();
        for _ in 0..50 {
            let _op = dog.enter("a quick one");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Idle time between operations does not count either.
        std::thread::sleep(Duration::from_millis(400));
        {
            let _op = dog.enter("another quick one");
        }
        drop(dog);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_stuck_operation_fires_once_after_the_timeout() {
        let (tx, rx) = mpsc::channel();
        let dog = Watchdog::start(Duration::from_millis(150), move |what, waited| {
            let _ = tx.send((what, waited));
        })
        .unwrap();
        {
            let _ok = dog.enter("a quick one");
        }
        let start = Instant::now();
        let _stuck = dog.enter("a gradient all-reduce");
        let (what, waited) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(what, "a gradient all-reduce");
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(start.elapsed() >= Duration::from_millis(150));
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    }
}
