//! Learning-rate schedules, computed exactly as transformers' `get_scheduler` lambdas
//! (`optimization.py`): the learning rate of optimizer step `s` (0-based) is
//! `learning_rate * factor(s)`.
//!
//! A schedule has no state beyond the step, so a checkpoint stores the step (in
//! `scheduler.json`, with the schedule's parameters for checking) and resuming
//! recomputes the same numbers.

use std::f64::consts::PI;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// The schedules transformers offers (by their `lr_scheduler_type` names).
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// `linear`: warmup, then linear decay to 0.
    Linear,
    /// `cosine`: warmup, then cosine decay (`num_cycles`, default 0.5).
    Cosine {
        /// Number of cosine waves.
        num_cycles: f64,
    },
    /// `cosine_with_restarts`: warmup, then `num_cycles` hard restarts (default 1).
    CosineWithRestarts {
        /// Number of restarts.
        num_cycles: f64,
    },
    /// `polynomial`: warmup, then polynomial decay to `lr_end` (default 1e-7, power 1).
    Polynomial {
        /// Final learning rate.
        lr_end: f64,
        /// Decay power.
        power: f64,
    },
    /// `constant`.
    Constant,
    /// `constant_with_warmup`.
    ConstantWithWarmup,
    /// `inverse_sqrt`: warmup, then `1/sqrt((s + shift)/timescale)`.
    InverseSqrt {
        /// Defaults to the warmup steps, or 10 000 without warmup.
        timescale: Option<f64>,
    },
    /// `cosine_with_min_lr`: cosine decay to `min_lr_rate × lr` (kwargs `min_lr` or
    /// `min_lr_rate`, one of them required).
    CosineWithMinLr {
        /// Number of cosine waves.
        num_cycles: f64,
        /// Floor as a fraction of the initial learning rate.
        min_lr_rate: f64,
    },
    /// `warmup_stable_decay`: warmup, a constant phase, then a decay over
    /// `num_decay_steps` (required) of type `decay_type` (`cosine` default, `linear`,
    /// `1-sqrt`) to `min_lr_ratio`.
    WarmupStableDecay {
        /// Steps of the constant phase (default: what is left of the training steps).
        num_stable_steps: Option<u64>,
        /// Steps of the decay.
        num_decay_steps: u64,
        /// Shape of the warmup: `linear`, `cosine` or `1-sqrt`.
        warmup_type: String,
        /// Shape of the decay: `cosine`, `linear` or `1-sqrt`.
        decay_type: String,
        /// Floor as a fraction of the initial learning rate.
        min_lr_ratio: f64,
        /// Number of cosine waves of a cosine decay.
        num_cycles: f64,
    },
}

fn kw_f64(kw: &Map<String, Value>, key: &str, default: Option<f64>) -> Result<Option<f64>> {
    match kw.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| {
            Error::Schedule(format!(
                "lr_scheduler_kwargs.{key} must be a number, got {v}"
            ))
        }),
    }
}

fn kw_str(kw: &Map<String, Value>, key: &str, default: &str, allowed: &[&str]) -> Result<String> {
    let s = match kw.get(key) {
        None | Some(Value::Null) => default.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            return Err(Error::Schedule(format!(
                "lr_scheduler_kwargs.{key} must be a string, got {v}"
            )));
        }
    };
    if !allowed.contains(&s.as_str()) {
        return Err(Error::Schedule(format!(
            "lr_scheduler_kwargs.{key} = {s:?}; use one of {}",
            allowed.join(", ")
        )));
    }
    Ok(s)
}

impl Schedule {
    /// The names accepted for `lr_scheduler_type`.
    pub const NAMES: [&'static str; 9] = [
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
        "cosine_with_min_lr",
        "warmup_stable_decay",
    ];

    /// Builds the schedule `name` with transformers' `lr_scheduler_kwargs`; `lr` is the
    /// initial learning rate (some kwargs are relative to it). Unknown kwargs are an
    /// error, as they are for transformers' schedule functions.
    pub fn from_name(name: &str, kwargs: &Map<String, Value>, lr: f64) -> Result<Self> {
        let allowed: &[&str] = match name {
            "linear" | "constant" | "constant_with_warmup" => &[],
            "cosine" | "cosine_with_restarts" => &["num_cycles"],
            "polynomial" => &["lr_end", "power"],
            "inverse_sqrt" => &["timescale"],
            "cosine_with_min_lr" => &["num_cycles", "min_lr", "min_lr_rate"],
            "warmup_stable_decay" => &[
                "num_stable_steps",
                "num_decay_steps",
                "warmup_type",
                "decay_type",
                "min_lr_ratio",
                "num_cycles",
            ],
            other => {
                return Err(Error::Schedule(format!(
                    "lr_scheduler_type {other:?} is not supported; use one of {}",
                    Self::NAMES.join(", ")
                )));
            }
        };
        if let Some(k) = kwargs.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(Error::Schedule(format!(
                "lr_scheduler_kwargs.{k} is not a parameter of the {name} schedule"
            )));
        }
        let num_cycles = |d| kw_f64(kwargs, "num_cycles", Some(d)).map(|v| v.unwrap_or(d));
        Ok(match name {
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine {
                num_cycles: num_cycles(0.5)?,
            },
            "cosine_with_restarts" => Schedule::CosineWithRestarts {
                num_cycles: num_cycles(1.0)?,
            },
            "polynomial" => {
                let lr_end = kw_f64(kwargs, "lr_end", Some(1e-7))?.unwrap_or(1e-7);
                if lr_end >= lr {
                    return Err(Error::Schedule(format!(
                        "lr_scheduler_kwargs.lr_end ({lr_end}) must be smaller than learning_rate ({lr})"
                    )));
                }
                let power = kw_f64(kwargs, "power", Some(1.0))?.unwrap_or(1.0);
                Schedule::Polynomial { lr_end, power }
            }
            "constant" => Schedule::Constant,
            "constant_with_warmup" => Schedule::ConstantWithWarmup,
            "inverse_sqrt" => Schedule::InverseSqrt {
                timescale: kw_f64(kwargs, "timescale", None)?,
            },
            "cosine_with_min_lr" => {
                let min_lr = kw_f64(kwargs, "min_lr", None)?;
                let rate = kw_f64(kwargs, "min_lr_rate", None)?;
                let min_lr_rate = match (min_lr, rate) {
                    (Some(_), Some(_)) => {
                        return Err(Error::Schedule(
                            "lr_scheduler_kwargs: set only one of min_lr and min_lr_rate".into(),
                        ));
                    }
                    (Some(m), None) => m / lr,
                    (None, Some(r)) => r,
                    (None, None) => {
                        return Err(Error::Schedule(
                            "cosine_with_min_lr needs lr_scheduler_kwargs min_lr or min_lr_rate"
                                .into(),
                        ));
                    }
                };
                Schedule::CosineWithMinLr {
                    num_cycles: num_cycles(0.5)?,
                    min_lr_rate,
                }
            }
            _ => {
                let steps = |k: &str| -> Result<Option<u64>> {
                    match kw_f64(kwargs, k, None)? {
                        Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as u64)),
                        Some(x) => Err(Error::Schedule(format!(
                            "lr_scheduler_kwargs.{k} must be a whole number of steps, got {x}"
                        ))),
                        None => Ok(None),
                    }
                };
                let shapes = ["linear", "cosine", "1-sqrt"];
                Schedule::WarmupStableDecay {
                    num_stable_steps: steps("num_stable_steps")?,
                    num_decay_steps: steps("num_decay_steps")?.ok_or_else(|| {
                        Error::Schedule(
                            "warmup_stable_decay needs lr_scheduler_kwargs num_decay_steps".into(),
                        )
                    })?,
                    warmup_type: kw_str(kwargs, "warmup_type", "linear", &shapes)?,
                    decay_type: kw_str(kwargs, "decay_type", "cosine", &shapes)?,
                    min_lr_ratio: kw_f64(kwargs, "min_lr_ratio", Some(0.0))?.unwrap_or(0.0),
                    num_cycles: num_cycles(0.5)?,
                }
            }
        })
    }

    /// The factor for step `step` (0-based) of `total` steps with `warmup` warmup
    /// steps; the learning rate is `lr * factor`.
    pub fn factor(&self, step: u64, warmup: u64, total: u64, lr: f64) -> f64 {
        let s = step as f64;
        let w = warmup as f64;
        let t = total as f64;
        let warm = || s / w.max(1.0);
        let progress = || (s - w) / (t - w).max(1.0);
        match self {
            Schedule::Constant => 1.0,
            Schedule::ConstantWithWarmup => {
                if step < warmup {
                    warm()
                } else {
                    1.0
                }
            }
            Schedule::Linear => {
                if step < warmup {
                    warm()
                } else {
                    ((t - s) / (t - w).max(1.0)).max(0.0)
                }
            }
            Schedule::Cosine { num_cycles } => {
                if step < warmup {
                    warm()
                } else {
                    (0.5 * (1.0 + (PI * num_cycles * 2.0 * progress()).cos())).max(0.0)
                }
            }
            Schedule::CosineWithRestarts { num_cycles } => {
                if step < warmup {
                    return warm();
                }
                let p = progress();
                if p >= 1.0 {
                    return 0.0;
                }
                (0.5 * (1.0 + (PI * ((num_cycles * p) % 1.0)).cos())).max(0.0)
            }
            Schedule::Polynomial { lr_end, power } => {
                if step < warmup {
                    warm()
                } else if step > total {
                    lr_end / lr
                } else {
                    let pct_remaining = 1.0 - (s - w) / (t - w);
                    ((lr - lr_end) * pct_remaining.powf(*power) + lr_end) / lr
                }
            }
            Schedule::InverseSqrt { timescale } => {
                if step < warmup {
                    return warm();
                }
                let ts = timescale.unwrap_or(if warmup > 0 { w } else { 10_000.0 });
                let shift = ts - w;
                1.0 / ((s + shift) / ts).sqrt()
            }
            Schedule::CosineWithMinLr {
                num_cycles,
                min_lr_rate,
            } => {
                if step < warmup {
                    return warm();
                }
                let f = 0.5 * (1.0 + (PI * num_cycles * 2.0 * progress()).cos());
                (f * (1.0 - min_lr_rate) + min_lr_rate).max(0.0)
            }
            Schedule::WarmupStableDecay {
                num_stable_steps,
                num_decay_steps,
                warmup_type,
                decay_type,
                min_lr_ratio,
                num_cycles,
            } => {
                let stable = num_stable_steps.unwrap_or_else(|| {
                    total
                        .saturating_sub(warmup)
                        .saturating_sub(*num_decay_steps)
                });
                let shape = |kind: &str, p: f64, rising: bool| match (kind, rising) {
                    ("linear", true) => p,
                    ("linear", false) => 1.0 - p,
                    ("cosine", true) => 0.5 * (1.0 - (PI * p).cos()),
                    ("cosine", false) => 0.5 * (1.0 + (PI * num_cycles * 2.0 * p).cos()),
                    (_, true) => 1.0 - (1.0 - p).sqrt(),
                    (_, false) => 1.0 - p.sqrt(),
                };
                if step < warmup {
                    let f = shape(warmup_type, warm(), true);
                    return (f * (1.0 - min_lr_ratio) + min_lr_ratio).max(0.0);
                }
                if step < warmup + stable {
                    return 1.0;
                }
                if step < warmup + stable + num_decay_steps {
                    let p = (step - warmup - stable) as f64 / (*num_decay_steps as f64).max(1.0);
                    let f = shape(decay_type, p, false);
                    return (f * (1.0 - min_lr_ratio) + min_lr_ratio).max(0.0);
                }
                *min_lr_ratio
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kw(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn linear_matches_transformers_formula() {
        let s = Schedule::from_name("linear", &Map::new(), 5e-5).unwrap();
        // warmup 2, total 10: 0, .5, 1, 7/8, ..., 1/8
        let f: Vec<f64> = (0..10).map(|i| s.factor(i, 2, 10, 5e-5)).collect();
        assert_eq!(f[..3], [0.0, 0.5, 1.0]);
        assert_eq!(f[3], 7.0 / 8.0);
        assert_eq!(f[9], 1.0 / 8.0);
        assert_eq!(s.factor(10, 2, 10, 5e-5), 0.0);
    }

    #[test]
    fn kwargs_are_checked() {
        for (name, kwargs, want) in [
            ("linear", json!({"num_cycles": 2}), "not a parameter"),
            ("cosine_with_min_lr", json!({}), "min_lr"),
            (
                "cosine_with_min_lr",
                json!({"min_lr": 1e-6, "min_lr_rate": 0.1}),
                "only one",
            ),
            ("warmup_stable_decay", json!({}), "num_decay_steps"),
            (
                "warmup_stable_decay",
                json!({"num_decay_steps": 3, "decay_type": "x"}),
                "decay_type",
            ),
            ("polynomial", json!({"lr_end": 1.0}), "smaller"),
            ("cosine", json!({"num_cycles": "a"}), "number"),
            ("reduce_lr_on_plateau", json!({}), "not supported"),
        ] {
            let e = Schedule::from_name(name, &kw(kwargs), 1e-3)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{name}: {e}");
        }
    }
}
