//! One function per fuzz target: arbitrary bytes in, kiln's public API exercised, and a
//! panic only when kiln misbehaves. Errors are expected (most inputs are garbage); what
//! must never happen is a panic, an abort, a huge allocation, a hang, or a broken
//! invariant checked here (a file that opens but cannot be read, a round trip that
//! changes a value).
//!
//! Each function returns whether kiln accepted the input (the target's main parse
//! succeeded), which the replay test uses to check that the valid seeds reach the
//! code past the parsers.
//!
//! The file-based APIs get the bytes through a scratch folder of their own per thread
//! and per target, under `$TMPDIR`, else `/dev/shm` where it exists (`fuzz/run.sh`
//! points `TMPDIR` at a fresh folder on `/dev/shm`).
//!
//! Shared by the fuzz targets (`fuzz/src/lib.rs`) and by the replay test
//! `tests/fuzz_regressions.rs` of the root crate, which includes this file by path.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kiln_checkpoint::optimizer::OptimizerState;
use kiln_checkpoint::state::TrainerState;
use kiln_formats::gguf::{GgufFile, TensorSpec};
use kiln_formats::safetensors::SafetensorsFile;
use kiln_formats::shard::ShardedSet;
use kiln_formats::torch::pickle::{self, Limits};
use kiln_formats::torch::{TorchFile, Value};
use kiln_formats::{DType, TensorCollection, TensorMap, TensorView, pyjson};

/// A target: the bytes in, whether kiln accepted them out.
pub type Target = fn(&[u8]) -> bool;

/// The targets, by name, as `fuzz/run.sh` and the corpus folders spell them.
pub const TARGETS: [(&str, Target); 9] = [
    ("safetensors", safetensors),
    ("pickle", pickle),
    ("zip", zip),
    ("shard_index", shard_index),
    ("config", config),
    ("trainer_state", trainer_state),
    ("optimizer", optimizer),
    ("inspect", inspect),
    ("gguf", gguf),
];

/// Small limits for the second pass of the pickle target.
const SMALL: Limits = Limits {
    max_depth: 16,
    max_objects: 4096,
    max_extra_bytes: 1 << 16,
};

/// Names of the valid shards that the shard and inspect targets' folders hold, so an
/// index (the fuzz input) can name real tensor files.
pub const SHARD_FILES: [&str; 3] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "pytorch_model-00001-of-00001.bin",
];

/// 1. safetensors: header and data, through `SafetensorsFile`; then re-saved as
///    safetensors and converted to a PyTorch file, each read back the same.
pub fn safetensors(data: &[u8]) -> bool {
    let path = input("safetensors", "model.safetensors", data, Prepared::Nothing);
    let Ok(f) = SafetensorsFile::open(&path) else {
        return false;
    };
    assert!(f.data_start() >= 8 && f.data_start() <= data.len());
    read_all(&f, true);
    let dir = scratch("safetensors", Prepared::Nothing);
    // What kiln writes from what it read (`kiln convert` either way), it reads back
    // the same.
    let out = dir.join("resaved.safetensors");
    if kiln_formats::safetensors::save(&out, &f).is_ok() {
        let back = SafetensorsFile::open(&out);
        let back = back.unwrap_or_else(|e| panic!("safetensors::save wrote junk: {e}"));
        same_tensors(&f, &back);
        assert_eq!(back.metadata(), f.metadata());
    }
    let out = dir.join("converted.bin");
    if kiln_formats::torch::save(&out, &f).is_ok() {
        let back = TorchFile::open(&out);
        let back = back.unwrap_or_else(|e| panic!("torch::save wrote junk: {e}"));
        same_tensors(&f, &back);
    }
    true
}

/// 2. The weights-only pickle reader, with the default limits and with small ones.
pub fn pickle(data: &[u8]) -> bool {
    let full = pickle::load(data);
    if let Ok(v) = &full {
        walk(v);
        // What kiln writes, kiln reads back.
        if let Ok(bytes) = pickle::dump(v) {
            let again = pickle::load(&bytes);
            assert!(
                again.is_ok(),
                "pickle::dump wrote a stream pickle::load refuses: {again:?}"
            );
        }
    }
    if let Ok(small) = pickle::load_with_limits(data, SMALL) {
        // Larger limits never refuse what smaller ones accept, nor read it differently.
        let Ok(full) = &full else {
            panic!("accepted under small limits, refused under the defaults: {full:?}");
        };
        assert_eq!(format!("{small:?}"), format!("{full:?}"));
    }
    full.is_ok()
}

/// 3. The zip reader: `TorchFile` opened on the bytes as a file, every tensor read,
///    the whole tree walked, `verify`, then a re-save and a conversion to safetensors
///    that must read back the same.
pub fn zip(data: &[u8]) -> bool {
    let dir = scratch("zip", Prepared::Nothing);
    let path = dir.join("pytorch_model.bin");
    write(&path, data);
    let Ok(f) = TorchFile::open(&path) else {
        return false;
    };
    let _ = f.prefix();
    let _ = f.entry_names().count();
    walk(f.root());
    for (name, t) in f.root().tensors() {
        let _ = f.storage(&t.storage.key);
        let view = f.read_tensor(t);
        let view = view.unwrap_or_else(|e| panic!("tree tensor {name} opened but fails: {e}"));
        assert_eq!(view.shape(), t.shape.as_slice());
    }
    read_all(&f, true);
    for info in f.tensors() {
        assert!(f.tensor_ref(&info.name).is_some());
    }
    let out = dir.join("resaved.bin");
    if f.save_state_dict(&out).is_ok() {
        let back = TorchFile::open(&out);
        let back = back.unwrap_or_else(|e| panic!("save_state_dict wrote an unreadable file: {e}"));
        same_tensors(&f, &back);
    }
    let out = dir.join("converted.safetensors");
    if kiln_formats::safetensors::save(&out, &f).is_ok() {
        let back = SafetensorsFile::open(&out);
        let back = back.unwrap_or_else(|e| panic!("safetensors::save wrote junk: {e}"));
        same_tensors(&f, &back);
    }
    true
}

/// 4. The shard index: `model.safetensors.index.json` = the bytes, in a folder holding
///    valid shards it may name.
pub fn shard_index(data: &[u8]) -> bool {
    let path = input(
        "shard_index",
        "model.safetensors.index.json",
        data,
        Prepared::Shards,
    );
    let Ok(set) = ShardedSet::open(&path) else {
        return false;
    };
    assert!(!set.shard_paths().is_empty() || set.tensors().is_empty());
    let _ = set.index_path();
    read_all(&set, true);
    true
}

/// 5. `config.json` through `read_config`, then the trainer's model configs.
pub fn config(data: &[u8]) -> bool {
    let path = input("config", "config.json", data, Prepared::Nothing);
    let Some(dir) = path.parent() else {
        return false;
    };
    let Ok(value) = kiln_checkpoint::model::read_config(dir) else {
        return false;
    };
    assert!(value.is_object());
    if let Ok(c) = kiln_models::BertConfig::from_json(&value) {
        let _ = c.num_labels();
        let _ = format!("{c:?}");
    }
    if let Ok(c) = kiln_models::Gpt2Config::from_json(&value) {
        let _ = c.inner_size();
        let json = c.to_json();
        let _ = format!("{c:?}");
        // What kiln writes for a config it read, it reads back.
        if json.is_object() {
            let mut full = json;
            full["model_type"] = "gpt2".into();
            let back = kiln_models::Gpt2Config::from_json(&full);
            assert!(back.is_ok(), "Gpt2Config::to_json is unreadable: {back:?}");
        }
    }
    true
}

/// 6. `trainer_state.json` (and the Python-style JSON reader under it), with round
///    trips: `loads(dumps(v)) == v`, and `from_json(to_json(s)) == s`.
pub fn trainer_state(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    if let Ok(v) = pyjson::loads(text) {
        let dumped = pyjson::dumps_py(&v);
        let back = pyjson::loads(&dumped);
        let back = back.unwrap_or_else(|e| panic!("dumps_py wrote unreadable JSON: {e}"));
        assert_eq!(format!("{back:?}"), format!("{v:?}"), "pyjson round trip");
    }
    let Ok(state) = TrainerState::from_json(text) else {
        return false;
    };
    let json = state.to_json();
    let back = TrainerState::from_json(&json);
    let back = back.unwrap_or_else(|e| panic!("to_json wrote an unreadable state: {e}"));
    // `==` on f64 fields is false for NaN (a real grad_norm value): compare the text
    // there, the values everywhere else.
    if json.contains("NaN") {
        assert_eq!(back.to_json(), json, "trainer_state round trip");
    } else {
        assert_eq!(back, state, "trainer_state round trip");
    }
    true
}

/// 7. The optimizer state file, and a save/load round trip of what loaded.
pub fn optimizer(data: &[u8]) -> bool {
    let dir = scratch("optimizer", Prepared::Nothing);
    let path = dir.join("optimizer.safetensors");
    write(&path, data);
    let Ok(state) = OptimizerState::load(&path) else {
        return false;
    };
    let mut total = 0u64;
    for p in state.params() {
        for (slot, t) in state.slots(p) {
            assert_eq!(state.get(p, slot), Some(t));
            total += t.data().len() as u64;
        }
    }
    assert_eq!(state.nbytes(), total);
    let out = dir.join("resaved.safetensors");
    if state.save(&out).is_ok() {
        let back = OptimizerState::load(&out);
        let back = back.unwrap_or_else(|e| panic!("OptimizerState::save wrote junk: {e}"));
        assert_eq!(back.kind, state.kind);
        assert_eq!(back.meta, state.meta);
        let slots = |s: &OptimizerState| -> Vec<(String, String, TensorView<'static>)> {
            s.params()
                .flat_map(|p| {
                    s.slots(p)
                        .map(|(k, t)| (p.to_string(), k.to_string(), t.clone()))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        assert_eq!(slots(&back), slots(&state));
    }
    true
}

/// 8. `kiln inspect` on arbitrary bytes: `kiln_formats::open`, then everything the
///    command prints (both its text and `--json` forms), then `verify` as `kiln verify`.
pub fn inspect(data: &[u8]) -> bool {
    let path = input("inspect", "input", data, Prepared::Shards);
    let Ok(c) = kiln_formats::open(&path) else {
        return false;
    };
    let _ = inspect_text(&path, c.as_ref());
    let _ = inspect_json(c.as_ref());
    let _ = c.verify();
    true
}

/// 9. GGUF: a file → `GgufFile::open`, every metadata value shown (JSON, summary) and
///    every tensor read, raw and through `TensorCollection`; then the file re-written
///    from what was read (`gguf::write`), which must succeed and read back the same.
pub fn gguf(data: &[u8]) -> bool {
    let path = input("gguf", "model.gguf", data, Prepared::Nothing);
    let Ok(f) = GgufFile::open(&path) else {
        return false;
    };
    for (_, v) in f.kv() {
        let _ = v.to_json().to_string();
        let _ = v.summary();
    }
    read_all(&f, true);
    let specs: Vec<TensorSpec> = f
        .gguf_tensors()
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ty: t.ty,
        })
        .collect();
    for (t, s) in f.gguf_tensors().iter().zip(&specs) {
        assert_eq!(s.nbytes().ok(), Some(t.nbytes), "{}", t.name);
        assert_eq!(f.raw(&t.name).map(<[u8]>::len).ok(), Some(t.nbytes));
    }
    // What kiln read, kiln writes (as version 3) and reads back the same.
    let out = scratch("gguf", Prepared::Nothing).join("rewritten.gguf");
    let written = kiln_formats::gguf::write(&out, f.kv(), &specs, |i, buf| {
        buf.extend_from_slice(f.raw(&specs[i].name)?);
        Ok(())
    });
    if let Err(e) = written {
        panic!("gguf::write refuses what GgufFile::open accepted: {e}");
    }
    let back = GgufFile::open(&out).unwrap_or_else(|e| panic!("gguf::write wrote junk: {e}"));
    assert_eq!(back.gguf_tensors().len(), specs.len());
    for (k, v) in f.kv() {
        let b = back.get(k);
        // NaN != NaN: compare what the values print.
        assert_eq!(b.map(|b| format!("{b:?}")), Some(format!("{v:?}")), "{k}");
    }
    for s in &specs {
        assert_eq!(back.raw(&s.name).ok(), f.raw(&s.name).ok(), "{}", s.name);
    }
    true
}

/// What `kiln inspect` prints (cli/src/main.rs, `inspect`), built the same way.
pub fn inspect_text(path: &Path, c: &dyn TensorCollection) -> String {
    let mut s = String::new();
    let infos = c.tensors();
    let _ = writeln!(s, "path:       {}", path.display());
    let _ = writeln!(s, "format:     {:?}", c.format());
    let _ = writeln!(s, "tensors:    {}", infos.len());
    let _ = writeln!(s, "parameters: {}", c.parameter_count());
    let _ = writeln!(s, "bytes:      {}", c.total_bytes());
    let mut hist: BTreeMap<DType, (usize, u64)> = BTreeMap::new();
    for t in infos {
        let e = hist.entry(t.dtype).or_default();
        e.0 += 1;
        e.1 += t.numel() as u64;
    }
    for (d, (n, params)) in hist {
        let _ = writeln!(
            s,
            "  {:<12} {n} tensors, {params} parameters",
            d.safetensors_name()
        );
    }
    for (k, v) in c.metadata() {
        let _ = writeln!(s, "  {k} = {v}");
    }
    let width = infos.iter().map(|t| t.name.len()).max().unwrap_or(0);
    for t in infos {
        let _ = writeln!(
            s,
            "{:<width$}  {:<11} {:?}",
            t.name,
            t.dtype.safetensors_name(),
            t.shape
        );
    }
    s
}

/// What `kiln inspect --json` prints.
pub fn inspect_json(c: &dyn TensorCollection) -> String {
    let tensors: Vec<_> = c
        .tensors()
        .iter()
        .map(|t| {
            serde_json::json!({"name": t.name, "dtype": t.dtype.safetensors_name(), "shape": t.shape, "bytes": t.nbytes()})
        })
        .collect();
    serde_json::json!({"metadata": c.metadata(), "tensors": tensors}).to_string()
}

/// Reads everything a collection offers. A collection that opened must read every
/// tensor it lists, with the dtype and shape it lists; `verify` may refuse (a CRC).
fn read_all(c: &dyn TensorCollection, tensors_must_read: bool) {
    let _ = c.format();
    let _ = c.metadata().len();
    let infos = c.tensors();
    let mut bytes = 0u64;
    let mut params = 0u64;
    for info in infos {
        assert_eq!(c.info(&info.name), Some(info));
        match c.tensor(&info.name) {
            Ok(t) => {
                assert_eq!(t.dtype(), info.dtype, "{}", info.name);
                assert_eq!(t.shape(), info.shape.as_slice(), "{}", info.name);
                assert_eq!(t.data().len(), info.nbytes(), "{}", info.name);
            }
            Err(e) if tensors_must_read => panic!("{} is listed but unreadable: {e}", info.name),
            Err(_) => {}
        }
        bytes = bytes
            .checked_add(info.nbytes() as u64)
            .unwrap_or_else(|| panic!("total bytes overflow"));
        params = params
            .checked_add(info.numel() as u64)
            .unwrap_or_else(|| panic!("parameter count overflow"));
    }
    assert_eq!(c.total_bytes(), bytes);
    assert_eq!(c.parameter_count(), params);
    let _ = c.verify();
}

/// Both collections hold the same tensors (in any order: safetensors sorts them),
/// byte for byte.
fn same_tensors(a: &dyn TensorCollection, b: &dyn TensorCollection) {
    let names = |c: &dyn TensorCollection| -> Vec<String> {
        let mut names: Vec<String> = c.tensors().iter().map(|t| t.name.clone()).collect();
        names.sort();
        names
    };
    assert_eq!(names(a), names(b));
    for info in a.tensors() {
        if let (Ok(x), Ok(y)) = (a.tensor(&info.name), b.tensor(&info.name)) {
            assert_eq!(x, y, "{}", info.name);
        }
    }
}

/// Touches every node of a pickle tree (iteratively: trees may be deep).
fn walk(root: &Value) {
    let mut todo = vec![root];
    while let Some(v) = todo.pop() {
        let _ = v.type_name();
        let _ = (v.as_str(), v.as_int(), v.as_f64(), v.as_tensor());
        match v {
            Value::List(items) | Value::Tuple(items) | Value::Set(items) => todo.extend(items),
            Value::Dict(items) | Value::OrderedDict(items) => {
                for (k, v) in items {
                    todo.push(k);
                    todo.push(v);
                }
            }
            Value::Tensor(t) => {
                let _ = (t.numel(), t.is_contiguous());
            }
            _ => {}
        }
    }
    for (_, t) in root.tensors() {
        let _ = t.numel();
    }
}

/// What a target's scratch folder holds besides the input.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prepared {
    Nothing,
    /// The valid shards of [`SHARD_FILES`].
    Shards,
}

thread_local! {
    static SCRATCH: RefCell<Option<(tempfile::TempDir, HashMap<&'static str, PathBuf>)>> =
        const { RefCell::new(None) };
}

/// The scratch folder of `target` on this thread, made (and prepared) on first use.
fn scratch(target: &'static str, prepared: Prepared) -> PathBuf {
    SCRATCH.with(|cell| {
        let mut cell = cell.borrow_mut();
        let (root, dirs) = cell.get_or_insert_with(|| {
            // A tmpfs unless TMPDIR says otherwise: the writers fsync.
            let shm = Path::new("/dev/shm");
            let base = match std::env::var_os("TMPDIR") {
                None if shm.is_dir() => shm.to_path_buf(),
                _ => std::env::temp_dir(),
            };
            let root = tempfile::Builder::new()
                .prefix("kiln-fuzz-")
                .tempdir_in(&base)
                .unwrap_or_else(|e| {
                    panic!("cannot make a scratch folder in {}: {e}", base.display())
                });
            (root, HashMap::new())
        });
        dirs.entry(target)
            .or_insert_with(|| {
                let dir = root.path().join(target);
                std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
                if prepared == Prepared::Shards {
                    write_shards(&dir);
                }
                dir
            })
            .clone()
    })
}

/// Writes `data` as `name` in `target`'s scratch folder and returns its path.
fn input(target: &'static str, name: &str, data: &[u8], prepared: Prepared) -> PathBuf {
    let path = scratch(target, prepared).join(name);
    write(&path, data);
    path
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Two safetensors shards and one PyTorch shard, all valid:
/// `a` F32 [2, 3] and `b` I64 [2] in the first, `c` BF16 [4] and `d` BOOL [3] in the
/// second, `e` F16 [2, 2] and `f` U8 [0] in the `.bin`.
fn write_shards(dir: &Path) {
    let view = |dtype: DType, shape: Vec<usize>| {
        let n = shape.iter().product::<usize>() * dtype.size();
        let data: Vec<u8> = (0..n)
            .map(|i| {
                if dtype == DType::Bool {
                    (i % 2) as u8
                } else {
                    i as u8
                }
            })
            .collect();
        TensorView::new(dtype, shape, data).unwrap_or_else(|e| panic!("{e}"))
    };
    let shards: [(&str, Vec<(&str, TensorView<'static>)>); 3] = [
        (
            SHARD_FILES[0],
            vec![
                ("a", view(DType::F32, vec![2, 3])),
                ("b", view(DType::I64, vec![2])),
            ],
        ),
        (
            SHARD_FILES[1],
            vec![
                ("c", view(DType::BF16, vec![4])),
                ("d", view(DType::Bool, vec![3])),
            ],
        ),
        (
            SHARD_FILES[2],
            vec![
                ("e", view(DType::F16, vec![2, 2])),
                ("f", view(DType::U8, vec![0])),
            ],
        ),
    ];
    for (file, tensors) in shards {
        let mut map = TensorMap::new();
        for (name, t) in tensors {
            map.insert(name, t).unwrap_or_else(|e| panic!("{e}"));
        }
        map.set_metadata("format", "pt");
        let path = dir.join(file);
        let saved = if file.ends_with(".bin") {
            kiln_formats::torch::save(&path, &map)
        } else {
            kiln_formats::safetensors::save(&path, &map)
        };
        saved.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
