//! The trainer against transformers: learning-rate schedules give transformers'
//! numbers, and a kiln run's `trainer_state.json` and model folder load in Python.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{last_json_line, run_python};
use kiln::models::{BertConfig, BertForSequenceClassification};
use kiln::optim::schedule::Schedule;
use kiln::trainer::model::Batch;
use kiln::trainer::rng::Rng;
use kiln::trainer::{BatchSource, Trainer, TrainingArguments};
use serde_json::{Value, json};

#[test]
fn schedules_match_transformers_step_by_step() {
    let py = python_or_skip!();
    let lr = 1e-3;
    let cases = json!([
        {"name": "linear", "warmup": 3, "total": 20, "kwargs": {}},
        {"name": "cosine", "warmup": 2, "total": 17, "kwargs": {}},
        {"name": "cosine", "warmup": 0, "total": 10, "kwargs": {"num_cycles": 1.5}},
        {"name": "cosine_with_restarts", "warmup": 2, "total": 25, "kwargs": {"num_cycles": 3}},
        {"name": "polynomial", "warmup": 4, "total": 15, "kwargs": {"lr_end": 1e-5, "power": 2.0}},
        {"name": "constant", "warmup": 0, "total": 5, "kwargs": {}},
        {"name": "constant_with_warmup", "warmup": 4, "total": 9, "kwargs": {}},
        {"name": "inverse_sqrt", "warmup": 5, "total": 30, "kwargs": {}},
        {"name": "inverse_sqrt", "warmup": 0, "total": 8, "kwargs": {"timescale": 3}},
        {"name": "cosine_with_min_lr", "warmup": 2, "total": 12, "kwargs": {"min_lr": 1e-4}},
        {"name": "cosine_with_min_lr", "warmup": 2, "total": 12, "kwargs": {"min_lr_rate": 0.2}},
        {"name": "warmup_stable_decay", "warmup": 3, "total": 20, "kwargs": {"num_decay_steps": 6}},
        {"name": "warmup_stable_decay", "warmup": 3, "total": 20,
         "kwargs": {"num_decay_steps": 5, "num_stable_steps": 4, "decay_type": "1-sqrt", "warmup_type": "cosine", "min_lr_ratio": 0.1}},
        {"name": "warmup_stable_decay", "warmup": 0, "total": 10, "kwargs": {"num_decay_steps": 10, "decay_type": "linear"}}
    ]);
    let script = r#"
import json, sys, torch
from transformers import get_scheduler
lr = float(sys.argv[2])
out = []
for c in json.loads(sys.argv[1]):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    s = get_scheduler(c["name"], opt, num_warmup_steps=c["warmup"], num_training_steps=c["total"],
                      scheduler_specific_kwargs=c["kwargs"])
    lrs = []
    for _ in range(c["total"] + 2):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    out.append(lrs)
print(json.dumps(out))
"#;
    let expected = last_json_line(&run_python(
        &py,
        script,
        &[cases.to_string(), lr.to_string()],
    ));
    for (case, want) in cases
        .as_array()
        .unwrap()
        .iter()
        .zip(expected.as_array().unwrap())
    {
        let kwargs = case["kwargs"].as_object().unwrap();
        let s = Schedule::from_name(case["name"].as_str().unwrap(), kwargs, lr).unwrap();
        let (w, t) = (
            case["warmup"].as_u64().unwrap(),
            case["total"].as_u64().unwrap(),
        );
        for (step, want) in want.as_array().unwrap().iter().enumerate() {
            let got = lr * s.factor(step as u64, w, t, lr);
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-15 + 1e-12 * want.abs(),
                "{case} step {step}: kiln {got:e}, transformers {want:e}"
            );
        }
    }
}

/// Random token ids with a learnable label (is token 5 present?).
struct Toy {
    rows: Vec<(Vec<u32>, i64)>,
}

impl BatchSource for Toy {
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn batch(&self, idx: &[usize], device: &Device) -> kiln::trainer::Result<Batch> {
        let t = self.rows[0].0.len();
        let ids: Vec<u32> = idx.iter().flat_map(|&i| self.rows[i].0.clone()).collect();
        let labels: Vec<i64> = idx.iter().map(|&i| self.rows[i].1).collect();
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (idx.len(), t), device)?,
            attention_mask: None,
            token_type_ids: None,
            labels: Some(Tensor::new(labels, device)?),
        })
    }
}

fn toy(n: usize, seed: u64) -> Arc<Toy> {
    let mut rng = Rng::seed_from_u64(seed);
    let rows = (0..n)
        .map(|_| {
            let ids: Vec<u32> = (0..6).map(|_| 1 + rng.below(30) as u32).collect();
            let label = i64::from(ids.contains(&5));
            (ids, label)
        })
        .collect();
    Arc::new(Toy { rows })
}

#[test]
fn a_kiln_run_loads_in_transformers() {
    let py = python_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let config = BertConfig::from_json(&json!({
        "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 16, "num_labels": 2
    }))
    .unwrap();
    let model =
        BertForSequenceClassification::new(config, &mut Rng::seed_from_u64(0), &Device::Cpu)
            .unwrap();
    let mut args = TrainingArguments::new(out.display().to_string());
    args.max_steps = 6;
    args.per_device_train_batch_size = 4;
    args.logging_steps = 2.0;
    args.save_steps = 3.0;
    args.eval_strategy = kiln::trainer::args::Strategy::Steps;
    args.eval_steps = Some(3.0);
    args.learning_rate = 1e-3;
    let mut t = Trainer::new(model, args)
        .with_train_dataset(toy(40, 1))
        .with_eval_dataset(toy(12, 2))
        .with_compute_metrics(kiln::trainer::trainer::accuracy)
        .with_quiet(true);
    t.train(None).unwrap();
    t.save_model(None).unwrap();
    t.save_state().unwrap();
    let script = r#"
import json, sys, torch
from transformers import AutoModelForSequenceClassification
from transformers.trainer_callback import TrainerState
out = sys.argv[1]
res = {}
for f in [out + "/trainer_state.json", out + "/checkpoint-3/trainer_state.json"]:
    s = TrainerState.load_from_json(f)
    res[f.split("/")[-2]] = [s.global_step, len(s.log_history), s.best_metric]
m, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
res["missing"] = sorted(info["missing_keys"])
res["unexpected"] = sorted(info["unexpected_keys"])
m.eval()
with torch.no_grad():
    ids = torch.tensor([[1, 5, 7, 9, 2, 3]])
    res["logits"] = m(input_ids=ids).logits[0].tolist()
print(json.dumps(res))
"#;
    let r: Value = last_json_line(&run_python(&py, script, &[out.display().to_string()]));
    assert_eq!(r["run"][0], 6, "{r}");
    assert_eq!(r["checkpoint-3"][0], 3, "{r}");
    assert_eq!(r["missing"], json!([]), "{r}");
    assert_eq!(r["unexpected"], json!([]), "{r}");
    // The same logits in kiln.
    let batch = Batch {
        input_ids: Tensor::new(&[[1u32, 5, 7, 9, 2, 3]], &Device::Cpu).unwrap(),
        attention_mask: None,
        token_type_ids: None,
        labels: None,
    };
    use kiln::trainer::model::Model;
    let logits = t
        .model()
        .forward(&batch, None)
        .unwrap()
        .logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (k, p) in logits.iter().zip(r["logits"].as_array().unwrap()) {
        assert!(
            (f64::from(*k) - p.as_f64().unwrap()).abs() < 1e-4,
            "{logits:?} vs {r}"
        );
    }
}
