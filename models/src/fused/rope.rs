//! Rotary position embeddings (Llama's `rotate_half` convention) straight from a
//! projection's `[b, t, heads·d]` layout, and the cos/sin tables they rotate by.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};

use super::written_out;
use super::{Out, bte_layout, fusable, host, read, rows_into};

/// The rotary tables `(cos, sin)`, each `[positions.len(), inv_freq.len()]` f32: row i
/// holds position `positions.start + i`, entry j `cos(p·inv_freq[j])·attention_scaling`
/// (and sin), the angle a product in f32 as transformers' `inv_freq @ position_ids`.
/// transformers' tables repeat these columns twice (`cat(freqs, freqs)`); [`rope`]
/// takes them once.
pub(crate) fn rope_tables(
    inv_freq: &[f32],
    positions: Range<usize>,
    attention_scaling: f32,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (t, half) = (positions.len(), inv_freq.len());
    let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
    for p in positions {
        let p = p as f32;
        for &f in inv_freq {
            let angle = f * p;
            // libm's (musl's) cosf/sinf: the same bits on every machine.
            cos.push(libm::cosf(angle) * attention_scaling);
            sin.push(libm::sinf(angle) * attention_scaling);
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, half), device)?,
        Tensor::from_vec(sin, (t, half), device)?,
    ))
}

/// Rotary embeddings of `x` `[b, t, heads·head_dim]` (a view whose last dimension is
/// contiguous, such as a slice of a fused projection, is read in place) by the tables
/// `cos`, `sin` `[t, head_dim/2]` of x's positions ([`rope_tables`]): per head, with
/// x1, x2 its halves, `[x1·cos − x2·sin, x2·cos + x1·sin]`, as transformers'
/// `q·cos + rotate_half(q)·sin`. Contiguous output; the tables get no gradient. Other
/// dtypes and devices compute in x's dtype with the tables cast to it.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, head_dim: usize) -> Result<Tensor> {
    if !rope_fits(x, cos, sin, head_dim) {
        return written_out::rope(x, cos, sin, head_dim);
    }
    let x = if x.stride()[2] == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    x.apply_op1(Rope::new(cos, sin, head_dim)?)
}

/// One rotation: the tables `[t, half]` as host vectors.
pub(super) struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Whether [`rope`]'s fused kernel takes `x` `[b, t, heads·head_dim]` and the tables.
pub(super) fn rope_fits(x: &Tensor, cos: &Tensor, sin: &Tensor, head_dim: usize) -> bool {
    let half = head_dim / 2;
    let shape = match x.dims() {
        [_, t, e] => {
            head_dim > 0
                && head_dim.is_multiple_of(2)
                && e % head_dim == 0
                && cos.dims() == [*t, half]
                && sin.dims() == [*t, half]
        }
        _ => false,
    };
    shape && fusable(&[x, cos, sin])
}

impl Rope {
    /// The rotation by tables `[t, head_dim/2]` (f32 on the CPU).
    pub(super) fn new(cos: &Tensor, sin: &Tensor, head_dim: usize) -> Result<Self> {
        Ok(Rope {
            half: head_dim / 2,
            cos: host(cos)?,
            sin: host(sin)?,
        })
    }
}

impl Rope {
    /// Rotates the rows `rows` (of `b·t`, position `r % t`) of `src`, row r starting at
    /// `at(r)`, by the tables, or by their inverse (`inverse`: sin negated).
    fn rotate(
        &self,
        src: &[f32],
        (rows, t, e): (Range<usize>, usize, usize),
        at: impl Fn(usize) -> usize,
        inverse: bool,
        out: &mut Out<'_>,
    ) {
        let half = self.half;
        for r in rows {
            let x = &src[at(r)..at(r) + e];
            let p = (r % t) * half;
            let (c, s) = (&self.cos[p..p + half], &self.sin[p..p + half]);
            for xh in x.chunks_exact(2 * half) {
                let (x1, x2) = xh.split_at(half);
                if inverse {
                    out.extend((0..half).map(|i| x1[i] * c[i] + x2[i] * s[i]));
                    out.extend((0..half).map(|i| x2[i] * c[i] - x1[i] * s[i]));
                } else {
                    out.extend((0..half).map(|i| x1[i] * c[i] - x2[i] * s[i]));
                    out.extend((0..half).map(|i| x2[i] * c[i] + x1[i] * s[i]));
                }
            }
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "kiln-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = s.as_slice::<f32>()?;
        let Some(((b, t, e), (s0, s1), start)) = bte_layout(l) else {
            candle_core::bail!("{}: unexpected layout", self.name())
        };
        let (half, rows) = (self.half, b * t);
        let last = start + b.saturating_sub(1) * s0 + t.saturating_sub(1) * s1 + e;
        if half == 0 || e % (2 * half) != 0 || self.cos.len() != t * half || last > x.len() {
            candle_core::bail!("{}: x {:?} does not fit the tables", self.name(), l.dims())
        }
        if rows == 0 || e == 0 {
            return Ok((CpuStorage::F32(vec![]), Shape::from((b, t, e))));
        }
        let at = |r: usize| start + (r / t) * s0 + (r % t) * s1;
        let ([out], _) = rows_into(rows, e, |span, [out]| {
            self.rotate(x, (span, t, e), at, false, out)
        })?;
        Ok((CpuStorage::F32(out), Shape::from((b, t, e))))
    }

    /// dx is dy rotated back: `[dy1·cos + dy2·sin, dy2·cos − dy1·sin]`.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, e) = x.dims3()?;
        let dx = read(grad, |dy| {
            if dy.len() != b * t * e {
                candle_core::bail!("{}: the gradient does not fit x", self.name())
            }
            let ([dx], _) = rows_into(b * t, e, |span, [dx]| {
                self.rotate(dy, (span, t, e), |r| r * e, true, dx)
            })?;
            Ok(dx)
        })?;
        Ok(Some(Tensor::from_vec(dx, (b, t, e), x.device())?))
    }
}
