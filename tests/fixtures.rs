//! Reads every fixture made by real torch / safetensors / transformers
//! (tests/fixtures/torch/make_fixtures.py) and checks it against its manifest:
//! tensor count, names and order, dtypes, shapes, and the sha256 of every tensor's bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashMap};

use common::{Manifest, assert_same_tensors, fixture};
use kiln::formats::{self, DType, Format, detect};

/// Checks one fixture (a file or a model folder) against its manifest.
fn check_fixture(rel: &str) {
    let manifest = Manifest::of_fixture(rel);
    let path = fixture(rel);
    let is_folder = path.is_dir();
    let c = formats::open(&path).unwrap_or_else(|e| panic!("open {rel}: {e}"));

    let want_format = match manifest.format.as_str() {
        "pytorch" => Format::PyTorch,
        "safetensors" => Format::Safetensors,
        other => panic!("{rel}: manifest format {other}"),
    };
    assert_eq!(c.format(), Some(want_format), "{rel}: format");

    // Count and names first, so that a reader that skips tensors fails clearly.
    let got: Vec<&str> = c.tensors().iter().map(|t| t.name.as_str()).collect();
    let want: Vec<&str> = manifest.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        got.len(),
        want.len(),
        "{rel}: number of tensors\n got {got:?}\nwant {want:?}"
    );
    match (want_format, is_folder) {
        // A pickle has one order: depth-first, as torch wrote it.
        (Format::PyTorch, false) => assert_eq!(got, want, "{rel}: tensor order"),
        // safetensors: the order of the data offsets (ties between empty tensors free).
        (Format::Safetensors, false) => {
            let offsets: HashMap<&str, (u64, u64)> = manifest
                .tensors
                .iter()
                .map(|t| (t.name.as_str(), t.offsets.expect("offsets")))
                .collect();
            let in_kiln_order: Vec<(u64, u64)> = got
                .iter()
                .map(|n| offsets.get(n).copied().unwrap_or_default())
                .collect();
            assert!(
                in_kiln_order.windows(2).all(|w| w[0] <= w[1]),
                "{rel}: tensors not in file (data offset) order: {got:?}"
            );
        }
        // Sharded sets: any order, compared as sets below.
        _ => {}
    }

    if !is_folder {
        assert_eq!(c.metadata(), &manifest.metadata, "{rel}: metadata");
    }

    assert_same_tensors(c.as_ref(), &manifest.tensors, rel);

    c.verify().unwrap_or_else(|e| panic!("verify {rel}: {e}"));
    let params: u64 = manifest
        .tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    let bytes: u64 = manifest.tensors.iter().map(|t| t.nbytes as u64).sum();
    assert_eq!(c.parameter_count(), params, "{rel}: parameter_count");
    assert_eq!(c.total_bytes(), bytes, "{rel}: total_bytes");

    let missing = c.tensor("no.such.tensor");
    assert!(missing.is_err(), "{rel}: a missing tensor must be an error");
}

macro_rules! fixture_tests {
    ($($test:ident => $rel:literal,)*) => {
        $(
            #[test]
            fn $test() {
                check_fixture($rel);
            }
        )*
        /// Every fixture with a test above.
        const TESTED: &[&str] = &[$($rel),*];
    };
}

fixture_tests! {
    torch_all_dtypes => "all_dtypes.pt",
    torch_views_and_shared_storage => "views.pt",
    torch_zero_d_and_empty => "shapes.pt",
    torch_module_state_dict_with_tied_weights => "module_state_dict.pt",
    torch_parameters => "parameters.pt",
    torch_checkpoint_shows_its_state_dict => "checkpoint.pt",
    torch_checkpoint_with_extra_tensors_shows_them_all => "nested.pt",
    torch_nested_tree_dotted_names => "nested_tree.pt",
    torch_adamw_optimizer_state => "optimizer.pt",
    torch_pickle_protocol_4 => "protocol4.pt",
    torch_archive_prefix => "archive_prefix.pt",
    safetensors_all_dtypes_with_metadata => "st_all_dtypes.safetensors",
    safetensors_zero_d_and_empty => "st_shapes.safetensors",
    transformers_sharded_safetensors_folder => "tiny_bert_sharded",
    sharded_bin_folder => "tiny_bert_bin_sharded",
    folder_prefers_safetensors => "precedence",
}

/// Every `*.manifest.json` has a test, every fixture has a manifest, and each manifest
/// is consistent with itself (runs without the readers).
#[test]
fn manifests_cover_every_fixture_and_are_consistent() {
    let dir = fixture("");
    let mut manifests = BTreeSet::new();
    let mut fixtures = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("fixtures folder") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some(f) = name.strip_suffix(".manifest.json") {
            manifests.insert(f.to_string());
        } else if name != "make_fixtures.py" && name != "__pycache__" {
            fixtures.insert(name);
        }
    }
    assert_eq!(
        manifests, fixtures,
        "fixtures without a manifest or manifests without a fixture"
    );
    let tested: BTreeSet<String> = TESTED.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        tested, manifests,
        "fixtures without a test in tests/fixtures.rs"
    );

    for rel in &manifests {
        let m = Manifest::of_fixture(rel);
        assert_eq!(&m.path, rel);
        assert!(!m.tensors.is_empty(), "{rel}: no tensors");
        let mut names = BTreeSet::new();
        for t in &m.tensors {
            assert!(names.insert(&t.name), "{rel}: {} twice", t.name);
            let numel: usize = t.shape.iter().product();
            assert_eq!(numel * t.dtype.size(), t.nbytes, "{rel}: {} nbytes", t.name);
            assert_eq!(t.sha256.len(), 64, "{rel}: {} sha256", t.name);
            if let Some((b, e)) = t.offsets {
                assert_eq!((e - b) as usize, t.nbytes, "{rel}: {} offsets", t.name);
            }
        }
    }
}

/// The dtype fixtures really hold every dtype kiln has (a regenerated fixture that lost
/// one would silently shrink the coverage).
#[test]
fn dtype_fixtures_cover_every_dtype() {
    let all: BTreeSet<DType> = DType::ALL.into_iter().collect();
    for rel in ["all_dtypes.pt", "st_all_dtypes.safetensors"] {
        let got: BTreeSet<DType> = Manifest::of_fixture(rel)
            .tensors
            .iter()
            .map(|t| t.dtype)
            .collect();
        assert_eq!(got, all, "{rel}");
    }
}

/// Detection by content: the fixtures are recognised by their bytes, whatever their name.
#[test]
fn fixtures_are_detected_by_content() {
    let cases = [
        ("all_dtypes.pt", detect::Kind::File(Format::PyTorch)),
        ("protocol4.pt", detect::Kind::File(Format::PyTorch)),
        (
            "st_all_dtypes.safetensors",
            detect::Kind::File(Format::Safetensors),
        ),
        (
            "tiny_bert_sharded/model.safetensors.index.json",
            detect::Kind::ShardIndex,
        ),
        (
            "tiny_bert_bin_sharded/pytorch_model.bin.index.json",
            detect::Kind::ShardIndex,
        ),
        ("tiny_bert_sharded", detect::Kind::Directory),
    ];
    for (rel, kind) in cases {
        assert_eq!(detect::detect(&fixture(rel)).expect(rel), kind, "{rel}");
    }
    // A misleading name changes nothing.
    let tmp = tempfile::tempdir().expect("tempdir");
    let renamed = tmp.path().join("model.safetensors");
    std::fs::copy(fixture("views.pt"), &renamed).expect("copy");
    assert_eq!(
        detect::detect(&renamed).expect("detect"),
        detect::Kind::File(Format::PyTorch)
    );
}

/// The same fixture opened through a folder, its index, and one shard file agree.
#[test]
fn sharded_folder_index_and_shard_agree() {
    let m = Manifest::of_fixture("tiny_bert_sharded");
    let via_index =
        formats::open(fixture("tiny_bert_sharded/model.safetensors.index.json")).expect("index");
    assert_same_tensors(via_index.as_ref(), &m.tensors, "via the index");
    let shard = m.tensors[0].file.clone().expect("file");
    let one = formats::open(fixture(&format!("tiny_bert_sharded/{shard}"))).expect("shard");
    let in_shard: Vec<_> = m
        .tensors
        .iter()
        .filter(|t| t.file.as_deref() == Some(shard.as_str()))
        .cloned()
        .collect();
    assert_same_tensors(one.as_ref(), &in_shard, &shard);
}

/// Writes fixtures back with one of kiln's writers, reads them again and checks every
/// tensor bit for bit, and the order kept.
fn rewrite(rels: &[&str], ext: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    for rel in rels {
        let m = Manifest::of_fixture(rel);
        let c = formats::open(fixture(rel)).unwrap_or_else(|e| panic!("open {rel}: {e}"));
        let out = tmp.path().join(format!("{rel}.{ext}"));
        let saved = match ext {
            "safetensors" => formats::safetensors::save(&out, c.as_ref()),
            _ => formats::torch::save(&out, c.as_ref()),
        };
        saved.unwrap_or_else(|e| panic!("{rel} -> {ext}: save: {e}"));
        let back = formats::open(&out).unwrap_or_else(|e| panic!("{rel} -> {ext}: reopen: {e}"));
        let what = format!("{rel} -> {ext}");
        assert_same_tensors(back.as_ref(), &m.tensors, &what);
        let order: Vec<_> = back.tensors().iter().map(|t| &t.name).collect();
        let given: Vec<_> = c.tensors().iter().map(|t| &t.name).collect();
        if ext == "bin" {
            assert_eq!(order, given, "{what}: a .bin keeps the order it was given");
        }
        back.verify()
            .unwrap_or_else(|e| panic!("{what}: verify: {e}"));
        if ext == "safetensors" && c.format() == Some(Format::Safetensors) {
            assert_eq!(back.metadata(), c.metadata(), "{what}: metadata");
        }
    }
}

const TORCH_FIXTURES: &[&str] = &["all_dtypes.pt", "views.pt", "shapes.pt", "optimizer.pt"];
const SAFETENSORS_FIXTURES: &[&str] = &["st_all_dtypes.safetensors", "st_shapes.safetensors"];

#[test]
fn safetensors_fixtures_rewritten_as_safetensors() {
    rewrite(SAFETENSORS_FIXTURES, "safetensors");
}

#[test]
fn safetensors_fixtures_rewritten_as_bin() {
    rewrite(SAFETENSORS_FIXTURES, "bin");
}

#[test]
fn torch_fixtures_rewritten_as_safetensors() {
    rewrite(TORCH_FIXTURES, "safetensors");
}

#[test]
fn torch_fixtures_rewritten_as_bin() {
    rewrite(TORCH_FIXTURES, "bin");
}
