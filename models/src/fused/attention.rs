//! Attention scores and context for every head straight from the projections' `[b, t,
//! heads·d]` layout, without splitting into heads or copying; grouped-query attention
//! (fewer key/value heads) without repeating the keys and values.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use std::mem::MaybeUninit;

use super::gemm::{Fresh, Mat, gemm_raw};
use super::{bte_layout, fusable, read, read_strided, slice};

/// Head `hd` of batch entry `bi` of a `[b, t, heads·d]` tensor with strides `(s0, s1, 1)`
/// from `start`: a `t × d` matrix.
fn head(start: usize, stride: (usize, usize), bi: usize, hd: usize, d: usize) -> Mat {
    Mat {
        off: start + bi * stride.0 + hd * d,
        rs: stride.1,
        cs: 1,
    }
}

/// The query heads per key/value head, `heads / kv_heads`; an error unless it divides.
pub(super) fn group(heads: usize, kv_heads: usize) -> Result<usize> {
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        candle_core::bail!("attention: {heads} heads do not share {kv_heads} key/value heads")
    }
    Ok(heads / kv_heads)
}

/// Attention scores `q·kᵀ` of every head, `[b, heads, tq, tk]`, from `q` `[b, tq,
/// heads·d]` and `k` `[b, tk, kv_heads·d]` as the projections give them (views such as
/// GPT-2's slices of its fused projection included): no split into heads, no copies.
/// Query head `hd` meets key head `hd / (heads / kv_heads)` (transformers' `repeat_kv`).
pub(crate) fn attention_scores(
    q: &Tensor,
    k: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    let group = group(heads, kv_heads)?;
    let fits = |t: &Tensor| t.rank() == 3 && t.stride()[2] == 1;
    if !fusable(&[q, k])
        || !fits(q)
        || !fits(k)
        || q.dim(2)? % heads != 0
        || k.dim(2)? != q.dim(2)? / group
    {
        return written_scores(q, k, heads, kv_heads);
    }
    q.apply_op2(k, AttentionScores { heads, group })
}

/// The attention output `probs·v` of every head, merged back into `[b, tq, heads·d]`,
/// from `probs` `[b, heads, tq, tk]` and `v` `[b, tk, kv_heads·d]`.
pub(crate) fn attention_context(
    probs: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    let group = group(heads, kv_heads)?;
    let fits = v.rank() == 3 && v.stride()[2] == 1 && probs.rank() == 4;
    if !fusable(&[probs, v]) || !fits || v.dim(2)? % kv_heads != 0 || probs.dim(1)? != heads {
        return written_context(probs, v, heads, kv_heads);
    }
    probs
        .contiguous()?
        .apply_op2(v, AttentionContext { heads, group })
}

/// [`attention_scores`] in candle's ops: the queries of a group as the rows of one
/// `[b, kv_heads, group·tq, d]` matrix per key head, so one matmul serves the group.
pub(super) fn written_scores(
    q: &Tensor,
    k: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    let group = group(heads, kv_heads)?;
    if group == 1 {
        return split_heads(q, heads)?.matmul(&split_heads(k, heads)?.t()?);
    }
    let (b, tq, e) = q.dims3()?;
    let q = q
        .reshape((b, tq, kv_heads, group, e / heads))?
        .permute((0, 2, 3, 1, 4))?
        .reshape((b, kv_heads, group * tq, e / heads))?;
    let scores = q.matmul(&split_heads(k, kv_heads)?.t()?)?;
    let tk = scores.dim(3)?;
    scores.reshape((b, heads, tq, tk))
}

/// [`attention_context`] in candle's ops, a group's probabilities as one matrix.
pub(super) fn written_context(
    probs: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    let group = group(heads, kv_heads)?;
    if group == 1 {
        return merge_heads(&probs.matmul(&split_heads(v, heads)?)?);
    }
    let (b, h, tq, tk) = probs.dims4()?;
    if h != heads {
        candle_core::bail!(
            "attention: probs {:?} are not of {heads} heads",
            probs.dims()
        )
    }
    let v = split_heads(v, kv_heads)?;
    let d = v.dim(3)?;
    probs
        .reshape((b, kv_heads, group * tq, tk))?
        .matmul(&v)?
        .reshape((b, kv_heads, group, tq, d))?
        .permute((0, 3, 1, 2, 4))?
        .reshape((b, tq, heads * d))
}

/// `[b, t, heads·d]` → `[b, heads, t, d]` (contiguous).
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, size) = x.dims3()?;
    x.reshape((b, t, heads, size / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[b, heads, t, d]` → `[b, t, heads·d]`.
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, heads, t, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, t, heads * d))
}

/// One output buffer and the length of each batch entry's part of it.
type Out<'a> = (&'a mut Fresh, usize);

/// Multiply-adds (all batch entries together) from which [`per_batch`] hands entries to
/// rayon's threads: about a millisecond of one core's work, against tens of
/// microseconds of hand-off.
const PARALLEL_BATCH_WORK: usize = 1 << 22;

/// Runs `f(bi, part, part2)` for every batch entry `bi` with its own parts of one or two
/// output buffers: on rayon's threads, one entry each, when the work (`work`
/// multiply-adds an entry) is worth it ([`PARALLEL_BATCH_WORK`]), in order otherwise. The parts are disjoint, so the entries
/// never meet, and each computes alone: results do not depend on the threads.
fn per_batch(
    b: usize,
    work: usize,
    (first, n1): Out<'_>,
    second: Option<Out<'_>>,
    f: impl Fn(usize, &mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]) -> Result<()> + Sync,
) -> Result<()> {
    let parts1: Vec<&mut [MaybeUninit<f32>]> = first.spare().chunks_mut(n1.max(1)).collect();
    let parts2: Vec<&mut [MaybeUninit<f32>]> = match second {
        Some((buf, n2)) => buf.spare().chunks_mut(n2.max(1)).collect(),
        None => (0..b).map(|_| &mut [][..]).collect(),
    };
    if parts1.len() != b || parts2.len() != b {
        candle_core::bail!("attention: output parts do not match the batch")
    }
    let jobs = parts1.into_iter().zip(parts2).enumerate();
    if b < 2 || b.saturating_mul(work) < PARALLEL_BATCH_WORK {
        return jobs.into_iter().try_for_each(|(bi, (x, y))| f(bi, x, y));
    }
    use rayon::prelude::*;
    jobs.collect::<Vec<_>>()
        .into_par_iter()
        .try_for_each(|(bi, (x, y))| f(bi, x, y))
}

pub(super) struct AttentionScores {
    pub(super) heads: usize,
    pub(super) group: usize,
}

impl CustomOp2 for AttentionScores {
    fn name(&self) -> &'static str {
        "kiln-attention-scores"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k) = (s1.as_slice::<f32>()?, s2.as_slice::<f32>()?);
        let (Some(((b, tq, e), sq, oq)), Some(((bk, tk, ek), sk, ok))) =
            (bte_layout(l1), bte_layout(l2))
        else {
            candle_core::bail!("{}: unexpected layouts", self.name())
        };
        if b != bk || e != ek * self.group {
            candle_core::bail!(
                "{}: q {:?} and k {:?} differ",
                self.name(),
                l1.dims(),
                l2.dims()
            )
        }
        let (h, d) = (self.heads, e / self.heads);
        let mut out = Fresh::new(b * h * tq * tk);
        per_batch(
            b,
            h * tq * tk * d,
            (&mut out, h * tq * tk),
            None,
            |bi, o, _| {
                for hd in 0..h {
                    let om = Mat {
                        off: hd * tq * tk,
                        rs: tk,
                        cs: 1,
                    };
                    let kt = head(ok, sk, bi, hd / self.group, d).t();
                    gemm_raw(
                        (tq, tk, d),
                        (o, om),
                        (q, head(oq, sq, bi, hd, d)),
                        (k, kt),
                        false,
                    )?;
                }
                Ok(())
            },
        )?;
        // SAFETY: each batch entry's heads write its whole [h, tq, tk] block.
        let out = unsafe { out.finish() };
        Ok((CpuStorage::F32(out), Shape::from((b, h, tq, tk))))
    }

    /// dQ = dS·K and dK = dSᵀ·Q per head, written straight into `[b, t, heads·d]`; a key
    /// head's dK sums over its group, in head order.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, tq, e) = q.dims3()?;
        let (tk, ek) = (k.dim(1)?, k.dim(2)?);
        let (h, d, group) = (self.heads, e / self.heads, self.group);
        let mut dq = Fresh::new(b * tq * e);
        let mut dk = Fresh::new(b * tk * ek);
        read_strided(q, |qs, oq, sq| {
            read_strided(k, |ks, ok, sk| {
                read(grad, |ds| {
                    let outs = (&mut dq, tq * e);
                    per_batch(
                        b,
                        2 * h * tq * tk * d,
                        outs,
                        Some((&mut dk, tk * ek)),
                        |bi, dqb, dkb| {
                            for hd in 0..h {
                                let g = Mat {
                                    off: (bi * h + hd) * tq * tk,
                                    rs: tk,
                                    cs: 1,
                                };
                                let qm = head(oq, sq, bi, hd, d);
                                let km = head(ok, sk, bi, hd / group, d);
                                let dqm = head(0, (0, e), 0, hd, d);
                                let dkm = head(0, (0, ek), 0, hd / group, d);
                                gemm_raw((tq, d, tk), (dqb, dqm), (ds, g), (ks, km), false)?;
                                // The first head of a group writes, the others add.
                                let (gt, qv) = ((ds, g.t()), (qs, qm));
                                gemm_raw((tk, d, tq), (dkb, dkm), gt, qv, hd % group != 0)?;
                            }
                            Ok(())
                        },
                    )
                })
            })
        })?;
        // SAFETY: every head writes its block of dq, the first head of each group its
        // key head's block of dk.
        let (dq, dk) = unsafe { (dq.finish(), dk.finish()) };
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, tq, e), dev)?),
            Some(Tensor::from_vec(dk, (b, tk, ek), dev)?),
        ))
    }
}

pub(super) struct AttentionContext {
    pub(super) heads: usize,
    pub(super) group: usize,
}

impl CustomOp2 for AttentionContext {
    fn name(&self) -> &'static str {
        "kiln-attention-context"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = slice(s1, l1, self.name())?;
        let v = s2.as_slice::<f32>()?;
        let (&[b, h, tq, tk], Some(((bv, tv, ev), sv, ov))) = (l1.dims(), bte_layout(l2)) else {
            candle_core::bail!("{}: unexpected layouts", self.name())
        };
        if b != bv || tk != tv || h != self.heads || !(ev * self.group).is_multiple_of(h) {
            candle_core::bail!(
                "{}: probs {:?} and v {:?} differ",
                self.name(),
                l1.dims(),
                l2.dims()
            )
        }
        // The output has `heads` heads of v's width `d`.
        let (d, group) = (ev * self.group / h, self.group);
        let e = h * d;
        let mut out = Fresh::new(b * tq * e);
        per_batch(b, h * tq * tk * d, (&mut out, tq * e), None, |bi, o, _| {
            for hd in 0..h {
                let pm = Mat {
                    off: (bi * h + hd) * tq * tk,
                    rs: tk,
                    cs: 1,
                };
                let om = head(0, (0, e), 0, hd, d);
                let vm = head(ov, sv, bi, hd / group, d);
                gemm_raw((tq, d, tk), (o, om), (p, pm), (v, vm), false)?;
            }
            Ok(())
        })?;
        // SAFETY: each batch entry's heads write all of its [tq, e] rows.
        let out = unsafe { out.finish() };
        Ok((CpuStorage::F32(out), Shape::from((b, tq, e))))
    }

    /// dP = dC·Vᵀ and dV = Pᵀ·dC per head; a value head's dV sums over its group, in
    /// head order.
    fn bwd(
        &self,
        probs: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, h, tq, tk) = probs.dims4()?;
        let ev = v.dim(2)?;
        let (d, group) = (ev * self.group / h, self.group);
        let e = h * d;
        let mut dp = Fresh::new(b * h * tq * tk);
        let mut dv = Fresh::new(b * tk * ev);
        read(probs, |ps| {
            read_strided(v, |vs, ov, sv| {
                read(grad, |dc| {
                    let outs = (&mut dp, h * tq * tk);
                    per_batch(
                        b,
                        2 * h * tq * tk * d,
                        outs,
                        Some((&mut dv, tk * ev)),
                        |bi, dpb, dvb| {
                            for hd in 0..h {
                                let pm = Mat {
                                    off: (bi * h + hd) * tq * tk,
                                    rs: tk,
                                    cs: 1,
                                };
                                let dpm = Mat {
                                    off: hd * tq * tk,
                                    rs: tk,
                                    cs: 1,
                                };
                                let gm = head(0, (tq * e, e), bi, hd, d);
                                let vm = head(ov, sv, bi, hd / group, d);
                                gemm_raw((tq, tk, d), (dpb, dpm), (dc, gm), (vs, vm.t()), false)?;
                                let dvm = head(0, (0, ev), 0, hd / group, d);
                                // The first head of a group writes, the others add.
                                let (pt, cv) = ((ps, pm.t()), (dc, gm));
                                gemm_raw((tk, d, tq), (dvb, dvm), pt, cv, hd % group != 0)?;
                            }
                            Ok(())
                        },
                    )
                })
            })
        })?;
        // SAFETY: every head writes its block of dp, the first head of each group its
        // value head's block of dv.
        let (dp, dv) = unsafe { (dp.finish(), dv.finish()) };
        let dev = v.device();
        Ok((
            Some(Tensor::from_vec(dp, (b, h, tq, tk), dev)?),
            Some(Tensor::from_vec(dv, (b, tk, ev), dev)?),
        ))
    }
}
