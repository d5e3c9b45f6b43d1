//! The backend, compiled on macOS with the `metal` feature.

use std::sync::OnceLock;

use candle_core::{DType, Device};
use kiln_backend::{Availability, Backend, Capabilities, DeviceInfo};

/// The Metal backend (`metal`, `metal:N`).
#[derive(Debug, Clone, Copy)]
pub struct MetalBackend;

kiln_backend::register_backend!(MetalBackend);

/// The devices, found once: candle's Metal device creation returns an error (it does not
/// panic) when there is no GPU, so creating device 0, 1, … until one fails counts them.
fn probe() -> &'static Result<Vec<DeviceInfo>, String> {
    static PROBE: OnceLock<Result<Vec<DeviceInfo>, String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        let mut devices = Vec::new();
        let mut first_error = None;
        for ordinal in 0..16 {
            match Device::new_metal(ordinal) {
                Ok(_) => devices.push(DeviceInfo::new(ordinal, format!("Metal GPU {ordinal}"))),
                Err(e) => {
                    first_error = Some(e.to_string());
                    break;
                }
            }
        }
        if devices.is_empty() {
            let why = first_error.unwrap_or_default();
            let why = why.lines().next().unwrap_or("").trim().to_string();
            Err(format!("no Metal device found ({why})"))
        } else {
            Ok(devices)
        }
    })
}

impl Backend for MetalBackend {
    fn name(&self) -> &'static str {
        "metal"
    }

    fn priority(&self) -> i32 {
        90
    }

    fn probe(&self) -> Availability {
        match probe() {
            Ok(_) => Availability::Available,
            Err(reason) => Availability::Unavailable(reason.clone()),
        }
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        probe().as_ref().map(Clone::clone).unwrap_or_default()
    }

    fn device(&self, ordinal: usize) -> candle_core::Result<Device> {
        Device::new_metal(ordinal)
    }

    /// Unified memory: host copies need no pinning.
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(&[DType::F32, DType::F16, DType::BF16])
    }
}
