//! What the trainer needs from data: a [`BatchSource`] to draw batches from, and the
//! seeded per-epoch order it draws them in.

use candle_core::Device;

use crate::Result;
use crate::model::Batch;

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

/// The order of `len` examples in `epoch`: `torch.randperm(len)` from a torch CPU
/// generator seeded with `seed + epoch`, which is the order transformers' Trainer draws
/// (accelerate's `SeedableRandomSampler` reseeds its generator with `data_seed` (else
/// `seed`) plus the epoch before each epoch). A pure function of (`seed`, `epoch`): a run
/// resumed in epoch `e` sees the order the interrupted run saw, and a single-process kiln
/// run takes its batches in transformers' order. It is the order the
/// [`Trainer`](crate::trainer::Trainer) uses, with `seed` = `data_seed` (else `seed`).
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    torch_randperm(len, seed.wrapping_add(epoch))
}

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on the CPU: the
/// swap of position i with i + `random() % (n - i)` that torch keeps for n below
/// 2³² / 20, drawing 32-bit outputs of the generator's MT19937.
pub fn torch_randperm(n: usize, seed: u64) -> Vec<usize> {
    let mut out: Vec<usize> = (0..n).collect();
    let mut mt = Mt19937::new(seed);
    for i in 0..n.saturating_sub(1) {
        let z = mt.next_u32() as usize % (n - i);
        out.swap(i, i + z);
    }
    out
}

/// MT19937 as torch's CPU generator runs it: `manual_seed(s)` initialises the state from
/// the low 32 bits of `s` (Matsumoto and Nishimura's `init_genrand`).
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for k in 0..624 {
                let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % 624] & 0x7fff_ffff);
                let mut next = self.state[(k + 397) % 624] ^ (y >> 1);
                if y & 1 == 1 {
                    next ^= 0x9908_b0df;
                }
                self.state[k] = next;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()`.
    #[test]
    fn randperm_is_torch_s() {
        assert_eq!(torch_randperm(10, 42), [2, 6, 1, 8, 4, 5, 0, 9, 3, 7]);
        assert_eq!(torch_randperm(7, 43), [3, 1, 2, 4, 5, 0, 6]);
        assert_eq!(epoch_order(7, 42, 1), torch_randperm(7, 43));
        assert!(torch_randperm(0, 1).is_empty());
        assert_eq!(torch_randperm(1, 1), [0]);
    }
}
