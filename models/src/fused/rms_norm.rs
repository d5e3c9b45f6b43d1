//! RMSNorm over the last dimension (Llama's), forward and backward in one pass each.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::written_out;
use super::{fusable, host, read, rows_into, slice};

/// transformers' `LlamaRMSNorm` of `x` `[…, h]` with weight `w` `[h]` (x's dtype):
/// `w · (x / √(mean(x²) + eps))`, normalised in f32 and cast back to x's dtype before
/// the weight multiply. Written out that is seven ops forward (with casts) and their
/// backwards; fused (f32 on the CPU) it is one pass each way.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dims().last().copied().unwrap_or(0);
    if !fusable(&[x, w]) || h == 0 || w.dims() != [h] {
        return written_out::rms_norm(x, w, eps);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNormOp { eps: eps as f32 })
}

/// 1/√(mean(x²) + eps) of one row, as the written-out form computes it.
fn row_rstd(row: &[f32], eps: f32) -> f32 {
    let mean = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (mean + eps).sqrt()
}

struct RmsNormOp {
    eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "kiln-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let h = w.len();
        let ([out], _) = rows_into(x.len() / h, h, |rows, [out]| {
            for row in x[rows.start * h..rows.end * h].chunks_exact(h) {
                let rstd = row_rstd(row, self.eps);
                out.extend(row.iter().zip(w).map(|(v, w)| v * rstd * w));
            }
        })?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With n = x·rstd and g = dy·w: dx = rstd·(g − n·mean(g·n)), dw = Σ dy·n over the
    /// rows.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ws = host(w)?;
        let h = ws.len();
        let n = h as f32;
        // Per block of rows: dx of its rows and its part of dw, summed in order.
        let ([dx], parts) = read(x, |xs| {
            read(grad, |dy| {
                rows_into(xs.len() / h.max(1), h, |rows, [dx]| {
                    let mut dw = vec![0f32; h];
                    let (mut normed, mut g) = (vec![0f32; h], vec![0f32; h]);
                    let span = rows.start * h..rows.end * h;
                    for (row, dyr) in xs[span.clone()]
                        .chunks_exact(h)
                        .zip(dy[span].chunks_exact(h))
                    {
                        let rstd = row_rstd(row, self.eps);
                        let mut sum_gn = 0f32;
                        for i in 0..h {
                            normed[i] = row[i] * rstd;
                            g[i] = dyr[i] * ws[i];
                            sum_gn += g[i] * normed[i];
                            dw[i] += dyr[i] * normed[i];
                        }
                        let mean_gn = sum_gn / n;
                        dx.extend((0..h).map(|i| rstd * (g[i] - normed[i] * mean_gn)));
                    }
                    dw
                })
            })
        })?;
        let mut dw = vec![0f32; h];
        for pw in parts {
            dw.iter_mut().zip(&pw).for_each(|(a, v)| *a += v);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
        ))
    }
}
