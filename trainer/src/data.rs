//! What the trainer needs from data: a [`BatchSource`] to draw batches from, and the
//! seeded per-epoch order it draws them in.

use candle_core::Device;

use crate::Result;
use crate::model::Batch;
use crate::rng::Rng;

/// A dataset as the trainer sees it: a number of examples, and a collated batch for any
/// list of example indices (tokenized, padded, on `device`).
pub trait BatchSource: Send + Sync {
    /// Number of examples.
    fn len(&self) -> usize;
    /// Whether there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The batch of these examples, in this order.
    fn batch(&self, indices: &[usize], device: &Device) -> Result<Batch>;
}

/// The order of `len` examples in `epoch`: `0..len` shuffled by
/// `Rng::with_stream(seed, epoch)` (Fisher–Yates). A pure function of
/// (`seed`, `epoch`): a run resumed in epoch `e` sees the order the interrupted run saw,
/// and every epoch has its own order. It is the order the
/// [`Trainer`](crate::trainer::Trainer) uses, with `seed` = `data_seed` (else `seed`).
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    Rng::with_stream(seed, epoch).shuffle(&mut order);
    order
}
