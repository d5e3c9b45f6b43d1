//! Listing, completeness, leftovers, verification and rotation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{SMALL, Sizes, assert_content, names, save, steps};
use kiln_checkpoint::Error;
use kiln_checkpoint::commit::MANIFEST_NAME;
use kiln_checkpoint::rotate::rotate;
use kiln_checkpoint::scan::{
    Cleanup, Completeness, clean_leftovers, completeness, last_checkpoint, list_checkpoints,
    verify_checkpoint,
};
use kiln_formats::{DType, TensorMap, TensorView};

const TINY: Sizes = Sizes {
    model: 64,
    extra: 100,
};

fn incomplete_reason(dir: &Path) -> String {
    match completeness(dir).unwrap() {
        Completeness::Incomplete(r) => r,
        c => panic!("{}: {c:?}", dir.display()),
    }
}

/// A checkpoint as transformers' Trainer writes it (no kiln manifest).
fn hf_checkpoint(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let mut map = TensorMap::new();
    map.insert(
        "w",
        TensorView::new(DType::F32, vec![2], vec![0u8; 8]).unwrap(),
    )
    .unwrap();
    kiln_formats::safetensors::save(dir.join("model.safetensors"), &map).unwrap();
    fs::write(dir.join("config.json"), "{\"model_type\": \"gpt2\"}\n").unwrap();
    fs::write(
        dir.join("training_args.bin"),
        b"PK\x03\x04 not a state dict",
    )
    .unwrap();
    // torch's AdamW state of `w`, as transformers writes it (one step).
    let mut state = kiln_checkpoint::optimizer::OptimizerState::new("adamw").with_meta(
        serde_json::json!({"step": 1, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
            "no_decay": [], "params": ["w"], "lr": 1e-3}),
    );
    for slot in ["exp_avg", "exp_avg_sq"] {
        let t = TensorView::new(DType::F32, vec![2], vec![0u8; 8]).unwrap();
        state.insert("w", slot, t).unwrap();
    }
    kiln_checkpoint::torch_state::TorchOptimizer::from_kiln(&state)
        .unwrap()
        .save(&dir.join("optimizer.pt"))
        .unwrap();
    fs::write(
        dir.join("trainer_state.json"),
        "{\n  \"global_step\": 20,\n  \"log_history\": [{\"grad_norm\": NaN, \"loss\": Infinity}]\n}\n",
    )
    .unwrap();
}

#[test]
fn listing_is_by_step_and_skips_other_names() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    assert!(list_checkpoints(&out.join("missing")).unwrap().is_empty());
    assert_eq!(last_checkpoint(&out.join("missing")).unwrap(), None);
    // Created out of order: mtime order differs from step order.
    for step in [30, 2, 100, 10] {
        save(out, step, 0, TINY).unwrap();
    }
    fs::create_dir(out.join("checkpoint-abc")).unwrap();
    fs::create_dir(out.join("checkpoint-5.bak")).unwrap();
    fs::create_dir(out.join("checkpoint-")).unwrap();
    fs::create_dir(out.join("xcheckpoint-6")).unwrap();
    fs::write(out.join("checkpoint-7"), b"a plain file").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(out.join("checkpoint-100"), out.join("checkpoint-999")).unwrap();
    let list = list_checkpoints(out).unwrap();
    assert_eq!(
        list.iter().map(|e| e.step).collect::<Vec<_>>(),
        [2, 10, 30, 100]
    );
    for e in &list {
        assert_eq!(e.completeness, Completeness::Complete);
        assert_eq!(e.path, out.join(format!("checkpoint-{}", e.step)));
        let manifest = fs::metadata(e.path.join(MANIFEST_NAME)).unwrap().len();
        let state = fs::metadata(e.path.join("trainer_state.json"))
            .unwrap()
            .len();
        let model = fs::metadata(e.path.join("model.safetensors"))
            .unwrap()
            .len();
        assert_eq!(e.bytes, manifest + state + model + TINY.extra as u64);
    }
    assert_eq!(
        last_checkpoint(out).unwrap(),
        Some(out.join("checkpoint-100"))
    );
}

#[test]
fn incomplete_checkpoints_are_reported_with_the_reason_and_never_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    for step in 1..=6 {
        save(out, step, 0, TINY).unwrap();
    }
    // Copied in half: a listed file is missing.
    fs::remove_file(out.join("checkpoint-6/extra_state.dat")).unwrap();
    assert_eq!(
        incomplete_reason(&out.join("checkpoint-6")),
        format!("{MANIFEST_NAME} lists extra_state.dat, missing")
    );
    // Truncated file.
    let f = out.join("checkpoint-5/model.safetensors");
    let len = fs::metadata(&f).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let r = incomplete_reason(&out.join("checkpoint-5"));
    assert!(
        r.contains("model.safetensors has") && r.contains("says"),
        "{r}"
    );
    // Manifest cut short.
    fs::write(
        out.join("checkpoint-4").join(MANIFEST_NAME),
        b"{\"kiln_version\": ",
    )
    .unwrap();
    assert!(incomplete_reason(&out.join("checkpoint-4")).contains("does not parse"));
    // No manifest: an interrupted kiln save copied by hand, not a transformers one.
    fs::remove_file(out.join("checkpoint-3").join(MANIFEST_NAME)).unwrap();
    fs::remove_file(out.join("checkpoint-3/trainer_state.json")).unwrap();
    assert!(incomplete_reason(&out.join("checkpoint-3")).contains("no kiln_checkpoint.json"));
    // A manifest that does not belong to this folder.
    fs::rename(out.join("checkpoint-2"), out.join("checkpoint-8")).unwrap();
    assert!(incomplete_reason(&out.join("checkpoint-8")).contains("step 2"));
    // A manifest naming a path outside the folder.
    let m = out.join("checkpoint-1").join(MANIFEST_NAME);
    let text = fs::read_to_string(&m).unwrap();
    fs::write(&m, text.replace("extra_state.dat", "../../etc/passwd")).unwrap();
    assert!(incomplete_reason(&out.join("checkpoint-1")).contains("not a path inside"));

    let list = list_checkpoints(out).unwrap();
    assert_eq!(list.len(), 6);
    assert!(list.iter().all(|e| !e.is_complete()));
    assert_eq!(last_checkpoint(out).unwrap(), None);
    save(out, 7, 0, TINY).unwrap();
    // The highest step (8) is incomplete: the complete 7 is the last one.
    assert_eq!(
        last_checkpoint(out).unwrap(),
        Some(out.join("checkpoint-7"))
    );
    let err = verify_checkpoint(&out.join("checkpoint-6")).unwrap_err();
    assert!(matches!(err, Error::Incomplete { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: incomplete: {MANIFEST_NAME} lists extra_state.dat, missing",
            out.join("checkpoint-6").display()
        )
    );
}

#[test]
fn transformers_checkpoints_are_complete_but_foreign() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    hf_checkpoint(&out.join("checkpoint-20"));
    assert_eq!(
        completeness(&out.join("checkpoint-20")).unwrap(),
        Completeness::Foreign
    );
    assert_eq!(
        last_checkpoint(out).unwrap(),
        Some(out.join("checkpoint-20"))
    );
    let v = verify_checkpoint(&out.join("checkpoint-20")).unwrap();
    assert_eq!(v.completeness, Completeness::Foreign);
    // The weight, and its two moments in optimizer.pt.
    assert_eq!(v.tensors, 3);
    assert_eq!(
        v.tensor_files,
        vec![
            out.join("checkpoint-20/model.safetensors"),
            out.join("checkpoint-20/optimizer.pt")
        ]
    );
    assert_eq!(v.json_files, 2);
    // optimizer.pt is parsed: one that is not torch's optimizer state is caught.
    let bad = out.join("bad/checkpoint-20");
    hf_checkpoint(&bad);
    fs::write(bad.join("optimizer.pt"), b"pickle").unwrap();
    let e = verify_checkpoint(&bad).unwrap_err().to_string();
    assert!(e.contains("optimizer.pt"), "{e}");

    // Trainer writes trainer_state.json last: without it, the save was interrupted.
    hf_checkpoint(&out.join("checkpoint-30"));
    fs::remove_file(out.join("checkpoint-30/trainer_state.json")).unwrap();
    assert!(
        !completeness(&out.join("checkpoint-30"))
            .unwrap()
            .is_complete()
    );
    // Cut short.
    hf_checkpoint(&out.join("checkpoint-40"));
    fs::write(
        out.join("checkpoint-40/trainer_state.json"),
        b"{\"global_step\": 4",
    )
    .unwrap();
    assert!(incomplete_reason(&out.join("checkpoint-40")).contains("trainer_state.json"));
    // Sharded, with a shard missing.
    let d = out.join("checkpoint-50");
    hf_checkpoint(&d);
    fs::rename(
        d.join("model.safetensors"),
        d.join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"metadata": {"total_size": 8}, "weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    assert_eq!(
        incomplete_reason(&d),
        "model.safetensors.index.json lists model-00002-of-00002.safetensors, missing"
    );
    assert_eq!(
        last_checkpoint(out).unwrap(),
        Some(out.join("checkpoint-20"))
    );
}

#[test]
fn verify_reads_pytorch_weights_but_not_other_pickles() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("checkpoint-20");
    hf_checkpoint(&d);
    fs::remove_file(d.join("model.safetensors")).unwrap();
    let mut map = TensorMap::new();
    map.insert(
        "w",
        TensorView::new(DType::F32, vec![2], vec![0u8; 8]).unwrap(),
    )
    .unwrap();
    kiln_formats::torch::save(d.join("pytorch_model.bin"), &map).unwrap();
    // accelerate's FSDP optimizer: a general pickle, not a state dict of tensors.
    fs::write(d.join("optimizer.bin"), b"PK\x03\x04 general pickle").unwrap();
    let v = verify_checkpoint(&d).unwrap();
    assert_eq!(v.completeness, Completeness::Foreign);
    assert_eq!(
        v.tensor_files,
        vec![d.join("pytorch_model.bin"), d.join("optimizer.pt")]
    );
    assert_eq!(v.tensors, 3);
    // A corrupt weights file is caught.
    let f = d.join("pytorch_model.bin");
    let mut bytes = fs::read(&f).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 10);
    fs::write(&f, &bytes).unwrap();
    let err = verify_checkpoint(&d).unwrap_err().to_string();
    assert!(
        err.contains("pytorch_model.bin") && !err.contains('\n'),
        "{err}"
    );
}

#[test]
fn verify_reads_shards_through_their_index_once() {
    let tmp = tempfile::tempdir().unwrap();
    let s = kiln_checkpoint::commit::Staging::begin(
        tmp.path(),
        1,
        &kiln_checkpoint::commit::SingleProcess,
    )
    .unwrap();
    let mut map = TensorMap::new();
    for name in ["a", "b", "c"] {
        map.insert(
            name,
            TensorView::new(DType::F32, vec![256], vec![0u8; 1024]).unwrap(),
        )
        .unwrap();
    }
    let saved =
        kiln_formats::shard::save_sharded(s.dir(), kiln_formats::Format::Safetensors, &map, 1500)
            .unwrap();
    assert_eq!(saved.files.len(), 3);
    let dir = s.commit(&kiln_checkpoint::commit::SingleProcess).unwrap();
    let v = verify_checkpoint(&dir).unwrap();
    assert_eq!(
        v.tensor_files,
        vec![dir.join("model.safetensors.index.json")]
    );
    assert_eq!(v.tensors, 3);
    // A shard deleted after the commit: incomplete.
    fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    assert!(
        verify_checkpoint(&dir)
            .unwrap_err()
            .to_string()
            .contains("missing")
    );
}

#[test]
fn verify_reads_every_tensor_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let p = save(out, 1, 0, SMALL).unwrap();
    assert_content(&p, 1, 0, SMALL);
    let v = verify_checkpoint(&p).unwrap();
    assert_eq!(v.tensors, 1);
    assert_eq!(v.json_files, 2); // manifest and trainer state

    // Same sizes (the manifest agrees) but corrupt content.
    let p2 = save(out, 2, 0, SMALL).unwrap();
    let f = p2.join("model.safetensors");
    let mut bytes = fs::read(&f).unwrap();
    bytes[8] = b'['; // header no longer a JSON object
    fs::write(&f, &bytes).unwrap();
    assert_eq!(completeness(&p2).unwrap(), Completeness::Complete);
    let err = verify_checkpoint(&p2).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    let p3 = save(out, 3, 0, SMALL).unwrap();
    let f = p3.join("trainer_state.json");
    let len = fs::metadata(&f).unwrap().len() as usize;
    fs::write(&f, "x".repeat(len)).unwrap();
    let err = verify_checkpoint(&p3).unwrap_err().to_string();
    assert!(
        err.contains("trainer_state.json") && !err.contains('\n'),
        "{err}"
    );
}

#[test]
fn clean_leftovers_follows_the_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    assert!(clean_leftovers(&out.join("missing")).unwrap().is_empty());
    // An interrupted save.
    fs::create_dir_all(out.join(".checkpoint-3.tmp-kiln/sub")).unwrap();
    // An interrupted re-save, before the new copy was renamed in: restore.
    save(out, 4, 0, TINY).unwrap();
    fs::rename(out.join("checkpoint-4"), out.join(".checkpoint-4.old-kiln")).unwrap();
    // An interrupted re-save, after: remove the old copy.
    save(out, 5, 0, TINY).unwrap();
    save(out, 5, 1, TINY).unwrap();
    fs::create_dir(out.join(".checkpoint-5.old-kiln")).unwrap();
    // An interrupted deletion by rotation.
    fs::create_dir(out.join(".checkpoint-6.del-kiln")).unwrap();
    // Not ours.
    fs::create_dir(out.join(".checkpoint-abc.tmp-kiln")).unwrap();
    fs::write(out.join(".checkpoint-7.tmp-kiln"), b"a file").unwrap();

    let done = clean_leftovers(out).unwrap();
    assert_eq!(
        done,
        vec![
            Cleanup::RemovedStaging(out.join(".checkpoint-3.tmp-kiln")),
            Cleanup::RemovedDeleted(out.join(".checkpoint-6.del-kiln")),
            Cleanup::Restored {
                from: out.join(".checkpoint-4.old-kiln"),
                to: out.join("checkpoint-4"),
            },
            Cleanup::RemovedOld(out.join(".checkpoint-5.old-kiln")),
        ]
    );
    assert_eq!(
        names(out),
        [
            ".checkpoint-7.tmp-kiln",
            ".checkpoint-abc.tmp-kiln",
            "checkpoint-4",
            "checkpoint-5"
        ]
    );
    assert_content(&out.join("checkpoint-4"), 4, 0, TINY);
    assert_content(&out.join("checkpoint-5"), 5, 1, TINY);
    assert!(clean_leftovers(out).unwrap().is_empty());
}

// ---- rotation ----

fn run(steps_: &[u64]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for &s in steps_ {
        save(&out, s, 0, TINY).unwrap();
    }
    (tmp, out)
}

fn ck(out: &Path, step: u64) -> PathBuf {
    out.join(format!("checkpoint-{step}"))
}

#[test]
fn limit_zero_disables_rotation() {
    let (_t, out) = run(&[1, 2, 3]);
    assert!(rotate(&out, 0, None).unwrap().is_empty());
    assert_eq!(steps(&out), [1, 2, 3]);
}

#[test]
fn keeps_the_newest_by_step() {
    let (_t, out) = run(&[5, 1, 4, 2, 3]);
    let deleted = rotate(&out, 2, None).unwrap();
    assert_eq!(deleted, [ck(&out, 1), ck(&out, 2), ck(&out, 3)]);
    assert_eq!(steps(&out), [4, 5]);
    assert!(rotate(&out, 2, None).unwrap().is_empty());
    assert!(
        clean_leftovers(&out).unwrap().is_empty(),
        "nothing half-deleted"
    );
}

#[test]
fn best_is_never_deleted() {
    // best = oldest
    let (_t, out) = run(&[1, 2, 3, 4, 5]);
    let deleted = rotate(&out, 2, Some(&ck(&out, 1))).unwrap();
    assert_eq!(deleted, [ck(&out, 2), ck(&out, 3), ck(&out, 4)]);
    assert_eq!(steps(&out), [1, 5]);
    // best = newest
    let (_t, out) = run(&[1, 2, 3, 4, 5]);
    rotate(&out, 2, Some(&ck(&out, 5))).unwrap();
    assert_eq!(steps(&out), [4, 5]);
    // best in the middle, limit 3
    let (_t, out) = run(&[1, 2, 3, 4, 5]);
    rotate(&out, 3, Some(&ck(&out, 2))).unwrap();
    assert_eq!(steps(&out), [2, 4, 5]);
    // a best that does not exist protects nothing
    let (_t, out) = run(&[1, 2, 3]);
    rotate(&out, 1, Some(&ck(&out, 9))).unwrap();
    assert_eq!(steps(&out), [3]);
}

#[test]
fn limit_one_keeps_best_and_newest() {
    // best != newest: 2 kept.
    let (_t, out) = run(&[1, 2, 3, 4]);
    rotate(&out, 1, Some(&ck(&out, 2))).unwrap();
    assert_eq!(steps(&out), [2, 4]);
    // best == newest: 1 kept.
    let (_t, out) = run(&[1, 2, 3, 4]);
    rotate(&out, 1, Some(&ck(&out, 4))).unwrap();
    assert_eq!(steps(&out), [4]);
    // no best: 1 kept.
    let (_t, out) = run(&[1, 2, 3, 4]);
    rotate(&out, 1, None).unwrap();
    assert_eq!(steps(&out), [4]);
}

#[test]
fn other_runs_and_incomplete_folders_are_left_alone() {
    let (_t, out) = run(&[3, 10, 200, 1000, 5000]);
    // A foreign (transformers) checkpoint counts as complete.
    hf_checkpoint(&ck(&out, 7));
    // The highest step is incomplete: not counted, not deleted, not "newest".
    fs::remove_file(ck(&out, 5000).join("extra_state.dat")).unwrap();
    save(&out, 4, 0, TINY).unwrap();
    fs::remove_file(ck(&out, 4).join(MANIFEST_NAME)).unwrap();
    fs::remove_file(ck(&out, 4).join("trainer_state.json")).unwrap();
    fs::create_dir(out.join("checkpoint-abc")).unwrap();
    fs::create_dir(out.join("checkpoint-5.bak")).unwrap();
    fs::write(out.join("checkpoint-8"), b"plain file").unwrap();
    fs::create_dir(out.join("checkpoint-9.tmp")).unwrap();
    let deleted = rotate(&out, 2, None).unwrap();
    assert_eq!(deleted, [ck(&out, 3), ck(&out, 7), ck(&out, 10)]);
    assert_eq!(
        names(&out),
        [
            "checkpoint-1000",
            "checkpoint-200",
            "checkpoint-4",
            "checkpoint-5.bak",
            "checkpoint-5000",
            "checkpoint-8",
            "checkpoint-9.tmp",
            "checkpoint-abc"
        ]
    );
}

#[test]
fn best_is_matched_after_normalisation() {
    // Relative paths from the test's working folder (the package root), so that
    // `./<dir>/out/...` and `<dir>/out/...` are both relative spellings.
    let tmp = tempfile::Builder::new()
        .prefix(".kiln-rotate-test-")
        .tempdir_in(".")
        .unwrap();
    let rel = Path::new(tmp.path().file_name().unwrap()).join("out");
    for s in 1..=4 {
        save(&rel, s, 0, TINY).unwrap();
    }
    let dotted = Path::new(".").join(&rel);
    // output_dir given as `out`, best as `./out/checkpoint-2`.
    rotate(&rel, 1, Some(&dotted.join("checkpoint-2"))).unwrap();
    assert_eq!(steps(&rel), [2, 4]);
    // The other way round, and through `..` and an absolute path.
    save(&rel, 5, 0, TINY).unwrap();
    let abs = fs::canonicalize(&rel).unwrap();
    let odd = rel.join("..").join("out").join("checkpoint-4");
    rotate(&dotted, 1, Some(&odd)).unwrap();
    assert_eq!(steps(&rel), [4, 5]);
    save(&rel, 6, 0, TINY).unwrap();
    rotate(&dotted, 1, Some(&abs.join("checkpoint-5"))).unwrap();
    assert_eq!(steps(&rel), [5, 6]);
}
