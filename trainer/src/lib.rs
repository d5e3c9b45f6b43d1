//! The kiln training loop and what it trains.
//!
//! - [`model`]: the [`Model`](model::Model) trait that the trainer drives and that third
//!   parties implement for their own models.
//! - [`rng`]: kiln's seeded, checkpointable random generator (candle's CPU generator
//!   cannot be seeded).
//! - [`weights`]: saving any [`Model`](model::Model) as a Hugging Face model folder and
//!   loading one into it.
//! - [`models`] (cargo feature `models`, on by default): BERT for sequence
//!   classification and GPT-2 with a language-model head, with transformers' parameter
//!   names and `config.json`, interchangeable with transformers.
//! - [`args`]: `TrainingArguments` with transformers' names, defaults and validation.
//! - [`schedule`]: learning-rate schedules as transformers computes them.
//! - [`optim`]: AdamW and SGD whose state is saved by parameter name.
//! - [`precision`]: bf16/fp16 mixed-precision training (f32 master weights, a 16-bit
//!   working copy, fp16's loss scaler).
//! - [`callback`]: `TrainerCallback`, the default flow, early stopping.
//! - [`trainer`]: the [`Trainer`](trainer::Trainer).
//! - [`tokenize`]: tokenizers loaded from or saved as transformers model folders, or
//!   trained on the training texts (BERT WordPiece, GPT-2 byte-level BPE).
//! - [`data`]: JSONL/CSV/text datasets, label mapping, block grouping, the seeded
//!   per-epoch shuffle, a resumable loader and the padding collator.
//! - [`run`]: whole runs from a TOML config, as `kiln train`, `kiln eval` and
//!   `kiln predict` drive them.
#![deny(missing_docs)]

// The CPU backend is always linked wherever the trainer is, so that device selection
// (`auto`, `cpu`) works for library users too; an unreferenced crate would not be
// linked and its registration would vanish.
use kiln_backend_cpu as _;

pub mod args;
pub mod callback;
pub mod data;
pub mod dist;
mod error;
pub mod model;
#[cfg(feature = "models")]
pub mod models;
pub mod optim;
pub mod precision;
pub mod rng;
#[cfg(feature = "models")]
pub mod run;
pub mod schedule;
pub mod tokenize;
pub mod trainer;
pub mod weights;

pub use error::{Error, Result, ShapeMismatch};

pub use args::TrainingArguments;
pub use trainer::{BatchSource, EvalPrediction, TrainOutput, Trainer};
