//! Shared helpers of the integration tests: where things are, running the `kiln` binary,
//! hashing tensor bytes, reading fixture manifests, finding Python.
//!
//! Each test crate uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::formats::{self, DType, Format, TensorCollection, TensorMap, TensorView};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The repository root (the facade package's folder).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/fixtures/torch/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures/torch").join(rel)
}

/// `tests/attacks/<rel>`.
pub fn attack(rel: &str) -> PathBuf {
    repo().join("tests/attacks").join(rel)
}

// Running the `kiln` binary: shared with the other crates' tests.
#[allow(unused_imports)] // not every test binary uses all four
pub use kiln_test_support::bin::{Run, assert_mentions, kiln, kiln_bin};

/// Lower-case hex sha256.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One tensor of a manifest (or any expectation): dtype, shape, byte count and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub nbytes: usize,
    pub sha256: String,
    /// safetensors only: `[begin, end]` in its file.
    pub offsets: Option<(u64, u64)>,
    /// sharded sets only: the file the tensor is in.
    pub file: Option<String>,
}

/// A fixture manifest (`X.manifest.json`, written by make_fixtures.py).
#[derive(Clone, Debug)]
pub struct Manifest {
    pub path: String,
    pub format: String,
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<Expected>,
}

impl Manifest {
    pub fn load(manifest_path: &Path) -> Manifest {
        let text = std::fs::read_to_string(manifest_path)
            .unwrap_or_else(|e| panic!("{}: {e}", manifest_path.display()));
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", manifest_path.display()));
        let ctx = manifest_path.display().to_string();
        let s = |v: &Value, k: &str| -> String {
            v[k].as_str()
                .unwrap_or_else(|| panic!("{ctx}: {k} is not a string"))
                .to_string()
        };
        let metadata = v["metadata"]
            .as_object()
            .unwrap_or_else(|| panic!("{ctx}: metadata"))
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("metadata value").to_string()))
            .collect();
        let tensors = v["tensors"]
            .as_array()
            .unwrap_or_else(|| panic!("{ctx}: tensors"))
            .iter()
            .map(|t| {
                let dtype_name = s(t, "dtype");
                Expected {
                    name: s(t, "name"),
                    dtype: DType::from_safetensors_name(&dtype_name)
                        .unwrap_or_else(|| panic!("{ctx}: unknown dtype {dtype_name}")),
                    shape: t["shape"]
                        .as_array()
                        .expect("shape")
                        .iter()
                        .map(|d| d.as_u64().expect("dim") as usize)
                        .collect(),
                    nbytes: t["nbytes"].as_u64().expect("nbytes") as usize,
                    sha256: s(t, "sha256"),
                    offsets: t["offsets"]
                        .as_array()
                        .map(|o| (o[0].as_u64().expect("begin"), o[1].as_u64().expect("end"))),
                    file: t["file"].as_str().map(str::to_string),
                }
            })
            .collect();
        Manifest {
            path: s(&v, "path"),
            format: s(&v, "format"),
            metadata,
            tensors,
        }
    }

    /// The manifest of fixture `rel` (`tests/fixtures/torch/<rel>.manifest.json`).
    pub fn of_fixture(rel: &str) -> Manifest {
        Manifest::load(&fixture(&format!("{rel}.manifest.json")))
    }
}

/// Panics unless `collection` holds exactly `expected` (any order): names, dtypes, shapes
/// and the sha256 of every tensor's bytes. `what` names the collection in messages.
pub fn assert_same_tensors(collection: &dyn TensorCollection, expected: &[Expected], what: &str) {
    let mut want: Vec<&str> = expected.iter().map(|e| e.name.as_str()).collect();
    let mut got: Vec<&str> = collection
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want, "{what}: tensor names");
    for e in expected {
        let info = collection
            .info(&e.name)
            .unwrap_or_else(|| panic!("{what}: no info for {}", e.name));
        assert_eq!(
            (info.dtype, &info.shape),
            (e.dtype, &e.shape),
            "{what}: {} dtype/shape in the listing",
            e.name
        );
        let t = collection
            .tensor(&e.name)
            .unwrap_or_else(|err| panic!("{what}: reading {}: {err}", e.name));
        assert_eq!(
            (t.dtype(), t.shape()),
            (e.dtype, e.shape.as_slice()),
            "{what}: {} dtype/shape of the tensor read",
            e.name
        );
        assert_eq!(t.data().len(), e.nbytes, "{what}: {} byte length", e.name);
        assert_eq!(
            sha256_hex(t.data()),
            e.sha256,
            "{what}: {} bytes differ from the expected ones",
            e.name
        );
    }
}

/// The expectations of every tensor of a collection (computed from its bytes).
pub fn expectations_of(collection: &dyn TensorCollection) -> Vec<Expected> {
    collection
        .tensors()
        .iter()
        .map(|info| {
            let t = collection
                .tensor(&info.name)
                .unwrap_or_else(|e| panic!("reading {}: {e}", info.name));
            Expected {
                name: info.name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                nbytes: t.data().len(),
                sha256: sha256_hex(t.data()),
                offsets: None,
                file: None,
            }
        })
        .collect()
}

/// Deterministic bytes (xorshift), so tests need no RNG crate.
pub fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Valid bytes for `n` elements of `dtype` (bool must be 0 or 1; the rest may be any
/// bit pattern, NaNs included, which is what a bit-exact round trip must keep).
pub fn sample_bytes(dtype: DType, numel: usize, seed: u64) -> Vec<u8> {
    let mut b = pseudo_random_bytes(numel * dtype.size(), seed);
    if dtype == DType::Bool {
        b.iter_mut().for_each(|x| *x &= 1);
    }
    b
}

/// One tensor of every dtype kiln knows, plus 0-d and empty tensors of several ranks.
pub fn every_dtype_map() -> TensorMap<'static> {
    let mut map = TensorMap::new();
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let shape = if i % 2 == 0 {
            vec![2, 3]
        } else {
            vec![3, 1, 2]
        };
        let data = sample_bytes(dtype, 6, i as u64 + 1);
        map.insert(
            format!("t.{}", dtype.torch_name()),
            TensorView::new(dtype, shape, data).expect("view"),
        )
        .expect("insert");
    }
    let extra: [(&str, DType, Vec<usize>); 6] = [
        ("scalar.f32", DType::F32, vec![]),
        ("scalar.i64", DType::I64, vec![]),
        ("scalar.bf16", DType::BF16, vec![]),
        ("empty.f32", DType::F32, vec![0]),
        ("empty.f16.2x0x3", DType::F16, vec![2, 0, 3]),
        ("rank4.u8", DType::U8, vec![2, 1, 3, 2]),
    ];
    for (i, (name, dtype, shape)) in extra.into_iter().enumerate() {
        let numel: usize = shape.iter().product();
        let data = sample_bytes(dtype, numel, 100 + i as u64);
        map.insert(name, TensorView::new(dtype, shape, data).expect("view"))
            .expect("insert");
    }
    map
}

/// The Python of `kiln_test_support::python`, or — when there is none — prints `skipping: <reason>` and
/// returns from the test (a failure instead under `KILN_REQUIRE_PYTHON=1`, as in CI).
#[macro_export]
macro_rules! python_or_skip {
    () => {
        match kiln_test_support::python_or_skip() {
            Some(py) => py,
            None => return,
        }
    };
}

/// Runs a Python snippet with `args` (sys.argv[1..]); panics with its output on failure.
/// Returns stdout.
pub fn run_python<A: AsRef<std::ffi::OsStr>>(py: &Path, script: &str, args: &[A]) -> String {
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .env("PYTHONHASHSEED", "0")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("HF_HUB_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python failed ({:?})\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The last line of stdout parsed as JSON (Python prints its result there).
pub fn last_json_line(stdout: &str) -> Value {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// The weight files of a folder (shards or single files), sorted.
pub fn weight_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") || n.ends_with(".bin"))
        .collect();
    v.sort();
    v
}

/// Checks a sharded folder against Hugging Face's rules, for tensors taken in
/// `order` (name, bytes): file names, index layout, totals, and the greedy split.
pub fn check_hf_sharding(dir: &Path, format: Format, order: &[(String, u64)], max: u64) {
    let (prefix, ext, index_name) = match format {
        Format::Safetensors => ("model", "safetensors", "model.safetensors.index.json"),
        Format::PyTorch => ("pytorch_model", "bin", "pytorch_model.bin.index.json"),
    };
    let files = weight_files(dir);
    let n = files.len();
    assert!(n > 1, "{}: expected shards, got {files:?}", dir.display());
    let want: Vec<String> = (1..=n)
        .map(|i| format!("{prefix}-{i:05}-of-{n:05}.{ext}"))
        .collect();
    assert_eq!(files, want, "shard names");

    let text = std::fs::read_to_string(dir.join(index_name)).unwrap();
    assert!(
        text.starts_with("{\n  \"metadata\": {\n") && text.ends_with("}\n"),
        "index not written as json.dumps(indent=2, sort_keys=True) + newline:\n{text}"
    );
    let index: Value = serde_json::from_str(&text).unwrap();
    let total_size: u64 = order.iter().map(|(_, b)| b).sum();
    assert_eq!(
        index["metadata"]["total_size"],
        Value::from(total_size),
        "total_size"
    );
    let weight_map = index["weight_map"].as_object().expect("weight_map");
    let keys: Vec<&String> = weight_map.keys().collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "weight_map keys sorted");
    assert_eq!(
        weight_map.len(),
        order.len(),
        "weight_map covers every tensor"
    );

    // Shards hold consecutive runs of `order`, each run as long as fits in `max`
    // (a tensor over `max` alone).
    let mut runs: Vec<Vec<(String, u64)>> = Vec::new();
    let mut last_file = None;
    for (name, bytes) in order {
        let file = weight_map[name].as_str().expect("file name");
        assert!(
            files.iter().any(|f| f == file),
            "{name} in unknown file {file}"
        );
        if last_file != Some(file) || *bytes > max {
            runs.push(Vec::new());
        }
        runs.last_mut().unwrap().push((name.clone(), *bytes));
        last_file = Some(file);
    }
    for w in runs.windows(2) {
        let size: u64 = w[0].iter().map(|t| t.1).sum();
        assert!(
            w[0].len() == 1 || size <= max,
            "shard over the limit: {:?}",
            w[0]
        );
        if w[0].len() > 1 || w[0][0].1 <= max {
            let next = w[1][0].1;
            assert!(
                size + next > max || next > max,
                "shard closed early: {:?} then {:?}",
                w[0],
                w[1][0]
            );
        }
    }
    let c = formats::open(dir).unwrap();
    assert_eq!(
        index["metadata"]["total_parameters"],
        Value::from(c.parameter_count()),
        "total_parameters"
    );
}

/// A small, fast BERT run on a slice of the bundled data.
pub fn tiny_bert_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        repo()
            .join("cli/bundled/bert-sentiment.toml")
            .to_str()
            .unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--train_file",
        repo()
            .join("cli/bundled/sentiment/train.jsonl")
            .to_str()
            .unwrap(),
        "--validation_file",
        repo()
            .join("cli/bundled/sentiment/validation.jsonl")
            .to_str()
            .unwrap(),
        "--hidden_size",
        "16",
        "--intermediate_size",
        "32",
        "--num_hidden_layers",
        "1",
        "--max_train_samples",
        "96",
        "--max_eval_samples",
        "32",
        "--per_device_train_batch_size",
        "8",
        "--max_steps",
        "8",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "4",
        "--save_strategy",
        "steps",
        "--save_steps",
        "4",
        "--logging_steps",
        "2",
        "--disable_tqdm",
        "true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A causal LM config of `data/configs` (`gpt2-corpus.toml`, `llama-corpus.toml`) on
/// the bundled corpus, shrunk to seconds: blocks of 32 tokens, a 300-token vocabulary,
/// 32 training samples, 2 steps saved at 2; `extra` flags after.
pub fn causal_args(config: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "train".into(),
        repo()
            .join("data/configs")
            .join(config)
            .display()
            .to_string(),
        "--output_dir".into(),
        out.display().to_string(),
        "--train_file".into(),
        repo().join("data/corpus/train.txt").display().to_string(),
        "--validation_file".into(),
        repo()
            .join("data/corpus/validation.txt")
            .display()
            .to_string(),
        "--block_size".into(),
        "32".into(),
        "--vocab_size".into(),
        "300".into(),
        "--max_train_samples".into(),
        "32".into(),
        "--max_steps".into(),
        "2".into(),
        "--save_steps".into(),
        "2".into(),
        "--disable_tqdm".into(),
        "true".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A tiny GPT-2 on the bundled corpus: 4 steps of 4 blocks of 32 tokens, logged every
/// step, evaluated and saved every 2 steps; `extra` flags after (a later flag wins).
pub fn logged_gpt2_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = causal_args(
        "gpt2-corpus.toml",
        out,
        &[
            "--n_embd",
            "32",
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "8",
            "--per_device_train_batch_size",
            "4",
            "--max_steps",
            "4",
            "--logging_steps",
            "1",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
            "--save_strategy",
            "steps",
        ],
    );
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The weights of a model folder, owned.
pub fn weights_of(dir: &Path) -> kiln::formats::TensorMap<'static> {
    let c = kiln::formats::open(dir).unwrap();
    let mut m = kiln::formats::TensorMap::new();
    for i in c.tensors() {
        m.insert(i.name.clone(), c.tensor(&i.name).unwrap().into_owned())
            .unwrap();
    }
    m
}

/// Flags that turn evaluation (and the best-model tracking it feeds) off.
pub const NO_EVAL: [&str; 6] = [
    "--eval_strategy",
    "no",
    "--load_best_model_at_end",
    "false",
    "--metric_for_best_model",
    "none",
];

/// [`tiny_bert_args`] with `extra`, resuming from the last complete checkpoint when
/// `out` has one (a run killed before its first save starts over).
pub fn resume_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = tiny_bert_args(out, extra);
    let has_checkpoint = out.exists()
        && kiln::checkpoint::scan::last_checkpoint(out)
            .unwrap()
            .is_some();
    if has_checkpoint {
        args.extend(["--resume_from_checkpoint".to_string(), "last".to_string()]);
    }
    args
}
