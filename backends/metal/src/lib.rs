//! kiln's Metal backend: Apple GPUs through candle's `metal` feature.
//!
//! Compiled only on macOS with this crate's `metal` feature (kiln-cli's `metal` feature
//! turns it on); elsewhere, or without the feature, the crate is empty and registers
//! nothing, and the registry explains that Metal needs macOS.
//!
//! Named `metal`, priority 90; devices `metal:0`, …
#![deny(missing_docs)]

#[cfg(all(target_os = "macos", feature = "metal"))]
mod metal;

#[cfg(all(target_os = "macos", feature = "metal"))]
pub use metal::MetalBackend;
