//! The architecture plugin, trained by kiln's own command (`kiln_cli::main`, linked into
//! `kiln-example`) on the bundled sentiment set, then run by `kiln predict`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_plugin_example as _;

fn kiln_example(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln-example"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn bundled(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../cli/bundled/sentiment")
        .join(name)
}

/// A run config for the plugin's architecture.
fn config(dir: &Path) -> PathBuf {
    let path = dir.join("bag.toml");
    let toml = format!(
        r#"[model]
architecture = "BagOfWordsForSequenceClassification"
hidden_size = 16

[data]
train_file = {:?}
validation_file = {:?}
max_length = 64
vocab_size = 1000

[training]
output_dir = {:?}
num_train_epochs = 3
per_device_train_batch_size = 32
learning_rate = 0.05
eval_strategy = "epoch"
save_strategy = "epoch"
disable_tqdm = true
seed = 7
"#,
        bundled("train.jsonl").display().to_string(),
        bundled("validation.jsonl").display().to_string(),
        dir.join("out").display().to_string(),
    );
    std::fs::write(&path, toml).unwrap();
    path
}

#[test]
fn the_registry_holds_the_plugin_beside_kiln_s_architectures() {
    let names: Vec<_> = kiln_models::registry::architectures()
        .iter()
        .map(|a| a.name)
        .collect();
    assert!(
        names.contains(&"BagOfWordsForSequenceClassification"),
        "{names:?}"
    );
    assert!(
        names.contains(&"BertForSequenceClassification"),
        "{names:?}"
    );
    let bag = kiln_models::registry::find("BagOfWordsForSequenceClassification").unwrap();
    assert_eq!(bag.task, kiln_trainer::Task::SequenceClassification);
}

#[test]
fn kiln_train_trains_the_plugin_s_architecture_and_predict_runs_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let out = kiln_example(&["train", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("trained BagOfWordsForSequenceClassification for 150 steps"),
        "{stdout}"
    );
    // It learned: the final evaluation beats chance (the classes are balanced) clearly.
    let eval_line = stdout.lines().find(|l| l.starts_with("eval: ")).unwrap();
    let eval: serde_json::Value = serde_json::from_str(&eval_line["eval: ".len()..]).unwrap();
    let accuracy = eval["eval_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.7, "{eval}");

    // The model folder and the checkpoints are kiln's usual ones.
    let dir = tmp.path().join("out");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["architectures"][0],
        "BagOfWordsForSequenceClassification"
    );
    assert_eq!(config["id2label"]["0"], "negative");
    for f in ["model.safetensors", "tokenizer.json", "trainer_state.json"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert!(dir.join("checkpoint-150/optimizer.pt").is_file());

    let out = kiln_example(&[
        "predict",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        "a wonderful, moving film",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["logits"][0].as_array().unwrap().len(), 2, "{v}");
    assert!(v["predictions"][0].is_string(), "{v}");
}

#[test]
fn an_unknown_architecture_lists_the_registered_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let out = kiln_example(&[
        "train",
        cfg.to_str().unwrap(),
        "--architecture",
        "NopeModel",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("\"NopeModel\" is not registered"), "{err}");
    for name in [
        "BagOfWordsForSequenceClassification",
        "BertForSequenceClassification",
        "GPT2LMHeadModel",
    ] {
        assert!(err.contains(name), "{err}");
    }
    assert!(!tmp.path().join("out").exists());
}
