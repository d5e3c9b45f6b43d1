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

#[test]
fn the_peft_table_and_the_trl_flags_set_the_lora_options() {
    let toml = "[model]\narchitecture = \"LlamaForCausalLM\"\n[peft]\nr = 4\nlora_alpha = 16\n\
                target_modules = \"all-linear\"\nrank_pattern = { q_proj = 2 }\nbias = \"lora_only\"\n";
    let cfg = RunConfig::from_toml(toml, "lora.toml").unwrap();
    assert!(cfg.peft.enabled());
    let lora = cfg.peft.lora_config().unwrap();
    assert_eq!(
        (lora.r, lora.lora_alpha, lora.bias.as_str()),
        (4, 16.0, "lora_only")
    );
    assert_eq!(
        lora.rank_and_alpha("model.layers.0.self_attn.q_proj"),
        (2, 16.0)
    );
    assert_eq!(
        lora.target_modules,
        Some(kiln_peft::Targets::Pattern("all-linear".into()))
    );
    // use_peft = false keeps the table but trains every weight.
    let off = RunConfig::from_toml("[peft]\nuse_peft = false\nr = 4\n", "off.toml").unwrap();
    assert!(!off.peft.enabled());
    // Unknown and bad keys are one line naming the table.
    for (text, words) in [
        ("[peft]\nrr = 4\n", "rr"),
        ("[peft]\nr = 0\n", "positive"),
        ("[peft]\nbias = \"some\"\n", "bias"),
        ("[peft]\nuse_peft = 1\n", "use_peft"),
    ] {
        let e = RunConfig::from_toml(text, "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(words) && e.contains("bad.toml") && !e.contains('\n'),
            "{e}"
        );
    }
    // TRL's flags.
    let mut cfg = RunConfig::default();
    for (k, v) in [
        ("use_peft", "true"),
        ("lora_r", "16"),
        ("lora_alpha", "32"),
        ("lora_dropout", "0.05"),
        ("lora_target_modules", "q_proj, v_proj"),
        ("lora_modules_to_save", "lm_head"),
        ("use_rslora", "true"),
    ] {
        cfg.set(k, v).unwrap();
    }
    let lora = cfg.peft.lora_config().unwrap();
    assert_eq!(
        (lora.r, lora.lora_alpha, lora.lora_dropout),
        (16, 32.0, 0.05)
    );
    assert_eq!(
        lora.target_modules,
        Some(kiln_peft::Targets::List(vec![
            "q_proj".into(),
            "v_proj".into()
        ]))
    );
    assert_eq!(lora.modules_to_save, Some(vec!["lm_head".to_string()]));
    assert!(lora.use_rslora);
}
