//! Conversions between kiln's tensors and `candle_core::Tensor` (feature `candle`).
//!
//! ```
//! use kiln_formats::{DType, TensorMap, TensorView};
//! use kiln_formats::candle::{from_candle, to_candle};
//! let t = candle_core::Tensor::new(&[[1f32, 2.], [3., 4.]], &candle_core::Device::Cpu)?;
//! let view = from_candle(&t)?;
//! assert_eq!((view.dtype(), view.shape()), (DType::F32, &[2usize, 2][..]));
//! let back = to_candle(&view, &candle_core::Device::Cpu)?;
//! assert_eq!(back.to_vec2::<f32>()?, t.to_vec2::<f32>()?);
//! # Ok::<(), kiln_formats::Error>(())
//! ```

use candle_core::{DType as CDType, Device, Tensor};

use crate::{DType, Error, Result, TensorCollection, TensorMap, TensorView};

/// The candle dtype for `dtype`; an error names dtypes kiln does not convert (BOOL, I8,
/// U16, U64, C64, and the 8-bit floats, which candle stores but cannot compute with,
/// and whose host copy panics inside candle 0.11).
pub fn to_candle_dtype(dtype: DType) -> Result<CDType> {
    Ok(match dtype {
        DType::U8 => CDType::U8,
        DType::U32 => CDType::U32,
        DType::I16 => CDType::I16,
        DType::I32 => CDType::I32,
        DType::I64 => CDType::I64,
        DType::BF16 => CDType::BF16,
        DType::F16 => CDType::F16,
        DType::F32 => CDType::F32,
        DType::F64 => CDType::F64,
        other => {
            return Err(Error::Unsupported(format!(
                "candle has no dtype for {other}"
            )));
        }
    })
}

/// kiln's dtype for a candle dtype (the sub-byte F4/F6 types have none).
pub fn from_candle_dtype(dtype: CDType) -> Result<DType> {
    Ok(match dtype {
        CDType::U8 => DType::U8,
        CDType::U32 => DType::U32,
        CDType::I16 => DType::I16,
        CDType::I32 => DType::I32,
        CDType::I64 => DType::I64,
        CDType::BF16 => DType::BF16,
        CDType::F16 => DType::F16,
        CDType::F32 => DType::F32,
        CDType::F64 => DType::F64,
        other => return Err(Error::Unsupported(format!("candle dtype {other:?}"))),
    })
}

/// A candle tensor on `device` holding a copy of `view`.
pub fn to_candle(view: &TensorView<'_>, device: &Device) -> Result<Tensor> {
    let dtype = to_candle_dtype(view.dtype())?;
    Ok(Tensor::from_raw_buffer(
        view.data(),
        dtype,
        view.shape(),
        device,
    )?)
}

/// A view owning a host copy of `tensor`'s data (made contiguous, copied from the
/// device if needed).
pub fn from_candle(tensor: &Tensor) -> Result<TensorView<'static>> {
    let dtype = from_candle_dtype(tensor.dtype())?;
    let flat = tensor.flatten_all()?;
    // Little-endian bytes in one sized buffer, read in place from a contiguous CPU
    // tensor (a checkpoint's snapshot copies every moment of the optimizer this way,
    // while training waits; collecting a flat_map grew the buffer piece by piece).
    fn le<T: candle_core::WithDType, const N: usize>(
        t: &Tensor,
        to_bytes: fn(T) -> [u8; N],
    ) -> Result<Vec<u8>> {
        let encode = |vals: &[T]| {
            let mut out = Vec::with_capacity(vals.len() * N);
            for &v in vals {
                out.extend_from_slice(&to_bytes(v));
            }
            out
        };
        {
            let (storage, layout) = t.storage_and_layout();
            if let (candle_core::Storage::Cpu(cpu), Some((a, b))) =
                (&*storage, layout.contiguous_offsets())
            {
                return Ok(encode(&cpu.as_slice::<T>()?[a..b]));
            }
        }
        Ok(encode(&t.to_vec1::<T>()?))
    }
    let bytes = match tensor.dtype() {
        CDType::U8 => flat.to_vec1::<u8>()?,
        CDType::U32 => le(&flat, u32::to_le_bytes)?,
        CDType::I16 => le(&flat, i16::to_le_bytes)?,
        CDType::I32 => le(&flat, i32::to_le_bytes)?,
        CDType::I64 => le(&flat, i64::to_le_bytes)?,
        CDType::BF16 => le(&flat, half::bf16::to_le_bytes)?,
        CDType::F16 => le(&flat, half::f16::to_le_bytes)?,
        CDType::F32 => le(&flat, f32::to_le_bytes)?,
        CDType::F64 => le(&flat, f64::to_le_bytes)?,
        other => return Err(Error::Unsupported(format!("candle dtype {other:?}"))),
    };
    TensorView::new(dtype, tensor.dims().to_vec(), bytes)
}

/// Named candle tensors as an in-memory collection, in the given order (copied to host).
pub fn map_from_candle<'t, S: Into<String>>(
    tensors: impl IntoIterator<Item = (S, &'t Tensor)>,
) -> Result<TensorMap<'static>> {
    let mut map = TensorMap::new();
    for (name, t) in tensors {
        map.insert(name, from_candle(t)?)?;
    }
    Ok(map)
}

/// Loads every tensor of a collection onto `device`, in the collection's order.
pub fn load_all(c: &dyn TensorCollection, device: &Device) -> Result<Vec<(String, Tensor)>> {
    c.tensors()
        .iter()
        .map(|info| {
            Ok((
                info.name.clone(),
                to_candle(&c.tensor(&info.name)?, device)?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_shared_dtype() {
        for d in DType::ALL {
            let Ok(cd) = to_candle_dtype(d) else { continue };
            assert_eq!(from_candle_dtype(cd).unwrap(), d);
            let bytes: Vec<u8> = (0..6 * d.size()).map(|i| (i * 37 % 251) as u8).collect();
            let view = TensorView::new(d, vec![2, 3], bytes).unwrap();
            let t = to_candle(&view, &Device::Cpu).unwrap();
            assert_eq!(from_candle(&t).unwrap(), view, "{d}");
            // a transposed (non-contiguous) candle tensor comes back contiguous
            let tt = t.t().unwrap();
            assert_eq!(from_candle(&tt).unwrap().shape(), &[3, 2]);
        }
        assert!(to_candle_dtype(DType::Bool).is_err());
    }
}
