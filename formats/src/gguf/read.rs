//! Reading GGUF: the whole header parsed and checked up front, the data memory-mapped.
//!
//! Nothing in the file is trusted: every count is bounded by the bytes that remain
//! before anything is allocated for it, strings must be UTF-8, keys and tensor names
//! unique, dimensions at most four and whole blocks, offsets aligned, and every
//! tensor's bytes inside the data section without overlapping another's.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{DEFAULT_ALIGNMENT, GgmlType, MAGIC, Value, ValueType, quant};
use crate::{DType, Error, Format, Result, ResultExt, TensorCollection, TensorInfo, TensorView};

/// Nested arrays deeper than this are refused (llama.cpp writes none).
const MAX_ARRAY_DEPTH: usize = 4;
/// GGML's `GGML_MAX_DIMS`.
const MAX_DIMS: usize = 4;
/// GGML's `GGML_MAX_NAME`: tensor names are at most this many bytes.
const MAX_NAME: usize = 64;
/// Keys are at most this many bytes (the specification's `2^16 - 1`).
const MAX_KEY: usize = 65535;

/// One tensor of a GGUF file, as its header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Its name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Row-major shape (the file's `ne` reversed).
    pub shape: Vec<usize>,
    /// Its GGML type.
    pub ty: GgmlType,
    /// Where its bytes start, from the start of the file.
    pub offset: usize,
    /// How many bytes it has.
    pub nbytes: usize,
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    version: u32,
    alignment: u64,
    data_start: usize,
    metadata: Vec<(String, Value)>,
    text: BTreeMap<String, String>,
    tensors: Vec<GgufTensorInfo>,
    infos: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and checks a GGUF file (header only; the data is mapped, not read).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = File::open(path).in_file(path)?;
        // SAFETY: the map is read-only; a file changed underneath by another process
        // gives wrong bytes, never unsafety in this code, which bounds-checks every read.
        let map = unsafe { Mmap::map(&file) }.in_file(path)?;
        let header = parse(&map).in_file(path)?;
        let text = header
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.summary()))
            .collect();
        let infos = header
            .tensors
            .iter()
            .map(|t| TensorInfo {
                name: t.name.clone(),
                dtype: t.ty.readable().unwrap_or(DType::U8),
                shape: match t.ty.readable() {
                    Some(_) => t.shape.clone(),
                    None => vec![t.nbytes],
                },
            })
            .collect();
        let index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version: header.version,
            alignment: header.alignment,
            data_start: header.data_start,
            metadata: header.metadata,
            text,
            tensors: header.tensors,
            infos,
            index,
        })
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the data section starts.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// Every metadata entry, in file order.
    pub fn kv(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Every tensor with its GGML type, in file order.
    pub fn gguf_tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The stored bytes of one tensor (still quantized).
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        let t = self.find(name)?;
        Ok(&self.map[t.offset..t.offset + t.nbytes])
    }

    fn find(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| Error::NotFound(name.to_string()))
    }
}

impl TensorCollection for GgufFile {
    fn format(&self) -> Option<Format> {
        None
    }

    fn format_name(&self) -> &'static str {
        "gguf"
    }

    /// Each metadata value in one line ([`Value::summary`]); [`GgufFile::kv`] has them whole.
    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.text
    }

    /// The tensors as kiln reads them: F32/F16/BF16 and the integer types as stored,
    /// Q8_0 as F32; the other block formats, which kiln does not decode, as their bytes
    /// (`U8`, one dimension).
    fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }

    fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let t = self.find(name)?;
        let bytes = &self.map[t.offset..t.offset + t.nbytes];
        match t.ty {
            GgmlType::Q8_0 => {
                let x = quant::decode_q8_0(bytes)?;
                let mut out = Vec::with_capacity(x.len() * 4);
                quant::encode_f32(&x, &mut out);
                TensorView::new(DType::F32, t.shape.clone(), out)
            }
            ty => match ty.readable() {
                Some(dtype) => TensorView::new(dtype, t.shape.clone(), Cow::Borrowed(bytes)),
                None => TensorView::new(DType::U8, vec![t.nbytes], Cow::Borrowed(bytes)),
            },
        }
    }
}

/// What a GGUF header says.
pub(crate) struct Header {
    pub(crate) version: u32,
    pub(crate) alignment: u64,
    pub(crate) data_start: usize,
    pub(crate) metadata: Vec<(String, Value)>,
    pub(crate) tensors: Vec<GgufTensorInfo>,
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Gguf(msg.into())
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(bad(format!(
                "truncated: {what} needs {n} bytes at offset {}, {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_size` bytes each, bounded by what remains.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n).ok().filter(|&n| {
            n.checked_mul(min_size.max(1))
                .is_some_and(|b| b <= self.remaining())
        });
        fits.ok_or_else(|| {
            bad(format!(
                "{what} {n} at offset {} cannot fit in the {} bytes that remain",
                self.pos - 8,
                self.remaining()
            ))
        })
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let at = self.pos;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| bad(format!("{what} at offset {at} is not UTF-8")))
    }

    fn value(&mut self, ty: ValueType, depth: usize) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>("u8")?[0]),
            ValueType::I8 => Value::I8(self.array::<1>("i8")?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("u16")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("i16")?)),
            ValueType::U32 => Value::U32(self.u32("u32")?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("i32")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("f32")?)),
            ValueType::U64 => Value::U64(self.u64("u64")?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("i64")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("f64")?)),
            ValueType::Bool => match self.array::<1>("bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(bad(format!("bool of value {b} at offset {}", self.pos - 1))),
            },
            ValueType::String => Value::String(self.string("string length")?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(bad(format!(
                        "arrays nested deeper than {MAX_ARRAY_DEPTH} at offset {}",
                        self.pos
                    )));
                }
                let id = self.u32("array element type")?;
                let elem = ValueType::from_id(id)
                    .ok_or_else(|| bad(format!("unknown array element type {id}")))?;
                let n = self.count(elem.min_size(), "array length")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}

/// Parses and checks a whole GGUF header; `bytes` is the whole file.
pub(crate) fn parse(bytes: &[u8]) -> Result<Header> {
    let mut c = Cursor { bytes, pos: 0 };
    if c.remaining() < 4 || &bytes[..4] != MAGIC {
        return Err(bad("not a GGUF file (no GGUF magic)"));
    }
    c.pos = 4;
    let raw_version = c.array::<4>("version")?;
    let version = u32::from_le_bytes(raw_version);
    match version {
        2 | 3 => {}
        1 => {
            return Err(Error::Unsupported(
                "GGUF version 1 (re-convert with a current llama.cpp)".into(),
            ));
        }
        _ if matches!(u32::from_be_bytes(raw_version), 2 | 3) => {
            return Err(Error::Unsupported("big-endian GGUF".into()));
        }
        v => return Err(Error::Unsupported(format!("GGUF version {v}"))),
    }
    // The smallest tensor description: name length, one dimension, type, offset.
    let n_tensors = c.count(8 + 4 + 8 + 4 + 8, "tensor count")?;
    // The smallest entry: key length, type, a one-byte value.
    let n_kv = c.count(8 + 4 + 1, "metadata count")?;
    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv);
    let mut keys = std::collections::HashSet::with_capacity(n_kv);
    for _ in 0..n_kv {
        let at = c.pos;
        let key = c.string("key length")?;
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(bad(format!(
                "metadata key of {} bytes at offset {at}",
                key.len()
            )));
        }
        if !keys.insert(key.clone()) {
            return Err(bad(format!("metadata key {key:?} appears twice")));
        }
        let id = c.u32("value type")?;
        let ty =
            ValueType::from_id(id).ok_or_else(|| bad(format!("{key}: unknown value type {id}")))?;
        let value = c.value(ty, 0).map_err(|e| bad(format!("{key}: {e}")))?;
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(bad(format!(
                "general.alignment must be a u32 power of two, got {} {v}",
                v.ty().name()
            )));
        }
    };
    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(n_tensors);
    let mut names = std::collections::HashSet::with_capacity(n_tensors);
    let mut offsets = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("tensor name length")?;
        if name.len() > MAX_NAME {
            return Err(bad(format!(
                "tensor name {name:?} is longer than {MAX_NAME} bytes"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(bad(format!("tensor {name:?} appears twice")));
        }
        let n_dims = c.u32("dimension count")? as usize;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(bad(format!(
                "{name}: {n_dims} dimensions (1 to {MAX_DIMS})"
            )));
        }
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = c.u64("dimension")?;
            ne.push(usize::try_from(d).map_err(|_| bad(format!("{name}: dimension {d}")))?);
        }
        let id = c.u32("tensor type")?;
        let ty =
            GgmlType::from_id(id).ok_or_else(|| bad(format!("{name}: unknown GGML type {id}")))?;
        let offset = c.u64("tensor offset")?;
        let shape: Vec<usize> = ne.iter().rev().copied().collect();
        let nbytes = ty.nbytes(&shape).ok_or_else(|| {
            bad(format!(
                "{name}: {ty} {shape:?} is not whole blocks of {} or overflows",
                ty.block().0
            ))
        })?;
        if offset % alignment != 0 {
            return Err(bad(format!(
                "{name}: offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        offsets.push(offset);
        tensors.push(GgufTensorInfo {
            name,
            shape,
            ty,
            offset: 0,
            nbytes,
        });
    }
    let data_start = c.pos.div_ceil(alignment as usize) * alignment as usize;
    if data_start > bytes.len() && !tensors.is_empty() {
        return Err(bad("truncated before the data section"));
    }
    let data_len = bytes.len().saturating_sub(data_start);
    for (t, &rel) in tensors.iter_mut().zip(&offsets) {
        let end = usize::try_from(rel)
            .ok()
            .and_then(|r| r.checked_add(t.nbytes))
            .filter(|&e| e <= data_len);
        if end.is_none() {
            return Err(bad(format!(
                "{}: {} bytes at data offset {rel} run past the end of the file ({data_len} bytes of data)",
                t.name, t.nbytes
            )));
        }
        t.offset = data_start + rel as usize;
    }
    let mut spans: Vec<(usize, usize, &str)> = tensors
        .iter()
        .filter(|t| t.nbytes > 0)
        .map(|t| (t.offset, t.offset + t.nbytes, t.name.as_str()))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!("tensors {} and {} overlap", w[0].2, w[1].2)));
        }
    }
    Ok(Header {
        version,
        alignment,
        data_start,
        metadata,
        tensors,
    })
}
