//! bf16 and fp16 mixed-precision training, as transformers' `bf16=True` / `fp16=True`
//! (torch autocast, and a `GradScaler` for fp16) do it:
//!
//! - **Master weights stay f32.** The optimizer holds and updates the f32 parameters
//!   and f32 moments; checkpoints and `save_model` write them (`config.json` says
//!   `"dtype": "float32"`, as transformers' amp training saves).
//! - **The forward and backward passes run in the low-precision dtype**, on a working
//!   copy of the parameters: [`MixedPrecision::apply`] gives the model new bf16/f16
//!   variables through [`Model::map_parameters`] and keeps the variables it had as the
//!   masters. candle cannot change the dtype of a `Var` in place, and the model's forward
//!   reads its own `Var`s, so replacing them is the one way that needs no change to each
//!   forward pass and no cast per step of an f32 parameter (autocast's approach). After
//!   every optimizer step the working copy is refreshed from the masters
//!   ([`kiln_optim::Optimizer::with_working_copies`]); loading weights (resume, best
//!   model) loads the masters and refreshes it too. kiln's models compute LayerNorm,
//!   the attention softmax and the losses in f32, as autocast does.
//! - **Gradients** of the working copy are cast to f32 as they come out of the backward
//!   pass, so accumulation, clipping and the step are in f32.
//! - **fp16** scales the loss with a [`GradScaler`] (torch's defaults: initial scale
//!   2^16, growth factor 2, backoff 0.5, growth interval 2000): the gradients are
//!   unscaled before clipping; a step whose gradients hold inf or NaN is skipped (the
//!   weights, the optimizer state and the learning-rate schedule stay where they were,
//!   as transformers does not step the scheduler then) and the scale backs off. The
//!   scaler's state is saved in the checkpoint (`scaler.json`, torch's `state_dict()`
//!   keys) and restored on resume.
//! - **Evaluation and prediction** under bf16/fp16 run on the same working copy, in the
//!   low precision (transformers evaluates under autocast too); logits are returned in
//!   f32.
//! - The device must support the dtype: its backend's capabilities are checked before
//!   any work ([`check_device`]).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use kiln_backend::Backend;
use serde_json::{Value, json};

use crate::model::Model;
use crate::{Error, Result, TrainingArguments};
use kiln_optim::{Grads, Optimizer};

/// `t` in f32 when it is a 16-bit float (bf16, f16); `t` itself otherwise (no copy,
/// no operation: f32 computations are unchanged).
pub fn upcast(t: &Tensor) -> candle_core::Result<Tensor> {
    match t.dtype() {
        DType::BF16 | DType::F16 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    }
}

/// The transformers name of a mixed-precision dtype (`bf16`, `fp16`).
pub fn dtype_flag(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "fp16",
        other => other.as_str(),
    }
}

/// The dtype names a backend offers, for messages: `f32, f64, bf16, f16`.
fn offered(backend: &dyn Backend) -> String {
    let dtypes = backend.capabilities().dtypes;
    if dtypes.is_empty() {
        return "no floating-point dtype".into();
    }
    dtypes
        .iter()
        .map(|d| d.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that `backend`'s devices compute in the dtype `args` train in (`bf16`,
/// `fp16`); f32 training needs nothing. The error is one line naming what the device
/// offers: `bf16 training needs a device that supports bf16; cpu offers: f32, f64`.
pub fn check_device(backend: &dyn Backend, args: &TrainingArguments) -> Result<()> {
    let Some(dtype) = args.mixed_precision()? else {
        return Ok(());
    };
    if backend.capabilities().supports(dtype) {
        return Ok(());
    }
    let flag = dtype_flag(dtype);
    Err(Error::Config(format!(
        "{flag} training needs a device that supports {}; {} offers: {}",
        dtype.as_str(),
        backend.name(),
        offered(backend)
    )))
}

/// The backend of `device`: the registered backend named like its kind (`cpu`, `cuda`,
/// `metal`), if the program links one.
pub fn backend_for(device: &Device) -> Option<&'static dyn Backend> {
    let name = match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    };
    kiln_backend::find(name)
}

/// The f32 master weights of a model training in bf16 or f16 (see the [module
/// docs](self)).
#[derive(Debug)]
pub struct MixedPrecision {
    dtype: DType,
    masters: Vec<(String, Var)>,
}

impl MixedPrecision {
    /// Gives `model` a working copy of its parameters in `dtype` (through
    /// [`Model::map_parameters`]) and keeps its f32 variables as the masters.
    pub fn apply(model: &mut dyn Model, dtype: DType) -> Result<Self> {
        let flag = dtype_flag(dtype);
        if !matches!(dtype, DType::BF16 | DType::F16) {
            return Err(Error::Config(format!(
                "mixed precision computes in bf16 or f16, not {}",
                dtype.as_str()
            )));
        }
        let masters = model.parameters();
        if let Some((name, v)) = masters.iter().find(|(_, v)| v.dtype() != DType::F32) {
            return Err(Error::Config(format!(
                "{flag} training keeps f32 master weights, but parameter {name:?} is {}",
                v.dtype().as_str()
            )));
        }
        let mut working = HashMap::with_capacity(masters.len());
        for (name, v) in &masters {
            working.insert(name.clone(), Var::from_tensor(&v.to_dtype(dtype)?)?);
        }
        model.map_parameters(&mut |name, _| {
            working.get(name).cloned().ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "map_parameters names {name:?}, which parameters() does not list"
                ))
            })
        })?;
        let now = model.parameters();
        let replaced = now.len() == masters.len()
            && now
                .iter()
                .zip(&masters)
                .all(|((n, v), (m, old))| n == m && v.dtype() == dtype && v.id() != old.id());
        if !replaced {
            return Err(Error::Config(format!(
                "{flag} training: the model's map_parameters did not replace every parameter of parameters() by its {} copy",
                dtype.as_str()
            )));
        }
        Ok(MixedPrecision { dtype, masters })
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The f32 master weights, in [`Model::parameters`] order.
    pub fn masters(&self) -> &[(String, Var)] {
        &self.masters
    }

    /// Copies the masters into the model's working copy (after the masters were
    /// loaded from a folder).
    pub fn refresh(&self, model: &dyn Model) -> Result<()> {
        for ((_, w), (_, m)) in model.parameters().iter().zip(&self.masters) {
            w.set(&m.to_dtype(w.dtype())?)?;
        }
        Ok(())
    }

    /// The optimizer's parameters: the masters, whose gradients come from the model's
    /// working copy.
    pub fn working_copies(&self, model: &dyn Model) -> Vec<Var> {
        model.parameters().into_iter().map(|(_, v)| v).collect()
    }
}

/// fp16's dynamic loss scaling, as `torch.amp.GradScaler` does it.
#[derive(Debug, Clone, PartialEq)]
pub struct GradScaler {
    scale: f64,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: u64,
    growth_tracker: u64,
}

impl Default for GradScaler {
    fn default() -> Self {
        GradScaler::new()
    }
}

impl GradScaler {
    /// torch's defaults: scale 2^16, growth factor 2, backoff 0.5, growth interval 2000.
    pub fn new() -> Self {
        GradScaler {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            growth_tracker: 0,
        }
    }

    /// The current scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Consecutive steps without inf/NaN since the scale last changed.
    pub fn growth_tracker(&self) -> u64 {
        self.growth_tracker
    }

    /// `loss` times the scale (what the backward pass starts from).
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        Ok(loss.affine(self.scale, 0.0)?)
    }

    /// Divides the gradients by the scale, in place; returns whether any of them holds
    /// inf or NaN (then the step must be skipped).
    pub fn unscale(&self, grads: &mut Grads) -> Result<bool> {
        // torch multiplies by the f32 reciprocal of the scale.
        let inv = (1.0 / self.scale) as f32 as f64;
        for g in grads.iter_mut().flatten() {
            *g = g.affine(inv, 0.0)?;
        }
        Ok(!Optimizer::grad_norm(grads)?.is_finite())
    }

    /// After a step: backs off (and restarts the count) when inf/NaN was found, else
    /// counts the step and grows the scale every `growth_interval` steps.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == self.growth_interval {
                self.scale *= self.growth_factor;
                self.growth_tracker = 0;
            }
        }
        // torch keeps the scale in an f32 tensor.
        self.scale = self.scale as f32 as f64;
    }

    /// The state with `GradScaler.state_dict()`'s keys.
    pub fn state(&self) -> Value {
        json!({
            "scale": self.scale,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": self.growth_tracker,
        })
    }

    /// A scaler from [`GradScaler::state`]'s JSON.
    pub fn from_state(state: &Value) -> Result<Self> {
        let bad = |key: &str| Error::Config(format!("scaler state: {key} is missing or invalid"));
        let float = |key: &str| {
            state[key]
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| bad(key))
        };
        let int = |key: &str| state[key].as_u64().ok_or_else(|| bad(key));
        let s = GradScaler {
            scale: float("scale")?,
            growth_factor: float("growth_factor")?,
            backoff_factor: float("backoff_factor")?,
            growth_interval: int("growth_interval")?,
            growth_tracker: int("_growth_tracker")?,
        };
        if s.growth_interval == 0 {
            return Err(bad("growth_interval"));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grads(values: &[f32]) -> Grads {
        vec![
            Some(Tensor::new(values, &Device::Cpu).unwrap()),
            None,
            Some(Tensor::new(&[2.0f32], &Device::Cpu).unwrap()),
        ]
    }

    #[test]
    fn scaler_unscales_and_skips_a_step_with_inf_or_nan() {
        let mut s = GradScaler::new();
        assert_eq!(s.scale(), 65536.0);
        let loss = Tensor::new(0.5f32, &Device::Cpu).unwrap();
        assert_eq!(
            s.scale_loss(&loss).unwrap().to_scalar::<f32>().unwrap(),
            32768.0
        );

        let mut g = grads(&[65536.0, -131072.0]);
        assert!(!s.unscale(&mut g).unwrap(), "finite gradients");
        let g0 = g[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g0, [1.0, -2.0]);
        assert_eq!(
            g[2].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            [2.0 / 65536.0]
        );
        s.update(false);
        assert_eq!((s.scale(), s.growth_tracker()), (65536.0, 1));

        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let mut s = s.clone();
            let mut g = grads(&[1.0, bad]);
            assert!(s.unscale(&mut g).unwrap(), "{bad} must be found");
            s.update(true);
            assert_eq!((s.scale(), s.growth_tracker()), (32768.0, 0), "{bad}");
        }
    }

    #[test]
    fn scaler_grows_after_growth_interval_clean_steps() {
        let mut s = GradScaler::new();
        for _ in 0..1999 {
            s.update(false);
        }
        assert_eq!((s.scale(), s.growth_tracker()), (65536.0, 1999));
        s.update(false);
        assert_eq!((s.scale(), s.growth_tracker()), (131072.0, 0));
        s.update(true);
        s.update(true);
        assert_eq!(s.scale(), 32768.0);
    }

    #[test]
    fn scaler_state_round_trips_with_torch_keys() {
        let mut s = GradScaler::new();
        s.update(true);
        for _ in 0..7 {
            s.update(false);
        }
        let state = s.state();
        for key in [
            "scale",
            "growth_factor",
            "backoff_factor",
            "growth_interval",
            "_growth_tracker",
        ] {
            assert!(state.get(key).is_some(), "{key}");
        }
        assert_eq!(state["scale"], 32768.0);
        assert_eq!(state["_growth_tracker"], 7);
        let back = GradScaler::from_state(&state).unwrap();
        assert_eq!(back, s);
        let text = serde_json::to_string(&state).unwrap();
        let reread: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(GradScaler::from_state(&reread).unwrap(), s);
        let e = GradScaler::from_state(&json!({"scale": 1.0}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("growth_factor"), "{e}");
    }
}
