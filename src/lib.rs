//! kiln: train and checkpoint models outside Python, with files the Hugging Face
//! ecosystem reads and writes.
//!
//! This facade re-exports the workspace's crates so that one dependency gives the whole
//! toolkit; each crate can also be used on its own.
#![deny(missing_docs)]

pub use kiln_backend as backend;
pub use kiln_checkpoint as checkpoint;
pub use kiln_data as data;
pub use kiln_dist as dist;
pub use kiln_formats as formats;
pub use kiln_models as models;
pub use kiln_optim as optim;
pub use kiln_trainer as trainer;

/// The README's code, compiled as a doctest so that it stays true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
