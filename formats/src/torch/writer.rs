//! Writing torch zip checkpoints that `torch.load(weights_only=True)` loads, with and
//! without `mmap`.
//!
//! Layout (reference A4): entries under `archive/`, all stored, payloads 64-byte
//! aligned, `data.pkl` (protocol 2), `byteorder` = `little`, `data/0…N-1` in order
//! of first appearance in the pickle, `version` = `3\n`; no `.format_version`.
//! The pickle is built first (it is small); storages are then written one at a time
//! from their source, so memory holds one storage at most. The file is written under
//! a temporary name in the same folder, synced, and renamed into place.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::archive::ZipWriter;
use super::pickle::{TensorRef, Value, pickle_tree};
use super::reader::TorchFile;
use crate::{Error, Result, ResultExt, TensorCollection, TensorView};

/// Where the bytes of the storages named in a [`Value`] tree come from when it is
/// written: asked once per storage, in file order.
pub trait StorageSource {
    /// The bytes of the storage that tensors in the tree call `key`
    /// ([`StorageRef::key`](super::pickle::StorageRef::key)).
    fn storage_bytes(&self, key: &str) -> Result<Cow<'_, [u8]>>;
}

impl StorageSource for TorchFile {
    fn storage_bytes(&self, key: &str) -> Result<Cow<'_, [u8]>> {
        self.storage(key).map(Cow::Borrowed)
    }
}

/// Storages held in memory, by key: the source for trees built in a program (an
/// optimizer state, say).
#[derive(Debug, Default, Clone)]
pub struct StorageMap<'a> {
    map: HashMap<String, Cow<'a, [u8]>>,
}

impl<'a> StorageMap<'a> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the storage `key`.
    pub fn insert(&mut self, key: impl Into<String>, bytes: impl Into<Cow<'a, [u8]>>) {
        self.map.insert(key.into(), bytes.into());
    }

    /// Adds a tensor's bytes as the storage `key` and returns a contiguous
    /// [`Value::Tensor`] that views all of it.
    pub fn insert_tensor(&mut self, key: impl Into<String>, tensor: TensorView<'a>) -> Value {
        let key = key.into();
        let t = TensorRef::contiguous(key.clone(), tensor.dtype(), tensor.shape().to_vec());
        self.map.insert(key, tensor.into_data());
        Value::Tensor(Box::new(t))
    }
}

impl StorageSource for StorageMap<'_> {
    fn storage_bytes(&self, key: &str) -> Result<Cow<'_, [u8]>> {
        self.map
            .get(key)
            .map(|b| Cow::Borrowed(&b[..]))
            .ok_or_else(|| Error::NotFound(format!("storage {key}")))
    }
}

/// A collection as a storage source: the storage key is the tensor's name.
struct CollectionSource<'a>(&'a dyn TensorCollection);

impl StorageSource for CollectionSource<'_> {
    fn storage_bytes(&self, key: &str) -> Result<Cow<'_, [u8]>> {
        Ok(self.0.tensor(key)?.into_data())
    }
}

/// Writes `tensors` as a flat state dict (a `collections.OrderedDict` of name →
/// tensor, in collection order, one storage per tensor) that
/// `torch.load(path, weights_only=True)` loads, with and without `mmap`.
///
/// Tensors are read from the collection one at a time while writing.
pub fn save(path: impl AsRef<Path>, tensors: &dyn TensorCollection) -> Result<()> {
    // Storages are keyed by tensor name here: names must be unique.
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = tensors.tensors().iter().find(|t| !seen.insert(&t.name)) {
        return Err(Error::Tensor(format!(
            "duplicate tensor name {:?}",
            dup.name
        )))
        .in_file(path.as_ref());
    }
    let root = Value::OrderedDict(
        tensors
            .tensors()
            .iter()
            .map(|info| {
                (
                    Value::String(info.name.clone()),
                    Value::Tensor(Box::new(TensorRef::contiguous(
                        info.name.clone(),
                        info.dtype,
                        info.shape.clone(),
                    ))),
                )
            })
            .collect(),
    );
    save_value(path, &root, &CollectionSource(tensors))
}

/// Writes any object tree whose tensors name storages of `storages` (dicts with int
/// or string keys, lists, tuples, numbers, strings, `None`, tensors).
///
/// Tensors naming the same storage key share one storage record, each keeping its
/// offset and strides; records are numbered `0`, `1`, … in order of first
/// appearance. To re-write a [`TorchFile`] with its sharing intact, pass the file
/// itself as the source: `save_value(out, file.root(), &file)`.
pub fn save_value(
    path: impl AsRef<Path>,
    root: &Value,
    storages: &dyn StorageSource,
) -> Result<()> {
    let path = path.as_ref();
    write_atomically(path, |out| write_archive(out, root, storages))
}

/// Writes the archive for `root` into `out`.
fn write_archive<W: Write + Seek>(out: W, root: &Value, storages: &dyn StorageSource) -> Result<W> {
    let pickled = pickle_tree(root)?;
    let mut zip = ZipWriter::new(out);
    zip.add("archive/data.pkl", &pickled.bytes)?;
    zip.add("archive/byteorder", b"little")?;
    for (i, s) in pickled.storages.iter().enumerate() {
        let bytes = storages.storage_bytes(&s.key)?;
        if bytes.len() as u64 != s.nbytes {
            return Err(Error::Tensor(format!(
                "storage {:?} should hold {} bytes, its source gave {}",
                s.key,
                s.nbytes,
                bytes.len()
            )));
        }
        zip.add(&format!("archive/data/{i}"), &bytes)?;
    }
    zip.add("archive/version", b"3\n")?;
    zip.finish()
}

/// Writes through `f` into a temporary file next to `path`, syncs it and renames
/// it over `path`; on failure the temporary file is removed and `path` untouched.
pub(crate) fn write_atomically(
    path: &Path,
    f: impl FnOnce(BufWriter<File>) -> Result<BufWriter<File>>,
) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Argument(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .in_file(&tmp)?;
    let result = (|| {
        let out = f(BufWriter::with_capacity(1 << 20, file)).in_file(path)?;
        let file = out
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().in_file(&tmp)?;
        drop(file);
        fs::rename(&tmp, path).in_file(path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename durable (best effort: not every platform can sync a folder).
    #[cfg(unix)]
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    result
}
