//! Attention scores and context for every head straight from the projections' `[b, t,
//! heads·d]` layout, without splitting into heads or copying.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::gemm::{Mat, gemm_into};
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

/// Attention scores `q·kᵀ` of every head, `[b, heads, tq, tk]`, from `q` `[b, tq,
/// heads·d]` and `k` `[b, tk, heads·d]` as the projections give them (views such as
/// GPT-2's slices of its fused projection included): no split into heads, no copies.
pub(crate) fn attention_scores(q: &Tensor, k: &Tensor, heads: usize) -> Result<Tensor> {
    let fits = |t: &Tensor| t.rank() == 3 && t.stride()[2] == 1;
    if !fusable(&[q, k]) || !fits(q) || !fits(k) || heads == 0 || q.dim(2)? % heads != 0 {
        return split_heads(q, heads)?.matmul(&split_heads(k, heads)?.t()?);
    }
    q.apply_op2(k, AttentionScores { heads })
}

/// The attention output `probs·v` of every head, merged back into `[b, tq, heads·d]`,
/// from `probs` `[b, heads, tq, tk]` and `v` `[b, tk, heads·d]`.
pub(crate) fn attention_context(probs: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let fits = v.rank() == 3 && v.stride()[2] == 1 && probs.rank() == 4;
    if !fusable(&[probs, v]) || !fits || heads == 0 || v.dim(2)? % heads != 0 {
        return merge_heads(&probs.matmul(&split_heads(v, heads)?)?);
    }
    probs.contiguous()?.apply_op2(v, AttentionContext { heads })
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

struct AttentionScores {
    heads: usize,
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
        if b != bk || e != ek {
            candle_core::bail!(
                "{}: q {:?} and k {:?} differ",
                self.name(),
                l1.dims(),
                l2.dims()
            )
        }
        let (h, d) = (self.heads, e / self.heads);
        let mut out = vec![0f32; b * h * tq * tk];
        for bi in 0..b {
            for hd in 0..h {
                let o = Mat {
                    off: (bi * h + hd) * tq * tk,
                    rs: tk,
                    cs: 1,
                };
                let kt = head(ok, sk, bi, hd, d).t();
                gemm_into((tq, tk, d), &mut out, o, q, head(oq, sq, bi, hd, d), k, kt)?;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, h, tq, tk))))
    }

    /// dQ = dS·K and dK = dSᵀ·Q per head, written straight into `[b, t, heads·d]`.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, tq, e) = q.dims3()?;
        let tk = k.dim(1)?;
        let (h, d) = (self.heads, e / self.heads);
        let mut dq = vec![0f32; b * tq * e];
        let mut dk = vec![0f32; b * tk * e];
        read_strided(q, |qs, oq, sq| {
            read_strided(k, |ks, ok, sk| {
                read(grad, |ds| {
                    for bi in 0..b {
                        for hd in 0..h {
                            let g = Mat {
                                off: (bi * h + hd) * tq * tk,
                                rs: tk,
                                cs: 1,
                            };
                            let (qm, km) = (head(oq, sq, bi, hd, d), head(ok, sk, bi, hd, d));
                            let dqm = head(0, (tq * e, e), bi, hd, d);
                            let dkm = head(0, (tk * e, e), bi, hd, d);
                            gemm_into((tq, d, tk), &mut dq, dqm, ds, g, ks, km)?;
                            gemm_into((tk, d, tq), &mut dk, dkm, ds, g.t(), qs, qm)?;
                        }
                    }
                    Ok(())
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, tq, e), dev)?),
            Some(Tensor::from_vec(dk, (b, tk, e), dev)?),
        ))
    }
}

struct AttentionContext {
    heads: usize,
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
        let (&[b, h, tq, tk], Some(((bv, tv, e), sv, ov))) = (l1.dims(), bte_layout(l2)) else {
            candle_core::bail!("{}: unexpected layouts", self.name())
        };
        if b != bv || tk != tv || h != self.heads {
            candle_core::bail!(
                "{}: probs {:?} and v {:?} differ",
                self.name(),
                l1.dims(),
                l2.dims()
            )
        }
        let d = e / h;
        let mut out = vec![0f32; b * tq * e];
        for bi in 0..b {
            for hd in 0..h {
                let pm = Mat {
                    off: (bi * h + hd) * tq * tk,
                    rs: tk,
                    cs: 1,
                };
                let om = head(0, (tq * e, e), bi, hd, d);
                gemm_into((tq, d, tk), &mut out, om, p, pm, v, head(ov, sv, bi, hd, d))?;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, tq, e))))
    }

    /// dP = dC·Vᵀ and dV = Pᵀ·dC per head.
    fn bwd(
        &self,
        probs: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, h, tq, tk) = probs.dims4()?;
        let e = v.dim(2)?;
        let d = e / h;
        let mut dp = vec![0f32; b * h * tq * tk];
        let mut dv = vec![0f32; b * tk * e];
        read(probs, |ps| {
            read_strided(v, |vs, ov, sv| {
                read(grad, |dc| {
                    for bi in 0..b {
                        for hd in 0..h {
                            let pm = Mat {
                                off: (bi * h + hd) * tq * tk,
                                rs: tk,
                                cs: 1,
                            };
                            let gm = head(0, (tq * e, e), bi, hd, d);
                            let vm = head(ov, sv, bi, hd, d);
                            gemm_into((tq, tk, d), &mut dp, pm, dc, gm, vs, vm.t())?;
                            let dvm = head(0, (tk * e, e), bi, hd, d);
                            gemm_into((tk, d, tq), &mut dv, dvm, ps, pm.t(), dc, gm)?;
                        }
                    }
                    Ok(())
                })
            })
        })?;
        let dev = v.device();
        Ok((
            Some(Tensor::from_vec(dp, (b, h, tq, tk), dev)?),
            Some(Tensor::from_vec(dv, (b, tk, e), dev)?),
        ))
    }
}
