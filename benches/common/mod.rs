//! What the `formats` and `io_compare` benches share: the size knob, the scratch folder,
//! the model-like tensors they write and the checksum they read with.
//!
//! The tensors are f32, [`TENSORS`] of them of (nearly) equal size, filled with
//! `((i * 7 + t) % 1021) as f32 / 1021.0` for element `i` of tensor `t`. `benches/py_io.py`
//! builds the same values with numpy, so a checksum taken by kiln and one taken by torch
//! of the same file agree.

use kiln::formats::{DType, Result, TensorCollection, TensorMap, TensorView};

/// Number of tensors, whatever the total size: like the layers of a model, and the same
/// count at every size so that header sizes (and so header open times) compare.
pub const TENSORS: usize = 32;

/// Default total size of the tensors: 1 GiB.
pub const DEFAULT_BYTES: u64 = 1 << 30;

/// Parses a size: bytes, or a number with a binary suffix `K`/`KiB`, `M`/`MiB`, `G`/`GiB`.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The total size of tensors to write: `KILN_BENCH_BYTES`, else [`DEFAULT_BYTES`].
///
/// A malformed value is reported and the default used, so a typo costs a slow run,
/// not a mystery.
pub fn bench_bytes() -> u64 {
    match std::env::var("KILN_BENCH_BYTES") {
        Ok(v) => parse_size(&v).unwrap_or_else(|| {
            eprintln!("KILN_BENCH_BYTES={v:?} is not a size (e.g. 1GiB, 64MiB); using 1 GiB");
            DEFAULT_BYTES
        }),
        Err(_) => DEFAULT_BYTES,
    }
}

/// Name and shape of each tensor for `total` bytes of f32 (rounded down to whole
/// elements): [`TENSORS`] tensors, the last one taking the remainder; `[rows, 1024]`
/// where the size allows, 1-d otherwise.
pub fn layout(total: u64) -> Vec<(String, Vec<usize>)> {
    let elements = (total / 4) as usize;
    let per = elements / TENSORS;
    (0..TENSORS)
        .map(|t| {
            let n = if t + 1 == TENSORS {
                elements - per * (TENSORS - 1)
            } else {
                per
            };
            let shape = if n % 1024 == 0 && n > 0 {
                vec![n / 1024, 1024]
            } else {
                vec![n]
            };
            (format!("model.layers.{t}.weight"), shape)
        })
        .collect()
}

/// The tensors of [`layout`], filled with the pattern in the module docs.
pub fn model_like(total: u64) -> Result<TensorMap<'static>> {
    let mut map = TensorMap::new();
    for (t, (name, shape)) in layout(total).into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut bytes = Vec::with_capacity(n * 4);
        for i in 0..n as u64 {
            let v = ((i * 7 + t as u64) % 1021) as f32 / 1021.0;
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        map.insert(name, TensorView::new(DType::F32, shape, bytes)?)?;
    }
    map.set_metadata("format", "pt");
    Ok(map)
}

/// Wrapping sum of the bytes read as little-endian u64 words (a last partial word padded
/// with zeros): touches every byte, cheaply (it vectorizes). `py_io.py` computes the same.
pub fn checksum(data: &[u8]) -> u64 {
    let words = data.chunks_exact(8);
    let rest = words.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    words
        .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
        .fold(u64::from_le_bytes(tail), u64::wrapping_add)
}

/// Reads every tensor of a collection and returns the wrapping sum of their checksums.
pub fn read_all(tensors: &dyn TensorCollection) -> Result<u64> {
    let mut sum = 0u64;
    for info in tensors.tensors() {
        sum = sum.wrapping_add(checksum(tensors.tensor(&info.name)?.data()));
    }
    Ok(sum)
}
