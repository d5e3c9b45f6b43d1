//! Interop with real Python: what kiln writes, torch / safetensors / transformers load,
//! bit for bit; what transformers writes, kiln reads and converts back.
//!
//! Python comes from `$KILN_PYTHON`, else `/root/.cache/kiln/venv/bin/python`. Without
//! one that imports torch, safetensors and transformers, each test prints
//! `skipping: <reason>` and passes (unless `KILN_REQUIRE_PYTHON=1`, as in CI). Checks
//! are batched into few Python runs (importing torch takes seconds).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::{
    Expected, assert_same_tensors, check_hf_sharding, every_dtype_map, expectations_of,
    last_json_line, run_python, weight_files,
};
use kiln::formats::{self, DType, Format, TensorCollection};
use serde_json::Value;

/// Python helpers shared by the snippets: a tensor's digest as
/// `[torch dtype name, shape, sha256 of its contiguous bytes]`.
const PY_PRELUDE: &str = r#"
import hashlib, json, sys, struct, zipfile
import torch

def digest(t):
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return [str(t.dtype).removeprefix("torch."), list(t.shape), hashlib.sha256(data).hexdigest()]
"#;

/// `{name: [torch dtype, shape, sha256]}` as Python prints it, to compare with kiln's.
fn digests_of(expected: &[Expected]) -> BTreeMap<String, Value> {
    expected
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                serde_json::json!([e.dtype.torch_name(), e.shape, e.sha256]),
            )
        })
        .collect()
}

fn as_map(v: &Value, what: &str) -> BTreeMap<String, Value> {
    v.as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {v}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Expectations from Python's digests (the inverse of [`digests_of`]).
fn expected_from_digests(v: &Value) -> Vec<Expected> {
    as_map(v, "digests")
        .into_iter()
        .map(|(name, d)| {
            let dtype = DType::from_torch_name(d[0].as_str().unwrap())
                .unwrap_or_else(|| panic!("{name}: dtype {}", d[0]));
            let shape: Vec<usize> = d[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            Expected {
                nbytes: shape.iter().product::<usize>() * dtype.size(),
                name,
                dtype,
                shape,
                sha256: d[2].as_str().unwrap().to_string(),
                offsets: None,
                file: None,
            }
        })
        .collect()
}

/// kiln's `.bin` loads with `torch.load(weights_only=True)`, mmap off and on, every dtype
/// and shape bit-identical, and is a zip Python's `zipfile` accepts (the gate
/// transformers uses for mmap) with correct CRCs, stored entries under one folder,
/// 64-byte aligned records and no `.format_version`. kiln's safetensors loads with
/// `safetensors.torch.load_file`, metadata kept.
#[test]
fn kiln_written_files_load_in_torch_and_safetensors() {
    let py = python_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let mut map = every_dtype_map();
    map.set_metadata("format", "pt");
    map.set_metadata("written_by", "kiln tests");
    let bin = tmp.path().join("pytorch_model.bin");
    let st = tmp.path().join("model.safetensors");
    formats::torch::save(&bin, &map).unwrap();
    formats::safetensors::save(&st, &map).unwrap();
    let want = digests_of(&expectations_of(&map));

    let script = format!(
        "{PY_PRELUDE}{}",
        r#"
import safetensors.torch
from safetensors import safe_open
bin_path, st_path = sys.argv[1], sys.argv[2]
out = {}
for mmap in (False, True):
    sd = torch.load(bin_path, weights_only=True, mmap=mmap, map_location="cpu")
    out[f"mmap={mmap}"] = {k: digest(v) for k, v in sd.items()}
    out[f"order mmap={mmap}"] = list(sd.keys())
out["is_zipfile"] = zipfile.is_zipfile(bin_path)
raw = open(bin_path, "rb").read()
with zipfile.ZipFile(bin_path) as z:
    out["testzip"] = z.testzip()
    infos = z.infolist()
    out["names"] = [i.filename for i in infos]
    out["methods"] = sorted({i.compress_type for i in infos})
    offsets = {}
    for i in infos:
        nlen, xlen = struct.unpack_from("<HH", raw, i.header_offset + 26)
        offsets[i.filename] = i.header_offset + 30 + nlen + xlen
    out["record_offsets"] = {k: v for k, v in offsets.items() if "/data/" in k}
out["st"] = {k: digest(v) for k, v in safetensors.torch.load_file(st_path).items()}
with safe_open(st_path, "pt") as f:
    out["st_metadata"] = f.metadata()
print(json.dumps(out))
"#
    );
    let out = last_json_line(&run_python(&py, &script, &[&bin, &st]));

    let names: Vec<String> = map.tensors().iter().map(|t| t.name.clone()).collect();
    for mmap in ["False", "True"] {
        assert_eq!(
            as_map(&out[format!("mmap={mmap}")], "torch.load"),
            want,
            "torch.load(weights_only=True, mmap={mmap}) of kiln's .bin"
        );
        assert_eq!(
            out[format!("order mmap={mmap}")],
            serde_json::json!(names),
            "order kept (mmap={mmap})"
        );
    }
    assert_eq!(out["is_zipfile"], Value::Bool(true), "zipfile.is_zipfile");
    assert_eq!(
        out["testzip"],
        Value::Null,
        "zipfile.testzip found a bad CRC"
    );
    assert_eq!(out["methods"], serde_json::json!([0]), "every entry stored");
    let entry_names: Vec<&str> = out["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let prefix = entry_names[0].split('/').next().unwrap();
    for n in &entry_names {
        assert!(
            n.starts_with(&format!("{prefix}/")),
            "{n} outside {prefix}/"
        );
        assert!(!n.ends_with(".format_version"), "kiln must not write {n}");
    }
    for required in ["data.pkl", "version"] {
        assert!(
            entry_names.contains(&format!("{prefix}/{required}").as_str()),
            "{required} missing: {entry_names:?}"
        );
    }
    for (name, offset) in as_map(&out["record_offsets"], "offsets") {
        assert_eq!(
            offset.as_u64().unwrap() % 64,
            0,
            "{name} not 64-byte aligned"
        );
    }

    assert_eq!(
        as_map(&out["st"], "load_file"),
        want,
        "safetensors.torch.load_file"
    );
    assert_eq!(
        out["st_metadata"],
        serde_json::json!({"format": "pt", "written_by": "kiln tests"}),
        "safetensors metadata"
    );
}

/// A tiny BERT saved by transformers as sharded safetensors is read by kiln (library and
/// CLI), converted to sharded `.bin` with the same rules, and `from_pretrained` loads
/// the result with identical weights; converted back to safetensors, it loads too.
#[test]
fn transformers_sharded_model_round_trips_through_kiln() {
    let py = python_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");

    let make = format!(
        "{PY_PRELUDE}{}",
        r#"
import os
from safetensors.torch import load_file
from transformers import BertConfig, BertModel
out = sys.argv[1]
torch.manual_seed(0)
cfg = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
model = BertModel(cfg).eval()
model.save_pretrained(out, max_shard_size="100KB")
with open(os.path.join(out, "vocab.txt"), "w") as f:
    f.write("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"do_lower_case": True, "model_max_length": 64}, f)
index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
saved = {}
for shard in sorted(set(index["weight_map"].values())):
    saved.update(load_file(os.path.join(out, shard)))
print(json.dumps({"digests": {k: digest(v) for k, v in saved.items()},
                  "shards": len(set(index["weight_map"].values()))}))
"#
    );
    let made = last_json_line(&run_python(&py, &make, &[&hf]));
    assert!(
        made["shards"].as_u64().unwrap() > 1,
        "transformers did not shard: {made}"
    );
    let expected = expected_from_digests(&made["digests"]);

    // kiln reads what transformers wrote: library and CLI.
    let c = formats::open(&hf).unwrap_or_else(|e| panic!("open the transformers folder: {e}"));
    assert_eq!(c.format(), Some(Format::Safetensors));
    assert_same_tensors(c.as_ref(), &expected, "transformers' shards");
    let order: Vec<(String, u64)> = c
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.nbytes() as u64))
        .collect();
    let inspect = common::kiln(["inspect".as_ref(), "--json".as_ref(), hf.as_os_str()]);
    inspect.expect_success();
    let v = inspect.json();
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["tensors"].as_array().unwrap().len(), expected.len());
    common::kiln(["verify".as_ref(), hf.as_os_str()]).expect_success();

    // Convert to sharded .bin, HF names, companions copied.
    let bin_dir = tmp.path().join("bin");
    common::kiln([
        "convert".as_ref(),
        hf.as_os_str(),
        bin_dir.as_os_str(),
        "--to".as_ref(),
        "bin".as_ref(),
        "--max-shard-size".as_ref(),
        "100KB".as_ref(),
    ])
    .expect_success();
    check_hf_sharding(&bin_dir, Format::PyTorch, &order, 100_000);
    assert!(weight_files(&bin_dir).iter().all(|f| f.ends_with(".bin")));
    for name in ["config.json", "vocab.txt", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(bin_dir.join(name)).ok(),
            std::fs::read(hf.join(name)).ok(),
            "{name} copied as is"
        );
    }
    let back = formats::open(&bin_dir).unwrap();
    assert_eq!(back.format(), Some(Format::PyTorch));
    assert_same_tensors(back.as_ref(), &expected, "kiln's .bin shards");

    // And back to safetensors shards.
    let st_dir = tmp.path().join("st");
    common::kiln([
        "convert".as_ref(),
        bin_dir.as_os_str(),
        st_dir.as_os_str(),
        "--max-shard-size".as_ref(),
        "100KB".as_ref(),
    ])
    .expect_success();

    // transformers loads both, with nothing missing, unexpected or mismatched.
    let load = format!(
        "{PY_PRELUDE}{}",
        r#"
import glob, os
from transformers import AutoModel
out = {}
for d in sys.argv[1:]:
    model, info = AutoModel.from_pretrained(d, output_loading_info=True)
    sd = model.state_dict()
    out[d] = {
        "class": type(model).__name__,
        "info": {k: sorted(map(str, v)) for k, v in info.items() if isinstance(v, (list, set, tuple))},
        "digests": {k: digest(v) for k, v in sd.items()},
    }
    for f in sorted(glob.glob(os.path.join(d, "*.bin"))):
        torch.load(f, weights_only=True, mmap=True)
        assert zipfile.ZipFile(f).testzip() is None, f
print(json.dumps(out))
"#
    );
    let loaded = last_json_line(&run_python(&py, &load, &[&bin_dir, &st_dir]));
    let want = digests_of(&expected);
    for dir in [&bin_dir, &st_dir] {
        let key = dir.display().to_string();
        let r = &loaded[&key];
        assert_eq!(r["class"], "BertModel", "{key}");
        for (what, list) in as_map(&r["info"], "loading info") {
            assert_eq!(list, serde_json::json!([]), "{key}: from_pretrained {what}");
        }
        let got = as_map(&r["digests"], "state_dict");
        for (name, d) in &want {
            assert_eq!(
                got.get(name),
                Some(d),
                "{key}: {name} differs after from_pretrained"
            );
        }
    }
}

/// candle (the tensor library kiln trains with) reads kiln's `.bin` with
/// `candle_core::pickle::read_all` and kiln's safetensors with `candle_core::safetensors`,
/// every tensor of the dtypes candle loads from `.bin` present (candle silently skips
/// what it cannot read, so the count is checked) and bit-identical; kiln reads what
/// candle writes. No Python needed.
#[test]
fn candle_reads_kiln_files_and_kiln_reads_candle_files() {
    use candle_core::Device;
    use kiln::formats::candle::from_candle;

    let tmp = tempfile::tempdir().unwrap();
    let mut map = kiln::formats::TensorMap::new();
    // The dtypes candle reads from a .bin (Float, Double, Half, BFloat16, Byte, Long).
    let cases = [
        (DType::F32, vec![2, 3]),
        (DType::F64, vec![3]),
        (DType::F16, vec![4, 1]),
        (DType::BF16, vec![2, 2]),
        (DType::U8, vec![5]),
        (DType::I64, vec![1, 2, 2]),
    ];
    for (i, (dtype, shape)) in cases.iter().enumerate() {
        let numel: usize = shape.iter().product();
        let data = common::sample_bytes(*dtype, numel, 500 + i as u64);
        let view = kiln::formats::TensorView::new(*dtype, shape.clone(), data).unwrap();
        map.insert(format!("layer.{i}.{}", dtype.torch_name()), view)
            .unwrap();
    }
    let want = expectations_of(&map);

    let st = tmp.path().join("model.safetensors");
    formats::safetensors::save(&st, &map).unwrap();
    let loaded = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let mut from_st = kiln::formats::TensorMap::new();
    for (name, t) in &loaded {
        from_st
            .insert(name.clone(), from_candle(t).unwrap())
            .unwrap();
    }
    assert_same_tensors(&from_st, &want, "candle safetensors::load of kiln's file");

    let by_candle = tmp.path().join("by_candle.safetensors");
    candle_core::safetensors::save(&loaded, &by_candle).unwrap();
    let back = formats::open(&by_candle).unwrap();
    assert_same_tensors(back.as_ref(), &want, "kiln reading candle's safetensors");

    let bin = tmp.path().join("pytorch_model.bin");
    formats::torch::save(&bin, &map).unwrap();
    let read = candle_core::pickle::read_all(&bin).unwrap();
    assert_eq!(
        read.len(),
        cases.len(),
        "candle read {} of {} tensors",
        read.len(),
        cases.len()
    );
    let mut from_bin = kiln::formats::TensorMap::new();
    for (name, t) in &read {
        from_bin
            .insert(name.clone(), from_candle(t).unwrap())
            .unwrap();
    }
    assert_same_tensors(&from_bin, &want, "candle pickle::read_all of kiln's .bin");
}
