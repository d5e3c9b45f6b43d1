//! kiln's device backends: the [`Backend`] trait, the registry every backend crate joins
//! through [`inventory`], and device strings (`auto`, `cpu`, `cuda`, `cuda:1`, `metal`).
//!
//! A backend crate registers a `&'static dyn Backend` with [`register_backend!`]; the
//! registry lists what the program links ([`backends`]) and turns a device string into a
//! `candle_core::Device` ([`resolve`], or [`select`] to keep the backend too):
//!
//! ```
//! use kiln_backend::{Availability, Backend, Capabilities, DeviceInfo};
//! use candle_core::{DType, Device};
//!
//! struct Single;
//! impl Backend for Single {
//!     fn name(&self) -> &'static str { "single" }
//!     fn priority(&self) -> i32 { -10 }
//!     fn probe(&self) -> Availability { Availability::Available }
//!     fn devices(&self) -> Vec<DeviceInfo> { vec![DeviceInfo::new(0, "the CPU")] }
//!     fn device(&self, _ordinal: usize) -> candle_core::Result<Device> { Ok(Device::Cpu) }
//!     fn capabilities(&self) -> Capabilities { Capabilities::new(&[DType::F32]) }
//! }
//! kiln_backend::register_backend!(Single);
//!
//! let device = kiln_backend::resolve("single")?;
//! assert!(device.is_cpu());
//! let err = kiln_backend::resolve("single:3").unwrap_err();
//! assert_eq!(err.to_string(), "single:3: only 1 device");
//! # Ok::<(), kiln_backend::Error>(())
//! ```
//!
//! # The linking rule
//!
//! A registration lives in its crate's object code, and rustc does not link a crate that
//! is a dependency but is never referenced: a program must name every backend crate it
//! wants, e.g. `use kiln_backend_cpu as _;`, or the backend silently is not there.
//!
//! # Priorities
//!
//! `auto` picks the available backend with the highest [`Backend::priority`]. First-party
//! values: `cuda` 100, `metal` 90, `cpu` 0. An accelerator backend should sit above 0;
//! a backend that must never be picked by `auto` (a test or debugging backend) below 0.
#![deny(missing_docs)]

mod backend;
mod error;
mod host;
mod registry;
mod report;
mod spec;

pub use backend::{Availability, Backend, Capabilities, DeviceInfo};
pub use error::{Error, Result};
pub use host::{HostBuffer, HostMemory, HostSnapshot, SnapshotEntry, copy_cpu_tensor};
pub use registry::{
    FIRST_PARTY, FirstParty, Registration, Selected, backends, find, resolve, select,
};
pub use report::{BackendReport, CapabilitiesReport, missing_first_party, report, text};
pub use spec::DeviceSpec;

/// The registration crate, re-exported so that [`register_backend!`] works in crates that
/// do not depend on `inventory` themselves.
pub use inventory;

/// Registers a backend: `register_backend!(MyBackend)` where `MyBackend` is a constant
/// expression of a type implementing [`Backend`] (a unit struct, or a `static`'s name).
///
/// It expands to `inventory::submit!` of a [`Registration`]. Remember the linking rule: the
/// program must reference the crate that holds this line.
#[macro_export]
macro_rules! register_backend {
    ($backend:expr) => {
        $crate::inventory::submit! {
            $crate::Registration::new(&$backend)
        }
    };
}

/// The backend authors' guide (backends/README.md), compiled as a doctest so that its code
/// stays true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
