//! The bundled configs and datasets (`cli/bundled/` holds the default run's, `data/` the
//! others): the configs parse into `DataArgs`
//! and `TrainingArguments`, the data reads and tokenizes as the configs say, and the
//! generator scripts reproduce the committed files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_data::tokenize::{TokenizerKind, TokenizerTrainer};
use kiln_data::{CollatedDataset, Collator, DataArgs, DataLoader, Label, Labels, RawData, Task};
use kiln_trainer::TrainingArguments;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Config {
    architecture: String,
    model: toml::Table,
    data: DataArgs,
    training: TrainingArguments,
}

/// A bundled config by its path from the repository root.
fn config(name: &str) -> Config {
    let text = std::fs::read_to_string(root().join(name)).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let mut model = table["model"].as_table().unwrap().clone();
    let architecture = model
        .remove("architecture")
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let mut data: DataArgs = table["data"].clone().try_into().unwrap();
    // The configs name files relative to the repository root.
    for file in [
        &mut data.train_file,
        &mut data.validation_file,
        &mut data.chat_template_path,
    ] {
        *file = file.as_ref().map(|f| root().join(f).display().to_string());
    }
    let training: TrainingArguments = table["training"].clone().try_into().unwrap();
    assert_eq!(table.len(), 3, "only [model], [data] and [training]");
    Config {
        architecture,
        model,
        data,
        training,
    }
}

#[test]
fn data_args_defaults_and_unknown_keys() {
    let args: DataArgs = toml::from_str("").unwrap();
    assert_eq!(args, DataArgs::default());
    assert_eq!(args.label_column, "label");
    assert_eq!(args.text_column, None);
    assert!(args.keep_linebreaks);
    assert_eq!(args.effective_max_length(Some(64)), 64);
    assert_eq!(args.effective_block_size(None), 1024);
    assert_eq!(args.effective_block_size(Some(128)), 128);
    let err = toml::from_str::<DataArgs>("max_seq_length = 3")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_seq_length"), "{err}");
    let zero: DataArgs = toml::from_str("block_size = 0").unwrap();
    assert!(zero.validate().is_err());
}

#[test]
fn bert_sentiment_config_and_data() {
    let c = config("cli/bundled/bert-sentiment.toml");
    assert_eq!(c.architecture, "BertForSequenceClassification");
    assert_eq!(
        Task::for_architecture(&c.architecture),
        Some(Task::SequenceClassification)
    );
    let kind = TokenizerKind::for_architecture(&c.architecture).unwrap();
    assert_eq!(kind, TokenizerKind::Bert);
    assert_eq!(
        c.training.metric_for_best_model.as_deref(),
        Some("accuracy")
    );
    assert!(c.training.load_best_model_at_end);
    let max_positions = c.model["max_position_embeddings"].as_integer().unwrap() as usize;

    let raw = RawData::read(&c.data, Task::SequenceClassification).unwrap();
    assert_eq!(raw.train.as_ref().unwrap().records().len(), 1600);
    assert_eq!(raw.validation.as_ref().unwrap().records().len(), 320);
    let tok = TokenizerTrainer::new(kind, c.data.vocab_size)
        .with_model_max_length(max_positions)
        .train(raw.train_texts())
        .unwrap();
    assert!(tok.vocab_size() <= c.data.vocab_size);
    let data = raw.tokenize(&tok, &c.data, None).unwrap();
    let labels = data.labels.clone().unwrap();
    assert_eq!(
        labels,
        Labels::Names(vec!["negative".into(), "positive".into()])
    );
    for split in [
        data.train.as_ref().unwrap(),
        data.validation.as_ref().unwrap(),
    ] {
        let positives = split
            .examples()
            .iter()
            .filter(|e| e.label == Label::Class(1))
            .count();
        assert_eq!(positives * 2, split.len(), "balanced classes");
        assert!(
            split
                .examples()
                .iter()
                .all(|e| e.input_ids.len() <= c.data.max_length.unwrap())
        );
        let unknown = tok.token_to_id("[UNK]").unwrap();
        let unk = split
            .examples()
            .iter()
            .flat_map(|e| &e.input_ids)
            .filter(|&&i| i == unknown)
            .count();
        assert!(unk * 100 < split.len(), "few unknown tokens: {unk}");
    }
    // One epoch of batches as the trainer would take them.
    let train = CollatedDataset::new(data.train.unwrap(), Collator::for_tokenizer(&tok));
    let loader = DataLoader::new(&train, c.training.per_device_train_batch_size)
        .unwrap()
        .with_shuffle(c.training.seed);
    let batches: Vec<_> = loader
        .epoch(0, &candle_core::Device::Cpu)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(batches.len(), 50);
    assert!(
        batches
            .iter()
            .all(|b| b.token_type_ids.is_some() && b.labels.is_some())
    );
}

#[test]
fn gpt2_corpus_config_and_data() {
    let c = config("data/configs/gpt2-corpus.toml");
    assert_eq!(c.architecture, "GPT2LMHeadModel");
    assert_eq!(
        Task::for_architecture(&c.architecture),
        Some(Task::CausalLm)
    );
    let kind = TokenizerKind::for_architecture(&c.architecture).unwrap();
    assert_eq!(kind, TokenizerKind::Gpt2);
    assert_eq!(c.training.metric_for_best_model.as_deref(), Some("loss"));
    let n_positions = c.model["n_positions"].as_integer().unwrap() as usize;

    let raw = RawData::read(&c.data, Task::CausalLm).unwrap();
    let bytes: usize = raw.train_texts().map(str::len).sum();
    assert!((100_000..=300_000).contains(&bytes), "{bytes} bytes");
    let tok = TokenizerTrainer::new(kind, c.data.vocab_size)
        .with_model_max_length(n_positions)
        .train(raw.train_texts())
        .unwrap();
    assert_eq!(
        tok.eos_id(),
        Some(c.model["eos_token_id"].as_integer().unwrap() as u32)
    );
    let data = raw.tokenize(&tok, &c.data, None).unwrap();
    assert_eq!(data.labels, None);
    let block = c.data.block_size.unwrap();
    let train = data.train.unwrap();
    assert!(train.len() > 300, "{} blocks", train.len());
    assert!(data.validation.unwrap().len() > 20);
    for e in train.examples() {
        assert_eq!(e.input_ids.len(), block);
        assert_eq!(
            e.label,
            Label::Tokens(e.input_ids.iter().map(|&i| i64::from(i)).collect())
        );
    }
}

/// The bundled Llama SFT configs' data, tokenized as the configs say: a trained
/// byte-level BPE, labels on the completion (prompt/completion) or on the assistant's
/// turns (chat, through the bundled template) only, each ending with EOS.
#[test]
fn llama_sft_and_chat_configs_and_data() {
    for (name, rows) in [
        ("data/configs/llama-sft.toml", 1200),
        ("data/configs/llama-chat.toml", 800),
    ] {
        let c = config(name);
        assert_eq!(c.architecture, "LlamaForCausalLM");
        let positions = c.model["max_position_embeddings"].as_integer().unwrap() as usize;
        let raw = RawData::read(&c.data, Task::CausalLm).unwrap();
        let mut tok = TokenizerTrainer::new(TokenizerKind::Gpt2, c.data.vocab_size)
            .with_model_max_length(positions)
            .train(raw.train_texts())
            .unwrap();
        if let Some(path) = &c.data.chat_template_path {
            assert!(raw.is_conversational());
            tok = tok.with_chat_template(std::fs::read_to_string(path).unwrap());
        }
        let data = raw.tokenize(&tok, &c.data, None).unwrap();
        let train = data.train.unwrap();
        assert_eq!(train.len(), rows, "{name}: every row fits max_length");
        assert!(data.validation.unwrap().len() * 10 >= rows);
        let eos = i64::from(tok.eos_id().unwrap());
        for e in train.examples() {
            assert!(e.input_ids.len() <= c.data.max_length.unwrap());
            let Label::Tokens(labels) = &e.label else {
                panic!("token labels")
            };
            let kept: Vec<u32> = labels
                .iter()
                .filter(|&&l| l >= 0)
                .map(|&l| l as u32)
                .collect();
            assert!(
                !kept.is_empty() && kept.len() < labels.len(),
                "{name}: masked"
            );
            assert_eq!(
                kept.last(),
                Some(&(eos as u32)),
                "{name}: ends with a learned EOS"
            );
            assert_eq!(labels[0], -100, "{name}: the prompt is not learned");
        }
        // What the loss sees is the completion (or the assistant's replies) and EOS.
        let first = &train.examples()[0];
        let Label::Tokens(labels) = &first.label else {
            panic!()
        };
        let learned: Vec<u32> = labels
            .iter()
            .filter(|&&l| l >= 0)
            .map(|&l| l as u32)
            .collect();
        let text = tok.decode(&learned, false).unwrap();
        let first_row = std::fs::read_to_string(c.data.train_file.as_ref().unwrap()).unwrap();
        let first_row: serde_json::Value =
            serde_json::from_str(first_row.lines().next().unwrap()).unwrap();
        let want = match first_row.get("completion") {
            Some(c) => format!("{}<|endoftext|>", c.as_str().unwrap()),
            None => first_row["messages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["role"] == "assistant")
                .map(|m| format!("{}<|endoftext|>", m["content"].as_str().unwrap()))
                .collect(),
        };
        assert_eq!(text, want, "{name}");
    }
}

#[test]
fn generator_scripts_reproduce_the_committed_files() {
    let python = std::env::var_os("KILN_PYTHON").unwrap_or_else(|| "python3".into());
    for script in [
        "cli/bundled/make_sentiment.py",
        "data/make_corpus.py",
        "data/make_sft.py",
    ] {
        let out = match Command::new(&python)
            .arg(root().join(script))
            .arg("--check")
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                println!("skipping: {}: {e}", python.to_string_lossy());
                return;
            }
        };
        assert!(
            out.status.success(),
            "{script} --check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
