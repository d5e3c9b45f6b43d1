//! kiln's optimizers, whose state is saved by parameter name (candle's `AdamW` keeps
//! its moments private, so its state cannot be checkpointed).
//!
//! [`Optimizer::step`] follows `torch.optim.AdamW` (decoupled weight decay, bias
//! correction, `eps` added after the square root) and `torch.optim.SGD` (weight decay
//! as L2 added to the gradient, no momentum). Parameters for which the model says
//! `no_weight_decay` (kiln-trainer's `Model` trait) get none, as transformers'
//! `get_decay_parameter_names` arranges.

use candle_core::{DType, Tensor, Var};
use kiln_checkpoint::optimizer::OptimizerState;
use serde_json::json;

use crate::fused;
use crate::{Error, Result};

/// The optimizer an `optim` value selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimKind {
    /// AdamW with decoupled weight decay.
    AdamW,
    /// Plain SGD.
    Sgd,
}

impl OptimKind {
    /// The optimizer transformers' `optim` name selects, among those kiln has
    /// (`adamw`, `adamw_torch`, `adamw_torch_fused`: AdamW; `sgd`: SGD).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "adamw" | "adamw_torch" | "adamw_torch_fused" => Some(OptimKind::AdamW),
            "sgd" => Some(OptimKind::Sgd),
            _ => None,
        }
    }
}

/// Hyper-parameters of the optimizer (the learning rate comes per step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    var: Var,
    /// The low-precision copy the model computes with (bf16/fp16 training): its
    /// gradients are this slot's, and it is refreshed from `var` after each step.
    working: Option<Var>,
    decay: bool,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
}

/// An optimizer over named parameters.
pub struct Optimizer {
    kind: OptimKind,
    hyper: Hyper,
    step: u64,
    /// The learning rate of the last step.
    last_lr: f64,
    slots: Vec<Slot>,
}

impl std::fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("kind", &self.kind)
            .field("hyper", &self.hyper)
            .field("step", &self.step)
            .field("params", &self.slots.len())
            .finish()
    }
}

/// Gradients of the parameters, in the optimizer's parameter order.
pub type Grads = Vec<Option<Tensor>>;

impl Optimizer {
    /// An optimizer over `params` as (name, variable, whether weight decay applies).
    pub fn new(kind: OptimKind, hyper: Hyper, params: Vec<(String, Var, bool)>) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, var, decay)| Slot {
                name,
                var,
                working: None,
                decay,
                exp_avg: None,
                exp_avg_sq: None,
            })
            .collect();
        Optimizer {
            kind,
            hyper,
            step: 0,
            last_lr: 0.0,
            slots,
        }
    }

    /// Mixed precision: `working` are the variables the model computes with, one per
    /// parameter in order (same shapes, a 16-bit dtype). Gradients are taken of them
    /// and cast to the parameters' dtype (f32), and every step copies the updated
    /// parameters into them.
    pub fn with_working_copies(mut self, working: Vec<Var>) -> Result<Self> {
        if working.len() != self.slots.len() {
            return Err(Error::Params(format!(
                "{} working copies for {} parameters",
                working.len(),
                self.slots.len()
            )));
        }
        for (slot, w) in self.slots.iter_mut().zip(working) {
            if w.dims() != slot.var.dims() {
                return Err(Error::Params(format!(
                    "the working copy of {:?} has shape {:?}, the parameter {:?}",
                    slot.name,
                    w.dims(),
                    slot.var.dims()
                )));
            }
            slot.working = Some(w);
        }
        Ok(self)
    }

    /// Optimizer steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The parameters' variables, in order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// Gradients of `loss` for every parameter (None where a parameter got none), in
    /// the parameters' dtype (with working copies: theirs, cast).
    pub fn grads_of(&self, loss: &Tensor) -> Result<Grads> {
        let store = loss.backward()?;
        self.slots
            .iter()
            .map(|s| {
                let source = s.working.as_ref().unwrap_or(&s.var);
                store
                    .get(source.as_tensor())
                    .map(|g| g.to_dtype(s.var.dtype()))
                    .transpose()
                    .map_err(Error::from)
            })
            .collect()
    }

    /// Adds `more` into `acc` (gradient accumulation).
    pub fn accumulate(acc: &mut Grads, more: Grads) -> Result<()> {
        if acc.is_empty() {
            *acc = more;
            return Ok(());
        }
        for (a, m) in acc.iter_mut().zip(more) {
            *a = match (a.take(), m) {
                (Some(x), Some(y)) => Some((x + y)?),
                (x, y) => x.or(y),
            };
        }
        Ok(())
    }

    /// The global L2 norm of the gradients (as `torch.nn.utils.clip_grad_norm_`), the
    /// squares summed in f64 (CPU f32 gradients in a fixed blocked order, see
    /// `fused::sum_of_squares`; others as candle sums).
    pub fn grad_norm(grads: &Grads) -> Result<f64> {
        let mut total = 0f64;
        for g in grads.iter().flatten() {
            total += match fused::with_f32(g, fused::sum_of_squares) {
                Some(s) => s,
                None => g
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?,
            };
        }
        Ok(total.sqrt())
    }

    /// Scales gradients so their global norm is at most `max_norm`; returns the norm
    /// before clipping (what transformers logs as `grad_norm`).
    pub fn clip(grads: &mut Grads, max_norm: f64) -> Result<f64> {
        let norm = Self::grad_norm(grads)?;
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = g.affine(coef, 0.0)?;
            }
        }
        Ok(norm)
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(Error::Params(
                "gradient count differs from parameter count".into(),
            ));
        }
        self.step += 1;
        self.last_lr = lr;
        let h = self.hyper;
        let t = self.step as i32;
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let g = g.to_dtype(slot.var.dtype())?;
            let wd = if slot.decay { h.weight_decay } else { 0.0 };
            let p = slot.var.as_tensor().clone();
            match self.kind {
                OptimKind::Sgd => {
                    let g = if wd != 0.0 {
                        (&g + p.affine(wd, 0.0)?)?
                    } else {
                        g
                    };
                    slot.var.set(&(&p - g.affine(lr, 0.0)?)?)?;
                }
                OptimKind::AdamW if fused_adamw(slot, &g, h, lr, wd, t)? => {}
                OptimKind::AdamW => {
                    let (m, v) = (slot.exp_avg.as_ref(), slot.exp_avg_sq.as_ref());
                    let (p, m, v) = adamw_tensors(&p, &g, m, v, h, lr, wd, t)?;
                    slot.var.set(&p)?;
                    slot.exp_avg = Some(m);
                    slot.exp_avg_sq = Some(v);
                }
            }
            if let Some(w) = &slot.working {
                w.set(&slot.var.as_tensor().to_dtype(w.dtype())?)?;
            }
        }
        Ok(())
    }

    /// The state, by parameter name.
    pub fn state(&self) -> Result<OptimizerState> {
        self.state_source().take()
    }

    /// The state as it is now, to copy later ([`PendingState::take`]) while the caller
    /// does other work: the moments are shared, not copied, so no step may be taken
    /// until the copy is done (steps update them in place).
    pub fn state_source(&self) -> PendingState {
        let kind = match self.kind {
            OptimKind::AdamW => "adamw",
            OptimKind::Sgd => "sgd",
        };
        let h = self.hyper;
        let meta = json!({
            "step": self.step,
            "betas": [h.beta1, h.beta2],
            "eps": h.eps,
            "weight_decay": h.weight_decay,
            "no_decay": self.slots.iter().filter(|s| !s.decay).map(|s| s.name.clone()).collect::<Vec<_>>(),
            "params": self.slots.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
            // torch keeps the rate of the next step in its groups; kiln's optimizer knows
            // the last one (the trainer writes the next, from the schedule).
            "lr": self.last_lr,
        });
        let mut moments = Vec::new();
        for slot in &self.slots {
            for (name, t) in [("exp_avg", &slot.exp_avg), ("exp_avg_sq", &slot.exp_avg_sq)] {
                if let Some(t) = t {
                    moments.push((slot.name.clone(), name, t.clone()));
                }
            }
        }
        PendingState {
            kind,
            meta,
            moments,
        }
    }

    /// Restores a state saved by [`state`](Self::state); every parameter with state must
    /// exist here with the same shape.
    pub fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        let expected = match self.kind {
            OptimKind::AdamW => "adamw",
            OptimKind::Sgd => "sgd",
        };
        if state.kind != expected {
            return Err(Error::State(format!(
                "the checkpoint's optimizer is {:?} but this run uses {expected:?}",
                state.kind
            )));
        }
        self.step = state.meta["step"]
            .as_u64()
            .ok_or_else(|| Error::State("optimizer state has no step count".into()))?;
        for param in state.params() {
            if !self.slots.iter().any(|s| s.name == param) {
                return Err(Error::State(format!(
                    "the checkpoint's optimizer state has parameter {param:?}, which the model lacks"
                )));
            }
        }
        for slot in &mut self.slots {
            let device = slot.var.device().clone();
            let load = |name: &str| -> Result<Option<Tensor>> {
                state
                    .get(&slot.name, name)
                    .map(|v| -> Result<Tensor> {
                        let t = kiln_formats::candle::to_candle(v, &device)?;
                        if t.dims() != slot.var.dims() {
                            return Err(Error::State(format!(
                                "optimizer state {name} of {:?} has shape {:?}, the parameter {:?}",
                                slot.name,
                                t.dims(),
                                slot.var.dims()
                            )));
                        }
                        Ok(t)
                    })
                    .transpose()
            };
            slot.exp_avg = load("exp_avg")?;
            slot.exp_avg_sq = load("exp_avg_sq")?;
        }
        Ok(())
    }
}

/// An optimizer's state not yet copied ([`Optimizer::state_source`]): its scalars, and
/// its moments as the optimizer's own tensors.
#[derive(Debug)]
pub struct PendingState {
    kind: &'static str,
    /// Hyper-parameters and scalar state, as [`OptimizerState::meta`] will hold them
    /// (the caller may add to them before the copy).
    pub meta: serde_json::Value,
    moments: Vec<(String, &'static str, Tensor)>,
}

impl PendingState {
    /// Copies the moments to host memory: the state by parameter name.
    pub fn take(self) -> Result<OptimizerState> {
        let mut s = OptimizerState::new(self.kind).with_meta(self.meta);
        for (param, name, t) in &self.moments {
            s.insert(param.clone(), *name, kiln_formats::candle::from_candle(t)?)?;
        }
        Ok(s)
    }
}

/// One AdamW step in tensor operations (any device and dtype): the new parameter and
/// moments from parameter `p`, gradient `g` and the moments so far (none at first).
#[allow(clippy::too_many_arguments)]
fn adamw_tensors(
    p: &Tensor,
    g: &Tensor,
    m: Option<&Tensor>,
    v: Option<&Tensor>,
    h: Hyper,
    lr: f64,
    wd: f64,
    t: i32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let m = match m {
        Some(m) => (m.affine(h.beta1, 0.0)? + g.affine(1.0 - h.beta1, 0.0)?)?,
        None => g.affine(1.0 - h.beta1, 0.0)?,
    };
    let g2 = g.sqr()?;
    let v = match v {
        Some(v) => (v.affine(h.beta2, 0.0)? + g2.affine(1.0 - h.beta2, 0.0)?)?,
        None => g2.affine(1.0 - h.beta2, 0.0)?,
    };
    let bc1 = 1.0 - h.beta1.powi(t);
    let bc2 = 1.0 - h.beta2.powi(t);
    let step_size = lr / bc1;
    let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), h.eps)?;
    let decayed = if wd != 0.0 {
        p.affine(1.0 - lr * wd, 0.0)?
    } else {
        p.clone()
    };
    let update = (m.div(&denom)?).affine(step_size, 0.0)?;
    Ok(((decayed - update)?, m, v))
}

/// AdamW on `slot` in place, in one pass (CPU f32 parameters and gradients, see
/// [`fused`]); false, with nothing changed, where the tensors are anything else.
fn fused_adamw(slot: &mut Slot, g: &Tensor, h: Hyper, lr: f64, wd: f64, t: i32) -> Result<bool> {
    let p = slot.var.as_tensor().clone();
    let usable = |x: &Tensor| x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous();
    let moments = [&slot.exp_avg, &slot.exp_avg_sq];
    if !usable(&p)
        || !usable(g)
        || moments
            .iter()
            .any(|m| m.as_ref().is_some_and(|m| !usable(m)))
    {
        return Ok(false);
    }
    let first = slot.exp_avg.is_none() || slot.exp_avg_sq.is_none();
    let m = match (&slot.exp_avg, first) {
        (Some(m), false) => m.clone(),
        _ => p.zeros_like()?,
    };
    let v = match (&slot.exp_avg_sq, first) {
        (Some(v), false) => v.clone(),
        _ => p.zeros_like()?,
    };
    let bc1 = 1.0 - h.beta1.powi(t);
    let bc2 = 1.0 - h.beta2.powi(t);
    let k = fused::AdamW {
        beta1: h.beta1 as f32,
        one_minus_beta1: (1.0 - h.beta1) as f32,
        beta2: h.beta2 as f32,
        one_minus_beta2: (1.0 - h.beta2) as f32,
        inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
        eps: h.eps as f32,
        decay: (wd != 0.0).then_some((1.0 - lr * wd) as f32),
        step_size: (lr / bc1) as f32,
        first,
    };
    let done = fused::with_f32(g, |g| {
        fused::with_f32_mut(&m, |ms| {
            fused::with_f32_mut(&v, |vs| {
                fused::with_f32_mut(&p, |ps| k.apply(ps, g, ms, vs))
            })
        })
    });
    match done {
        Some(r) => r???,
        None => return Ok(false),
    }
    slot.exp_avg = Some(m);
    slot.exp_avg_sq = Some(v);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn hyper() -> Hyper {
        Hyper {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    #[test]
    fn adamw_matches_hand_computed_first_step() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(
            OptimKind::AdamW,
            hyper(),
            vec![("w".into(), var.clone(), true)],
        );
        let g = Tensor::new(&[0.5f32, -0.25], &Device::Cpu).unwrap();
        opt.step(&vec![Some(g)], 0.1).unwrap();
        // step 1: m̂ = g, v̂ = g², update = lr * g/(|g| + eps) ≈ lr * sign(g)
        let w = var.as_tensor().to_vec1::<f32>().unwrap();
        let want = [
            1.0 * (1.0 - 0.1 * 0.01) - 0.1,
            -2.0 * (1.0 - 0.1 * 0.01) + 0.1,
        ];
        for (a, b) in w.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{w:?}");
        }
    }

    #[test]
    fn fused_adamw_gives_the_bits_of_the_tensor_formulation() {
        use rand_core::{Rng as _, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut draw = |n: usize, scale: f32| -> Tensor {
            let v: Vec<f32> = (0..n)
                .map(|_| (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * scale)
                .collect();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        // Large enough for parallel blocks, with and without weight decay.
        let n = (1 << 17) + 13;
        let h = hyper();
        for decay in [true, false] {
            let init = draw(n, 2.0);
            let var = Var::from_tensor(&init).unwrap();
            let mut opt =
                Optimizer::new(OptimKind::AdamW, h, vec![("w".into(), var.clone(), decay)]);
            let (mut p, mut m, mut v) = (init, None, None);
            let wd = if decay { h.weight_decay } else { 0.0 };
            for t in 1..=4 {
                let g = draw(n, 1e-2 * t as f32);
                let lr = 1e-3 / t as f64;
                opt.step(&vec![Some(g.clone())], lr).unwrap();
                let (p2, m2, v2) =
                    adamw_tensors(&p, &g, m.as_ref(), v.as_ref(), h, lr, wd, t).unwrap();
                (p, m, v) = (p2, Some(m2), Some(v2));
                let bits = |t: &Tensor| -> Vec<u32> {
                    t.to_vec1::<f32>()
                        .unwrap()
                        .into_iter()
                        .map(f32::to_bits)
                        .collect()
                };
                assert!(bits(var.as_tensor()) == bits(&p), "step {t}, decay {decay}");
                assert!(bits(opt.slots[0].exp_avg.as_ref().unwrap()) == bits(m.as_ref().unwrap()));
                assert!(
                    bits(opt.slots[0].exp_avg_sq.as_ref().unwrap()) == bits(v.as_ref().unwrap())
                );
            }
        }
        let g = vec![Some(Tensor::new(&[3.0f32, -4.0], &Device::Cpu).unwrap())];
        assert_eq!(Optimizer::grad_norm(&g).unwrap(), 5.0);
    }

    #[test]
    fn state_round_trips_and_continues_identically() {
        let run = |restore: bool| {
            let var = Var::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
            let mut opt = Optimizer::new(
                OptimKind::AdamW,
                hyper(),
                vec![("w".into(), var.clone(), true)],
            );
            let g = |k: f32| vec![Some(Tensor::new(&[k, -k, 2.0 * k], &Device::Cpu).unwrap())];
            opt.step(&g(0.3), 0.01).unwrap();
            opt.step(&g(-0.1), 0.01).unwrap();
            if restore {
                let s = opt.state().unwrap();
                let mut fresh = Optimizer::new(
                    OptimKind::AdamW,
                    hyper(),
                    vec![("w".into(), var.clone(), true)],
                );
                fresh.load_state(&s).unwrap();
                opt = fresh;
            }
            opt.step(&g(0.7), 0.01).unwrap();
            var.as_tensor().to_vec1::<f32>().unwrap()
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn working_copies_give_f32_grads_and_follow_the_f32_masters() {
        let master = Var::new(&[1.0f32, -2.0, 0.1], &Device::Cpu).unwrap();
        let working = Var::from_tensor(&master.to_dtype(DType::BF16).unwrap()).unwrap();
        let mut opt = Optimizer::new(
            OptimKind::AdamW,
            hyper(),
            vec![("w".into(), master.clone(), true)],
        )
        .with_working_copies(vec![working.clone()])
        .unwrap();
        // loss = sum(w * x) in bf16: d/dw = x.
        let x = Tensor::new(&[0.5f32, -0.25, 4.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let loss = (working.as_tensor() * &x).unwrap().sum_all().unwrap();
        let grads = opt.grads_of(&loss).unwrap();
        let g = grads[0].as_ref().unwrap();
        assert_eq!(g.dtype(), DType::F32);
        assert_eq!(g.to_vec1::<f32>().unwrap(), [0.5, -0.25, 4.0]);
        opt.step(&grads, 1e-3).unwrap();
        let m = master.to_vec1::<f32>().unwrap();
        // Updates far below bf16's resolution at these magnitudes still reach the master.
        assert!(m[0] < 1.0 && m[0] > 0.998, "{m:?}");
        assert_eq!(master.dtype(), DType::F32);
        let w = working
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = master
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(w, want, "the working copy is the masters, rounded");
        assert!(
            Optimizer::new(OptimKind::Sgd, hyper(), vec![])
                .with_working_copies(vec![working])
                .is_err()
        );
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![
            Some(Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()),
            None,
        ];
        let norm = Optimizer::clip(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((Optimizer::grad_norm(&g).unwrap() - 1.0).abs() < 1e-5);
    }
}
