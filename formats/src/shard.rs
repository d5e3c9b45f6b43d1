//! Hugging Face sharding: `model-00001-of-00003.safetensors` (or
//! `pytorch_model-00001-of-00002.bin`) plus `model.safetensors.index.json`, split by
//! the rules of `huggingface_hub.split_torch_state_dict_into_shards`:
//!
//! - sizes are decimal (`"5GB"` = 5·10⁹ bytes; `"5GiB"` = 5·2³⁰);
//! - tensors are taken in the collection's order; a tensor larger than the limit gets a
//!   shard of its own, placed before the shard being filled; otherwise a shard is
//!   closed when the next tensor would take it past the limit;
//! - one shard is written under the single-file name (`model.safetensors`) with no
//!   index; several get 1-based, 5-digit names and an index written as
//!   `json.dumps(index, indent=2, sort_keys=True) + "\n"` with `total_parameters` and
//!   `total_size`.
//!
//! A sharded set is read through its index with the same [`TensorCollection`] API as
//! one file ([`ShardedSet`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::json;

use crate::detect::{Kind, detect};
use crate::safetensors::SafetensorsFile;
use crate::torch::TorchFile;
use crate::{
    Error, Format, Result, ResultExt, TensorCollection, TensorInfo, TensorView, atomic, pyjson,
};

/// Parses a shard size the way transformers does: an integer number of bytes, or a
/// number with a unit — decimal `KB`/`MB`/`GB`/`TB` (powers of 1000), binary
/// `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024), `B`. Units are case-insensitive.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let upper = t.to_ascii_uppercase();
    let units: [(&str, f64); 9] = [
        ("TIB", 1024f64.powi(4)),
        ("GIB", 1024f64.powi(3)),
        ("MIB", 1024f64.powi(2)),
        ("KIB", 1024.0),
        ("TB", 1e12),
        ("GB", 1e9),
        ("MB", 1e6),
        ("KB", 1e3),
        ("B", 1.0),
    ];
    let bad = || {
        Error::Argument(format!(
            "invalid size {text:?}: expected bytes or a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB"
        ))
    };
    let (number, factor) = units
        .iter()
        .find_map(|(u, f)| upper.strip_suffix(u).map(|n| (n.trim(), *f)))
        .unwrap_or((upper.as_str(), 1.0));
    if let Ok(n) = number.parse::<u64>() {
        return n
            .checked_mul(factor as u64)
            .filter(|&b| b > 0)
            .ok_or_else(bad);
    }
    let x: f64 = number.parse().map_err(|_| bad())?;
    let bytes = x * factor;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Splits tensors into shards of at most `max_bytes` each (a tensor larger than that
/// alone), as `huggingface_hub` does; returns indexes into `infos`.
pub fn plan(infos: &[TensorInfo], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_size = 0u64;
    for (i, info) in infos.iter().enumerate() {
        let size = info.nbytes() as u64;
        if size > max_bytes {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max_bytes && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// The file name of shard `i` (0-based) of `n` in `format`.
pub fn shard_name(format: Format, i: usize, n: usize) -> String {
    if n == 1 {
        return format.hf_weights_name().to_string();
    }
    match format {
        Format::Safetensors => format!("model-{:05}-of-{n:05}.safetensors", i + 1),
        Format::PyTorch => format!("pytorch_model-{:05}-of-{n:05}.bin", i + 1),
    }
}

/// Whether `name` is a weights file or index that a save in `dir` would own: the
/// single files and indexes of both formats, and anything named like a shard
/// (`model-00001-of-00002.safetensors`, `pytorch_model-00002-of-00005.bin`).
pub(crate) fn is_weights_file(name: &str) -> bool {
    let singles = [Format::Safetensors, Format::PyTorch]
        .iter()
        .flat_map(|f| [f.hf_weights_name(), f.hf_index_name()])
        .any(|n| n == name);
    if singles {
        return true;
    }
    let stem = match (name.strip_suffix(".safetensors"), name.strip_suffix(".bin")) {
        (Some(s), _) if s.starts_with("model") => s,
        (_, Some(s)) if s.starts_with("pytorch_model") => s,
        _ => return false,
    };
    // (.*?)-\d{5}-of-\d{5}
    let b = stem.as_bytes();
    b.len() >= 15 && {
        let tail = &b[b.len() - 15..];
        tail[0] == b'-'
            && tail[1..6].iter().all(u8::is_ascii_digit)
            && &tail[6..10] == b"-of-"
            && tail[10..].iter().all(u8::is_ascii_digit)
    }
}

/// A subset of another collection's tensors, in the given order.
struct Subset<'a> {
    inner: &'a dyn TensorCollection,
    infos: Vec<TensorInfo>,
}

impl TensorCollection for Subset<'_> {
    fn format(&self) -> Option<Format> {
        self.inner.format()
    }
    fn metadata(&self) -> &BTreeMap<String, String> {
        self.inner.metadata()
    }
    fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }
    fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.inner.tensor(name)
    }
}

/// What [`save_sharded`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedWeights {
    /// The weight files, in shard order.
    pub files: Vec<PathBuf>,
    /// The index, when there is more than one shard.
    pub index: Option<PathBuf>,
    /// Files of an earlier save that were removed.
    pub removed: Vec<PathBuf>,
}

/// Writes `tensors` into the folder `dir` under Hugging Face's names, sharded at
/// `max_shard_size` bytes, and removes the weights of any earlier save there (stale
/// shards, a single file or index of either format that this save did not write:
/// unlike transformers, which leaves a stale `model.safetensors` that then wins on
/// load). Each file is written atomically; every shard gets the collection's metadata.
pub fn save_sharded(
    dir: impl AsRef<Path>,
    format: Format,
    tensors: &dyn TensorCollection,
    max_shard_size: u64,
) -> Result<SavedWeights> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).in_file(dir)?;
    let infos = tensors.tensors();
    let shards = plan(infos, max_shard_size);
    let n = shards.len();
    let mut files = Vec::with_capacity(n);
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = shard_name(format, i, n);
        let path = dir.join(&name);
        let subset = Subset {
            inner: tensors,
            infos: shard.iter().map(|&k| infos[k].clone()).collect(),
        };
        match format {
            Format::Safetensors => crate::safetensors::save(&path, &subset)?,
            Format::PyTorch => crate::torch::save(&path, &subset)?,
        }
        for info in &subset.infos {
            weight_map.insert(info.name.clone(), json!(name));
        }
        files.push(path);
    }
    let index = if n > 1 {
        Some(write_index(
            dir,
            format,
            weight_map,
            tensors.parameter_count(),
            tensors.total_bytes(),
        )?)
    } else {
        None
    };
    let keep: Vec<&Path> = files
        .iter()
        .map(PathBuf::as_path)
        .chain(index.as_deref())
        .collect();
    let removed = remove_stale(dir, &keep)?;
    Ok(SavedWeights {
        files,
        index,
        removed,
    })
}

/// Writes the shard index of `format` into `dir` as transformers does
/// (`json.dumps(index, indent=2, sort_keys=True) + "\n"`, atomically) and returns its
/// path. `total_parameters` and `total_size` count each storage once.
pub fn write_index(
    dir: &Path,
    format: Format,
    weight_map: serde_json::Map<String, serde_json::Value>,
    total_parameters: u64,
    total_size: u64,
) -> Result<PathBuf> {
    let index = json!({
        "metadata": {
            "total_parameters": total_parameters,
            "total_size": total_size,
        },
        "weight_map": weight_map,
    });
    let path = dir.join(format.hf_index_name());
    let text = pyjson::dumps(&index) + "\n";
    atomic::write_file(&path, |f| {
        std::io::Write::write_all(f, text.as_bytes()).in_file(&path)
    })?;
    Ok(path)
}

/// Removes from `dir` every weights file or index of either format (single files,
/// indexes, anything named like a shard) that is not in `keep`, and returns them: the
/// stale-file cleanup of [`save_sharded`], for writers that write their own shards.
pub fn remove_stale(dir: &Path, keep: &[&Path]) -> Result<Vec<PathBuf>> {
    let keep: HashSet<&Path> = keep.iter().copied().collect();
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).in_file(dir)? {
        let entry = entry.in_file(dir)?;
        let path = entry.path();
        let is_file = entry.file_type().in_file(&path)?.is_file();
        let name = entry.file_name();
        if is_file && is_weights_file(&name.to_string_lossy()) && !keep.contains(path.as_path()) {
            std::fs::remove_file(&path).in_file(&path)?;
            removed.push(path);
        }
    }
    if !removed.is_empty() {
        atomic::sync_dir(dir)?;
    }
    Ok(removed)
}

#[derive(Deserialize)]
struct IndexFile {
    #[serde(default)]
    metadata: BTreeMap<String, serde_json::Value>,
    weight_map: BTreeMap<String, String>,
}

/// A sharded set opened through its index: one collection over all its shards.
///
/// Every file named in the `weight_map` must be a plain file name in the index's folder
/// (no paths, no `..`: an index cannot make kiln read outside the model folder), every
/// listed tensor must be in the shard that the index names, and all shards must have
/// one format. Tensors are listed shard by shard, each shard in its own order.
pub struct ShardedSet {
    index_path: PathBuf,
    format: Format,
    shards: Vec<(PathBuf, Box<dyn TensorCollection>)>,
    tensors: Vec<TensorInfo>,
    location: HashMap<String, usize>,
    declared_total_size: Option<u64>,
    unlisted: Vec<String>,
}

impl std::fmt::Debug for ShardedSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedSet")
            .field("index", &self.index_path)
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.0).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl ShardedSet {
    /// Opens the index at `path` and the headers of the shards it names.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::open_inner(path).in_file(path)
    }

    fn open_inner(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).in_file(path)?;
        let index: IndexFile =
            serde_json::from_str(&text).map_err(|e| Error::Index(format!("{e}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        // Shard files in name order, which is shard order for HF names.
        let mut files: Vec<&String> = index.weight_map.values().collect();
        files.sort();
        files.dedup();
        let mut shards: Vec<(PathBuf, Box<dyn TensorCollection>)> = Vec::with_capacity(files.len());
        let mut format = None;
        for file in files {
            let mut comps = Path::new(file).components();
            if !matches!(
                (comps.next(), comps.next()),
                (Some(Component::Normal(_)), None)
            ) {
                return Err(Error::Index(format!(
                    "weight_map names {file:?}, which is not a file in the index's folder"
                )));
            }
            let shard_path = dir.join(file);
            let shard: Box<dyn TensorCollection> = match detect(&shard_path)? {
                Kind::File(Format::Safetensors) => Box::new(SafetensorsFile::open(&shard_path)?),
                Kind::File(Format::PyTorch) => Box::new(TorchFile::open(&shard_path)?),
                _ => {
                    return Err(Error::Index(format!("shard {file:?} is not a tensor file")));
                }
            };
            let f = shard.format();
            if format.is_some() && format != f {
                return Err(Error::Index("shards have different formats".into()));
            }
            format = f;
            shards.push((shard_path, shard));
        }
        let shard_of: HashMap<&Path, usize> = shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.0.as_path(), i))
            .collect();
        let mut tensors = Vec::new();
        let mut location = HashMap::new();
        let mut unlisted = Vec::new();
        for (i, (shard_path, shard)) in shards.iter().enumerate() {
            for info in shard.tensors() {
                match index.weight_map.get(&info.name) {
                    Some(f) if shard_of.get(dir.join(f).as_path()) == Some(&i) => {
                        location.insert(info.name.clone(), i);
                        tensors.push(info.clone());
                    }
                    Some(_) => {} // listed in another shard; checked below
                    None => unlisted.push(format!("{} ({})", info.name, shard_path.display())),
                }
            }
        }
        if let Some(missing) = index
            .weight_map
            .iter()
            .find(|(n, _)| !location.contains_key(*n))
        {
            return Err(Error::Index(format!(
                "tensor {:?} is not in {}, where the weight_map puts it",
                missing.0, missing.1
            )));
        }
        let declared_total_size = index.metadata.get("total_size").and_then(|v| v.as_u64());
        Ok(ShardedSet {
            index_path: path.to_path_buf(),
            format: format.unwrap_or(Format::Safetensors),
            shards,
            tensors,
            location,
            declared_total_size,
            unlisted,
        })
    }

    /// The shard files, in order.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.0.as_path()).collect()
    }

    /// The index file.
    pub fn index_path(&self) -> &Path {
        &self.index_path
    }
}

impl TensorCollection for ShardedSet {
    fn format(&self) -> Option<Format> {
        Some(self.format)
    }

    /// The first shard's metadata (transformers gives every shard the same).
    fn metadata(&self) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.shards
            .first()
            .map(|s| s.1.metadata())
            .unwrap_or(&EMPTY)
    }

    fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let &i = self
            .location
            .get(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        self.shards[i].1.tensor(name)
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        let &i = self.location.get(name)?;
        self.shards[i].1.info(name)
    }

    /// Verifies every shard, and that the index lists every tensor of every shard and
    /// (for safetensors, whose size is exact) declares the right `total_size`.
    fn verify(&self) -> Result<()> {
        for (path, shard) in &self.shards {
            shard.verify().in_file(path)?;
        }
        let fail = |msg: String| Err(Error::Index(msg)).in_file(&self.index_path);
        if let Some(t) = self.unlisted.first() {
            return fail(format!(
                "tensor {t} is in a shard but not in the weight_map"
            ));
        }
        if let (Format::Safetensors, Some(declared)) = (self.format, self.declared_total_size) {
            let actual = self.total_bytes();
            if declared != actual {
                return fail(format!(
                    "total_size is {declared} but the shards hold {actual} bytes"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, TensorMap};

    fn info(name: &str, bytes: usize) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dtype: DType::U8,
            shape: vec![bytes],
        }
    }

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("100KB").unwrap(), 100_000);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("10mb").unwrap(), 10_000_000);
        assert_eq!(parse_size("12345").unwrap(), 12345);
        assert_eq!(parse_size("7 MiB").unwrap(), 7 << 20);
        for bad in ["", "GB", "5XB", "-1GB", "0", "1e400GB", "nanGB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plan_follows_huggingface_hub() {
        let infos = [
            info("a", 4),
            info("big", 20),
            info("c", 4),
            info("d", 4),
            info("e", 1),
        ];
        // [a, BIG, c, d, e] with max 10: BIG alone first, then {a, c}, then {d, e}
        assert_eq!(plan(&infos, 10), vec![vec![1], vec![0, 2], vec![3, 4]]);
        assert_eq!(plan(&infos, 100), vec![vec![0, 1, 2, 3, 4]]);
        assert_eq!(plan(&[], 10), vec![Vec::<usize>::new()]);
        // exactly at the limit stays in one shard
        assert_eq!(plan(&[info("a", 5), info("b", 5)], 10), vec![vec![0, 1]]);
    }

    #[test]
    fn names_and_stale_patterns() {
        assert_eq!(shard_name(Format::Safetensors, 0, 1), "model.safetensors");
        assert_eq!(
            shard_name(Format::Safetensors, 1, 3),
            "model-00002-of-00003.safetensors"
        );
        assert_eq!(
            shard_name(Format::PyTorch, 0, 2),
            "pytorch_model-00001-of-00002.bin"
        );
        for n in [
            "model.safetensors",
            "pytorch_model.bin.index.json",
            "model-00001-of-00009.safetensors",
            "pytorch_model-00003-of-00004.bin",
            "model.fp16-00001-of-00002.safetensors",
        ] {
            assert!(is_weights_file(n), "{n}");
        }
        for n in [
            "config.json",
            "model-1-of-2.safetensors",
            "tokenizer.json",
            "modelx.bin",
        ] {
            assert!(!is_weights_file(n), "{n}");
        }
    }

    fn model() -> TensorMap<'static> {
        let mut m = TensorMap::new();
        for (i, n) in [("a", 40), ("b", 400), ("c", 40), ("d", 40)] {
            let v = TensorView::new(DType::F32, vec![n / 4], vec![i.as_bytes()[0]; n]).unwrap();
            m.insert(i, v).unwrap();
        }
        m.set_metadata("format", "pt");
        m
    }

    #[test]
    fn sharded_save_reads_back_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("model.safetensors"), b"stale single file").unwrap();
        std::fs::write(d.join("model-00001-of-00007.safetensors"), b"stale").unwrap();
        std::fs::write(d.join("config.json"), b"{}").unwrap();
        let m = model();
        let saved = save_sharded(d, Format::Safetensors, &m, 100).unwrap();
        assert_eq!(saved.files.len(), 3);
        assert_eq!(saved.removed.len(), 2);
        assert!(d.join("config.json").exists());
        let index = std::fs::read_to_string(d.join("model.safetensors.index.json")).unwrap();
        assert!(index.ends_with("}\n"));
        assert!(index.contains("\"total_size\": 520"));
        assert!(index.contains("\"total_parameters\": 130"));
        let set = crate::open(d).unwrap();
        set.verify().unwrap();
        assert_eq!(set.metadata().get("format").map(String::as_str), Some("pt"));
        let names: Vec<_> = set.tensors().iter().map(|t| t.name.clone()).collect();
        assert_eq!(names, ["b", "a", "c", "d"]);
        for i in m.tensors() {
            assert_eq!(set.tensor(&i.name).unwrap(), m.tensor(&i.name).unwrap());
        }
        // Saving again unsharded removes the shards and the index.
        let saved = save_sharded(d, Format::Safetensors, &m, 1 << 30).unwrap();
        assert_eq!(saved.files, vec![d.join("model.safetensors")]);
        assert_eq!(saved.removed.len(), 4);
        let left: HashSet<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    #[test]
    fn hostile_or_inconsistent_indexes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let m = model();
        save_sharded(d, Format::Safetensors, &m, 100).unwrap();
        let idx = d.join("model.safetensors.index.json");
        let good = std::fs::read_to_string(&idx).unwrap();
        for (needle, replacement, expect) in [
            (
                "\"a\": \"model-00002-of-00003.safetensors\"",
                "\"a\": \"../outside.safetensors\"",
                "not a file in the index",
            ),
            (
                "\"a\": \"model-00002-of-00003.safetensors\"",
                "\"a\": \"/etc/passwd\"",
                "not a file in the index",
            ),
            (
                "\"a\": \"model-00002-of-00003.safetensors\"",
                "\"a\": \"model-00001-of-00003.safetensors\"",
                "not in",
            ),
            ("\"weight_map\"", "\"weight_mapx\"", "weight_map"),
        ] {
            assert!(good.contains(needle));
            std::fs::write(&idx, good.replace(needle, replacement)).unwrap();
            let e = ShardedSet::open(&idx).unwrap_err().to_string();
            assert!(e.contains(expect), "{e}");
            assert!(e.starts_with(&idx.display().to_string()), "{e}");
        }
        // A tensor missing from the weight_map, or a wrong total_size, fails verify.
        std::fs::write(
            &idx,
            good.replace("    \"c\": \"model-00002-of-00003.safetensors\",\n", ""),
        )
        .unwrap();
        let set = ShardedSet::open(&idx).unwrap();
        assert!(
            set.verify()
                .unwrap_err()
                .to_string()
                .contains("not in the weight_map")
        );
        std::fs::write(&idx, good.replace("520", "521")).unwrap();
        let set = ShardedSet::open(&idx).unwrap();
        assert!(set.verify().unwrap_err().to_string().contains("total_size"));
    }
}
