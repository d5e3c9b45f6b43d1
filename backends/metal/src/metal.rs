//! The backend, compiled on macOS with the `metal` feature.

use std::sync::OnceLock;

use candle_core::{DType, Device};
use kiln_backend::{Availability, Backend, Capabilities, DeviceInfo};

/// The Metal backend (`metal`, `metal:N`).
#[derive(Debug, Clone, Copy)]
pub struct MetalBackend;

kiln_backend::register_backend!(MetalBackend);

/// The GPUs, listed once through Metal itself (`MTLCopyAllDevices`): candle's device
/// creation indexes that list without checking, so it must never see an ordinal past
/// the end.
fn gpus() -> &'static [DeviceInfo] {
    static GPUS: OnceLock<Vec<DeviceInfo>> = OnceLock::new();
    GPUS.get_or_init(|| {
        candle_metal_kernels::metal::Device::all()
            .iter()
            .enumerate()
            .map(|(ordinal, d)| {
                let working_set = u64::try_from(d.recommended_max_working_set_size()).ok();
                DeviceInfo::new(ordinal, format!("Apple GPU ({})", d.architecture_name()))
                    .with_memory(working_set, None)
            })
            .collect()
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
        if gpus().is_empty() {
            Availability::Unavailable("no Metal device found".into())
        } else {
            Availability::Available
        }
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        gpus().to_vec()
    }

    fn device(&self, ordinal: usize) -> candle_core::Result<Device> {
        if ordinal >= gpus().len() {
            candle_core::bail!("metal: no device {ordinal}");
        }
        Device::new_metal(ordinal)
    }

    /// Unified memory: host copies need no pinning. Memory figures are Metal's
    /// recommended working set size.
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(&[DType::F32, DType::F16, DType::BF16])
    }
}
