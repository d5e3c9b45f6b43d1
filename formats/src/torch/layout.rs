//! Strided tensor views of a storage: bounds checks and contiguous materialisation.

use std::borrow::Cow;

use super::pickle::TensorRef;
use crate::{Error, Result, TensorView};

/// A strided view may expand to at most this many times its storage's bytes (stride-0
/// broadcasts) before kiln refuses to materialise it, unless it stays under
/// [`EXPANSION_FLOOR`] bytes.
const MAX_EXPANSION: u64 = 16;
const EXPANSION_FLOOR: u64 = 64 << 20;

/// Checks with overflow-safe arithmetic that every element `t` can reach lies inside
/// a storage of `storage_bytes` bytes, and that its byte size fits in `usize`.
pub(crate) fn check_bounds(t: &TensorRef, storage_bytes: u64) -> Result<()> {
    if t.shape.len() != t.stride.len() {
        return Err(Error::Tensor(format!(
            "shape {:?} and stride {:?} differ in rank",
            t.shape, t.stride
        )));
    }
    let es = t.dtype.size() as u64;
    let numel = t
        .shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .ok_or_else(|| Error::Tensor(format!("shape {:?} overflows", t.shape)))?;
    numel
        .checked_mul(es)
        .filter(|&n| usize::try_from(n).is_ok())
        .ok_or_else(|| Error::Tensor(format!("shape {:?} too large", t.shape)))?;
    if numel == 0 {
        return Ok(());
    }
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |acc, (&d, &s)| {
            (d as u64 - 1)
                .checked_mul(s as u64)
                .and_then(|x| acc.checked_add(x))
        });
    let end = last
        .and_then(|l| l.checked_add(1))
        .and_then(|n| n.checked_mul(es))
        .ok_or_else(|| Error::Tensor("storage offset and strides overflow".into()))?;
    if end > storage_bytes {
        return Err(Error::Tensor(format!(
            "{} view (offset {}, shape {:?}, stride {:?}) reaches byte {end} of a \
             {storage_bytes}-byte storage",
            t.dtype.torch_name(),
            t.offset,
            t.shape,
            t.stride
        )));
    }
    Ok(())
}

/// The tensor `t` as a contiguous view of `storage` (the record's bytes): borrowed when
/// the view is already contiguous, gathered into a new buffer otherwise.
pub(crate) fn materialize<'a>(t: &TensorRef, storage: &'a [u8]) -> Result<TensorView<'a>> {
    check_bounds(t, storage.len() as u64)?;
    let es = t.dtype.size();
    // Bounds are checked: every product below fits in u64 and in usize.
    let numel = t.numel() as usize;
    let nbytes = numel * es;
    let storage_bytes = storage.len() as u64;
    if nbytes as u64 > EXPANSION_FLOOR && nbytes as u64 / MAX_EXPANSION > storage_bytes {
        return Err(Error::Unsupported(format!(
            "a view of {nbytes} bytes repeating a {storage_bytes}-byte storage (stride 0) \
             is not expanded"
        )));
    }
    if numel == 0 {
        return TensorView::new(t.dtype, t.shape.clone(), Cow::Borrowed(&[][..]));
    }
    let start = t.offset as usize * es;
    if t.is_contiguous() {
        return TensorView::new(t.dtype, t.shape.clone(), &storage[start..start + nbytes]);
    }
    let mut out = Vec::new();
    out.try_reserve_exact(nbytes)
        .map_err(|_| Error::Tensor(format!("cannot allocate {nbytes} bytes")))?;
    let rank = t.shape.len();
    // Innermost dimension: a run of bytes when its stride is 1.
    let (inner_len, inner_stride) = (t.shape[rank - 1], t.stride[rank - 1]);
    let outer = &t.shape[..rank - 1];
    let mut index = vec![0usize; outer.len()];
    loop {
        let base = t.offset as usize
            + index
                .iter()
                .zip(&t.stride)
                .map(|(&i, &s)| i * s)
                .sum::<usize>();
        if inner_stride == 1 {
            out.extend_from_slice(&storage[base * es..(base + inner_len) * es]);
        } else {
            for j in 0..inner_len {
                let at = (base + j * inner_stride) * es;
                out.extend_from_slice(&storage[at..at + es]);
            }
        }
        // Odometer over the outer dimensions.
        let mut d = outer.len();
        loop {
            if d == 0 {
                return TensorView::new(t.dtype, t.shape.clone(), out);
            }
            d -= 1;
            index[d] += 1;
            if index[d] < outer[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::DType;
    use crate::torch::pickle::StorageRef;

    fn view(shape: Vec<usize>, stride: Vec<usize>, offset: u64, nbytes: u64) -> TensorRef {
        TensorRef {
            storage: StorageRef {
                key: "0".into(),
                dtype: Some(DType::U8),
                nbytes,
                location: "cpu".into(),
            },
            dtype: DType::U8,
            offset,
            shape,
            stride,
            requires_grad: false,
        }
    }

    #[test]
    fn gathers_transposes_and_slices() {
        let data: Vec<u8> = (0..12).collect();
        // 3x4 matrix transposed: 4x3 with stride (1, 4).
        let t = view(vec![4, 3], vec![1, 4], 0, 12);
        let v = materialize(&t, &data).unwrap();
        assert!(!v.is_borrowed());
        assert_eq!(v.data(), &[0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
        // Row 1 of the 3x4 matrix: contiguous, borrowed.
        let t = view(vec![4], vec![1], 4, 12);
        let v = materialize(&t, &data).unwrap();
        assert!(v.is_borrowed());
        assert_eq!(v.data(), &[4, 5, 6, 7]);
        // Column 2: stride 4.
        let t = view(vec![3], vec![4], 2, 12);
        assert_eq!(materialize(&t, &data).unwrap().data(), &[2, 6, 10]);
        // 0-d at offset 11, empty anywhere, broadcast with stride 0.
        let t = view(vec![], vec![], 11, 12);
        assert_eq!(materialize(&t, &data).unwrap().data(), &[11]);
        let t = view(vec![0, 5], vec![5, 1], 1000, 12);
        assert_eq!(materialize(&t, &data).unwrap().data(), &[] as &[u8]);
        let t = view(vec![2, 3], vec![0, 1], 0, 12);
        assert_eq!(materialize(&t, &data).unwrap().data(), &[0, 1, 2, 0, 1, 2]);
        // Size-1 dims with odd strides are still contiguous.
        let t = view(vec![1, 4], vec![99, 1], 0, 12);
        assert!(materialize(&t, &data).unwrap().is_borrowed());
    }

    #[test]
    fn refuses_out_of_bounds_and_overflow() {
        let data = [0u8; 12];
        assert!(materialize(&view(vec![13], vec![1], 0, 12), &data).is_err());
        assert!(materialize(&view(vec![4], vec![1], 9, 12), &data).is_err());
        assert!(materialize(&view(vec![2], vec![usize::MAX], 0, 12), &data).is_err());
        assert!(materialize(&view(vec![usize::MAX, 2], vec![0, 0], 0, 12), &data).is_err());
        assert!(materialize(&view(vec![1 << 40], vec![0], 0, 12), &data).is_err());
        assert!(materialize(&view(vec![], vec![], u64::MAX, 12), &data).is_err());
        assert!(materialize(&view(vec![2], vec![1, 1], 0, 12), &data).is_err());
    }
}
