//! Content hashes: one flipped byte in any file of a checkpoint is named by `kiln
//! verify`; `--resume_from_checkpoint last` passes over that checkpoint (saying so, and
//! leaving it in place) and resumes the one before, ending bit-identical to an
//! uninterrupted run; an explicit path to it is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{NO_EVAL, kiln, tiny_bert_args, weights_of};
use kiln::checkpoint::commit::Manifest;
use kiln_test_support::fs::copy_dir;

fn args(out: &Path, max_steps: &str) -> Vec<String> {
    let saves = [
        "--max_steps",
        max_steps,
        "--save_steps",
        "4",
        "--save_total_limit",
        "none",
    ];
    tiny_bert_args(out, &[&saves[..], &NO_EVAL[..]].concat())
}

fn flip_a_byte(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn a_flipped_byte_is_named_and_resume_falls_back_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    kiln(args(&straight, "12")).expect_success();
    let base = dir.path().join("base");
    kiln(args(&base, "8")).expect_success();
    let ckpt8 = base.join("checkpoint-8");
    let manifest = Manifest::read(&ckpt8).unwrap();
    assert_eq!(
        manifest.blake3.keys().collect::<Vec<_>>(),
        manifest.files.keys().collect::<Vec<_>>(),
        "every file has its digest"
    );
    kiln(["verify", ckpt8.to_str().unwrap()]).expect_success();

    for name in [
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state.json",
        "scheduler.json",
        "data_state.json",
        "config.json",
        "tokenizer.json",
        "vocab.txt",
    ] {
        assert!(manifest.files.contains_key(name), "{name}");
        let case = dir.path().join(format!("flip-{name}"));
        copy_dir(&base, &case);
        let bad = case.join("checkpoint-8").join(name);
        flip_a_byte(&bad);

        let line = kiln(["verify", case.join("checkpoint-8").to_str().unwrap()])
            .expect_error(&["corrupt"])
            .to_string();
        assert!(line.contains(&bad.display().to_string()), "{line}");

        let explicit = kiln(
            [
                args(&case, "12"),
                vec![
                    "--resume_from_checkpoint".into(),
                    case.join("checkpoint-8").display().to_string(),
                ],
            ]
            .concat(),
        );
        explicit.expect_code(4);
        assert!(
            explicit.stderr.contains("corrupt") && explicit.stderr.contains(name),
            "{name}: {}",
            explicit.stderr
        );

        let resumed = kiln(
            [
                args(&case, "12"),
                vec!["--resume_from_checkpoint".into(), "last".into()],
            ]
            .concat(),
        );
        resumed.expect_success();
        assert!(
            resumed.stderr.contains("not resuming from it")
                && resumed.stderr.contains(&bad.display().to_string()),
            "{name}: {}",
            resumed.stderr
        );
        assert!(
            resumed.stderr.contains(&format!(
                "resuming from {}",
                case.join("checkpoint-4").display()
            )),
            "{name}: {}",
            resumed.stderr
        );
        let diffs = kiln::formats::compare::compare(
            &weights_of(&straight),
            &weights_of(&case),
            Default::default(),
        )
        .unwrap();
        assert!(diffs.is_empty(), "{name}: {diffs:?}");
    }
}
