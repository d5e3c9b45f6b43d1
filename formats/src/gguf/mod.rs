//! GGUF, the single-file model format of llama.cpp and the tools around it: a header of
//! typed key-value metadata and tensor descriptions, then the tensors' bytes, each
//! aligned (32 bytes unless `general.alignment` says otherwise).
//!
//! - [`GgufFile`] reads one (memory-mapped, every count, length, offset and type checked
//!   before use: a hostile file is refused, never trusted) and is a
//!   [`TensorCollection`](crate::TensorCollection) whose F32/F16/BF16 tensors read as
//!   they are and whose Q8_0 tensors read dequantized to F32;
//! - [`write`] writes one streaming, tensor by tensor, through kiln's write-then-rename;
//! - [`quant`] holds the element encodings (F16, BF16, Q8_0) bit for bit as gguf-py's.
//!
//! Shapes here are row-major, as everywhere in kiln (`[out, in]` for a linear weight);
//! the file stores GGML's reversed order (`ne[0]` innermost), and both sides convert.

pub mod quant;
mod read;
mod value;
mod write;

pub use read::{GgufFile, GgufTensorInfo};
pub use value::{Value, ValueType};
pub use write::{TensorSpec, write};

/// Reads a float tensor's elements as f32 (F32, F16, BF16, F64), as the converter's
/// `data_torch.to(torch.float32)` does before quantizing.
pub fn to_f32(view: &crate::TensorView<'_>) -> crate::Result<Vec<f32>> {
    use crate::DType;
    let b = view.data();
    Ok(match view.dtype() {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        d => {
            return Err(crate::Error::Tensor(format!(
                "{d} is not a float type GGUF export reads"
            )));
        }
    })
}

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// The version this module writes (and the newest it reads; 2 reads too).
pub const VERSION: u32 = 3;
/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// `general.quantization_version`: the Q-format revision of ggml (`GGML_QNT_VERSION`).
pub const QUANTIZATION_VERSION: u32 = 2;

/// A GGML tensor type: its id in the file, block size and bytes per block.
///
/// Every type ggml defines up to BF16 is known, so that a file of any of them is
/// described; kiln reads the data of [`GgmlType::readable`] ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// 4-bit blocks of 32 with an f16 scale.
    Q4_0,
    /// 4-bit blocks of 32 with an f16 scale and minimum.
    Q4_1,
    /// 5-bit blocks of 32.
    Q5_0,
    /// 5-bit blocks of 32 with a minimum.
    Q5_1,
    /// 8-bit blocks of 32 with an f16 scale.
    Q8_0,
    /// 8-bit blocks of 32 with f32 scale and sum.
    Q8_1,
    /// k-quant, 2 bits.
    Q2K,
    /// k-quant, 3 bits.
    Q3K,
    /// k-quant, 4 bits.
    Q4K,
    /// k-quant, 5 bits.
    Q5K,
    /// k-quant, 6 bits.
    Q6K,
    /// k-quant, 8 bits.
    Q8K,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// IEEE double precision.
    F64,
    /// bfloat16.
    BF16,
}

impl GgmlType {
    /// Every known type.
    pub const ALL: [GgmlType; 20] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::BF16,
    ];

    /// The id the file stores (`ggml_type`).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::I8 => 24,
            GgmlType::I16 => 25,
            GgmlType::I32 => 26,
            GgmlType::I64 => 27,
            GgmlType::F64 => 28,
            GgmlType::BF16 => 30,
        }
    }

    /// The type of an id, if known.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's name (`F32`, `Q8_0`, `Q4_K`, …).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::I8 => "I8",
            GgmlType::I16 => "I16",
            GgmlType::I32 => "I32",
            GgmlType::I64 => "I64",
            GgmlType::F64 => "F64",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block and bytes per block (gguf-py's `GGML_QUANT_SIZES`).
    pub fn block(self) -> (usize, usize) {
        const QK_K: usize = 256;
        match self {
            GgmlType::F32 | GgmlType::I32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 | GgmlType::I16 => (1, 2),
            GgmlType::I8 => (1, 1),
            GgmlType::I64 | GgmlType::F64 => (1, 8),
            GgmlType::Q4_0 => (32, 2 + 16),
            GgmlType::Q4_1 => (32, 2 + 2 + 16),
            GgmlType::Q5_0 => (32, 2 + 4 + 16),
            GgmlType::Q5_1 => (32, 2 + 2 + 4 + 16),
            GgmlType::Q8_0 => (32, 2 + 32),
            GgmlType::Q8_1 => (32, 4 + 4 + 32),
            GgmlType::Q2K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            GgmlType::Q3K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            GgmlType::Q4K => (QK_K, 2 + 2 + QK_K / 2 + 12),
            GgmlType::Q5K => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            GgmlType::Q6K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            GgmlType::Q8K => (QK_K, 4 + QK_K + QK_K / 8),
        }
    }

    /// The bytes of a tensor of this type and row-major `shape`; `None` when the
    /// innermost dimension is not a whole number of blocks or the size overflows.
    pub fn nbytes(self, shape: &[usize]) -> Option<usize> {
        let (block, size) = self.block();
        let inner = shape.last().copied().unwrap_or(1);
        if inner % block != 0 {
            return None;
        }
        let numel = crate::tensor::checked_numel(shape)?;
        (numel / block).checked_mul(size)
    }

    /// The dtype kiln reads this type's data as: itself for the plain types, F32 for Q8_0
    /// (dequantized); `None` for the other block formats, which kiln lists but does not
    /// decode.
    pub fn readable(self) -> Option<crate::DType> {
        use crate::DType;
        Some(match self {
            GgmlType::F32 | GgmlType::Q8_0 => DType::F32,
            GgmlType::F16 => DType::F16,
            GgmlType::BF16 => DType::BF16,
            GgmlType::I8 => DType::I8,
            GgmlType::I16 => DType::I16,
            GgmlType::I32 => DType::I32,
            GgmlType::I64 => DType::I64,
            GgmlType::F64 => DType::F64,
            _ => return None,
        })
    }
}

/// What `--outtype` asks for (llama.cpp's `general.file_type`, `LlamaFileType`): the
/// type of the 2-D weights; 1-D tensors and norms stay F32 whatever it says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileType {
    /// Everything F32 (`ALL_F32`).
    F32,
    /// 2-D weights F16 (`MOSTLY_F16`, convert_hf_to_gguf.py's default).
    F16,
    /// 2-D weights BF16 (`MOSTLY_BF16`).
    BF16,
    /// 2-D weights Q8_0, F16 where a row is not whole blocks (`MOSTLY_Q8_0`).
    Q8_0,
}

impl FileType {
    /// The value of `general.file_type`.
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q8_0 => 7,
            FileType::BF16 => 32,
        }
    }

    /// The type of the weights it quantizes.
    pub fn weight_type(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// convert_hf_to_gguf.py's `--outtype` spelling (`f32`, `f16`, `bf16`, `q8_0`).
    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "f32",
            FileType::F16 => "f16",
            FileType::BF16 => "bf16",
            FileType::Q8_0 => "q8_0",
        }
    }
}

impl std::str::FromStr for FileType {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<FileType> {
        [FileType::F32, FileType::F16, FileType::BF16, FileType::Q8_0]
            .into_iter()
            .find(|t| t.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                crate::Error::Argument(format!(
                    "GGUF outtype {s:?}: kiln writes f32, f16, bf16 or q8_0"
                ))
            })
    }
}

/// The type llama.cpp's converter stores one tensor as under `file_type`: F32 for 1-D
/// tensors, norms (`*_norm.weight`), the position table and anything not named
/// `*.weight` (biases); Q8_0 falls back to F16 where the rows are not whole blocks.
pub fn storage_type(name: &str, shape: &[usize], file_type: FileType) -> GgmlType {
    if shape.len() <= 1
        || name.ends_with("_norm.weight")
        || name == "position_embd.weight"
        || !name.ends_with(".weight")
    {
        return GgmlType::F32;
    }
    let want = file_type.weight_type();
    if want == GgmlType::Q8_0 && want.nbytes(shape).is_none() {
        return GgmlType::F16;
    }
    want
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests;
