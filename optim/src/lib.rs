//! kiln's optimizers and learning-rate schedules, usable with or without kiln's
//! `Trainer`: a candle user with a loop of their own steps [`Optimizer`] over named
//! `Var`s and saves its state by parameter name into a checkpoint
//! ([`Optimizer::state`] / [`Optimizer::load_state`], kiln-checkpoint's
//! `OptimizerState`), and takes the learning rate of every step from a [`Schedule`].
//!
//! - [`optimizer`]: AdamW as `torch.optim.AdamW`, SGD as `torch.optim.SGD`, gradient
//!   clipping and accumulation, bf16/fp16 working copies.
//! - [`schedule`]: transformers' `get_scheduler` schedules (`linear`, `cosine`, …).
//!
//! `optim/examples/candle_adamw.rs` trains a candle-nn model with [`Optimizer`] and a
//! schedule and resumes it bit for bit from kiln-checkpoint checkpoints.
#![deny(missing_docs)]

mod error;
mod fused;
pub mod optimizer;
pub mod schedule;

pub use error::{Error, Result};
pub use optimizer::{Grads, Hyper, OptimKind, Optimizer, PendingState};
pub use schedule::Schedule;
