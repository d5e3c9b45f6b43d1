//! A candle-nn model in a hand-written training loop, checkpointed with kiln.
//!
//! ```text
//! cargo run -p kiln-checkpoint --features candle --example candle_loop -- OUT STEPS
//! ```
//!
//! The model is an MLP (candle-nn `Linear` layers 2 → 16 → 1, tanh) in a `VarMap`,
//! learning `y = x₀ · x₁` with candle-nn's `SGD`. Every 5 steps the loop commits
//! `OUT/checkpoint-<step>` crash-safely (a half-written one never appears under that
//! name); on start it resumes from the newest complete one; at the end it writes the
//! model folder `OUT/final` (`config.json`, `model.safetensors`).
//!
//! Resuming is exact: SGD without momentum keeps no state, so a checkpoint is the
//! weights, the step and the data seed. All randomness comes from `rand_chacha`'s
//! `ChaCha8Rng` (candle's CPU generator cannot be seeded, and is never used here):
//! seeded with [`INIT_SEED`] for the initial weights, and with `DATA_SEED + s` for the
//! batch of step `s`, a pure function of the step. Running to 20 steps at once, or to
//! 10 and then again to 20, gives the same bytes in `OUT/final`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Init, Linear, Optimizer, VarBuilder, VarMap};
use kiln_checkpoint::candle::{load_varmap, save_varmap, varmap_tensors};
use kiln_checkpoint::commit::SingleProcess;
use kiln_checkpoint::model::SaveOptions;
use kiln_checkpoint::scan::{clean_leftovers, last_checkpoint};
use kiln_checkpoint::training::{CheckpointSnapshot, load_checkpoint};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng as _, SeedableRng};
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error>;

/// The seed of the initial weights.
pub const INIT_SEED: u64 = 0;
/// The batch of step `s` is drawn from `ChaCha8Rng::seed_from_u64(DATA_SEED + s)`.
pub const DATA_SEED: u64 = 1000;
/// A checkpoint every this many steps.
pub const SAVE_EVERY: u64 = 5;
const BATCH: usize = 32;
const HIDDEN: usize = 16;
const LEARNING_RATE: f64 = 0.2;
/// The parameters in the order they are initialised and saved (as PyTorch lists them).
const PARAMS: [&str; 4] = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];

/// Uniform values in [-1, 1).
fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (f64::from(rng.next_u32()) / 2f64.powi(31) - 1.0) as f32)
        .collect()
}

/// The MLP with its variables in `vars`, initialised from [`INIT_SEED`] as PyTorch's
/// `nn.Linear` is (uniform in ±1/√fan_in), in [`PARAMS`] order.
fn model(vars: &VarMap, device: &Device) -> Result<impl Module, Error> {
    let vb = VarBuilder::from_varmap(vars, DType::F32, device);
    let layer = |name: &str, inputs: usize, outputs: usize| -> Result<Linear, Error> {
        let vb = vb.pp(name);
        let w = vb.get_with_hints((outputs, inputs), "weight", Init::Const(0.))?;
        let b = vb.get_with_hints(outputs, "bias", Init::Const(0.))?;
        Ok(Linear::new(w, Some(b)))
    };
    let fc1 = layer("fc1", 2, HIDDEN)?;
    let fc2 = layer("fc2", HIDDEN, 1)?;
    let mut rng = ChaCha8Rng::seed_from_u64(INIT_SEED);
    let data = vars
        .data()
        .lock()
        .map_err(|_| "the VarMap's lock is poisoned")?;
    for name in PARAMS {
        let var = &data[name];
        let bound = 1.0
            / (if name.starts_with("fc1") {
                2.0
            } else {
                HIDDEN as f32
            })
            .sqrt();
        let v: Vec<f32> = uniform(&mut rng, var.elem_count())
            .into_iter()
            .map(|x| x * bound)
            .collect();
        var.set(&Tensor::from_vec(v, var.dims(), device)?)?;
    }
    Ok(candle_nn::seq().add(fc1).add_fn(|x| x.tanh()).add(fc2))
}

/// The batch drawn from `seed`: inputs `(BATCH, 2)` and targets `x₀ · x₁`.
fn batch(seed: u64, device: &Device) -> Result<(Tensor, Tensor), Error> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = uniform(&mut rng, BATCH * 2);
    let y: Vec<f32> = x.chunks(2).map(|r| r[0] * r[1]).collect();
    Ok((
        Tensor::from_vec(x, (BATCH, 2), device)?,
        Tensor::from_vec(y, (BATCH, 1), device)?,
    ))
}

fn mse(model: &impl Module, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    (model.forward(x)? - y)?.sqr()?.mean_all()
}

/// `config.json`'s keys.
fn config() -> Value {
    json!({
        "architectures": ["CandleMlp"],
        "model_type": "candle-mlp",
        "hidden_size": HIDDEN,
    })
}

/// The data position saved with each checkpoint (`data_state.json`).
fn data_state(next_step: u64) -> Value {
    json!({"rng": "ChaCha8Rng", "seed": DATA_SEED, "next_step": next_step})
}

/// Trains to `steps` steps in `out`, resuming from its newest complete checkpoint if
/// there is one; returns the step it started from (0 for a fresh run).
pub fn run(out: &Path, steps: u64) -> Result<u64, Error> {
    let device = Device::Cpu;
    let vars = VarMap::new();
    let mlp = model(&vars, &device)?;
    // What an interrupted save left behind (never a complete checkpoint) goes first.
    clean_leftovers(out)?;
    let mut start = 0;
    if let Some(dir) = last_checkpoint(out)? {
        let resume = load_checkpoint(&dir, 0, 1)?;
        if resume.data.as_ref().and_then(|d| d.get("seed")) != Some(&json!(DATA_SEED)) {
            return Err(
                format!("{}: not a checkpoint of this program's data", dir.display()).into(),
            );
        }
        start = resume.state.global_step;
        if start > steps {
            return Err(format!("{} is already past step {steps}", dir.display()).into());
        }
        load_varmap(&dir, &vars)?;
        println!("resuming from {}", dir.display());
    }
    let mut sgd = candle_nn::SGD::new(vars.all_vars(), LEARNING_RATE)?;
    for step in start..steps {
        let (x, y) = batch(DATA_SEED + step, &device)?;
        sgd.backward_step(&mse(&mlp, &x, &y)?)?;
        let done = step + 1;
        if done % SAVE_EVERY == 0 {
            let weights = Arc::new(varmap_tensors(&vars, Some(&PARAMS))?);
            CheckpointSnapshot::new(done, config(), weights)
                .with_data(data_state(done))
                .write(out, &SingleProcess)?;
        }
    }
    let options = SaveOptions::default();
    save_varmap(out.join("final"), &vars, config(), Some(&PARAMS), &options)?;
    // Held out: a seed no training step uses.
    let (x, y) = batch(DATA_SEED - 1, &device)?;
    let loss = mse(&mlp, &x, &y)?.to_scalar::<f32>()?;
    println!("steps {start}..{steps}: held-out loss {loss:.5}");
    Ok(start)
}

#[allow(dead_code)] // the test includes this file for `run` alone
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, steps] = args.as_slice() else {
        eprintln!("usage: candle_loop OUT STEPS");
        return ExitCode::from(2);
    };
    let Ok(steps) = steps.parse::<u64>() else {
        eprintln!("candle_loop: STEPS must be a whole number, got {steps:?}");
        return ExitCode::from(2);
    };
    match run(Path::new(out), steps) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("candle_loop: {e}");
            ExitCode::FAILURE
        }
    }
}
