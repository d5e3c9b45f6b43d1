//! Stopping a run early on a signal, with a checkpoint (preemption: SLURM, Kubernetes
//! and spot instances send SIGTERM and wait a grace period before SIGKILL).
//!
//! A [`StopRequest`] is a flag the trainer reads after every optimizer step; a signal
//! handler (the `kiln` command installs one for SIGTERM and SIGINT) sets it to the
//! signal's number. The trainer then writes `checkpoint-<step>` (waiting for any save in
//! flight) and returns [`Error::Stopped`](crate::Error::Stopped). In a data-parallel
//! run the ranks agree after each step (one small all-reduce), so a signal that
//! reaches any rank stops every rank at the same step.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A request to stop at the next optimizer step: 0 (none) or a signal number.
#[derive(Debug, Clone, Default)]
pub struct StopRequest(Arc<AtomicUsize>);

impl StopRequest {
    /// No stop requested yet.
    pub fn new() -> Self {
        StopRequest::default()
    }

    /// The flag itself, for a signal handler to store the signal number in (e.g.
    /// `signal_hook::flag::register_usize(SIGTERM, request.flag(), 15)`).
    pub fn flag(&self) -> Arc<AtomicUsize> {
        self.0.clone()
    }

    /// Asks the run to stop, as signal `signal` would.
    pub fn request(&self, signal: i32) {
        self.0.store(signal.max(1) as usize, Ordering::SeqCst);
    }

    /// The signal that asked for a stop, if any.
    pub fn requested(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            s => Some(i32::try_from(s).unwrap_or(i32::MAX)),
        }
    }
}

/// The name of a signal kiln stops on (`SIGTERM`, `SIGINT`), or `signal N`.
pub fn signal_name(signal: i32) -> String {
    match signal {
        15 => "SIGTERM".into(),
        2 => "SIGINT".into(),
        1 => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}
