//! LayerNorm over the last dimension, forward and backward in one pass each.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::written_out;
use super::{fusable, host, read, rows_into, slice};

/// LayerNorm over the last dimension (biased variance, as torch) of `x` with weight `w`
/// and bias `b` (all of one dtype).
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dims().last().copied().unwrap_or(0);
    if !fusable(&[x, w, b]) || h == 0 || w.dims() != [h] || b.dims() != [h] {
        return written_out::layer_norm(x, w, b, eps);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )
}

/// Mean and 1/√(var + eps) of one row, as the written-out form computes them.
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "kiln-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let b = slice(s3, l3, self.name())?;
        let h = w.len();
        let ([out], _) = rows_into(x.len() / h, h, |rows, [out]| {
            for row in x[rows.start * h..rows.end * h].chunks_exact(h) {
                let (mean, rstd) = row_stats(row, self.eps);
                out.extend(
                    row.iter()
                        .zip(w.iter().zip(b))
                        .map(|(v, (w, b))| (v - mean) * rstd * w + b),
                );
            }
        })?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With x̂ = (x − mean)·rstd and g = dy·w: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),
    /// dw = Σ dy·x̂ and db = Σ dy over the rows.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ws = host(w)?;
        let h = ws.len();
        let n = h as f32;
        // Per block of rows: dx of its rows and its part of dw and db, summed in order.
        let ([dx], parts) = read(x, |xs| {
            read(grad, |dy| {
                rows_into(xs.len() / h.max(1), h, |rows, [dx]| {
                    let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
                    let (mut xhat, mut g) = (vec![0f32; h], vec![0f32; h]);
                    let span = rows.start * h..rows.end * h;
                    for (row, dyr) in xs[span.clone()]
                        .chunks_exact(h)
                        .zip(dy[span].chunks_exact(h))
                    {
                        let (mean, rstd) = row_stats(row, self.eps);
                        let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                        for i in 0..h {
                            xhat[i] = (row[i] - mean) * rstd;
                            g[i] = dyr[i] * ws[i];
                            sum_g += g[i];
                            sum_gx += g[i] * xhat[i];
                            dw[i] += dyr[i] * xhat[i];
                            db[i] += dyr[i];
                        }
                        let (mean_g, mean_gx) = (sum_g / n, sum_gx / n);
                        dx.extend((0..h).map(|i| rstd * (g[i] - mean_g - xhat[i] * mean_gx)));
                    }
                    (dw, db)
                })
            })
        })?;
        let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
        for (pw, pb) in parts {
            dw.iter_mut().zip(&pw).for_each(|(a, v)| *a += v);
            db.iter_mut().zip(&pb).for_each(|(a, v)| *a += v);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}
