//! Tokenizers kiln saves load in transformers with the same ids, and tokenizers
//! transformers saved load in kiln with the same ids (needs Python with transformers:
//! `KILN_PYTHON`, default `/root/.cache/kiln/venv/bin/python`; skipped without it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_data::tokenize::{Tokenizer, TokenizerKind, TokenizerTrainer};
use serde_json::Value;

const MAX_LENGTH: usize = 7;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tokenizer_interop.py")
}

fn run(python: &Path, args: &[&str], stdin: &str) -> Value {
    let mut child = Command::new(python)
        .arg(script())
        .args(args)
        .env("TOKENIZERS_PARALLELISM", "false")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    // The last line is the answer (transformers may print warnings before it).
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// Training texts: templated sentences with a varied vocabulary.
fn corpus() -> Vec<String> {
    let subjects = [
        "the film",
        "this movie",
        "my sister",
        "a critic",
        "the old actor",
        "our team",
    ];
    let verbs = [
        "loved",
        "hated",
        "enjoyed",
        "watched",
        "described",
        "remembered",
    ];
    let objects = [
        "the ending",
        "every scene",
        "the soundtrack",
        "its quiet humour",
        "the café in Paris",
        "the naïve hero",
    ];
    let tails = [
        "",
        " twice",
        " without a doubt",
        ", sadly",
        " at the festival",
        "!",
    ];
    let mut out = Vec::new();
    for (i, s) in subjects.iter().enumerate() {
        for (j, v) in verbs.iter().enumerate() {
            for (k, o) in objects.iter().enumerate() {
                let t = tails[(i + j + k) % tails.len()];
                out.push(format!("{s} {v} {o}{t}."));
            }
        }
    }
    out
}

fn probe_texts() -> Vec<String> {
    vec![
        "The film loved the ending.".into(),
        "A CRITIC Remembered Every Scene twice!".into(),
        "Café naïve — Ünïcödé façade; 東京 and 😀 emoji".into(),
        "   leading and trailing   spaces\tand\nnewlines  ".into(),
        "unseenword zzzqqq xylophone 12345 3.14".into(),
        "special tokens inline: [SEP] [MASK] <|endoftext|> here".into(),
        String::new(),
        "a long sentence that will certainly be truncated because it has many more words than \
         the maximum length allows"
            .into(),
    ]
}

fn kiln_ids(tok: &Tokenizer, texts: &[String], max_length: Option<usize>) -> Vec<Vec<u32>> {
    texts
        .iter()
        .map(|t| tok.encode(t, max_length).unwrap().input_ids)
        .collect()
}

fn json_ids(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn inputs() -> String {
    serde_json::json!({"train": corpus(), "probe": probe_texts()}).to_string()
}

/// Checks that transformers' view of a folder (`out`) matches kiln's tokenizer.
fn check_same_ids(out: &Value, tok: &Tokenizer, expect_class: &str) {
    let texts = probe_texts();
    assert_eq!(out["class"], expect_class, "{out}");
    let ids = json_ids(&out["ids"]);
    assert_eq!(kiln_ids(tok, &texts, None), ids, "untruncated ids differ");
    let truncated = json_ids(&out["truncated"]);
    assert_eq!(
        kiln_ids(tok, &texts, Some(MAX_LENGTH)),
        truncated,
        "truncated ids differ"
    );
    assert!(truncated.iter().all(|t| t.len() <= MAX_LENGTH));
    assert!(
        ids.last().unwrap().len() > MAX_LENGTH,
        "the long text must need truncation"
    );
    assert_eq!(out["pad_token_id"].as_u64().map(|v| v as u32), tok.pad_id());
    assert_eq!(out["eos_token_id"].as_u64().map(|v| v as u32), tok.eos_id());
    assert_eq!(
        out["model_max_length"].as_u64().map(|v| v as usize),
        tok.model_max_length()
    );
    assert_eq!(
        out["vocab_size"].as_u64().unwrap() as usize,
        tok.vocab_size()
    );
    if tok.returns_token_type_ids() {
        let types: Vec<Vec<u32>> = serde_json::from_value(out["token_type_ids"].clone()).unwrap();
        let ours: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| tok.encode(t, None).unwrap().token_type_ids)
            .collect();
        assert_eq!(ours, types);
    } else {
        assert!(
            out["token_type_ids"]
                .as_array()
                .unwrap()
                .iter()
                .all(Value::is_null)
        );
    }
    let decoded: Vec<String> = serde_json::from_value(out["decoded"].clone()).unwrap();
    for (text, py) in texts.iter().zip(&decoded) {
        let ours = tok
            .decode(&tok.encode(text, None).unwrap().input_ids, true)
            .unwrap();
        assert_eq!(&ours, py, "decode of {text:?}");
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn saved_by_kiln_loads_in_transformers() {
    let Some(python) = kiln_test_support::python_or_skip() else {
        return;
    };
    let bert = TokenizerTrainer::new(TokenizerKind::Bert, 300)
        .with_model_max_length(64)
        .train(corpus())
        .unwrap();
    let gpt2 = TokenizerTrainer::new(TokenizerKind::Gpt2, 400)
        .with_model_max_length(64)
        .train(corpus())
        .unwrap();
    let (bert_dir, gpt2_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    bert.save(bert_dir.path()).unwrap();
    gpt2.save(gpt2_dir.path()).unwrap();
    let out = run(
        &python,
        &[
            "encode",
            &MAX_LENGTH.to_string(),
            path(bert_dir.path()),
            path(gpt2_dir.path()),
        ],
        &inputs(),
    );
    check_same_ids(&out[0], &bert, "BertTokenizer");
    check_same_ids(&out[1], &gpt2, "GPT2Tokenizer");
    // kiln reads back what it wrote.
    for (dir, tok) in [(&bert_dir, &bert), (&gpt2_dir, &gpt2)] {
        let again = Tokenizer::from_dir(dir.path()).unwrap();
        let probe = probe_texts();
        assert_eq!(
            kiln_ids(&again, &probe, Some(MAX_LENGTH)),
            kiln_ids(tok, &probe, Some(MAX_LENGTH))
        );
        assert_eq!(again.files().unwrap(), tok.files().unwrap());
    }
}

#[test]
fn saved_by_transformers_loads_in_kiln() {
    let Some(python) = kiln_test_support::python_or_skip() else {
        return;
    };
    let (bert_dir, gpt2_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let out = run(
        &python,
        &[
            "make",
            &MAX_LENGTH.to_string(),
            &format!("{}:bert:300", path(bert_dir.path())),
            &format!("{}:gpt2:400", path(gpt2_dir.path())),
        ],
        &inputs(),
    );
    let bert = Tokenizer::from_dir(bert_dir.path()).unwrap();
    let gpt2 = Tokenizer::from_dir(gpt2_dir.path()).unwrap();
    check_same_ids(&out[0], &bert, "BertTokenizer");
    check_same_ids(&out[1], &gpt2, "GPT2Tokenizer");
    // Saved again by kiln, transformers still agrees.
    let (bert_again, gpt2_again) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    bert.save(bert_again.path()).unwrap();
    gpt2.save(gpt2_again.path()).unwrap();
    let out = run(
        &python,
        &[
            "encode",
            &MAX_LENGTH.to_string(),
            path(bert_again.path()),
            path(gpt2_again.path()),
        ],
        &inputs(),
    );
    check_same_ids(
        &out[0],
        &Tokenizer::from_dir(bert_again.path()).unwrap(),
        "BertTokenizer",
    );
    check_same_ids(
        &out[1],
        &Tokenizer::from_dir(gpt2_again.path()).unwrap(),
        "GPT2Tokenizer",
    );
}
