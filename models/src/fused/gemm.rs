//! The `unsafe` of the fused ops, in one place: `gemm`'s matrix product over strided
//! views of slices, after a bounds check that keeps every access inside them; and
//! output buffers that products fill without zeroing them first ([`Fresh`]).

use std::mem::MaybeUninit;

use candle_core::Result;

/// A matrix inside a buffer: where it starts and its row and column strides.
#[derive(Clone, Copy, Debug)]
pub(super) struct Mat {
    pub(super) off: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl Mat {
    pub(super) fn t(self) -> Mat {
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

/// candle's thread count, asked once: without `RAYON_NUM_THREADS` set, candle's
/// `get_num_threads` counts the physical cores from `/proc/cpuinfo` on every call.
fn compute_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// Work (multiply-adds) below which a gemm runs on one thread: at this size the hand-off
/// to rayon's workers, which then spin for more work beside the main thread, costs more
/// than the second core gives (measured on the bundled BERT: 10% of a step on 2 cores).
pub(super) const PARALLEL_GEMM_WORK: usize = 1 << 25;

/// `dst (m×n) (+)= a (m×k) · b (k×n)` (`accumulate`: add onto dst), on candle's threads
/// when the product is large ([`PARALLEL_GEMM_WORK`]). An out-of-bounds view is an
/// error, never a panic or a stray access.
pub(super) fn gemm_with(
    mnk: (usize, usize, usize),
    (dst, d): (&mut [f32], Mat),
    a: (&[f32], Mat),
    b: (&[f32], Mat),
    accumulate: bool,
) -> Result<()> {
    gemm_raw(mnk, (as_uninit(dst), d), a, b, accumulate)
}

/// An initialised buffer as one that products may write (and, accumulating, read).
pub(super) fn as_uninit(dst: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has f32's layout, an initialised f32 is a valid
    // MaybeUninit<f32>, and the products write only f32 values into it.
    unsafe { &mut *(dst as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// A new buffer of `len` values that products fill without zeroing it first: every
/// element is written before [`Fresh::finish`] hands it over. Zeroing an output that a
/// product overwrites anyway was a tenth of a training step's memory traffic.
pub(super) struct Fresh(Vec<f32>);

impl Fresh {
    /// Room for `len` values, none written yet.
    pub(super) fn new(len: usize) -> Self {
        Fresh(Vec::with_capacity(len))
    }

    /// The unwritten buffer, to split between products (every element written once
    /// before any product that accumulates reads it).
    pub(super) fn spare(&mut self) -> &mut [MaybeUninit<f32>] {
        let len = self.0.capacity();
        &mut self.0.spare_capacity_mut()[..len]
    }

    /// The buffer, once written.
    ///
    /// # Safety
    /// Every element of [`Fresh::spare`] has been written (by products that overwrite,
    /// `accumulate = false`, whose views together cover the buffer).
    pub(super) unsafe fn finish(mut self) -> Vec<f32> {
        let len = self.0.capacity();
        // SAFETY: the caller guarantees that all `len` elements are initialised.
        unsafe { self.0.set_len(len) };
        self.0
    }
}

/// [`gemm_with`] into a buffer that may not be written yet: with `accumulate` false
/// every element of the `m × n` view is written and none is read; with `accumulate`
/// true the view must have been written before (it is read).
pub(super) fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    (dst, d): (&mut [MaybeUninit<f32>], Mat),
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
                    dst[d.off + i * d.rs + j * d.cs].write(0.0);
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
    // existing slices). Without `accumulate` (gemm's read_dst false) gemm writes every
    // element of the view and reads none; with it, the caller has written the view.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<f32>().add(d.off),
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
