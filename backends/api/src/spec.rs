//! Device strings: `auto`, `cpu`, `cuda`, `cuda:1`, `metal`, or any registered name.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A parsed device string.
///
/// ```
/// use kiln_backend::DeviceSpec;
/// assert_eq!("auto".parse::<DeviceSpec>()?, DeviceSpec::Auto);
/// assert_eq!("cuda:1".parse::<DeviceSpec>()?, DeviceSpec::Backend { name: "cuda".into(), ordinal: Some(1) });
/// assert_eq!(" CPU ".parse::<DeviceSpec>()?.to_string(), "cpu");
/// assert!("cuda:x".parse::<DeviceSpec>().is_err());
/// # Ok::<(), kiln_backend::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// The first device of the highest-priority available backend.
    Auto,
    /// A backend by name, and a device number (none: the first).
    Backend {
        /// The backend's name, lowercase.
        name: String,
        /// The device's ordinal, when given.
        ordinal: Option<usize>,
    },
}

impl DeviceSpec {
    /// Parses a device string: surrounding spaces are ignored and letters may be in
    /// either case.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        let bad = || Error::Parse {
            spec: spec.to_string(),
        };
        let s = spec.trim().to_ascii_lowercase();
        let (name, ordinal) = match s.split_once(':') {
            None => (s.as_str(), None),
            Some((name, n)) => {
                let digits = !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
                let ordinal = n.parse::<usize>().ok().filter(|_| digits).ok_or_else(bad)?;
                (name, Some(ordinal))
            }
        };
        if !is_backend_name(name) {
            return Err(bad());
        }
        match (name, ordinal) {
            ("auto", None) => Ok(DeviceSpec::Auto),
            ("auto", Some(_)) => Err(bad()),
            _ => Ok(DeviceSpec::Backend {
                name: name.to_string(),
                ordinal,
            }),
        }
    }
}

/// Whether `name` is a valid backend name: lowercase ASCII letters, digits, `-` and `_`,
/// starting with a letter.
pub(crate) fn is_backend_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        DeviceSpec::parse(s)
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Backend {
                name,
                ordinal: None,
            } => f.write_str(name),
            DeviceSpec::Backend {
                name,
                ordinal: Some(n),
            } => write!(f, "{name}:{n}"),
        }
    }
}
