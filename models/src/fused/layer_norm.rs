//! LayerNorm over the last dimension, forward and backward in one pass each; and
//! LayerNorm of a residual sum (BERT's `LayerNorm(hidden + input)`) in the same op.

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
    let op = LayerNormOp {
        eps: eps as f32,
        residual: false,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// `layer_norm(y + residual, w, b)`, the sum inside the op: neither the sum nor its
/// gradient becomes a tensor of the graph (candle would zero and add a gradient for
/// the sum and for each of its two inputs), and the backward recomputes the sum from
/// the inputs the graph keeps anyway. The same bits as the sum then [`layer_norm`].
pub(crate) fn layer_norm_residual(
    y: &Tensor,
    residual: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let h = y.dims().last().copied().unwrap_or(0);
    let fits = y.dims() == residual.dims() && h > 0 && w.dims() == [h] && b.dims() == [h];
    if !fits || !fusable(&[y, residual, w, b]) {
        return layer_norm(&(y + residual)?, w, b, eps);
    }
    // The weight and bias travel as one vector (custom ops take three inputs).
    let wb = Tensor::cat(&[w, b], 0)?;
    let op = LayerNormOp {
        eps: eps as f32,
        residual: true,
    };
    y.contiguous()?.apply_op3(&residual.contiguous()?, &wb, op)
}

/// Mean and 1/√(var + eps) of one row, as the written-out form computes them.
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Inputs `(x, w, b)`, or with `residual` `(y, residual, [w; b])` normalising y + residual.
struct LayerNormOp {
    eps: f32,
    residual: bool,
}

/// Row `r` (`h` wide) of the normalised input: x's, or y + residual's written into `buf`.
fn input_row<'a>(
    x: &'a [f32],
    r: Option<&[f32]>,
    i: usize,
    h: usize,
    buf: &'a mut [f32],
) -> &'a [f32] {
    let span = i * h..(i + 1) * h;
    match r {
        None => &x[span],
        Some(r) => {
            for ((o, a), b) in buf.iter_mut().zip(&x[span.clone()]).zip(&r[span]) {
                *o = a + b;
            }
            buf
        }
    }
}

impl LayerNormOp {
    /// The normalised rows of x (or y + residual) times w plus b.
    fn forward(&self, x: &[f32], r: Option<&[f32]>, w: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        let h = w.len();
        let ([out], _) = rows_into(x.len() / h, h, |rows, [out]| {
            let mut buf = vec![0f32; if r.is_some() { h } else { 0 }];
            for i in rows {
                let row = input_row(x, r, i, h, &mut buf);
                let (mean, rstd) = row_stats(row, self.eps);
                out.extend(
                    row.iter()
                        .zip(w.iter().zip(b))
                        .map(|(v, (w, b))| (v - mean) * rstd * w + b),
                );
            }
        })?;
        Ok(out)
    }

    /// With x̂ = (x − mean)·rstd and g = dy·w: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),
    /// dw = Σ dy·x̂ and db = Σ dy over the rows (per block of rows, summed in order).
    fn backward(
        &self,
        xs: &[f32],
        r: Option<&[f32]>,
        ws: &[f32],
        dy: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let h = ws.len();
        let n = h as f32;
        let ([dx], parts) = rows_into(xs.len() / h.max(1), h, |rows, [dx]| {
            let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
            let (mut xhat, mut g) = (vec![0f32; h], vec![0f32; h]);
            let mut buf = vec![0f32; if r.is_some() { h } else { 0 }];
            for i in rows {
                let row = input_row(xs, r, i, h, &mut buf);
                let dyr = &dy[i * h..(i + 1) * h];
                let (mean, rstd) = row_stats(row, self.eps);
                let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                for j in 0..h {
                    xhat[j] = (row[j] - mean) * rstd;
                    g[j] = dyr[j] * ws[j];
                    sum_g += g[j];
                    sum_gx += g[j] * xhat[j];
                    dw[j] += dyr[j] * xhat[j];
                    db[j] += dyr[j];
                }
                let (mean_g, mean_gx) = (sum_g / n, sum_gx / n);
                dx.extend((0..h).map(|j| rstd * (g[j] - mean_g - xhat[j] * mean_gx)));
            }
            (dw, db)
        })?;
        let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
        for (pw, pb) in parts {
            dw.iter_mut().zip(&pw).for_each(|(a, v)| *a += v);
            db.iter_mut().zip(&pb).for_each(|(a, v)| *a += v);
        }
        Ok((dx, dw, db))
    }
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
        let second = slice(s2, l2, self.name())?;
        let third = slice(s3, l3, self.name())?;
        let out = match self.residual {
            false => self.forward(x, None, second, third)?,
            true => {
                let (w, b) = third.split_at(third.len() / 2);
                if second.len() != x.len() || x.len() % w.len().max(1) != 0 {
                    candle_core::bail!("{}: the residual does not fit", self.name())
                }
                self.forward(x, Some(second), w, b)?
            }
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// dx, dw, db ([`LayerNormOp::backward`]); with a residual, dx for both y and the
    /// residual and [dw; db] for the packed vector.
    fn bwd(
        &self,
        x: &Tensor,
        second: &Tensor,
        third: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dev = x.device();
        if !self.residual {
            let ws = host(second)?;
            let (dx, dw, db) = read(x, |xs| read(grad, |dy| self.backward(xs, None, &ws, dy)))?;
            return Ok((
                Some(Tensor::from_vec(dx, x.shape(), dev)?),
                Some(Tensor::from_vec(dw, second.shape(), dev)?),
                Some(Tensor::from_vec(db, third.shape(), dev)?),
            ));
        }
        let wb = host(third)?;
        let ws = &wb[..wb.len() / 2];
        let (dx, mut dw, db) = read(x, |xs| {
            read(second, |rs| {
                read(grad, |dy| self.backward(xs, Some(rs), ws, dy))
            })
        })?;
        dw.extend(db);
        let dx = Tensor::from_vec(dx, x.shape(), dev)?;
        Ok((
            Some(dx.clone()),
            Some(dx),
            Some(Tensor::from_vec(dw, third.shape(), dev)?),
        ))
    }
}
