//! `kiln convert MODEL_DIR OUT.gguf` for GPT-2 and the Llama family, read by llama.cpp's
//! gguf-py and by transformers (tests/check_gguf.py): the tensor names gguf-py's
//! TensorNameMap gives, bytes equal to gguf-py's own quantize() of the folder's tensors
//! (rearranged as convert_hf_to_gguf.py does), the tokenizer keys, and logits of
//! `from_pretrained(dir, gguf_file=…)` against the folder's. Also `kiln inspect` of a
//! GGUF file, and the folders and flags that are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{causal_args, kiln};
use kiln_test_support::run_checker;
use serde_json::{Value, json};

/// A tiny causal LM of the bundled `config` trained for 2 steps into `out`.
fn train(config: &str, out: &Path, extra: &[&str]) {
    kiln(causal_args(config, out, extra)).expect_success();
}

/// The outtypes each model is converted to, and the largest logits difference allowed
/// relative to the folder's largest logit (f32: the 1e-4 of the issue, absolute).
fn tolerance(outtype: &str) -> f64 {
    match outtype {
        "f32" => 1e-4,
        "f16" => 2e-3,
        "bf16" => 2e-2,
        "q8_0" => 2e-2,
        _ => unreachable!(),
    }
}

fn convert(dir: &Path, out: &Path, outtype: &str) {
    let c = kiln([
        "convert",
        dir.to_str().unwrap(),
        out.to_str().unwrap(),
        "--outtype",
        outtype,
    ]);
    c.expect_success();
    assert!(c.stdout.contains(out.to_str().unwrap()), "{}", c.stdout);
}

#[test]
fn transformers_and_gguf_py_read_kilns_gguf_files() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let small = ["--hidden_size", "64", "--intermediate_size", "96"];
    // (folder, config, extra flags, outtypes)
    let models: Vec<(&str, &str, Vec<&str>, &[&str])> = vec![
        // transformers 5 reads a GGUF GPT-2's context_length into n_ctx, which GPT2Config
        // no longer has, and keeps n_positions 1024: a folder with another wpe is refused.
        (
            "gpt2",
            "gpt2-corpus.toml",
            vec!["--n_embd", "64", "--n_positions", "1024"],
            &["f32", "q8_0"],
        ),
        (
            "llama",
            "llama-corpus.toml",
            small.to_vec(),
            &["f32", "f16", "bf16", "q8_0"],
        ),
        // Not named "mistral": transformers turns a GGUF "llama" whose general.name holds
        // "mistral" into model_type mistral, which gguf-py 0.19 has no tensor map for, so it
        // refuses every such file (convert_hf_to_gguf.py names it after the folder too).
        (
            "small-m",
            "llama-corpus.toml",
            [
                &small[..],
                &[
                    "--architecture",
                    "MistralForCausalLM",
                    "--tie_word_embeddings",
                    "false",
                ],
            ]
            .concat(),
            &["f32"],
        ),
        // 48 columns: down_proj cannot be Q8_0 (blocks of 32) and falls back to F16.
        (
            "qwen2",
            "llama-corpus.toml",
            vec![
                "--hidden_size",
                "32",
                "--intermediate_size",
                "48",
                "--architecture",
                "Qwen2ForCausalLM",
            ],
            &["f32", "q8_0"],
        ),
        // transformers reads a GGUF Qwen3's head_dim as 128 whatever key_length says.
        (
            "qwen3",
            "llama-corpus.toml",
            [
                &small[..],
                &["--architecture", "Qwen3ForCausalLM", "--head_dim", "128"],
            ]
            .concat(),
            &["f32", "bf16"],
        ),
    ];
    let mut jobs = Vec::new();
    let mut expect: Vec<(String, String)> = Vec::new();
    for (name, config, extra, outtypes) in &models {
        let dir = w.join(name);
        train(config, &dir, extra);
        if *name == "qwen2" {
            add_chat_template(&dir);
        }
        for outtype in *outtypes {
            let file: PathBuf = w.join(format!("{name}-{outtype}.gguf"));
            convert(&dir, &file, outtype);
            jobs.push(json!({"folder": dir, "gguf": file, "outtype": outtype,
                "ids": [1, 5, 9, 42, 7, 100, 3], "text": "Once upon a time, Tom saw a cat."}));
            expect.push((name.to_string(), outtype.to_string()));
        }
    }
    let Some(results) = run_checker(&common::repo().join("tests/check_gguf.py"), &jobs, w) else {
        return;
    };
    for ((name, outtype), r) in expect.iter().zip(&results) {
        let what = format!("{name} {outtype}");
        assert_eq!(r["problems"], json!([]), "{what}: {r}");
        assert_eq!(r["bytes_equal"], r["tensors"], "{what}: {r}");
        assert_eq!(r["same_encoding"], true, "{what}");
        let diff = r["logits_diff"].as_f64().unwrap();
        let scale = r["logits_scale"].as_f64().unwrap();
        let allowed = if outtype == "f32" {
            1e-4
        } else {
            tolerance(outtype) * scale
        };
        assert!(
            diff <= allowed,
            "{what}: logits differ by {diff} (scale {scale})"
        );
        println!("{what}: logits diff {diff:.3e} of {scale:.3}");
        // Mistral is a GGUF "llama", as convert_hf_to_gguf.py writes it.
        let want_type = if *name == "small-m" {
            "llama"
        } else {
            name.as_str()
        };
        assert_eq!(r["config_type"], want_type, "{what}");
        let keys: Vec<&str> = r["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        for k in [
            "general.architecture",
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "general.file_type",
        ] {
            assert!(keys.contains(&k), "{what}: no {k}");
        }
    }
}

/// A chat template in tokenizer_config.json, as a fine-tuned folder has one.
fn add_chat_template(dir: &Path) {
    let path = dir.join("tokenizer_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["chat_template"] = json!(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    );
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn inspect_reads_gguf_and_convert_refuses_what_it_cannot_write() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let dir = w.join("llama");
    train(
        "llama-corpus.toml",
        &dir,
        &["--hidden_size", "32", "--intermediate_size", "48"],
    );
    let file = w.join("llama.gguf");
    // Default outtype: f16, as convert_hf_to_gguf.py.
    kiln(["convert", dir.to_str().unwrap(), file.to_str().unwrap()]).expect_success();

    let text = kiln(["inspect", file.to_str().unwrap()]);
    text.expect_success();
    for needle in [
        "format:     gguf (version 3, alignment 32)",
        "general.architecture = \"llama\"",
        "general.file_type = 1",
        "token_embd.weight",
        "blk.1.ffn_down.weight",
    ] {
        assert!(
            text.stdout.contains(needle),
            "{needle} not in:\n{}",
            text.stdout
        );
    }
    let j = kiln(["inspect", file.to_str().unwrap(), "--json"]);
    j.expect_success();
    let v: Value = serde_json::from_str(j.stdout.trim()).unwrap();
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["metadata"]["llama.block_count"], 2);
    let down = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "blk.0.ffn_down.weight")
        .unwrap();
    // Row-major (torch's [hidden, intermediate]); GGML's ne order would be [48, 32].
    assert_eq!(
        (down["type"].as_str(), &down["shape"]),
        (Some("F16"), &json!([32, 48]))
    );

    // A BERT folder has no GGUF form.
    let bert = w.join("bert");
    kiln(common::tiny_bert_args(&bert, &[])).expect_success();
    let e = kiln([
        "convert",
        bert.to_str().unwrap(),
        w.join("b.gguf").to_str().unwrap(),
    ]);
    e.expect_error(&["BertForSequenceClassification has no GGUF form"]);
    assert!(!w.join("b.gguf").exists());
    // --outtype without a GGUF output, and an unknown outtype.
    let e = kiln([
        "convert",
        dir.to_str().unwrap(),
        w.join("out").to_str().unwrap(),
        "--outtype",
        "f32",
    ]);
    e.expect_code(2);
    assert!(e.one_stderr_line().contains("--outtype"), "{}", e.stderr);
    let e = kiln([
        "convert",
        dir.to_str().unwrap(),
        file.to_str().unwrap(),
        "--outtype",
        "q4_k",
    ]);
    e.expect_code(2);
    assert!(e.stderr.contains("q4_k"), "{}", e.stderr);
}
