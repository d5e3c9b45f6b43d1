//! A dense layer with a LoRA update in one op: `y = x·W(ᵀ) + b + s·(d(x)·Aᵀ)·Bᵀ`
//! (`d`: the adapter's input dropout). Written out, the adapter adds three
//! `[rows, out]` tensors per layer that backward keeps alive (its product, the scaled
//! product, the sum); fused, only the layer's output is, and the rank-r product is
//! recomputed in backward (rows·in·r multiply-adds, a fraction of the layer's).
//!
//! A, B and the bias travel packed in one vector (`[b, A, B]`, concatenated): candle's
//! custom ops take three inputs, and the concatenation's backward hands each its part of
//! the gradient.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::gemm::{Mat, as_uninit, gemm_with};
use super::linear::{dense_fwd, dense_grads, out_shape};
use super::{fusable, read, slice, sum_rows};

/// The adapter of [`lora_linear`]: `A` `[r, in]`, `B` `[out, r]`, the scaling, and the
/// dropout mask of this forward pass (`[rows · in]` values 0 or 1/(1-p)), if any.
pub(crate) struct LowRankInput<'a> {
    pub(crate) a: &'a Tensor,
    pub(crate) b: &'a Tensor,
    pub(crate) scaling: f64,
    pub(crate) mask: Option<Vec<f32>>,
}

/// Whether [`lora_linear`] applies: f32 on the CPU, shapes that fit.
pub(crate) fn lora_fits(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    transposed: bool,
    a: &Tensor,
    b: &Tensor,
) -> bool {
    let Some((input, output)) = in_out(w, transposed) else {
        return false;
    };
    let rank = a.dims().first().copied().unwrap_or(0);
    x.dims().last() == Some(&input)
        && a.dims() == [rank, input]
        && b.dims() == [output, rank]
        && bias.is_none_or(|b| b.dims() == [output])
        && rank > 0
        && input > 0
        && output > 0
        && fusable(&[x, w, a, b])
        && bias.is_none_or(|b| fusable(&[b]))
}

/// (input, output) features of a dense weight.
fn in_out(w: &Tensor, transposed: bool) -> Option<(usize, usize)> {
    match w.dims() {
        [r, c] if transposed => Some((*r, *c)),
        [r, c] => Some((*c, *r)),
        _ => None,
    }
}

/// The fused layer; the caller checked [`lora_fits`].
pub(crate) fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    transposed: bool,
    lr: LowRankInput<'_>,
) -> Result<Tensor> {
    if !lora_fits(x, w, bias, transposed, lr.a, lr.b)
        || lr.mask.as_ref().is_some_and(|m| m.len() != x.elem_count())
    {
        candle_core::bail!("kiln: lora_linear called on inputs it does not take")
    }
    let (input, output) = in_out(w, transposed).unwrap_or_default();
    let rank = lr.a.dims()[0];
    let bias = match bias {
        Some(b) => b.clone(),
        None => Tensor::zeros(output, DType::F32, x.device())?,
    };
    let packed = Tensor::cat(&[&bias, &lr.a.flatten_all()?, &lr.b.flatten_all()?], 0)?;
    let op = LoraLinearOp {
        transposed,
        input,
        output,
        rank,
        scaling: lr.scaling as f32,
        mask: lr.mask.map(Arc::new),
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &packed, op)
}

struct LoraLinearOp {
    transposed: bool,
    input: usize,
    output: usize,
    rank: usize,
    scaling: f32,
    mask: Option<Arc<Vec<f32>>>,
}

/// A row-major matrix of `cols` columns starting at `off`.
fn rm(off: usize, cols: usize) -> Mat {
    Mat {
        off,
        rs: cols,
        cs: 1,
    }
}

impl LoraLinearOp {
    /// Offsets of A and B in the packed vector.
    fn a_off(&self) -> usize {
        self.output
    }

    fn b_off(&self) -> usize {
        self.output + self.rank * self.input
    }

    /// The adapter's input: x, or x times the dropout mask.
    fn dropped<'a>(&self, x: &'a [f32], buf: &'a mut Vec<f32>) -> &'a [f32] {
        match &self.mask {
            Some(m) => {
                *buf = x.iter().zip(m.iter()).map(|(x, m)| x * m).collect();
                buf
            }
            None => x,
        }
    }

    /// h = d(x) · Aᵀ, `[rows, rank]`.
    fn low_rank(&self, xd: &[f32], packed: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut h = vec![0f32; rows * self.rank];
        gemm_with(
            (rows, self.rank, self.input),
            (&mut h, rm(0, self.rank)),
            (xd, rm(0, self.input)),
            (packed, rm(self.a_off(), self.input).t()),
            false,
        )?;
        Ok(h)
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "kiln-lora-linear"
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
        let packed = slice(s3, l3, self.name())?;
        let (input, output, rank) = (self.input, self.output, self.rank);
        let rows = x.len() / input;
        let mut dst = dense_fwd(self.transposed, x, w, &packed[..output])?;
        let mut buf = Vec::new();
        let xd = self.dropped(x, &mut buf);
        let mut h = self.low_rank(xd, packed, rows)?;
        h.iter_mut().for_each(|v| *v *= self.scaling);
        // dst += (s·h) · Bᵀ
        gemm_with(
            (rows, output, rank),
            (&mut dst, rm(0, output)),
            (&h, rm(0, rank)),
            (packed, rm(self.b_off(), rank).t()),
            true,
        )?;
        Ok((CpuStorage::F32(dst), out_shape(l1, output)))
    }

    /// With g = dy `[rows, out]`, gh = s·g·B `[rows, r]`, h = d(x)·Aᵀ:
    /// dx = g·W(ᵀ)ᵀ + d(gh·A), dW as a plain layer's, db = Σ rows of g,
    /// dA = ghᵀ·d(x), dB = s·gᵀ·h — each only for an input that takes part in backprop.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (input, output, rank) = (self.input, self.output, self.rank);
        let rows = x.elem_count() / input;
        let (want_x, want_w, want_p) = (x.track_op(), w.track_op(), packed.track_op());
        let mut dx = vec![0f32; if want_x { rows * input } else { 0 }];
        let mut dw = vec![0f32; if want_w { input * output } else { 0 }];
        let mut dp = vec![0f32; if want_p { packed.elem_count() } else { 0 }];
        read(x, |xs| {
            read(w, |ws| {
                read(packed, |ps| {
                    read(grad, |gs| {
                        let g = rm(0, output);
                        // gh = s · g · B  [rows, r]
                        let mut gh = vec![0f32; rows * rank];
                        gemm_with(
                            (rows, rank, output),
                            (&mut gh, rm(0, rank)),
                            (gs, g),
                            (ps, rm(self.b_off(), rank)),
                            false,
                        )?;
                        gh.iter_mut().for_each(|v| *v *= self.scaling);
                        let sizes = (rows, input, output);
                        let (dxs, dws) = (as_uninit(&mut dx), as_uninit(&mut dw));
                        dense_grads(self.transposed, sizes, xs, ws, gs, dxs, dws)?;
                        if want_x {
                            // d(gh · A): the adapter's share, masked like its input
                            // (without a mask, accumulated straight onto dx).
                            match &self.mask {
                                Some(m) => {
                                    let mut share = vec![0f32; rows * input];
                                    gemm_with(
                                        (rows, input, rank),
                                        (&mut share, rm(0, input)),
                                        (&gh, rm(0, rank)),
                                        (ps, rm(self.a_off(), input)),
                                        false,
                                    )?;
                                    dx.iter_mut()
                                        .zip(share.iter().zip(m.iter()))
                                        .for_each(|(d, (s, m))| *d += s * m);
                                }
                                None => gemm_with(
                                    (rows, input, rank),
                                    (&mut dx, rm(0, input)),
                                    (&gh, rm(0, rank)),
                                    (ps, rm(self.a_off(), input)),
                                    true,
                                )?,
                            }
                        }
                        if want_p {
                            dp[..output].copy_from_slice(&sum_rows(gs, output));
                            let mut buf = Vec::new();
                            let xd = self.dropped(xs, &mut buf);
                            // dA = ghᵀ · d(x)  [r, in]
                            gemm_with(
                                (rank, input, rows),
                                (&mut dp, rm(self.a_off(), input)),
                                (&gh, rm(0, rank).t()),
                                (xd, rm(0, input)),
                                false,
                            )?;
                            // dB = s · gᵀ · h  [out, r]
                            let mut h = self.low_rank(xd, ps, rows)?;
                            h.iter_mut().for_each(|v| *v *= self.scaling);
                            gemm_with(
                                (output, rank, rows),
                                (&mut dp, rm(self.b_off(), rank)),
                                (gs, g.t()),
                                (&h, rm(0, rank)),
                                false,
                            )?;
                        }
                        Ok(())
                    })
                })
            })
        })?;
        let dev = x.device();
        let dx = want_x
            .then(|| Tensor::from_vec(dx, x.shape(), dev))
            .transpose()?;
        let dw = want_w
            .then(|| Tensor::from_vec(dw, w.shape(), dev))
            .transpose()?;
        let dp = want_p
            .then(|| Tensor::from_vec(dp, packed.shape(), dev))
            .transpose()?;
        Ok((dx, dw, dp))
    }
}
