//! The crate's error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong reading or writing tensor files.
///
/// Messages are one line and name what is wrong; [`Error::File`] adds the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error, with the path it happened on.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Another error, in the context of a file.
    #[error("{}: {source}", path.display())]
    File {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong in it.
        source: Box<Error>,
    },
    /// A malformed safetensors file.
    #[error("invalid safetensors: {0}")]
    Safetensors(String),
    /// A malformed zip archive.
    #[error("invalid zip archive: {0}")]
    Zip(String),
    /// A malformed pickle stream.
    #[error("invalid pickle: {0}")]
    Pickle(String),
    /// A pickle that asks for something the weights-only reader does not allow
    /// (a global outside the allowlist, such as `os.system`). Nothing was executed.
    #[error("refused: {0}")]
    Forbidden(String),
    /// A malformed GGUF file.
    #[error("invalid GGUF: {0}")]
    Gguf(String),
    /// A malformed shard index or sharded set.
    #[error("invalid shard index: {0}")]
    Index(String),
    /// A well-formed file of a kind or variant kiln does not read.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A tensor whose dtype, shape and byte length disagree, or any other bad tensor.
    #[error("invalid tensor: {0}")]
    Tensor(String),
    /// No tensor of that name.
    #[error("no tensor named {0:?}")]
    NotFound(String),
    /// A bad argument from the caller (for example a malformed size such as "5XB").
    #[error("{0}")]
    Argument(String),
    /// An error from candle while converting tensors.
    #[cfg(feature = "candle")]
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
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
}

/// Adds the path of a file to an error.
pub trait ResultExt<T> {
    /// Wraps the error with the file it happened in (unless it already names it).
    fn in_file(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn in_file(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| match e {
            e @ (Error::Io { .. } | Error::File { .. }) => e,
            e => Error::File {
                path: path.as_ref().to_path_buf(),
                source: Box::new(e),
            },
        })
    }
}

impl<T> ResultExt<T> for std::io::Result<T> {
    fn in_file(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
