//! Tensor file formats for kiln, independent of any tensor library.
//!
//! A file (or a sharded set, or a model folder) is opened as a [`TensorCollection`]:
//! named tensors in file order, each described by a [`TensorInfo`] (dtype and shape)
//! and read lazily as a [`TensorView`] (dtype, shape and little-endian row-major
//! bytes). Opening touches only the header; the bytes of a tensor are read when it is
//! asked for, zero-copy from a memory map where the layout allows it.
//!
//! ```no_run
//! # fn main() -> kiln_formats::Result<()> {
//! let model = kiln_formats::open("model.safetensors")?;
//! for info in model.tensors() {
//!     let t = model.tensor(&info.name)?;
//!     println!("{} {} {:?} {} bytes", info.name, t.dtype(), t.shape(), t.data().len());
//! }
//! # Ok(()) }
//! ```
//!
//! Formats:
//! - [`safetensors`]: memory-mapped reading with strict validation, streaming writes.
//! - [`torch`]: PyTorch zip checkpoints (`pytorch_model.bin`, `*.pt`) read through a
//!   weights-only pickle reader that never executes anything, and written so that
//!   `torch.load(weights_only=True)` loads them with and without `mmap`.
//! - [`gguf`]: llama.cpp's single-file format, read with every offset checked and
//!   written streaming (F32, F16, BF16, Q8_0).
//! - [`shard`]: Hugging Face sharding (`model-00001-of-00002.safetensors` plus an index).
//! - [`detect`]: telling formats apart by their bytes, not their names.
#![deny(missing_docs)]

mod atomic;
pub mod compare;
pub mod convert;
pub mod detect;
pub mod digest;
mod dtype;
mod error;
pub mod gguf;
pub mod pyjson;
pub mod safetensors;
pub mod shard;
mod tensor;
pub mod torch;

#[cfg(feature = "candle")]
pub mod candle;

pub use detect::{Format, open};
pub use dtype::DType;
pub use error::{Error, Result, ResultExt};
pub use tensor::{TensorCollection, TensorInfo, TensorMap, TensorView};
