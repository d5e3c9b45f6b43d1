//! safetensors: memory-mapped reading with strict validation, streaming writes.
//!
//! The layout (an 8-byte little-endian header length, a JSON header, then the tensors'
//! bytes tiling the rest of the file) is validated by the `safetensors` crate itself;
//! kiln adds what that crate lets through: duplicate tensor names (its JSON map keeps
//! the last one silently) and dtypes kiln does not represent. Writing produces the
//! same bytes as Python's `safetensors.torch.save_file`: tensors ordered by
//! descending alignment then name, the header padded with spaces to 8 bytes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensorError;
use safetensors::tensor::{Metadata, TensorInfo as StInfo};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::atomic;
use crate::{DType, Error, Format, Result, ResultExt, TensorCollection, TensorInfo, TensorView};

/// The largest header kiln (and the safetensors crate) accepts: 100 MB.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// A safetensors file, memory-mapped and validated.
///
/// Opening reads and checks the header only; [`tensor`](TensorCollection::tensor)
/// returns views borrowed straight from the mapping, with no copy.
///
/// Like every memory-mapped reader, this assumes nobody truncates the file while it is
/// open (kiln's own writers never modify a file in place: they write a new file and
/// rename it over the old one, so an open mapping keeps the old bytes).
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: Vec<TensorInfo>,
    offsets: Vec<(usize, usize)>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl SafetensorsFile {
    /// Opens and validates `path`; errors name the file and what is wrong with it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).in_file(path)?;
        let len = file.metadata().in_file(path)?.len();
        if len < 8 {
            return Err(Error::Safetensors(format!(
                "file is {len} bytes, too short for the 8-byte header length"
            )))
            .in_file(path);
        }
        // SAFETY: the mapping is read-only and private to this value; see the type's docs
        // for the (universal) caveat about files truncated by another process.
        let mmap = unsafe { Mmap::map(&file) }.in_file(path)?;
        Self::from_mmap(path, mmap).in_file(path)
    }

    fn from_mmap(path: &Path, mmap: Mmap) -> Result<Self> {
        let buf: &[u8] = &mmap;
        let mut n_bytes = [0u8; 8];
        n_bytes.copy_from_slice(&buf[..8]);
        let n = u64::from_le_bytes(n_bytes);
        if n > MAX_HEADER_SIZE {
            return Err(Error::Safetensors(format!(
                "header length {n} is over the {MAX_HEADER_SIZE}-byte limit"
            )));
        }
        let file_len = buf.len() as u64;
        if 8 + n > file_len {
            return Err(Error::Safetensors(format!(
                "header length {n} runs past the end of the file ({file_len} bytes)"
            )));
        }
        let header = &buf[8..8 + n as usize];
        let text = std::str::from_utf8(header).map_err(|e| {
            Error::Safetensors(format!("header is not UTF-8 (byte {})", e.valid_up_to()))
        })?;
        check_unique_keys(text)?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(buf).map_err(describe)?;

        let names = meta.offset_keys();
        let mut tensors = Vec::with_capacity(names.len());
        let mut offsets = Vec::with_capacity(names.len());
        let mut index = HashMap::with_capacity(names.len());
        for name in names {
            let info = meta
                .info(&name)
                .ok_or_else(|| Error::Safetensors(format!("tensor {name:?} vanished")))?;
            let dtype = DType::try_from(info.dtype).map_err(|_| {
                Error::Unsupported(format!("tensor {name:?} has dtype {:?}", info.dtype))
            })?;
            index.insert(name.clone(), tensors.len());
            offsets.push(info.data_offsets);
            tensors.push(TensorInfo {
                name,
                dtype,
                shape: info.shape.clone(),
            });
        }
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            data_start: 8 + n as usize,
            mmap,
            tensors,
            offsets,
            index,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the data section starts in the file (8 + header length).
    pub fn data_start(&self) -> usize {
        self.data_start
    }
}

/// Turns the safetensors crate's errors into one-line messages that say what is wrong.
fn describe(e: SafeTensorError) -> Error {
    let msg = match e {
        SafeTensorError::InvalidHeaderDeserialization(e) => format!("header is not valid: {e}"),
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor {name:?}: data offsets overlap, leave a gap or run backwards")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's dtype and shape do not match its byte length".into()
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "tensor data does not end where the file ends (gap, overlap or truncation)".into()
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows".into(),
        other => other.to_string(),
    };
    Error::Safetensors(msg)
}

/// Refuses a header whose JSON object names a key twice (serde keeps the last silently).
fn check_unique_keys(header: &str) -> Result<()> {
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if !seen.insert(key.clone()) {
                    return Err(de::Error::custom(format!("duplicate tensor name {key:?}")));
                }
            }
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_str(header);
    de.deserialize_map(Keys)
        .map_err(|e| Error::Safetensors(format!("header is not valid: {e}")))
}

impl TensorCollection for SafetensorsFile {
    fn format(&self) -> Option<Format> {
        Some(Format::Safetensors)
    }

    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        let (begin, end) = self.offsets[i];
        let info = &self.tensors[i];
        let bytes = &self.mmap[self.data_start + begin..self.data_start + end];
        TensorView::new(info.dtype, info.shape.clone(), bytes)
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Reads the whole data section through ordinary reads (so an I/O error is an error,
    /// not a fault in a mapping) and checks that BOOL tensors hold only 0 and 1.
    fn verify(&self) -> Result<()> {
        let mut file = File::open(&self.path).in_file(&self.path)?;
        let len = file.metadata().in_file(&self.path)?.len();
        if len != self.mmap.len() as u64 {
            return Err(Error::Safetensors(format!(
                "file changed size while open ({} -> {len} bytes)",
                self.mmap.len()
            )))
            .in_file(&self.path);
        }
        file.seek(SeekFrom::Start(self.data_start as u64))
            .in_file(&self.path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0usize;
        let mut next = 0usize; // index of the next tensor whose range we have not passed
        loop {
            let got = file.read(&mut buf).in_file(&self.path)?;
            if got == 0 {
                break;
            }
            // Check BOOL bytes that fall in this chunk.
            while next < self.tensors.len() && self.offsets[next].0 < pos + got {
                let (b, e) = self.offsets[next];
                if self.tensors[next].dtype == DType::Bool {
                    let lo = b.max(pos) - pos;
                    let hi = e.min(pos + got) - pos;
                    if buf[lo..hi].iter().any(|&v| v > 1) {
                        return Err(Error::Tensor(format!(
                            "{}: BOOL tensor holds a byte other than 0 or 1",
                            self.tensors[next].name
                        )))
                        .in_file(&self.path);
                    }
                }
                if e > pos + got {
                    break;
                }
                next += 1;
            }
            pos += got;
        }
        let expected = self.mmap.len() - self.data_start;
        if pos != expected {
            return Err(Error::Safetensors(format!(
                "read {pos} data bytes, expected {expected}"
            )))
            .in_file(&self.path);
        }
        Ok(())
    }
}

/// The order Python's `safetensors` writes tensors in: descending dtype alignment, then
/// name.
fn write_order(infos: &[TensorInfo]) -> Vec<&TensorInfo> {
    let mut order: Vec<&TensorInfo> = infos.iter().collect();
    order.sort_by(|a, b| {
        b.dtype
            .size()
            .cmp(&a.dtype.size())
            .then_with(|| a.name.cmp(&b.name))
    });
    order
}

/// The header bytes (JSON padded with spaces to a multiple of 8) for these tensors and
/// metadata, and the size of the data section.
fn header_for(
    order: &[&TensorInfo],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, u64)> {
    let mut seen = HashSet::new();
    let mut entries = Vec::with_capacity(order.len());
    let mut offset = 0usize;
    for info in order {
        if !seen.insert(info.name.as_str()) {
            return Err(Error::Tensor(format!(
                "duplicate tensor name {:?}",
                info.name
            )));
        }
        let end = offset
            .checked_add(info.nbytes())
            .ok_or_else(|| Error::Tensor(format!("{}: size overflows", info.name)))?;
        entries.push((
            info.name.clone(),
            StInfo {
                dtype: info.dtype.into(),
                shape: info.shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    let meta = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    });
    let header = Metadata::new(meta, entries).map_err(describe)?;
    let encode = |e: serde_json::Error| Error::Safetensors(format!("cannot encode header: {e}"));
    // The safetensors crate keeps `__metadata__` in a HashMap, whose order changes from
    // run to run; sorted, the same tensors and metadata always give the same bytes.
    let mut value = serde_json::to_value(&header).map_err(encode)?;
    if let Some(serde_json::Value::Object(m)) = value.get_mut("__metadata__") {
        m.sort_keys();
    }
    let mut bytes = serde_json::to_vec(&value).map_err(encode)?;
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    if bytes.len() as u64 > MAX_HEADER_SIZE {
        return Err(Error::Safetensors(format!(
            "header would be {} bytes, over the {MAX_HEADER_SIZE}-byte limit",
            bytes.len()
        )));
    }
    Ok((bytes, offset as u64))
}

/// Writes `tensors` and their metadata as a safetensors file at `path`.
///
/// Streaming: the header is computed from the tensors' descriptions, then each tensor is
/// fetched from the collection and written in turn, so the extra memory is one tensor
/// at most (none when the collection lends its bytes) plus a 1 MiB buffer. The file is
/// written under a temporary name, synced, and renamed into place: `path` holds either
/// its old content or the complete new file, never a partial one. Inside a checkpoint
/// save ([`crate::digest`]) its BLAKE3 digest is computed from the tensors in memory
/// while the file syncs.
pub fn save(path: impl AsRef<Path>, tensors: &dyn TensorCollection) -> Result<()> {
    let path = path.as_ref();
    let order = write_order(tensors.tensors());
    let (header, data_len) = header_for(&order, tensors.metadata()).in_file(path)?;
    let rehash = |h: &mut blake3::Hasher| -> Result<()> {
        h.update(&(header.len() as u64).to_le_bytes());
        h.update(&header);
        for info in &order {
            h.update(tensors.tensor(&info.name)?.data());
        }
        Ok(())
    };
    atomic::write_file_rehashed(
        path,
        |file| {
            file.set_len(8 + header.len() as u64 + data_len)
                .in_file(path)?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            w.write_all(&(header.len() as u64).to_le_bytes())
                .in_file(path)?;
            w.write_all(&header).in_file(path)?;
            for info in &order {
                let t = tensors.tensor(&info.name)?;
                if t.dtype() != info.dtype || t.shape() != info.shape.as_slice() {
                    return Err(Error::Tensor(format!(
                        "{}: collection returned {} {:?} but described {} {:?}",
                        info.name,
                        t.dtype(),
                        t.shape(),
                        info.dtype,
                        info.shape
                    )));
                }
                w.write_all(t.data()).in_file(path)?;
            }
            w.flush().in_file(path)
        },
        rehash,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorMap;

    fn sample() -> TensorMap<'static> {
        let mut m = TensorMap::new();
        m.insert(
            "b",
            TensorView::new(DType::F16, vec![3], vec![1u8; 6]).unwrap(),
        )
        .unwrap();
        m.insert(
            "a",
            TensorView::new(DType::F32, vec![2, 2], vec![2u8; 16]).unwrap(),
        )
        .unwrap();
        m.insert(
            "s",
            TensorView::new(DType::I64, vec![], vec![3u8; 8]).unwrap(),
        )
        .unwrap();
        m.insert(
            "e",
            TensorView::new(DType::Bool, vec![0, 4], vec![]).unwrap(),
        )
        .unwrap();
        m.set_metadata("format", "pt");
        m
    }

    #[test]
    fn round_trip_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let m = sample();
        save(&p, &m).unwrap();
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
        // file order: alignment desc then name
        let names: Vec<_> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["s", "a", "b", "e"]);
        for info in m.tensors() {
            let t = f.tensor(&info.name).unwrap();
            assert!(t.is_borrowed());
            assert_eq!(t, m.tensor(&info.name).unwrap());
        }
        f.verify().unwrap();
        // The crate's own reader agrees.
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 4);
    }

    #[test]
    fn matches_the_safetensors_crate_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let m = sample();
        save(&p, &m).unwrap();
        let views: Vec<_> = m
            .tensors()
            .iter()
            .map(|i| (i.name.clone(), m.tensor(&i.name).unwrap()))
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let theirs = safetensors::serialize(views, Some(meta)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), theirs);
    }

    fn write_raw(dir: &Path, header: &str, data: &[u8]) -> PathBuf {
        let p = dir.join("x.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn open_err(dir: &Path, header: &str, data: &[u8]) -> String {
        let p = write_raw(dir, header, data);
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(e.starts_with(&p.display().to_string()), "{e}");
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn refuses_malformed_headers() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let dup = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(open_err(d, dup, &[0]).contains("duplicate tensor name"));
        let overlap = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#;
        assert!(open_err(d, overlap, &[0; 4]).contains("offsets"));
        let gap = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#;
        assert!(open_err(d, gap, &[0; 3]).contains("offsets"));
        let size = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        assert!(open_err(d, size, &[0; 4]).contains("byte length"));
        let overflow =
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#;
        assert!(open_err(d, overflow, &[0; 4]).contains("overflow"));
        let short = r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#;
        assert!(open_err(d, short, &[0; 4]).contains("end"));
        assert!(open_err(d, "[1,2]", &[]).contains("not valid"));
        let f4 = r#"{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#;
        assert!(open_err(d, f4, &[0]).contains("dtype"));

        let p = d.join("y.safetensors");
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&p, &bytes).unwrap();
        assert!(
            SafetensorsFile::open(&p)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
        bytes[..8].copy_from_slice(&1000u64.to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        assert!(
            SafetensorsFile::open(&p)
                .unwrap_err()
                .to_string()
                .contains("past the end")
        );
        let mut bad = 4u64.to_le_bytes().to_vec();
        bad.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
        std::fs::write(&p, &bad).unwrap();
        assert!(
            SafetensorsFile::open(&p)
                .unwrap_err()
                .to_string()
                .contains("UTF-8")
        );
        std::fs::write(&p, [1, 2, 3]).unwrap();
        assert!(
            SafetensorsFile::open(&p)
                .unwrap_err()
                .to_string()
                .contains("too short")
        );
    }

    #[test]
    fn verify_checks_bool_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let h = r#"{"a":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}}"#;
        let p = write_raw(dir.path(), h, &[0, 1, 2]);
        let f = SafetensorsFile::open(&p).unwrap();
        assert!(f.verify().unwrap_err().to_string().contains("BOOL"));
    }

    #[test]
    fn failed_save_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        std::fs::write(&p, b"old").unwrap();
        struct Liar(TensorMap<'static>);
        impl TensorCollection for Liar {
            fn format(&self) -> Option<Format> {
                None
            }
            fn metadata(&self) -> &BTreeMap<String, String> {
                self.0.metadata()
            }
            fn tensors(&self) -> &[TensorInfo] {
                self.0.tensors()
            }
            fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
                Err(Error::NotFound(name.into()))
            }
        }
        assert!(save(&p, &Liar(sample())).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left behind"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn any_dtype_and_shape_round_trips(
            specs in proptest::collection::vec(
                (0usize..DType::ALL.len(), proptest::collection::vec(0usize..5, 0..4), proptest::num::u64::ANY),
                0..6,
            )
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("p.safetensors");
            let mut m = TensorMap::new();
            for (i, (d, shape, seed)) in specs.iter().enumerate() {
                let dtype = DType::ALL[*d];
                let n = shape.iter().product::<usize>() * dtype.size();
                let bytes: Vec<u8> = (0..n).map(|k| (seed.wrapping_mul(k as u64 + 1) >> 7) as u8).collect();
                let bytes = if dtype == DType::Bool { bytes.iter().map(|b| b & 1).collect() } else { bytes };
                m.insert(format!("t{i}"), TensorView::new(dtype, shape.clone(), bytes).unwrap()).unwrap();
            }
            m.set_metadata("k", "v");
            save(&p, &m).unwrap();
            let f = SafetensorsFile::open(&p).unwrap();
            f.verify().unwrap();
            proptest::prop_assert_eq!(f.tensors().len(), m.len());
            proptest::prop_assert_eq!(f.metadata(), m.metadata());
            for info in m.tensors() {
                proptest::prop_assert_eq!(f.tensor(&info.name).unwrap(), m.tensor(&info.name).unwrap());
            }
        }
    }
}
