//! kiln's AdamW and a transformers schedule in a hand-written candle loop, resumed bit
//! for bit from kiln-checkpoint checkpoints.
//!
//! ```text
//! cargo run -p kiln-optim --example candle_adamw -- OUT STEPS
//! ```
//!
//! A small MLP (4 → 16 → 1, tanh) learns `y = sin(x₀ + x₁ − x₂ · x₃)`. Every 5 steps the
//! loop commits `OUT/checkpoint-<step>`: the weights, the optimizer's state by parameter
//! name ([`Optimizer::state`]) and the schedule's step; on start it resumes from the
//! newest complete one (its schedule spans a fixed 100 steps). At the end it writes the model folder `OUT/final`. Running to 20
//! steps at once, or to 10 and then again to 20, gives the same bytes: the weights start
//! from `ChaCha8Rng` seeded with 0 (candle's CPU generator cannot be seeded), and the
//! batch of step `s` is drawn from `ChaCha8Rng` seeded with `1000 + s`, a pure function
//! of the step.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use kiln_checkpoint::commit::SingleProcess;
use kiln_checkpoint::model::{ModelSave, SaveOptions, save_pretrained};
use kiln_checkpoint::training::{CheckpointSnapshot, load_checkpoint};
use kiln_optim::{Hyper, OptimKind, Optimizer, Schedule};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng as _, SeedableRng};
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error>;

const BATCH: usize = 32;
const LEARNING_RATE: f64 = 1e-2;
const SAVE_EVERY: u64 = 5;
/// The steps the cosine schedule spans (with 2 of warm-up), whatever STEPS a run stops
/// at: a run stopped early and resumed follows the same learning rates.
const SCHEDULE_STEPS: u64 = 100;

/// Uniform values in [-1, 1) from the generator.
fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_u32() as f64 / 2f64.powi(31) - 1.0) as f32)
        .collect()
}

/// The parameters, named as a checkpoint names them, initialised from seed 0.
fn init(device: &Device) -> Result<Vec<(String, Var)>, Error> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut var = |shape: &[usize], scale: f32| -> Result<Var, Error> {
        let n = shape.iter().product();
        let v: Vec<f32> = uniform(&mut rng, n)
            .into_iter()
            .map(|x| x * scale)
            .collect();
        Ok(Var::from_tensor(&Tensor::from_vec(v, shape, device)?)?)
    };
    Ok(vec![
        ("fc1.weight".into(), var(&[4, 16], 0.5)?),
        ("fc1.bias".into(), var(&[16], 0.0)?),
        ("fc2.weight".into(), var(&[16, 1], 0.25)?),
        ("fc2.bias".into(), var(&[1], 0.0)?),
    ])
}

/// The batch drawn from `seed` (step `s` trains on seed `1000 + s`).
fn batch(seed: u64, device: &Device) -> Result<(Tensor, Tensor), Error> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = uniform(&mut rng, BATCH * 4);
    let y: Vec<f32> = x
        .chunks(4)
        .map(|r| (r[0] + r[1] - r[2] * r[3]).sin())
        .collect();
    Ok((
        Tensor::from_vec(x, (BATCH, 4), device)?,
        Tensor::from_vec(y, (BATCH, 1), device)?,
    ))
}

fn loss(params: &[(String, Var)], x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let h = x
        .matmul(params[0].1.as_tensor())?
        .broadcast_add(params[1].1.as_tensor())?
        .tanh()?;
    let out = h
        .matmul(params[2].1.as_tensor())?
        .broadcast_add(params[3].1.as_tensor())?;
    (out - y)?.sqr()?.mean_all()
}

fn config() -> Value {
    json!({"architectures": ["TinyMlp"], "model_type": "tiny-mlp", "hidden_size": 16})
}

fn weights(params: &[(String, Var)]) -> Result<kiln_formats::TensorMap<'static>, Error> {
    Ok(kiln_formats::candle::map_from_candle(
        params.iter().map(|(n, v)| (n.as_str(), v.as_tensor())),
    )?)
}

/// Trains to `steps` steps in `out`, from its newest complete checkpoint if it has one;
/// returns the step it started from.
pub fn run(out: &Path, steps: u64) -> Result<u64, Error> {
    let device = Device::Cpu;
    let params = init(&device)?;
    let hyper = Hyper {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let named = params
        .iter()
        .map(|(n, v)| (n.clone(), v.clone(), !n.ends_with("bias")))
        .collect();
    let mut optimizer = Optimizer::new(OptimKind::AdamW, hyper, named);
    let schedule = Schedule::from_name("cosine", &Default::default(), LEARNING_RATE)?;
    let mut start = 0;
    if let Some(dir) = kiln_checkpoint::scan::last_checkpoint(out)? {
        let resume = load_checkpoint(&dir, 0, 1)?;
        let file = kiln_formats::open(&dir)?;
        for (name, var) in &params {
            let view = file.tensor(name)?;
            var.set(&kiln_formats::candle::to_candle(&view, &device)?)?;
        }
        let decay: Vec<(String, bool)> = params
            .iter()
            .map(|(n, _)| (n.clone(), !n.ends_with("bias")))
            .collect();
        let state = resume
            .optimizer_for(&decay)?
            .ok_or_else(|| format!("{}: no optimizer state", dir.display()))?;
        optimizer.load_state(&state)?;
        start = resume.state.global_step;
    }
    for step in start..steps {
        let (x, y) = batch(1000 + step, &device)?;
        let grads = optimizer.grads_of(&loss(&params, &x, &y)?)?;
        let lr = LEARNING_RATE * schedule.factor(step, 2, SCHEDULE_STEPS, LEARNING_RATE);
        optimizer.step(&grads, lr)?;
        let done = step + 1;
        if done % SAVE_EVERY == 0 {
            CheckpointSnapshot::new(done, config(), Arc::new(weights(&params)?))
                .with_optimizer(optimizer.state()?)
                .with_scheduler(json!({"step": done}))
                .write(out, &SingleProcess)?;
        }
    }
    let w = weights(&params)?;
    save_pretrained(
        out.join("final"),
        &ModelSave::new(config(), &w),
        &SaveOptions::default(),
    )?;
    // A held-out batch: seed 1 is no step's.
    let (x, y) = batch(1, &device)?;
    println!(
        "steps {start}..{steps}: held-out loss {:.5}",
        loss(&params, &x, &y)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
    );
    Ok(start)
}

#[allow(dead_code)]
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (out, steps) = match args.as_slice() {
        [out, steps] => match steps.parse::<u64>() {
            Ok(s) => (out.clone(), s),
            Err(_) => {
                eprintln!("candle_adamw: STEPS must be a whole number, got {steps:?}");
                return std::process::ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("usage: candle_adamw OUT STEPS");
            return std::process::ExitCode::from(2);
        }
    };
    match run(Path::new(&out), steps) {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("candle_adamw: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
