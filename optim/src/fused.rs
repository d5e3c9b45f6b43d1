//! The optimizer's arithmetic on CPU f32 tensors in place: one pass over a parameter,
//! its gradient and its moments, instead of a dozen whole-tensor temporaries per step.
//!
//! Every element gets exactly the operations (and roundings) of the tensor formulation
//! in [`crate::optimizer`] — candle's `affine(mul, add)` is `v * mul + add` with both
//! constants rounded to f32, and no multiply-add is contracted — so both paths give the
//! same bits, and the results do not depend on how many threads share the work.

use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

use crate::{Error, Result};

/// Elements per parallel block: below two blocks the loop runs on the calling thread.
const BLOCK: usize = 1 << 16;

/// Calls `f` with the f32 elements of `t` (CPU, contiguous: the caller checks),
/// mutably, in place.
pub(crate) fn with_f32_mut<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
    if !t.device().is_cpu() || !t.is_contiguous() {
        return Err(Error::Params(
            "in-place update of a non-CPU or strided tensor".into(),
        ));
    }
    let op = SliceOp {
        f: RefCell::new(Some(f)),
        out: RefCell::new(None),
    };
    t.inplace_op1(&op)?;
    op.out
        .into_inner()
        .ok_or_else(|| Error::Params("in-place update did not run".into()))
}

/// Calls `f` with the f32 elements of `t` (CPU, contiguous); `None` otherwise.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.device().is_cpu() || !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            Some(f(&v[start..start + layout.shape().elem_count()]))
        }
        _ => None,
    }
}

struct SliceOp<F, R> {
    f: RefCell<Option<F>>,
    out: RefCell<Option<R>>,
}

impl<F: FnOnce(&mut [f32]) -> R, R> InplaceOp1 for SliceOp<F, R> {
    fn name(&self) -> &'static str {
        "kiln-optim-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("kiln-optim: in-place update of a non-f32 tensor")
        };
        let start = layout.start_offset();
        let n = layout.shape().elem_count();
        if let Some(f) = self.f.borrow_mut().take() {
            *self.out.borrow_mut() = Some(f(&mut v[start..start + n]));
        }
        Ok(())
    }
}

/// The constants of one AdamW update of one parameter, as the tensor path rounds them.
#[derive(Clone, Copy)]
pub(crate) struct AdamW {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_sqrt_bc2: f32,
    pub eps: f32,
    /// `1 - lr * weight_decay`, `None` without weight decay.
    pub decay: Option<f32>,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// The moments start at zero (the first step): `m = (1 - beta1) g`, not `beta1 m + …`.
    pub first: bool,
}

impl AdamW {
    /// One step over a block of the parameter `p`, gradient `g`, moments `m` and `v`.
    fn block(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
            let gm = g * self.one_minus_beta1 + 0.0;
            let gv = (g * g) * self.one_minus_beta2 + 0.0;
            if self.first {
                *m = gm;
                *v = gv;
            } else {
                *m = (*m * self.beta1 + 0.0) + gm;
                *v = (*v * self.beta2 + 0.0) + gv;
            }
            let denom = v.sqrt() * self.inv_sqrt_bc2 + self.eps;
            let decayed = match self.decay {
                Some(d) => *p * d + 0.0,
                None => *p,
            };
            *p = decayed - ((*m / denom) * self.step_size + 0.0);
        }
    }

    /// One step over the whole parameter, in parallel blocks where it is large.
    pub(crate) fn apply(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        if p.len() < 2 * BLOCK {
            return self.block(p, g, m, v);
        }
        p.par_chunks_mut(BLOCK)
            .zip(g.par_chunks(BLOCK))
            .zip(m.par_chunks_mut(BLOCK))
            .zip(v.par_chunks_mut(BLOCK))
            .for_each(|(((p, g), m), v)| self.block(p, g, m, v));
    }
}

/// The sum of squares of `g`'s elements in f64: blocks of [`BLOCK`] elements (in
/// parallel where there are several), each summed in eight interleaved lanes, the lanes
/// and then the blocks added in order. The order depends only on the length, so the sum
/// is the same at any thread count; eight lanes instead of one running sum let the
/// additions overlap (one dependent f64 add per element was the optimizer's slowest
/// part).
pub(crate) fn sum_of_squares(g: &[f32]) -> f64 {
    fn block(g: &[f32]) -> f64 {
        let mut lanes = [0f64; 8];
        let mut chunks = g.chunks_exact(8);
        for c in &mut chunks {
            for (l, &x) in lanes.iter_mut().zip(c) {
                *l += f64::from(x) * f64::from(x);
            }
        }
        for (l, &x) in lanes.iter_mut().zip(chunks.remainder()) {
            *l += f64::from(x) * f64::from(x);
        }
        lanes.iter().sum()
    }
    if g.len() < 2 * BLOCK {
        return block(g);
    }
    let parts: Vec<f64> = g.par_chunks(BLOCK).map(block).collect();
    parts.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_sum_of_squares_is_the_sum() {
        for n in [0, 5, 17, 3 * BLOCK + 11] {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            let naive: f64 = g.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            let blocked = sum_of_squares(&g);
            assert!(
                (blocked - naive).abs() <= 1e-12 * naive.max(1.0),
                "{n}: {blocked} {naive}"
            );
        }
    }
}
