//! Checkpoints interchangeable with transformers' Trainer, in both directions
//! (tests/check_hf_resume.py): a run of 6 full-batch AdamW steps (warmup, linear decay,
//! weight decay, dropout off) interrupted at step 3 and continued by the other framework
//! ends where the uninterrupted run ends — BERT and GPT-2 (tied embeddings); and clearly
//! further away when the optimizer state is withheld.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{NO_EVAL, causal_args, kiln, repo, tiny_bert_args, weights_of};
use kiln::formats::TensorCollection;
use kiln_test_support::fs::copy_dir;
use kiln_test_support::run_checker;
use serde_json::{Value, json};

const STEPS: u64 = 6;
const K: u64 = 3;

/// The largest difference between the weights the two folders share.
fn max_diff(a: &Path, b: &Path) -> f64 {
    let (wa, wb) = (weights_of(a), weights_of(b));
    let mut worst = 0f64;
    for info in wa.tensors() {
        let Ok(y) = wb.tensor(&info.name) else {
            continue;
        };
        let f = |d: &[u8]| -> Vec<f32> {
            d.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let x = wa.tensor(&info.name).unwrap();
        for (p, q) in f(x.data()).iter().zip(f(y.data())) {
            worst = worst.max((p - q).abs() as f64);
        }
    }
    worst
}

/// The arguments both frameworks train with.
fn schedule() -> Value {
    json!({"max_steps": STEPS, "learning_rate": 1e-3, "warmup_steps": 2, "weight_decay": 0.01,
        "lr_scheduler_type": "linear", "logging_steps": 1, "seed": 42, "save_strategy": "steps",
        "save_steps": K, "optim": "adamw_torch_fused"})
}

fn kiln_schedule() -> Vec<String> {
    [
        "--max_steps",
        &STEPS.to_string(),
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "2",
        "--weight_decay",
        "0.01",
        "--lr_scheduler_type",
        "linear",
        "--logging_steps",
        "1",
        "--save_strategy",
        "steps",
        "--save_steps",
        &K.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One model's runs: how kiln makes its initial folder and fine-tunes it, and the job
/// fields transformers needs to train the same rows.
struct Case {
    name: &'static str,
    args: fn(&Path, &[&str]) -> Vec<String>,
    job: Value,
}

fn bert_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut flags = vec![
        "--max_train_samples",
        "64",
        "--per_device_train_batch_size",
        "64",
        "--hidden_dropout_prob",
        "0",
        "--attention_probs_dropout_prob",
        "0",
    ];
    flags.extend_from_slice(&NO_EVAL);
    flags.extend_from_slice(extra);
    tiny_bert_args(out, &flags)
}

fn gpt2_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let rows = repo().join("cli/bundled/sentiment/train.jsonl");
    let mut flags = vec![
        "--train_file",
        rows.to_str().unwrap(),
        "--max_train_samples",
        "16",
        "--per_device_train_batch_size",
        "16",
        "--n_embd",
        "32",
        "--resid_pdrop",
        "0",
        "--embd_pdrop",
        "0",
        "--attn_pdrop",
        "0",
    ];
    flags.extend_from_slice(&NO_EVAL);
    flags.extend_from_slice(extra);
    let mut args = causal_args("gpt2-corpus.toml", out, &flags);
    args.retain(|a| !a.contains("validation"));
    args
}

/// Runs kiln with `args` for `out`, then `extra`.
fn run(case: &Case, out: &Path, extra: &[String]) -> common::Run {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    kiln((case.args)(out, &extra))
}

#[test]
fn checkpoints_resume_across_frameworks() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let rows = repo().join("cli/bundled/sentiment/train.jsonl");
    let cases = [
        Case {
            name: "bert",
            args: bert_args,
            job: json!({"model": "bert", "rows": rows, "n": 64, "max_length": 64,
                "args": {"per_device_train_batch_size": 64}}),
        },
        Case {
            name: "gpt2",
            args: gpt2_args,
            job: json!({"model": "gpt2", "rows": rows, "n": 16, "block_size": 32,
                "args": {"per_device_train_batch_size": 16}}),
        },
    ];
    let mut jobs = Vec::new();
    let mut folders: Vec<(PathBuf, PathBuf)> = Vec::new();
    for case in &cases {
        let dir = w.join(case.name);
        // The initial folder: one step at learning rate 0.
        let init = dir.join("init");
        let zero: Vec<String> = [
            "--learning_rate",
            "0",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        run(case, &init, &zero).expect_success();
        // kiln's uninterrupted run, which saves checkpoint-3 on the way.
        let kiln_full = dir.join("kiln");
        let mut flags = vec![
            "--model_name_or_path".to_string(),
            init.display().to_string(),
        ];
        flags.extend(kiln_schedule());
        run(case, &kiln_full, &flags).expect_success();
        let files = kiln_test_support::fs::names(&kiln_full.join("checkpoint-3"));
        for f in ["optimizer.pt", "scheduler.pt", "trainer_state.json"] {
            assert!(
                files.contains(&f.to_string()),
                "{}: {f} missing: {files:?}",
                case.name
            );
        }
        // transformers resumes kiln's checkpoint-3, with and without its optimizer state.
        let mut job = |name: &str, resume: Option<&Path>| {
            let out = dir.join(name);
            let mut j = case.job.clone();
            j["init"] = json!(init);
            j["out"] = json!(out);
            for (k, v) in schedule().as_object().unwrap() {
                j["args"][k] = v.clone();
            }
            if let Some(ckpt) = resume {
                let copy = out.join("checkpoint-3");
                copy_dir(ckpt, &copy);
                j["resume"] = json!(copy);
            }
            j["compare"] = json!({"kiln": kiln_full});
            jobs.push(j);
            out
        };
        let ckpt = kiln_full.join("checkpoint-3");
        job("hf-from-kiln", Some(&ckpt));
        let withheld = dir.join("withheld");
        copy_dir(&ckpt, &withheld);
        for f in ["optimizer.pt", "scheduler.pt"] {
            std::fs::remove_file(withheld.join(f)).unwrap();
        }
        job("hf-withheld", Some(&withheld));
        // transformers' uninterrupted run, which saves its checkpoint-3.
        let hf_full = job("hf", None);
        folders.push((init, hf_full));
    }
    let Some(results) = run_checker(&repo().join("tests/check_hf_resume.py"), &jobs, w) else {
        return;
    };
    for (i, case) in cases.iter().enumerate() {
        let (from_kiln, withheld, hf) = (&results[3 * i], &results[3 * i + 1], &results[3 * i + 2]);
        let n = case.name;
        assert_eq!(from_kiln["global_step"], STEPS, "{n}");
        let resumed = from_kiln["diff"]["kiln"].as_f64().unwrap();
        let fresh = withheld["diff"]["kiln"].as_f64().unwrap();
        println!(
            "{n}: transformers continuing kiln's checkpoint-{K} ends {resumed:.2e} from kiln's \
             uninterrupted run; without its optimizer.pt and scheduler.pt {fresh:.2e}"
        );
        assert!(resumed < 1e-4, "{n}: {resumed}");
        assert!(
            fresh > 1e-3 && fresh > 100.0 * resumed,
            "{n}: {fresh} vs {resumed}"
        );
        // Its losses after the resume are kiln's. transformers 5.25 divides GPT-2's
        // summed token losses by every label of the batch, not by the t - 1 positions that
        // are predicted (`GPT2LMHeadModel` is not named `…ForCausalLM`, so its Trainer
        // does not count shifted labels): its logged loss is (t - 1) / t of the mean
        // kiln logs, as the model's own loss is (AdamW hardly sees the scale).
        let scale = if n == "gpt2" { 32.0 / 31.0 } else { 1.0 };
        let ours = kiln_test_support::fs::read_json(
            &w.join(n).join("kiln").join("trainer_state.json"),
        )["log_history"]
            .clone();
        let loss_at = |h: &Value, step: u64| {
            h.as_array()
                .unwrap()
                .iter()
                .find(|e| e["step"] == step && e.get("loss").is_some())
                .and_then(|e| e["loss"].as_f64())
        };
        for step in K + 1..=STEPS {
            let (a, b) = (
                loss_at(&ours, step).unwrap(),
                loss_at(&from_kiln["log_history"], step).unwrap() * scale,
            );
            assert!(
                (a - b).abs() < 1e-4,
                "{n} step {step}: kiln {a}, transformers {b}"
            );
        }

        // kiln continues transformers' checkpoint-3.
        let (init, hf_out) = &folders[i];
        let hf_ckpt = hf_out.join("checkpoint-3");
        let written = hf["checkpoints"]["checkpoint-3"].as_array().unwrap();
        for f in [
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "trainer_state.json",
        ] {
            assert!(
                written.iter().any(|x| x == f),
                "{n}: transformers wrote {written:?}"
            );
        }
        // kiln's tools read transformers' checkpoints: complete, torch files parsed.
        let verified = kiln(["verify", hf_ckpt.to_str().unwrap()]);
        verified.expect_success();
        assert!(
            verified.stdout.contains("ok (transformers checkpoint"),
            "{}",
            verified.stdout
        );
        let listed = kiln(["checkpoints", hf_out.to_str().unwrap()]);
        listed.expect_success();
        assert_eq!(
            listed.stdout.matches("complete (transformers)").count(),
            2,
            "{}",
            listed.stdout
        );
        let damaged = w.join(n).join("damaged");
        copy_dir(&hf_ckpt, &damaged);
        std::fs::copy(damaged.join("scheduler.pt"), damaged.join("optimizer.pt")).unwrap();
        let e = kiln(["verify", damaged.to_str().unwrap()]);
        let line = e.expect_error(&["optimizer.pt"]);
        assert!(line.contains("no param_groups"), "{line}");

        let out = w.join(n).join("kiln-from-hf");
        copy_dir(&hf_ckpt, &out.join("checkpoint-3"));
        let mut flags = vec![
            "--model_name_or_path".to_string(),
            init.display().to_string(),
        ];
        flags.extend(kiln_schedule());
        flags.extend(["--resume_from_checkpoint".into(), "last".into()]);
        let resumed_run = run(case, &out, &flags);
        resumed_run.expect_success();
        assert!(
            resumed_run.stderr.contains("rng_state.pth"),
            "{n}: {}",
            resumed_run.stderr
        );
        let resumed = max_diff(&out, &hf_out.join("final"));
        // A fresh optimizer and schedule from the same weights, for scale.
        let fresh_out = w.join(n).join("kiln-fresh");
        let mut fresh_flags = vec![
            "--model_name_or_path".to_string(),
            hf_ckpt.display().to_string(),
        ];
        fresh_flags.extend(kiln_schedule());
        fresh_flags.extend(["--max_steps".into(), (STEPS - K).to_string()]);
        run(case, &fresh_out, &fresh_flags).expect_success();
        let fresh = max_diff(&fresh_out, &hf_out.join("final"));
        println!(
            "{n}: kiln continuing transformers' checkpoint-{K} ends {resumed:.2e} from \
             transformers' uninterrupted run; with a fresh optimizer and schedule {fresh:.2e}"
        );
        assert!(resumed < 1e-4, "{n}: {resumed}");
        assert!(
            fresh > 1e-3 && fresh > 100.0 * resumed,
            "{n}: {fresh} vs {resumed}"
        );

        // Without optimizer.pt kiln refuses to resume (transformers would restart the
        // optimizer without a word).
        let bare = w.join(n).join("bare");
        copy_dir(&hf_ckpt, &bare.join("checkpoint-3"));
        std::fs::remove_file(bare.join("checkpoint-3/optimizer.pt")).unwrap();
        let mut flags = vec![
            "--model_name_or_path".to_string(),
            init.display().to_string(),
        ];
        flags.extend(kiln_schedule());
        flags.extend(["--resume_from_checkpoint".into(), "last".into()]);
        let refused = run(case, &bare, &flags);
        refused.expect_code(4);
        let line = refused.stderr.lines().last().unwrap_or("");
        assert!(
            line.contains("holds no optimizer state") && !line.contains("emergency"),
            "{n}: {}",
            refused.stderr
        );
    }
}

/// kiln draws its batches in the order transformers' sampler draws them, so a BERT run
/// of mini-batches (64 rows in batches of 8, 12 steps: an epoch and a half) is
/// transformers' run step after step — the same losses and gradient norms — and a
/// checkpoint saved inside the first epoch continues in either framework to the same
/// weights.
#[test]
fn mini_batch_runs_follow_transformers_and_resume_inside_an_epoch() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let case = Case {
        name: "bert",
        args: bert_args,
        job: json!({"model": "bert", "rows": repo().join("cli/bundled/sentiment/train.jsonl"),
            "n": 64, "max_length": 64, "args": {"per_device_train_batch_size": 8}}),
    };
    let init = w.join("init");
    let zero: Vec<String> = [
        "--learning_rate",
        "0",
        "--max_steps",
        "1",
        "--save_strategy",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    run(&case, &init, &zero).expect_success();
    let steps = [
        "--max_steps",
        "12",
        "--save_steps",
        "5",
        "--save_total_limit",
        "none",
        "--per_device_train_batch_size",
        "8",
    ];
    let flags = |extra: &[&str]| {
        let mut f = vec![
            "--model_name_or_path".to_string(),
            init.display().to_string(),
        ];
        f.extend(kiln_schedule());
        f.extend(steps.iter().chain(extra).map(|s| s.to_string()));
        f
    };
    let kiln_full = w.join("kiln");
    run(&case, &kiln_full, &flags(&[])).expect_success();
    let job = |name: &str, resume: Option<&Path>| {
        let mut j = case.job.clone();
        j["init"] = json!(init);
        j["out"] = json!(w.join(name));
        for (k, v) in schedule().as_object().unwrap() {
            j["args"][k] = v.clone();
        }
        j["args"]["max_steps"] = json!(12);
        j["args"]["save_steps"] = json!(5);
        if let Some(ckpt) = resume {
            let copy = w.join(name).join("checkpoint-5");
            copy_dir(ckpt, &copy);
            j["resume"] = json!(copy);
        }
        j["compare"] = json!({"kiln": kiln_full});
        j
    };
    let jobs = [
        job("hf", None),
        job("hf-from-kiln", Some(&kiln_full.join("checkpoint-5"))),
    ];
    let Some(results) = run_checker(&repo().join("tests/check_hf_resume.py"), &jobs, w) else {
        return;
    };
    let (hf, from_kiln) = (&results[0], &results[1]);
    let ours =
        kiln_test_support::fs::read_json(&kiln_full.join("trainer_state.json"))["log_history"]
            .clone();
    let series = |h: &Value, key: &str| -> Vec<f64> {
        h.as_array()
            .unwrap()
            .iter()
            .filter(|e| e.get("loss").is_some())
            .filter_map(|e| e[key].as_f64())
            .collect()
    };
    for key in ["loss", "grad_norm"] {
        let (a, b) = (series(&ours, key), series(&hf["log_history"], key));
        assert_eq!(a.len(), 12, "{key}: {a:?}");
        for (step, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * y.abs().max(1.0),
                "{key} at step {}: kiln {x}, transformers {y}",
                step + 1
            );
        }
    }
    let straight = hf["diff"]["kiln"].as_f64().unwrap();
    let resumed = from_kiln["diff"]["kiln"].as_f64().unwrap();
    // kiln continues transformers' checkpoint-5, inside the first epoch.
    let out = w.join("kiln-from-hf");
    copy_dir(&w.join("hf/checkpoint-5"), &out.join("checkpoint-5"));
    let resumed_run = run(&case, &out, &flags(&["--resume_from_checkpoint", "last"]));
    resumed_run.expect_success();
    assert!(
        resumed_run
            .stderr
            .contains("in the order transformers draws them"),
        "{}",
        resumed_run.stderr
    );
    let kiln_resumed = max_diff(&out, &w.join("hf/final"));
    println!(
        "mini-batches: kiln's and transformers' 12-step runs end {straight:.2e} apart; \
         transformers continuing kiln's checkpoint-5 ends {resumed:.2e} from kiln's run, \
         kiln continuing transformers' {kiln_resumed:.2e} from transformers'"
    );
    for d in [straight, resumed, kiln_resumed] {
        assert!(d < 1e-4, "{straight} {resumed} {kiln_resumed}");
    }
}
