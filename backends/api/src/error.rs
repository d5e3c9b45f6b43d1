//! The crate's error type.

/// Why a device string could not be turned into a device. Every message is one line that
/// starts with the device string or backend name.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device string is malformed (a usage error).
    #[error(
        "{spec:?}: not a device string; expected auto, a backend name (cpu, cuda, metal, …) or name:N such as cuda:1"
    )]
    Parse {
        /// What was given.
        spec: String,
    },
    /// A first-party backend that this build does not contain.
    #[error("{name}: not compiled into this build; {hint}")]
    NotCompiled {
        /// The backend's name.
        name: String,
        /// How to get it ("rebuild with --features cuda").
        hint: String,
    },
    /// A name no backend of this build has, and no first-party backend either.
    #[error("{name}: unknown backend (this build has: {known})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The backends this build has, comma-separated.
        known: String,
    },
    /// Compiled in, but its probe says it cannot be used here.
    #[error("{name}: compiled in, {reason}")]
    Unavailable {
        /// The backend's name.
        name: String,
        /// The probe's reason.
        reason: String,
    },
    /// An ordinal past the devices the backend has.
    #[error("{spec}: only {count} device{}", if *.count == 1 { "" } else { "s" })]
    NoSuchDevice {
        /// The device string, normalised (`cuda:3`).
        spec: String,
        /// How many devices there are.
        count: usize,
    },
    /// `auto` found no available backend.
    #[error("auto: no backend is available ({reasons})")]
    NoneAvailable {
        /// Each backend's reason, `;`-separated.
        reasons: String,
    },
    /// The backend failed to create the device, or panicked doing so.
    #[error("{spec}: {message}")]
    Device {
        /// The device string, normalised (`cuda:0`).
        spec: String,
        /// candle's or the backend's message, on one line.
        message: String,
    },
}

impl Error {
    /// Whether the device string itself was wrong (a usage error, exit status 2 in the
    /// CLI), rather than the machine or build lacking what it names.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Parse { .. })
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// `message` on one line: lines joined with "; " (candle adds backtraces on new lines).
pub(crate) fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// candle's message on one line, without the backtrace candle appends when
/// `RUST_BACKTRACE` is set.
pub(crate) fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => one_line(&other.to_string()),
    }
}
