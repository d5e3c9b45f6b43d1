//! SwiGLU's gate, `silu(gate) · up`, in one pass each way.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::written_out;
use super::{fusable, read, rows_into, slice};

/// `silu(gate) · up` (Llama's MLP: `act_fn(gate_proj(x)) * up_proj(x)`), with
/// silu(g) = g / (1 + e^−g) as torch and candle compute it, for `gate` and `up` of one
/// shape. Written out that is a silu and a multiply, with a backward of about ten ops;
/// fused (f32 on the CPU) one pass each way.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !fusable(&[gate, up]) || gate.dims() != up.dims() {
        return written_out::silu_mul(gate, up);
    }
    gate.contiguous()?.apply_op2(
        &up.contiguous()?,
        SiluMul {
            saved: std::sync::OnceLock::new(),
        },
    )
}

/// One SwiGLU gate of the graph. The forward pass keeps each element's 1 + e^−g for the
/// backward pass (which then computes no `exp`: bit for bit what it would recompute).
struct SiluMul {
    saved: std::sync::OnceLock<Vec<f32>>,
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "kiln-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = slice(s1, l1, self.name())?;
        let u = slice(s2, l2, self.name())?;
        if g.len() != u.len() {
            candle_core::bail!("{}: gate and up differ in size", self.name())
        }
        let (out, denoms) = gate(g, u)?;
        // Run once per op; a second run (there is none) would recompute in `bwd`.
        let _ = self.saved.set(denoms);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With σ = σ(g) and s = g·σ: d gate = dy·up·(σ(1 − s) + s) (= dy·up·σ(1 + g(1 − σ)),
    /// candle's form), d up = dy·s.
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = read(gate, |gs| {
            read(up, |us| {
                read(grad, |dy| {
                    if us.len() != gs.len() || dy.len() != gs.len() {
                        candle_core::bail!("{}: the gradient does not fit", self.name())
                    }
                    let saved = self.saved.get().filter(|e| e.len() == gs.len());
                    gate_grads(gs, us, dy, saved.map(|e| &e[..]))
                })
            })
        })?;
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), dev)?),
            Some(Tensor::from_vec(du, up.shape(), dev)?),
        ))
    }
}

/// `silu(g) · u` element by element, with each element's 1 + e^−g (kept for the
/// backward pass, which then computes no `exp`).
pub(super) fn gate(g: &[f32], u: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    let ([out, denoms], _) = rows_into(g.len(), 1, |span, [out, denoms]| {
        denoms.extend(g[span.clone()].iter().map(|&g| 1.0 + (-g).exp()));
        let e1 = denoms.written_from(0);
        out.extend(
            g[span.clone()]
                .iter()
                .zip(&u[span])
                .zip(e1.iter())
                .map(|((&g, u), &e1)| g / e1 * u),
        )
    })?;
    Ok((out, denoms))
}

/// [`gate`]'s gradients for `dy`, from the kept 1 + e^−g when given (else recomputed):
/// with σ = σ(g) and s = g·σ, d gate = dy·up·(σ(1 − s) + s), d up = dy·s.
pub(super) fn gate_grads(
    gs: &[f32],
    us: &[f32],
    dy: &[f32],
    saved: Option<&[f32]>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let ([dg, du], _) = rows_into(gs.len(), 1, |span, [dg, du]| {
        let saved = saved.map(|e| &e[span.clone()]);
        let (gs, us, dy) = (&gs[span.clone()], &us[span.clone()], &dy[span]);
        for (i, ((&g, &u), &d)) in gs.iter().zip(us).zip(dy).enumerate() {
            let e1 = match saved {
                Some(e) => e[i],
                None => 1.0 + (-g).exp(),
            };
            let (sigmoid, silu) = (1.0 / e1, g / e1);
            dg.extend([d * u * (sigmoid * (1.0 - silu) + silu)]);
            du.extend([d * silu]);
        }
    })?;
    Ok((dg, du))
}
