//! The same functions in candle's elementary ops, for the devices and dtypes the fused
//! kernels do not cover (and the reference the fused kernels are tested against).

use candle_core::{D, Result, Tensor};

/// LayerNorm over the last dimension, biased variance.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(w)?.broadcast_add(b)
}

/// Softmax over the last dimension (the max is a constant for the gradient, since
/// softmax does not depend on it).
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `x @ w` for `x` of any rank ≥ 1 and a matrix `w` (leading dimensions flattened).
pub(crate) fn matmul_last(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (lead, input) = dims.split_at(dims.len().saturating_sub(1));
    let rows: usize = lead.iter().product();
    let input = input.first().copied().unwrap_or(1);
    let y = x.reshape((rows, input))?.matmul(w)?;
    let mut shape = lead.to_vec();
    shape.push(y.dim(1)?);
    y.reshape(shape)
}
