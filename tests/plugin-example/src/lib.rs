//! Plugins written outside kiln, the templates to copy for your own: a backend and an
//! architecture, both found by `kiln train` in any binary that links this crate.
//!
//! - [`backend`]: `null`, candle's CPU device under another name;
//! - [`architecture`]: `BagOfWordsForSequenceClassification`, a model of its own
//!   (mean of token embeddings, then a linear classifier) that `kiln train` trains on
//!   a classification dataset and `kiln predict` runs.
//!
//! The binary (`src/main.rs`) is kiln's whole command with both plugins linked:
//!
//! ```no_run
//! use kiln_plugin_example as _;
//! fn main() -> std::process::ExitCode {
//!     kiln_cli::main()
//! }
//! ```
#![deny(missing_docs)]

pub mod architecture;
pub mod backend;

pub use architecture::BagOfWords;
pub use backend::NullBackend;
