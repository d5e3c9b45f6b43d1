//! Comparing two collections tensor by tensor, bit for bit or within a tolerance.

use half::{bf16, f16};

use crate::{DType, Result, TensorCollection};

/// How close two tensors must be to count as equal.
///
/// With both tolerances zero (the default) tensors must be bit-identical. Otherwise an
/// element pair is equal when `|a - b| <= atol + rtol * |b|` (numpy's `allclose`), or
/// when both are NaN.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tolerance {
    /// Absolute tolerance.
    pub atol: f64,
    /// Relative tolerance (relative to the second collection's value).
    pub rtol: f64,
}

impl Tolerance {
    /// Whether only bit-identical tensors count as equal.
    pub fn is_exact(&self) -> bool {
        self.atol == 0.0 && self.rtol == 0.0
    }
}

/// One difference between two collections.
#[derive(Clone, Debug, PartialEq)]
pub enum Difference {
    /// The tensor is only in the first collection.
    OnlyInFirst(String),
    /// The tensor is only in the second collection.
    OnlyInSecond(String),
    /// The dtypes differ.
    DType {
        /// Tensor name.
        name: String,
        /// Dtype in the first collection.
        first: DType,
        /// Dtype in the second collection.
        second: DType,
    },
    /// The shapes differ.
    Shape {
        /// Tensor name.
        name: String,
        /// Shape in the first collection.
        first: Vec<usize>,
        /// Shape in the second collection.
        second: Vec<usize>,
    },
    /// Some values differ beyond the tolerance.
    Values {
        /// Tensor name.
        name: String,
        /// How many elements differ.
        count: usize,
        /// Number of elements.
        numel: usize,
        /// The largest absolute difference (NaN when one side is NaN and the other not).
        max_abs_diff: f64,
    },
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::OnlyInFirst(n) => write!(f, "{n}: only in the first"),
            Difference::OnlyInSecond(n) => write!(f, "{n}: only in the second"),
            Difference::DType {
                name,
                first,
                second,
            } => {
                write!(f, "{name}: dtype {first} vs {second}")
            }
            Difference::Shape {
                name,
                first,
                second,
            } => {
                write!(f, "{name}: shape {first:?} vs {second:?}")
            }
            Difference::Values {
                name,
                count,
                numel,
                max_abs_diff,
            } => write!(
                f,
                "{name}: {count} of {numel} values differ, max abs diff {max_abs_diff:e}"
            ),
        }
    }
}

/// Compares every tensor of `a` with the tensor of the same name in `b`; returns the
/// differences, in `a`'s order followed by the tensors only `b` has.
pub fn compare(
    a: &dyn TensorCollection,
    b: &dyn TensorCollection,
    tol: Tolerance,
) -> Result<Vec<Difference>> {
    let mut diffs = Vec::new();
    for info in a.tensors() {
        let Some(other) = b.info(&info.name) else {
            diffs.push(Difference::OnlyInFirst(info.name.clone()));
            continue;
        };
        if info.dtype != other.dtype {
            diffs.push(Difference::DType {
                name: info.name.clone(),
                first: info.dtype,
                second: other.dtype,
            });
            continue;
        }
        if info.shape != other.shape {
            diffs.push(Difference::Shape {
                name: info.name.clone(),
                first: info.shape.clone(),
                second: other.shape.clone(),
            });
            continue;
        }
        let (x, y) = (a.tensor(&info.name)?, b.tensor(&info.name)?);
        if x.data() == y.data() {
            continue;
        }
        let (count, max_abs_diff) = count_differences(info.dtype, x.data(), y.data(), tol);
        if count > 0 {
            diffs.push(Difference::Values {
                name: info.name.clone(),
                count,
                numel: info.numel(),
                max_abs_diff,
            });
        }
    }
    for info in b.tensors() {
        if a.info(&info.name).is_none() {
            diffs.push(Difference::OnlyInSecond(info.name.clone()));
        }
    }
    Ok(diffs)
}

/// Counts element pairs outside the tolerance and the largest absolute difference.
fn count_differences(dtype: DType, x: &[u8], y: &[u8], tol: Tolerance) -> (usize, f64) {
    let size = dtype.size();
    // complex64 compares its two f32 parts as separate values.
    let (dtype, size) = if dtype == DType::C64 {
        (DType::F32, 4)
    } else {
        (dtype, size)
    };
    let mut count = 0;
    let mut max = 0.0f64;
    for (ea, eb) in x.chunks_exact(size).zip(y.chunks_exact(size)) {
        let (va, vb) = (decode(dtype, ea), decode(dtype, eb));
        let both_nan = va.is_nan() && vb.is_nan();
        let diff = (va - vb).abs();
        let equal = if tol.is_exact() {
            ea == eb
        } else {
            both_nan || diff <= tol.atol + tol.rtol * vb.abs()
        };
        if !equal {
            count += 1;
            if diff.is_nan() || diff > max {
                max = if diff.is_nan() && !both_nan {
                    f64::NAN
                } else {
                    diff.max(max)
                };
            }
        }
    }
    (count, max)
}

/// One element as f64 (u64/i64 beyond 2^53 round, which only matters for tolerances).
fn decode(dtype: DType, b: &[u8]) -> f64 {
    let arr = |n: usize| -> [u8; 8] {
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(&b[..n]);
        a
    };
    match dtype {
        DType::Bool | DType::U8 => f64::from(b[0]),
        DType::I8 => f64::from(b[0] as i8),
        DType::I16 => f64::from(i16::from_le_bytes([b[0], b[1]])),
        DType::U16 => f64::from(u16::from_le_bytes([b[0], b[1]])),
        DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::I32 => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        DType::U32 => f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        DType::F32 | DType::C64 => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        DType::F64 => f64::from_le_bytes(arr(8)),
        DType::I64 => i64::from_le_bytes(arr(8)) as f64,
        DType::U64 => u64::from_le_bytes(arr(8)) as f64,
        DType::F8E4M3 => minifloat(b[0], 4, 3, 7, Nan::AllOnes),
        DType::F8E5M2 => minifloat(b[0], 5, 2, 15, Nan::Ieee),
        DType::F8E4M3Fnuz => minifloat(b[0], 4, 3, 8, Nan::NegZero),
        DType::F8E5M2Fnuz => minifloat(b[0], 5, 2, 16, Nan::NegZero),
        DType::F8E8M0 => {
            if b[0] == 0xff {
                f64::NAN
            } else {
                2f64.powi(i32::from(b[0]) - 127)
            }
        }
    }
}

/// How an 8-bit float encodes NaN.
#[derive(Clone, Copy)]
enum Nan {
    /// IEEE-like: all-ones exponent is inf/NaN (e5m2).
    Ieee,
    /// Only all-ones exponent and mantissa is NaN, no infinities (e4m3fn).
    AllOnes,
    /// The negative-zero pattern 0x80 is the only NaN, no infinities (fnuz).
    NegZero,
}

fn minifloat(v: u8, ebits: u32, mbits: u32, bias: i32, nan: Nan) -> f64 {
    let sign = if v & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = i32::from((v >> mbits) & ((1 << ebits) - 1) as u8);
    let m = f64::from(v & ((1 << mbits) - 1) as u8);
    let emax = (1 << ebits) - 1;
    match nan {
        Nan::NegZero if v == 0x80 => return f64::NAN,
        Nan::AllOnes if v & 0x7f == 0x7f => return f64::NAN,
        Nan::Ieee if e == emax => {
            return if m == 0.0 {
                sign * f64::INFINITY
            } else {
                f64::NAN
            };
        }
        _ => {}
    }
    let scale = f64::from(1u32 << mbits);
    if e == 0 {
        sign * (m / scale) * 2f64.powi(1 - bias)
    } else {
        sign * (1.0 + m / scale) * 2f64.powi(e - bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{TensorMap, TensorView};

    fn map(vals: &[(&str, DType, Vec<u8>)]) -> TensorMap<'static> {
        let mut m = TensorMap::new();
        for (n, d, bytes) in vals {
            let shape = vec![bytes.len() / d.size()];
            m.insert(*n, TensorView::new(*d, shape, bytes.clone()).unwrap())
                .unwrap();
        }
        m
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn finds_every_kind_of_difference() {
        let a = map(&[
            ("same", DType::F32, f32s(&[1.0, 2.0])),
            ("close", DType::F32, f32s(&[1.0, 2.0])),
            ("dtype", DType::F32, f32s(&[1.0])),
            ("only_a", DType::U8, vec![1]),
        ]);
        let b = map(&[
            ("same", DType::F32, f32s(&[1.0, 2.0])),
            ("close", DType::F32, f32s(&[1.0, 2.001])),
            ("dtype", DType::I32, vec![0, 0, 0, 0]),
            ("only_b", DType::U8, vec![1]),
        ]);
        let d = compare(&a, &b, Tolerance::default()).unwrap();
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(matches!(&d[0], Difference::Values { name, count: 1, .. } if name == "close"));
        assert!(matches!(&d[1], Difference::DType { .. }));
        assert_eq!(d[2], Difference::OnlyInFirst("only_a".into()));
        assert_eq!(d[3], Difference::OnlyInSecond("only_b".into()));
        let loose = compare(
            &a,
            &b,
            Tolerance {
                atol: 0.01,
                rtol: 0.0,
            },
        )
        .unwrap();
        assert_eq!(loose.len(), 3);
        let rel = compare(
            &a,
            &b,
            Tolerance {
                atol: 0.0,
                rtol: 1e-3,
            },
        )
        .unwrap();
        assert_eq!(rel.len(), 3);
    }

    #[test]
    fn nan_handling() {
        let a = map(&[("n", DType::F32, f32s(&[f32::NAN, 1.0]))]);
        let b = map(&[("n", DType::F32, f32s(&[f32::NAN, f32::NAN]))]);
        let d = compare(
            &a,
            &b,
            Tolerance {
                atol: 1.0,
                rtol: 0.0,
            },
        )
        .unwrap();
        assert!(
            matches!(&d[0], Difference::Values { count: 1, max_abs_diff, .. } if max_abs_diff.is_nan())
        );
    }

    #[test]
    fn decodes_small_floats() {
        assert_eq!(decode(DType::F8E4M3, &[0x38]), 1.0);
        assert_eq!(decode(DType::F8E4M3, &[0x7e]), 448.0);
        assert!(decode(DType::F8E4M3, &[0x7f]).is_nan());
        assert_eq!(decode(DType::F8E5M2, &[0x3c]), 1.0);
        assert_eq!(decode(DType::F8E5M2, &[0x7c]), f64::INFINITY);
        assert_eq!(decode(DType::F8E4M3Fnuz, &[0x40]), 1.0);
        assert!(decode(DType::F8E5M2Fnuz, &[0x80]).is_nan());
        assert_eq!(decode(DType::F8E8M0, &[127]), 1.0);
        assert_eq!(decode(DType::BF16, &bf16::from_f32(1.5).to_le_bytes()), 1.5);
        assert_eq!(decode(DType::I64, &(-3i64).to_le_bytes()), -3.0);
    }
}
