//! Scaled dot-product attention as one op: scores, the scaled masked softmax, dropout
//! and the context, forward and backward, from the projections' `[b, t, heads·d]`.
//!
//! As four ops ([`attention_scores`](super::attention_scores),
//! [`softmax_scaled_biased`](super::softmax_scaled_biased), dropout's
//! [`mul_mask`](super::mul_mask), [`attention_context`](super::attention_context)) the
//! graph keeps the scores, the probabilities and the dropped probabilities, `[b, heads,
//! t, t]` each, and candle's backward gives each a freshly zeroed gradient that it then
//! adds to. Here the op keeps the probabilities (and the dropped ones, with dropout),
//! and its backward runs the four ops' backward passes in a row: the same kernels, the
//! same values, without the scores kept or any gradient zeroed. With [`Rotary`] tables
//! (the Llama family) it rotates the queries and keys first, as [`rope`](super::rope)
//! does, and keeps the rotated ones instead of the graph.

use std::sync::{Arc, OnceLock};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Tensor,
};

use super::attention::{AttentionContext, AttentionScores, group};
use super::fusable;
use super::mask::MulConstant;
use super::rope::{Rope, rope_fits};
use super::softmax::ScaledBiasedSoftmax;

/// Rotary tables `[t, head_dim/2]` for the queries and keys ([`rope`](super::rope)).
#[derive(Clone, Copy)]
pub(crate) struct Rotary<'a> {
    pub(crate) cos: &'a Tensor,
    pub(crate) sin: &'a Tensor,
    pub(crate) head_dim: usize,
}

/// Whether [`sdpa`] takes these inputs: f32 on the CPU, `[b, t, ·]` projections with
/// whole heads and groups, a bias that broadcasts to the scores `[b, heads, tq, tk]`,
/// and rotary tables that fit queries and keys of the same positions.
pub(crate) fn sdpa_fits(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (heads, kv_heads): (usize, usize),
    bias: &Tensor,
    rotary: Option<Rotary<'_>>,
) -> bool {
    let Ok(group) = group(heads, kv_heads) else {
        return false;
    };
    let rows = |t: &Tensor| t.rank() == 3 && t.stride()[2] == 1;
    if !fusable(&[q, k, v, bias]) || !rows(q) || !rows(k) || !rows(v) {
        return false;
    }
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    qd[0] == kd[0]
        && kd[0] == vd[0]
        && kd[1] == vd[1]
        && qd[2] % heads == 0
        && kd[2] * group == qd[2]
        && vd[2] % kv_heads == 0
        && vd[2] > 0
        && bias.broadcast_as((qd[0], heads, qd[1], kd[1])).is_ok()
        && rotary.is_none_or(|r| {
            qd[1] == kd[1]
                && rope_fits(q, r.cos, r.sin, r.head_dim)
                && rope_fits(k, r.cos, r.sin, r.head_dim)
        })
}

/// softmax(q·kᵀ·scale + bias), times `mask` (dropout's values, 0 or 1/(1−p), one per
/// score) when given, times v; the heads merged back into `[b, tq, heads·d_v]`; q and
/// k rotated first by `rotary`'s tables when given. The caller checked [`sdpa_fits`].
pub(crate) fn sdpa(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    bias: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
    rotary: Option<Rotary<'_>>,
) -> Result<Tensor> {
    if !sdpa_fits(q, k, v, (heads, kv_heads), bias, rotary) {
        candle_core::bail!("kiln: sdpa called on inputs it does not take")
    }
    let op = op((q, k, v), (heads, kv_heads), bias, scale, mask, rotary)?;
    q.apply_op3(k, v, op)
}

/// The op of [`sdpa`] (a dropout mask of another size than the scores is an error);
/// the caller checked [`sdpa_fits`].
fn op(
    (q, k, _): (&Tensor, &Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    bias: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
    rotary: Option<Rotary<'_>>,
) -> Result<Sdpa> {
    let group = group(heads, kv_heads)?;
    let scores = (q.dim(0)?, heads, q.dim(1)?, k.dim(1)?);
    if mask
        .as_ref()
        .is_some_and(|m| m.len() != Shape::from(scores).elem_count())
    {
        candle_core::bail!("kiln: a dropout mask that does not fit the attention scores")
    }
    Ok(Sdpa {
        scores: AttentionScores { heads, group },
        softmax: ScaledBiasedSoftmax {
            scale: scale as f32,
            bias: bias.broadcast_as(scores)?,
        },
        mask: mask.map(|m| MulConstant(Arc::new(m))),
        context: AttentionContext { heads, group },
        rope: match rotary {
            Some(r) => Some(Rope::new(r.cos, r.sin, r.head_dim)?),
            None => None,
        },
        saved: OnceLock::new(),
        rotated: OnceLock::new(),
    })
}

/// Widths of the queries, keys and values side by side in one projection's output.
pub(crate) type Widths = (usize, usize, usize);

/// The three views of `qkv` `[b, t, eq + ek + ev]` (a fused projection's output).
fn views(qkv: &Tensor, (eq, ek, ev): Widths) -> Result<[Tensor; 3]> {
    Ok([
        qkv.narrow(2, 0, eq)?,
        qkv.narrow(2, eq, ek)?,
        qkv.narrow(2, eq + ek, ev)?,
    ])
}

/// Whether [`sdpa_packed`] takes `qkv`: [`sdpa_fits`] for its three views.
pub(crate) fn sdpa_packed_fits(
    qkv: &Tensor,
    widths: Widths,
    heads: (usize, usize),
    bias: &Tensor,
    rotary: Option<Rotary<'_>>,
) -> bool {
    let whole = qkv.rank() == 3 && qkv.dim(2).ok() == Some(widths.0 + widths.1 + widths.2);
    whole && views(qkv, widths).is_ok_and(|[q, k, v]| sdpa_fits(&q, &k, &v, heads, bias, rotary))
}

/// [`sdpa`] of the queries, keys and values side by side in one tensor (GPT-2's
/// `c_attn`): the same values, with one
/// gradient for the whole tensor, where three views would each get candle's backward
/// of a narrow (the gradient padded with zeros to the whole width, then added).
pub(crate) fn sdpa_packed(
    qkv: &Tensor,
    widths: Widths,
    heads: (usize, usize),
    bias: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
    rotary: Option<Rotary<'_>>,
) -> Result<Tensor> {
    if !sdpa_packed_fits(qkv, widths, heads, bias, rotary) {
        candle_core::bail!("kiln: sdpa_packed called on inputs it does not take")
    }
    let [q, k, v] = views(qkv, widths)?;
    let inner = op((&q, &k, &v), heads, bias, scale, mask, rotary)?;
    qkv.apply_op1(Packed { inner, widths })
}

/// The attention op over three views of one input.
struct Packed {
    inner: Sdpa,
    widths: Widths,
}

impl CustomOp1 for Packed {
    fn name(&self) -> &'static str {
        "kiln-attention-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (eq, ek, ev) = self.widths;
        let (lq, lk, lv) = (
            l.narrow(2, 0, eq)?,
            l.narrow(2, eq, ek)?,
            l.narrow(2, eq + ek, ev)?,
        );
        self.inner.cpu_fwd(s, &lq, s, &lk, s, &lv)
    }

    /// The attention's backward over the views; their gradients side by side.
    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        let [q, k, v] = views(&qkv.detach(), self.widths)?;
        let (dq, dk, dv) = self.inner.bwd(&q, &k, &v, res, grad_out)?;
        let parts = [
            grad(dq, "the queries")?,
            grad(dk, "the keys")?,
            grad(dv, "the values")?,
        ];
        Ok(Some(Tensor::cat(&parts, 2)?))
    }
}

struct Sdpa {
    scores: AttentionScores,
    softmax: ScaledBiasedSoftmax,
    mask: Option<MulConstant>,
    context: AttentionContext,
    rope: Option<Rope>,
    /// The probabilities and, with dropout, the dropped ones, as the forward pass
    /// computed them.
    saved: OnceLock<(Tensor, Option<Tensor>)>,
    /// With `rope`, the rotated queries and keys.
    rotated: OnceLock<(Tensor, Tensor)>,
}

/// A CPU f32 storage as a tensor of `shape`.
fn tensor(s: CpuStorage, shape: &Shape) -> Result<Tensor> {
    match s {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, &Device::Cpu),
        _ => candle_core::bail!("kiln-attention: a kernel returned another dtype"),
    }
}

/// The gradient a sub-op's backward returned for `what`.
fn grad(g: Option<Tensor>, what: &str) -> Result<Tensor> {
    g.ok_or_else(|| candle_core::Error::Msg(format!("kiln-attention: no gradient for {what}")))
}

impl CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        "kiln-attention"
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
        let (scores, shape) = match &self.rope {
            None => self.scores.cpu_fwd(s1, l1, s2, l2)?,
            Some(rope) => {
                let (q, qs) = rope.cpu_fwd(s1, l1)?;
                let (k, ks) = rope.cpu_fwd(s2, l2)?;
                let (lq, lk) = (
                    Layout::contiguous(qs.clone()),
                    Layout::contiguous(ks.clone()),
                );
                let scores = self.scores.cpu_fwd(&q, &lq, &k, &lk)?;
                let _ = self.rotated.set((tensor(q, &qs)?, tensor(k, &ks)?));
                scores
            }
        };
        let layout = Layout::contiguous(shape.clone());
        let (probs, _) = self.softmax.cpu_fwd(&scores, &layout)?;
        drop(scores);
        let dropped = match &self.mask {
            Some(m) => Some(m.cpu_fwd(&probs, &layout)?.0),
            None => None,
        };
        let attended = dropped.as_ref().unwrap_or(&probs);
        let out = self.context.cpu_fwd(attended, &layout, s3, l3)?;
        let dropped = match dropped {
            Some(d) => Some(tensor(d, &shape)?),
            None => None,
        };
        // Run once per op (on the CPU, before any backward).
        let _ = self.saved.set((tensor(probs, &shape)?, dropped));
        Ok(out)
    }

    /// The context's backward (dP, dV), dropout's (dP·mask), the softmax's (dS) and the
    /// scores' (dQ, dK), in a row; with rotary tables dQ and dK rotated back.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some((probs, dropped)) = self.saved.get() else {
            candle_core::bail!("kiln-attention: a backward pass without its forward pass")
        };
        let attended = dropped.as_ref().unwrap_or(probs);
        let (dp, dv) = self.context.bwd(attended, v, res, grad_out)?;
        let mut dp = grad(dp, "the probabilities")?;
        if let Some(m) = &self.mask {
            dp = grad(m.bwd(probs, probs, &dp)?, "the dropout")?;
        }
        let ds = grad(self.softmax.bwd(probs, probs, &dp)?, "the scores")?;
        let Some(rope) = &self.rope else {
            let (dq, dk) = self.scores.bwd(q, k, res, &ds)?;
            return Ok((dq, dk, dv));
        };
        let Some((qr, kr)) = self.rotated.get() else {
            candle_core::bail!("kiln-attention: a backward pass without its forward pass")
        };
        let (dqr, dkr) = self.scores.bwd(qr, kr, res, &ds)?;
        let dq = rope.bwd(q, res, &grad(dqr, "the queries")?)?;
        let dk = rope.bwd(k, res, &grad(dkr, "the keys")?)?;
        Ok((dq, dk, dv))
    }
}
