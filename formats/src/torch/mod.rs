//! PyTorch zip checkpoints (`pytorch_model.bin`, `*.pt`, `*.pth`), read and written.
//!
//! Reading ([`TorchFile`]) maps the file, validates the zip container strictly
//! (stored entries inside the file, no overlaps, no `..` names), reads `data.pkl`
//! with a weights-only pickle reader ([`pickle`]) that refuses any global outside
//! torch's allowlist and executes nothing, and serves tensors zero-copy when they
//! are contiguous. Writing ([`save`], [`save_value`]) produces what `torch.save`
//! would, minus its optional entries, so that `torch.load(weights_only=True)` loads
//! the file with `mmap` on and off.
//!
//! ```no_run
//! use kiln_formats::torch::{self, TorchFile};
//! use kiln_formats::TensorCollection;
//! # fn main() -> kiln_formats::Result<()> {
//! let file = TorchFile::open("pytorch_model.bin")?;
//! for info in file.tensors() {
//!     let t = file.tensor(&info.name)?;
//!     println!("{} {} {:?}", info.name, t.dtype(), t.shape());
//! }
//! torch::save("copy.bin", &file)?; // one storage per tensor
//! file.save_state_dict("tied.bin")?; // storages shared as in the source
//! # Ok(()) }
//! ```

mod archive;
mod layout;
pub mod pickle;
mod reader;
mod writer;

pub use pickle::{StorageRef, TensorRef, Value};
pub use reader::TorchFile;
pub use writer::{StorageMap, StorageSource, save, save_value};

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
