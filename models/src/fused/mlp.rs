//! Llama's MLP input half, `silu(x·W_gateᵀ) · (x·W_upᵀ)`, as one op: the two products
//! and the gate forward; the gate's backward, dx in two accumulating products and the
//! two weight gradients backward.
//!
//! As three ops (two [`linear`](super::linear) and [`silu_mul`](super::silu_mul)) the
//! graph holds the gate and up products as tensors of their own, and candle's backward
//! gives each of them, and `x` twice, a freshly zeroed gradient that it then adds to:
//! two `[rows, intermediate]` and one `[rows, hidden]` zero-fill-and-add a layer, about
//! a tenth of a Llama step's memory traffic. Here `x` gets one gradient and the
//! products stay inside the op.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::gemm::{Fresh, gemm_raw};
use super::linear::{out_shape, row_major, weight_rhs};
use super::{fusable, read, slice};

/// `silu(x·W_gateᵀ) · (x·W_upᵀ)` for `x` `[…, hidden]` and torch `Linear` weights
/// `[intermediate, hidden]` without biases: the same values as `silu_mul(linear(x,
/// w_gate), linear(x, w_up))`, whose form it takes off the fused kernels' ground (not
/// f32, not on the CPU, shapes that do not fit).
pub(crate) fn swiglu_mlp(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<Tensor> {
    let fits = match (w_gate.dims(), w_up.dims()) {
        ([i, h], [i2, h2]) => i == i2 && h == h2 && *i > 0 && *h > 0 && x.dims().last() == Some(h),
        _ => false,
    };
    if !fits || !fusable(&[x, w_gate, w_up]) {
        let gate = super::linear(x, w_gate, None, false)?;
        let up = super::linear(x, w_up, None, false)?;
        return super::silu_mul(&gate, &up);
    }
    x.contiguous()?.apply_op3(
        &w_gate.contiguous()?,
        &w_up.contiguous()?,
        SwigluMlp {
            saved: OnceLock::new(),
        },
    )
}

/// What the forward pass keeps for the backward: the gate and up products and each
/// gate element's 1 + e^−g (so the backward computes no `exp`).
struct Saved {
    gate: Vec<f32>,
    up: Vec<f32>,
    denoms: Vec<f32>,
}

struct SwigluMlp {
    saved: OnceLock<Saved>,
}

/// The gate and up products of `x` (`rows × hidden`) by `[inter, hidden]` weights, and
/// the gate's output with each element's 1 + e^−g: the products as `linear` computes
/// them, the gate as `silu_mul` (the same bits).
fn forward(
    x: &[f32],
    wg: &[f32],
    wu: &[f32],
    (rows, hidden, inter): (usize, usize, usize),
) -> Result<(Vec<f32>, Saved)> {
    let product = |w: &[f32]| -> Result<Vec<f32>> {
        let mut out = Fresh::new(rows * inter);
        gemm_raw(
            (rows, inter, hidden),
            (out.spare(), row_major(inter)),
            (x, row_major(hidden)),
            (w, weight_rhs(false, hidden, inter)),
            false,
        )?;
        // SAFETY: the product wrote all rows × inter elements (accumulate off).
        Ok(unsafe { out.finish() })
    };
    let (gate, up) = (product(wg)?, product(wu)?);
    let (out, denoms) = super::swiglu::gate(&gate, &up)?;
    Ok((out, Saved { gate, up, denoms }))
}

/// (rows, hidden, intermediate) of `x` and a `[inter, hidden]` weight; an error unless
/// they fit.
fn sizes(x: usize, w: &[usize], name: &str) -> Result<(usize, usize, usize)> {
    match w {
        [inter, hidden] if *hidden > 0 && x.is_multiple_of(*hidden) => {
            Ok((x / hidden, *hidden, *inter))
        }
        _ => candle_core::bail!("{name}: the weights do not fit the input"),
    }
}

impl CustomOp3 for SwigluMlp {
    fn name(&self) -> &'static str {
        "kiln-swiglu-mlp"
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
        let wg = slice(s2, l2, self.name())?;
        let wu = slice(s3, l3, self.name())?;
        let dims = sizes(x.len(), l2.dims(), self.name())?;
        if l3.dims() != l2.dims() {
            candle_core::bail!("{}: gate and up weights differ in shape", self.name())
        }
        let (out, saved) = forward(x, wg, wu, dims)?;
        // Run once per op; a second run (there is none) would recompute in `bwd`.
        let _ = self.saved.set(saved);
        Ok((CpuStorage::F32(out), out_shape(l1, dims.2)))
    }

    /// With σ = σ(g) and s = g·σ: d gate = dy·up·(σ(1 − s) + s), d up = dy·s (as
    /// `silu_mul`); dx = d gate·W_gate + d up·W_up (the second product accumulates onto
    /// the first), dW_gate = d gateᵀ·x, dW_up = d upᵀ·x, each only for an input that
    /// takes part in backprop (a frozen base gets no weight gradients).
    fn bwd(
        &self,
        x: &Tensor,
        wg: &Tensor,
        wu: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, hidden, inter) = sizes(x.elem_count(), wg.dims(), self.name())?;
        let (want_x, want_g, want_u) = (x.track_op(), wg.track_op(), wu.track_op());
        let mut dx = Fresh::new(if want_x { rows * hidden } else { 0 });
        let mut dwg = Fresh::new(if want_g { inter * hidden } else { 0 });
        let mut dwu = Fresh::new(if want_u { inter * hidden } else { 0 });
        read(x, |xs| {
            read(wg, |wgs| {
                read(wu, |wus| {
                    read(grad, |dy| {
                        if dy.len() != rows * inter {
                            candle_core::bail!("{}: the gradient does not fit", self.name())
                        }
                        let recomputed;
                        let saved = match self.saved.get() {
                            Some(s) if s.gate.len() == rows * inter => s,
                            _ => {
                                recomputed = forward(xs, wgs, wus, (rows, hidden, inter))?.1;
                                &recomputed
                            }
                        };
                        let (dg, du) = super::swiglu::gate_grads(
                            &saved.gate,
                            &saved.up,
                            dy,
                            Some(&saved.denoms),
                        )?;
                        let (gm, xm) = (row_major(inter), row_major(hidden));
                        let wm = weight_rhs(false, hidden, inter).t();
                        if want_x {
                            for (n, (d, w)) in [(&dg, wgs), (&du, wus)].into_iter().enumerate() {
                                gemm_raw(
                                    (rows, hidden, inter),
                                    (dx.spare(), xm),
                                    (d, gm),
                                    (w, wm),
                                    n == 1,
                                )?;
                            }
                        }
                        // dW [inter, hidden], written as its transpose xᵀ·d.
                        for (dw, d) in [(&mut dwg, &dg), (&mut dwu, &du)] {
                            if !dw.spare().is_empty() {
                                gemm_raw(
                                    (hidden, inter, rows),
                                    (dw.spare(), row_major(hidden).t()),
                                    (xs, xm.t()),
                                    (d, gm),
                                    false,
                                )?;
                            }
                        }
                        Ok(())
                    })
                })
            })
        })?;
        // SAFETY: each buffer that was asked for was written whole by a product that
        // overwrites (dx's second product accumulates onto its first).
        let (dx, dwg, dwu) = unsafe { (dx.finish(), dwg.finish(), dwu.finish()) };
        let dev = x.device();
        let grad_of = |want: bool, v: Vec<f32>, like: &Tensor| -> Result<Option<Tensor>> {
            match want {
                true => Ok(Some(Tensor::from_vec(v, like.shape(), dev)?)),
                false => Ok(None),
            }
        };
        Ok((
            grad_of(want_x, dx, x)?,
            grad_of(want_g, dwg, wg)?,
            grad_of(want_u, dwu, wu)?,
        ))
    }
}
