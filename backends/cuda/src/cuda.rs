//! The backend, compiled with the `cuda` feature.

use std::sync::OnceLock;

use candle_core::{DType, Device, Storage, Tensor};
use cudarc::driver::{PinnedHostSlice, result, sys};
use kiln_backend::{Availability, Backend, Capabilities, DeviceInfo, HostBuffer, HostMemory};

/// The CUDA backend (`cuda`, `cuda:N`).
#[derive(Debug, Clone, Copy)]
pub struct CudaBackend;

kiln_backend::register_backend!(CudaBackend);

/// What the probe found, once per process.
struct Probe {
    availability: Availability,
    devices: Vec<Gpu>,
}

struct Gpu {
    info: DeviceInfo,
    /// Compute capability (major, minor), where the driver said.
    compute: Option<(i32, i32)>,
}

fn probe() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(run_probe)
}

fn unavailable(reason: String) -> Probe {
    Probe {
        availability: Availability::Unavailable(reason),
        devices: Vec::new(),
    }
}

/// Looks for the driver library without asking cudarc, which panics when it is missing
/// (in its `dynamic-loading` mode; with candle's `dynamic-linking` the program would not
/// have started without it, and this check simply passes).
fn driver_library() -> Result<(), String> {
    let names: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else if cfg!(target_os = "macos") {
        &["libcuda.dylib"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };
    let mut last = String::new();
    for name in names {
        // SAFETY: loading the driver library runs its initialisers, as linking it does;
        // nothing from it is called here, and it is closed again on drop.
        match unsafe { libloading::Library::new(*name) } {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

fn run_probe() -> Probe {
    if let Err(e) = driver_library() {
        return unavailable(format!("no driver found ({})", first_line(&e)));
    }
    if let Err(e) = result::init() {
        return unavailable(format!("the driver did not initialise ({e})"));
    }
    let count = match result::device::get_count() {
        Ok(n) => usize::try_from(n).unwrap_or(0),
        Err(e) => return unavailable(format!("the driver cannot count devices ({e})")),
    };
    if count == 0 {
        return unavailable("no device found".into());
    }
    let mut devices = Vec::with_capacity(count);
    for ordinal in 0..count {
        let Ok(dev) = result::device::get(ordinal as i32) else {
            continue;
        };
        let name = result::device::get_name(dev).unwrap_or_else(|_| "CUDA device".into());
        // SAFETY: `dev` came from cuDeviceGet.
        let total = unsafe { result::device::total_mem(dev) }
            .ok()
            .map(|b| b as u64);
        let attr = |a| unsafe { result::device::get_attribute(dev, a) }.ok();
        let compute = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .zip(attr(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            ));
        let label = match compute {
            Some((major, minor)) => format!("{name} (compute capability {major}.{minor})"),
            None => name,
        };
        devices.push(Gpu {
            info: DeviceInfo::new(ordinal, label).with_memory(total, None),
            compute,
        });
    }
    if devices.is_empty() {
        return unavailable(format!(
            "the driver reports {count} devices but none can be opened"
        ));
    }
    Probe {
        availability: Availability::Available,
        devices,
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

fn msg(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuda: {e}"))
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn priority(&self) -> i32 {
        100
    }

    fn probe(&self) -> Availability {
        probe().availability.clone()
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        probe().devices.iter().map(|g| g.info.clone()).collect()
    }

    fn device(&self, ordinal: usize) -> candle_core::Result<Device> {
        // Never reach cudarc's context creation (which panics without libcuda) unless
        // the probe found the device.
        if let Availability::Unavailable(reason) = &probe().availability {
            return Err(msg(reason));
        }
        if ordinal >= probe().devices.len() {
            return Err(msg(format!("no device {ordinal}")));
        }
        Device::new_cuda(ordinal)
    }

    /// f32, f64, f16, and bf16 when every device has compute capability 8.0 or more
    /// (candle's bf16 kernels need it); pinned host memory; not promised deterministic.
    fn capabilities(&self) -> Capabilities {
        let bf16 = probe()
            .devices
            .iter()
            .all(|g| g.compute.is_none_or(|(major, _)| major >= 8));
        let dtypes: &[DType] = if bf16 {
            &[DType::F32, DType::F64, DType::F16, DType::BF16]
        } else {
            &[DType::F32, DType::F64, DType::F16]
        };
        Capabilities::new(dtypes).with_pinned_host_memory(true)
    }

    /// Page-locked memory from `cuMemHostAlloc` when `pinned` (plain, not write-combined:
    /// the checkpoint writer reads it back on the CPU), zeroed.
    fn alloc_host(
        &self,
        device: &Device,
        len: usize,
        pinned: bool,
    ) -> candle_core::Result<HostBuffer> {
        if !pinned || !device.is_cuda() || len == 0 {
            return Ok(HostBuffer::pageable(len));
        }
        let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
        // SAFETY: the memory is zeroed below before anything reads it.
        let mut slice = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0) }.map_err(msg)?;
        let ptr = slice.as_mut_ptr().map_err(msg)?;
        // SAFETY: `ptr` points to `len` bytes owned by `slice`, with no pending work.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(HostBuffer::new(Box::new(Pinned {
            _slice: slice,
            ptr,
            len,
        })))
    }

    /// Copies straight from device memory into `dst` (by DMA when `dst` is pinned), then
    /// waits for the copy.
    fn copy_to_host(&self, tensor: &Tensor, dst: &mut [u8]) -> candle_core::Result<()> {
        if !tensor.device().is_cuda() {
            return kiln_backend::copy_cpu_tensor(&tensor.to_device(&Device::Cpu)?, dst);
        }
        let t = tensor.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(msg("not a CUDA tensor"));
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| msg("tensor not contiguous"))?;
        let nbytes = (end - start) * t.dtype().size_in_bytes();
        if dst.len() != nbytes {
            return Err(msg(format!(
                "{} bytes of room for a {nbytes}-byte tensor",
                dst.len()
            )));
        }
        let stream = cs.device.cuda_stream();
        macro_rules! copy {
            ($t:ty) => {{
                let view = cs.as_cuda_slice::<$t>()?.slice(start..end);
                // SAFETY: every bit pattern is a valid u8, and `nbytes` bytes are exactly
                // the view's elements.
                let bytes = unsafe { view.transmute::<u8>(nbytes) }
                    .ok_or_else(|| msg("byte view out of bounds"))?;
                stream.memcpy_dtoh(&bytes, dst).map_err(msg)?;
            }};
        }
        match t.dtype() {
            DType::U8 => copy!(u8),
            DType::U32 => copy!(u32),
            DType::I16 => copy!(i16),
            DType::I32 => copy!(i32),
            DType::I64 => copy!(i64),
            DType::BF16 => copy!(half::bf16),
            DType::F16 => copy!(half::f16),
            DType::F32 => copy!(f32),
            DType::F64 => copy!(f64),
            other => return Err(msg(format!("dtype {other:?} is not supported"))),
        }
        // Into pinned memory the copy is asynchronous: wait before the bytes are read.
        stream.synchronize().map_err(msg)
    }
}

/// Page-locked host memory.
struct Pinned {
    /// Owns the allocation (freed on drop).
    _slice: PinnedHostSlice<u8>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: `ptr` points into `_slice`, which is Send and Sync; access goes through &self and
// &mut self, so Rust's aliasing rules hold.
unsafe impl Send for Pinned {}
// SAFETY: as above.
unsafe impl Sync for Pinned {}

impl HostMemory for Pinned {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised bytes that live as long as `_slice`;
        // copies into them are waited for before `copy_to_host` returns.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn is_pinned(&self) -> bool {
        true
    }
}
