//! The crate's error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong saving or loading models and checkpoints.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error from the tensor file layer (carries its own path).
    #[error(transparent)]
    Format(#[from] kiln_formats::Error),
    /// An I/O error, with the path it happened on.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file that cannot be read or does not have the expected shape.
    #[error("{}: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A checkpoint or model folder that lacks something it must hold.
    #[error("{}: incomplete: {reason}", path.display())]
    Incomplete {
        /// The folder.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// A file whose content differs from the digest its checkpoint's manifest recorded
    /// when it was written (a flipped bit, a copy that kept the size but not the bytes).
    #[error("{}: corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// A tensor whose shape differs from what the model expects.
    #[error("tensor {name:?}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The file's shape.
        found: Vec<usize>,
    },
    /// Invalid input from the caller (a model without `model_type`, aliasing tensors
    /// that were not declared tied, …).
    #[error("{0}")]
    Invalid(String),
    /// A save that ran in the background failed.
    #[error("background save of {} failed: {source}", path.display())]
    Background {
        /// The checkpoint it was writing.
        path: PathBuf,
        /// Why.
        source: Box<Error>,
    },
    /// An output folder another live run holds ([`crate::lock`]).
    #[error("output_dir {} is in use by another kiln run ({}); wait for it to end or choose another output_dir", dir.display(), describe_holder(holder.as_ref()))]
    InUse {
        /// The folder.
        dir: PathBuf,
        /// Who holds it, when the lock file says.
        holder: Option<crate::lock::Holder>,
    },
    /// A multi-process coordination failure (a barrier timed out, a rank failed).
    #[error("coordination: {0}")]
    Coordination(String),
    /// A candle tensor that could not be copied to or from the host, converted or set
    /// (feature `candle`).
    #[cfg(feature = "candle")]
    #[error("tensor {name:?}: {source}")]
    Candle {
        /// The tensor (the `VarMap` variable's name).
        name: String,
        /// What failed (candle's errors come wrapped in [`kiln_formats::Error::Candle`]);
        /// boxed, so that the feature does not make every error of the crate larger.
        source: Box<kiln_formats::Error>,
    },
}

fn describe_holder(holder: Option<&crate::lock::Holder>) -> String {
    let Some(h) = holder else {
        return "its pid is not recorded yet".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "pid {} on host {}, started {} s ago",
        h.pid,
        h.host,
        now.saturating_sub(h.since)
    )
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A JSON error on `path`.
    pub fn json(path: impl AsRef<Path>, message: impl std::fmt::Display) -> Self {
        Error::Json {
            path: path.as_ref().to_path_buf(),
            message: message.to_string(),
        }
    }
}

/// Adds a path to I/O errors.
pub(crate) trait IoContext<T> {
    /// Wraps the error with the path it happened on.
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
