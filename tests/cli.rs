//! The `kiln` binary end to end: inspect (text and JSON), convert round trips between
//! safetensors, .bin and sharded folders, diff, verify, and usage errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::{Manifest, assert_same_tensors, check_hf_sharding, fixture, kiln, weight_files};
use kiln::formats::{self, DType, Format, TensorMap, TensorView};
use serde_json::Value;

fn s(p: &Path) -> &std::ffi::OsStr {
    p.as_os_str()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes a safetensors file with the library.
fn write_st(path: &Path, tensors: Vec<(&str, DType, Vec<usize>, Vec<u8>)>) {
    let mut map = TensorMap::new();
    for (name, dtype, shape, data) in tensors {
        map.insert(name, TensorView::new(dtype, shape, data).unwrap())
            .unwrap();
    }
    formats::safetensors::save(path, &map).unwrap();
}

/// Checks a converted collection against a manifest, through the library and through
/// `kiln diff --atol 0` against the original.
fn check_converted(original: &Path, converted: &Path, manifest: &Manifest, format: Format) {
    let what = converted.display().to_string();
    let c = formats::open(converted).unwrap_or_else(|e| panic!("open {what}: {e}"));
    assert_eq!(c.format(), Some(format), "{what}: format");
    assert_same_tensors(c.as_ref(), &manifest.tensors, &what);
    c.verify().unwrap_or_else(|e| panic!("verify {what}: {e}"));
    kiln([
        "diff".as_ref(),
        s(original),
        s(converted),
        "--atol".as_ref(),
        "0".as_ref(),
    ])
    .expect_success();
    kiln(["diff".as_ref(), s(converted), s(original)]).expect_success();
}

// ------------------------------------------------------------------------- inspect

#[test]
fn inspect_text_names_every_tensor_dtype_and_metadata() {
    let m = Manifest::of_fixture("st_all_dtypes.safetensors");
    let run = kiln(["inspect".as_ref(), s(&fixture("st_all_dtypes.safetensors"))]);
    run.expect_success();
    for t in &m.tensors {
        assert!(
            run.stdout.contains(&t.name),
            "no {} in:\n{}",
            t.name,
            run.stdout
        );
        assert!(
            run.stdout.contains(t.dtype.safetensors_name()),
            "no {} in:\n{}",
            t.dtype,
            run.stdout
        );
    }
    for (k, v) in &m.metadata {
        assert!(
            run.stdout.contains(k) && run.stdout.contains(v),
            "metadata {k}={v} not shown:\n{}",
            run.stdout
        );
    }
    assert!(run.stderr.is_empty(), "{}", run.stderr);
}

/// `inspect --json` is `{"format", "metadata", "tensors": [{"name","dtype","shape","bytes"}]}`.
fn check_inspect_json(rel: &str) {
    let m = Manifest::of_fixture(rel);
    let run = kiln(["inspect".as_ref(), "--json".as_ref(), s(&fixture(rel))]);
    run.expect_success();
    let v = run.json();
    assert_eq!(v["format"], Value::from(m.format.as_str()), "{rel}: format");
    let metadata: BTreeMap<String, String> = v["metadata"]
        .as_object()
        .unwrap_or_else(|| panic!("{rel}: metadata is not an object: {v}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("string metadata").to_string()))
        .collect();
    if !fixture(rel).is_dir() {
        assert_eq!(metadata, m.metadata, "{rel}: metadata");
    }
    let tensors = v["tensors"].as_array().expect("tensors array");
    assert_eq!(tensors.len(), m.tensors.len(), "{rel}: tensor count");
    let by_name: BTreeMap<&str, &Value> = tensors
        .iter()
        .map(|t| (t["name"].as_str().expect("name"), t))
        .collect();
    for e in &m.tensors {
        let t = by_name
            .get(e.name.as_str())
            .unwrap_or_else(|| panic!("{rel}: {} missing from --json", e.name));
        assert_eq!(
            t["dtype"],
            Value::from(e.dtype.safetensors_name()),
            "{rel}: {}",
            e.name
        );
        assert_eq!(
            t["shape"],
            Value::from(e.shape.clone()),
            "{rel}: {}",
            e.name
        );
        assert_eq!(t["bytes"], Value::from(e.nbytes), "{rel}: {}", e.name);
    }
    if m.format == "pytorch" && !fixture(rel).is_dir() {
        let order: Vec<&str> = tensors
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        let want: Vec<&str> = m.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(order, want, "{rel}: order");
    }
}

#[test]
fn inspect_json_safetensors_file() {
    check_inspect_json("st_all_dtypes.safetensors");
}

#[test]
fn inspect_json_sharded_model_folder() {
    check_inspect_json("tiny_bert_sharded");
    check_inspect_json("precedence");
}

#[test]
fn inspect_json_torch_file() {
    check_inspect_json("views.pt");
    check_inspect_json("optimizer.pt");
}

// ------------------------------------------------------------------------- convert

/// safetensors file -> safetensors file -> sharded folder -> one file: everything kept,
/// metadata included.
#[test]
fn convert_round_trip_through_safetensors_and_a_sharded_folder() {
    let rel = "st_all_dtypes.safetensors";
    let m = Manifest::of_fixture(rel);
    let src = fixture(rel);
    let tmp = tempfile::tempdir().unwrap();

    let a = tmp.path().join("a.safetensors");
    kiln(["convert".as_ref(), s(&src), s(&a)]).expect_success();
    check_converted(&src, &a, &m, Format::Safetensors);
    assert_eq!(
        formats::open(&a).unwrap().metadata(),
        &m.metadata,
        "file to file keeps metadata"
    );

    let dir = tmp.path().join("sharded");
    kiln([
        "convert".as_ref(),
        s(&a),
        s(&dir),
        "--max-shard-size".as_ref(),
        "100".as_ref(),
    ])
    .expect_success();
    let shards = weight_files(&dir);
    assert!(shards.len() > 2, "expected several shards: {shards:?}");
    assert!(dir.join("model.safetensors.index.json").is_file());
    check_converted(&src, &dir, &m, Format::Safetensors);
    let meta = formats::open(&dir).unwrap().metadata().clone();
    for (k, v) in &m.metadata {
        assert_eq!(meta.get(k), Some(v), "sharded folder lost metadata {k}");
    }

    let back = tmp.path().join("back.safetensors");
    kiln(["convert".as_ref(), s(&dir), s(&back)]).expect_success();
    check_converted(&src, &back, &m, Format::Safetensors);
}

/// safetensors -> .bin -> safetensors, and .bin -> sharded .bin folder -> sharded
/// safetensors folder -> .bin: names, dtypes, shapes and bytes kept.
#[test]
fn convert_round_trip_through_bin() {
    let rel = "st_all_dtypes.safetensors";
    let m = Manifest::of_fixture(rel);
    let src = fixture(rel);
    let tmp = tempfile::tempdir().unwrap();

    let bin = tmp.path().join("a.bin");
    kiln(["convert".as_ref(), s(&src), s(&bin)]).expect_success();
    check_converted(&src, &bin, &m, Format::PyTorch);

    let st = tmp.path().join("b.safetensors");
    kiln(["convert".as_ref(), s(&bin), s(&st)]).expect_success();
    check_converted(&src, &st, &m, Format::Safetensors);

    // --to overrides the extension.
    let forced = tmp.path().join("c.safetensors");
    kiln([
        "convert".as_ref(),
        s(&src),
        s(&forced),
        "--to".as_ref(),
        "bin".as_ref(),
    ])
    .expect_success();
    check_converted(&src, &forced, &m, Format::PyTorch);

    let bin_dir = tmp.path().join("bin_dir");
    kiln([
        "convert".as_ref(),
        s(&bin),
        s(&bin_dir),
        "--to".as_ref(),
        "bin".as_ref(),
        "--max-shard-size".as_ref(),
        "100".as_ref(),
    ])
    .expect_success();
    assert!(bin_dir.join("pytorch_model.bin.index.json").is_file());
    assert!(weight_files(&bin_dir).len() > 2);
    check_converted(&src, &bin_dir, &m, Format::PyTorch);

    let st_dir = tmp.path().join("st_dir");
    kiln([
        "convert".as_ref(),
        s(&bin_dir),
        s(&st_dir),
        "--max-shard-size".as_ref(),
        "200".as_ref(),
    ])
    .expect_success();
    check_converted(&src, &st_dir, &m, Format::Safetensors);

    let last = tmp.path().join("last.bin");
    kiln(["convert".as_ref(), s(&st_dir), s(&last)]).expect_success();
    check_converted(&src, &last, &m, Format::PyTorch);
}

/// A torch file with shared storage and views converts to safetensors as separate,
/// contiguous tensors with the same values.
#[test]
fn convert_torch_views_to_safetensors() {
    let rel = "views.pt";
    let m = Manifest::of_fixture(rel);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("views.safetensors");
    kiln(["convert".as_ref(), s(&fixture(rel)), s(&out)]).expect_success();
    check_converted(&fixture(rel), &out, &m, Format::Safetensors);
}

/// Converting a transformers model folder: HF shard names and index, config copied,
/// one shard written as model.safetensors without an index, stale files removed.
#[test]
fn convert_model_folder_shards_like_hugging_face() {
    let src = fixture("tiny_bert_sharded");
    let m = Manifest::of_fixture("tiny_bert_sharded");
    let order: Vec<(String, u64)> = formats::open(&src)
        .unwrap()
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.nbytes() as u64))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");

    kiln([
        "convert".as_ref(),
        s(&src),
        s(&out),
        "--max-shard-size".as_ref(),
        "7KB".as_ref(),
    ])
    .expect_success();
    check_hf_sharding(&out, Format::Safetensors, &order, 7_000);
    check_converted(&src, &out, &m, Format::Safetensors);
    assert_eq!(
        std::fs::read(out.join("config.json")).unwrap(),
        std::fs::read(src.join("config.json")).unwrap(),
        "config.json copied as is"
    );

    // Again into the same folder, in one shard: the shards and index of the first save go.
    kiln(["convert".as_ref(), s(&src), s(&out)]).expect_success();
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["config.json", "model.safetensors"],
        "stale shards removed"
    );
    check_converted(&src, &out, &m, Format::Safetensors);
}

#[test]
fn convert_model_folder_to_sharded_bin() {
    let src = fixture("tiny_bert_sharded");
    let m = Manifest::of_fixture("tiny_bert_sharded");
    let order: Vec<(String, u64)> = formats::open(&src)
        .unwrap()
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.nbytes() as u64))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bin_out");
    kiln([
        "convert".as_ref(),
        s(&src),
        s(&out),
        "--to".as_ref(),
        "bin".as_ref(),
        "--max-shard-size".as_ref(),
        "0.007MB".as_ref(),
    ])
    .expect_success();
    check_hf_sharding(&out, Format::PyTorch, &order, 7_000);
    check_converted(&src, &out, &m, Format::PyTorch);
    assert!(out.join("config.json").is_file(), "config.json copied");
    assert!(!out.join("model.safetensors.index.json").exists());
}

/// The other files of a model folder (config, tokenizer) are copied byte for byte; the
/// input's weight files are not.
#[test]
fn convert_copies_config_and_tokenizer_files() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("model");
    std::fs::create_dir(&src).unwrap();
    write_st(
        &src.join("model.safetensors"),
        vec![("w", DType::F32, vec![2], f32_bytes(&[1.0, 2.0]))],
    );
    let companions = [
        ("config.json", "{\"model_type\": \"bert\"}\n"),
        ("tokenizer.json", "{\"version\": \"1.0\"}\n"),
        ("tokenizer_config.json", "{}\n"),
        ("special_tokens_map.json", "{\"pad_token\": \"[PAD]\"}\n"),
        ("vocab.txt", "[PAD]\n[UNK]\nhello\n"),
    ];
    for (name, text) in companions {
        std::fs::write(src.join(name), text).unwrap();
    }
    let out = tmp.path().join("out");
    kiln(["convert".as_ref(), s(&src), s(&out)]).expect_success();
    for (name, text) in companions {
        assert_eq!(
            std::fs::read_to_string(out.join(name)).unwrap_or_default(),
            text,
            "{name} not copied as is"
        );
    }
    let mut names: BTreeSet<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.remove("model.safetensors"));
    let want: BTreeSet<String> = companions.iter().map(|c| c.0.to_string()).collect();
    assert_eq!(names, want, "nothing else written");
}

// ------------------------------------------------------------------------- diff

/// Two files differing as asked, in a temp folder.
struct DiffCase {
    _tmp: tempfile::TempDir,
    a: PathBuf,
    dir: PathBuf,
}

impl DiffCase {
    fn new() -> DiffCase {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let a = dir.join("a.safetensors");
        write_st(&a, DiffCase::base(|_| {}));
        DiffCase { _tmp: tmp, a, dir }
    }

    /// a: F32 [4] (1, 2, 3, 4) with a NaN-free f32; b: I64 [1]; c: F64 [2] with a NaN.
    fn base(
        edit: impl FnOnce(&mut Vec<(&'static str, DType, Vec<usize>, Vec<u8>)>),
    ) -> Vec<(&'static str, DType, Vec<usize>, Vec<u8>)> {
        let mut v = vec![
            ("a", DType::F32, vec![4], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
            ("b", DType::I64, vec![1], 5i64.to_le_bytes().to_vec()),
            ("c", DType::F64, vec![2], f64_bytes(&[f64::NAN, -0.5])),
        ];
        edit(&mut v);
        v
    }

    fn variant(
        &self,
        name: &str,
        edit: impl FnOnce(&mut Vec<(&'static str, DType, Vec<usize>, Vec<u8>)>),
    ) -> PathBuf {
        let p = self.dir.join(format!("{name}.safetensors"));
        write_st(&p, DiffCase::base(edit));
        p
    }

    fn diff(&self, b: &Path, extra: &[&str]) -> common::Run {
        let mut args: Vec<&std::ffi::OsStr> = vec!["diff".as_ref(), s(&self.a), s(b)];
        args.extend(extra.iter().map(|x| std::ffi::OsStr::new(*x)));
        kiln(args)
    }
}

#[test]
fn diff_identical_files_and_a_file_with_itself() {
    let d = DiffCase::new();
    let same = d.variant("same", |_| {});
    d.diff(&same, &[]).expect_success();
    d.diff(&d.a, &["--atol", "0"]).expect_success();
}

#[test]
fn diff_detects_a_changed_value_and_tolerances_work() {
    let d = DiffCase::new();
    let changed = d.variant("changed", |v| v[0].3 = f32_bytes(&[1.0, 2.0, 3.001, 4.0]));
    let run = d.diff(&changed, &[]);
    run.expect_code(1);
    assert!(
        (run.stdout.clone() + &run.stderr).contains('a'),
        "diff should name the tensor: {run:?}"
    );
    d.diff(&changed, &["--atol", "0"]).expect_code(1);
    d.diff(&changed, &["--atol", "1e-5"]).expect_code(1);
    d.diff(&changed, &["--atol", "1e-2"]).expect_success();
    d.diff(&changed, &["--rtol", "1e-2"]).expect_success();
    d.diff(&changed, &["--rtol", "1e-6"]).expect_code(1);
    d.diff(&changed, &["--atol", "1e-4", "--rtol", "1e-3"])
        .expect_success();
}

#[test]
fn diff_detects_missing_extra_dtype_and_shape_differences() {
    let d = DiffCase::new();
    let missing = d.variant("missing", |v| {
        v.remove(1);
    });
    let run = d.diff(&missing, &["--atol", "1"]);
    run.expect_code(1);
    assert!(
        run.stdout.contains('b') || run.stderr.contains('b'),
        "{run:?}"
    );

    let extra = d.variant("extra", |v| v.push(("z", DType::U8, vec![1], vec![7])));
    d.diff(&extra, &["--atol", "1"]).expect_code(1);

    let dtype = d.variant("dtype", |v| {
        v[0] = ("a", DType::F64, vec![4], f64_bytes(&[1.0, 2.0, 3.0, 4.0]));
    });
    d.diff(&dtype, &["--atol", "1"]).expect_code(1);

    let shape = d.variant("shape", |v| v[0].2 = vec![2, 2]);
    d.diff(&shape, &["--atol", "1"]).expect_code(1);
}

/// The same tensors in .bin and safetensors are equal for diff.
#[test]
fn diff_across_formats() {
    let d = DiffCase::new();
    let bin = d.dir.join("a.bin");
    kiln(["convert".as_ref(), s(&d.a), s(&bin)]).expect_success();
    d.diff(&bin, &[]).expect_success();
    let changed = d.variant("changed", |v| v[1].3 = 6i64.to_le_bytes().to_vec());
    kiln(["diff".as_ref(), s(&bin), s(&changed)]).expect_code(1);
}

// ------------------------------------------------------------------------- verify

fn verify_fixtures(format: &str) {
    let mut n = 0;
    for entry in std::fs::read_dir(fixture("")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(rel) = name.strip_suffix(".manifest.json")
            && Manifest::of_fixture(rel).format == format
        {
            kiln(["verify".as_ref(), s(&fixture(rel))]).expect_success();
            n += 1;
        }
    }
    assert!(n >= 3, "only {n} {format} fixtures");
}

#[test]
fn verify_accepts_safetensors_fixtures() {
    verify_fixtures("safetensors");
}

#[test]
fn verify_accepts_torch_fixtures() {
    verify_fixtures("pytorch");
}

/// A flipped byte inside a stored zip record is caught by its CRC.
#[test]
fn verify_catches_a_flipped_byte_in_a_zip_record() {
    let tmp = tempfile::tempdir().unwrap();
    let pattern: Vec<u8> = (0..256u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut map = TensorMap::new();
    map.insert(
        "first",
        TensorView::new(DType::F32, vec![3], f32_bytes(&[1.0, 2.0, 3.0])).unwrap(),
    )
    .unwrap();
    map.insert(
        "pattern",
        TensorView::new(DType::U8, vec![16, 16], pattern.clone()).unwrap(),
    )
    .unwrap();
    let path = tmp.path().join("model.bin");
    formats::torch::save(&path, &map).unwrap();
    kiln(["verify".as_ref(), s(&path)]).expect_success();

    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(pattern.len())
        .position(|w| w == pattern.as_slice())
        .expect("the tensor's bytes are stored as they are");
    bytes[at + 100] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let line = kiln(["verify".as_ref(), s(&path)])
        .expect_error(&["crc", "checksum"])
        .to_string();
    assert!(line.contains("model.bin"), "{line}");
    assert!(formats::open(&path).and_then(|c| c.verify()).is_err());
}

/// A safetensors file missing its last byte is refused.
#[test]
fn verify_catches_a_truncated_safetensors_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    write_st(
        &path,
        vec![("w", DType::F32, vec![8], f32_bytes(&[0.5; 8]))],
    );
    kiln(["verify".as_ref(), s(&path)]).expect_success();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let line = kiln(["verify".as_ref(), s(&path)])
        .expect_error(&["truncat", "end", "short", "length", "size"])
        .to_string();
    assert!(line.contains("model.safetensors"), "{line}");
}

// ------------------------------------------------------------------------- errors

#[test]
fn usage_errors_exit_2() {
    let st = fixture("st_shapes.safetensors");
    let st = st.to_str().unwrap();
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["inspect"],
        &["inspect", st, "--no-such-flag"],
        &["verify"],
        &["convert", st],
        &["convert", st, "/tmp/x.bin", "--to", "zip"],
        &["convert", st, "/tmp/x", "--max-shard-size", "5XB"],
        &["convert", st, "/tmp/x", "--max-shard-size", "-1"],
        &["diff", st],
        &["diff", st, st, "--atol", "abc"],
        &["diff", st, st, "--atol", "-1"],
        &["diff", st, st, "--rtol", "nan"],
    ];
    for args in cases {
        let run = kiln(*args);
        run.expect_code(2);
        assert!(!run.stderr.trim().is_empty(), "{args:?}: no message");
    }
}

#[test]
fn runtime_errors_exit_1_with_one_line_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.safetensors");
    for cmd in ["inspect", "verify"] {
        let line = kiln([cmd.as_ref(), s(&missing)])
            .expect_error(&["no such file", "not found", "does not exist"])
            .to_string();
        assert!(line.contains("nope.safetensors"), "{line}");
    }
    let out = tmp.path().join("out.bin");
    kiln(["convert".as_ref(), s(&missing), s(&out)])
        .expect_code(1)
        .one_stderr_line();
    assert!(!out.exists());

    // A folder without weights.
    let empty = tmp.path().join("empty_model");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("config.json"), "{}").unwrap();
    let line = kiln(["inspect".as_ref(), s(&empty)])
        .expect_code(1)
        .one_stderr_line()
        .to_string();
    assert!(line.contains("empty_model"), "{line}");

    // Not a tensor file.
    let text = tmp.path().join("notes.txt");
    std::fs::write(&text, "hello, world\n").unwrap();
    kiln(["verify".as_ref(), s(&text)])
        .expect_code(1)
        .one_stderr_line();
}
