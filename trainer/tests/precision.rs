//! bf16 / fp16 mixed-precision training of a tiny model: f32 masters, fp16's loss
//! scaler survives a resume exactly, and a device without the dtype is refused before
//! any work (kiln-models' tests train BERT and GPT-2 in both; kiln-cli's refuse a run
//! config).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use candle_core::{DType, Device, Var};
use common::{Synthetic, Tiny, args, history_without_timings};
use kiln_test_support::backend::F32Only;
use kiln_test_support::fs::{copy_dir, read_json};
use kiln_test_support::tensors::f32_values;
use kiln_trainer::Trainer;
use kiln_trainer::args::Strategy;
use kiln_trainer::model::{Batch, Model};
use kiln_trainer::rng::Rng;

// The f32-only backend, selectable by name (`f32only`) in this test binary.
kiln_backend::register_backend!(F32Only);

fn fp16_trainer(out: &Path, save_steps: Option<f64>) -> Trainer<Tiny> {
    mp_trainer(out, save_steps, "fp16")
}

fn mp_trainer(out: &Path, save_steps: Option<f64>, flag: &str) -> Trainer<Tiny> {
    let mut a = args(out);
    a.set(flag, "true").unwrap();
    match save_steps {
        Some(s) => a.save_steps = s,
        None => a.save_strategy = Strategy::No,
    }
    let mut model = Tiny::new(1);
    if flag == "fp16" {
        // Gradients of this loss times 2^16 overflow f16: the scaler must skip steps
        // and back off before training gets going.
        model.loss_scale = 64.0;
    }
    Trainer::new(model, a)
        .with_train_dataset(Synthetic::new(60, 7))
        .with_quiet(true)
}

fn masters(t: &Trainer<Tiny>) -> Vec<Vec<f32>> {
    t.parameters().iter().map(|(_, v)| f32_values(v)).collect()
}

#[test]
fn fp16_skips_overflowing_steps_and_resumes_bit_for_bit() {
    let straight = tempfile::tempdir().unwrap();
    let mut a = fp16_trainer(straight.path(), None);
    a.train(None).unwrap();

    let saving = tempfile::tempdir().unwrap();
    let mut b = fp16_trainer(saving.path(), Some(3.0));
    b.train(None).unwrap();
    assert_eq!(masters(&a), masters(&b), "saving must not change the run");

    // Steps were skipped early on, and the scaler backed off for each.
    let last = saving.path().join("checkpoint-24");
    let scaler = read_json(&last.join("scaler.json"));
    let scale = scaler["scale"].as_f64().unwrap();
    let scheduled = read_json(&last.join("scheduler.json"))["step"]
        .as_u64()
        .unwrap();
    let skipped = 24 - scheduled;
    assert!(skipped >= 1, "no step overflowed: {scaler}");
    assert_eq!(scale, 65536.0 / 2f64.powi(skipped as i32), "{scaler}");
    assert!(
        scaler["_growth_tracker"].as_u64().unwrap() <= scheduled,
        "{scaler}"
    );
    let early = read_json(&saving.path().join("checkpoint-3/scaler.json"));
    assert!(early["scale"].as_f64().unwrap() < 65536.0, "{early}");

    for step in [3, 9, 15, 21] {
        let resumed = tempfile::tempdir().unwrap();
        let ckpt = resumed.path().join(format!("checkpoint-{step}"));
        copy_dir(&saving.path().join(format!("checkpoint-{step}")), &ckpt);
        let mut c = fp16_trainer(resumed.path(), Some(3.0));
        c.train(Some(ckpt.to_str().unwrap())).unwrap();
        assert_eq!(masters(&a), masters(&c), "resumed from step {step}");
        // NaN grad norms of skipped steps compare by their text.
        assert_eq!(
            format!("{:?}", history_without_timings(a.state())),
            format!("{:?}", history_without_timings(c.state())),
            "history, resumed from {step}"
        );
        let y = resumed.path().join("checkpoint-24");
        assert_eq!(read_json(&y.join("scaler.json")), scaler, "from {step}");
        assert_eq!(
            kiln_checkpoint::torch_state::load_scaler_pt(&y.join("scaler.pt")).unwrap(),
            scaler,
            "scaler.pt from {step}"
        );
        // torch's state dicts, written the same, byte for byte.
        for file in ["optimizer.pt", "scheduler.pt"] {
            assert!(
                std::fs::read(last.join(file)).unwrap() == std::fs::read(y.join(file)).unwrap(),
                "{file} from {step}"
            );
        }
    }
}

/// The loss scaler and the schedule come back from torch's files alone (a checkpoint
/// without kiln's manifest, `scaler.json` and `scheduler.json`, as transformers would
/// hand one over): the same run.
#[test]
fn fp16_resumes_from_scaler_pt_and_scheduler_pt() {
    let straight = tempfile::tempdir().unwrap();
    let mut a = fp16_trainer(straight.path(), None);
    a.train(None).unwrap();
    let saving = tempfile::tempdir().unwrap();
    fp16_trainer(saving.path(), Some(3.0)).train(None).unwrap();
    let resumed = tempfile::tempdir().unwrap();
    let ckpt = resumed.path().join("checkpoint-9");
    copy_dir(&saving.path().join("checkpoint-9"), &ckpt);
    for kiln_file in ["kiln_checkpoint.json", "scaler.json", "scheduler.json"] {
        std::fs::remove_file(ckpt.join(kiln_file)).unwrap();
    }
    let mut c = fp16_trainer(resumed.path(), Some(3.0));
    c.train(Some(ckpt.to_str().unwrap())).unwrap();
    assert_eq!(masters(&a), masters(&c));
}

#[test]
fn bf16_resumes_bit_for_bit() {
    let straight = tempfile::tempdir().unwrap();
    let mut a = mp_trainer(straight.path(), None, "bf16");
    a.train(None).unwrap();
    let saving = tempfile::tempdir().unwrap();
    let mut b = mp_trainer(saving.path(), Some(5.0), "bf16");
    b.train(None).unwrap();
    assert_eq!(masters(&a), masters(&b));
    assert!(!saving.path().join("checkpoint-10/scaler.json").exists());
    let resumed = tempfile::tempdir().unwrap();
    let ckpt = resumed.path().join("checkpoint-10");
    copy_dir(&saving.path().join("checkpoint-10"), &ckpt);
    let mut c = mp_trainer(resumed.path(), Some(5.0), "bf16");
    c.train(Some(ckpt.to_str().unwrap())).unwrap();
    assert_eq!(masters(&a), masters(&c));
    assert_eq!(
        history_without_timings(a.state()),
        history_without_timings(c.state())
    );
}

#[test]
fn a_device_without_the_dtype_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut a = args(&out);
    a.bf16 = true;
    let mut t = Trainer::new(Tiny::new(1), a)
        .with_backend(&F32Only)
        .with_train_dataset(Synthetic::new(60, 7))
        .with_quiet(true);
    let e = t.train(None).unwrap_err().to_string();
    assert_eq!(
        e,
        "bf16 training needs a device that supports bf16; f32only offers: f32"
    );
    assert!(!out.exists(), "nothing was written");
    assert_eq!(t.state().global_step, 0);

    // The CPU computes in both (forward and backward of kiln's models, tested above).
    let cpu = kiln_backend::find("cpu").unwrap().capabilities();
    assert!(cpu.supports(DType::BF16) && cpu.supports(DType::F16));

    // Both flags at once.
    let mut both = args(&out);
    both.bf16 = true;
    both.fp16 = true;
    let e = Trainer::new(Tiny::new(1), both)
        .with_train_dataset(Synthetic::new(60, 7))
        .train(None)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "bf16 and fp16 are both set; choose one");
}

#[test]
fn a_model_without_map_parameters_says_so() {
    struct Plain(Var);
    impl Model for Plain {
        fn forward(
            &self,
            b: &Batch,
            _: Option<&mut Rng>,
        ) -> candle_core::Result<kiln_trainer::model::Output> {
            Ok(kiln_trainer::model::Output {
                loss: None,
                logits: b.input_ids.clone(),
            })
        }
        fn parameters(&self) -> Vec<(String, Var)> {
            vec![("w".into(), self.0.clone())]
        }
        fn config(&self) -> serde_json::Value {
            serde_json::json!({"architectures": ["Plain"], "model_type": "plain"})
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path());
    a.bf16 = true;
    let e = Trainer::new(Plain(Var::zeros(2, DType::F32, &Device::Cpu).unwrap()), a)
        .with_train_dataset(Synthetic::new(8, 7))
        .train(None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Model::map_parameters") && !e.contains('\n'),
        "{e}"
    );
}

/// f32 checkpoints have no scaler file, and the schedule's step is the global step.
#[test]
fn f32_checkpoints_have_no_scaler() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path());
    a.max_steps = 6;
    a.save_steps = 6.0;
    let mut t = Trainer::new(Tiny::new(1), a)
        .with_train_dataset(Synthetic::new(60, 7))
        .with_quiet(true);
    t.train(None).unwrap();
    let ckpt = dir.path().join("checkpoint-6");
    assert!(!ckpt.join("scaler.json").exists());
    assert_eq!(read_json(&ckpt.join("scheduler.json"))["step"], 6);
}
