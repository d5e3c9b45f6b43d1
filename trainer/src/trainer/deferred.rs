//! A background save's copy of the weights and optimizer state to host memory, run by
//! the save's job instead of the training loop: the loop goes on with the next forward
//! and backward passes and waits only before the optimizer step, which updates the
//! parameters and moments in place ([`Trainer::finish_snapshot_copy`]).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use candle_core::Var;
use kiln_backend::{Backend, HostBuffer};
use kiln_checkpoint::optimizer::OptimizerState;
use kiln_formats::TensorCollection;
use kiln_optim::PendingState;

use super::Trainer;
use crate::model::Model;
use crate::weights::HostWeights;

/// What the copy reads, moved to the save's thread.
pub(super) struct DeferredCopy {
    backend: &'static dyn Backend,
    params: Vec<(String, Var)>,
    reuse: Option<HostBuffer>,
    optimizer: Option<PendingState>,
    done: SyncSender<Option<Arc<HostWeights>>>,
}

/// The trainer's end: the copy's weights once it is done (kept for the next save's
/// buffer), or nothing when it failed (the save reports that).
pub(super) type CopyDone = Receiver<Option<Arc<HostWeights>>>;

impl DeferredCopy {
    /// Copies the weights and the optimizer state, then lets the trainer step (also when
    /// the copy failed: the save's error comes through the saver).
    pub(super) fn run(
        self,
    ) -> kiln_checkpoint::Result<(Arc<dyn TensorCollection>, Option<OptimizerState>)> {
        let weights = HostWeights::take(self.backend, &self.params, self.reuse).map(Arc::new);
        let optimizer = self.optimizer.map(PendingState::take).transpose();
        let _ = self.done.send(weights.as_ref().ok().cloned());
        let failed = |e: String| kiln_checkpoint::Error::Invalid(format!("snapshot copy: {e}"));
        let weights = weights.map_err(|e| failed(e.to_string()))?;
        let optimizer = optimizer.map_err(|e| failed(e.to_string()))?;
        Ok((weights, optimizer))
    }
}

impl<M: Model> Trainer<M> {
    /// A copy to run in the save's job, when the parameters live on the CPU (a device's
    /// copy stays on the thread that owns its context) and a backend copies them.
    /// `optimizer` is taken along when the copy is deferred, left otherwise.
    pub(super) fn defer_copy(
        &mut self,
        optimizer: &mut Option<PendingState>,
    ) -> Option<DeferredCopy> {
        let params = self.parameters();
        if !params.iter().all(|(_, v)| v.device().is_cpu()) {
            return None;
        }
        let backend = self.backend()?;
        let (done, wait) = sync_channel(1);
        self.pending_copy = Some(wait);
        Some(DeferredCopy {
            backend,
            params,
            reuse: self.reusable_buffer(),
            optimizer: optimizer.take(),
            done,
        })
    }

    /// Waits until the background copy of the last save is done: before anything that
    /// changes the parameters or the optimizer state.
    pub(super) fn finish_snapshot_copy(&mut self) {
        if let Some(wait) = self.pending_copy.take()
            && let Ok(Some(weights)) = wait.recv()
        {
            self.keep_host_weights(weights);
        }
    }

    /// The buffer of an earlier snapshot whose write finished (only this trainer holds
    /// it), to copy the next one into.
    pub(super) fn reusable_buffer(&mut self) -> Option<HostBuffer> {
        self.host_weights
            .iter()
            .position(|w| Arc::strong_count(w) == 1)
            .map(|i| self.host_weights.swap_remove(i))
            .and_then(|w| Arc::try_unwrap(w).ok())
            .map(HostWeights::into_buffer)
    }

    /// Keeps `weights` for reuse once its write is done; one save is written at a time,
    /// so two buffers suffice (the one being written and the next).
    pub(super) fn keep_host_weights(&mut self, weights: Arc<HostWeights>) {
        self.host_weights.push(weights);
        while self.host_weights.len() > 2 {
            self.host_weights.remove(0);
        }
    }
}
