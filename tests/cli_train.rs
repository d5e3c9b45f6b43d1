//! `kiln train`, `kiln eval` and `kiln predict` end to end, against transformers, and
//! SIGKILL during training: every visible checkpoint verifies and the resumed run
//! finishes bit-identical to the uninterrupted one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    NO_EVAL, kiln, kiln_bin, last_json_line, repo, resume_args, run_python, tiny_bert_args,
    weights_of,
};
use kiln::checkpoint::scan::{list_checkpoints, verify_checkpoint};
use serde_json::Value;

#[test]
fn train_eval_predict_and_load_in_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let run = kiln(tiny_bert_args(&out, &[]));
    run.expect_success();
    assert!(
        run.stdout
            .contains("AutoModelForSequenceClassification.from_pretrained"),
        "{}",
        run.stdout
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer_state.json",
        "training_args.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let steps: Vec<u64> = list_checkpoints(&out)
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, [4, 8]);
    // Training again into the same folder is refused with what to do.
    kiln(tiny_bert_args(&out, &[]))
        .expect_code(1)
        .expect_error(&["resume_from_checkpoint"]);
    // Resuming the finished run from its last checkpoint and going further works.
    kiln(tiny_bert_args(
        &out,
        &["--resume_from_checkpoint", "last", "--max_steps", "10"],
    ))
    .expect_success();

    let val = repo().join("cli/bundled/sentiment/validation.jsonl");
    let e = kiln([
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--validation_file",
        val.to_str().unwrap(),
        "--max_eval_samples",
        "16",
    ]);
    e.expect_success();
    let metrics: Value = serde_json::from_str(e.stdout.trim()).unwrap();
    assert!(
        metrics["eval_accuracy"].is_number() && metrics["eval_loss"].is_number(),
        "{metrics}"
    );

    let texts = [
        "a truly wonderful film",
        "not good at all, boring",
        "Ünïcode — fine",
    ];
    let mut args = vec![
        "predict".to_string(),
        "--model".into(),
        out.display().to_string(),
        "--json".into(),
    ];
    for t in texts {
        args.extend(["--text".to_string(), t.to_string()]);
    }
    let p = kiln(&args);
    p.expect_success();
    let pred: Value = serde_json::from_str(p.stdout.trim()).unwrap();
    assert_eq!(pred["predictions"].as_array().unwrap().len(), 3);
    for label in pred["predictions"].as_array().unwrap() {
        assert!(
            ["negative", "positive"].contains(&label.as_str().unwrap()),
            "{pred}"
        );
    }

    let py = python_or_skip!();
    let script = r#"
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
out, texts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(out)
model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
model.eval()
ids = [tok(t)["input_ids"] for t in texts]
with torch.no_grad():
    logits = [model(input_ids=torch.tensor([i])).logits[0].tolist() for i in ids]
print(json.dumps({"ids": ids, "logits": logits, "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]), "id2label": model.config.id2label}))
"#;
    let r = last_json_line(&run_python(
        &py,
        script,
        &[
            out.display().to_string(),
            serde_json::to_string(&texts).unwrap(),
        ],
    ));
    assert_eq!(r["missing"], serde_json::json!([]));
    assert_eq!(r["unexpected"], serde_json::json!([]));
    assert_eq!(
        r["ids"], pred["input_ids"],
        "AutoTokenizer ids differ from kiln's"
    );
    assert_eq!(r["id2label"]["0"], "negative");
    for (a, b) in r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .zip(pred["logits"].as_array().unwrap())
    {
        for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
            assert!(
                (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4,
                "{r} vs {pred}"
            );
        }
    }
}

#[test]
fn gpt2_run_generates_and_bad_input_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gpt2");
    let cfg = repo().join("data/configs/gpt2-corpus.toml");
    let train = repo().join("data/corpus/train.txt");
    let val = repo().join("data/corpus/validation.txt");
    kiln([
        "train",
        cfg.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--train_file",
        train.to_str().unwrap(),
        "--validation_file",
        val.to_str().unwrap(),
        "--n_embd",
        "16",
        "--n_layer",
        "1",
        "--block_size",
        "32",
        "--vocab_size",
        "300",
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "8",
        "--max_steps",
        "3",
        "--save_steps",
        "3",
        "--disable_tqdm",
        "true",
    ])
    .expect_success();
    let p = kiln([
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "once upon a time",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    p.expect_success();
    let v: Value = serde_json::from_str(p.stdout.trim()).unwrap();
    assert_eq!(v["generated"].as_array().unwrap().len(), 1, "{v}");
    assert!(!out.join("model.safetensors").exists() || out.join("generation_config.json").exists());

    kiln(["train", "--nope", "1"])
        .expect_code(2)
        .expect_no_panic();
    kiln(["train", "/nonexistent/config.toml"])
        .expect_code(1)
        .expect_error(&["config.toml"]);
    kiln(["train", "--learning_rate", "fast"])
        .expect_code(2)
        .expect_no_panic();
    kiln(["predict", "--model", "/nonexistent", "--text", "x"])
        .expect_code(1)
        .expect_no_panic();
}

#[test]
fn sigkill_during_training_then_resume_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let extra = [
        &[
            "--max_steps",
            "48",
            "--save_steps",
            "2",
            "--save_total_limit",
            "3",
        ][..],
        &NO_EVAL[..],
    ]
    .concat();
    kiln(tiny_bert_args(&straight, &extra)).expect_success();

    let killed = dir.path().join("killed");
    let start = Instant::now();
    let mut kills = 0;
    let mut seed = 0x9e3779b97f4a7c15u64;
    loop {
        let mut child = Command::new(kiln_bin())
            .args(resume_args(&killed, &extra))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let wait = Duration::from_millis(150 + seed % 700);
        let deadline = Instant::now() + wait;
        let mut finished = None;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                finished = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        match finished {
            Some(status) => {
                assert!(status.success(), "a resumed run failed: {status}");
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
            }
        }
        // Every checkpoint that is visible under its final name is complete and reads back.
        if killed.exists() {
            for c in list_checkpoints(&killed).unwrap() {
                assert!(
                    c.is_complete(),
                    "{} visible but incomplete: {:?}",
                    c.path.display(),
                    c.completeness
                );
                verify_checkpoint(&c.path).unwrap();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "did not finish after {kills} kills"
        );
        // Enough kills: let the next run finish.
        if kills >= 6 {
            let status = Command::new(kiln_bin())
                .args(resume_args(&killed, &extra))
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success());
            break;
        }
    }
    println!("killed {kills} times");
    let (a, b) = (weights_of(&straight), weights_of(&killed));
    let diffs = kiln::formats::compare::compare(&a, &b, Default::default()).unwrap();
    assert!(diffs.is_empty(), "after {kills} kills: {diffs:?}");
}

#[test]
fn a_failed_save_stops_training_and_saves_the_model_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("checkpoint-4"),
        b"a file where a checkpoint must go",
    )
    .unwrap();
    let run = kiln(tiny_bert_args(&out, &["--overwrite_output_dir", "true"]));
    run.expect_code(1).expect_no_panic();
    // Training logs go to stderr too; the error is the last line.
    let err = run.stderr.lines().last().unwrap_or_default().to_string();
    assert!(err.starts_with("kiln: "), "{err}");
    assert!(err.contains("checkpoint-4"), "{err}");
    let saved = err
        .split("was saved to ")
        .nth(1)
        .expect("an emergency save")
        .trim_end_matches(')')
        .to_string();
    kiln(["verify", saved.as_str()]).expect_success();
    std::fs::remove_dir_all(&saved).unwrap();
}

#[test]
fn a_config_describing_an_impossible_model_is_one_line() {
    // A hostile or mistaken config.json: a BERT with 2^40 tokens of 768 floats (3 PiB),
    // beside a valid vocabulary.
    let tmp = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "vocab_size": 1u64 << 40,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "intermediate_size": 3072
    });
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    std::fs::write(
        tmp.path().join("vocab.txt"),
        "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n",
    )
    .unwrap();
    let start = Instant::now();
    kiln([
        "predict",
        "--model",
        tmp.path().to_str().unwrap(),
        "--text",
        "hello",
    ])
    .expect_error(&["parameters", "refusing to build it"]);
    // Refused from the config alone, before allocating or reading any weights.
    assert!(start.elapsed() < Duration::from_secs(30));
}
