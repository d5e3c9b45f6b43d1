//! Training, encoding and saving tokenizers, without Python.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_data::Error;
use kiln_data::tokenize::{Tokenizer, TokenizerKind, TokenizerTrainer};

fn corpus() -> Vec<String> {
    let words = [
        "good", "bad", "movie", "plot", "actors", "not", "really", "boring", "great",
    ];
    (0..200)
        .map(|i| {
            let a = words[i % words.len()];
            let b = words[(i * 7 + 3) % words.len()];
            let c = words[(i * 5 + 1) % words.len()];
            format!("The {a} {b} was {c} number {i}.")
        })
        .collect()
}

fn names(tok: &Tokenizer) -> Vec<String> {
    tok.files().unwrap().into_iter().map(|(n, _)| n).collect()
}

#[test]
fn bert_wordpiece_layout() {
    let tok = TokenizerTrainer::new(TokenizerKind::Bert, 120)
        .train(corpus())
        .unwrap();
    for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .enumerate()
    {
        assert_eq!(tok.token_to_id(t), Some(i as u32));
    }
    assert!(tok.vocab_size() <= 120);
    assert_eq!(tok.pad_id(), Some(0));
    assert_eq!(tok.num_special_tokens(), 2);
    assert!(tok.returns_token_type_ids());
    assert_eq!(tok.model_max_length(), Some(512));
    let e = tok.encode("The GOOD movie", None).unwrap();
    assert_eq!(e.input_ids.first(), Some(&2));
    assert_eq!(e.input_ids.last(), Some(&3));
    assert_eq!(e.token_type_ids, vec![0; e.input_ids.len()]);
    // Lowercased: same ids whatever the case.
    assert_eq!(e, tok.encode("the good MOVIE", None).unwrap());
    assert_eq!(
        names(&tok),
        [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt"
        ]
    );
    let files = tok.files().unwrap();
    let vocab = String::from_utf8(files[3].1.clone()).unwrap();
    assert_eq!(vocab.lines().count(), tok.vocab_size());
    assert!(vocab.starts_with("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n"));
    let config: serde_json::Value = serde_json::from_slice(&files[1].1).unwrap();
    assert_eq!(config["tokenizer_class"], "BertTokenizerFast");
    assert_eq!(config["do_lower_case"], true);
    assert_eq!(config["added_tokens_decoder"]["4"]["content"], "[MASK]");
    let special: serde_json::Value = serde_json::from_slice(&files[2].1).unwrap();
    assert_eq!(
        special,
        serde_json::json!({"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]",
                           "sep_token": "[SEP]", "unk_token": "[UNK]"})
    );
    // Sorted keys, indent 2, trailing newline: as transformers writes it.
    let text = String::from_utf8(files[1].1.clone()).unwrap();
    assert!(
        text.starts_with("{\n  \"added_tokens_decoder\": {\n    \"0\": {\n"),
        "{text}"
    );
    assert!(text.ends_with("}\n"));
}

#[test]
fn gpt2_byte_level_layout() {
    let tok = TokenizerTrainer::new(TokenizerKind::Gpt2, 300)
        .with_model_max_length(128)
        .train(corpus())
        .unwrap();
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.pad_id(), None);
    assert_eq!(tok.eos_id(), Some(0));
    assert_eq!(tok.padding_id(), 0);
    assert_eq!(tok.num_special_tokens(), 0);
    assert!(!tok.returns_token_type_ids());
    assert_eq!(tok.model_max_length(), Some(128));
    // Byte-level: any text encodes without unknown tokens and decodes back exactly.
    let text = "Ünïcödé 東京 😀 tabs\tand  spaces";
    let ids = tok.encode(text, None).unwrap().input_ids;
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(
        names(&tok),
        [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.json",
            "merges.txt"
        ]
    );
    let files = tok.files().unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&files[3].1).unwrap();
    assert_eq!(vocab.len(), tok.vocab_size());
    let merges = String::from_utf8(files[4].1.clone()).unwrap();
    assert!(merges.starts_with("#version: 0.2\n"));
    assert_eq!(merges.lines().count() - 1, tok.vocab_size() - 257);
    assert!(merges.lines().skip(1).all(|l| l.split(' ').count() == 2));
}

#[test]
fn training_is_deterministic() {
    // tokenizers' own trainer numbers WordPiece's `##` symbols in a random hash order
    // (huggingface/tokenizers#1794); kiln's training must not.
    let text = |tok: &Tokenizer| {
        let files = tok.files().unwrap();
        files
            .into_iter()
            .map(|(n, b)| n + &String::from_utf8(b).unwrap())
            .collect::<String>()
    };
    for kind in [TokenizerKind::Bert, TokenizerKind::Gpt2] {
        let first = text(&TokenizerTrainer::new(kind, 300).train(corpus()).unwrap());
        for _ in 0..4 {
            let again = text(&TokenizerTrainer::new(kind, 300).train(corpus()).unwrap());
            assert!(first == again, "{kind:?}: two trainings differ");
        }
    }
}

#[test]
fn truncation_counts_special_tokens() {
    let tok = TokenizerTrainer::new(TokenizerKind::Bert, 200)
        .train(corpus())
        .unwrap();
    let text = "the good movie was not really boring at all";
    let full = tok.encode(text, None).unwrap().input_ids;
    assert!(full.len() > 6);
    let cut = tok.encode(text, Some(6)).unwrap().input_ids;
    assert_eq!(cut.len(), 6);
    assert_eq!(cut[..5], full[..5]);
    assert_eq!(cut[5], 3, "[SEP] stays last");
    // A limit above the length changes nothing.
    assert_eq!(tok.encode(text, Some(1000)).unwrap().input_ids, full);
    // No room for text: a clear error, not a panic.
    assert!(matches!(tok.encode(text, Some(2)), Err(Error::Config(_))));
    let batch = tok.encode_batch(&[text, "good"], Some(6)).unwrap();
    assert_eq!(batch[0].input_ids, cut);
    assert_eq!(batch[1], tok.encode("good", Some(6)).unwrap());
}

#[test]
fn vocab_size_too_small_is_an_error() {
    assert!(matches!(
        TokenizerTrainer::new(TokenizerKind::Gpt2, 100).train(corpus()),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        TokenizerTrainer::new(TokenizerKind::Bert, 3).train(corpus()),
        Err(Error::Config(_))
    ));
}

#[test]
fn loading_errors_name_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no tokenizer.json, vocab.txt"), "{err}");
    std::fs::write(dir.path().join("tokenizer.json"), b"{not json").unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains(dir.path().to_str().unwrap()), "{err}");
    let tok = TokenizerTrainer::new(TokenizerKind::Bert, 100)
        .train(corpus())
        .unwrap();
    tok.save(dir.path()).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), b"[1]").unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json is not a JSON object"),
        "{err}"
    );
}

#[test]
fn special_tokens_map_and_huge_max_length() {
    // A folder with special tokens only in special_tokens_map.json (as AddedToken
    // dicts) and transformers' "very large" model_max_length.
    let dir = tempfile::tempdir().unwrap();
    let tok = TokenizerTrainer::new(TokenizerKind::Bert, 100)
        .train(corpus())
        .unwrap();
    tok.save(dir.path()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        br#"{"model_max_length": 1000000000000000019884624838656, "tokenizer_class": "BertTokenizer"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        br#"{"pad_token": {"content": "[PAD]", "lstrip": false}, "sep_token": "[SEP]"}"#,
    )
    .unwrap();
    let loaded = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(loaded.model_max_length(), None);
    assert_eq!(loaded.pad_id(), Some(0));
    assert_eq!(loaded.special_token_id("sep_token"), Some(3));
    assert_eq!(loaded.special_token("mask_token"), None);
    assert_eq!(
        loaded.with_model_max_length(32).model_max_length(),
        Some(32)
    );
}

#[test]
fn chat_templates_are_saved_and_read_as_transformers_5_does() {
    let dir = tempfile::tempdir().unwrap();
    let template = "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}";
    let tok = TokenizerTrainer::new(TokenizerKind::Gpt2, 300)
        .train(corpus())
        .unwrap()
        .with_chat_template(template);
    tok.save(dir.path()).unwrap();
    // The template gets its own file and leaves tokenizer_config.json.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("chat_template.jinja")).unwrap(),
        template
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert!(config.get("chat_template").is_none(), "{config}");
    let loaded = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(loaded.chat_template(), Some(template));
    let special = loaded.special_tokens_map();
    assert_eq!(special["eos_token"], "<|endoftext|>");

    // transformers 4's layout: named templates in tokenizer_config.json, "default" used;
    // a chat_template.jinja beside them wins.
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    let mut config = config;
    config["chat_template"] = serde_json::json!([
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "plain"}
    ]);
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    assert_eq!(
        Tokenizer::from_dir(dir.path()).unwrap().chat_template(),
        Some("plain")
    );
    std::fs::write(dir.path().join("chat_template.jinja"), "file").unwrap();
    assert_eq!(
        Tokenizer::from_dir(dir.path()).unwrap().chat_template(),
        Some("file")
    );
}
