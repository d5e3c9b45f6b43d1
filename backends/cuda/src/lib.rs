//! kiln's CUDA backend: NVIDIA GPUs through candle's `cuda` feature.
//!
//! Compiled only with this crate's `cuda` feature (kiln-cli's `cuda` feature turns it on);
//! without it the crate is empty and registers nothing, so `cargo test --workspace` needs
//! no CUDA toolkit. With it, building needs `nvcc` (candle's kernels) and linking needs the
//! driver's `libcuda`: candle enables cudarc's `dynamic-linking`, so a `--features cuda`
//! program does not even start on a machine without the driver library. On a machine
//! with the library but no usable GPU, the backend registers, and its probe says why it
//! is unavailable instead of letting cudarc panic.
//!
//! The backend is named `cuda`, priority 100; devices `cuda:0`, `cuda:1`, …
#![deny(missing_docs)]

#[cfg(feature = "cuda")]
mod cuda;

#[cfg(feature = "cuda")]
pub use cuda::CudaBackend;
