//! The crate's error type.

/// Everything that can go wrong while training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing tensor files failed.
    #[error(transparent)]
    Format(#[from] kiln_formats::Error),
    /// Saving or loading a checkpoint or model folder failed.
    #[error(transparent)]
    Checkpoint(#[from] kiln_checkpoint::Error),
    /// A configuration that cannot work, with what to change.
    #[error("{0}")]
    Config(String),
    /// Bad data (file and line in the message).
    #[error("{0}")]
    Data(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The `tokenizers` library failed (building, training, encoding or (de)serializing a
    /// tokenizer).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
