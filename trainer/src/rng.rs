//! kiln's random generator: ChaCha20, seeded, with a state that is saved in every
//! checkpoint so that a resumed run draws exactly the numbers the interrupted one would
//! have drawn (dropout masks above all).
//!
//! candle's CPU generator cannot be seeded (`set_seed` errors and `Tensor::rand` draws
//! from a thread-local generator), so kiln never uses it: initialisation, dropout and
//! shuffling all draw from an [`Rng`]. A dropout mask is drawn by a ChaCha8 generator
//! keyed from the [`Rng`]'s stream ([`Rng::dropout_values`]), so that the state to
//! checkpoint stays the one ChaCha20 position.

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng as _, SeedableRng};
use serde::{Deserialize, Serialize};

/// A seeded, checkpointable random generator.
#[derive(Clone, Debug)]
pub struct Rng {
    inner: ChaCha20Rng,
}

/// The complete state of an [`Rng`]: restoring it continues the same sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte key, hex-encoded.
    pub seed: String,
    /// The stream number.
    pub stream: u64,
    /// Position in the stream, in 32-bit words (decimal string: it can exceed 2^64).
    pub word_pos: String,
}

impl Rng {
    /// A generator for `seed` (same seed, same numbers, on every platform).
    pub fn seed_from_u64(seed: u64) -> Self {
        Rng {
            inner: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// A generator for `seed` on an independent `stream` (e.g. the epoch, for shuffling).
    pub fn with_stream(seed: u64, stream: u64) -> Self {
        let mut inner = ChaCha20Rng::seed_from_u64(seed);
        inner.set_stream(stream);
        Rng { inner }
    }

    /// A uniformly random u64.
    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// A uniformly random f64 in [0, 1) (53 random bits).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniformly random integer in [0, n) (unbiased); 0 when n is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// A standard normal f64 (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Shuffles `items` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// An f32 tensor of `shape` with normal(mean, std) entries.
    pub fn normal_tensor(
        &mut self,
        shape: &[usize],
        mean: f64,
        std: f64,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| (mean + std * self.normal()) as f32)
            .collect();
        Tensor::from_vec(data, shape, device)
    }

    /// An f32 dropout mask of `shape`: each entry 0 with probability `p`, else
    /// `1 / (1 - p)` (inverted dropout, as torch does).
    pub fn dropout_mask(
        &mut self,
        shape: &[usize],
        p: f64,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        Tensor::from_vec(self.dropout_values(n, p), shape, device)
    }

    /// The values of [`Rng::dropout_mask`], in row-major order.
    ///
    /// A mask takes 256 bits of this generator's stream as the key of a ChaCha8
    /// generator, which draws one 32-bit word per element: entry `i` is 0 when word `i`
    /// is below `⌈p·2^32⌉`. Dropout needs millions of draws per step and no secrecy;
    /// ChaCha20 with 64 bits per element spent a sixth of a training step on them
    /// (`benches/README.md`, "Training speed"). Deterministic, and resumable: the state of
    /// this generator after the mask is all a checkpoint needs.
    pub fn dropout_values(&mut self, n: usize, p: f64) -> Vec<f32> {
        let keep = (1.0 / (1.0 - p)) as f32;
        let threshold = (p * (1u64 << 32) as f64).ceil() as u64;
        let mut key = [0u8; 32];
        self.inner.fill_bytes(&mut key);
        // Blocks of a fixed size, each from its own position of the ChaCha8 stream
        // (word i decides entry i, wherever it is drawn): large masks are drawn on
        // rayon's threads with the same values as one thread draws them.
        const BLOCK: usize = 1 << 16;
        let fill = |start: usize, out: &mut [f32]| {
            let mut draws = rand_chacha::ChaCha8Rng::from_seed(key);
            draws.set_word_pos(start as u128);
            let mut bytes = [0u8; 4 * 2048];
            for out in out.chunks_mut(2048) {
                let chunk = &mut bytes[..4 * out.len()];
                draws.fill_bytes(chunk);
                for (o, w) in out.iter_mut().zip(chunk.chunks_exact(4)) {
                    let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                    *o = if u64::from(word) < threshold {
                        0.0
                    } else {
                        keep
                    };
                }
            }
        };
        let mut out = vec![0f32; n];
        if n <= BLOCK {
            fill(0, &mut out);
        } else {
            use rayon::prelude::*;
            out.par_chunks_mut(BLOCK)
                .enumerate()
                .for_each(|(b, chunk)| fill(b * BLOCK, chunk));
        }
        out
    }

    /// The state, for a checkpoint.
    pub fn state(&self) -> RngState {
        let seed = self
            .inner
            .get_seed()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        RngState {
            seed,
            stream: self.inner.get_stream(),
            word_pos: self.inner.get_word_pos().to_string(),
        }
    }

    /// A generator continuing from `state`.
    pub fn from_state(state: &RngState) -> Result<Self, String> {
        let bytes = state.seed.as_bytes();
        if bytes.len() != 64 {
            return Err(format!(
                "rng seed must be 64 hex digits, got {}",
                bytes.len()
            ));
        }
        let mut seed = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| "rng seed is not hex".to_string())?;
            seed[i] =
                u8::from_str_radix(text, 16).map_err(|_| "rng seed is not hex".to_string())?;
        }
        let word_pos: u128 = state
            .word_pos
            .parse()
            .map_err(|_| "rng word_pos is not a number".to_string())?;
        let mut inner = ChaCha20Rng::from_seed(seed);
        inner.set_stream(state.stream);
        inner.set_word_pos(word_pos);
        Ok(Rng { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_masks_are_reproducible_fresh_and_of_the_right_rate() {
        let mut a = Rng::seed_from_u64(7);
        let mut b = a.clone();
        let (n, p) = (200_000, 0.1);
        let m1 = a.dropout_values(n, p);
        assert_eq!(m1, b.dropout_values(n, p));
        // One mask advances the generator by its 256-bit key alone.
        let mut c = Rng::seed_from_u64(7);
        for _ in 0..4 {
            c.next_u64();
        }
        assert_eq!(a.state(), c.state());
        // The next mask differs; the rate is p (±5 standard deviations) and kept
        // entries are scaled by 1 / (1 - p).
        let m2 = a.dropout_values(n, p);
        assert_ne!(m1, m2);
        let dropped = m2.iter().filter(|&&v| v == 0.0).count() as f64;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        assert!((dropped - n as f64 * p).abs() < 5.0 * sd, "{dropped}");
        assert!(m2.iter().all(|&v| v == 0.0 || v == (1.0 / 0.9) as f32));
        // Drawn in blocks on several threads, a mask is the one stream drawn in order.
        let mut d = Rng::seed_from_u64(11);
        let mut key = [0u8; 32];
        d.clone().inner.fill_bytes(&mut key);
        let mut one = rand_chacha::ChaCha8Rng::from_seed(key);
        let threshold = (0.25 * (1u64 << 32) as f64).ceil() as u64;
        let sequential: Vec<f32> = (0..n)
            .map(|_| match u64::from(one.next_u32()) < threshold {
                true => 0.0,
                false => (1.0 / 0.75) as f32,
            })
            .collect();
        assert_eq!(d.dropout_values(n, 0.25), sequential);
        // p = 0.5 on a size that is not a multiple of the draw buffer.
        let half = a.dropout_values(2049, 0.5);
        assert_eq!(half.len(), 2049);
        assert!(half.contains(&0.0) && half.contains(&2.0));
    }

    #[test]
    fn state_restores_the_sequence() {
        let mut a = Rng::seed_from_u64(42);
        for _ in 0..13 {
            a.next_u64();
        }
        let s = a.state();
        let json = serde_json::to_string(&s).unwrap();
        let mut b = Rng::from_state(&serde_json::from_str(&json).unwrap()).unwrap();
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert!(
            Rng::from_state(&RngState {
                seed: "zz".into(),
                stream: 0,
                word_pos: "0".into()
            })
            .is_err()
        );
    }

    #[test]
    fn seeded_and_streams_differ() {
        assert_eq!(
            Rng::seed_from_u64(1).next_u64(),
            Rng::seed_from_u64(1).next_u64()
        );
        assert_ne!(
            Rng::with_stream(1, 0).next_u64(),
            Rng::with_stream(1, 1).next_u64()
        );
        let mut r = Rng::seed_from_u64(3);
        let mean: f64 = (0..20000).map(|_| r.normal()).sum::<f64>() / 20000.0;
        assert!(mean.abs() < 0.05, "{mean}");
        let mut v: Vec<u32> = (0..10).collect();
        r.shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    }
}
