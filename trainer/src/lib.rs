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
#![deny(missing_docs)]

mod error;
pub mod model;
#[cfg(feature = "models")]
pub mod models;
pub mod rng;
pub mod weights;

pub use error::{Error, Result, ShapeMismatch};
