//! The same functions in candle's elementary ops, for the devices and dtypes the fused
//! kernels do not cover (and the reference the fused kernels are tested against).

use candle_core::{D, DType, Result, Tensor};

/// LayerNorm over the last dimension, biased variance.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(w)?.broadcast_add(b)
}

/// transformers' `LlamaRMSNorm`: normalised in f32, cast back to x's dtype, then times
/// the weight.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    normed.to_dtype(x.dtype())?.broadcast_mul(w)
}

/// Rotary embeddings of `x` `[b, t, heads·head_dim]` by the tables `[t, head_dim/2]`,
/// in x's dtype (the tables cast to it, as `apply_rotary_pos_emb`), `rotate_half` form:
/// per head `[x1·cos − x2·sin, x2·cos + x1·sin]`. The tables are constants.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, head_dim: usize) -> Result<Tensor> {
    let (b, t, e) = x.dims3()?;
    if head_dim == 0 || !head_dim.is_multiple_of(2) || e % head_dim != 0 {
        candle_core::bail!("rope: head_dim {head_dim} does not split a width of {e}")
    }
    let half = head_dim / 2;
    let x = x.reshape((b, t, e / head_dim, head_dim))?;
    let table = |c: &Tensor| c.detach().to_dtype(x.dtype())?.reshape((1, t, 1, half));
    let (cos, sin) = (table(cos)?, table(sin)?);
    let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
    let o1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let o2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[o1, o2], 3)?.reshape((b, t, e))
}

/// `silu(gate) · up`.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
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
