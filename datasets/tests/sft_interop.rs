//! Prompt/completion and chat rows give the input ids and labels that TRL's
//! `SFTTrainer` prepares, and chat templates render the text transformers'
//! `apply_chat_template` renders — for tokenizers transformers saved (chat template in
//! `chat_template.jinja`) and one kiln saved (loaded by transformers). Needs Python with
//! transformers and trl (`KILN_PYTHON`, default `~/.cache/kiln/venv`); skipped without.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kiln_data::chat::ChatTemplate;
use kiln_data::tokenize::{Tokenizer, TokenizerKind, TokenizerTrainer};
use kiln_data::{DataArgs, Label, RawData, Task};
use serde_json::{Value, json};

/// ChatML as Qwen writes it: a default system turn, tools as JSON, the assistant's text
/// in `{% generation %}`.
const CHATML: &str = r#"{%- if tools %}
{{- '<|im_start|>system\n# Tools\n' }}
{%- for tool in tools %}{{- tool | tojson }}{{- '\n' }}{%- endfor %}
{{- '<|im_end|>\n' }}
{%- endif %}
{%- if messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\n' }}
{%- if message['role'] == 'assistant' %}
{% generation %}{{- message['content'] | trim + '<|im_end|>' }}{% endgeneration %}
{%- else %}
{{- message['content'].strip() + '<|im_end|>' }}
{%- endif %}
{{- '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}"#;

/// Llama 3's shape: BOS from the template, `set`, `loop.index0`, `trim`; no generation
/// marks.
const LLAMA3: &str = r#"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|im_start|>' + message['role'] + '<|im_end|>

'+ message['content'] | trim + '</s>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>

' }}{% endif %}"#;

/// Mistral's shape: alternating roles enforced with `raise_exception`.
const MISTRAL: &str = r#"{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"#;

fn kiln_template() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/chat/template.jinja"),
    )
    .unwrap()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn user(c: &str) -> Value {
    json!({"role": "user", "content": c})
}

fn assistant(c: &str) -> Value {
    json!({"role": "assistant", "content": c})
}

fn system(c: &str) -> Value {
    json!({"role": "system", "content": c})
}

/// The data files, by name.
fn write_data(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let long = "word ".repeat(40);
    let tools = json!([{"type": "function", "function": {"name": "add", "description":
        "Adds two numbers <exactly>.", "parameters": {"type": "object", "properties":
        {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}]);
    let files: Vec<(&str, Vec<Value>)> = vec![
        (
            "pc_text",
            vec![
                json!({"prompt": "Reverse: apple river\nAnswer:", "completion": " river apple"}),
                json!({"prompt": "The capital of France is", "completion": " Paris.</s>"}),
                json!({"prompt": "Café naïve — 東京", "completion": " 😀 emoji and more words, long enough to be cut at twenty four tokens"}),
                json!({"prompt": "", "completion": "an empty prompt"}),
                json!({"prompt": long, "completion": " x"}),
                json!({"prompt": "Sort: 3 1 2\nAnswer:", "completion": " 1 2 3"}),
            ],
        ),
        (
            "pc_chat",
            vec![
                json!({"prompt": [user("Reverse: apple river")], "completion": [assistant("river apple")]}),
                json!({"prompt": [system("Reply briefly."), user("  Add: 2 + 3  ")], "completion": [assistant(" 5 ")]}),
                json!({"prompt": [user("hi"), assistant("hello"), user("Sort: 3 1 2")], "completion": [assistant("1 2 3")]}),
            ],
        ),
        (
            "messages",
            vec![
                // `datasets.Dataset.from_list` takes its columns from the first row.
                json!({"messages": [user("Reverse: apple river"), assistant("river apple")], "tools": null}),
                json!({"messages": [system("Reply briefly."), user("Add: 2 + 3"), assistant("5"), user("Count the words: a b c"), assistant("3")]}),
                json!({"messages": [user("Café — 東京 😀?"), assistant("Oui, 東京.")], "tools": tools.to_string()}),
                json!({"messages": [user(&long), assistant("a long answer that goes on and on")]}),
            ],
        ),
        (
            "messages_alt",
            vec![
                json!({"messages": [user("Reverse: apple river"), assistant("river apple")]}),
                json!({"messages": [user("Add: 2 + 3"), assistant("5"), user("Sort: 3 1 2"), assistant("1 2 3")]}),
            ],
        ),
        (
            "sharegpt",
            vec![
                json!({"conversations": [{"from": "user", "value": "Add: 2 + 3"}, {"from": "assistant", "value": "5"}]}),
                json!({"conversations": [{"from": "system", "value": "Be terse."}, {"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}),
            ],
        ),
    ];
    files
        .into_iter()
        .map(|(name, rows)| {
            let path = dir.join(format!("{name}.jsonl"));
            write_jsonl(&path, &rows);
            (name, path)
        })
        .collect()
}

fn texts() -> Vec<String> {
    let mut t = Vec::new();
    for i in 0..200 {
        t.push(format!(
            "Reverse: apple river {i} Answer: river apple. Add: {i} + 3 = {}. Sort: 3 1 2 Answer: \
             1 2 3 Count the words hello You are a helpful assistant system user assistant \
             Reply briefly Café naïve 東京 😀 emoji Paris capital France word",
            i + 3
        ));
    }
    t
}

/// kiln's examples for `file` under `sft` (TRL's SFTConfig keys, as `[data]` keys).
fn kiln_prepared(tok: &Tokenizer, file: &Path, sft: &Value) -> Vec<(Vec<u32>, Vec<i64>)> {
    let mut data = json!({"train_file": file.to_str().unwrap()});
    for (k, v) in sft.as_object().unwrap() {
        data[k] = v.clone();
    }
    let args: DataArgs = serde_json::from_value(data).unwrap();
    let raw = RawData::read(&args, Task::CausalLm).unwrap();
    let train = raw.tokenize(tok, &args, None).unwrap().train.unwrap();
    train
        .examples()
        .iter()
        .map(|e| {
            let Label::Tokens(labels) = &e.label else {
                panic!("token labels")
            };
            (e.input_ids.clone(), labels.clone())
        })
        .collect()
}

fn trl_prepared(v: &Value) -> Vec<(Vec<u32>, Vec<i64>)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ids = r["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let labels = r["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            (ids, labels)
        })
        .collect()
}

#[test]
fn sft_rows_and_chat_templates_match_trl_and_transformers() {
    if kiln_test_support::python_or_skip().is_none() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let files = write_data(work.path());
    let file = |name: &str| files.iter().find(|(n, _)| *n == name).unwrap().1.clone();

    // kiln's own tokenizer, saved by kiln with its chat template, for transformers to load.
    let kiln_dir = work.path().join("tok-kiln");
    TokenizerTrainer::new(TokenizerKind::Gpt2, 400)
        .train(texts().iter().map(String::as_str))
        .unwrap()
        .with_chat_template(kiln_template())
        .save(&kiln_dir)
        .unwrap();
    assert!(kiln_dir.join("chat_template.jinja").exists());

    let tokenizers = json!([
        {"name": "chatml", "template": CHATML, "bos_post": false, "eos": "<|im_end|>"},
        {"name": "llama3", "template": LLAMA3, "bos_post": true, "eos": "</s>"},
        {"name": "mistral", "template": MISTRAL, "bos_post": true, "eos": "</s>"},
        {"name": "kiln", "dir": kiln_dir.to_str().unwrap()},
    ]);
    let jobs: Vec<(&str, &str, Value)> = vec![
        ("llama3", "pc_text", json!({"max_length": 24})),
        (
            "llama3",
            "pc_text",
            json!({"max_length": 16, "packing": true, "packing_strategy": "wrapped",
                   "completion_only_loss": false}),
        ),
        ("chatml", "pc_text", json!({"max_length": 1024})),
        (
            "chatml",
            "pc_chat",
            json!({"max_length": 64, "assistant_only_loss": true}),
        ),
        (
            "chatml",
            "messages",
            json!({"max_length": 256, "assistant_only_loss": true}),
        ),
        (
            "llama3",
            "messages",
            json!({"max_length": 40, "truncation_mode": "keep_end"}),
        ),
        (
            "mistral",
            "messages_alt",
            json!({"max_length": 128, "assistant_only_loss": true}),
        ),
        ("chatml", "sharegpt", json!({"max_length": 128})),
        (
            "kiln",
            "messages",
            json!({"max_length": 128, "assistant_only_loss": true}),
        ),
    ];
    let renders = [
        ("chatml", "messages"),
        ("chatml", "pc_chat"),
        ("llama3", "messages"),
        ("mistral", "messages_alt"),
        ("kiln", "messages"),
    ];
    let spec = json!({
        "work": work.path().to_str().unwrap(),
        "tokenizers": tokenizers,
        "texts": texts(),
        "jobs": jobs.iter().map(|(t, f, sft)| json!({"tokenizer": t, "file": file(f), "sft": sft})).collect::<Vec<_>>(),
        "renders": renders.iter().map(|(t, f)| json!({"tokenizer": t, "file": file(f)})).collect::<Vec<_>>(),
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_sft.py");
    let Some(results) = kiln_test_support::run_checker(&script, &[spec], work.path()) else {
        return;
    };
    let result = &results[0];
    let load = |name: &str| Tokenizer::from_dir(result["dirs"][name].as_str().unwrap()).unwrap();

    for ((tok, f, sft), theirs) in jobs.iter().zip(result["prepared"].as_array().unwrap()) {
        let ours = kiln_prepared(&load(tok), &file(f), sft);
        let theirs = trl_prepared(theirs);
        assert_eq!(
            ours.len(),
            theirs.len(),
            "{tok} {f} {sft}: number of examples"
        );
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(a.0, b.0, "{tok} {f} {sft}: input_ids of example {i}");
            assert_eq!(a.1, b.1, "{tok} {f} {sft}: labels of example {i}");
        }
        // Prompts are masked under completion-only loss, everything but the assistant's
        // text under assistant-only loss; else nothing is.
        let masked = (f.starts_with("pc_") && sft["completion_only_loss"] != json!(false))
            || sft["assistant_only_loss"] == json!(true);
        assert_eq!(
            ours.iter().any(|(_, l)| l.contains(&-100)),
            masked,
            "{tok} {f} {sft}: masked labels"
        );
    }

    for ((tok, f), theirs) in renders.iter().zip(result["renders"].as_array().unwrap()) {
        let tokenizer = load(tok);
        let template = ChatTemplate::new(tokenizer.chat_template().unwrap()).unwrap();
        let special = tokenizer.special_tokens_map();
        let rows = std::fs::read_to_string(file(f)).unwrap();
        for (row, want) in rows.lines().zip(theirs.as_array().unwrap()) {
            let row: Value = serde_json::from_str(row).unwrap();
            let messages: Vec<Value> = match row.get("messages") {
                Some(m) => m.as_array().unwrap().clone(),
                None => [&row["prompt"], &row["completion"]]
                    .iter()
                    .flat_map(|v| v.as_array().unwrap().clone())
                    .collect(),
            };
            let tools: Option<Value> = row["tools"]
                .as_str()
                .map(|t| serde_json::from_str(t).unwrap());
            for (gen_prompt, key) in [(false, "text"), (true, "text_gen")] {
                let ours = template
                    .render(&messages, tools.as_ref(), gen_prompt, &special)
                    .unwrap();
                assert_eq!(ours.text, want[key].as_str().unwrap(), "{tok} {f} {key}");
            }
        }
    }

    // A row the template refuses: one line naming the file and line, and the reason.
    let bad = work.path().join("bad.jsonl");
    write_jsonl(
        &bad,
        &[
            json!({"messages": [user("a"), assistant("b")]}),
            json!({"messages": [system("s"), user("a"), assistant("b")]}),
        ],
    );
    let args = DataArgs {
        train_file: Some(bad.to_str().unwrap().into()),
        ..DataArgs::default()
    };
    let e = RawData::read(&args, Task::CausalLm)
        .unwrap()
        .tokenize(&load("mistral"), &args, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.jsonl:2") && e.contains("Conversation roles must alternate"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
}
