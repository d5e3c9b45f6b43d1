//! The kiln training loop and what it trains.
//!
//! - [`model`]: the [`Model`](model::Model) trait that the trainer drives and that third
//!   parties implement for their own models.
//! - [`rng`]: kiln's seeded, checkpointable random generator (candle's CPU generator
//!   cannot be seeded).
#![deny(missing_docs)]

mod error;
pub mod model;
pub mod rng;

pub use error::{Error, Result};
