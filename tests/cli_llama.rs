//! The Llama family through the `kiln` binary: a run from scratch with the bundled
//! config, generation (an empty prompt starts from BOS), `[model]` keys given with
//! `--model_name_or_path` (applied, or refused when they change a weight's shape), and a
//! fine-tune of a folder transformers wrote in bf16 that transformers loads again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{causal_args, kiln, last_json_line, repo, run_python};
use kiln_test_support::fs::read_json;
use serde_json::Value;

/// A few steps of the bundled Llama config, shrunk, into `out`.
fn tiny_llama(out: &Path, extra: &[&str]) {
    let mut args = causal_args(
        "llama-corpus.toml",
        out,
        &[
            "--hidden_size",
            "32",
            "--intermediate_size",
            "48",
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "8",
            "--max_steps",
            "4",
            "--save_steps",
            "4",
        ],
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    kiln(args).expect_success();
}

#[test]
fn a_llama_trains_generates_and_takes_keys_over_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("llama");
    tiny_llama(&out, &[]);
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(
        (
            config["num_key_value_heads"].as_u64(),
            config["head_dim"].as_u64()
        ),
        (Some(2), Some(8))
    );
    assert_eq!(config["rope_parameters"]["rope_type"], "default");

    for text in ["once upon a time", ""] {
        let p = kiln([
            "predict",
            "--model",
            out.to_str().unwrap(),
            "--text",
            text,
            "--max-new-tokens",
            "5",
            "--json",
        ]);
        p.expect_success();
        let v: Value = serde_json::from_str(p.stdout.trim()).unwrap();
        assert_eq!(v["generated"].as_array().unwrap().len(), 1, "{v}");
    }

    // A key that keeps every weight's shape is applied over the folder's config.
    let tuned = dir.path().join("tuned");
    let run = kiln([
        "train",
        "--model_name_or_path",
        out.to_str().unwrap(),
        "--train_file",
        repo().join("data/corpus/train.txt").to_str().unwrap(),
        "--block_size",
        "32",
        "--max_train_samples",
        "16",
        "--max_steps",
        "1",
        "--attention_dropout",
        "0.25",
        "--output_dir",
        tuned.to_str().unwrap(),
        "--disable_tqdm",
        "true",
    ]);
    run.expect_success();
    assert!(
        run.stderr.contains("attention_dropout"),
        "a note names the key: {}",
        run.stderr
    );
    assert_eq!(
        read_json(&tuned.join("config.json"))["attention_dropout"],
        0.25
    );

    // One that would change a loaded weight is one line naming it.
    let line = kiln([
        "train",
        "--model_name_or_path",
        out.to_str().unwrap(),
        "--train_file",
        repo().join("data/corpus/train.txt").to_str().unwrap(),
        "--hidden_size",
        "999",
        "--output_dir",
        dir.path().join("bad").to_str().unwrap(),
    ])
    .expect_code(1)
    .expect_error(&["hidden_size", "shape"])
    .to_string();
    assert!(line.contains("model.embed_tokens.weight"), "{line}");
}

#[test]
fn a_folder_transformers_wrote_in_bf16_fine_tunes_and_loads_back() {
    let Some(py) = kiln_test_support::python_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A tokenizer for the folder: kiln's byte-level BPE of a short run.
    let seed = dir.path().join("seed");
    tiny_llama(&seed, &["--max_steps", "1"]);
    let base = dir.path().join("base");
    let make = r#"
import json, shutil, sys, torch, transformers
seed, base = sys.argv[1], sys.argv[2]
vocab = json.load(open(seed + "/config.json"))["vocab_size"]
config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(base, max_shard_size="100kB")
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(seed + "/" + f, base + "/" + f)
print(json.dumps({"ok": True}))
"#;
    run_python(
        &py,
        make,
        &[seed.display().to_string(), base.display().to_string()],
    );
    assert!(
        base.join("model.safetensors.index.json").exists(),
        "sharded"
    );

    let data = |f: &str| repo().join("data/corpus").join(f).display().to_string();
    let before = kiln([
        "eval",
        "--model",
        base.to_str().unwrap(),
        "--validation_file",
        &data("validation.txt"),
        "--block_size",
        "32",
        "--max_eval_samples",
        "16",
    ]);
    before.expect_success();
    let loss_before = last_json_line(&before.stdout)["eval_loss"]
        .as_f64()
        .unwrap();

    let out = dir.path().join("tuned");
    let run = kiln([
        "train",
        "--model_name_or_path",
        base.to_str().unwrap(),
        "--train_file",
        &data("train.txt"),
        "--validation_file",
        &data("validation.txt"),
        "--block_size",
        "32",
        "--max_train_samples",
        "128",
        "--max_eval_samples",
        "16",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "3e-3",
        "--max_steps",
        "20",
        "--output_dir",
        out.to_str().unwrap(),
        "--disable_tqdm",
        "true",
    ]);
    run.expect_success();
    let after = kiln([
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--validation_file",
        &data("validation.txt"),
        "--block_size",
        "32",
        "--max_eval_samples",
        "16",
    ]);
    after.expect_success();
    let loss_after = last_json_line(&after.stdout)["eval_loss"].as_f64().unwrap();
    println!(
        "eval loss of the transformers-written folder {loss_before:.4}, after 20 kiln steps {loss_after:.4}"
    );
    assert!(
        loss_after < loss_before - 0.1,
        "{loss_before} -> {loss_after}"
    );

    // Saved as transformers would save it: bf16, the folder's rope and generation config.
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["dtype"], "bfloat16", "{config}");
    assert_eq!(config["rope_parameters"]["rope_type"], "llama3");
    let check = r#"
import json, sys, torch, transformers
model, info = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
print(json.dumps({"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
    "dtype": str(model.dtype), "class": type(model).__name__}))
"#;
    let r = last_json_line(&run_python(&py, check, &[out.display().to_string()]));
    assert_eq!(
        (&r["missing"], &r["unexpected"]),
        (&serde_json::json!([]), &serde_json::json!([])),
        "{r}"
    );
    assert_eq!(
        (r["dtype"].as_str(), r["class"].as_str()),
        (Some("torch.bfloat16"), Some("LlamaForCausalLM"))
    );
}

/// The bundled SFT configs, shrunk: prompt/completion rows (padded, then packed), chat
/// rows with assistant-only loss whose template is saved with the tokenizer and used
/// again when the folder is fine-tuned, and the one-line refusals.
#[test]
fn prompt_completion_and_chat_configs_train() {
    let dir = tempfile::tempdir().unwrap();
    let short = |cfg: &str, out: &Path, extra: &[&str]| {
        let mut args: Vec<String> = [
            "train",
            repo().join(cfg).to_str().unwrap(),
            "--output_dir",
            out.to_str().unwrap(),
            "--hidden_size",
            "32",
            "--intermediate_size",
            "48",
            "--max_train_samples",
            "32",
            "--max_eval_samples",
            "8",
            "--max_steps",
            "2",
            "--save_steps",
            "2",
            "--disable_tqdm",
            "true",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        kiln(args)
    };
    let chat = dir.path().join("chat");
    short("data/configs/llama-chat.toml", &chat, &[]).expect_success();
    assert_eq!(
        std::fs::read_to_string(chat.join("chat_template.jinja")).unwrap(),
        std::fs::read_to_string(repo().join("data/chat/template.jinja")).unwrap()
    );
    assert!(
        read_json(&chat.join("tokenizer_config.json"))
            .get("chat_template")
            .is_none()
    );

    // The folder's own template renders its chat rows when it is fine-tuned.
    let tuned = dir.path().join("tuned");
    kiln([
        "train",
        "--model_name_or_path",
        chat.to_str().unwrap(),
        "--train_file",
        repo().join("data/chat/train.jsonl").to_str().unwrap(),
        "--assistant_only_loss",
        "true",
        "--max_train_samples",
        "16",
        "--max_steps",
        "1",
        "--output_dir",
        tuned.to_str().unwrap(),
        "--disable_tqdm",
        "true",
    ])
    .expect_success();
    assert!(tuned.join("chat_template.jinja").exists());

    for (name, extra) in [("sft", &[][..]), ("packed", &["--packing", "true"][..])] {
        short("data/configs/llama-sft.toml", &dir.path().join(name), extra).expect_success();
    }
    short(
        "data/configs/llama-sft.toml",
        &dir.path().join("bfd"),
        &["--packing", "true", "--packing_strategy", "bfd"],
    )
    .expect_code(1)
    .expect_error(&["packing_strategy", "bfd", "wrapped"]);
    short(
        "data/configs/llama-sft.toml",
        &dir.path().join("no-template"),
        &[
            "--train_file",
            repo().join("data/chat/train.jsonl").to_str().unwrap(),
        ],
    )
    .expect_code(1)
    .expect_error(&["chat_template", "chat_template_path"]);
}
