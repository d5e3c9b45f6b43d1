//! Element types, with their safetensors and torch spellings.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// The element type of a tensor.
///
/// Every type here has one safetensors name (`F32`, `BF16`, …) and one torch name
/// (`float32`, `bfloat16`, …); [`DType::ALL`] lists them. The sub-byte types of the
/// safetensors format (F4, F6_*) are not represented: neither candle nor torch stores
/// them one element per byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// Boolean, one byte (0 or 1).
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits (`float8_e5m2`).
    F8E5M2,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits, finite (`float8_e4m3fn`).
    F8E4M3,
    /// 8-bit exponent-only float (`float8_e8m0fnu`).
    F8E8M0,
    /// 8-bit float e4m3, finite, unsigned zero (`float8_e4m3fnuz`).
    F8E4M3Fnuz,
    /// 8-bit float e5m2, finite, unsigned zero (`float8_e5m2fnuz`).
    F8E5M2Fnuz,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Complex of two f32 (`complex64`).
    C64,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl DType {
    /// Every dtype, in the order of the safetensors specification.
    pub const ALL: [DType; 19] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::F8E5M2,
        DType::F8E4M3,
        DType::F8E8M0,
        DType::F8E4M3Fnuz,
        DType::F8E5M2Fnuz,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::C64,
        DType::F64,
        DType::I64,
        DType::U64,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::Bool
            | DType::U8
            | DType::I8
            | DType::F8E5M2
            | DType::F8E4M3
            | DType::F8E8M0
            | DType::F8E4M3Fnuz
            | DType::F8E5M2Fnuz => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::C64 | DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// The name safetensors uses (`"F32"`).
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E8M0 => "F8_E8M0",
            DType::F8E4M3Fnuz => "F8_E4M3FNUZ",
            DType::F8E5M2Fnuz => "F8_E5M2FNUZ",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::C64 => "C64",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
        }
    }

    /// The name torch uses (`"float32"`, as in `torch.float32` and config.json's `dtype`).
    pub const fn torch_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::F8E5M2 => "float8_e5m2",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::F8E8M0 => "float8_e8m0fnu",
            DType::F8E4M3Fnuz => "float8_e4m3fnuz",
            DType::F8E5M2Fnuz => "float8_e5m2fnuz",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::F32 => "float32",
            DType::C64 => "complex64",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::U64 => "uint64",
        }
    }

    /// Parses a safetensors name (`"F32"`).
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }

    /// Parses a torch name (`"float32"`; the aliases `float`, `half`, `double`, `long`,
    /// `int`, `short` are accepted too).
    pub fn from_torch_name(name: &str) -> Option<DType> {
        let canonical = match name {
            "float" => "float32",
            "half" => "float16",
            "double" => "float64",
            "long" => "int64",
            "int" => "int32",
            "short" => "int16",
            "cfloat" => "complex64",
            other => other,
        };
        DType::ALL.into_iter().find(|d| d.torch_name() == canonical)
    }

    /// Whether this is a floating-point type (complex excluded).
    pub const fn is_float(self) -> bool {
        matches!(
            self,
            DType::F8E5M2
                | DType::F8E4M3
                | DType::F8E8M0
                | DType::F8E4M3Fnuz
                | DType::F8E5M2Fnuz
                | DType::F16
                | DType::BF16
                | DType::F32
                | DType::F64
        )
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

impl FromStr for DType {
    type Err = Error;

    /// Accepts safetensors names (`F32`) and torch names (`float32`).
    fn from_str(s: &str) -> Result<Self> {
        DType::from_safetensors_name(s)
            .or_else(|| DType::from_torch_name(s.strip_prefix("torch.").unwrap_or(s)))
            .ok_or_else(|| Error::Argument(format!("unknown dtype {s:?}")))
    }
}

impl From<DType> for safetensors::Dtype {
    fn from(d: DType) -> Self {
        use safetensors::Dtype as S;
        match d {
            DType::Bool => S::BOOL,
            DType::U8 => S::U8,
            DType::I8 => S::I8,
            DType::F8E5M2 => S::F8_E5M2,
            DType::F8E4M3 => S::F8_E4M3,
            DType::F8E8M0 => S::F8_E8M0,
            DType::F8E4M3Fnuz => S::F8_E4M3FNUZ,
            DType::F8E5M2Fnuz => S::F8_E5M2FNUZ,
            DType::I16 => S::I16,
            DType::U16 => S::U16,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::I32 => S::I32,
            DType::U32 => S::U32,
            DType::F32 => S::F32,
            DType::C64 => S::C64,
            DType::F64 => S::F64,
            DType::I64 => S::I64,
            DType::U64 => S::U64,
        }
    }
}

impl TryFrom<safetensors::Dtype> for DType {
    type Error = Error;

    fn try_from(d: safetensors::Dtype) -> Result<Self> {
        let name = format!("{d:?}");
        DType::from_safetensors_name(&name)
            .ok_or_else(|| Error::Unsupported(format!("safetensors dtype {name}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(d));
            assert_eq!(DType::try_from(safetensors::Dtype::from(d)).ok(), Some(d));
            assert_eq!(safetensors::Dtype::from(d).bitsize(), d.size() * 8);
        }
        assert_eq!("torch.float16".parse::<DType>().ok(), Some(DType::F16));
        assert!("F33".parse::<DType>().is_err());
    }
}
