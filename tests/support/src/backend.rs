//! A backend that computes in f32 only (on the CPU), for tests of mixed-precision
//! refusals. A test binary that selects it by name registers it itself:
//!
//! ```ignore
//! kiln_backend::register_backend!(kiln_test_support::backend::F32Only);
//! ```

use candle_core::{DType, Device};
use kiln_backend::{Availability, Backend, Capabilities, DeviceInfo};

/// The `f32only` backend: the CPU, offering f32 only.
#[derive(Debug)]
pub struct F32Only;

impl Backend for F32Only {
    fn name(&self) -> &'static str {
        "f32only"
    }
    fn priority(&self) -> i32 {
        -20
    }
    fn probe(&self) -> Availability {
        Availability::Available
    }
    fn devices(&self) -> Vec<DeviceInfo> {
        vec![DeviceInfo::new(0, "the CPU, f32 only")]
    }
    fn device(&self, _: usize) -> candle_core::Result<Device> {
        Ok(Device::Cpu)
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(&[DType::F32])
    }
}
