//! The registry: every backend linked into the program, and device selection.

use std::panic::{AssertUnwindSafe, catch_unwind};

use candle_core::Device;

use crate::backend::{Availability, Backend, DeviceInfo};
use crate::error::{Error, Result, candle_message, one_line};
use crate::spec::DeviceSpec;

/// A backend's entry in the registry; create it with [`Registration::new`] inside
/// `inventory::submit!`, or let [`register_backend!`](crate::register_backend) do both.
#[derive(Debug)]
pub struct Registration {
    backend: &'static dyn Backend,
}

impl Registration {
    /// The entry for `backend` (a constant: `Registration::new(&MyBackend)`).
    pub const fn new(backend: &'static dyn Backend) -> Self {
        Registration { backend }
    }

    /// The registered backend.
    pub fn backend(&self) -> &'static dyn Backend {
        self.backend
    }
}

inventory::collect!(Registration);

/// A backend kiln itself ships, which a build may lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirstParty {
    /// Its name in device strings.
    pub name: &'static str,
    /// The kiln-cli cargo feature that compiles it in (none: always there).
    pub feature: Option<&'static str>,
    /// The target OS it needs, if any.
    pub target_os: Option<&'static str>,
}

/// kiln's own backends, so that a missing one is explained rather than called unknown.
pub const FIRST_PARTY: &[FirstParty] = &[
    FirstParty {
        name: "cpu",
        feature: None,
        target_os: None,
    },
    FirstParty {
        name: "cuda",
        feature: Some("cuda"),
        target_os: None,
    },
    FirstParty {
        name: "metal",
        feature: Some("metal"),
        target_os: Some("macos"),
    },
];

impl FirstParty {
    /// How to get it into a build, for an error message.
    pub fn hint(&self) -> String {
        let feature = match self.feature {
            Some(f) => format!("--features {f}"),
            // Only a program that forgets to link kiln-backend-cpu gets here.
            None => {
                return format!(
                    "link kiln-backend-{} (use kiln_backend_{} as _;)",
                    self.name, self.name
                );
            }
        };
        match self.target_os {
            Some(os) if os != std::env::consts::OS => {
                let os = if os == "macos" { "macOS" } else { os };
                format!("it needs {os}: rebuild there with {feature}")
            }
            _ => format!("rebuild with {feature}"),
        }
    }
}

/// Every backend linked into this program: priority descending, then name.
pub fn backends() -> Vec<&'static dyn Backend> {
    let mut all: Vec<&'static dyn Backend> = inventory::iter::<Registration>
        .into_iter()
        .map(Registration::backend)
        .collect();
    all.sort_by(|a, b| {
        b.priority()
            .cmp(&a.priority())
            .then_with(|| a.name().cmp(b.name()))
    });
    all
}

/// The backend named `name` (the first in [`backends`] order if several share it).
pub fn find(name: &str) -> Option<&'static dyn Backend> {
    backends().into_iter().find(|b| b.name() == name)
}

/// A device picked from a device string, with the backend that made it.
#[derive(Clone)]
pub struct Selected {
    /// The backend (for its capabilities, host memory and synchronisation).
    pub backend: &'static dyn Backend,
    /// The device's ordinal in the backend.
    pub ordinal: usize,
    /// What the backend says about the device.
    pub info: DeviceInfo,
    /// The candle device.
    pub device: Device,
}

impl Selected {
    /// The normalised device string (`cuda:0`).
    pub fn spec(&self) -> String {
        format!("{}:{}", self.backend.name(), self.ordinal)
    }
}

impl std::fmt::Debug for Selected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selected")
            .field("backend", &self.backend.name())
            .field("ordinal", &self.ordinal)
            .field("info", &self.info)
            .field("device", &self.device)
            .finish()
    }
}

/// The candle device for a device string (`auto`, `cpu`, `cuda`, `cuda:1`, `metal`, or
/// any registered backend's name), or an error that says why not in one line.
pub fn resolve(spec: &str) -> Result<Device> {
    select(spec).map(|s| s.device)
}

/// Like [`resolve`], keeping the backend and the device's description.
///
/// `auto` is the first device of the highest-priority available backend; when that
/// backend fails to create the device, the error is returned (a broken GPU is not
/// silently replaced by the CPU).
pub fn select(spec: &str) -> Result<Selected> {
    match DeviceSpec::parse(spec)? {
        DeviceSpec::Auto => {
            let all = backends();
            let mut reasons = Vec::new();
            for b in &all {
                match probe(*b) {
                    Availability::Available => return open(*b, 0, false),
                    Availability::Unavailable(r) => reasons.push(format!("{}: {r}", b.name())),
                }
            }
            if all.is_empty() {
                reasons.push("no backend is linked into this program".into());
            }
            Err(Error::NoneAvailable {
                reasons: reasons.join("; "),
            })
        }
        DeviceSpec::Backend { name, ordinal } => {
            let Some(b) = find(&name) else {
                return Err(missing(&name));
            };
            if let Availability::Unavailable(reason) = probe(b) {
                return Err(Error::Unavailable { name, reason });
            }
            open(b, ordinal.unwrap_or(0), ordinal.is_some())
        }
    }
}

/// The error for a name no linked backend has.
fn missing(name: &str) -> Error {
    match FIRST_PARTY.iter().find(|f| f.name == name) {
        Some(f) => Error::NotCompiled {
            name: name.to_string(),
            hint: f.hint(),
        },
        None => {
            let names: Vec<_> = backends().iter().map(|b| b.name()).collect();
            Error::Unknown {
                name: name.to_string(),
                known: if names.is_empty() {
                    "no backends".into()
                } else {
                    names.join(", ")
                },
            }
        }
    }
}

/// Device `ordinal` of an available backend.
fn open(b: &'static dyn Backend, ordinal: usize, explicit: bool) -> Result<Selected> {
    let spec = if explicit {
        format!("{}:{ordinal}", b.name())
    } else {
        b.name().to_string()
    };
    let devices = devices(b).map_err(|message| Error::Device {
        spec: spec.clone(),
        message,
    })?;
    let Some(info) = devices.into_iter().nth(ordinal) else {
        let count = devices_len(b);
        return Err(if count == 0 {
            Error::Unavailable {
                name: b.name().to_string(),
                reason: "no device found".into(),
            }
        } else {
            Error::NoSuchDevice { spec, count }
        });
    };
    let device = guarded(|| b.device(ordinal))
        .and_then(|r| r.map_err(|e| candle_message(&e)))
        .map_err(|message| Error::Device {
            spec: spec.clone(),
            message,
        })?;
    Ok(Selected {
        backend: b,
        ordinal,
        info,
        device,
    })
}

fn devices_len(b: &dyn Backend) -> usize {
    devices(b).map(|d| d.len()).unwrap_or(0)
}

/// The backend's probe; a panic becomes unavailability.
pub(crate) fn probe(b: &dyn Backend) -> Availability {
    guarded(|| b.probe()).unwrap_or_else(Availability::Unavailable)
}

/// The backend's devices; a panic becomes the error message.
pub(crate) fn devices(b: &dyn Backend) -> std::result::Result<Vec<DeviceInfo>, String> {
    guarded(|| b.devices())
}

/// Runs backend code, turning a panic into its message (the default panic hook still
/// prints it: a backend that panics is a bug to report, this only keeps kiln running).
fn guarded<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        format!("the backend panicked: {}", one_line(&msg))
    })
}
