//! kiln's epoch order is the one transformers' Trainer feeds its model (a real `train()`
//! with its default sampler, for several seeds, `data_seed`s and sizes), and
//! `train_sampling_strategy = "group_by_length"`: kiln's grouping of its shuffle is
//! transformers' `get_length_grouped_indices` of the same permutation (given to it as
//! `torch.randperm`'s result, tests/check_sampler.py), index for index; and through
//! `kiln train`, a grouped run resumed mid-way ends bit-identical to an uninterrupted
//! one, and its batches pad less than shuffled ones; `sequential` ignores the seed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{NO_EVAL, kiln, repo, resume_args, tiny_bert_args};
use kiln::trainer::data::{epoch_order, length_grouped};
use kiln::trainer::rng::Rng;
use kiln_test_support::run_checker;
use serde_json::json;

#[test]
fn grouping_is_transformers_on_the_same_permutation() {
    let work = tempfile::tempdir().unwrap();
    let mut rng = Rng::seed_from_u64(3);
    // (examples, batch size, distinct lengths): several mega-batch sizes (1, 2, 50
    // batches), many ties, and one length for all.
    let cases = [
        (1000, 8, 40),
        (37, 4, 5),
        (10, 16, 3),
        (5000, 4, 300),
        (64, 8, 1),
    ];
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    for (i, (n, bs, distinct)) in cases.into_iter().enumerate() {
        let lengths: Vec<usize> = (0..n).map(|_| 1 + rng.below(distinct) as usize).collect();
        let order = epoch_order(n, 42, i as u64);
        ours.push(length_grouped(&order, &lengths, bs));
        jobs.push(json!({"order": order, "lengths": lengths, "batch_size": bs}));
    }
    let Some(theirs) = run_checker(&repo().join("tests/check_sampler.py"), &jobs, work.path())
    else {
        return;
    };
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(&json!(a), b, "case {i}: {:?}", cases[i]);
    }
}

#[test]
fn epoch_order_is_the_order_transformers_trains_in() {
    let work = tempfile::tempdir().unwrap();
    // (examples, batch size, seed, data_seed, epochs).
    let cases = [
        (96, 8, 42, None, 3),
        (37, 4, 7, None, 2),
        (10, 16, 42, Some(1234), 2),
    ];
    let jobs: Vec<_> = cases
        .iter()
        .map(|(n, bs, seed, data_seed, epochs)| {
            json!({"trainer": {"n": n, "batch_size": bs, "seed": seed, "data_seed": data_seed, "epochs": epochs}})
        })
        .collect();
    let Some(theirs) = run_checker(&repo().join("tests/check_sampler.py"), &jobs, work.path())
    else {
        return;
    };
    for ((n, _, seed, data_seed, epochs), seen) in cases.iter().zip(&theirs) {
        let ours: Vec<usize> = (0..*epochs)
            .flat_map(|e| epoch_order(*n, data_seed.unwrap_or(*seed), e))
            .collect();
        assert_eq!(
            &json!(ours),
            seen,
            "n {n}, seed {seed}, data_seed {data_seed:?}"
        );
    }
}

#[test]
fn grouped_runs_resume_bit_identical_and_pad_less() {
    let work = tempfile::tempdir().unwrap();
    let grouped = ["--train_sampling_strategy", "group_by_length"];
    let flags = [
        &grouped[..],
        &NO_EVAL[..],
        &["--include_num_input_tokens_seen", "all"],
    ]
    .concat();
    let whole = work.path().join("whole");
    kiln(tiny_bert_args(&whole, &flags)).expect_success();
    // The same run stopped after checkpoint-4 and resumed.
    let part = work.path().join("part");
    kiln(tiny_bert_args(
        &part,
        &[&flags[..], &["--max_steps", "4"]].concat(),
    ))
    .expect_success();
    kiln(resume_args(&part, &flags)).expect_success();
    let read = |d: &std::path::Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(read(&whole), read(&part), "resumed grouped run differs");
    // All positions seen (padding included): fewer when batches are grouped by length.
    let shuffled = work.path().join("shuffled");
    let random = [&NO_EVAL[..], &["--include_num_input_tokens_seen", "all"]].concat();
    kiln(tiny_bert_args(&shuffled, &random)).expect_success();
    let seen = |d: &std::path::Path| {
        kiln_test_support::fs::read_json(&d.join("trainer_state.json"))["num_input_tokens_seen"]
            .as_u64()
            .unwrap()
    };
    println!(
        "positions seen: grouped {}, shuffled {}",
        seen(&whole),
        seen(&shuffled)
    );
    assert!(seen(&whole) < seen(&shuffled));
    // sequential: the data's order, so the shuffling seed changes nothing (it does for
    // random order).
    let by_seed = |strategy: &str, seed: &str| {
        let d = work.path().join(format!("{strategy}-{seed}"));
        let f = ["--train_sampling_strategy", strategy, "--data_seed", seed];
        kiln(tiny_bert_args(&d, &[&f[..], &NO_EVAL[..]].concat())).expect_success();
        read(&d)
    };
    assert_eq!(by_seed("sequential", "1"), by_seed("sequential", "2"));
    assert_ne!(by_seed("random", "1"), by_seed("random", "2"));
    let bad = kiln(tiny_bert_args(
        &work.path().join("bad"),
        &["--train_sampling_strategy", "batch_rebalance"],
    ));
    assert!(
        bad.one_stderr_line()
            .contains("batch_rebalance is not implemented"),
        "{}",
        bad.stderr
    );
}
