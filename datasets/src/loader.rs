//! A loader that can start at any batch, shuffling every epoch with the trainer's
//! seeded [`epoch_order`].

use candle_core::Device;

use crate::{Error, Result};
use kiln_trainer::Batch;
use kiln_trainer::BatchSource;
use kiln_trainer::epoch_order;

/// Batches of a [`BatchSource`]: shuffled per epoch or in order, the last short batch
/// kept or dropped, from the first batch or any later one.
#[derive(Debug)]
pub struct DataLoader<'a, S: BatchSource + ?Sized> {
    source: &'a S,
    batch_size: usize,
    drop_last: bool,
    shuffle_seed: Option<u64>,
}

impl<S: BatchSource + ?Sized> Clone for DataLoader<'_, S> {
    fn clone(&self) -> Self {
        DataLoader { ..*self }
    }
}

impl<'a, S: BatchSource + ?Sized> DataLoader<'a, S> {
    /// Batches of `batch_size` examples of `source`, in order, the last one possibly
    /// short.
    pub fn new(source: &'a S, batch_size: usize) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        Ok(DataLoader {
            source,
            batch_size,
            drop_last: false,
            shuffle_seed: None,
        })
    }

    /// Drops the last batch when it is short (`dataloader_drop_last`).
    pub fn with_drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Shuffles every epoch with [`epoch_order`] under `seed`.
    pub fn with_shuffle(mut self, seed: u64) -> Self {
        self.shuffle_seed = Some(seed);
        self
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let n = self.source.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// The example indices of every batch of `epoch`.
    pub fn batch_indices(&self, epoch: u64) -> Vec<Vec<usize>> {
        let n = self.source.len();
        let order = match self.shuffle_seed {
            Some(seed) => epoch_order(n, seed, epoch),
            None => (0..n).collect(),
        };
        order
            .chunks(self.batch_size)
            .take(self.num_batches())
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// The batches of `epoch`.
    pub fn epoch(&self, epoch: u64, device: &Device) -> Batches<'a, S> {
        self.epoch_from(epoch, 0, device)
    }

    /// The batches of `epoch` from batch `start` on (0-based), for an exact resume: the
    /// earlier batches are skipped by index, nothing is tokenized or collated for them.
    /// A `start` at or past the end gives no batch.
    pub fn epoch_from(&self, epoch: u64, start: usize, device: &Device) -> Batches<'a, S> {
        let mut indices = self.batch_indices(epoch);
        indices.drain(..start.min(indices.len()));
        Batches {
            source: self.source,
            indices: indices.into_iter(),
            device: device.clone(),
        }
    }
}

/// The batches of one epoch, collated on a device.
#[derive(Debug)]
pub struct Batches<'a, S: BatchSource + ?Sized> {
    source: &'a S,
    indices: std::vec::IntoIter<Vec<usize>>,
    device: Device,
}

impl<S: BatchSource + ?Sized> Iterator for Batches<'_, S> {
    type Item = kiln_trainer::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let indices = self.indices.next()?;
        Some(self.source.batch(&indices, &self.device))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.indices.size_hint()
    }
}

impl<S: BatchSource + ?Sized> ExactSizeIterator for Batches<'_, S> {}
