//! The training loop: strategies, best model, rotation, validation, and exact resume.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{Synthetic, Tiny, args, history_without_timings, weights};
use kiln_checkpoint::scan::list_checkpoints;
use kiln_test_support::fs::copy_dir;
use kiln_trainer::Trainer;
use kiln_trainer::args::Strategy;
use kiln_trainer::callback::EarlyStoppingCallback;
use kiln_trainer::trainer::accuracy;

fn steps_saved(out: &Path) -> Vec<u64> {
    list_checkpoints(out)
        .unwrap()
        .iter()
        .filter(|c| c.is_complete())
        .map(|c| c.step)
        .collect()
}

fn trainer(out: &Path, f: impl FnOnce(&mut kiln_trainer::TrainingArguments)) -> Trainer<Tiny> {
    let mut a = args(out);
    f(&mut a);
    Trainer::new(Tiny::new(1), a)
        .with_train_dataset(Synthetic::new(60, 7))
        .with_eval_dataset(Synthetic::new(24, 8))
        .with_compute_metrics(accuracy)
        .with_quiet(true)
}

#[test]
fn learns_and_saves_every_save_steps_and_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(dir.path(), |_| {});
    let before = t.evaluate().unwrap()["eval_loss"];
    let out = t.train(None).unwrap();
    // 60 examples / 8 = 8 batches per epoch, 3 epochs = 24 steps.
    assert_eq!(out.global_step, 24);
    assert_eq!(steps_saved(dir.path()), [10, 20, 24]);
    let losses: Vec<f64> = t
        .state()
        .log_history
        .iter()
        .filter_map(|e| e.get("loss").and_then(|v| v.as_f64()))
        .collect();
    assert_eq!(losses.len(), 4);
    assert!(losses[3] < losses[0], "{losses:?}");
    let first = &t.state().log_history[0];
    for k in ["loss", "grad_norm", "learning_rate", "epoch", "step"] {
        assert!(first.contains_key(k), "{first:?}");
    }
    assert!(out.metrics.contains_key("train_runtime"));
    let m = t.evaluate().unwrap();
    assert!(m["eval_loss"] < before - 0.03, "{before} -> {m:?}");
    assert!(m.contains_key("eval_accuracy") && m.contains_key("eval_samples_per_second"));
}

#[test]
fn resumed_run_equals_uninterrupted_run_bit_for_bit() {
    let straight = tempfile::tempdir().unwrap();
    let mut a = trainer(straight.path(), |a| a.save_strategy = Strategy::No);
    a.train(None).unwrap();

    let saving = tempfile::tempdir().unwrap();
    let mut b = trainer(saving.path(), |a| a.save_steps = 3.0);
    b.train(None).unwrap();
    assert_eq!(
        weights(a.model()),
        weights(b.model()),
        "saving must not change the run"
    );

    // Resume copies of several intermediate checkpoints (mid-epoch and at an epoch end).
    for step in [3, 9, 15, 21] {
        let resumed = tempfile::tempdir().unwrap();
        let ckpt = resumed.path().join(format!("checkpoint-{step}"));
        copy_dir(&saving.path().join(format!("checkpoint-{step}")), &ckpt);
        let mut c = trainer(resumed.path(), |a| a.save_steps = 3.0);
        c.train(Some(ckpt.to_str().unwrap())).unwrap();
        assert_eq!(
            weights(a.model()),
            weights(c.model()),
            "resumed from step {step}"
        );
        assert_eq!(
            history_without_timings(a.state()),
            history_without_timings(c.state()),
            "history, resumed from {step}"
        );
        let (x, y) = (
            saving.path().join("checkpoint-24"),
            resumed.path().join("checkpoint-24"),
        );
        // torch's state dicts, written the same, byte for byte.
        for file in ["optimizer.pt", "scheduler.pt"] {
            assert!(
                std::fs::read(x.join(file)).unwrap() == std::fs::read(y.join(file)).unwrap(),
                "{file} from {step}"
            );
        }
    }
}

#[test]
fn best_model_is_kept_and_loaded_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(dir.path(), |a| {
        a.eval_strategy = Strategy::Steps;
        a.eval_steps = Some(4.0);
        a.save_steps = 4.0;
        a.save_total_limit = Some(1);
        a.load_best_model_at_end = true;
        a.metric_for_best_model = Some("accuracy".into());
        a.learning_rate = 0.5; // noisy, so the best is rarely the last
    });
    t.train(None).unwrap();
    let best = t
        .state()
        .best_model_checkpoint
        .clone()
        .expect("a best checkpoint");
    let best_step = t.state().best_global_step.unwrap();
    assert!(best.ends_with(&format!("checkpoint-{best_step}")));
    let saved = steps_saved(dir.path());
    assert!(
        saved.contains(&best_step),
        "best {best_step} deleted: {saved:?}"
    );
    assert!(saved.contains(&24), "newest deleted: {saved:?}");
    assert!(saved.len() <= 2, "{saved:?}");
    // Final weights are the best checkpoint's, bit for bit.
    let final_dir = dir.path().join("final");
    t.save_model(Some(&final_dir)).unwrap();
    let a = kiln_formats::open(&final_dir).unwrap();
    let b = kiln_formats::open(Path::new(&best)).unwrap();
    let diffs = kiln_formats::compare::compare(a.as_ref(), b.as_ref(), Default::default()).unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
}

#[test]
fn epoch_and_best_strategies() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(dir.path(), |a| {
        a.save_strategy = Strategy::Epoch;
        a.eval_strategy = Strategy::Epoch;
    });
    t.train(None).unwrap();
    assert_eq!(steps_saved(dir.path()), [8, 16, 24]);
    let evals = t
        .state()
        .log_history
        .iter()
        .filter(|e| e.contains_key("eval_loss"))
        .count();
    assert_eq!(evals, 3);

    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(dir.path(), |a| {
        a.save_strategy = Strategy::Best;
        a.eval_strategy = Strategy::Steps;
        a.eval_steps = Some(2.0);
        a.metric_for_best_model = Some("loss".into());
    });
    t.train(None).unwrap();
    let saved = steps_saved(dir.path());
    let improvements: Vec<u64> = {
        let mut best = f64::INFINITY;
        t.state()
            .log_history
            .iter()
            .filter_map(|e| {
                Some((
                    e.get("eval_loss")?.as_f64()?,
                    e.get("step")?.as_i64()? as u64,
                ))
            })
            .filter(|(l, _)| {
                let better = *l < best;
                if better {
                    best = *l;
                }
                better
            })
            .map(|(_, s)| s)
            .collect()
    };
    assert_eq!(saved, improvements);
}

#[test]
fn early_stopping_stops_and_no_save_strategy_saves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(dir.path(), |a| {
        a.eval_strategy = Strategy::Steps;
        a.eval_steps = Some(1.0);
        a.save_strategy = Strategy::No;
        a.metric_for_best_model = Some("loss".into());
        a.learning_rate = 0.0; // nothing improves after the first evaluation
    })
    .with_callback(EarlyStoppingCallback::new(2, 0.0));
    let out = t.train(None).unwrap();
    assert_eq!(out.global_step, 3);
    assert!(steps_saved(dir.path()).is_empty());
}

#[test]
fn refuses_to_overwrite_checkpoints_and_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    trainer(dir.path(), |a| a.max_steps = 10)
        .train(None)
        .unwrap();
    let e = trainer(dir.path(), |_| {})
        .train(None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--resume_from_checkpoint last") && e.contains("--overwrite_output_dir"),
        "{e}"
    );
    // `last` resumes from the newest complete checkpoint and finishes the run.
    let out = trainer(dir.path(), |a| a.max_steps = 12)
        .train(Some("last"))
        .unwrap();
    assert_eq!(out.global_step, 12);
    let e = trainer(
        &dir.path().join("checkpoint-10").join("config.json"),
        |_| {},
    )
    .train(None)
    .unwrap_err()
    .to_string();
    assert!(e.contains("is a file"), "{e}");
}

/// The background save copies CPU parameters and moments while the next steps run
/// (only the optimizer step waits for it): its checkpoints, taken mid-run and at the
/// end, hold the bytes of the synchronous save's, optimizer state included.
#[test]
fn sync_and_async_saves_write_the_same_checkpoint() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    trainer(d1.path(), |a| a.max_steps = 15)
        .train(None)
        .unwrap();
    trainer(d2.path(), |a| {
        a.max_steps = 15;
        a.async_save = false;
    })
    .train(None)
    .unwrap();
    for ckpt in ["checkpoint-10", "checkpoint-15"] {
        let a = kiln_formats::open(d1.path().join(ckpt)).unwrap();
        let b = kiln_formats::open(d2.path().join(ckpt)).unwrap();
        assert!(
            kiln_formats::compare::compare(a.as_ref(), b.as_ref(), Default::default())
                .unwrap()
                .is_empty(),
            "{ckpt}"
        );
        for file in ["model.safetensors", "optimizer.pt", "scheduler.pt"] {
            let read = |d: &Path| std::fs::read(d.join(ckpt).join(file)).unwrap();
            assert!(read(d1.path()) == read(d2.path()), "{ckpt}/{file}");
        }
    }
}

#[test]
fn a_failed_save_stops_or_continues_as_asked() {
    use kiln_trainer::args::SaveErrorPolicy;
    for async_save in [true, false] {
        // A plain file where checkpoint-10 must go: that save fails (it is never replaced).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("checkpoint-10"), b"in the way").unwrap();
        let mut t = trainer(dir.path(), |a| {
            a.async_save = async_save;
            a.overwrite_output_dir = true;
        });
        let e = t.train(None).unwrap_err().to_string();
        assert!(e.contains("checkpoint-10") && !e.contains('\n'), "{e}");
        assert!(
            t.state().global_step >= 10,
            "the model in memory is still there"
        );

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("checkpoint-10"), b"in the way").unwrap();
        let mut t = trainer(dir.path(), |a| {
            a.async_save = async_save;
            a.overwrite_output_dir = true;
            a.on_save_error = SaveErrorPolicy::Continue;
        });
        let out = t.train(None).unwrap();
        assert_eq!(out.global_step, 24);
        let errors = t
            .state()
            .log_history
            .iter()
            .filter(|e| e.contains_key("save_error"))
            .count();
        assert_eq!(errors, 1, "async={async_save}");
        assert_eq!(steps_saved(dir.path()), [20, 24], "async={async_save}");
    }
}

/// Rewrites `needle` in a checkpoint file by a replacement of the same length (the
/// manifest records sizes, so the checkpoint stays complete and only the content is bad).
fn corrupt(file: &Path, needle: &str, with: &str) {
    assert_eq!(needle.len(), with.len());
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(needle), "{text}");
    std::fs::write(file, text.replacen(needle, with, 1)).unwrap();
}

#[test]
fn a_malformed_state_file_is_an_error_naming_it_not_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    trainer(dir.path(), |_| {}).train(None).unwrap();
    for (name, needle, with) in [
        (
            "data_state.json",
            "\"epoch_end_done\": false",
            "\"epoch_end_done\": 12345",
        ),
        ("scheduler.json", "\"step\": 10", "\"step\": -1"),
    ] {
        let ckpt = dir.path().join(format!("bad-{name}"));
        copy_dir(&dir.path().join("checkpoint-10"), &ckpt);
        corrupt(&ckpt.join(name), needle, with);
        // The manifest's digests refuse the changed file before anything is read.
        let out = tempfile::tempdir().unwrap();
        let e = trainer(out.path(), |_| {})
            .train(Some(ckpt.to_str().unwrap()))
            .unwrap_err();
        match &e {
            kiln_trainer::Error::Resume { path, reason } => {
                assert_eq!(path, &ckpt.join(name));
                assert!(reason.contains("corrupt"), "{reason}");
            }
            other => panic!("{name}: {other}"),
        }
        // Without digests (a checkpoint of a kiln before them), the content is checked.
        let manifest = ckpt.join("kiln_checkpoint.json");
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
        m.as_object_mut().unwrap().remove("blake3").unwrap();
        std::fs::write(&manifest, m.to_string()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut t = trainer(out.path(), |_| {});
        let e = t.train(Some(ckpt.to_str().unwrap())).unwrap_err();
        match &e {
            kiln_trainer::Error::Resume { path, .. } => assert_eq!(path, &ckpt.join(name)),
            other => panic!("{name}: {other}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(name) && !msg.contains('\n'), "{msg}");
        assert_eq!(
            t.state().global_step,
            10,
            "{name}: nothing trained past the checkpoint"
        );
        assert!(steps_saved(out.path()).is_empty(), "{name}: nothing saved");
    }
}

/// `restore_callback_states_from_checkpoint`: a resumed run's early stopping continues
/// from the saved counter (and the saved patience, as transformers re-creates the
/// callback from its saved arguments); without it, the callback starts afresh.
#[test]
fn callback_states_are_restored_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let flat = |a: &mut kiln_trainer::TrainingArguments| {
        a.eval_strategy = Strategy::Steps;
        a.eval_steps = Some(1.0);
        a.save_steps = 1.0;
        a.metric_for_best_model = Some("loss".into());
        a.learning_rate = 0.0; // nothing improves after the first evaluation
    };
    let first = trainer(dir.path(), |a| {
        flat(a);
        a.max_steps = 2;
    })
    .with_callback(EarlyStoppingCallback::new(3, 0.0))
    .train(None)
    .unwrap();
    assert_eq!(first.global_step, 2);
    let resumed = |restore: bool, patience: u64| {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        let mut t = trainer(copy.path(), |a| {
            flat(a);
            a.max_steps = 10;
            a.restore_callback_states_from_checkpoint = restore;
        })
        .with_callback(EarlyStoppingCallback::new(patience, 0.0));
        t.train(Some("last")).unwrap().global_step
    };
    // Saved at step 2 with one evaluation without improvement: two more stop the run.
    assert_eq!(resumed(true, 3), 4);
    assert_eq!(resumed(true, 6), 4);
    // Afresh: three evaluations from step 3 on.
    assert_eq!(resumed(false, 3), 5);
}

/// Resume follows the new run's arguments, as transformers': a larger max_steps or
/// num_train_epochs extends a finished run (with a constant schedule, to the weights of
/// the longer run trained straight), the same length trains nothing, and a changed batch
/// size resumes from the step count (transformers' rule) instead of kiln's position.
#[test]
fn a_finished_run_is_extended_by_a_longer_one() {
    let constant = |a: &mut kiln_trainer::TrainingArguments| {
        a.lr_scheduler_type = "constant".into();
        a.save_steps = 5.0;
    };
    // 10 steps end inside the second epoch (8 batches an epoch).
    let straight = tempfile::tempdir().unwrap();
    let mut s = trainer(straight.path(), |a| {
        constant(a);
        a.max_steps = 14;
    });
    s.train(None).unwrap();
    let short = tempfile::tempdir().unwrap();
    trainer(short.path(), |a| {
        constant(a);
        a.max_steps = 10;
    })
    .train(None)
    .unwrap();
    let mut same = trainer(short.path(), |a| {
        constant(a);
        a.max_steps = 10;
    });
    assert_eq!(same.train(Some("last")).unwrap().global_step, 10);
    let mut longer = trainer(short.path(), |a| {
        constant(a);
        a.max_steps = 14;
    });
    assert_eq!(longer.train(Some("last")).unwrap().global_step, 14);
    assert_eq!(weights(longer.model()), weights(s.model()));

    // By epochs: 1 epoch, then 2.
    let by_epochs = |epochs: f64, dir: &Path, resume: Option<&str>| {
        let mut t = trainer(dir, |a| {
            constant(a);
            a.num_train_epochs = epochs;
        });
        t.train(resume).unwrap();
        t
    };
    let two = tempfile::tempdir().unwrap();
    let straight2 = by_epochs(2.0, two.path(), None);
    let one = tempfile::tempdir().unwrap();
    by_epochs(1.0, one.path(), None);
    let extended = by_epochs(2.0, one.path(), Some("last"));
    assert_eq!(extended.state().global_step, 16);
    assert_eq!(weights(extended.model()), weights(straight2.model()));

    // Another batch size: the position comes from the step count.
    let mut other = trainer(short.path(), |a| {
        constant(a);
        a.max_steps = 16;
        a.per_device_train_batch_size = 4;
    });
    assert_eq!(other.train(Some("last")).unwrap().global_step, 16);
}
