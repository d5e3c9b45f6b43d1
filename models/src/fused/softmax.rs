//! The scaled, masked softmax of attention scores in one pass each way.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::written_out;
use super::{fusable, read, rows_into, slice};

/// softmax(x · scale + bias) over the last dimension, for attention scores `x` and a
/// constant additive mask `bias` that broadcasts to `x`'s shape: one pass forward and
/// one backward, where the written-out form takes an affine, a broadcast add (with a
/// gradient for the mask that nothing uses) and the softmax, each with its backward.
pub(crate) fn softmax_scaled_biased(x: &Tensor, scale: f64, bias: &Tensor) -> Result<Tensor> {
    let h = x.dims().last().copied().unwrap_or(0);
    if !fusable(&[x, bias]) || h == 0 {
        return written_out::softmax_last(&(x * scale)?.broadcast_add(bias)?);
    }
    // A view of the mask in x's shape (stride 0 where it broadcasts).
    let bias = bias.broadcast_as(x.shape())?;
    x.contiguous()?.apply_op1(ScaledBiasedSoftmax {
        scale: scale as f32,
        bias,
    })
}

pub(super) struct ScaledBiasedSoftmax {
    pub(super) scale: f32,
    pub(super) bias: Tensor,
}

impl CustomOp1 for ScaledBiasedSoftmax {
    fn name(&self) -> &'static str {
        "kiln-scaled-biased-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let dims = l.shape().dims();
        let h = dims.last().copied().unwrap_or(1).max(1);
        let (storage, bl) = self.bias.storage_and_layout();
        let candle_core::Storage::Cpu(bias) = &*storage else {
            candle_core::bail!("{}: the mask is not on the CPU", self.name())
        };
        let bias = bias.as_slice::<f32>()?;
        let strides = bl.stride();
        let (lead, last) = strides.split_at(strides.len() - 1);
        let last = last[0];
        let ([out], _) = rows_into(x.len() / h, h, |rows, [out]| {
            for r in rows {
                let row = &x[r * h..(r + 1) * h];
                // The mask's offset for row r: its index in the leading dimensions, by
                // stride.
                let (mut rest, mut at) = (r, bl.start_offset());
                for (d, stride) in dims[..dims.len() - 1].iter().zip(lead).rev() {
                    at += (rest % d) * stride;
                    rest /= d;
                }
                let start = out.len();
                out.extend(
                    row.iter()
                        .enumerate()
                        .map(|(i, v)| v * self.scale + bias[at + i * last]),
                );
                let row = out.written_from(start);
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                row.iter_mut().for_each(|e| *e = (*e - max).exp());
                let sum: f32 = row.iter().sum();
                row.iter_mut().for_each(|e| *e /= sum);
            }
        })?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// dx = scale·y·(dy − Σ dy·y) per row; the mask is a constant.
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let h = x.dims().last().copied().unwrap_or(1).max(1);
        let ([dx], _) = read(res, |y| {
            read(grad, |dy| {
                rows_into(y.len() / h, h, |rows, [dx]| {
                    let span = rows.start * h..rows.end * h;
                    for (yr, dyr) in y[span.clone()]
                        .chunks_exact(h)
                        .zip(dy[span].chunks_exact(h))
                    {
                        let dot: f32 = yr.iter().zip(dyr).map(|(y, d)| y * d).sum();
                        dx.extend(yr.iter().zip(dyr).map(|(y, d)| self.scale * y * (d - dot)));
                    }
                })
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
