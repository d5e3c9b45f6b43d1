//! Block grouping, the per-epoch shuffle, the resumable loader and the padding collator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use candle_core::{DType, Device};
use kiln_data::tokenize::{TokenizerKind, TokenizerTrainer};
use kiln_data::{
    CollatedDataset, Collator, DataLoader, Dataset, Example, IGNORE_INDEX, Label, Labels, RawLabel,
    Record, epoch_order, group_texts,
};
use kiln_trainer::BatchSource;
use kiln_trainer::model::Batch;

fn example(ids: &[u32], label: Label) -> Example {
    Example {
        input_ids: ids.to_vec(),
        token_type_ids: None,
        label,
    }
}

fn numbered(n: usize) -> Dataset {
    // Example i has i % 4 + 1 tokens, all equal to i, and class i % 3.
    Dataset::new(
        (0..n)
            .map(|i| example(&vec![i as u32; i % 4 + 1], Label::Class((i % 3) as i64)))
            .collect(),
    )
}

fn ids2(batch: &Batch) -> Vec<Vec<u32>> {
    batch.input_ids.to_vec2().unwrap()
}

#[test]
fn group_texts_concatenates_and_drops_the_remainder() {
    let lists = vec![vec![1, 2, 3], vec![], vec![4, 5], vec![6, 7, 8, 9, 10]];
    assert_eq!(
        group_texts(lists.clone(), 4).unwrap(),
        vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]]
    );
    assert_eq!(
        group_texts(lists.clone(), 5).unwrap(),
        vec![vec![1, 2, 3, 4, 5], vec![6, 7, 8, 9, 10]]
    );
    assert!(group_texts(lists.clone(), 11).unwrap().is_empty());
    assert!(group_texts(lists, 0).is_err());
}

#[test]
fn causal_lm_blocks_have_labels_equal_to_inputs() {
    let texts = [
        "the cat sat on the mat.\n",
        "\n",
        "a dog ran after the cat.\n",
    ];
    let records: Vec<Record> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| Record {
            line: i + 1,
            text: t.to_string(),
            label: None,
        })
        .collect();
    let tok = TokenizerTrainer::new(TokenizerKind::Gpt2, 300)
        .train(texts)
        .unwrap();
    let all: Vec<u32> = texts
        .iter()
        .flat_map(|t| tok.encode(t, None).unwrap().input_ids)
        .collect();
    let data = Dataset::causal_lm(&records, &tok, 8).unwrap();
    assert_eq!(data.len(), all.len() / 8);
    for (i, e) in data.examples().iter().enumerate() {
        assert_eq!(e.input_ids, all[i * 8..(i + 1) * 8]);
        assert_eq!(
            e.label,
            Label::Tokens(e.input_ids.iter().map(|&x| i64::from(x)).collect())
        );
        assert_eq!(e.token_type_ids, None);
    }
}

#[test]
fn classification_examples_are_truncated_and_labelled() {
    let records = vec![
        Record {
            line: 1,
            text: "good film".into(),
            label: Some(RawLabel::Str("pos".into())),
        },
        Record {
            line: 2,
            text: "a very long and rather boring film indeed".into(),
            label: Some(RawLabel::Str("neg".into())),
        },
    ];
    let path = Path::new("train.jsonl");
    let texts = records.iter().map(|r| r.text.as_str());
    let tok = TokenizerTrainer::new(TokenizerKind::Bert, 100)
        .with_min_frequency(1)
        .train(texts)
        .unwrap();
    let labels = Labels::infer(&records, path).unwrap();
    let data = Dataset::classification(&records, path, &tok, Some(5), Some(&labels)).unwrap();
    assert_eq!(data.get(0).unwrap().label, Label::Class(1));
    assert_eq!(data.get(1).unwrap().label, Label::Class(0));
    assert_eq!(data.get(1).unwrap().input_ids.len(), 5);
    assert_eq!(
        data.get(1).unwrap().token_type_ids.as_deref(),
        Some(&[0u32; 5][..])
    );
    let unlabelled = Dataset::classification(&records, path, &tok, Some(5), None).unwrap();
    assert!(unlabelled.examples().iter().all(|e| e.label == Label::None));
    // A validation row with a label the training data lacks: file and line.
    let bad = vec![Record {
        line: 3,
        text: "meh".into(),
        label: Some(RawLabel::Str("mixed".into())),
    }];
    let err = Dataset::classification(
        &bad,
        Path::new("validation.jsonl"),
        &tok,
        Some(5),
        Some(&labels),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("validation.jsonl:3: unknown label \"mixed\""),
        "{err}"
    );
}

#[test]
fn shuffle_is_a_pure_function_of_seed_and_epoch() {
    let a = epoch_order(100, 42, 0);
    assert_eq!(a, epoch_order(100, 42, 0));
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    assert_ne!(a, (0..100).collect::<Vec<_>>());
    assert_ne!(a, epoch_order(100, 42, 1), "epochs differ");
    assert_ne!(a, epoch_order(100, 43, 0), "seeds differ");
    // The same order the trainer draws, transformers' too: torch.randperm seeded with
    // seed + epoch.
    assert_eq!(
        kiln_trainer::data::torch_randperm(100, 45),
        epoch_order(100, 42, 3)
    );
    assert!(epoch_order(0, 1, 1).is_empty());
}

#[test]
fn loader_batches_drop_last_and_resume() {
    let data = CollatedDataset::new(numbered(23), Collator::new(0));
    let dev = Device::Cpu;
    let loader = DataLoader::new(&data, 5).unwrap().with_shuffle(7);
    assert_eq!(loader.num_batches(), 5);
    let idx = loader.batch_indices(2);
    assert_eq!(
        idx.iter().map(Vec::len).collect::<Vec<_>>(),
        [5, 5, 5, 5, 3]
    );
    let mut seen: Vec<usize> = idx.concat();
    seen.sort_unstable();
    assert_eq!(seen, (0..23).collect::<Vec<_>>());
    let dropping = loader.clone().with_drop_last(true);
    assert_eq!(dropping.num_batches(), 4);
    assert_eq!(dropping.batch_indices(2), idx[..4]);

    // Batches from position k are the tail of a full pass, for every k.
    let full: Vec<Batch> = loader.epoch(2, &dev).collect::<Result<_, _>>().unwrap();
    assert_eq!(full.len(), 5);
    for k in 0..=6 {
        let tail: Vec<Batch> = loader
            .epoch_from(2, k, &dev)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(tail.len(), 5usize.saturating_sub(k));
        for (a, b) in tail.iter().zip(&full[k.min(5)..]) {
            assert_eq!(ids2(a), ids2(b));
            assert_eq!(
                a.labels.as_ref().unwrap().to_vec1::<i64>().unwrap(),
                b.labels.as_ref().unwrap().to_vec1::<i64>().unwrap()
            );
        }
    }
    // Each batch holds the examples its indices name.
    for (batch, indices) in full.iter().zip(&idx) {
        let firsts: Vec<u32> = ids2(batch).iter().map(|row| row[0]).collect();
        assert_eq!(
            firsts,
            indices.iter().map(|&i| i as u32).collect::<Vec<_>>()
        );
    }
    // Unshuffled: in order. Batch size 0 is refused.
    let plain = DataLoader::new(&data, 10).unwrap();
    assert_eq!(plain.batch_indices(5)[0], (0..10).collect::<Vec<_>>());
    assert!(DataLoader::new(&data, 0).is_err());
    // A dyn BatchSource works too (what the trainer holds).
    let dynamic: &dyn BatchSource = &data;
    assert_eq!(
        DataLoader::new(dynamic, 4).unwrap().epoch(0, &dev).count(),
        6
    );
}

#[test]
fn collator_pads_to_the_longest_with_masks() {
    let dev = Device::Cpu;
    let a = example(&[5, 6, 7], Label::Class(1));
    let b = example(&[8], Label::Class(0));
    let batch = Collator::new(9).collate(&[&a, &b], &dev).unwrap();
    assert_eq!(batch.len(), 2);
    assert_eq!(batch.input_ids.dtype(), DType::U32);
    assert_eq!(ids2(&batch), [[5, 6, 7], [8, 9, 9]]);
    let mask = batch.attention_mask.as_ref().unwrap();
    assert_eq!(mask.dtype(), DType::U32);
    assert_eq!(mask.to_vec2::<u32>().unwrap(), [[1, 1, 1], [1, 0, 0]]);
    assert!(batch.token_type_ids.is_none());
    let labels = batch.labels.as_ref().unwrap();
    assert_eq!((labels.dtype(), labels.dims()), (DType::I64, &[2usize][..]));
    assert_eq!(labels.to_vec1::<i64>().unwrap(), [1, 0]);

    // Left padding and a multiple of 4.
    let batch = Collator::new(0)
        .with_pad_left(true)
        .with_pad_to_multiple_of(Some(4))
        .collate(&[&a, &b], &dev)
        .unwrap();
    assert_eq!(ids2(&batch), [[0, 5, 6, 7], [0, 0, 0, 8]]);
    assert_eq!(
        batch.attention_mask.unwrap().to_vec2::<u32>().unwrap(),
        [[0, 1, 1, 1], [0, 0, 0, 1]]
    );

    // Token type ids padded with 0; regression labels f32.
    let mut c = example(&[1, 2], Label::Value(0.5));
    c.token_type_ids = Some(vec![0, 1]);
    let mut d = example(&[3, 4, 5, 6], Label::Value(-2.0));
    d.token_type_ids = Some(vec![1, 1, 1, 1]);
    let batch = Collator::new(0).collate(&[&c, &d], &dev).unwrap();
    assert_eq!(
        batch.token_type_ids.unwrap().to_vec2::<u32>().unwrap(),
        [[0, 1, 0, 0], [1, 1, 1, 1]]
    );
    let labels = batch.labels.unwrap();
    assert_eq!(labels.dtype(), DType::F32);
    assert_eq!(labels.to_vec1::<f32>().unwrap(), [0.5, -2.0]);

    // Language-model labels padded with -100, same shape as the inputs.
    let e = example(&[1, 2, 3], Label::Tokens(vec![1, 2, 3]));
    let f = example(&[4], Label::Tokens(vec![4]));
    let batch = Collator::new(0).collate(&[&e, &f], &dev).unwrap();
    let labels = batch.labels.unwrap();
    assert_eq!(
        (labels.dtype(), labels.dims()),
        (DType::I64, &[2usize, 3][..])
    );
    assert_eq!(
        labels.to_vec2::<i64>().unwrap(),
        [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    );

    // No labels: none in the batch.
    let g = example(&[1], Label::None);
    assert!(
        Collator::new(0)
            .collate(&[&g, &g], &dev)
            .unwrap()
            .labels
            .is_none()
    );
}

#[test]
fn collator_refuses_inconsistent_batches() {
    let dev = Device::Cpu;
    let a = example(&[1], Label::Class(0));
    let b = example(&[1], Label::Value(1.0));
    let n = example(&[1], Label::None);
    let mut typed = example(&[1], Label::Class(0));
    typed.token_type_ids = Some(vec![0]);
    let collator = Collator::new(0);
    assert!(collator.collate(&[&a, &b], &dev).is_err());
    assert!(collator.collate(&[&n, &a], &dev).is_err());
    assert!(collator.collate(&[&a, &typed], &dev).is_err());
    assert!(collator.collate(&[], &dev).is_err());
    let data = CollatedDataset::new(numbered(3), collator);
    assert!(data.batch(&[0, 3], &dev).is_err());
    assert_eq!(data.batch(&[2, 0], &dev).unwrap().len(), 2);
}

#[test]
fn collator_for_a_tokenizer_uses_its_padding() {
    let texts = ["one two three", "four five"];
    let bert = TokenizerTrainer::new(TokenizerKind::Bert, 60)
        .train(texts)
        .unwrap();
    assert_eq!(
        Collator::for_tokenizer(&bert).pad_id(),
        bert.pad_id().unwrap()
    );
    let gpt2 = TokenizerTrainer::new(TokenizerKind::Gpt2, 300)
        .train(texts)
        .unwrap();
    assert_eq!(
        Collator::for_tokenizer(&gpt2).pad_id(),
        gpt2.eos_id().unwrap()
    );
}
