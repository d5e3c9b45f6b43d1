//! Host memory for snapshots of device tensors (an asynchronous checkpoint's only stall).

use std::ops::Range;

use candle_core::{DType, Device, Storage, Tensor};

use crate::backend::Backend;

/// Host memory a backend hands out: ordinary or page-locked. Backends with their own
/// allocator (CUDA's `cuMemHostAlloc`) implement it; `Vec<u8>` is the ordinary kind.
pub trait HostMemory: Send + Sync {
    /// The bytes.
    fn bytes(&self) -> &[u8];
    /// The bytes, writable.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Whether the memory is page-locked.
    fn is_pinned(&self) -> bool;
}

impl HostMemory for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
    fn is_pinned(&self) -> bool {
        false
    }
}

/// A block of host memory from [`Backend::alloc_host`]; it can be sent to a background
/// writer thread and reused for the next snapshot.
pub struct HostBuffer {
    memory: Box<dyn HostMemory>,
}

impl HostBuffer {
    /// `len` zeroed bytes of ordinary memory.
    pub fn pageable(len: usize) -> Self {
        HostBuffer::new(Box::new(vec![0u8; len]))
    }

    /// Wraps a backend's memory.
    pub fn new(memory: Box<dyn HostMemory>) -> Self {
        HostBuffer { memory }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        self.memory.bytes()
    }

    /// The bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.memory.bytes_mut()
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.memory.bytes().len()
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it is page-locked.
    pub fn is_pinned(&self) -> bool {
        self.memory.is_pinned()
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("len", &self.len())
            .field("pinned", &self.is_pinned())
            .finish()
    }
}

/// Where one tensor lies in a [`HostSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// The tensor's name.
    pub name: String,
    /// Its dtype.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its bytes in the buffer (little-endian, row-major).
    pub range: Range<usize>,
}

/// Named device tensors copied into one host buffer: what an asynchronous checkpoint
/// takes while training waits, then hands to its background writer.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use kiln_backend::Backend;
/// # struct Cpu;
/// # impl kiln_backend::Backend for Cpu {
/// #     fn name(&self) -> &'static str { "cpu" }
/// #     fn priority(&self) -> i32 { 0 }
/// #     fn probe(&self) -> kiln_backend::Availability { kiln_backend::Availability::Available }
/// #     fn devices(&self) -> Vec<kiln_backend::DeviceInfo> { vec![] }
/// #     fn device(&self, _: usize) -> candle_core::Result<Device> { Ok(Device::Cpu) }
/// #     fn capabilities(&self) -> kiln_backend::Capabilities { kiln_backend::Capabilities::new(&[]) }
/// # }
/// # let backend = Cpu;
/// let w = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
/// // Ask for pinned memory; backends without it give ordinary memory.
/// let pinned = backend.capabilities().pinned_host_memory;
/// let snap = kiln_backend::HostSnapshot::take(&backend, &Device::Cpu, [("w", &w)], pinned, None)?;
/// let (entry, bytes) = snap.iter().next().unwrap();
/// assert_eq!((entry.name.as_str(), bytes.len()), ("w", 16));
/// let buffer = snap.into_buffer(); // reuse it for the next snapshot
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug)]
pub struct HostSnapshot {
    buffer: HostBuffer,
    entries: Vec<SnapshotEntry>,
}

impl HostSnapshot {
    /// Copies `tensors` (all on `device`) into host memory from `backend`: pinned when
    /// `pinned` is asked and the backend has it. `reuse` is a buffer of an earlier
    /// snapshot: it is used when it has the same size and kind, which spares the
    /// (slow, for pinned memory) allocation.
    pub fn take<'t, S: Into<String>>(
        backend: &dyn Backend,
        device: &Device,
        tensors: impl IntoIterator<Item = (S, &'t Tensor)>,
        pinned: bool,
        reuse: Option<HostBuffer>,
    ) -> candle_core::Result<Self> {
        let tensors: Vec<(String, &Tensor)> =
            tensors.into_iter().map(|(n, t)| (n.into(), t)).collect();
        let mut entries = Vec::with_capacity(tensors.len());
        let mut end = 0usize;
        for (name, t) in &tensors {
            let len = t
                .elem_count()
                .checked_mul(t.dtype().size_in_bytes())
                .ok_or_else(|| candle_core::Error::Msg(format!("{name}: tensor too large")))?;
            let start = end;
            end = start
                .checked_add(len)
                .ok_or_else(|| candle_core::Error::Msg("snapshot too large".into()))?;
            entries.push(SnapshotEntry {
                name: name.clone(),
                dtype: t.dtype(),
                shape: t.dims().to_vec(),
                range: start..end,
            });
        }
        let wants_pinned = pinned && backend.capabilities().pinned_host_memory;
        let mut buffer = match reuse {
            Some(b) if b.len() == end && b.is_pinned() == wants_pinned => b,
            _ => backend.alloc_host(device, end, pinned)?,
        };
        if buffer.len() != end {
            return Err(candle_core::Error::Msg(format!(
                "{}: alloc_host gave {} bytes for {end}",
                backend.name(),
                buffer.len()
            )));
        }
        for ((_, t), e) in tensors.iter().zip(&entries) {
            backend.copy_to_host(t, &mut buffer.bytes_mut()[e.range.clone()])?;
        }
        Ok(HostSnapshot { buffer, entries })
    }

    /// The tensors and their bytes, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = (&SnapshotEntry, &[u8])> {
        let bytes = self.buffer.bytes();
        self.entries
            .iter()
            .map(move |e| (e, &bytes[e.range.clone()]))
    }

    /// Where each tensor lies.
    pub fn entries(&self) -> &[SnapshotEntry] {
        &self.entries
    }

    /// The whole buffer.
    pub fn buffer(&self) -> &HostBuffer {
        &self.buffer
    }

    /// The buffer, to reuse for the next snapshot.
    pub fn into_buffer(self) -> HostBuffer {
        self.buffer
    }
}

/// The default [`Backend::copy_to_host`]: through candle's CPU copy of the tensor.
pub(crate) fn copy_to_host_generic(tensor: &Tensor, dst: &mut [u8]) -> candle_core::Result<()> {
    let t = if tensor.device().is_cpu() {
        tensor.clone()
    } else {
        tensor.to_device(&Device::Cpu)?
    };
    copy_cpu_tensor(&t, dst)
}

/// Copies a tensor that lives on the CPU into `dst` as little-endian bytes.
pub fn copy_cpu_tensor(tensor: &Tensor, dst: &mut [u8]) -> candle_core::Result<()> {
    let nbytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
    if dst.len() != nbytes {
        return Err(candle_core::Error::Msg(format!(
            "copy to host: {} bytes of room for a {nbytes}-byte tensor",
            dst.len()
        )));
    }
    let t = tensor.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg(
            "copy to host: not a CPU tensor".into(),
        ));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("copy to host: tensor not contiguous".into()))?;
    fn le<T: candle_core::WithDType, const N: usize>(
        src: &[T],
        dst: &mut [u8],
        to_le: fn(T) -> [u8; N],
    ) {
        for (d, s) in dst.chunks_exact_mut(N).zip(src) {
            d.copy_from_slice(&to_le(*s));
        }
    }
    match t.dtype() {
        DType::U8 => dst.copy_from_slice(&cpu.as_slice::<u8>()?[start..end]),
        DType::U32 => le(&cpu.as_slice::<u32>()?[start..end], dst, u32::to_le_bytes),
        DType::I16 => le(&cpu.as_slice::<i16>()?[start..end], dst, i16::to_le_bytes),
        DType::I32 => le(&cpu.as_slice::<i32>()?[start..end], dst, i32::to_le_bytes),
        DType::I64 => le(&cpu.as_slice::<i64>()?[start..end], dst, i64::to_le_bytes),
        DType::BF16 => le(
            &cpu.as_slice::<half::bf16>()?[start..end],
            dst,
            half::bf16::to_le_bytes,
        ),
        DType::F16 => le(
            &cpu.as_slice::<half::f16>()?[start..end],
            dst,
            half::f16::to_le_bytes,
        ),
        DType::F32 => le(&cpu.as_slice::<f32>()?[start..end], dst, f32::to_le_bytes),
        DType::F64 => le(&cpu.as_slice::<f64>()?[start..end], dst, f64::to_le_bytes),
        other => {
            return Err(candle_core::Error::Msg(format!(
                "copy to host: dtype {other:?} is not supported"
            )));
        }
    }
    Ok(())
}
