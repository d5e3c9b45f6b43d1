//! Writing GGUF (version 3) streaming: the header from the tensors' descriptions, then
//! each tensor's bytes as the caller produces them, padded to the alignment, all
//! through kiln's write-then-rename (a crash leaves no half-written file).

use std::io::{BufWriter, Write};
use std::path::Path;

use super::{DEFAULT_ALIGNMENT, GgmlType, MAGIC, VERSION, Value, ValueType};
use crate::{Error, Result, ResultExt};

/// A tensor to write: its name, row-major shape and GGML type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Its name (at most 64 bytes).
    pub name: String,
    /// Row-major shape, one to four dimensions.
    pub shape: Vec<usize>,
    /// How it is stored.
    pub ty: GgmlType,
}

impl TensorSpec {
    /// Its bytes in the file.
    pub fn nbytes(&self) -> Result<usize> {
        self.ty.nbytes(&self.shape).ok_or_else(|| {
            Error::Tensor(format!(
                "{}: {} {:?} is not whole blocks of {}",
                self.name,
                self.ty,
                self.shape,
                self.ty.block().0
            ))
        })
    }
}

/// Writes a GGUF file at `path`: `metadata` in order, then `tensors`, whose bytes
/// `data(i, buf)` appends to the empty `buf` for tensor `i` (in order, once each; the
/// length must be the type's). Returns the file's size.
pub fn write(
    path: impl AsRef<Path>,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
    mut data: impl FnMut(usize, &mut Vec<u8>) -> Result<()>,
) -> Result<u64> {
    let path = path.as_ref();
    let alignment = check(metadata, tensors)?;
    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut header, k);
        header.extend_from_slice(&(v.ty() as u32).to_le_bytes());
        put_value(&mut header, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut header, &t.name);
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        header.extend_from_slice(&t.ty.id().to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.nbytes()? as u64).div_ceil(alignment) * alignment;
    }
    let padded = (header.len() as u64).div_ceil(alignment) * alignment;
    header.resize(padded as usize, 0);
    let total = padded + offset;
    crate::atomic::write_file(path, |sink| {
        sink.set_len(total).in_file(path)?;
        let mut w = BufWriter::with_capacity(1 << 20, sink);
        w.write_all(&header).in_file(path)?;
        let mut buf = Vec::new();
        for (i, t) in tensors.iter().enumerate() {
            buf.clear();
            data(i, &mut buf)?;
            let want = t.nbytes()?;
            if buf.len() != want {
                return Err(Error::Tensor(format!(
                    "{}: {} {:?} needs {want} bytes, got {}",
                    t.name,
                    t.ty,
                    t.shape,
                    buf.len()
                )));
            }
            w.write_all(&buf).in_file(path)?;
            let pad = (want as u64).div_ceil(alignment) * alignment - want as u64;
            w.write_all(&vec![0u8; pad as usize]).in_file(path)?;
        }
        w.flush().in_file(path)
    })?;
    Ok(total)
}

/// Refuses what a reader would: duplicate or empty keys, mixed arrays, a bad
/// `general.alignment`, duplicate or long names, more than four dimensions, partial
/// blocks. Returns the alignment.
fn check(metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Result<u64> {
    let mut keys = std::collections::HashSet::new();
    for (k, v) in metadata {
        if k.is_empty() || !keys.insert(k.as_str()) {
            return Err(Error::Argument(format!(
                "GGUF metadata key {k:?} is empty or repeated"
            )));
        }
        check_value(k, v)?;
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some(_) => {
            return Err(Error::Argument(
                "general.alignment must be a u32 power of two".into(),
            ));
        }
    };
    let mut names = std::collections::HashSet::new();
    for t in tensors {
        if t.name.len() > 64 || !names.insert(t.name.as_str()) {
            return Err(Error::Argument(format!(
                "GGUF tensor name {:?} is longer than 64 bytes or repeated",
                t.name
            )));
        }
        if !(1..=4).contains(&t.shape.len()) {
            return Err(Error::Argument(format!(
                "{}: GGUF tensors have 1 to 4 dimensions, not {}",
                t.name,
                t.shape.len()
            )));
        }
        t.nbytes()?;
    }
    Ok(alignment)
}

fn check_value(key: &str, v: &Value) -> Result<()> {
    if let Value::Array(ty, items) = v {
        if *ty == ValueType::Array && items.is_empty() {
            return Ok(());
        }
        for item in items {
            if item.ty() != *ty {
                return Err(Error::Argument(format!(
                    "GGUF metadata {key}: a {} in an array of {}",
                    item.ty().name(),
                    ty.name()
                )));
            }
            check_value(key, item)?;
        }
    }
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(ty, items) => {
            out.extend_from_slice(&(*ty as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}
