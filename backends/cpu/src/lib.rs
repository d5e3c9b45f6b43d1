//! kiln's CPU backend: candle's CPU device, always compiled in.
//!
//! Named `cpu`, priority 0 (every accelerator ranks above it, so `auto` falls back to
//! it). One device, `cpu:0`; its capabilities include the number of worker threads
//! candle computes with (`RAYON_NUM_THREADS`, or the machine's cores). Repeated runs on
//! one machine with one thread count give bit-identical results.
//!
//! A program links it with `use kiln_backend_cpu as _;` (see kiln-backend's linking rule).
#![deny(missing_docs)]

use candle_core::{DType, Device};
use kiln_backend::{Availability, Backend, Capabilities, DeviceInfo};

/// The CPU backend.
#[derive(Debug, Clone, Copy)]
pub struct CpuBackend;

kiln_backend::register_backend!(CpuBackend);

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn priority(&self) -> i32 {
        0
    }

    fn probe(&self) -> Availability {
        Availability::Available
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        let (total, free) = memory();
        vec![DeviceInfo::new(0, cpu_name()).with_memory(total, free)]
    }

    fn device(&self, ordinal: usize) -> candle_core::Result<Device> {
        if ordinal == 0 {
            Ok(Device::Cpu)
        } else {
            Err(candle_core::Error::Msg(format!("cpu: no device {ordinal}")))
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(&[DType::F32, DType::F64, DType::BF16, DType::F16])
            .with_deterministic(true)
            .with_threads(candle_core::utils::get_num_threads())
    }
}

/// The processor's model name, where the system says it (Linux: /proc/cpuinfo).
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("{} CPU", std::env::consts::ARCH))
}

/// Total and available memory in bytes, where the system says (Linux: /proc/meminfo).
fn memory() -> (Option<u64>, Option<u64>) {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return (None, None);
    };
    let field = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .and_then(|kb| kb.checked_mul(1024))
    };
    (field("MemTotal:"), field("MemAvailable:"))
}
