//! The run config: mixed precision is a training argument in the TOML and the flags, and
//! a device without the dtype refuses a run before any work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_cli::config::RunConfig;
use kiln_test_support::backend::F32Only;

// The f32-only backend, selectable by name (`f32only`) in this test binary.
kiln_backend::register_backend!(F32Only);

#[test]
fn a_device_without_the_dtype_refuses_the_run_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // `kiln train --device f32only --fp16 true`: refused before the data is read (the
    // training file does not exist).
    let mut cfg = RunConfig::bundled_default().unwrap();
    cfg.set("device", "f32only").unwrap();
    cfg.set("fp16", "true").unwrap();
    cfg.set("output_dir", &out.display().to_string()).unwrap();
    cfg.set(
        "train_file",
        &dir.path().join("absent.jsonl").display().to_string(),
    )
    .unwrap();
    let e = kiln_cli::run::train(&cfg, true).unwrap_err().to_string();
    assert_eq!(
        e,
        "fp16 training needs a device that supports f16; f32only offers: f32"
    );
    assert!(!out.exists());
}

#[test]
fn bf16_and_fp16_are_training_arguments_in_the_run_toml_and_flags() {
    let cfg = RunConfig::from_toml(
        "[model]\narchitecture = \"GPT2LMHeadModel\"\n[training]\nbf16 = true\n",
        "test.toml",
    )
    .unwrap();
    assert!(cfg.training.bf16 && !cfg.training.fp16);
    let mut cfg = RunConfig::default();
    cfg.set("fp16", "true").unwrap();
    assert!(cfg.training.fp16);
    let json = cfg.training.to_json();
    assert_eq!(
        (json["bf16"].clone(), json["fp16"].clone()),
        (false.into(), true.into())
    );
}
