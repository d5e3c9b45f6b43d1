//! Hugging Face sharding. PLACEHOLDER: being written.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Error, Format, Result, TensorCollection, TensorInfo, TensorView};

/// A sharded set opened through its index.
#[derive(Debug)]
pub struct ShardedSet {
    tensors: Vec<TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl ShardedSet {
    /// Opens an index.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Err(Error::Unsupported(format!(
            "{}: not yet",
            path.as_ref().display()
        )))
    }
}

impl TensorCollection for ShardedSet {
    fn format(&self) -> Option<Format> {
        None
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
