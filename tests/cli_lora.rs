//! LoRA through the `kiln` binary, proven against peft: for BERT, GPT-2 and Llama a
//! LoRA fine-tune of a base folder saves an adapter (which `kiln eval` and `kiln
//! predict` take) that peft's
//! `PeftModel.from_pretrained` loads to kiln's logits; `kiln merge` equals peft's
//! `merge_and_unload`; an adapter peft wrote (rslora, rank/alpha patterns, modules to
//! save, biases, all-linear, Conv1D) predicts in kiln as in peft; the base folder is untouched;
//! an adapter checkpoint resumes bit for bit; bad options are one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{NO_EVAL, causal_args, kiln, repo, tiny_bert_args};
use kiln_test_support::fs::{copy_dir, read_json};
use kiln_test_support::{max_abs_diff, run_checker};
use serde_json::{Value, json};

/// A causal LM config of `data/configs`, shrunk, trained for a few steps into `out`,
/// without evaluation.
fn tiny_causal(config: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = causal_args(config, out, &NO_EVAL);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The tiny BERT run of `tests/common` into `out` without evaluation, `extra` after.
fn bert_no_eval(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = tiny_bert_args(out, extra);
    a.extend(NO_EVAL.iter().map(|s| s.to_string()));
    a
}

/// A BERT base folder (2 steps) in `dir/base`, its path.
fn bert_base(dir: &Path) -> PathBuf {
    let base = dir.join("base");
    kiln(bert_no_eval(
        &base,
        &["--max_steps", "2", "--save_steps", "2"],
    ))
    .expect_success();
    base
}

/// The tiny BERT run as a LoRA fine-tune of `base` into `out`, `extra` after.
fn bert_lora(out: &Path, base: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = tiny_bert_args(
        out,
        &["--model", base.to_str().unwrap(), "--use_peft", "true"],
    );
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Every file of `dir` (recursively) with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

struct Arch {
    name: &'static str,
    task: &'static str,
    /// The base run's arguments (without output_dir's effect on anything else).
    base_args: fn(&Path) -> Vec<String>,
    /// kiln's LoRA flags for the fine-tune.
    lora: &'static [&'static str],
    /// peft's LoraConfig for the adapter peft writes.
    peft_config: fn() -> Value,
    text: &'static str,
}

fn archs() -> Vec<Arch> {
    vec![
        Arch {
            name: "bert",
            task: "SEQ_CLS",
            base_args: |out| bert_no_eval(out, &["--max_steps", "2", "--save_steps", "2"]),
            lora: &[
                "--lora_target_modules",
                "query,value,dense",
                "--lora_dropout",
                "0.1",
            ],
            peft_config: || {
                json!({"r": 4, "lora_alpha": 16, "use_rslora": true,
                    "target_modules": ["query", "key", "value"],
                    "rank_pattern": {"value": 2}, "alpha_pattern": {"key": 4},
                    "modules_to_save": ["pooler"], "bias": "all"})
            },
            text: "a quietly moving film",
        },
        Arch {
            name: "gpt2",
            task: "CAUSAL_LM",
            base_args: |out| {
                tiny_causal(
                    "gpt2-corpus.toml",
                    out,
                    &["--n_embd", "32", "--n_positions", "64"],
                )
            },
            lora: &[
                "--lora_target_modules",
                "c_attn,c_proj",
                "--lora_dropout",
                "0.1",
            ],
            peft_config: || json!({"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": true}),
            text: "Once upon a time",
        },
        Arch {
            name: "llama",
            task: "CAUSAL_LM",
            base_args: |out| {
                tiny_causal(
                    "llama-corpus.toml",
                    out,
                    &["--hidden_size", "32", "--intermediate_size", "48"],
                )
            },
            lora: &["--lora_target_modules", "all-linear"],
            peft_config: || json!({"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "init_lora_weights": "gaussian"}),
            text: "The little dog",
        },
    ]
}

/// `kiln predict`'s logits (the only text's) and input ids.
fn predict(model: &Path, base: Option<&Path>, text: &str) -> (Vec<f32>, Value) {
    let mut args = vec![
        "predict".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--text".into(),
        text.into(),
        "--json".into(),
    ];
    if let Some(b) = base {
        args.extend(["--base".into(), b.display().to_string()]);
    }
    let v = kiln(args).expect_success().json();
    let logits = v["logits"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (logits, v["input_ids"][0].clone())
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn lora_adapters_are_interchangeable_with_peft() {
    let work = tempfile::tempdir().unwrap();
    let mut jobs = Vec::new();
    let mut kiln_logits = Vec::new();
    for a in archs() {
        let dir = work.path().join(a.name);
        let base = dir.join("base");
        kiln((a.base_args)(&base)).expect_success();
        let before = snapshot(&base);

        let adapter = dir.join("adapter");
        let mut args = (a.base_args)(&adapter);
        args.extend(
            [
                "--model",
                base.to_str().unwrap(),
                "--use_peft",
                "true",
                "--lora_r",
                "4",
                "--lora_alpha",
                "8",
                "--learning_rate",
                "0.1",
                "--max_steps",
                "3",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.extend(a.lora.iter().map(|s| s.to_string()));
        let run = kiln(args);
        run.expect_success();
        assert!(
            run.stderr.contains("trainable params: ") && run.stderr.contains("|| trainable%: "),
            "{}: {}",
            a.name,
            run.stderr
        );
        assert_eq!(
            snapshot(&base),
            before,
            "{}: the base folder changed",
            a.name
        );
        let names = kiln_test_support::fs::names(&adapter);
        assert!(
            names.contains(&"adapter_model.safetensors".to_string()),
            "{names:?}"
        );
        assert!(
            !names
                .iter()
                .any(|n| n == "config.json" || n.starts_with("model")),
            "{names:?}"
        );
        let config = read_json(&adapter.join("adapter_config.json"));
        assert_eq!(config["task_type"], a.task);
        assert_eq!(config["base_model_name_or_path"], base.to_str().unwrap());

        let inspect = kiln(["inspect", adapter.to_str().unwrap()]);
        let text = &inspect.expect_success().stdout;
        assert!(
            text.contains(&format!("adapter:    LORA {} r=4", a.task)),
            "{text}"
        );
        kiln([
            "verify",
            adapter.join("adapter_model.safetensors").to_str().unwrap(),
        ])
        .expect_success();
        if a.task == "SEQ_CLS" {
            let eval = kiln([
                "eval",
                "--model",
                adapter.to_str().unwrap(),
                "--validation_file",
                repo()
                    .join("cli/bundled/sentiment/validation.jsonl")
                    .to_str()
                    .unwrap(),
            ]);
            let metrics = eval.expect_success().json();
            assert!(metrics["eval_accuracy"].is_number(), "{metrics}");
        }
        let (logits, ids) = predict(&adapter, None, a.text);
        let merged = dir.join("merged");
        kiln(["merge", adapter.to_str().unwrap(), merged.to_str().unwrap()]).expect_success();
        let (merged_logits, _) = predict(&merged, None, a.text);
        let a_dir = adapter.to_str().unwrap();
        kiln(["merge", a_dir, a_dir]).expect_error(&["over the adapter"]);
        assert!(
            max_abs_diff(&logits, &merged_logits) < 1e-4,
            "{}: merged {merged_logits:?} vs adapter {logits:?}",
            a.name
        );
        jobs.push(
            json!({"kind": "kiln_adapter", "task": a.task, "base": base, "adapter": adapter,
            "kiln_merged": merged, "input_ids": ids}),
        );
        jobs.push(json!({"kind": "peft_adapter", "task": a.task, "base": base,
            "out": dir.join("peft"), "config": (a.peft_config)(), "input_ids": ids}));
        kiln_logits.push((a, base, logits, merged_logits));
    }
    let Some(results) = run_checker(&repo().join("tests/check_lora.py"), &jobs, work.path()) else {
        return;
    };
    for (i, (a, base, logits, merged_logits)) in kiln_logits.iter().enumerate() {
        let theirs = &results[2 * i];
        let base_logits = predict(base, None, a.text).0;
        let moved = max_abs_diff(&base_logits, logits);
        println!("{}: kiln's adapter moved the logits by {moved:.3e}", a.name);
        assert!(moved > 1e-4, "{}: kiln's adapter changes nothing", a.name);
        let d = max_abs_diff(logits, &floats(&theirs["peft"]));
        assert!(
            d < moved * 1e-3,
            "{}: {d} is not small against {moved}",
            a.name
        );
        println!("{}: kiln's adapter in peft: max |Δlogit| {d:.3e}", a.name);
        assert!(
            d < 1e-4,
            "{}: kiln's adapter in peft differs by {d}",
            a.name
        );
        let d = max_abs_diff(merged_logits, &floats(&theirs["merged"]));
        println!(
            "{}: kiln merge vs merge_and_unload: max |Δlogit| {d:.3e}",
            a.name
        );
        assert!(d < 1e-5, "{}: kiln merge vs merge_and_unload: {d}", a.name);
        let d = max_abs_diff(merged_logits, &floats(&theirs["kiln_merged"]));
        println!(
            "{}: kiln's merged folder in transformers: max |Δlogit| {d:.3e}",
            a.name
        );
        assert!(
            d < 1e-5,
            "{}: kiln's merged folder in transformers: {d}",
            a.name
        );
        // An adapter peft wrote, in kiln.
        let peft_dir = work.path().join(a.name).join("peft");
        let (ours, _) = predict(&peft_dir, Some(base), a.text);
        let peft = floats(&results[2 * i + 1]["peft"]);
        let d = max_abs_diff(&ours, &peft);
        println!("{}: peft's adapter in kiln: max |Δlogit| {d:.3e}", a.name);
        assert!(
            d < 1e-4,
            "{}: peft's adapter in kiln differs by {d}",
            a.name
        );
        let moved = max_abs_diff(&base_logits, &peft);
        println!("{}: peft's adapter moved the logits by {moved:.3e}", a.name);
        assert!(moved > 1e-3, "{}: peft's adapter changes nothing", a.name);
    }
}

#[test]
fn an_adapter_checkpoint_resumes_bit_for_bit() {
    let work = tempfile::tempdir().unwrap();
    let base = bert_base(work.path());
    let lora = |out: &Path, extra: &[&str]| {
        let mut args = bert_lora(
            out,
            &base,
            &[
                "--lora_dropout",
                "0.1",
                "--lora_target_modules",
                "all-linear",
                "--max_steps",
                "4",
                "--save_steps",
                "2",
                "--learning_rate",
                "0.01",
            ],
        );
        args.extend(NO_EVAL.iter().map(|s| s.to_string()));
        args.extend(extra.iter().map(|s| s.to_string()));
        kiln(args).expect_success();
    };
    let full = work.path().join("full");
    lora(&full, &[]);
    let ckpt = full.join("checkpoint-2");
    let names = kiln_test_support::fs::names(&ckpt);
    assert!(
        names.contains(&"adapter_model.safetensors".to_string()),
        "{names:?}"
    );
    // The optimizer holds state for the adapter's parameters only: as many as the
    // adapter file's tensors (LoRA's A and B, the classifier saved beside them).
    let opt =
        kiln::checkpoint::torch_state::TorchOptimizer::load(&ckpt.join("optimizer.pt")).unwrap();
    let adapter = kiln::formats::open(ckpt.join("adapter_model.safetensors")).unwrap();
    let counted: usize = opt.groups.iter().map(|g| g.params.len()).sum();
    assert_eq!(counted, adapter.tensors().len());
    assert_eq!(opt.state.len(), adapter.tensors().len());
    let resumed = work.path().join("resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    copy_dir(&ckpt, &resumed.join("checkpoint-2"));
    lora(&resumed, &["--resume_from_checkpoint", "last"]);
    for f in ["adapter_model.safetensors", "checkpoint-4/optimizer.pt"] {
        assert_eq!(
            std::fs::read(full.join(f)).unwrap(),
            std::fs::read(resumed.join(f)).unwrap(),
            "{f} differs after resuming"
        );
    }
    // A full run cannot resume an adapter checkpoint: one line, exit 4, before any step.
    let wrong = work.path().join("wrong");
    let run = kiln(bert_no_eval(
        &wrong,
        &[
            "--model",
            base.to_str().unwrap(),
            "--resume_from_checkpoint",
            ckpt.to_str().unwrap(),
        ],
    ));
    run.expect_code(4);
    kiln_test_support::bin::assert_mentions(run.one_stderr_line(), &["LoRA adapter"], "resume");
    // Continuing to train the saved adapter (init_from an adapter folder) works too.
    let more = work.path().join("more");
    kiln(bert_no_eval(
        &more,
        &["--model", full.to_str().unwrap(), "--max_steps", "1"],
    ))
    .expect_success();
    assert!(more.join("adapter_model.safetensors").is_file());
}

#[test]
fn bad_lora_options_are_one_line() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["--use_peft", "true", "--lora_target_modules", "q_proj"],
            &["q_proj", "query", "value"],
        ),
        (&["--use_peft", "true", "--use_dora", "true"], &["DoRA"]),
        (&["--use_peft", "true", "--lora_r", "0"], &["r", "positive"]),
    ];
    for (flags, words) in cases {
        let run = kiln(bert_no_eval(&out, flags));
        run.expect_error(words);
        assert!(!out.join("adapter_model.safetensors").exists());
    }
    let run = kiln(bert_no_eval(&out, &["--use_peft", "maybe"]));
    run.expect_code(2);
    kiln_test_support::bin::assert_mentions(
        run.one_stderr_line(),
        &["true or false"],
        "--use_peft maybe",
    );
}

#[test]
fn the_best_adapter_is_loaded_at_the_end_and_bf16_saves_f32_adapters() {
    let work = tempfile::tempdir().unwrap();
    let base = bert_base(work.path());
    let lora = |out: &Path, extra: &[&str]| {
        let mut args = bert_lora(
            out,
            &base,
            &[
                "--learning_rate",
                "0.2",
                // At this rate the eval loss rises after step 4: the best checkpoint
                // is an earlier one than the last.
                "--metric_for_best_model",
                "loss",
                "--save_total_limit",
                "1",
            ],
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        kiln(args).expect_success();
    };
    let out = work.path().join("best");
    lora(&out, &[]);
    let state = read_json(&out.join("trainer_state.json"));
    let best = state["best_model_checkpoint"].as_str().unwrap().to_string();
    assert!(best.ends_with("checkpoint-4"), "{best}");
    // Rotation kept the best beside the last; the saved adapter is the best one.
    assert!(Path::new(&best).join("adapter_model.safetensors").is_file());
    assert!(out.join("checkpoint-8/adapter_model.safetensors").is_file());
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(Path::new(&best).join("adapter_model.safetensors")).unwrap()
    );

    let bf16 = work.path().join("bf16");
    lora(&bf16, &["--bf16", "true"]);
    let saved = kiln::formats::open(bf16.join("adapter_model.safetensors")).unwrap();
    assert!(
        saved
            .tensors()
            .iter()
            .all(|t| t.dtype == kiln::formats::DType::F32)
    );
    let (logits, _) = predict(&bf16, None, "a fine film");
    assert!(logits.iter().all(|x| x.is_finite()));
}
