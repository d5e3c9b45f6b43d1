//! The crate's error type.

use std::path::PathBuf;

/// What can go wrong between a data file and a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting that cannot work (a column that is not there, a batch size of 0), with
    /// what to change.
    #[error("{0}")]
    Config(String),
    /// Bad data (file and line in the message).
    #[error("{0}")]
    Data(String),
    /// A chat template that does not parse or fails to render (one line, with the
    /// template's line where minijinja knows it).
    #[error("chat template: {0}")]
    Template(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The `tokenizers` library failed (building, training, encoding or (de)serializing a
    /// tokenizer).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Building a batch's tensors failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for kiln_trainer::Error {
    /// Data errors keep their kind (and message) as the trainer's: a batch source
    /// returns the trainer's error type.
    fn from(e: Error) -> Self {
        match e {
            Error::Config(m) => kiln_trainer::Error::Config(m),
            Error::Io { path, source } => kiln_trainer::Error::Io { path, source },
            Error::Candle(e) => kiln_trainer::Error::Candle(e),
            e @ (Error::Data(_) | Error::Tokenizer(_) | Error::Template(_)) => {
                kiln_trainer::Error::Data(e.to_string())
            }
        }
    }
}
