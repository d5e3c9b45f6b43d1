//! GELU (exact and tanh-approximated) keeping its transcendental part for the
//! backward pass.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{fusable, read, rows_into, slice};

/// GELU, exact (`erf`, transformers' `gelu`) or with the tanh approximation
/// (`gelu_new`). candle's backward of its GELU ops is about ten tensor operations (and
/// rounds 1/√(2π) to 0.398942); this one is one pass.
pub(crate) fn gelu(x: &Tensor, tanh: bool) -> Result<Tensor> {
    if !fusable(&[x]) {
        return if tanh { x.gelu() } else { x.gelu_erf() };
    }
    x.contiguous()?.apply_op1(Gelu::new(tanh))
}

/// One GELU of the graph. The forward pass keeps the transcendental part of each
/// element (tanh of the approximation's argument, or Φ(x) of the exact form) for the
/// backward pass, as torch keeps its intermediates, so the backward pass computes no
/// `tanh` or `erf` again.
pub(super) struct Gelu {
    tanh: bool,
    saved: std::sync::OnceLock<Vec<f32>>,
}

/// √(2/π), the tanh approximation's scale.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// tanh from one `exp`: (1 − e)/(1 + e) with e = e^(−2|u|), the sign put back. glibc's
/// `tanhf` (through `expm1f`) was a quarter of a GPT-2 training step; this is within
/// 2·10⁻⁷ of tanh everywhere (tested), which is all `1 + tanh` in GELU can resolve.
pub(super) fn fast_tanh(u: f32) -> f32 {
    let e = (-2.0 * u.abs()).exp();
    ((1.0 - e) / (1.0 + e)).copysign(u)
}

impl Gelu {
    /// The exact GELU, or (`tanh`) the tanh approximation.
    pub(super) fn new(tanh: bool) -> Self {
        Gelu {
            tanh,
            saved: std::sync::OnceLock::new(),
        }
    }

    /// The part both passes need: tanh(√(2/π)(x + 0.044715x³)), or Φ(x).
    fn part(&self, x: f32) -> f32 {
        if self.tanh {
            fast_tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        } else {
            0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
        }
    }

    fn value(&self, x: f32, part: f32) -> f32 {
        if self.tanh {
            0.5 * x * (1.0 + part)
        } else {
            x * part
        }
    }

    fn slope(&self, x: f32, part: f32) -> f32 {
        if self.tanh {
            let t = part;
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 0.134145 * x * x)
        } else {
            // Φ(x) + x·φ(x), with φ the standard normal density.
            let pdf = (-0.5 * x * x).exp()
                * (0.5 * std::f32::consts::FRAC_2_SQRT_PI)
                * std::f32::consts::FRAC_1_SQRT_2;
            part + x * pdf
        }
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "kiln-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let ([parts, out], _) = rows_into(x.len(), 1, |span, [parts, out]| {
            parts.extend(x[span.clone()].iter().map(|&v| self.part(v)));
            let written = parts.written_from(0);
            out.extend(
                x[span]
                    .iter()
                    .zip(written)
                    .map(|(&v, &mut p)| self.value(v, p)),
            );
        })?;
        // Run once per op; a second run (there is none) would recompute in `bwd`.
        let _ = self.saved.set(parts);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let ([dx], _) = read(x, |xs| {
            read(grad, |dy| {
                let saved = self.saved.get().filter(|p| p.len() == xs.len());
                rows_into(xs.len(), 1, |span, [dx]| {
                    let (xs, dy) = (&xs[span.clone()], &dy[span.clone()]);
                    match saved {
                        Some(parts) => dx.extend(
                            xs.iter()
                                .zip(&parts[span])
                                .zip(dy)
                                .map(|((&v, &p), d)| d * self.slope(v, p)),
                        ),
                        None => dx.extend(
                            xs.iter()
                                .zip(dy)
                                .map(|(&v, d)| d * self.slope(v, self.part(v))),
                        ),
                    }
                })
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
