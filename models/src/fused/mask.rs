//! Multiplication by a constant mask (dropout) whose backward is one product.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{by_rows, fusable, joined, read, slice};

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

struct MulConstant(std::sync::Arc<Vec<f32>>);

impl CustomOp1 for MulConstant {
    fn name(&self) -> &'static str {
        "kiln-mul-constant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let out = joined(by_rows(x.len(), 1, |span| {
            x[span.clone()]
                .iter()
                .zip(&self.0[span])
                .map(|(x, m)| x * m)
                .collect()
        }));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = joined(read(grad, |dy| {
            Ok(by_rows(dy.len(), 1, |span| {
                dy[span.clone()]
                    .iter()
                    .zip(&self.0[span])
                    .map(|(d, m)| d * m)
                    .collect()
            }))
        })?);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
