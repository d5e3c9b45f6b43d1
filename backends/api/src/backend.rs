//! The trait a backend implements and the plain data it answers with.

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::host::{HostBuffer, copy_to_host_generic};

/// Whether a backend can be used in this process, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Usable: it has at least one device.
    Available,
    /// Compiled in but not usable here; the reason is one line, for people
    /// ("no driver found (libcuda.so.1: cannot open shared object file)").
    Unavailable(String),
}

impl Availability {
    /// `true` for [`Availability::Available`].
    pub fn is_available(&self) -> bool {
        matches!(self, Availability::Available)
    }

    /// The reason it is unavailable, if it is.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Availability::Available => None,
            Availability::Unavailable(r) => Some(r),
        }
    }
}

/// One device a backend offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// Its number: `cuda:1` has ordinal 1.
    pub ordinal: usize,
    /// What it is ("NVIDIA H100 80GB HBM3", "AMD EPYC 7B13").
    pub name: String,
    /// Memory in bytes, where the backend knows it.
    pub memory_total: Option<u64>,
    /// Free memory in bytes at the time of the query, where the backend knows it.
    pub memory_free: Option<u64>,
}

impl DeviceInfo {
    /// A device with no memory figures.
    pub fn new(ordinal: usize, name: impl Into<String>) -> Self {
        DeviceInfo {
            ordinal,
            name: name.into(),
            memory_total: None,
            memory_free: None,
        }
    }

    /// With total and free memory in bytes (either may be unknown).
    pub fn with_memory(mut self, total: Option<u64>, free: Option<u64>) -> Self {
        self.memory_total = total;
        self.memory_free = free;
        self
    }
}

/// What a backend's devices can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Floating-point dtypes its devices compute with (bf16 and f16 training needs them).
    pub dtypes: Vec<DType>,
    /// Whether [`Backend::alloc_host`] can give page-locked ("pinned") host memory, which
    /// device-to-host copies fill by DMA: what an asynchronous checkpoint snapshot wants.
    pub pinned_host_memory: bool,
    /// Repeated runs of the same computation on the same device give bit-identical
    /// results (the conformance suite checks it when this is set).
    pub deterministic: bool,
    /// Worker threads, for backends that compute on the CPU.
    pub threads: Option<usize>,
}

impl Capabilities {
    /// Computes with `dtypes`; no pinned memory, not deterministic, no thread count.
    pub fn new(dtypes: &[DType]) -> Self {
        Capabilities {
            dtypes: dtypes.to_vec(),
            pinned_host_memory: false,
            deterministic: false,
            threads: None,
        }
    }

    /// Sets [`Capabilities::pinned_host_memory`].
    pub fn with_pinned_host_memory(mut self, pinned: bool) -> Self {
        self.pinned_host_memory = pinned;
        self
    }

    /// Sets [`Capabilities::deterministic`].
    pub fn with_deterministic(mut self, deterministic: bool) -> Self {
        self.deterministic = deterministic;
        self
    }

    /// Sets [`Capabilities::threads`].
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// Whether the devices compute with `dtype`.
    pub fn supports(&self, dtype: DType) -> bool {
        self.dtypes.contains(&dtype)
    }
}

/// A device backend: a kind of hardware candle computes on.
///
/// Implementations register themselves with [`register_backend!`](crate::register_backend)
/// and are found through the registry ([`backends`](crate::backends),
/// [`select`](crate::select)). Every method must return, never panic, whatever the machine
/// lacks: check for drivers and libraries before touching them (candle's and cudarc's
/// CUDA context creation panics when libcuda is missing). The registry also catches
/// panics from backends, as a last defence, and reports them as unavailability or errors.
pub trait Backend: Sync {
    /// The name in device strings: lowercase ASCII letters, digits, `-` and `_`.
    fn name(&self) -> &'static str;

    /// Rank for `auto` (highest available wins; ties go to the name that sorts first).
    /// See the crate documentation for the convention.
    fn priority(&self) -> i32;

    /// Whether the backend can be used here. Cheap after its first call (cache what is
    /// slow), and never panics.
    fn probe(&self) -> Availability;

    /// The devices it offers (empty when unavailable), in ordinal order.
    fn devices(&self) -> Vec<DeviceInfo>;

    /// A candle device for `ordinal` (an index into [`Backend::devices`]).
    fn device(&self, ordinal: usize) -> candle_core::Result<Device>;

    /// What its devices can do.
    fn capabilities(&self) -> Capabilities;

    /// Waits until the work queued on `device` is done.
    fn synchronize(&self, device: &Device) -> candle_core::Result<()> {
        device.synchronize()
    }

    /// `len` bytes of host memory for copies off `device`, page-locked when `pinned` is
    /// asked and the backend has it ([`Capabilities::pinned_host_memory`]); ordinary
    /// memory otherwise (the default). [`HostBuffer::is_pinned`] says which was given.
    fn alloc_host(
        &self,
        device: &Device,
        len: usize,
        pinned: bool,
    ) -> candle_core::Result<HostBuffer> {
        let _ = (device, pinned);
        Ok(HostBuffer::pageable(len))
    }

    /// Copies `tensor`'s elements into `dst` as little-endian bytes in row-major order,
    /// as safetensors stores them; `dst.len()` must be the tensor's byte size. The
    /// default goes through candle's CPU copy; backends override it to copy straight
    /// into `dst` (a [`HostBuffer`] from [`Backend::alloc_host`], possibly pinned).
    fn copy_to_host(&self, tensor: &Tensor, dst: &mut [u8]) -> candle_core::Result<()> {
        copy_to_host_generic(tensor, dst)
    }
}

impl std::fmt::Debug for dyn Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name())
            .field("priority", &self.priority())
            .finish()
    }
}
