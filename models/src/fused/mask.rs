//! Multiplication by a constant mask (dropout) whose backward is one product.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{fusable, read, rows_into, slice};

/// `x · mask` for a constant `mask` (dropout's, in `x`'s element order). candle's
/// multiplication also computes a gradient for the mask, a second product, a zero
/// tensor and a sum the size of `x`, which nothing uses; this one computes only
/// `dx = dy · mask`.
pub(crate) fn mul_mask(x: &Tensor, mask: Vec<f32>) -> Result<Tensor> {
    if mask.len() != x.elem_count() {
        candle_core::bail!(
            "a mask of {} values for {} elements",
            mask.len(),
            x.elem_count()
        )
    }
    if !fusable(&[x]) {
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        return x * mask;
    }
    x.contiguous()?
        .apply_op1(MulConstant(std::sync::Arc::new(mask)))
}

pub(super) struct MulConstant(pub(super) std::sync::Arc<Vec<f32>>);

impl CustomOp1 for MulConstant {
    fn name(&self) -> &'static str {
        "kiln-mul-constant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let ([out], _) = rows_into(x.len(), 1, |span, [out]| {
            out.extend(
                x[span.clone()]
                    .iter()
                    .zip(&self.0[span])
                    .map(|(x, m)| x * m),
            )
        })?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let ([dx], _) = read(grad, |dy| {
            rows_into(dy.len(), 1, |span, [dx]| {
                dx.extend(
                    dy[span.clone()]
                        .iter()
                        .zip(&self.0[span])
                        .map(|(d, m)| d * m),
                )
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
