//! safetensors files. PLACEHOLDER: being written.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Error, Format, Result, TensorCollection, TensorInfo, TensorView};

/// A memory-mapped safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    tensors: Vec<TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Opens and validates a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Err(Error::Unsupported(format!(
            "{}: not yet",
            path.as_ref().display()
        )))
    }
}

impl TensorCollection for SafetensorsFile {
    fn format(&self) -> Option<Format> {
        Some(Format::Safetensors)
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

/// Writes `tensors` (and their metadata) as a safetensors file.
pub fn save(path: impl AsRef<Path>, tensors: &dyn TensorCollection) -> Result<()> {
    let _ = (path, tensors);
    Err(Error::Unsupported("not yet".into()))
}
