//! The crate's error type: what can go wrong between the processes of a run.

/// A failure of a collective, of the launch environment or of the connections.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed (flattening, moving to the host).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// The launcher's environment is invalid, or this build cannot serve that launcher
    /// (what to set or how to rebuild is in the message).
    #[error("{0}")]
    Launch(String),
    /// The TCP rendezvous: connecting, a deadline (`ddp_timeout`) passed, a rank closed
    /// its connections, a malformed message.
    #[error("{0}")]
    Rendezvous(String),
    /// The MPI library refused or cannot do what was asked.
    #[error("{0}")]
    Mpi(String),
    /// NCCL or the CUDA driver failed.
    #[error("{0}")]
    Nccl(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for kiln_checkpoint::Error {
    /// A collective failing under a checkpoint barrier is a coordination failure.
    fn from(e: Error) -> Self {
        kiln_checkpoint::Error::Coordination(e.to_string())
    }
}
