//! bf16 / fp16 mixed-precision training: the loss falls, f32 master weights are saved
//! and load back, fp16's loss scaler survives a resume exactly, and a device without
//! the dtype is refused before any work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use common::{Synthetic, Tiny, args, history_without_timings};
use kiln_backend::{Availability, Backend, Capabilities, DeviceInfo};
use kiln_trainer::args::Strategy;
use kiln_trainer::model::{Batch, Model};
use kiln_trainer::models::{
    BertConfig, BertForSequenceClassification, Gpt2Config, Gpt2LMHeadModel,
};
use kiln_trainer::rng::Rng;
use kiln_trainer::run::RunConfig;
use kiln_trainer::{BatchSource, Trainer, TrainingArguments};

/// A backend that computes in f32 only (on the CPU), for the refusal.
struct F32Only;

kiln_backend::register_backend!(F32Only);

impl Backend for F32Only {
    fn name(&self) -> &'static str {
        "f32only"
    }
    fn priority(&self) -> i32 {
        -20
    }
    fn probe(&self) -> Availability {
        Availability::Available
    }
    fn devices(&self) -> Vec<DeviceInfo> {
        vec![DeviceInfo::new(0, "the CPU, f32 only")]
    }
    fn device(&self, _: usize) -> candle_core::Result<Device> {
        Ok(Device::Cpu)
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(&[DType::F32])
    }
}

/// BERT examples: label = first token mod 3 (the pooler reads the first position).
struct Classify(Vec<[u32; 6]>);

/// GPT-2 examples: counting sequences, each token the previous one plus 1.
struct Count(Vec<[u32; 8]>);

fn draws(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::seed_from_u64(seed);
    (0..n).map(|_| 1 + rng.below(80) as u32).collect()
}

impl BatchSource for Classify {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn batch(&self, idx: &[usize], device: &Device) -> kiln_trainer::Result<Batch> {
        let ids: Vec<u32> = idx.iter().flat_map(|&i| self.0[i]).collect();
        let labels: Vec<i64> = idx.iter().map(|&i| i64::from(self.0[i][0] % 3)).collect();
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (idx.len(), 6), device)?,
            attention_mask: None,
            token_type_ids: None,
            labels: Some(Tensor::new(labels, device)?),
        })
    }
}

impl BatchSource for Count {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn batch(&self, idx: &[usize], device: &Device) -> kiln_trainer::Result<Batch> {
        let ids: Vec<u32> = idx.iter().flat_map(|&i| self.0[i]).collect();
        let labels: Vec<i64> = ids.iter().map(|&x| i64::from(x)).collect();
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (idx.len(), 8), device)?,
            attention_mask: None,
            token_type_ids: None,
            labels: Some(Tensor::from_vec(labels, (idx.len(), 8), device)?),
        })
    }
}

fn bert() -> BertForSequenceClassification {
    let config = BertConfig {
        vocab_size: 99,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 16,
        ..BertConfig::default()
    }
    .with_num_labels(3);
    BertForSequenceClassification::new(config, &mut Rng::seed_from_u64(3), &Device::Cpu).unwrap()
}

fn gpt2() -> Gpt2LMHeadModel {
    let config = Gpt2Config {
        vocab_size: 99,
        n_positions: 16,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        n_inner: Some(64),
        bos_token_id: Some(98),
        eos_token_id: Some(kiln_trainer::models::TokenIds::One(98)),
        ..Gpt2Config::default()
    };
    Gpt2LMHeadModel::new(config, &mut Rng::seed_from_u64(3), &Device::Cpu).unwrap()
}

fn mp_args(out: &Path, flag: &str) -> TrainingArguments {
    let mut a = TrainingArguments::new(out.display().to_string());
    a.set(flag, "true").unwrap();
    a.per_device_train_batch_size = 8;
    a.per_device_eval_batch_size = 16;
    a.learning_rate = 3e-3;
    a.max_steps = 40;
    a.logging_steps = 10.0;
    a.save_steps = 40.0;
    a.disable_tqdm = true;
    a
}

fn f32_values(v: &Var) -> Vec<f32> {
    v.as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Trains `model` for 40 steps in `flag` (bf16/fp16) and checks everything a
/// mixed-precision run promises; `reload` builds the model from a saved folder.
fn trains_in<M: Model>(
    model: M,
    data: Arc<dyn BatchSource>,
    flag: &str,
    dtype: DType,
    reload: impl Fn(&Path) -> Vec<(String, Var)>,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(model, mp_args(dir.path(), flag))
        .with_train_dataset(data.clone())
        .with_eval_dataset(data)
        .with_quiet(true);
    let before = t.evaluate().unwrap()["eval_loss"];
    // Evaluation already runs on the 16-bit working copy; the masters stay f32.
    assert!(
        t.model()
            .parameters()
            .iter()
            .all(|(_, v)| v.dtype() == dtype)
    );
    assert!(t.parameters().iter().all(|(_, v)| v.dtype() == DType::F32));
    let out = t.train(None).unwrap();
    assert_eq!(out.global_step, 40);
    let after = t.evaluate().unwrap()["eval_loss"];
    assert!(
        after < before * 0.8,
        "{flag}: eval loss {before} -> {after}"
    );
    let losses: Vec<f64> = t
        .state()
        .log_history
        .iter()
        .filter_map(|e| e.get("loss").and_then(|v| v.as_f64()))
        .collect();
    assert!(
        losses.len() == 4 && losses[3] < losses[0],
        "{flag}: {losses:?}"
    );

    // The masters hold updates a 16-bit copy cannot: they are not the working copy.
    let masters = t.parameters();
    let working = t.model().parameters();
    let differ = masters.iter().zip(&working).any(|((_, m), (_, w))| {
        f32_values(m) != f32_values(&Var::from_tensor(&w.to_dtype(DType::F32).unwrap()).unwrap())
    });
    assert!(differ, "{flag}: the masters must keep f32 precision");

    let saved = t.save_model(Some(&dir.path().join("final"))).unwrap();
    for folder in [saved.clone(), dir.path().join("checkpoint-40")] {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["dtype"], "float32", "{}", folder.display());
        assert!(config.get("torch_dtype").is_none());
        let files = kiln_formats::open(&folder).unwrap();
        assert!(
            files
                .tensors()
                .iter()
                .all(|i| i.dtype == kiln_formats::DType::F32),
            "{}",
            folder.display()
        );
        let loaded = reload(&folder);
        assert_eq!(loaded.len(), masters.len());
        for ((n, a), (m, b)) in loaded.iter().zip(&masters) {
            assert_eq!(n, m);
            assert_eq!(a.dtype(), DType::F32);
            assert_eq!(
                f32_values(a),
                f32_values(b),
                "{flag}: {n} in {}",
                folder.display()
            );
        }
    }
    let scaler = dir.path().join("checkpoint-40/scaler.json");
    assert_eq!(scaler.exists(), flag == "fp16", "{flag}");
}

#[test]
fn bf16_and_fp16_train_bert_and_gpt2_and_save_f32_masters() {
    let classify = Arc::new(Classify(
        draws(64 * 6, 11)
            .chunks(6)
            .map(|c| std::array::from_fn(|i| c[i]))
            .collect(),
    ));
    let count = Arc::new(Count(
        draws(64, 12)
            .into_iter()
            .map(|start| std::array::from_fn(|i| start + i as u32))
            .collect(),
    ));
    for (flag, dtype) in [("bf16", DType::BF16), ("fp16", DType::F16)] {
        trains_in(bert(), classify.clone(), flag, dtype, |dir| {
            let (m, _) = BertForSequenceClassification::from_pretrained(
                dir,
                &mut Rng::seed_from_u64(0),
                &Device::Cpu,
            )
            .unwrap();
            m.parameters()
        });
        trains_in(gpt2(), count.clone(), flag, dtype, |dir| {
            let (m, _) =
                Gpt2LMHeadModel::from_pretrained(dir, &mut Rng::seed_from_u64(0), &Device::Cpu)
                    .unwrap();
            m.parameters()
        });
    }
}

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

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
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
        let (ox, oy) = (
            kiln_checkpoint::optimizer::OptimizerState::load(&last.join("optimizer.safetensors"))
                .unwrap(),
            kiln_checkpoint::optimizer::OptimizerState::load(&y.join("optimizer.safetensors"))
                .unwrap(),
        );
        for p in ox.params() {
            for (slot, t) in ox.slots(p) {
                assert_eq!(Some(t), oy.get(p, slot), "optimizer {p}.{slot} from {step}");
            }
        }
    }
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

    // `kiln train --device f32only --fp16 true`: refused before the data is read (the
    // training file does not exist).
    let mut cfg = RunConfig::bundled_default().unwrap();
    cfg.set("device", "f32only").unwrap();
    cfg.set("fp16", "true").unwrap();
    cfg.set("output_dir", &out.display().to_string()).unwrap();
    cfg.set(
        "train_file",
        &dir.path().join("absent.jsonl").display().to_string(),
    )
    .unwrap();
    let e = kiln_trainer::run::train(&cfg, true)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "fp16 training needs a device that supports f16; f32only offers: f32"
    );
    assert!(!out.exists());

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
fn bf16_and_fp16_are_training_arguments_in_the_run_toml_and_flags() {
    let cfg = RunConfig::from_toml(
        "[model]\narchitecture = \"GPT2LMHeadModel\"\n[training]\nbf16 = true\n",
        "test.toml",
    )
    .unwrap();
    assert!(cfg.training.bf16 && !cfg.training.fp16);
    let mut cfg = RunConfig::default();
    cfg.set("fp16", "true").unwrap();
    assert!(cfg.training.fp16);
    let json = cfg.training.to_json();
    assert_eq!(
        (json["bf16"].clone(), json["fp16"].clone()),
        (false.into(), true.into())
    );
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
