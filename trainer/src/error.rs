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
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
