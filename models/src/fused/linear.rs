//! Dense layers (`Linear`, GPT-2's `Conv1D`) and trailing-dimension bias adds: one
//! gemm onto the bias rows forward, two gemms and a row sum backward.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use super::gelu::Gelu;
use super::gemm::{Fresh, Mat, gemm_raw, gemm_with};
use super::mask::MulConstant;
use super::{fusable, read, rows_into, slice, sum_rows};

/// `x + b` where `b`'s shape is the trailing part of `x`'s (a bias `[out]` over
/// `[…, out]`, position embeddings `[t, h]` over `[b, t, h]`): `broadcast_add`, whose
/// backward sums the gradient over the leading dimensions in one sequential pass.
pub(crate) fn add_trailing(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (xd, bd) = (x.dims(), b.dims());
    let trailing = bd.len() <= xd.len() && xd[xd.len() - bd.len()..] == *bd;
    if !trailing || !fusable(&[x, b]) || b.elem_count() == 0 {
        return x.broadcast_add(b);
    }
    x.contiguous()?.apply_op2(&b.contiguous()?, AddTrailing)
}

struct AddTrailing;

impl CustomOp2 for AddTrailing {
    fn name(&self) -> &'static str {
        "kiln-add-trailing"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let b = slice(s2, l2, self.name())?;
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(b.len()) {
            out.extend(row.iter().zip(b).map(|(x, b)| x + b));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !b.track_op() {
            return Ok((Some(grad.clone()), None));
        }
        let db = read(grad, |g| Ok(sum_rows(g, b.elem_count())))?;
        let db = Tensor::from_vec(db, b.shape(), b.device())?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// A dense layer over the last dimension of `x`: `x · Wᵀ + b` for torch's `Linear`
/// (`w` is `[out, in]`), `x · W + b` for GPT-2's `Conv1D` (`transposed`, `w` is
/// `[in, out]`). One gemm writes onto the bias rows; the backward is two gemms and a
/// row sum. Written out, the same layer is two reshapes, a transpose, a matmul and a
/// broadcast add, and candle's backward allocates, zeroes and adds a gradient for each.
pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    transposed: bool,
) -> Result<Tensor> {
    let written = || {
        let wt = if transposed { w.clone() } else { w.t()? };
        let y = super::written_out::matmul_last(x, &wt)?;
        match b {
            Some(b) => add_trailing(&y, b),
            None => Ok(y),
        }
    };
    if !dense_fits(x, w, b, transposed) {
        return written();
    }
    dense_op(x, w, b, LinearOp::new(transposed))
}

/// GELU of a dense layer's output, `gelu(x · W(ᵀ) + b)` (exact, or `tanh`: the tanh
/// approximation), in the layer's op: the layer's output before the GELU stays inside
/// it instead of becoming a tensor of the graph with a zeroed gradient of its own.
pub(crate) fn linear_gelu(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    transposed: bool,
    tanh: bool,
) -> Result<Tensor> {
    if !dense_fits(x, w, b, transposed) {
        return super::gelu(&linear(x, w, b, transposed)?, tanh);
    }
    let mut op = LinearOp::new(transposed);
    op.gelu = Some((Gelu::new(tanh), OnceLock::new()));
    dense_op(x, w, b, op)
}

/// Dropout of a dense layer's output, `(x · W(ᵀ) + b) · mask` for dropout's `mask` (0
/// or 1/(1 − p), one value per output element), in the layer's op: the output before
/// the dropout never becomes a tensor of the graph with a zeroed gradient of its own.
/// The same values as [`mul_mask`](super::mul_mask) of [`linear`].
pub(crate) fn linear_dropout(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    transposed: bool,
    mask: Vec<f32>,
) -> Result<Tensor> {
    if !dense_fits(x, w, b, transposed) {
        return super::mul_mask(&linear(x, w, b, transposed)?, mask);
    }
    let output = if transposed { w.dim(1)? } else { w.dim(0)? };
    if mask.len() != x.elem_count() / x.dim(x.rank() - 1)? * output {
        candle_core::bail!("kiln: a dropout mask that does not fit the layer's output")
    }
    let mut op = LinearOp::new(transposed);
    op.mask = Some(MulConstant(std::sync::Arc::new(mask)));
    dense_op(x, w, b, op)
}

/// Whether the fused dense op takes these inputs (f32 on the CPU, shapes that fit).
fn dense_fits(x: &Tensor, w: &Tensor, b: Option<&Tensor>, transposed: bool) -> bool {
    let (input, output) = match w.dims() {
        [r, c] if transposed => (*r, *c),
        [r, c] => (*c, *r),
        _ => return false,
    };
    x.dims().last() == Some(&input)
        && b.is_none_or(|b| b.dims() == [output])
        && input > 0
        && output > 0
        && fusable(&[x, w])
        && b.is_none_or(|b| fusable(&[b]))
}

/// `op` over x, w and the bias (a zero one when there is none).
fn dense_op(x: &Tensor, w: &Tensor, b: Option<&Tensor>, op: LinearOp) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        // Without a bias the third input is a zero bias that needs no gradient.
        None => {
            let output = if op.transposed { w.dim(1)? } else { w.dim(0)? };
            let zero = Tensor::zeros(output, DType::F32, x.device())?;
            x.apply_op3(&w, &zero, op)
        }
    }
}

/// `residual + x · Wᵀ` for a torch `Linear` weight `w` `[out, in]` without bias, and
/// `residual` of the output's shape (a transformer's residual stream): the product,
/// then the residual added in place, in one op. Written out, the sum is one more op,
/// whose backward zeroes and adds a gradient for both of its inputs.
pub(crate) fn linear_residual(x: &Tensor, w: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let fits = match (
        w.dims(),
        x.dims().split_last(),
        residual.dims().split_last(),
    ) {
        ([o, i], Some((xi, xl)), Some((ro, rl))) => xi == i && ro == o && xl == rl && *i > 0,
        _ => false,
    };
    if !fits || !fusable(&[x, w, residual]) {
        return residual + linear(x, w, None, false)?;
    }
    let mut op = LinearOp::new(false);
    op.residual = true;
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &residual.contiguous()?, op)
}

/// A dense layer; its third input is the bias (`[out]`, broadcast over the rows) or,
/// with `residual`, a tensor of the output's shape that the product is added onto.
/// With `gelu`, the GELU of the product (and the product kept for the backward pass);
/// with `mask`, the product times dropout's mask.
struct LinearOp {
    transposed: bool,
    residual: bool,
    gelu: Option<(Gelu, OnceLock<Tensor>)>,
    mask: Option<MulConstant>,
}

impl LinearOp {
    fn new(transposed: bool) -> Self {
        LinearOp {
            transposed,
            residual: false,
            gelu: None,
            mask: None,
        }
    }
}

/// The weight as the `[input, output]` right factor of `x · W(ᵀ)`: the transpose of a
/// row-major `[output, input]` Linear weight, or Conv1D's (`transposed`) row-major
/// weight itself.
pub(super) fn weight_rhs(transposed: bool, input: usize, output: usize) -> Mat {
    if transposed {
        row_major(output)
    } else {
        row_major(input).t()
    }
}

/// `x · W(ᵀ) + b` as rows of `b.len()` outputs: every row starts as the bias, and one
/// gemm adds the product onto it.
pub(super) fn dense_fwd(transposed: bool, x: &[f32], w: &[f32], b: &[f32]) -> Result<Vec<f32>> {
    let output = b.len();
    let input = w.len() / output;
    let rows = x.len() / input;
    // Every row starts as the bias (large outputs filled on rayon's threads).
    let ([mut dst], _) = rows_into(rows, output, |span, [out]| {
        for _ in span {
            out.extend(b.iter().copied());
        }
    })?;
    let rhs = weight_rhs(transposed, input, output);
    gemm_with(
        (rows, output, input),
        (&mut dst, row_major(output)),
        (x, row_major(input)),
        (w, rhs),
        true,
    )?;
    Ok(dst)
}

/// `residual + x · Wᵀ` (`w` `[output, input]`): the product as [`linear`] computes it,
/// then the residual added in place (large outputs on rayon's threads), so the sum has
/// the bits of the two ops it replaces (a layer with an adapter, which takes them,
/// computes what the same layer without one does).
fn residual_fwd(x: &[f32], w: &[f32], residual: &[f32], output: usize) -> Result<Vec<f32>> {
    let input = w.len() / output.max(1);
    let rows = x.len() / input.max(1);
    if output == 0 || input == 0 || residual.len() != rows * output {
        candle_core::bail!("kiln-linear: the residual does not fit the output")
    }
    let mut dst = dense_fwd(false, x, w, &vec![0f32; output])?;
    let add = |(d, r): (&mut [f32], &[f32])| d.iter_mut().zip(r).for_each(|(d, r)| *d += r);
    let chunk = 1 << 16;
    if dst.len() < super::rows::PARALLEL_ELEMENTS {
        add((&mut dst, residual));
    } else {
        use rayon::prelude::*;
        dst.par_chunks_mut(chunk)
            .zip(residual.par_chunks(chunk))
            .for_each(add);
    }
    Ok(dst)
}

/// The shape of a dense layer's output: `x`'s (laid out as `l`) with `output` last.
pub(super) fn out_shape(l: &Layout, output: usize) -> Shape {
    let mut shape = l.shape().dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = output;
    }
    Shape::from(shape)
}

/// The dense part of a layer's backward, with g = dy `[rows, out]` and x `[rows, in]`:
/// dx = g·W (Conv1D: g·Wᵀ) into `dx`, dW = gᵀ·x (Conv1D: xᵀ·g) into `dw`, each written
/// whole (neither is read); an empty buffer is an input that takes no part in backprop
/// and is skipped (a frozen weight,
/// kiln-peft's LoRA base, gets no dW: that gemm is half the layer's backward).
#[allow(clippy::too_many_arguments)]
pub(super) fn dense_grads(
    transposed: bool,
    (rows, input, output): (usize, usize, usize),
    xs: &[f32],
    ws: &[f32],
    gs: &[f32],
    dx: &mut [MaybeUninit<f32>],
    dw: &mut [MaybeUninit<f32>],
) -> Result<()> {
    let (gm, xm) = (row_major(output), row_major(input));
    if !dx.is_empty() {
        let wm = weight_rhs(transposed, input, output);
        gemm_raw(
            (rows, input, output),
            (dx, xm),
            (gs, gm),
            (ws, wm.t()),
            false,
        )?;
    }
    if !dw.is_empty() {
        let dwm = if transposed {
            row_major(output) // dW [input, output] = xᵀ·g
        } else {
            row_major(input).t() // dW [output, input], written as its transpose xᵀ·g
        };
        gemm_raw(
            (input, output, rows),
            (dw, dwm),
            (xs, xm.t()),
            (gs, gm),
            false,
        )?;
    }
    Ok(())
}

/// A row-major matrix of `cols` columns at the start of its buffer.
pub(super) fn row_major(cols: usize) -> Mat {
    Mat {
        off: 0,
        rs: cols,
        cs: 1,
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "kiln-linear"
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
        if self.residual {
            let output = l3.dims().last().copied().unwrap_or(0);
            return Ok((
                CpuStorage::F32(residual_fwd(x, w, b, output)?),
                out_shape(l1, output),
            ));
        }
        let dst = dense_fwd(self.transposed, x, w, b)?;
        let shape = out_shape(l1, b.len());
        if let Some(mask) = &self.mask {
            return mask.cpu_fwd(&CpuStorage::F32(dst), &Layout::contiguous(shape));
        }
        let Some((gelu, kept)) = &self.gelu else {
            return Ok((CpuStorage::F32(dst), shape));
        };
        let pre = CpuStorage::F32(dst);
        let out = gelu.cpu_fwd(&pre, &Layout::contiguous(shape.clone()))?;
        if let CpuStorage::F32(pre) = pre {
            let _ = kept.set(Tensor::from_vec(pre, &shape, &candle_core::Device::Cpu)?);
        }
        Ok(out)
    }

    /// dx, dW ([`dense_grads`]) and db = Σ rows of g, each only for an input that takes
    /// part in backprop.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let output = match self.residual {
            true => w.dim(0)?,
            false => b.elem_count(),
        };
        let input = w.elem_count() / output;
        let rows = x.elem_count() / input;
        let (want_x, want_w, want_b) = (x.track_op(), w.track_op(), b.track_op());
        // The residual's gradient is the output's.
        let want_sum = want_b && !self.residual;
        // With dropout, the gradient before it.
        let undropped;
        let grad = match &self.mask {
            None => grad,
            Some(mask) => {
                undropped = mask.bwd(grad, res, grad)?.ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{}: no gradient from the dropout",
                        self.name()
                    ))
                })?;
                &undropped
            }
        };
        // With a GELU, the gradient of the product before it.
        let pre_grad;
        let grad = match &self.gelu {
            None => grad,
            Some((gelu, kept)) => {
                let Some(pre) = kept.get() else {
                    candle_core::bail!("{}: a backward pass without its forward pass", self.name())
                };
                pre_grad = gelu.bwd(pre, res, grad)?.ok_or_else(|| {
                    candle_core::Error::Msg(format!("{}: no gradient from the GELU", self.name()))
                })?;
                &pre_grad
            }
        };
        let mut dx = Fresh::new(if want_x { rows * input } else { 0 });
        let mut dw = Fresh::new(if want_w { input * output } else { 0 });
        let db = read(x, |xs| {
            read(w, |ws| {
                read(grad, |gs| {
                    let sizes = (rows, input, output);
                    let (dxs, dws) = (dx.spare(), dw.spare());
                    dense_grads(self.transposed, sizes, xs, ws, gs, dxs, dws)?;
                    Ok(want_sum.then(|| sum_rows(gs, output)))
                })
            })
        })?;
        // SAFETY: dense_grads wrote the whole of each buffer it was given.
        let (dx, dw) = unsafe { (dx.finish(), dw.finish()) };
        let dev = x.device();
        let dx = match want_x {
            true => Some(Tensor::from_vec(dx, x.shape(), dev)?),
            false => None,
        };
        let dw = match want_w {
            true => Some(Tensor::from_vec(dw, w.shape(), dev)?),
            false => None,
        };
        let db = match db {
            Some(db) => Some(Tensor::from_vec(db, output, b.device())?),
            None if self.residual && want_b => Some(grad.clone()),
            None => None,
        };
        Ok((dx, dw, db))
    }
}
