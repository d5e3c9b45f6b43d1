//! Row-block parallelism of the element-wise and row-wise kernels: the rows split in
//! blocks fixed by the sizes alone, each block's outputs written straight into the
//! op's output buffers (no per-block vectors joined afterwards, no zeroing first).

use std::mem::MaybeUninit;
use std::ops::Range;

use candle_core::Result;

use super::gemm::Fresh;

/// Elements from which the fused kernels split their work over rayon's threads. At the
/// bundled models' sizes (at most 2^18 elements a tensor) handing work to rayon costs
/// more than the second core gives; a larger model's GELU or LayerNorm alone would
/// otherwise keep one core busy while the others wait.
pub(crate) const PARALLEL_ELEMENTS: usize = 1 << 17;

/// Rows per block for `rows` rows of `width` elements: all of them when they are few,
/// else about 2^16 elements. Never depends on the thread count.
fn block_rows(rows: usize, width: usize) -> usize {
    if rows.saturating_mul(width) < PARALLEL_ELEMENTS {
        rows.max(1)
    } else {
        ((1usize << 16) / width.max(1)).max(1)
    }
}

/// Where a block writes its rows of one output: values are appended in order, and
/// [`rows_into`] checks that each block wrote exactly its rows.
pub(super) struct Out<'a> {
    buf: &'a mut [MaybeUninit<f32>],
    len: usize,
    overflow: bool,
}

impl Out<'_> {
    /// Appends `values`.
    pub(super) fn extend(&mut self, values: impl IntoIterator<Item = f32>) {
        for v in values {
            match self.buf.get_mut(self.len) {
                Some(slot) => {
                    slot.write(v);
                    self.len += 1;
                }
                None => self.overflow = true,
            }
        }
    }

    /// Values written so far.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The values written from `start` on, to rework in place.
    pub(super) fn written_from(&mut self, start: usize) -> &mut [f32] {
        let end = self.len;
        let written = &mut self.buf[start.min(end)..end];
        // SAFETY: the first `len` elements have been written (`extend` counts only
        // written ones), and MaybeUninit<f32> has f32's layout.
        unsafe { &mut *(written as *mut [MaybeUninit<f32>] as *mut [f32]) }
    }
}

/// Runs `task` over `rows` rows of `width` elements, for kernels with `N` outputs of
/// `width` values per row: once over all rows when they are few, else over blocks of
/// about 2^16 elements on rayon's threads. `task` gets its block's rows and one [`Out`]
/// per output, and appends exactly its rows' values to each. Returns the outputs and the
/// tasks' results in block order; the blocks depend only on the sizes, never on the
/// thread count, so results are the same on every machine. A block that writes
/// more or fewer values is an error (a kernel bug), never uninitialised memory.
pub(super) fn rows_into<const N: usize, T: Send>(
    rows: usize,
    width: usize,
    task: impl Fn(Range<usize>, &mut [Out<'_>; N]) -> T + Sync,
) -> Result<([Vec<f32>; N], Vec<T>)> {
    let total = rows * width;
    let mut bufs: [Fresh; N] = std::array::from_fn(|_| Fresh::new(total));
    let block = block_rows(rows, width);
    let chunk = (block * width).max(1);
    let results = {
        let mut chunks = bufs.each_mut().map(|b| b.spare().chunks_mut(chunk));
        let blocks = rows.div_ceil(block).max(1);
        let jobs: Vec<(Range<usize>, [Out<'_>; N])> = (0..blocks)
            .map(|i| {
                let outs = chunks.each_mut().map(|c| Out {
                    buf: c.next().unwrap_or(&mut []),
                    len: 0,
                    overflow: false,
                });
                (i * block..((i + 1) * block).min(rows), outs)
            })
            .collect();
        let run = |(span, mut outs): (Range<usize>, [Out<'_>; N])| {
            let result = task(span, &mut outs);
            let complete = outs.iter().all(|o| !o.overflow && o.len == o.buf.len());
            (result, complete)
        };
        if blocks == 1 {
            jobs.into_iter().map(run).collect::<Vec<_>>()
        } else {
            use rayon::prelude::*;
            jobs.into_par_iter().map(run).collect()
        }
    };
    if results.iter().any(|(_, complete)| !complete) {
        candle_core::bail!("kiln: a fused kernel wrote a block of the wrong size")
    }
    // SAFETY: every block wrote exactly the elements of its chunk of every buffer
    // (checked just above), and the chunks cover the buffers.
    let outs = bufs.map(|b| unsafe { b.finish() });
    Ok((outs, results.into_iter().map(|(r, _)| r).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_fill_their_rows_and_wrong_sizes_are_errors() {
        for rows in [0, 1, 7, 5000] {
            let ([a, b], sums) = rows_into::<2, f32>(rows, 64, |span, [x, y]| {
                let mut s = 0.0;
                for r in span {
                    x.extend((0..64).map(|i| (r * 64 + i) as f32));
                    y.extend((0..64).map(|i| -((r * 64 + i) as f32)));
                    s += y.written_from(y.len() - 64).iter().sum::<f32>();
                }
                s
            })
            .unwrap();
            let want: Vec<f32> = (0..rows * 64).map(|v| v as f32).collect();
            assert_eq!(a, want);
            assert_eq!(b, want.iter().map(|v| -v).collect::<Vec<_>>());
            assert_eq!(sums.len(), (rows.div_ceil(1024)).max(1));
        }
        let short = rows_into::<1, ()>(10, 4, |span, [x]| {
            x.extend((0..span.len() * 4 - 1).map(|_| 0.0))
        });
        assert!(short.is_err());
        let long = rows_into::<1, ()>(10, 4, |span, [x]| {
            x.extend((0..span.len() * 4 + 1).map(|_| 0.0))
        });
        assert!(long.is_err());
    }
}
