//! The kiln training loop: what it needs from a model and from data, and the loop.
//!
//! - [`model`]: the [`Model`] trait that the trainer drives and that model
//!   crates (kiln-models, yours) implement, the [`Batch`] it consumes and
//!   the [`Task`] it trains for.
//! - [`data`]: [`BatchSource`], what data crates (kiln-data, yours) implement, and the
//!   seeded per-epoch order batches are drawn in.
//! - [`weights`]: saving any [`Model`] as a Hugging Face model folder and
//!   loading one into it.
//! - [`adapter`]: what a model offers adapter methods (kiln-peft's LoRA): dense layers
//!   that carry adapters, and frozen parameters.
//! - [`args`]: `TrainingArguments` with transformers' names, defaults and validation.
//! - [`parity`]: the rest of transformers' `TrainingArguments` fields, each accepted as
//!   changing nothing here or refused with what to do instead.
//! - `memory`: the memory metrics of `skip_memory_metrics = false`.
//! - [`precision`]: bf16/fp16 mixed-precision training (f32 master weights, a 16-bit
//!   working copy, fp16's loss scaler).
//! - [`recompute`]: activation checkpointing, layers recomputed in backward.
//! - [`report`]: `report_to = "tensorboard"`: TensorBoard event files.
//! - [`callback`]: `TrainerCallback`, the default flow, early stopping.
//! - [`smoothing`]: `label_smoothing_factor`'s loss, as transformers' `LabelSmoother`.
//! - [`rng`]: kiln's seeded, checkpointable random generator (candle's CPU generator
//!   cannot be seeded).
//! - [`stop`]: stopping early on a signal, with a checkpoint ([`stop::StopRequest`]).
//! - [`trainer`]: the [`Trainer`], one module per concern.
//!
//! Optimizers and schedules are kiln-optim's, collectives kiln-dist's; this crate knows
//! no architecture, no dataset format and no config file.
#![deny(missing_docs)]

// The CPU backend is always linked wherever the trainer is, so that device selection
// (`auto`, `cpu`) works for library users too; an unreferenced crate would not be
// linked and its registration would vanish.
use kiln_backend_cpu as _;

pub mod adapter;
pub mod args;
pub mod callback;
pub mod data;
mod error;
mod memory;
pub mod model;
pub mod parity;
pub mod precision;
pub mod recompute;
pub mod report;
pub mod rng;
pub mod smoothing;
pub mod stop;
pub mod trainer;
pub mod weights;

pub use error::{Error, Result, ShapeMismatch};

pub use args::TrainingArguments;
pub use data::{BatchSource, epoch_order};
pub use model::{Batch, Model, Output, Task};
pub use trainer::{EvalPrediction, TrainOutput, Trainer, accuracy};
