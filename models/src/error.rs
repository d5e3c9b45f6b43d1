//! The crate's error type.

/// What can go wrong building, loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A model config that cannot work (a key of the wrong type, sizes that do not
    /// divide), or an architecture no crate registered.
    #[error("{0}")]
    Config(String),
    /// A tensor operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading the model folder's files failed.
    #[error(transparent)]
    Checkpoint(#[from] kiln_checkpoint::Error),
    /// Loading the folder into the model failed (missing weights, shapes); boxed, as
    /// the trainer's error is large.
    #[error(transparent)]
    Trainer(Box<kiln_trainer::Error>),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<kiln_trainer::Error> for Error {
    fn from(e: kiln_trainer::Error) -> Self {
        Error::Trainer(Box::new(e))
    }
}

impl From<Error> for kiln_trainer::Error {
    /// The trainer's own errors come back as they were; a model's config error stays a
    /// config error; the rest keep their source.
    fn from(e: Error) -> Self {
        match e {
            Error::Trainer(e) => *e,
            Error::Config(m) => kiln_trainer::Error::Config(m),
            Error::Candle(e) => kiln_trainer::Error::Candle(e),
            Error::Checkpoint(e) => kiln_trainer::Error::Checkpoint(e),
        }
    }
}
