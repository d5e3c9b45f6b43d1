//! Every error a command can meet, printed as one line, and the exit status its cause
//! maps to.

/// An error of a `kiln` command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading, writing or comparing tensor files failed.
    #[error(transparent)]
    Formats(#[from] kiln_formats::Error),
    /// A model folder or checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] kiln_checkpoint::Error),
    /// Training, evaluation or resuming failed (boxed: the trainer's error is large).
    #[error(transparent)]
    Trainer(Box<kiln_trainer::Error>),
    /// Building or loading a model failed, or its architecture is not registered.
    #[error(transparent)]
    Models(#[from] kiln_models::Error),
    /// Making, loading or merging LoRA adapters failed.
    #[error(transparent)]
    Peft(#[from] kiln_peft::Error),
    /// Reading, tokenizing or batching the data failed.
    #[error(transparent)]
    Data(#[from] kiln_data::Error),
    /// The processes of a data-parallel run could not start or agree.
    #[error(transparent)]
    Dist(#[from] kiln_dist::Error),
    /// The device asked for cannot be had.
    #[error(transparent)]
    Backend(#[from] kiln_backend::Error),
    /// A run config that cannot work (what to change is in the message).
    #[error("{0}")]
    Config(String),
    /// Bad arguments that only the command itself can see.
    #[error("{0}")]
    Usage(String),
    /// A run that failed after training began, with where the model in memory went.
    #[error("{source} ({note})")]
    Interrupted {
        /// What stopped the run.
        source: Box<Error>,
        /// Where the emergency save put the model, or why it failed.
        note: String,
    },
}

impl From<kiln_trainer::Error> for Error {
    fn from(e: kiln_trainer::Error) -> Self {
        Error::Trainer(Box::new(e))
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The exit status of a command that failed with this error:
    ///
    /// - 2: a usage error (bad flags, a bad combination of arguments, a malformed
    ///   device string), as clap's own;
    /// - 3: the processes of a data-parallel run lost each other (a collective, the
    ///   rendezvous, MPI or NCCL failed; a launch this build cannot serve is 1);
    /// - 4: a checkpoint could not be resumed (a state file malformed or not fitting);
    /// - 128 + N: training stopped on signal N (143 SIGTERM, 130 SIGINT) after saving a
    ///   checkpoint;
    /// - 1: any other failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Formats(kiln_formats::Error::Argument(_)) => 2,
            Error::Backend(b) if b.is_usage() => 2,
            Error::Dist(e) => dist_exit(e),
            Error::Trainer(e) => trainer_exit(e),
            Error::Models(kiln_models::Error::Trainer(e)) => trainer_exit(e),
            Error::Interrupted { source, .. } => source.exit_code(),
            _ => 1,
        }
    }
}

/// The exit status of a trainer error: its distributed and resume causes apart.
fn trainer_exit(e: &kiln_trainer::Error) -> u8 {
    match e {
        kiln_trainer::Error::Dist(e) => dist_exit(e),
        kiln_trainer::Error::Resume { .. } => 4,
        // As a process killed by the signal: 143 for SIGTERM, 130 for SIGINT.
        kiln_trainer::Error::Stopped { signal, .. } => u8::try_from(128 + signal).unwrap_or(1),
        _ => 1,
    }
}

/// A launch this build cannot serve is the environment's fault (1); a failure between
/// running processes is 3.
fn dist_exit(e: &kiln_dist::Error) -> u8 {
    match e {
        kiln_dist::Error::Launch(_) => 1,
        _ => 3,
    }
}
