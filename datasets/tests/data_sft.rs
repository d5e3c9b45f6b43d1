//! Prompt/completion and chat rows without Python: which rows are read as what, the
//! labels TRL's rules give, packing, and the one-line errors (with `file:line`) for rows
//! without their columns, templates that fail, rows too long with truncation off, and
//! settings kiln refuses. `sft_interop.rs` checks the same rules against TRL itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kiln_data::tokenize::{Tokenizer, TokenizerKind, TokenizerTrainer};
use kiln_data::{DataArgs, Label, RawData, Rows, SftRow, Task};
use serde_json::{Value, json};

const TEMPLATE: &str = "{% for m in messages %}{% if m.role == 'assistant' %}A: \
    {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}\n{% else %}\
    {% if m.role == 'system' %}{{ raise_exception('no system messages') }}{% endif %}\
    U: {{ m.content }}\n{% endif %}{% endfor %}";

fn tokenizer() -> Tokenizer {
    let texts = ["U: A: add two and three five seven Reverse: apple river answer"; 20];
    TokenizerTrainer::new(TokenizerKind::Gpt2, 300)
        .train(texts.iter().copied())
        .unwrap()
}

fn write(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn args(file: &Path, extra: Value) -> DataArgs {
    let mut data = json!({"train_file": file.to_str().unwrap()});
    for (k, v) in extra.as_object().unwrap() {
        data[k] = v.clone();
    }
    serde_json::from_value(data).unwrap()
}

fn prepare(tok: &Tokenizer, args: &DataArgs) -> kiln_data::Result<Vec<(Vec<u32>, Vec<i64>)>> {
    let raw = RawData::read(args, Task::CausalLm)?;
    let train = raw.tokenize(tok, args, None)?.train.unwrap();
    Ok(train
        .examples()
        .iter()
        .map(|e| match &e.label {
            Label::Tokens(l) => (e.input_ids.clone(), l.clone()),
            other => panic!("{other:?}"),
        })
        .collect())
}

fn error(tok: &Tokenizer, args: &DataArgs) -> String {
    let e = prepare(tok, args).unwrap_err().to_string();
    assert!(!e.contains('\n'), "one line: {e}");
    e
}

#[test]
fn rows_are_told_apart_by_their_first_row() {
    let dir = tempfile::tempdir().unwrap();
    let pc = write(
        dir.path(),
        "pc.jsonl",
        &[json!({"prompt": "a", "completion": "b"})],
    );
    let chat = write(
        dir.path(),
        "chat.jsonl",
        &[json!({"prompt": [{"role": "user", "content": "a"}],
                 "completion": [{"role": "assistant", "content": "b"}]})],
    );
    let share = write(
        dir.path(),
        "share.jsonl",
        &[json!({"conversations": [{"from": "user", "value": "a"}]})],
    );
    let text = write(dir.path(), "text.jsonl", &[json!({"text": "a b c"})]);
    let kind = |p: &Path, column: Option<&str>| {
        let mut a = args(p, json!({}));
        a.text_column = column.map(str::to_string);
        let raw = RawData::read(&a, Task::CausalLm).unwrap();
        raw.train.unwrap().rows
    };
    assert!(
        matches!(&kind(&pc, None), Rows::Sft(r) if matches!(r[0].row, SftRow::PromptCompletion { .. }))
    );
    assert!(
        matches!(&kind(&chat, None), Rows::Sft(r) if matches!(r[0].row, SftRow::ChatPromptCompletion { .. }))
    );
    match &kind(&share, None) {
        Rows::Sft(r) => assert_eq!(
            r[0].row,
            SftRow::Messages(vec![json!({"role": "user", "content": "a"})])
        ),
        other => panic!("{other:?}"),
    }
    assert!(matches!(kind(&text, None), Rows::Records(_)));
    // A named text column reads the prompt as plain text, for run_clm's blocks.
    assert!(matches!(kind(&pc, Some("prompt")), Rows::Records(_)));
    // Classification reads prompt/completion files as texts (and wants a text column).
    let e = RawData::read(&args(&pc, json!({})), Task::SequenceClassification).unwrap_err();
    assert!(e.to_string().contains("text"), "{e}");
}

#[test]
fn prompt_labels_are_masked_and_eos_is_appended() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let eos = tok.eos_id().unwrap();
    let file = write(
        dir.path(),
        "pc.jsonl",
        &[
            json!({"prompt": "add two and three", "completion": " five"}),
            json!({"prompt": "seven", "completion": " answer<|endoftext|>"}),
        ],
    );
    let rows = prepare(&tok, &args(&file, json!({}))).unwrap();
    let prompt = tok.encode_plain("add two and three").unwrap().0;
    let (ids, labels) = &rows[0];
    assert_eq!(&ids[..prompt.len()], &prompt[..]);
    assert_eq!(*ids.last().unwrap(), eos);
    assert!(labels[..prompt.len()].iter().all(|&l| l == -100));
    assert_eq!(
        &labels[prompt.len()..],
        &ids[prompt.len()..]
            .iter()
            .map(|&i| i64::from(i))
            .collect::<Vec<_>>()[..]
    );
    // A completion that ends with EOS gets no second one.
    assert_eq!(rows[1].0.iter().filter(|&&i| i == eos).count(), 1);

    // completion_only_loss = false: the prompt is learned too.
    let all = prepare(&tok, &args(&file, json!({"completion_only_loss": false}))).unwrap();
    assert!(
        all.iter()
            .all(|(i, l)| l.iter().zip(i).all(|(&l, &i)| l == i64::from(i)))
    );

    // Packing joins the rows and cuts them into max_length blocks, the last one short.
    let total: usize = rows.iter().map(|r| r.0.len()).sum();
    let packed = prepare(
        &tok,
        &args(&file, json!({"packing": true, "max_length": 3})),
    )
    .unwrap();
    assert_eq!(packed.len(), total.div_ceil(3));
    assert!(
        packed
            .iter()
            .all(|(i, l)| i.len() <= 3 && l.len() == i.len())
    );
    let joined: Vec<u32> = packed.iter().flat_map(|r| r.0.clone()).collect();
    assert_eq!(
        joined,
        rows.iter().flat_map(|r| r.0.clone()).collect::<Vec<_>>()
    );
}

#[test]
fn assistant_only_loss_learns_the_generation_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer().with_chat_template(TEMPLATE);
    let file = write(
        dir.path(),
        "chat.jsonl",
        &[json!({"messages": [
            {"role": "user", "content": "add two and three"},
            {"role": "assistant", "content": "five"},
            {"role": "user", "content": "Reverse: apple river"},
            {"role": "assistant", "content": "river apple"}]})],
    );
    let rows = prepare(&tok, &args(&file, json!({"assistant_only_loss": true}))).unwrap();
    let (_, labels) = &rows[0];
    let learned: Vec<u32> = labels
        .iter()
        .filter(|&&l| l >= 0)
        .map(|&l| l as u32)
        .collect();
    // A token that straddles a block's start (" five": the space is the template's) is
    // learned, as transformers marks every token overlapping a generation block.
    assert_eq!(
        tok.decode(&learned, false).unwrap(),
        " five<|endoftext|> river apple<|endoftext|>"
    );
    // Without it, every token is learned.
    let all = prepare(&tok, &args(&file, json!({}))).unwrap();
    assert!(all[0].1.iter().all(|&l| l >= 0));
    // A template without generation blocks cannot mark the assistant's turns.
    let plain =
        tokenizer().with_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}");
    let e = error(&plain, &args(&file, json!({"assistant_only_loss": true})));
    assert!(e.contains("{% generation %}"), "{e}");
}

#[test]
fn bad_rows_and_settings_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer().with_chat_template(TEMPLATE);
    let cases: Vec<(&str, Vec<Value>, Value, Vec<&str>)> = vec![
        (
            "no_completion.jsonl",
            vec![
                json!({"prompt": "a", "completion": "b"}),
                json!({"prompt": "a"}),
            ],
            json!({}),
            vec!["no_completion.jsonl:2", "missing column \"completion\""],
        ),
        (
            "mixed.jsonl",
            vec![
                json!({"prompt": "a", "completion": "b"}),
                json!({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}),
            ],
            json!({}),
            vec!["mixed.jsonl:2", "\"completion\" must be a string"],
        ),
        (
            "no_role.jsonl",
            vec![json!({"messages": [{"content": "hi"}]})],
            json!({}),
            vec!["no_role.jsonl:1", "messages[0]", "role"],
        ),
        (
            "not_list.jsonl",
            vec![json!({"messages": "hi"})],
            json!({}),
            vec!["not_list.jsonl:1", "list of messages"],
        ),
        (
            "raises.jsonl",
            vec![
                json!({"messages": [{"role": "user", "content": "a"}]}),
                json!({"messages": [{"role": "system", "content": "s"}]}),
            ],
            json!({}),
            vec!["raises.jsonl:2", "chat template", "no system messages"],
        ),
        (
            "empty.jsonl",
            vec![json!({"messages": []})],
            json!({}),
            vec!["empty.jsonl:1", "no messages"],
        ),
        (
            "long.jsonl",
            vec![
                json!({"prompt": "a", "completion": "b"}),
                json!({"prompt": "add two and three ".repeat(20), "completion": " five"}),
            ],
            json!({"truncation": false, "max_length": 16}),
            vec![
                "long.jsonl:2",
                "longer than max_length 16",
                "truncation is off",
            ],
        ),
        (
            "bfd.jsonl",
            vec![json!({"prompt": "a", "completion": "b"})],
            json!({"packing": true, "packing_strategy": "bfd"}),
            vec!["packing_strategy", "bfd", "wrapped"],
        ),
        (
            "mode.jsonl",
            vec![json!({"prompt": "a", "completion": "b"})],
            json!({"truncation_mode": "middle"}),
            vec!["truncation_mode", "keep_start"],
        ),
    ];
    for (name, rows, extra, words) in cases {
        let file = write(dir.path(), name, &rows);
        let e = error(&tok, &args(&file, extra));
        for w in words {
            assert!(e.contains(w), "{name}: {e:?} lacks {w:?}");
        }
    }
    // Chat rows and a tokenizer without a template: say how to give one.
    let file = write(
        dir.path(),
        "chat.jsonl",
        &[json!({"messages": [{"role": "user", "content": "a"}]})],
    );
    let e = error(&tokenizer(), &args(&file, json!({})));
    assert!(e.contains("chat_template_path"), "{e}");
}
