//! The NCCL collective (cargo feature `nccl`, kiln-cli's `cuda`), through cudarc's NCCL
//! bindings, for torchrun-style launches.
//!
//! - Ranks, world size and the GPU (`cuda:<LOCAL_RANK>`) come from the launcher's
//!   variables ([`TorchrunEnv`]).
//! - NCCL's unique id is made on rank 0 and handed to the other ranks by kiln's own TCP
//!   rendezvous at `MASTER_ADDR:MASTER_PORT` ([`TcpGroup`]), which stays open.
//! - Gradients and weights (`all_reduce_sum`, `broadcast`) are reduced and broadcast by
//!   NCCL on the GPU, on the stream of the tensor's candle device: never through host
//!   memory.
//! - Host values (`all_reduce_f64`, `all_gather_bytes`) and checkpoint barriers go
//!   through the rendezvous connections, over two channels (training, checkpoint
//!   writer), every operation bounded by `ddp_timeout`: NCCL itself has no timeouts.
//! - A third channel carries aborts ([`AbortLine`]): a rank's fatal error
//!   ([`Collective::abort`]) or panic ends every rank, as `MPI_Abort` does.
//! - NCCL's own operations have no timeout, so each is waited for (its stream
//!   synchronised) under a [`Watchdog`]: one still unfinished after `ddp_timeout` (a
//!   rank died or hangs) prints which rank gave up on what and aborts every rank, as
//!   torch's NCCL watchdog does.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};
use cudarc::driver::CudaSlice;
use cudarc::nccl::result::NcclError;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::rendezvous::{AbortLine, TcpGroup, TorchrunEnv};
use super::watchdog::Watchdog;
use super::{Collective, Coordinator, Options};
use crate::{Error, Result};

/// cudarc's communicator, movable between threads.
struct SendComm(Comm);

// SAFETY: an NCCL communicator is a handle that any thread may use, one call at a time
// (NCCL serialises nothing itself); `NcclCollective` keeps it behind a mutex, so calls
// never overlap. cudarc leaves `Comm` !Send only because it holds a raw pointer.
unsafe impl Send for SendComm {}

/// The processes of a torchrun-style launch, one GPU each.
pub struct NcclCollective {
    env: TorchrunEnv,
    comm: Mutex<SendComm>,
    /// The device the communicator was made on.
    device: CudaDevice,
    /// Training thread: the NCCL id, `all_reduce_f64`, `all_gather_bytes`.
    train: TcpGroup,
    /// Checkpoint barriers (the background writer's thread).
    save: TcpGroup,
    /// Ends every rank when one aborts ([`Collective::abort`], a panic).
    abort_line: Arc<AbortLine>,
    /// Ends the run when an NCCL operation does not finish within `ddp_timeout`.
    watchdog: Watchdog,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.env.rank)
            .field("size", &self.env.world_size)
            .field("local_rank", &self.env.local_rank)
            .finish()
    }
}

fn nccl_error(what: &str, e: NcclError) -> Error {
    Error::Nccl(format!("nccl: {what}: {:?}", e.0))
}

fn cuda_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Nccl(format!("nccl: {what}: {e}"))
}

impl NcclCollective {
    /// Reads the launcher's variables, meets the other ranks at
    /// `MASTER_ADDR:MASTER_PORT` and creates the NCCL communicator on `cuda:<LOCAL_RANK>`.
    /// `timeout` bounds the rendezvous, every host-side operation and every barrier.
    /// With `options.abort_on_panic`, a panic on this rank ends every rank.
    pub fn init(options: &Options) -> Result<Self> {
        let timeout = options.timeout;
        let env = TorchrunEnv::from_env()?;
        let mut groups = TcpGroup::connect(&env, timeout, 3)?;
        let (Some(line), Some(save), Some(train)) = (groups.pop(), groups.pop(), groups.pop())
        else {
            return Err(Error::Nccl(
                "nccl: the rendezvous opened too few channels".into(),
            ));
        };
        // One rank's fatal error or panic ends every rank (as MPI_Abort), so that none
        // waits forever inside an NCCL call (which has no timeout), ncclCommInitRank
        // included: a rank that fails below tells the others before it returns.
        let abort_line = Arc::new(AbortLine::new(line));
        let me = env.rank;
        abort_line.watch(move |from, code| {
            eprintln!("kiln: rank {me}: rank {from} ended the run (exit status {code})");
            std::process::exit(code);
        })?;
        if options.abort_on_panic {
            let hook_line = abort_line.clone();
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                hook_line.abort(101);
                std::process::exit(101);
            }));
        }
        let dog_line = abort_line.clone();
        let (rank, world) = (env.rank, env.world_size);
        let watchdog = Watchdog::start(timeout, move |what, waited| {
            eprintln!(
                "kiln: rank {rank} of {world}: {what} did not finish within {} s (ddp_timeout; \
                 waited {:.1} s): another process died or hangs; ending every rank",
                timeout.as_secs(),
                waited.as_secs_f64()
            );
            dog_line.abort(1);
            std::process::exit(1);
        })
        .map_err(|e| Error::Nccl(format!("nccl: cannot start the watchdog thread: {e}")))?;
        match Self::communicator(&env, &train) {
            Ok((device, comm)) => Ok(NcclCollective {
                env,
                comm: Mutex::new(SendComm(comm)),
                device,
                train,
                save,
                abort_line,
                watchdog,
            }),
            Err(e) => {
                abort_line.abort(1);
                Err(e)
            }
        }
    }

    /// Opens `cuda:<LOCAL_RANK>`, hands NCCL's unique id from rank 0 to every rank over
    /// `train` and creates the communicator.
    fn communicator(env: &TorchrunEnv, train: &TcpGroup) -> Result<(CudaDevice, Comm)> {
        let device = match kiln_backend::resolve(&format!("cuda:{}", env.local_rank)) {
            Ok(Device::Cuda(d)) => d,
            Ok(other) => {
                return Err(Error::Nccl(format!(
                    "nccl: cuda:{} is a {other:?} device",
                    env.local_rank
                )));
            }
            Err(e) => {
                return Err(Error::Nccl(format!(
                    "nccl: rank {} needs cuda:{} (LOCAL_RANK): {e}",
                    env.rank, env.local_rank
                )));
            }
        };
        let id = if env.rank == 0 {
            let id = Id::new().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            train.broadcast_from_root(&bytes)?;
            id
        } else {
            let bytes = train.broadcast_from_root(&[])?;
            let internal: [std::ffi::c_char; 128] = bytes
                .iter()
                .map(|&b| b as std::ffi::c_char)
                .collect::<Vec<_>>()
                .try_into()
                .map_err(|_| {
                    Error::Nccl(format!(
                        "nccl: rank 0 sent a unique id of {} bytes, not 128",
                        bytes.len()
                    ))
                })?;
            Id::uninit(internal)
        };
        // ncclCommInitRank uses the calling thread's current device: make it ours.
        device
            .cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_error("binding cuda context", e))?;
        // World size and rank fit in i32 (checked by TorchrunEnv), so cudarc's casts hold.
        let comm = Comm::from_rank(device.cuda_stream(), env.rank, env.world_size, id)
            .map_err(|e| nccl_error("ncclCommInitRank", e))?;
        Ok((device, comm))
    }

    fn comm(&self) -> MutexGuard<'_, SendComm> {
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `t` as a contiguous 1-D f32 tensor on a CUDA device, and that device.
    fn prepare(&self, t: &Tensor, what: &str) -> Result<(Tensor, CudaDevice)> {
        let Device::Cuda(dev) = t.device() else {
            return Err(Error::Nccl(format!(
                "nccl: {what} of a tensor on {:?}: NCCL needs tensors on the GPU (device = \
                 \"cuda\")",
                t.device()
            )));
        };
        let dev = dev.clone();
        let ordinal = dev.cuda_stream().context().ordinal();
        if ordinal != self.env.local_rank {
            return Err(Error::Nccl(format!(
                "nccl: {what} of a tensor on cuda:{ordinal}, but this rank's GPU is cuda:{} \
                 (LOCAL_RANK)",
                self.env.local_rank
            )));
        }
        let t = t.flatten_all()?.to_dtype(DType::F32)?.contiguous()?;
        Ok((t, dev))
    }

    /// Runs `op(comm, input, output)` on a contiguous f32 copy of `t` into a new buffer
    /// of `t`'s device, and wraps the result as a tensor there.
    fn on_device(
        &self,
        t: &Tensor,
        what: &'static str,
        op: impl FnOnce(
            &Comm,
            &cudarc::driver::CudaView<'_, f32>,
            &mut CudaSlice<f32>,
        ) -> std::result::Result<(), NcclError>,
    ) -> Result<Tensor> {
        let (t, dev) = self.prepare(t, what)?;
        let n = t.elem_count();
        // The communicator enqueues on the stream it was made with: candle's per-thread
        // stream of the context, the one candle's kernels of the calling (training) thread
        // run on, so the collective is ordered after them and before what follows. A
        // tensor of a candle device with a stream of its own is made ready first; the
        // collective itself is always waited for (under the watchdog, below).
        let same = dev.same_device(&self.device)
            || dev.cuda_stream().cu_stream() == self.device.cuda_stream().cu_stream();
        let mut out = dev.alloc_zeros::<f32>(n)?;
        if !same {
            dev.synchronize()?;
        }
        {
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(cuda) = &*storage else {
                return Err(Error::Nccl(format!("nccl: {what}: not CUDA storage")));
            };
            let slice = cuda.as_cuda_slice::<f32>()?;
            let start = layout.start_offset();
            let view = slice.slice(start..start + n);
            let comm = self.comm();
            // NCCL launches on the current device of the calling thread.
            comm.0
                .context()
                .bind_to_thread()
                .map_err(|e| cuda_error(what, e))?;
            // Enqueued, then waited for under the watchdog: NCCL has no timeout of its
            // own, and a peer that never joins leaves the stream blocked forever.
            let _watched = self.watchdog.enter(what);
            op(&comm.0, &view, &mut out).map_err(|e| nccl_error(what, e))?;
            comm.0
                .stream()
                .synchronize()
                .map_err(|e| cuda_error(what, e))?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev));
        Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false))
    }
}

impl Coordinator for NcclCollective {
    fn rank(&self) -> usize {
        self.env.rank
    }
    fn world_size(&self) -> usize {
        self.env.world_size
    }
    fn local_rank(&self) -> usize {
        self.env.local_rank
    }
    /// A barrier over the rendezvous connections (checkpoint channel), which fails
    /// after `ddp_timeout` naming the rank that did not arrive.
    fn barrier(&self) -> kiln_checkpoint::Result<()> {
        self.save
            .barrier()
            .map_err(|e| kiln_checkpoint::Error::Coordination(e.to_string()))
    }
}

impl Collective for NcclCollective {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn local_world_size(&self) -> usize {
        self.env.local_world_size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.on_device(t, "an NCCL all-reduce", |comm, input, out| {
            comm.all_reduce(input, out, &ReduceOp::Sum).map(|_| ())
        })
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let root = i32::try_from(root)
            .ok()
            .filter(|&r| (r as usize) < self.env.world_size)
            .ok_or_else(|| Error::Nccl(format!("broadcast root {root} is not a rank")))?;
        self.on_device(t, "an NCCL broadcast", |comm, input, out| {
            comm.broadcast(Some(input), out, root).map(|_| ())
        })
    }

    /// Over the rendezvous connection (a few values per step).
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        self.train.all_reduce_f64(values)
    }

    /// Over the rendezvous connection (predictions, shard lists).
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.train.all_gather(mine)
    }

    /// Tells every other rank to end with `code` (through rank 0), then ends.
    fn abort(&self, code: i32) -> ! {
        self.abort_line.abort(code);
        std::process::exit(code)
    }
}
