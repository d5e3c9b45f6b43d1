//! Cross-entropy of rows of logits against one class per row (or none), in one pass
//! each way, straight from the logits as the head returns them.
//!
//! Written out (log-softmax, gather, weights, sum) it is a dozen ops over the whole
//! `[rows, vocab]` logits, several of which the graph keeps, each with a zeroed
//! gradient in backward; a causal LM's shift first copies the logits without their
//! last position. Here the logits are read in place (a row without a target, such as
//! the last position of a sequence, is skipped), only each row's max and sum of
//! exponentials are kept, and the backward writes `softmax − one-hot` once.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{fusable, read, rows_into, slice};

/// The mean over rows with a target of −log softmax(row)[target], for logits
/// `[…, classes]` (f32 on the CPU: [`cross_entropy_fits`]) and one entry of `targets` a
/// row (`None`: not counted, no gradient). NaN when no row has a target, as torch.
pub(crate) fn cross_entropy(logits: &Tensor, targets: Vec<Option<u32>>) -> Result<Tensor> {
    let classes = logits.dims().last().copied().unwrap_or(0);
    if !cross_entropy_fits(logits)
        || targets.len() * classes != logits.elem_count()
        || targets.iter().flatten().any(|&t| t as usize >= classes)
    {
        candle_core::bail!("kiln: cross_entropy called on inputs it does not take")
    }
    let count = targets.iter().flatten().count();
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets,
        count,
        saved: OnceLock::new(),
    })
}

/// Whether [`cross_entropy`] takes these logits.
pub(crate) fn cross_entropy_fits(logits: &Tensor) -> bool {
    fusable(&[logits]) && logits.rank() >= 1 && logits.dims().last().is_some_and(|&c| c > 0)
}

struct CrossEntropy {
    targets: Vec<Option<u32>>,
    count: usize,
    /// Each row's max and Σ e^(x − max) (zeros for rows without a target).
    saved: OnceLock<Vec<(f32, f32)>>,
}

impl CrossEntropy {
    /// Each row's max and Σ e^(x − max), rows without a target skipped.
    fn stats(&self, x: &[f32], classes: usize) -> Vec<(f32, f32)> {
        let row_stats = |r: usize| match self.targets[r] {
            None => (0.0, 0.0),
            Some(_) => {
                let row = &x[r * classes..(r + 1) * classes];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                (max, row.iter().map(|v| (v - max).exp()).sum())
            }
        };
        let rows = self.targets.len();
        if rows * classes < 1 << 17 {
            return (0..rows).map(row_stats).collect();
        }
        use rayon::prelude::*;
        (0..rows).into_par_iter().map(row_stats).collect()
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "kiln-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let classes = x.len() / self.targets.len().max(1);
        let stats = self.stats(x, classes);
        // log softmax(row)[t] = (x_t − max) − ln Σ, summed over the rows in order.
        let total: f32 = self
            .targets
            .iter()
            .zip(&stats)
            .enumerate()
            .filter_map(|(r, (t, (max, sum)))| {
                t.map(|t| (x[r * classes + t as usize] - max) - sum.ln())
            })
            .sum();
        let loss = match self.count {
            0 => f32::NAN,
            n => total * (-1.0 / n as f32),
        };
        let _ = self.saved.set(stats);
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    /// d logits = dy / count · (softmax(row) − one-hot(target)) on rows with a target,
    /// zero on the others.
    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dy = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let rows = self.targets.len();
        let classes = logits.elem_count() / rows.max(1);
        let scale = dy / self.count.max(1) as f32;
        let ([dx], _) = read(logits, |x| {
            let computed;
            let stats = match self.saved.get() {
                Some(s) => s,
                None => {
                    computed = self.stats(x, classes);
                    &computed
                }
            };
            rows_into(rows, classes, |span, [dx]| {
                for r in span {
                    let row = &x[r * classes..(r + 1) * classes];
                    match self.targets[r] {
                        None => dx.extend(row.iter().map(|_| 0.0)),
                        Some(t) => {
                            let (max, sum) = stats[r];
                            let start = dx.len();
                            dx.extend(row.iter().map(|v| scale * ((v - max).exp() / sum)));
                            dx.written_from(start)[t as usize] -= scale;
                        }
                    }
                }
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, logits.shape(), logits.device())?))
    }
}
