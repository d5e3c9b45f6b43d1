//! The crate's error type.

/// What can go wrong in an optimizer or a schedule.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// Converting saved optimizer state to or from tensors failed.
    #[error(transparent)]
    Format(#[from] kiln_formats::Error),
    /// Building or reading a checkpoint's optimizer state failed.
    #[error(transparent)]
    Checkpoint(#[from] kiln_checkpoint::Error),
    /// Saved optimizer state does not fit this optimizer (kind, parameters, shapes).
    #[error("{0}")]
    State(String),
    /// Gradients or working copies that do not match the parameters.
    #[error("{0}")]
    Params(String),
    /// A schedule name or `lr_scheduler_kwargs` value that cannot work.
    #[error("{0}")]
    Schedule(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
