//! The asynchronous checkpoint's host snapshot goes through the device's backend and
//! writes the bytes the export path writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{Synthetic, Tiny, args};
use kiln_checkpoint::model::SaveOptions;
use kiln_trainer::Trainer;

fn model_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.ends_with(".safetensors") && n != "optimizer.safetensors" || n.ends_with(".bin")
        })
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn checkpoint_weights_are_the_bytes_of_the_export_path() {
    for (async_save, safetensors) in [(true, true), (false, true), (true, false)] {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        a.max_steps = 12;
        a.save_steps = 4.0;
        a.async_save = async_save;
        a.save_safetensors = safetensors;
        let mut t = Trainer::new(Tiny::new(1), a)
            .with_train_dataset(Synthetic::new(60, 7))
            .with_quiet(true);
        t.train(None).unwrap();
        // The model at the end is the model of the last checkpoint.
        let old = tempfile::tempdir().unwrap();
        let options = SaveOptions {
            safetensors,
            ..SaveOptions::default()
        };
        kiln_trainer::weights::save_pretrained(t.model(), old.path(), &options).unwrap();
        let ckpt = dir.path().join("checkpoint-12");
        let got = model_files(&ckpt);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            got,
            model_files(old.path()),
            "async={async_save} safetensors={safetensors}"
        );
        assert_eq!(
            std::fs::read(ckpt.join("config.json")).unwrap(),
            std::fs::read(old.path().join("config.json")).unwrap()
        );
        // Every save logged its stall.
        let stalls = t
            .state()
            .log_history
            .iter()
            .filter(|e| e.contains_key("save_stall"))
            .count();
        assert_eq!(stalls, 3, "async={async_save}");
    }
}
