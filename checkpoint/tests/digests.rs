//! Content digests in checkpoint manifests: taken while the files are written (every
//! file has one, and it matches the file), a flipped byte is named by verification and
//! passed over by `last_sound_checkpoint`, rotation after a save never keeps a corrupt
//! later checkpoint as the newest, and hostile manifests are refused without panics or
//! reads outside the folder.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{Sizes, save, steps};
use kiln_checkpoint::Error;
use kiln_checkpoint::commit::{MANIFEST_NAME, Manifest};
use kiln_checkpoint::rotate::{rotate, rotate_after_save};
use kiln_checkpoint::scan::{Completeness, completeness, last_sound_checkpoint, verify_checkpoint};
use proptest::prelude::*;

const SIZES: Sizes = Sizes {
    model: 4096,
    extra: 70_000,
};

fn flip(file: &Path) {
    let mut b = std::fs::read(file).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x80;
    std::fs::write(file, b).unwrap();
}

#[test]
fn every_file_has_the_digest_of_its_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save(&tmp.path().join("out"), 3, 0, SIZES).unwrap();
    let m = Manifest::read(&dir).unwrap();
    assert_eq!(
        m.blake3.keys().collect::<Vec<_>>(),
        m.files.keys().collect::<Vec<_>>()
    );
    for (rel, digest) in &m.blake3 {
        let bytes = std::fs::read(dir.join(rel)).unwrap();
        assert_eq!(&blake3::hash(&bytes).to_hex().to_string(), digest, "{rel}");
    }
    verify_checkpoint(&dir).unwrap();
}

#[test]
fn a_flipped_byte_is_named_and_passed_over() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for s in [1, 2] {
        save(&out, s, 0, SIZES).unwrap();
    }
    let newest = out.join("checkpoint-2");
    for file in ["model.safetensors", "extra_state.dat"] {
        let case = tmp.path().join(format!("case-{file}"));
        kiln_test_support::fs::copy_dir(&out, &case);
        let bad = case.join("checkpoint-2").join(file);
        flip(&bad);
        // Same size: complete by the manifest's sizes, corrupt by its digests.
        assert_eq!(
            completeness(&case.join("checkpoint-2")).unwrap(),
            Completeness::Complete
        );
        match verify_checkpoint(&case.join("checkpoint-2")).unwrap_err() {
            Error::Corrupt { path, reason } => {
                assert_eq!(path, bad);
                assert!(reason.contains("BLAKE3"), "{reason}");
            }
            e => panic!("{file}: {e}"),
        }
        let (sound, passed_over) = last_sound_checkpoint(&case).unwrap();
        assert_eq!(sound, Some(case.join("checkpoint-1")));
        assert_eq!(passed_over.len(), 1);
        assert!(passed_over[0].to_string().contains(file));
        assert!(bad.exists(), "left in place");
    }
    assert_eq!(last_sound_checkpoint(&out).unwrap().0, Some(newest));
}

#[test]
fn rotation_after_a_save_never_keeps_a_corrupt_later_checkpoint_as_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // A run that reached step 5, resumed from step 2, has just saved step 3.
    for s in [1, 2, 5, 3] {
        save(&out, s, 0, SIZES).unwrap();
    }
    flip(&out.join("checkpoint-5/model.safetensors"));
    let just_saved: PathBuf = out.join("checkpoint-3");
    let deleted = rotate_after_save(&out, 1, None, &just_saved).unwrap();
    assert_eq!(
        deleted,
        [out.join("checkpoint-1"), out.join("checkpoint-2")]
    );
    // Kept: what was just saved; the corrupt one is neither counted nor deleted.
    assert_eq!(steps(&out), [3, 5]);
    // The plain rotation would have taken checkpoint-5 for the newest.
    let deleted = rotate(&out, 1, None).unwrap();
    assert_eq!(deleted, [just_saved]);
}

/// A manifest field value: sizes and digests, sane or hostile.
fn manifest_json() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("model.safetensors".to_string()),
        Just("extra_state.dat".to_string()),
        Just("../outside".to_string()),
        Just("/etc/hostname".to_string()),
        Just("".to_string()),
        "[a-z./]{1,12}",
    ];
    let digest = prop_oneof![
        Just("0".repeat(64)),
        "[0-9a-f]{0,70}",
        Just("é".to_string()),
    ];
    (
        proptest::collection::btree_map(name.clone(), 0u64..100_000, 0..4),
        proptest::collection::btree_map(name, digest, 0..4),
    )
        .prop_map(|(files, digests)| {
            serde_json::json!({
                "kiln_version": "0",
                "step": 1,
                "files": files,
                "blake3": digests,
            })
            .to_string()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn hostile_manifests_are_refused_without_panics(text in manifest_json()) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = save(&tmp.path().join("out"), 1, 0, SIZES).unwrap();
        std::fs::write(dir.join(MANIFEST_NAME), &text).unwrap();
        let complete = completeness(&dir).unwrap() == Completeness::Complete;
        let verified = verify_checkpoint(&dir);
        // A manifest that passes must list real files with their true digests.
        if verified.is_ok() {
            prop_assert!(complete);
            let m = Manifest::read(&dir).unwrap();
            for (rel, d) in &m.blake3 {
                let bytes = std::fs::read(dir.join(rel)).unwrap();
                prop_assert_eq!(&blake3::hash(&bytes).to_hex().to_string(), d);
            }
        }
        let _ = last_sound_checkpoint(&tmp.path().join("out")).unwrap();
    }
}
