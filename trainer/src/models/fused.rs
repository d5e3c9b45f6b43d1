//! Fused CPU kernels, with their backward passes, for the hot spots of training small
//! transformers on candle's CPU backend.
//!
//! Written out in candle's elementary ops, a LayerNorm is ten operations forward and
//! twenty backward, each a pass over memory and a fresh buffer; and the gradient of
//! every tensor broadcast over leading dimensions (a bias, LayerNorm's weight, the
//! position embeddings) is a sum over those dimensions, which candle's CPU backend
//! computes with a division per element. Profiling `kiln train` on the bundled data put
//! a quarter of the time in that sum alone (`benches/README.md`, "Training speed").
//!
//! Each function here computes the same values as its written-out form (candle's
//! elementary ops, [`written_out`] or the function's fallback; up to float rounding:
//! tested against it, values and gradients, and against torch's autograd in
//! `tests/hf_models.rs`), as one candle custom op whose backward is one more pass. They
//! apply to f32 tensors on the CPU; anything else (CUDA, Metal, 16-bit) takes the
//! written-out form, whose kernels those backends have. Every output is computed in an
//! order fixed by the sizes alone (large tensors in fixed blocks over rayon's threads,
//! [`by_rows`]), so results are the same on every run and machine, as bit-for-bit
//! resume needs.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};

/// Whether the fused kernels apply to these tensors.
fn fusable(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// The f32 elements of a contiguous CPU storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: the input is not contiguous"),
    }
}

/// A tensor's elements as a vector (one copy on the CPU).
fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Calls `f` with a CPU f32 tensor's elements in row-major order: in place when the
/// tensor is contiguous, else from a copy. `f`'s errors pass through, so reads nest.
fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return f(&cpu.as_slice::<f32>()?[a..b]);
        }
    }
    f(&host(t)?)
}

/// Calls `f(elements, start, (s0, s1))` with a CPU f32 `[b, t, e]` tensor whose last
/// dimension is contiguous, in place; other layouts from a contiguous copy.
fn read_strided<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32], usize, (usize, usize)) -> Result<R>,
) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((_, strides, start))) =
            (&*storage, bte_layout(layout))
        {
            return f(cpu.as_slice::<f32>()?, start, strides);
        }
    }
    let (_, t1, e) = t.dims3()?;
    f(&host(t)?, 0, (t1 * e, e))
}

/// Sums the rows of `x` seen as `[n / width, width]`: the gradient of a tensor
/// broadcast over `x`'s leading dimensions. Row by row, in order.
fn sum_rows(x: &[f32], width: usize) -> Vec<f32> {
    let mut acc = vec![0f32; width];
    for row in x.chunks_exact(width) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
    acc
}

/// Elements from which the fused kernels split their work over rayon's threads. At the
/// bundled models' sizes (at most 2^18 elements a tensor) handing work to rayon costs
/// more than the second core gives; a larger model's GELU or LayerNorm alone would
/// otherwise keep one core busy while the others wait.
const PARALLEL_ELEMENTS: usize = 1 << 20;

/// Runs `task` over `rows` rows of `width` elements: once over all of them when they are
/// few, else over blocks of about 2^16 elements on rayon's threads, results in block
/// order. The blocks depend only on the sizes, never on the thread count, so results are
/// the same on every machine.
fn by_rows<T: Send>(
    rows: usize,
    width: usize,
    task: impl Fn(std::ops::Range<usize>) -> T + Sync,
) -> Vec<T> {
    if rows.saturating_mul(width) < PARALLEL_ELEMENTS {
        return vec![task(0..rows)];
    }
    use rayon::prelude::*;
    let block = ((1usize << 16) / width.max(1)).max(1);
    (0..rows.div_ceil(block))
        .into_par_iter()
        .map(|i| task(i * block..((i + 1) * block).min(rows)))
        .collect()
}

/// The blocks of [`by_rows`] joined (no copy when there is one).
fn joined(mut parts: Vec<Vec<f32>>) -> Vec<f32> {
    if parts.len() == 1 {
        parts.pop().unwrap_or_default()
    } else {
        parts.concat()
    }
}

/// `x + b` where `b`'s shape is the trailing part of `x`'s (a bias `[out]` over
/// `[…, out]`, position embeddings `[t, h]` over `[b, t, h]`): `broadcast_add`, whose
/// backward sums the gradient over the leading dimensions in one sequential pass.
pub(crate) fn add_trailing(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (xd, bd) = (x.dims(), b.dims());
    let trailing = bd.len() <= xd.len() && xd[xd.len() - bd.len()..] == *bd;
    if !trailing || !fusable(&[x, b]) || b.elem_count() == 0 {
        return x.broadcast_add(b);
    }
    x.contiguous()?.apply_op2(&b.contiguous()?, AddTrailing)
}

struct AddTrailing;

impl CustomOp2 for AddTrailing {
    fn name(&self) -> &'static str {
        "kiln-add-trailing"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let b = slice(s2, l2, self.name())?;
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(b.len()) {
            out.extend(row.iter().zip(b).map(|(x, b)| x + b));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = read(grad, |g| Ok(sum_rows(g, b.elem_count())))?;
        let db = Tensor::from_vec(db, b.shape(), b.device())?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// A dense layer over the last dimension of `x`: `x · Wᵀ + b` for torch's `Linear`
/// (`w` is `[out, in]`), `x · W + b` for GPT-2's `Conv1D` (`transposed`, `w` is
/// `[in, out]`). One gemm writes onto the bias rows; the backward is two gemms and a
/// row sum. Written out, the same layer is two reshapes, a transpose, a matmul and a
/// broadcast add, and candle's backward allocates, zeroes and adds a gradient for each.
pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    transposed: bool,
) -> Result<Tensor> {
    let written = || {
        let wt = if transposed { w.clone() } else { w.t()? };
        let y = super::layers::matmul_last(x, &wt)?;
        match b {
            Some(b) => add_trailing(&y, b),
            None => Ok(y),
        }
    };
    let (rows_w, cols_w) = match w.dims() {
        [r, c] => (*r, *c),
        _ => return written(),
    };
    let (input, output) = if transposed {
        (rows_w, cols_w)
    } else {
        (cols_w, rows_w)
    };
    let fits = x.dims().last() == Some(&input)
        && b.is_none_or(|b| b.dims() == [output])
        && input > 0
        && output > 0;
    if !fits || !fusable(&[x, w]) || !b.is_none_or(|b| fusable(&[b])) {
        return written();
    }
    let op = LinearOp { transposed };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        // Without a bias the third input is a zero bias that needs no gradient.
        None => {
            let zero = Tensor::zeros(output, DType::F32, x.device())?;
            x.apply_op3(&w, &zero, op)
        }
    }
}

struct LinearOp {
    transposed: bool,
}

impl LinearOp {
    /// The weight as the `[input, output]` right factor of `x · W(ᵀ)`: the transpose of
    /// a row-major `[output, input]` Linear weight, or Conv1D's row-major weight itself.
    fn w_as_rhs(&self, input: usize, output: usize) -> Mat {
        if self.transposed {
            row_major(output)
        } else {
            row_major(input).t()
        }
    }
}

/// A row-major matrix of `cols` columns at the start of its buffer.
fn row_major(cols: usize) -> Mat {
    Mat {
        off: 0,
        rs: cols,
        cs: 1,
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "kiln-linear"
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
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let b = slice(s3, l3, self.name())?;
        let output = b.len();
        let input = w.len() / output;
        let rows = x.len() / input;
        // dst starts as the bias in every row; gemm adds x · W(ᵀ) onto it.
        let mut dst = Vec::with_capacity(rows * output);
        for _ in 0..rows {
            dst.extend_from_slice(b);
        }
        gemm_with(
            (rows, output, input),
            (&mut dst, row_major(output)),
            (x, row_major(input)),
            (w, self.w_as_rhs(input, output)),
            true,
        )?;
        let mut shape = l1.shape().dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = output;
        }
        Ok((CpuStorage::F32(dst), Shape::from(shape)))
    }

    /// With g = dy as [rows, out] and x as [rows, in]: dx = g·W (Conv1D: g·Wᵀ),
    /// dW = gᵀ·x (Conv1D: xᵀ·g), db = Σ rows of g.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let output = b.elem_count();
        let input = w.elem_count() / output;
        let rows = x.elem_count() / input;
        let mut dx = vec![0f32; rows * input];
        let mut dw = vec![0f32; input * output];
        let wm = self.w_as_rhs(input, output); // W(ᵀ) as the [input, output] right factor
        let (gm, xm) = (row_major(output), row_major(input));
        let dwm = if self.transposed {
            row_major(output) // dW [input, output] = xᵀ·g
        } else {
            row_major(input).t() // dW [output, input], written as its transpose xᵀ·g
        };
        let db = read(x, |xs| {
            read(w, |ws| {
                read(grad, |gs| {
                    gemm_with(
                        (rows, input, output),
                        (&mut dx, xm),
                        (gs, gm),
                        (ws, wm.t()),
                        false,
                    )?;
                    gemm_with(
                        (input, output, rows),
                        (&mut dw, dwm),
                        (xs, xm.t()),
                        (gs, gm),
                        false,
                    )?;
                    Ok(sum_rows(gs, output))
                })
            })
        })?;
        let dev = x.device();
        let (dx, dw) = (
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(dw, w.shape(), dev)?,
        );
        let db = Tensor::from_vec(db, output, b.device())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// A matrix inside a buffer: where it starts and its row and column strides.
#[derive(Clone, Copy, Debug)]
struct Mat {
    off: usize,
    rs: usize,
    cs: usize,
}

impl Mat {
    fn t(self) -> Mat {
        Mat {
            off: self.off,
            rs: self.cs,
            cs: self.rs,
        }
    }
    /// One past the largest index of a `rows × cols` matrix.
    fn end(self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return self.off;
        }
        self.off + (rows - 1) * self.rs + (cols - 1) * self.cs + 1
    }
}

/// `dst (m×n) = a (m×k) · b (k×n)` on one thread (the matrices of attention are small
/// and many; candle's matmul splits each over threads, which costs more than it gives).
fn gemm_into(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    d: Mat,
    a: &[f32],
    am: Mat,
    b: &[f32],
    bm: Mat,
) -> Result<()> {
    gemm_with(mnk, (dst, d), (a, am), (b, bm), false)
}

/// candle's thread count, asked once: without `RAYON_NUM_THREADS` set, candle's
/// `get_num_threads` counts the physical cores from `/proc/cpuinfo` on every call.
fn compute_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// Work (multiply-adds) below which a gemm runs on one thread: at this size the hand-off
/// to rayon's workers, which then spin for more work beside the main thread, costs more
/// than the second core gives (measured on the bundled BERT: 10% of a step on 2 cores).
const PARALLEL_GEMM_WORK: usize = 1 << 25;

/// `dst (m×n) (+)= a (m×k) · b (k×n)` (`accumulate`: add onto dst), on candle's threads
/// when the product is large ([`PARALLEL_GEMM_WORK`]). An out-of-bounds view is an
/// error, never a panic or a stray access.
fn gemm_with(
    (m, n, k): (usize, usize, usize),
    (dst, d): (&mut [f32], Mat),
    (a, am): (&[f32], Mat),
    (b, bm): (&[f32], Mat),
    accumulate: bool,
) -> Result<()> {
    if d.end(m, n) > dst.len() || am.end(m, k) > a.len() || bm.end(k, n) > b.len() {
        candle_core::bail!("kiln: a matrix view runs past its buffer")
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[d.off + i * d.rs + j * d.cs] = 0.0;
                }
            }
        }
        return Ok(());
    }
    let threads = compute_threads();
    let parallelism = if threads > 1 && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_GEMM_WORK
    {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the bounds check above keeps every element gemm reads or writes inside
    // `a`, `b` and `dst` (the largest index of each view is within its slice); dst is a
    // distinct &mut slice, so it aliases neither input; strides fit isize (they index
    // existing slices). With `accumulate` gemm reads dst, which is initialised.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(d.off),
            d.cs as isize,
            d.rs as isize,
            accumulate,
            a.as_ptr().add(am.off),
            am.cs as isize,
            am.rs as isize,
            b.as_ptr().add(bm.off),
            bm.cs as isize,
            bm.rs as isize,
            if accumulate { 1.0f32 } else { 0.0f32 },
            1.0f32,
            false,
            false,
            false,
            parallelism,
        )
    }
    Ok(())
}

/// Head `hd` of batch entry `bi` of a `[b, t, heads·d]` tensor with strides `(s0, s1, 1)`
/// from `start`: a `t × d` matrix.
fn head(start: usize, stride: (usize, usize), bi: usize, hd: usize, d: usize) -> Mat {
    Mat {
        off: start + bi * stride.0 + hd * d,
        rs: stride.1,
        cs: 1,
    }
}

/// A `[b, t, e]` tensor's shape, its first two strides (the last is 1) and its start.
type BteLayout = ((usize, usize, usize), (usize, usize), usize);

/// The shape `[b, t, e]` and strides of a 3-D tensor whose last dimension is contiguous.
fn bte_layout(l: &Layout) -> Option<BteLayout> {
    match (l.shape().dims(), l.stride()) {
        ([b, t, e], [s0, s1, 1]) => Some(((*b, *t, *e), (*s0, *s1), l.start_offset())),
        _ => None,
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

/// LayerNorm over the last dimension (biased variance, as torch) of `x` with weight `w`
/// and bias `b` (all of one dtype).
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dims().last().copied().unwrap_or(0);
    if !fusable(&[x, w, b]) || h == 0 || w.dims() != [h] || b.dims() != [h] {
        return written_out::layer_norm(x, w, b, eps);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )
}

/// Mean and 1/√(var + eps) of one row, as the written-out form computes them.
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "kiln-layer-norm"
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
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let b = slice(s3, l3, self.name())?;
        let h = w.len();
        let out = joined(by_rows(x.len() / h, h, |rows| {
            let mut out = Vec::with_capacity(rows.len() * h);
            for row in x[rows.start * h..rows.end * h].chunks_exact(h) {
                let (mean, rstd) = row_stats(row, self.eps);
                out.extend(
                    row.iter()
                        .zip(w.iter().zip(b))
                        .map(|(v, (w, b))| (v - mean) * rstd * w + b),
                );
            }
            out
        }));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With x̂ = (x − mean)·rstd and g = dy·w: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),
    /// dw = Σ dy·x̂ and db = Σ dy over the rows.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ws = host(w)?;
        let h = ws.len();
        let n = h as f32;
        // Per block of rows: dx of its rows and its part of dw and db, summed in order.
        let parts = read(x, |xs| {
            read(grad, |dy| {
                Ok(by_rows(xs.len() / h.max(1), h, |rows| {
                    let mut dx = Vec::with_capacity(rows.len() * h);
                    let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
                    let (mut xhat, mut g) = (vec![0f32; h], vec![0f32; h]);
                    let span = rows.start * h..rows.end * h;
                    for (row, dyr) in xs[span.clone()]
                        .chunks_exact(h)
                        .zip(dy[span].chunks_exact(h))
                    {
                        let (mean, rstd) = row_stats(row, self.eps);
                        let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                        for i in 0..h {
                            xhat[i] = (row[i] - mean) * rstd;
                            g[i] = dyr[i] * ws[i];
                            sum_g += g[i];
                            sum_gx += g[i] * xhat[i];
                            dw[i] += dyr[i] * xhat[i];
                            db[i] += dyr[i];
                        }
                        let (mean_g, mean_gx) = (sum_g / n, sum_gx / n);
                        dx.extend((0..h).map(|i| rstd * (g[i] - mean_g - xhat[i] * mean_gx)));
                    }
                    (dx, dw, db)
                }))
            })
        })?;
        let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
        let mut dxs = Vec::with_capacity(parts.len());
        for (dx, pw, pb) in parts {
            dw.iter_mut().zip(&pw).for_each(|(a, v)| *a += v);
            db.iter_mut().zip(&pb).for_each(|(a, v)| *a += v);
            dxs.push(dx);
        }
        let dx = joined(dxs);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

/// softmax(x · scale + bias) over the last dimension, for attention scores `x` and a
/// constant additive mask `bias` that broadcasts to `x`'s shape: one pass forward and
/// one backward, where the written-out form takes an affine, a broadcast add (with a
/// gradient for the mask that nothing uses) and the softmax, each with its backward.
pub(crate) fn softmax_scaled_biased(x: &Tensor, scale: f64, bias: &Tensor) -> Result<Tensor> {
    let h = x.dims().last().copied().unwrap_or(0);
    if !fusable(&[x, bias]) || h == 0 {
        return written_out::softmax_last(&(x * scale)?.broadcast_add(bias)?);
    }
    // A view of the mask in x's shape (stride 0 where it broadcasts).
    let bias = bias.broadcast_as(x.shape())?;
    x.contiguous()?.apply_op1(ScaledBiasedSoftmax {
        scale: scale as f32,
        bias,
    })
}

struct ScaledBiasedSoftmax {
    scale: f32,
    bias: Tensor,
}

impl CustomOp1 for ScaledBiasedSoftmax {
    fn name(&self) -> &'static str {
        "kiln-scaled-biased-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let dims = l.shape().dims();
        let h = dims.last().copied().unwrap_or(1).max(1);
        let (storage, bl) = self.bias.storage_and_layout();
        let candle_core::Storage::Cpu(bias) = &*storage else {
            candle_core::bail!("{}: the mask is not on the CPU", self.name())
        };
        let bias = bias.as_slice::<f32>()?;
        let strides = bl.stride();
        let (lead, last) = strides.split_at(strides.len() - 1);
        let last = last[0];
        let out = joined(by_rows(x.len() / h, h, |rows| {
            let mut out = Vec::with_capacity(rows.len() * h);
            for r in rows {
                let row = &x[r * h..(r + 1) * h];
                // The mask's offset for row r: its index in the leading dimensions, by
                // stride.
                let (mut rest, mut at) = (r, bl.start_offset());
                for (d, stride) in dims[..dims.len() - 1].iter().zip(lead).rev() {
                    at += (rest % d) * stride;
                    rest /= d;
                }
                let start = out.len();
                out.extend(
                    row.iter()
                        .enumerate()
                        .map(|(i, v)| v * self.scale + bias[at + i * last]),
                );
                let max = out[start..]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                out[start..].iter_mut().for_each(|e| *e = (*e - max).exp());
                let sum: f32 = out[start..].iter().sum();
                out[start..].iter_mut().for_each(|e| *e /= sum);
            }
            out
        }));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// dx = scale·y·(dy − Σ dy·y) per row; the mask is a constant.
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let h = x.dims().last().copied().unwrap_or(1).max(1);
        let dx = joined(read(res, |y| {
            read(grad, |dy| {
                Ok(by_rows(y.len() / h, h, |rows| {
                    let span = rows.start * h..rows.end * h;
                    let mut dx = Vec::with_capacity(span.len());
                    for (yr, dyr) in y[span.clone()]
                        .chunks_exact(h)
                        .zip(dy[span].chunks_exact(h))
                    {
                        let dot: f32 = yr.iter().zip(dyr).map(|(y, d)| y * d).sum();
                        dx.extend(yr.iter().zip(dyr).map(|(y, d)| self.scale * y * (d - dot)));
                    }
                    dx
                }))
            })
        })?);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// GELU, exact (`erf`, transformers' `gelu`) or with the tanh approximation
/// (`gelu_new`). candle's backward of its GELU ops is about ten tensor operations (and
/// rounds 1/√(2π) to 0.398942); this one is one pass.
pub(crate) fn gelu(x: &Tensor, tanh: bool) -> Result<Tensor> {
    if !fusable(&[x]) {
        return if tanh { x.gelu() } else { x.gelu_erf() };
    }
    x.contiguous()?.apply_op1(Gelu {
        tanh,
        saved: std::sync::OnceLock::new(),
    })
}

/// One GELU of the graph. The forward pass keeps the transcendental part of each
/// element (tanh of the approximation's argument, or Φ(x) of the exact form) for the
/// backward pass, as torch keeps its intermediates, so the backward pass computes no
/// `tanh` or `erf` again.
struct Gelu {
    tanh: bool,
    saved: std::sync::OnceLock<Vec<f32>>,
}

/// √(2/π), the tanh approximation's scale.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// tanh from one `exp`: (1 − e)/(1 + e) with e = e^(−2|u|), the sign put back. glibc's
/// `tanhf` (through `expm1f`) was a quarter of a GPT-2 training step; this is within
/// 2·10⁻⁷ of tanh everywhere (tested), which is all `1 + tanh` in GELU can resolve.
fn fast_tanh(u: f32) -> f32 {
    let e = (-2.0 * u.abs()).exp();
    ((1.0 - e) / (1.0 + e)).copysign(u)
}

impl Gelu {
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
        let blocks = by_rows(x.len(), 1, |span| {
            let parts: Vec<f32> = x[span.clone()].iter().map(|&v| self.part(v)).collect();
            let out: Vec<f32> = x[span]
                .iter()
                .zip(&parts)
                .map(|(&v, &p)| self.value(v, p))
                .collect();
            (parts, out)
        });
        let (parts, out): (Vec<_>, Vec<_>) = blocks.into_iter().unzip();
        let (parts, out) = (joined(parts), joined(out));
        // Run once per op; a second run (there is none) would recompute in `bwd`.
        let _ = self.saved.set(parts);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = joined(read(x, |xs| {
            read(grad, |dy| {
                let saved = self.saved.get().filter(|p| p.len() == xs.len());
                Ok(by_rows(xs.len(), 1, |span| {
                    let (xs, dy) = (&xs[span.clone()], &dy[span.clone()]);
                    match saved {
                        Some(parts) => xs
                            .iter()
                            .zip(&parts[span])
                            .zip(dy)
                            .map(|((&v, &p), d)| d * self.slope(v, p))
                            .collect::<Vec<f32>>(),
                        None => xs
                            .iter()
                            .zip(dy)
                            .map(|(&v, d)| d * self.slope(v, self.part(v)))
                            .collect(),
                    }
                }))
            })
        })?);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

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

/// The same functions in candle's elementary ops, for the devices and dtypes the fused
/// kernels do not cover.
pub(crate) mod written_out {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Deterministic, varied values (no RNG needed).
    fn values(shape: &[usize], seed: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.7311 + seed).sin() * 2.5) + (i % 7) as f32 * 0.1)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Values and the gradients of every input under a weighted sum (so that each output
    /// element gets a different upstream gradient), for `f` applied to `inputs`.
    fn value_and_grads(
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let weights = values(y.dims(), 3.0);
        let grads = (&y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
        (y, g)
    }

    fn assert_same(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
        tol: f32,
    ) {
        let (y1, g1) = value_and_grads(inputs, fused);
        let (y2, g2) = value_and_grads(inputs, reference);
        let d = max_diff(&y1, &y2);
        assert!(d <= tol, "values differ by {d}");
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            let d = max_diff(a, b);
            assert!(d <= tol, "gradients of input {i} differ by {d}");
        }
    }

    #[test]
    fn layer_norm_matches_the_written_out_form() {
        let x = values(&[3, 5, 16], 0.0);
        let w = (values(&[16], 1.0) * 0.5).unwrap();
        let b = values(&[16], 2.0);
        assert_same(
            &[x, w, b],
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-12),
            |t| written_out::layer_norm(&t[0], &t[1], &t[2], 1e-12),
            2e-5,
        );
    }

    #[test]
    fn scaled_biased_softmax_matches_the_written_out_form() {
        let x = (values(&[2, 3, 5, 8], 0.5) * 4.0).unwrap();
        let min = f32::MIN;
        // A padding mask [b, 1, 1, t] (BERT) and a causal one [1, 1, t, t] (GPT-2).
        let pad: Vec<f32> = (0..16).map(|i| if i % 8 > 5 { min } else { 0.0 }).collect();
        let pad = Tensor::from_vec(pad, (2, 1, 1, 8), &Device::Cpu).unwrap();
        let causal: Vec<f32> = (0..40)
            .map(|i| if i % 8 > i / 8 + 3 { min } else { 0.0 })
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, 5, 8), &Device::Cpu).unwrap();
        for bias in [pad, causal] {
            assert_same(
                std::slice::from_ref(&x),
                |t| softmax_scaled_biased(&t[0], 0.125, &bias),
                |t| written_out::softmax_last(&(&t[0] * 0.125)?.broadcast_add(&bias)?),
                1e-6,
            );
        }
    }

    #[test]
    fn linear_matches_matmul_plus_bias_in_both_layouts() {
        let x = values(&[3, 4, 5], 0.0);
        let w = (values(&[6, 5], 1.0) * 0.3).unwrap(); // nn.Linear(5, 6): [out, in]
        let b = values(&[6], 2.0);
        let wt = w.t().unwrap().contiguous().unwrap(); // Conv1D(6, 5): [in, out]
        let reference = |t: &[Tensor], transposed: bool| {
            let w = if transposed { t[1].clone() } else { t[1].t()? };
            super::super::layers::matmul_last(&t[0], &w)?.broadcast_add(&t[2])
        };
        assert_same(
            &[x.clone(), w, b.clone()],
            |t| linear(&t[0], &t[1], Some(&t[2]), false),
            |t| reference(t, false),
            1e-5,
        );
        assert_same(
            &[x.clone(), wt, b],
            |t| linear(&t[0], &t[1], Some(&t[2]), true),
            |t| reference(t, true),
            1e-5,
        );
        // Without a bias.
        let w = values(&[2, 5], 4.0);
        assert_same(
            &[x, w],
            |t| linear(&t[0], &t[1], None, false),
            |t| super::super::layers::matmul_last(&t[0], &t[1].t()?),
            1e-5,
        );
    }

    #[test]
    fn gelu_matches_candles_both_forms() {
        let x = (values(&[5, 7], 0.0) * 1.6).unwrap();
        assert_same(
            std::slice::from_ref(&x),
            |t| gelu(&t[0], false),
            |t| t[0].gelu_erf(),
            2e-6,
        );
        assert_same(
            std::slice::from_ref(&x),
            |t| gelu(&t[0], true),
            |t| t[0].gelu(),
            2e-6,
        );
        for i in -20_000..=20_000 {
            let u = i as f32 * 1e-3;
            let d = (f64::from(fast_tanh(u)) - f64::from(u).tanh()).abs();
            assert!(d < 2e-7, "tanh({u}) off by {d}");
        }
        assert_eq!(fast_tanh(100.0), 1.0);
        assert_eq!(fast_tanh(-100.0), -1.0);
        assert_eq!(fast_tanh(0.0), 0.0);
    }

    #[test]
    fn attention_matmuls_match_split_heads_and_matmul() {
        let heads = 3;
        // GPT-2's case: q, k, v are slices of one fused projection (strided views).
        let qkv = values(&[2, 5, 3 * 12], 0.0);
        let (q, k, v) = (
            qkv.narrow(2, 0, 12).unwrap(),
            qkv.narrow(2, 12, 12).unwrap(),
            qkv.narrow(2, 24, 12).unwrap(),
        );
        let reference = |t: &[Tensor]| {
            let s = split_heads(&t[0], heads)?.matmul(&split_heads(&t[1], heads)?.t()?)?;
            let p = written_out::softmax_last(&s)?;
            merge_heads(&p.matmul(&split_heads(&t[2], heads)?)?)
        };
        let fused = |t: &[Tensor]| {
            let s = attention_scores(&t[0], &t[1], heads)?;
            let p = written_out::softmax_last(&s)?;
            attention_context(&p, &t[2], heads)
        };
        // As three inputs of their own (BERT's case) ...
        let inputs = [
            q.contiguous().unwrap(),
            k.contiguous().unwrap(),
            v.contiguous().unwrap(),
        ];
        assert_same(&inputs, fused, reference, 1e-5);
        // ... and as views of one tensor, whose gradient gathers all three.
        let (y1, g1) = value_and_grads(std::slice::from_ref(&qkv), |t| {
            let (q, k, v) = (
                t[0].narrow(2, 0, 12)?,
                t[0].narrow(2, 12, 12)?,
                t[0].narrow(2, 24, 12)?,
            );
            fused(&[q, k, v])
        });
        let (y2, g2) = value_and_grads(std::slice::from_ref(&qkv), |t| {
            let (q, k, v) = (
                t[0].narrow(2, 0, 12)?,
                t[0].narrow(2, 12, 12)?,
                t[0].narrow(2, 24, 12)?,
            );
            reference(&[q, k, v])
        });
        assert!(max_diff(&y1, &y2) <= 1e-5);
        assert!(max_diff(&g1[0], &g2[0]) <= 1e-5);
        // Heads that do not divide the width take candle's path and its error.
        assert!(attention_scores(&inputs[0], &inputs[1], 5).is_err());
    }

    #[test]
    fn large_tensors_split_over_threads_give_the_same_results() {
        // Over PARALLEL_ELEMENTS: the kernels run in blocks on rayon's threads.
        let (rows, h) = (1100, 1000);
        assert!(rows * h >= PARALLEL_ELEMENTS);
        let x = values(&[rows, h], 0.0);
        let w = values(&[h], 1.0);
        let b = values(&[h], 2.0);
        // dw and db are sums over 1100 rows (values in the thousands), added in another
        // order than candle's: compared relative to their size.
        let inputs = [x.clone(), w, b];
        let (y1, g1) = value_and_grads(&inputs, |t| layer_norm(&t[0], &t[1], &t[2], 1e-5));
        let (y2, g2) = value_and_grads(&inputs, |t| {
            written_out::layer_norm(&t[0], &t[1], &t[2], 1e-5)
        });
        assert!(max_diff(&y1, &y2) <= 1e-5);
        for (a, b) in g1.iter().zip(&g2) {
            let scale = 1.0 + host(b).unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                max_diff(a, b) <= 1e-5 * scale,
                "{} at scale {scale}",
                max_diff(a, b)
            );
        }
        let zero = Tensor::zeros(h, DType::F32, &Device::Cpu).unwrap();
        assert_same(
            std::slice::from_ref(&x),
            |t| softmax_scaled_biased(&t[0], 0.5, &zero),
            |t| written_out::softmax_last(&(&t[0] * 0.5)?),
            1e-6,
        );
        assert_same(
            std::slice::from_ref(&x),
            |t| gelu(&t[0], true),
            |t| t[0].gelu(),
            2e-6,
        );
        let mask = values(&[rows, h], 5.0)
            .ge(0.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let m = host(&mask).unwrap();
        assert_same(
            std::slice::from_ref(&x),
            |t| mul_mask(&t[0], m.clone()),
            |t| &t[0] * &mask,
            0.0,
        );
    }

    #[test]
    fn add_trailing_matches_broadcast_add() {
        let x = values(&[4, 3, 6], 0.0);
        for b in [values(&[6], 1.0), values(&[3, 6], 2.0)] {
            assert_same(
                &[x.clone(), b],
                |t| add_trailing(&t[0], &t[1]),
                |t| t[0].broadcast_add(&t[1]),
                1e-5,
            );
        }
        // Not a trailing shape: plain broadcasting, as before.
        let col = values(&[4, 3, 1], 3.0);
        let y = add_trailing(&x, &col).unwrap();
        assert_eq!(max_diff(&y, &x.broadcast_add(&col).unwrap()), 0.0);
    }

    #[test]
    fn mul_mask_matches_mul() {
        let x = values(&[4, 6], 0.0);
        let mask = values(&[4, 6], 5.0)
            .ge(0.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let m = host(&mask).unwrap();
        assert_same(
            std::slice::from_ref(&x),
            |t| mul_mask(&t[0], m.clone()),
            |t| &t[0] * &mask,
            0.0,
        );
        // Other dtypes multiply with candle's op.
        let x64 = x.to_dtype(DType::F64).unwrap();
        let y = mul_mask(&x64, m.clone())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(max_diff(&y, &(&x * &mask).unwrap()), 0.0);
        assert!(mul_mask(&x, vec![1.0; 3]).is_err());
    }

    #[test]
    fn non_contiguous_inputs_and_other_dtypes_take_the_right_path() {
        // A transposed input is made contiguous first.
        let x = values(&[6, 4], 0.0).t().unwrap();
        let zero = Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap();
        let y = softmax_scaled_biased(&x, 0.5, &zero).unwrap();
        let expected = written_out::softmax_last(&(&x * 0.5).unwrap()).unwrap();
        assert!(max_diff(&y, &expected) <= 1e-6);
        // f64 is not fused; it computes through the written-out form.
        let (x64, zero64) = (
            x.to_dtype(DType::F64).unwrap(),
            zero.to_dtype(DType::F64).unwrap(),
        );
        let y64 = softmax_scaled_biased(&x64, 0.5, &zero64).unwrap();
        assert!(max_diff(&y, &y64.to_dtype(DType::F32).unwrap()) <= 1e-6);
    }

    #[test]
    fn results_are_deterministic() {
        let x = values(&[8, 32], 0.0);
        let w = values(&[32], 1.0);
        let b = values(&[32], 2.0);
        let run = || {
            value_and_grads(&[x.clone(), w.clone(), b.clone()], |t| {
                let zero = Tensor::zeros(32, DType::F32, &Device::Cpu)?;
                softmax_scaled_biased(&layer_norm(&t[0], &t[1], &t[2], 1e-5)?, 0.3, &zero)
            })
        };
        let (y1, g1) = run();
        let (y2, g2) = run();
        assert_eq!(max_diff(&y1, &y2), 0.0);
        for (a, b) in g1.iter().zip(&g2) {
            assert_eq!(max_diff(a, b), 0.0);
        }
    }
}
