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
    /// Every example's length (its `input_ids`), for `train_sampling_strategy =
    /// "group_by_length"`; `None` (the default) when the source cannot say.
    fn lengths(&self) -> Option<Vec<usize>> {
        None
    }
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

/// transformers' `get_length_grouped_indices` applied to the random permutation
/// `order` (where transformers draws `torch.randperm`): mega-batches of
/// `min(n / (4 · batch_size), 50)` (at least 1) batches, each sorted by descending
/// length (stable, as Python's `sorted`), then the longest mega-batch's first example
/// swapped to the front, so that a run that runs out of memory does so at once.
pub fn length_grouped(order: &[usize], lengths: &[usize], batch_size: usize) -> Vec<usize> {
    let n = order.len();
    let mult = (n / (batch_size.max(1) * 4)).clamp(1, 50);
    let mega = mult * batch_size.max(1);
    let mut megabatches: Vec<Vec<usize>> = order
        .chunks(mega)
        .map(|c| {
            let mut m = c.to_vec();
            m.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
            m
        })
        .collect();
    // torch.argmax: the first of the largest.
    let mut longest = 0;
    for (i, m) in megabatches.iter().enumerate() {
        if lengths[m[0]] > lengths[megabatches[longest][0]] {
            longest = i;
        }
    }
    if longest != 0 {
        let (first, rest) = megabatches.split_at_mut(longest);
        std::mem::swap(&mut first[0][0], &mut rest[0][0]);
    }
    megabatches.concat()
}
