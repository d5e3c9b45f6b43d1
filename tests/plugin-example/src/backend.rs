//! The backend plugin: the template to copy for a backend of your own.
//!
//! It registers `null`: candle's CPU device under another name, priority -10 (below
//! `cpu`, so `auto` never picks it; it is picked only when asked for: `--device null`).
//! A real backend would create its own candle device (a custom `candle_core` backend,
//! a remote device, a CPU device with other settings) and probe for what it needs.
//!
//! What makes it a kiln backend:
//! 1. it implements [`kiln_backend::Backend`], whose methods never panic;
//! 2. it registers a `&'static` instance with [`kiln_backend::register_backend!`];
//! 3. the program that should see it references this crate (`use kiln_plugin_example as _;`,
//!    as `src/main.rs` here does): rustc drops unreferenced crates, registrations and all;
//! 4. `tests/conformance.rs` runs kiln's conformance suite on it.

use candle_core::{DType, Device};
use kiln_backend::{Availability, Backend, Capabilities, DeviceInfo};

/// The `null` backend.
#[derive(Debug, Clone, Copy)]
pub struct NullBackend;

kiln_backend::register_backend!(NullBackend);

impl Backend for NullBackend {
    fn name(&self) -> &'static str {
        "null"
    }

    fn priority(&self) -> i32 {
        -10
    }

    fn probe(&self) -> Availability {
        // A real backend checks for its driver or library here, without panicking,
        // and caches the answer.
        Availability::Available
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        vec![DeviceInfo::new(
            0,
            "candle's CPU device, under another name",
        )]
    }

    fn device(&self, ordinal: usize) -> candle_core::Result<Device> {
        match ordinal {
            0 => Ok(Device::Cpu),
            n => Err(candle_core::Error::Msg(format!("null: no device {n}"))),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(&[DType::F32, DType::F64]).with_deterministic(true)
    }
}
