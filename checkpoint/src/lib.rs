//! Model folders and training checkpoints on disk, compatible with Hugging Face.
//!
//! - [`model`]: the equivalent of `save_pretrained` / `from_pretrained`: `config.json`,
//!   weights (single file or shards), tied weights, tokenizer files, stale-file cleanup.
//! - [`state`]: `trainer_state.json` in transformers' `TrainerState` schema, written
//!   byte-compatibly (sorted keys, indent 2, Python float text).
//! - [`optimizer`]: optimizer state stored by parameter name.
//! - [`torch_state`]: transformers' `optimizer.pt`, `scheduler.pt` and `scaler.pt`,
//!   written and read.
//! - [`training`]: a whole `checkpoint-<step>` folder: model, optimizer, scheduler, RNG,
//!   data position and trainer state.
//! - [`commit`]: the commit protocol (hidden temp folder, fsync, rename) and the
//!   [`Coordinator`](commit::Coordinator) hook for multi-process runs.
//! - [`scan`]: finding checkpoints, telling complete from incomplete, cleaning leftovers.
//! - [`lock`]: one run at a time in an output folder (an advisory `flock`).
//! - [`rotate`]: `save_total_limit` rotation that never deletes the best nor the newest.
//! - [`async_save`]: saving in the background with bounded in-flight saves.
//! - `candle` (cargo feature `candle`): a candle-nn `VarMap` as a model folder or a
//!   checkpoint's weights, and back.
#![deny(missing_docs)]

pub mod async_save;
#[cfg(feature = "candle")]
pub mod candle;
pub mod commit;
mod error;
pub mod lock;
pub mod model;
pub mod optimizer;
pub mod rotate;
pub mod scan;
pub mod state;
pub mod torch_state;
pub mod training;

pub use error::{Error, Result};
