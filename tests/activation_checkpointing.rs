//! `activation_checkpointing` (and transformers 4's `gradient_checkpointing`): runs that
//! recompute every layer (or every n-th) in backward end with the same weights, bit for
//! bit, and log the same losses as runs that keep the activations, with dropout on —
//! BERT, GPT-2 and a Llama with LoRA adapters; the options kiln cannot honour are
//! refused before any work, and those that change nothing say so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{causal_args, kiln, logged_gpt2_args, tiny_bert_args, weights_of};
use kiln::formats::TensorCollection;
use kiln_test_support::fs::read_json;
use serde_json::Value;

/// The weights of `a` and `b`, byte for byte, and their logged losses are the same.
fn assert_same_run(a: &Path, b: &Path) {
    let (wa, wb) = (weights_of(a), weights_of(b));
    assert_eq!(wa.tensors().len(), wb.tensors().len());
    for info in wa.tensors() {
        let (x, y) = (
            wa.tensor(&info.name).unwrap(),
            wb.tensor(&info.name).unwrap(),
        );
        assert!(x.data() == y.data(), "{} differs", info.name);
    }
    let losses = |dir: &Path| -> Vec<Value> {
        read_json(&dir.join("trainer_state.json"))["log_history"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.get("loss").cloned())
            .collect()
    };
    let la = losses(a);
    assert!(!la.is_empty());
    assert_eq!(la, losses(b));
}

#[test]
fn bert_recomputed_in_backward_ends_bit_identical() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let layers = ["--num_hidden_layers", "3"];
    kiln(tiny_bert_args(&w.join("plain"), &layers)).expect_success();
    let mut every = layers.to_vec();
    every.extend(["--activation_checkpointing", "true"]);
    kiln(tiny_bert_args(&w.join("all"), &every)).expect_success();
    assert_same_run(&w.join("plain"), &w.join("all"));

    // transformers 4's names; every other layer; torch's options noted.
    let mut some = layers.to_vec();
    some.extend([
        "--gradient_checkpointing",
        "true",
        "--gradient_checkpointing_kwargs",
        r#"{"every_n_layers": 2, "use_reentrant": false}"#,
    ]);
    let run = kiln(tiny_bert_args(&w.join("some"), &some));
    run.expect_success();
    assert!(
        run.stderr.contains(
            "note: gradient_checkpointing_kwargs use_reentrant false changes nothing here"
        ),
        "{}",
        run.stderr
    );
    assert_same_run(&w.join("plain"), &w.join("some"));
}

#[test]
fn gpt2_and_a_llama_with_lora_end_bit_identical() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let on = ["--activation_checkpointing", "true"];
    kiln(logged_gpt2_args(&w.join("gpt2"), &[])).expect_success();
    kiln(logged_gpt2_args(&w.join("gpt2-ckpt"), &on)).expect_success();
    assert_same_run(&w.join("gpt2"), &w.join("gpt2-ckpt"));

    let llama = |out: &Path, extra: &[&str]| {
        let mut flags = vec![
            "--attention_dropout",
            "0.1",
            "--use_peft",
            "true",
            "--lora_dropout",
            "0.1",
            "--lora_target_modules",
            "all-linear",
            "--max_steps",
            "3",
            "--logging_steps",
            "1",
        ];
        flags.extend_from_slice(extra);
        kiln(causal_args("llama-corpus.toml", out, &flags)).expect_success();
    };
    llama(&w.join("llama"), &[]);
    llama(&w.join("llama-ckpt"), &on);
    assert_same_run(&w.join("llama"), &w.join("llama-ckpt"));
}

#[test]
fn options_kiln_cannot_honour_are_refused_before_any_work() {
    let work = tempfile::tempdir().unwrap();
    for (kwargs, words) in [
        (
            r#"{"context_fn": "f"}"#,
            "activation_checkpointing_kwargs: unknown option \"context_fn\"",
        ),
        (
            r#"{"every_n_layers": 0}"#,
            "every_n_layers: expected a whole number of at least 1, got 0",
        ),
        (r#"{"use_reentrant": "yes"}"#, "expected true or false"),
    ] {
        let out = work.path().join("refused");
        let run = kiln(tiny_bert_args(
            &out,
            &[
                "--activation_checkpointing",
                "true",
                "--activation_checkpointing_kwargs",
                kwargs,
            ],
        ));
        assert_ne!(run.code, Some(0));
        assert!(run.one_stderr_line().contains(words), "{}", run.stderr);
        assert!(!out.exists(), "{kwargs} wrote {}", out.display());
    }
}
