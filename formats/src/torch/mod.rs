//! PyTorch zip checkpoints (`pytorch_model.bin`, `*.pt`, `*.pth`).
//!
//! PLACEHOLDER: being written (reader, weights-only pickle, writer).

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Error, Format, Result, TensorCollection, TensorInfo, TensorView};

/// A PyTorch zip checkpoint opened for reading.
#[derive(Debug)]
pub struct TorchFile {
    tensors: Vec<TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl TorchFile {
    /// Opens a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Err(Error::Unsupported(format!(
            "{}: not yet",
            path.as_ref().display()
        )))
    }
}

impl TensorCollection for TorchFile {
    fn format(&self) -> Option<Format> {
        Some(Format::PyTorch)
    }
    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        Err(Error::NotFound(name.into()))
    }
}

/// Writes `tensors` as a flat state dict that `torch.load(weights_only=True)` loads.
pub fn save(path: impl AsRef<Path>, tensors: &dyn TensorCollection) -> Result<()> {
    let _ = (path, tensors);
    Err(Error::Unsupported("not yet".into()))
}
