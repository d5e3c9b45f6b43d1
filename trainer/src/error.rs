//! The crate's error type.

use std::path::PathBuf;

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
    /// The processes of a data-parallel run failed to agree or to connect (a
    /// collective, the rendezvous, MPI or NCCL).
    #[error(transparent)]
    Dist(#[from] kiln_dist::Error),
    /// An optimizer or schedule refused its state or settings.
    #[error(transparent)]
    Optim(#[from] kiln_optim::Error),
    /// The device's backend is not available or cannot do what training asks.
    #[error(transparent)]
    Backend(#[from] kiln_backend::Error),
    /// A checkpoint cannot be resumed: a state file of it is malformed or does not fit
    /// this run (never a silent restart from the beginning).
    #[error("{}: {reason}", path.display())]
    Resume {
        /// The checkpoint folder or the file of it at fault.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model failed in a way of its own (a model crate's error, kept as the source).
    #[error(transparent)]
    Model(Box<dyn std::error::Error + Send + Sync>),
    /// A configuration that cannot work, with what to change.
    #[error("{0}")]
    Config(String),
    /// Bad data (file and line in the message).
    #[error("{0}")]
    Data(String),
    /// A model folder lacks weights the model needs (and cannot initialise afresh).
    #[error("{}: missing weights: {}", dir.display(), list_names(names))]
    MissingWeights {
        /// The model folder.
        dir: PathBuf,
        /// The parameters not found (under any name a loader accepts for them).
        names: Vec<String>,
    },
    /// A model folder holds a weight whose shape differs from the model's.
    #[error(
        "{}: weight {:?} has shape {:?} in the folder, the model expects {:?}{}",
        .0.dir.display(), .0.name, .0.found, .0.expected, .0.hint
    )]
    WeightShape(Box<ShapeMismatch>),
    /// The run stopped early on a signal ([`crate::stop`]), after saving a checkpoint
    /// where one step was taken.
    #[error("{}", stopped_message(*signal, *step, checkpoint.as_deref()))]
    Stopped {
        /// The signal's number (15 for SIGTERM, 2 for SIGINT).
        signal: i32,
        /// The last optimizer step taken.
        step: u64,
        /// The checkpoint written for it (none before the first step).
        checkpoint: Option<PathBuf>,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

fn stopped_message(signal: i32, step: u64, checkpoint: Option<&std::path::Path>) -> String {
    let name = crate::stop::signal_name(signal);
    match checkpoint {
        Some(c) => format!(
            "stopped by {name} after step {step}: saved {}; continue with --resume_from_checkpoint last",
            c.display()
        ),
        None => {
            format!("stopped by {name} before its first step (at step {step}); nothing new to save")
        }
    }
}

/// A weight whose shape in a model folder differs from the model's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// The model folder.
    pub dir: PathBuf,
    /// The weight's name in the folder.
    pub name: String,
    /// The model's shape.
    pub expected: Vec<usize>,
    /// The folder's shape.
    pub found: Vec<usize>,
    /// What probably differs (e.g. `num_labels`), with a leading separator, or "".
    pub hint: String,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `a, b, c` (the first 20, then how many more).
fn list_names(names: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut text = names
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" (and {} more)", names.len() - SHOWN));
    }
    text
}
