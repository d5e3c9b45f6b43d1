//! Model folders: round trips through safetensors and `.bin`, sharded and not, tied and
//! not; stale files; aliasing and tie errors; load reports; and interop with real
//! transformers (fixtures made by `fixtures/make_models.py`, checks by
//! `check_models.py`; skipped with a printed reason when Python/torch is absent).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kiln_checkpoint::Error;
use kiln_checkpoint::model::{self, LoadedModel, ModelSave, SaveOptions};
use kiln_formats::{DType, Format, TensorCollection, TensorInfo, TensorMap, TensorView};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------
// helpers

/// Deterministic f32 bytes, different for each seed.
fn floats(seed: u32, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..n)
        .flat_map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((x >> 8) as f32 / (1u32 << 24) as f32 - 0.5).to_le_bytes()
        })
        .collect()
}

fn f32_view(seed: u32, shape: &[usize]) -> TensorView<'static> {
    let n = shape.iter().product();
    TensorView::new(DType::F32, shape.to_vec(), floats(seed, n)).unwrap()
}

fn gpt2_config() -> Value {
    json!({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 4, "vocab_size": 8,
           "tie_word_embeddings": true})
}

const WTE: &str = "transformer.wte.weight";
const LM_HEAD: &str = "lm_head.weight";

/// A GPT-2-like model whose `lm_head.weight` is lent from the same buffer as the
/// embedding (as a model holding one tied parameter would), unless `untied_copy`.
fn gpt2_weights(wte: &[u8], with_lm_head: bool) -> TensorMap<'_> {
    let mut m = TensorMap::new();
    m.insert(WTE, TensorView::new(DType::F32, vec![8, 4], wte).unwrap())
        .unwrap();
    m.insert("transformer.wpe.weight", f32_view(2, &[6, 4]))
        .unwrap();
    m.insert("transformer.h.0.attn.c_attn.weight", f32_view(3, &[4, 12]))
        .unwrap();
    m.insert("transformer.h.0.attn.c_attn.bias", f32_view(4, &[12]))
        .unwrap();
    m.insert("transformer.ln_f.weight", f32_view(5, &[4]))
        .unwrap();
    if with_lm_head {
        m.insert(
            LM_HEAD,
            TensorView::new(DType::F32, vec![8, 4], wte).unwrap(),
        )
        .unwrap();
    }
    m
}

fn bert_weights() -> TensorMap<'static> {
    let mut m = TensorMap::new();
    m.insert(
        "bert.embeddings.word_embeddings.weight",
        f32_view(10, &[16, 4]),
    )
    .unwrap();
    m.insert(
        "bert.encoder.layer.0.attention.self.query.weight",
        f32_view(11, &[4, 4]),
    )
    .unwrap();
    m.insert(
        "bert.encoder.layer.0.attention.self.query.bias",
        f32_view(12, &[4]),
    )
    .unwrap();
    m.insert("bert.pooler.dense.weight", f32_view(13, &[4, 4]))
        .unwrap();
    m.insert("classifier.weight", f32_view(14, &[3, 4]))
        .unwrap();
    m.insert("classifier.bias", f32_view(15, &[3])).unwrap();
    m
}

fn bert_config() -> Value {
    json!({"model_type": "bert", "architectures": ["BertForSequenceClassification"], "hidden_size": 4,
           "id2label": {"0": "A", "1": "B", "2": "C"}})
}

fn infos(c: &dyn TensorCollection) -> Vec<TensorInfo> {
    c.tensors().to_vec()
}

fn tie() -> Vec<(String, String)> {
    vec![(LM_HEAD.to_string(), WTE.to_string())]
}

fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Every tensor of `expected` reads back with the same bytes from `loaded`.
fn assert_same_tensors(expected: &dyn TensorCollection, loaded: &dyn TensorCollection) {
    for info in expected.tensors() {
        let a = expected.tensor(&info.name).unwrap();
        let b = loaded.tensor(&info.name).unwrap();
        assert_eq!(a, b, "{}", info.name);
    }
}

/// Names in the weight files of a folder (all shards), read from the files themselves.
fn names_in_files(dir: &Path, format: Format) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for f in files_in(dir) {
        let is_weights = match format {
            Format::Safetensors => f.ends_with(".safetensors"),
            Format::PyTorch => f.ends_with(".bin"),
        };
        if is_weights {
            let c = kiln_formats::open(dir.join(&f)).unwrap();
            names.extend(c.tensors().iter().map(|t| t.name.clone()));
        }
    }
    names
}

/// Whether kiln-formats can write and read `.bin` yet (the torch module lands on main
/// from its own branch); prints why not.
fn torch_format_available() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("probe.bin");
    let mut m = TensorMap::new();
    m.insert("w", f32_view(1, &[2])).unwrap();
    let result = kiln_formats::torch::save(&p, &m).and_then(|_| kiln_formats::open(&p).map(|_| ()));
    match result {
        Ok(()) => true,
        Err(e) => {
            println!("skipping .bin part: kiln-formats' torch module is not available yet ({e})");
            false
        }
    }
}

fn load(dir: &Path, expected: &[TensorInfo], tied: &[(String, String)]) -> LoadedModel {
    model::load_pretrained(dir, expected, tied).unwrap()
}

// ---------------------------------------------------------------------------------
// round trips

#[test]
fn untied_safetensors_round_trip_writes_config_like_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let weights = bert_weights();
    let save = ModelSave::new(bert_config(), &weights)
        .with_tokenizer_file("tokenizer.json", b"{\"version\": \"1.0\"}".to_vec())
        .with_tokenizer_file("vocab.txt", b"[PAD]\n[UNK]\n\xc3\xa9\n".to_vec())
        .with_training_args(json!({"learning_rate": 5e-05, "output_dir": "out", "seed": 42}));
    let saved = model::save_pretrained(dir.path(), &save, &SaveOptions::default()).unwrap();
    assert_eq!(
        saved.weights.files,
        vec![dir.path().join("model.safetensors")]
    );
    assert_eq!(saved.weights.index, None);
    assert!(saved.dropped_tied.is_empty());
    let written: BTreeSet<String> = saved
        .files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(written, files_in(dir.path()));
    assert_eq!(
        files_in(dir.path()),
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "training_args.json",
            "vocab.txt"
        ]
        .map(String::from)
        .into()
    );
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    let want = format!(
        "{{\n  \"architectures\": [\n    \"BertForSequenceClassification\"\n  ],\n  \"dtype\": \"float32\",\n  \"hidden_size\": 4,\n  \"id2label\": {{\n    \"0\": \"A\",\n    \"1\": \"B\",\n    \"2\": \"C\"\n  }},\n  \"kiln_version\": \"{version}\",\n  \"model_type\": \"bert\"\n}}\n"
    );
    assert_eq!(config, want);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("training_args.json")).unwrap(),
        "{\n  \"learning_rate\": 5e-05,\n  \"output_dir\": \"out\",\n  \"seed\": 42\n}\n"
    );
    assert_eq!(
        std::fs::read(dir.path().join("vocab.txt")).unwrap(),
        b"[PAD]\n[UNK]\n\xc3\xa9\n"
    );
    let file = kiln_formats::open(dir.path().join("model.safetensors")).unwrap();
    assert_eq!(
        file.metadata().get("format").map(String::as_str),
        Some("pt")
    );
    assert_eq!(file.metadata().len(), 1);

    let loaded = load(dir.path(), &infos(&weights), &[]);
    assert_eq!(loaded.report, model::LoadReport::default());
    assert!(loaded.report.is_clean());
    assert_eq!(loaded.config["model_type"], "bert");
    assert_eq!(loaded.config["kiln_version"], version);
    assert_eq!(loaded.generation_config, None);
    assert_eq!(loaded.weights_path, dir.path().join("model.safetensors"));
    assert_same_tensors(&weights, loaded.weights.as_ref());
    // Expected order is kept.
    assert_eq!(loaded.weights.tensors(), weights.tensors());
    loaded.weights.verify().unwrap();
    assert_eq!(model::read_config(dir.path()).unwrap(), loaded.config);
}

#[test]
fn tied_safetensors_drops_the_tied_name_and_reties_it_on_load() {
    let wte = floats(1, 32);
    let weights = gpt2_weights(&wte, true);
    for max_shard_size in [5_000_000_000, 200] {
        let dir = tempfile::tempdir().unwrap();
        let save = ModelSave::new(gpt2_config(), &weights)
            .with_tied(LM_HEAD, WTE)
            .with_generation_config(json!({"bos_token_id": 7, "eos_token_id": 7}));
        let opts = SaveOptions::default().with_max_shard_size(max_shard_size);
        let saved = model::save_pretrained(dir.path(), &save, &opts).unwrap();
        assert_eq!(saved.dropped_tied, vec![LM_HEAD.to_string()]);
        let names = names_in_files(dir.path(), Format::Safetensors);
        assert!(!names.contains(LM_HEAD), "{names:?}");
        assert_eq!(names.len(), 5);
        if max_shard_size == 200 {
            assert!(saved.weights.files.len() > 1);
            let index =
                std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap();
            let index: Value = serde_json::from_str(&index).unwrap();
            let map = index["weight_map"].as_object().unwrap();
            assert_eq!(map.len(), 5);
            assert!(!map.contains_key(LM_HEAD));
            // transformers counts the tied parameter once.
            assert_eq!(index["metadata"]["total_parameters"], 32 + 24 + 48 + 12 + 4);
            assert_eq!(index["metadata"]["total_size"], 4 * (32 + 24 + 48 + 12 + 4));
        } else {
            assert_eq!(saved.weights.files.len(), 1);
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("generation_config.json")).unwrap(),
            "{\n  \"bos_token_id\": 7,\n  \"eos_token_id\": 7\n}\n"
        );

        let loaded = load(dir.path(), &infos(&weights), &tie());
        assert!(loaded.report.is_clean(), "{:?}", loaded.report);
        assert_eq!(loaded.report.retied, vec![LM_HEAD.to_string()]);
        assert_same_tensors(&weights, loaded.weights.as_ref());
        assert_eq!(loaded.weights.tensors(), weights.tensors());
        assert_eq!(
            loaded.generation_config.as_ref().unwrap()["eos_token_id"],
            7
        );
        loaded.weights.verify().unwrap();

        // Without the tie declared at load, lm_head is simply missing.
        let loaded = load(dir.path(), &infos(&weights), &[]);
        assert_eq!(loaded.report.missing, vec![LM_HEAD.to_string()]);
        assert!(loaded.report.retied.is_empty());
        assert!(loaded.weights.tensor(LM_HEAD).is_err());
    }
}

#[test]
fn a_tied_name_the_weights_lack_is_fine_and_reties() {
    // A model that holds the tie as one parameter may hand over only the source.
    let dir = tempfile::tempdir().unwrap();
    let wte = floats(1, 32);
    let weights = gpt2_weights(&wte, false);
    let save = ModelSave::new(gpt2_config(), &weights).with_tied(LM_HEAD, WTE);
    let saved = model::save_pretrained(dir.path(), &save, &SaveOptions::default()).unwrap();
    assert!(saved.dropped_tied.is_empty());
    let mut expected = infos(&weights);
    expected.push(TensorInfo {
        name: LM_HEAD.into(),
        dtype: DType::F32,
        shape: vec![8, 4],
    });
    let loaded = load(dir.path(), &expected, &tie());
    assert!(loaded.report.is_clean());
    assert_eq!(loaded.weights.tensor(LM_HEAD).unwrap().data(), &wte[..]);
}

#[test]
fn bin_round_trips_keep_both_tied_names() {
    if !torch_format_available() {
        return;
    }
    let wte = floats(1, 32);
    let weights = gpt2_weights(&wte, true);
    let bert = bert_weights();
    for max_shard_size in [5_000_000_000, 200] {
        let opts = SaveOptions::default()
            .with_safetensors(false)
            .with_max_shard_size(max_shard_size);
        // tied
        let dir = tempfile::tempdir().unwrap();
        let save = ModelSave::new(gpt2_config(), &weights).with_tied(LM_HEAD, WTE);
        let saved = model::save_pretrained(dir.path(), &save, &opts).unwrap();
        assert!(saved.dropped_tied.is_empty());
        assert_eq!(saved.weights.files.len() > 1, max_shard_size == 200);
        let names = names_in_files(dir.path(), Format::PyTorch);
        assert!(names.contains(LM_HEAD) && names.contains(WTE), "{names:?}");
        // One storage for both names, in the shard of the source.
        let first = &saved.weights.files[0];
        let file = kiln_formats::torch::TorchFile::open(first).unwrap();
        let (head, wte_ref) = (
            file.tensor_ref(LM_HEAD).unwrap(),
            file.tensor_ref(WTE).unwrap(),
        );
        assert_eq!(head.storage.key, wte_ref.storage.key);
        if let Some(index) = &saved.weights.index {
            let index: Value =
                serde_json::from_str(&std::fs::read_to_string(index).unwrap()).unwrap();
            assert_eq!(index["weight_map"][LM_HEAD], index["weight_map"][WTE]);
            // The tie is counted once, as huggingface_hub counts storages.
            assert_eq!(index["metadata"]["total_size"], 4 * (32 + 24 + 48 + 12 + 4));
            assert_eq!(index["metadata"]["total_parameters"], 32 + 24 + 48 + 12 + 4);
        }
        let loaded = load(dir.path(), &infos(&weights), &tie());
        assert!(loaded.report.is_clean(), "{:?}", loaded.report);
        assert!(loaded.report.retied.is_empty());
        assert_same_tensors(&weights, loaded.weights.as_ref());
        loaded.weights.verify().unwrap();
        // untied
        let dir = tempfile::tempdir().unwrap();
        let save = ModelSave::new(bert_config(), &bert);
        model::save_pretrained(dir.path(), &save, &opts).unwrap();
        let loaded = load(dir.path(), &infos(&bert), &[]);
        assert!(loaded.report.is_clean(), "{:?}", loaded.report);
        assert_same_tensors(&bert, loaded.weights.as_ref());
    }
    // A tied name the weights lack is written into the .bin too, from its source.
    let dir = tempfile::tempdir().unwrap();
    let without = gpt2_weights(&wte, false);
    let save = ModelSave::new(gpt2_config(), &without).with_tied(LM_HEAD, WTE);
    model::save_pretrained(
        dir.path(),
        &save,
        &SaveOptions::default().with_safetensors(false),
    )
    .unwrap();
    let file = kiln_formats::torch::TorchFile::open(dir.path().join("pytorch_model.bin")).unwrap();
    assert_eq!(file.tensor(LM_HEAD).unwrap().data(), &wte[..]);
    assert_eq!(
        file.tensor_ref(LM_HEAD).unwrap().storage.key,
        file.tensor_ref(WTE).unwrap().storage.key
    );
}

// ---------------------------------------------------------------------------------
// stale files

#[test]
fn a_new_save_removes_the_weights_of_an_earlier_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let weights = bert_weights();
    let save = ModelSave::new(bert_config(), &weights)
        .with_tokenizer_file("tokenizer_config.json", b"{}".to_vec());
    // Leftovers of other saves: a .bin, its index, and shards of a bigger model.
    std::fs::write(d.join("pytorch_model.bin"), b"old").unwrap();
    std::fs::write(
        d.join("pytorch_model.bin.index.json"),
        b"{\"weight_map\": {}}",
    )
    .unwrap();
    std::fs::write(d.join("model-00007-of-00009.safetensors"), b"old").unwrap();
    let sharded = SaveOptions::default().with_max_shard_size(300);
    let saved = model::save_pretrained(d, &save, &sharded).unwrap();
    assert_eq!(
        saved.weights.removed.len(),
        3,
        "{:?}",
        saved.weights.removed
    );
    let n = saved.weights.files.len();
    assert!(n > 1);
    let mut want: BTreeSet<String> = (1..=n)
        .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
        .collect();
    want.extend(
        [
            "config.json",
            "model.safetensors.index.json",
            "tokenizer_config.json",
        ]
        .map(String::from),
    );
    assert_eq!(files_in(d), want);

    // Unsharded now: shards and index go, the single file comes.
    let saved = model::save_pretrained(d, &save, &SaveOptions::default()).unwrap();
    assert_eq!(saved.weights.removed.len(), n + 1);
    assert_eq!(
        files_in(d),
        ["config.json", "model.safetensors", "tokenizer_config.json"]
            .map(String::from)
            .into()
    );
    // Sharded again: the single file (which would win on load) goes.
    model::save_pretrained(d, &save, &sharded).unwrap();
    assert!(!d.join("model.safetensors").exists());
    let loaded = load(d, &infos(&weights), &[]);
    assert!(loaded.report.is_clean());
    assert_eq!(loaded.weights_path, d.join("model.safetensors.index.json"));
    assert_same_tensors(&weights, loaded.weights.as_ref());

    if torch_format_available() {
        // .bin after safetensors: the safetensors files go.
        let bin = sharded.with_safetensors(false);
        model::save_pretrained(d, &save, &bin).unwrap();
        assert!(names_in_files(d, Format::Safetensors).is_empty());
        assert!(!d.join("model.safetensors.index.json").exists());
        let loaded = load(d, &infos(&weights), &[]);
        assert_eq!(loaded.weights_path, d.join("pytorch_model.bin.index.json"));
        assert_same_tensors(&weights, loaded.weights.as_ref());
    }
}

// ---------------------------------------------------------------------------------
// refusals

fn save_err(save: &ModelSave<'_>) -> (Error, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    let e = model::save_pretrained(&out, save, &SaveOptions::default()).unwrap_err();
    (e, out, dir)
}

#[test]
fn tensors_that_alias_without_a_declared_tie_are_refused() {
    let wte = floats(1, 32);
    let weights = gpt2_weights(&wte, true);
    let save = ModelSave::new(gpt2_config(), &weights);
    let (e, out, _d) = save_err(&save);
    let msg = e.to_string();
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    assert!(
        msg.contains(LM_HEAD) && msg.contains(WTE) && msg.contains("share memory"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    assert!(!out.exists(), "nothing is written when the check fails");

    // Partial overlap: two views of one buffer, offset by one element.
    let buf = floats(9, 10);
    let mut m = TensorMap::new();
    m.insert(
        "a.weight",
        TensorView::new(DType::F32, vec![8], &buf[..32]).unwrap(),
    )
    .unwrap();
    m.insert(
        "b.weight",
        TensorView::new(DType::F32, vec![8], &buf[4..36]).unwrap(),
    )
    .unwrap();
    let (e, _, _d) = save_err(&ModelSave::new(gpt2_config(), &m));
    assert!(
        e.to_string()
            .contains("\"a.weight\" and \"b.weight\" share memory"),
        "{e}"
    );
    // Declared tied but overlapping only in part is refused too.
    let save = ModelSave::new(gpt2_config(), &m).with_tied("b.weight", "a.weight");
    let (e, _, _d) = save_err(&save);
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");

    // Separate equal copies do not alias.
    let copy = wte.clone();
    let mut m = gpt2_weights(&wte, false);
    m.insert(
        LM_HEAD,
        TensorView::new(DType::F32, vec![8, 4], &copy[..]).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    model::save_pretrained(
        dir.path(),
        &ModelSave::new(gpt2_config(), &m),
        &SaveOptions::default(),
    )
    .unwrap();
    assert!(names_in_files(dir.path(), Format::Safetensors).contains(LM_HEAD));
}

#[test]
fn a_declared_tie_whose_tensors_differ_is_refused() {
    let wte = floats(1, 32);
    let other = floats(2, 32);
    let mut m = gpt2_weights(&wte, false);
    m.insert(
        LM_HEAD,
        TensorView::new(DType::F32, vec![8, 4], &other[..]).unwrap(),
    )
    .unwrap();
    let (e, _, _d) = save_err(&ModelSave::new(gpt2_config(), &m).with_tied(LM_HEAD, WTE));
    assert!(e.to_string().contains("different values"), "{e}");

    let mut m = gpt2_weights(&wte, false);
    m.insert(
        LM_HEAD,
        TensorView::new(DType::F32, vec![4, 8], &wte[..]).unwrap(),
    )
    .unwrap();
    let (e, _, _d) = save_err(&ModelSave::new(gpt2_config(), &m).with_tied(LM_HEAD, WTE));
    match e {
        Error::Shape {
            name,
            expected,
            found,
        } => {
            assert_eq!(
                (name.as_str(), expected, found),
                (LM_HEAD, vec![8, 4], vec![4, 8])
            );
        }
        e => panic!("{e:?}"),
    }

    let mut m = gpt2_weights(&wte, false);
    m.insert(
        LM_HEAD,
        TensorView::new(DType::I32, vec![8, 4], &wte[..]).unwrap(),
    )
    .unwrap();
    let (e, _, _d) = save_err(&ModelSave::new(gpt2_config(), &m).with_tied(LM_HEAD, WTE));
    assert!(
        e.to_string().contains("I32") && e.to_string().contains(LM_HEAD),
        "{e}"
    );

    // Malformed declarations.
    let m = gpt2_weights(&wte, true);
    for (save, want) in [
        (
            ModelSave::new(gpt2_config(), &m).with_tied(LM_HEAD, "nope.weight"),
            "not among the weights",
        ),
        (
            ModelSave::new(gpt2_config(), &m).with_tied(WTE, WTE),
            "tied to itself",
        ),
        (
            ModelSave::new(gpt2_config(), &m)
                .with_tied(LM_HEAD, WTE)
                .with_tied(LM_HEAD, WTE),
            "tied twice",
        ),
        (
            ModelSave::new(gpt2_config(), &m)
                .with_tied(LM_HEAD, WTE)
                .with_tied(WTE, "transformer.wpe.weight"),
            "itself tied",
        ),
    ] {
        let (e, _, _d) = save_err(&save);
        assert!(e.to_string().contains(want), "{e}");
    }
}

#[test]
fn bad_configs_and_file_names_are_refused_before_writing() {
    let weights = bert_weights();
    let mut no_type = bert_config();
    no_type.as_object_mut().unwrap().remove("model_type");
    let mut no_arch = bert_config();
    no_arch["architectures"] = json!([]);
    for (config, want) in [
        (no_type, "model_type"),
        (no_arch, "architectures"),
        (json!([1]), "JSON object"),
    ] {
        let (e, out, _d) = save_err(&ModelSave::new(config, &weights));
        assert!(e.to_string().contains(want), "{e}");
        assert!(!out.exists());
    }
    for name in [
        "../evil.json",
        "sub/tokenizer.json",
        "",
        ".hidden",
        "config.json",
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "pytorch_model.bin",
        "model.safetensors.index.json",
    ] {
        let save = ModelSave::new(bert_config(), &weights).with_tokenizer_file(name, vec![1]);
        let (e, out, _d) = save_err(&save);
        assert!(matches!(e, Error::Invalid(_)), "{name}: {e:?}");
        assert!(!out.exists());
    }
    let save = ModelSave::new(bert_config(), &weights)
        .with_tokenizer_file("vocab.txt", vec![1])
        .with_tokenizer_file("vocab.txt", vec![2]);
    assert!(save_err(&save).0.to_string().contains("twice"));
    let save = ModelSave::new(bert_config(), &weights).with_generation_config(json!(3));
    assert!(save_err(&save).0.to_string().contains("generation config"));
    let dir = tempfile::tempdir().unwrap();
    let zero = SaveOptions::default().with_max_shard_size(0);
    assert!(
        model::save_pretrained(dir.path(), &ModelSave::new(bert_config(), &weights), &zero)
            .is_err()
    );
    // A dtype the caller gives is kept.
    let mut config = bert_config();
    config["dtype"] = json!("bfloat16");
    model::save_pretrained(
        dir.path(),
        &ModelSave::new(config, &weights),
        &SaveOptions::default(),
    )
    .unwrap();
    assert_eq!(model::read_config(dir.path()).unwrap()["dtype"], "bfloat16");
}

// ---------------------------------------------------------------------------------
// load reports and errors

#[test]
fn load_reports_missing_and_unexpected_and_names_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let weights = bert_weights();
    model::save_pretrained(
        dir.path(),
        &ModelSave::new(bert_config(), &weights),
        &SaveOptions::default(),
    )
    .unwrap();
    let mut expected = infos(&weights);
    expected.retain(|t| t.name != "classifier.bias");
    expected.push(TensorInfo {
        name: "classifier.extra".into(),
        dtype: DType::F32,
        shape: vec![2],
    });
    let loaded = load(dir.path(), &expected, &[]);
    assert_eq!(loaded.report.missing, vec!["classifier.extra".to_string()]);
    assert_eq!(
        loaded.report.unexpected,
        vec!["classifier.bias".to_string()]
    );
    assert!(!loaded.report.is_clean());
    // Unexpected tensors stay readable, after the expected ones.
    let names: Vec<_> = loaded
        .weights
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(names.last(), Some(&"classifier.bias"));
    assert_eq!(names.len(), weights.len());
    assert!(loaded.weights.tensor("classifier.extra").is_err());

    // A shape mismatch names the tensor.
    let mut expected = infos(&weights);
    expected[4].shape = vec![2, 4]; // classifier.weight
    let e = model::load_pretrained(dir.path(), &expected, &[]).unwrap_err();
    match &e {
        Error::Shape {
            name,
            expected,
            found,
        } => {
            assert_eq!(
                (name.as_str(), expected.clone(), found.clone()),
                ("classifier.weight", vec![2, 4], vec![3, 4])
            );
        }
        e => panic!("{e:?}"),
    }
    assert!(e.to_string().contains("\"classifier.weight\""), "{e}");
    // So does a dtype mismatch.
    let mut expected = infos(&weights);
    expected[5].dtype = DType::F16;
    let e = model::load_pretrained(dir.path(), &expected, &[]).unwrap_err();
    assert!(
        e.to_string().contains("classifier.bias") && e.to_string().contains("F16"),
        "{e}"
    );

    // A re-tied tensor must match as well.
    let wte = floats(1, 32);
    let g = gpt2_weights(&wte, true);
    let gdir = tempfile::tempdir().unwrap();
    model::save_pretrained(
        gdir.path(),
        &ModelSave::new(gpt2_config(), &g).with_tied(LM_HEAD, WTE),
        &SaveOptions::default(),
    )
    .unwrap();
    let mut expected = infos(&g);
    expected.last_mut().unwrap().shape = vec![9, 4];
    let e = model::load_pretrained(gdir.path(), &expected, &tie()).unwrap_err();
    assert!(
        matches!(&e, Error::Shape { name, .. } if name == LM_HEAD),
        "{e:?}"
    );
}

#[test]
fn folders_without_config_or_weights_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = model::load_pretrained(dir.path(), &[], &[]).unwrap_err();
    assert!(matches!(e, Error::Incomplete { .. }), "{e:?}");
    assert!(e.to_string().contains("config.json"));
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let e = model::read_config(dir.path()).unwrap_err();
    assert!(matches!(e, Error::Json { .. }), "{e:?}");
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let e = model::load_pretrained(dir.path(), &[], &[]).unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

// ---------------------------------------------------------------------------------
// interop with real transformers

struct Fixture {
    name: &'static str,
    auto: &'static str,
    max_shard_size: u64,
}

const FIXTURES: [Fixture; 3] = [
    Fixture {
        name: "bert-seqcls",
        auto: "AutoModelForSequenceClassification",
        max_shard_size: 5_000_000_000,
    },
    Fixture {
        name: "gpt2",
        auto: "AutoModelForCausalLM",
        max_shard_size: 5_000_000_000,
    },
    Fixture {
        name: "gpt2-sharded",
        auto: "AutoModelForCausalLM",
        max_shard_size: 3_000,
    },
];

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The parameter list and ties `make_models.py` recorded beside a fixture.
fn expected_of(name: &str) -> (String, Vec<TensorInfo>, Vec<(String, String)>) {
    let text =
        std::fs::read_to_string(fixtures_dir().join(format!("{name}.expected.json"))).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let params = v["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| TensorInfo {
            name: p["name"].as_str().unwrap().into(),
            dtype: p["dtype"].as_str().unwrap().parse().unwrap(),
            shape: serde_json::from_value(p["shape"].clone()).unwrap(),
        })
        .collect();
    let tied = serde_json::from_value(v["tied"].clone()).unwrap();
    (v["architecture"].as_str().unwrap().into(), params, tied)
}

/// Runs this crate's `tests/check_models.py` on `jobs` with real transformers; `None`
/// after a printed skip.
fn transformers_check(jobs: &[Value], work: &Path) -> Option<Vec<Value>> {
    kiln_test_support::transformers_check(Path::new(env!("CARGO_MANIFEST_DIR")), jobs, work)
}

#[test]
fn transformers_fixtures_load_in_kiln_and_kiln_resaves_load_in_transformers() {
    let bin = torch_format_available();
    let work = tempfile::tempdir().unwrap();
    let mut jobs = Vec::new();
    for fx in &FIXTURES {
        let src = fixtures_dir().join(fx.name);
        let (arch, expected, tied) = expected_of(fx.name);
        let loaded = load(&src, &expected, &tied);
        assert!(loaded.report.is_clean(), "{}: {:?}", fx.name, loaded.report);
        let tied_names: Vec<String> = tied.iter().map(|t| t.0.clone()).collect();
        assert_eq!(loaded.report.retied, tied_names, "{}", fx.name);
        if fx.name.starts_with("gpt2") {
            assert_eq!(tied_names, vec![LM_HEAD.to_string()]);
            let head = loaded.weights.tensor(LM_HEAD).unwrap();
            assert_eq!(head.data(), loaded.weights.tensor(WTE).unwrap().data());
        }
        assert_eq!(loaded.config["architectures"][0], arch.as_str());
        assert_eq!(loaded.weights.tensors(), &expected[..]);
        loaded.weights.verify().unwrap();

        // Re-save as kiln would: the model's parameters in order, its config and ties.
        let mut formats = vec![true];
        if bin {
            formats.push(false);
        }
        for safetensors in formats {
            let out = work.path().join(format!(
                "{}-{}",
                fx.name,
                if safetensors { "st" } else { "bin" }
            ));
            let mut save = ModelSave::new(loaded.config.clone(), loaded.weights.as_ref());
            save.tied = tied.clone();
            save.generation_config = loaded.generation_config.clone();
            let opts = SaveOptions::default()
                .with_safetensors(safetensors)
                .with_max_shard_size(fx.max_shard_size);
            let saved = model::save_pretrained(&out, &save, &opts).unwrap();
            if fx.name == "gpt2-sharded" {
                assert!(saved.weights.files.len() > 1);
            }
            let format = if safetensors {
                Format::Safetensors
            } else {
                Format::PyTorch
            };
            let names = names_in_files(&out, format);
            for (t, _) in &tied {
                assert_eq!(names.contains(t), !safetensors, "{}: {t}", out.display());
            }
            if let Some(index) = &saved.weights.index {
                let index: Value =
                    serde_json::from_str(&std::fs::read_to_string(index).unwrap()).unwrap();
                let map = index["weight_map"].as_object().unwrap();
                for (t, _) in &tied {
                    assert_eq!(map.contains_key(t), !safetensors);
                }
                if safetensors {
                    // The same split and index as transformers' own save.
                    let theirs =
                        std::fs::read_to_string(src.join("model.safetensors.index.json")).unwrap();
                    let theirs: Value = serde_json::from_str(&theirs).unwrap();
                    assert_eq!(index, theirs);
                }
            }
            // kiln reads its own save back identically.
            let again = load(&out, &expected, &tied);
            assert!(again.report.is_clean());
            assert_same_tensors(loaded.weights.as_ref(), again.weights.as_ref());
            jobs.push(
                json!({"dir": out, "original": src, "auto": fx.auto, "tied": tied,
                             "file_sharing": !safetensors}),
            );
        }
    }

    let Some(results) = transformers_check(&jobs, work.path()) else {
        return;
    };
    assert_eq!(results.len(), jobs.len());
    for r in results {
        let dir = r["dir"].as_str().unwrap();
        for key in [
            "missing",
            "unexpected",
            "mismatched",
            "errors",
            "different",
            "untied",
            "unshared_in_file",
            "warnings",
        ] {
            assert_eq!(r[key], json!([]), "{dir}: {key}: {r}");
        }
        assert!(r["compared"].as_u64().unwrap() > 10, "{r}");
        println!(
            "transformers loaded {dir}: {} tensors identical",
            r["compared"]
        );
    }
}
