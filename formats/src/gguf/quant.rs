//! Element encodings of GGUF tensors, bit for bit as gguf-py's `quants.py` (which is
//! bit-exact with ggml's reference C): F16 and BF16 round to nearest even, and Q8_0
//! stores blocks of 32 as an f16 scale `d = max|x| / 127` and 32 `i8`s `round(x / d)`
//! (half away from zero).

use half::{bf16, f16};

use crate::{Error, Result};

/// Elements per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

/// Appends `x` as little-endian f32.
pub fn encode_f32(x: &[f32], out: &mut Vec<u8>) {
    out.reserve(x.len() * 4);
    for v in x {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Appends `x` as little-endian f16 (nearest even).
pub fn encode_f16(x: &[f32], out: &mut Vec<u8>) {
    out.reserve(x.len() * 2);
    for &v in x {
        out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
    }
}

/// Appends `x` as little-endian bf16 (nearest even; NaN stays NaN).
pub fn encode_bf16(x: &[f32], out: &mut Vec<u8>) {
    out.reserve(x.len() * 2);
    for &v in x {
        out.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
    }
}

/// Appends `x` as Q8_0 blocks; its length must be a multiple of 32.
pub fn encode_q8_0(x: &[f32], out: &mut Vec<u8>) -> Result<()> {
    if !x.len().is_multiple_of(Q8_0_BLOCK) {
        return Err(Error::Tensor(format!(
            "Q8_0 needs a multiple of {Q8_0_BLOCK} elements, got {}",
            x.len()
        )));
    }
    out.reserve(x.len() / Q8_0_BLOCK * 34);
    for block in x.chunks_exact(Q8_0_BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        // `as` saturates, and |x·id| ≤ 127 up to rounding anyway.
        out.extend(block.iter().map(|v| ((v * id).round() as i8) as u8));
    }
    Ok(())
}

/// Decodes Q8_0 blocks to f32 (`d · q`), as llama.cpp and transformers do.
pub fn decode_q8_0(bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(34) {
        return Err(Error::Tensor(format!(
            "Q8_0 data of {} bytes is not whole 34-byte blocks",
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(bytes.len() / 34 * Q8_0_BLOCK);
    for block in bytes.chunks_exact(34) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        out.extend(block[2..].iter().map(|&q| d * f32::from(q as i8)));
    }
    Ok(out)
}
