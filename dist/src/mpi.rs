//! The MPI collective (cargo feature `mpi`), through the `mpi` crate over the system's
//! MPI library (OpenMPI 4.1 is what kiln's CI runs).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use mpi::Threading;
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};

use super::watchdog::Watchdog;
use super::{Collective, Coordinator, Options};
use crate::{Error, Result};

/// The processes of an `mpirun` launch.
///
/// Two duplicates of `MPI_COMM_WORLD`: one for training (gradients, losses,
/// predictions) and one for checkpoint barriers, which the background writer calls
/// while training goes on; MPI is initialised with `MPI_THREAD_MULTIPLE` so that the
/// two threads may call it at once. An MPI library that offers less makes kiln save in
/// the foreground ([`Collective::background_barriers`]).
///
/// Each communicator sits behind a mutex, and when MPI granted less than
/// `MPI_THREAD_MULTIPLE` (`MPI_THREAD_SERIALIZED`) one more lock serialises every MPI
/// call of the process, so that no safe use from several threads breaks MPI's threading
/// contract. Below `MPI_THREAD_SERIALIZED`, [`MpiCollective::init`] refuses.
///
/// Every operation is bounded by `ddp_timeout`: checkpoint barriers fail with an error,
/// and a training collective (gradient all-reduce, broadcast, gather) still waiting
/// then makes a [`Watchdog`] print which rank gave up on what and `MPI_Abort` the run,
/// as torch's NCCL watchdog does.
pub struct MpiCollective {
    /// Ends the run when a training collective waits longer than `ddp_timeout`.
    watchdog: Watchdog,
    train: Mutex<SimpleCommunicator>,
    save: Mutex<SimpleCommunicator>,
    /// Held around every MPI call when MPI is not `MPI_THREAD_MULTIPLE`.
    serial: Option<Mutex<()>>,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    timeout: Duration,
    threads: bool,
    // Dropped last: finalises MPI after the communicators are freed.
    _universe: Universe,
}

// SAFETY: the communicators are handles into an MPI library initialised with at least
// MPI_THREAD_SERIALIZED (checked in `init`), under which any thread may call MPI as long
// as calls do not overlap: each communicator is used under its own mutex, and below
// MPI_THREAD_MULTIPLE every call also holds `serial`, so no two calls ever overlap.
unsafe impl Send for MpiCollective {}
// SAFETY: as for Send: every `&self` method reaches MPI only through the locks above.
unsafe impl Sync for MpiCollective {}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("local_rank", &self.local_rank)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn mpi_count(len: usize, what: &str) -> Result<i32> {
    i32::try_from(len).map_err(|_| {
        Error::Mpi(format!(
            "{what} of {len} elements is too large for one MPI call"
        ))
    })
}

impl MpiCollective {
    /// Initialises MPI (once per process). `options.timeout` bounds every operation;
    /// with `options.abort_on_panic` a panic on this rank ends every rank.
    pub fn init(options: &Options) -> Result<Self> {
        let timeout = options.timeout;
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| Error::Mpi("MPI is already initialised in this process".into()))?;
        if threading < Threading::Serialized {
            return Err(Error::Mpi(format!(
                "the MPI library offers only {threading:?} threading; kiln needs at least \
                 MPI_THREAD_SERIALIZED (OpenMPI: a build with thread support)"
            )));
        }
        let world = universe.world();
        let train = world.duplicate();
        let save = world.duplicate();
        let local = world.split_shared(world.rank());
        // A panic on any rank ends the whole run at once: unwinding would reach
        // MPI_Finalize, which waits for the other ranks, and they for this one.
        // kiln says so itself: OpenMPI's own MPI_ABORT notice is not always printed
        // (its show_help can be cut short while the job is torn down).
        let (me, of) = (world.rank(), world.size());
        if options.abort_on_panic {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                eprintln!(
                    "kiln: rank {me} of {of} panicked; ending every rank (MPI_Abort, status 101)"
                );
                SimpleCommunicator::world().abort(101);
            }));
        }
        let watchdog = Watchdog::start(timeout, move |what, waited| {
            eprintln!(
                "kiln: rank {me} of {of}: no answer from every rank in {what} within {} s \
                 (ddp_timeout; waited {:.1} s): another process died or hangs; ending every \
                 rank (MPI_Abort, status 1)",
                timeout.as_secs(),
                waited.as_secs_f64()
            );
            // MPI_COMM_WORLD from this thread: with MPI_THREAD_MULTIPLE any thread may
            // call MPI; with less, OpenMPI's abort still only kills the job.
            SimpleCommunicator::world().abort(1);
        })
        .map_err(|e| Error::Mpi(format!("mpi: cannot start the watchdog thread: {e}")))?;
        Ok(MpiCollective {
            watchdog,
            rank: world.rank() as usize,
            size: world.size() as usize,
            local_rank: local.rank() as usize,
            local_size: local.size() as usize,
            train: Mutex::new(train),
            save: Mutex::new(save),
            serial: (threading != Threading::Multiple).then(|| Mutex::new(())),
            timeout,
            threads: threading == Threading::Multiple,
            _universe: universe,
        })
    }

    /// The lock that serialises MPI calls below `MPI_THREAD_MULTIPLE` (nothing above).
    fn serialised(&self) -> Option<MutexGuard<'_, ()>> {
        // A panic while holding a lock leaves the communicator usable: MPI holds the state.
        self.serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The training communicator, for one call.
    fn train(
        &self,
    ) -> (
        MutexGuard<'_, SimpleCommunicator>,
        Option<MutexGuard<'_, ()>>,
    ) {
        let comm = self.train.lock().unwrap_or_else(|p| p.into_inner());
        (comm, self.serialised())
    }

    fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }
}

impl Coordinator for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// A non-blocking barrier polled until every rank arrived or `ddp_timeout` passed.
    fn barrier(&self) -> kiln_checkpoint::Result<()> {
        let start = Instant::now();
        let save = self.save.lock().unwrap_or_else(|p| p.into_inner());
        let mut request = {
            let _serial = self.serialised();
            save.immediate_barrier()
        };
        loop {
            let tested = {
                let _serial = self.serialised();
                request.test()
            };
            match tested {
                Ok(_) => return Ok(()),
                Err(pending) => request = pending,
            }
            if start.elapsed() >= self.timeout {
                // The barrier cannot be cancelled; MPI keeps its state until the process
                // ends, which the caller's error brings about (`abort`).
                std::mem::forget(request);
                return Err(kiln_checkpoint::Error::Coordination(format!(
                    "rank {} of {}: no answer from every rank at a checkpoint barrier within \
                     {} s (ddp_timeout): another process died or hangs",
                    self.rank,
                    self.size,
                    self.timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Collective for MpiCollective {
    fn name(&self) -> &'static str {
        "mpi"
    }

    fn local_world_size(&self) -> usize {
        self.local_size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let send = Self::host_f32(t)?;
        mpi_count(send.len(), "an all-reduce")?;
        let mut recv = vec![0f32; send.len()];
        let _watched = self.watchdog.enter("a gradient all-reduce");
        self.train()
            .0
            .all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        Ok(Tensor::from_vec(recv, send.len(), t.device())?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mut buf = Self::host_f32(t)?;
        mpi_count(buf.len(), "a broadcast")?;
        let root = i32::try_from(root)
            .ok()
            .filter(|&r| (r as usize) < self.size)
            .ok_or_else(|| Error::Mpi(format!("broadcast root {root} is not a rank")))?;
        let _watched = self.watchdog.enter("a broadcast");
        self.train()
            .0
            .process_at_rank(root)
            .broadcast_into(&mut buf[..]);
        let n = buf.len();
        Ok(Tensor::from_vec(buf, n, t.device())?)
    }

    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        mpi_count(values.len(), "an all-reduce")?;
        let send = values.to_vec();
        let _watched = self.watchdog.enter("an all-reduce of losses or metrics");
        self.train()
            .0
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let len = mpi_count(mine.len(), "a gather")?;
        let _watched = self.watchdog.enter("a gather");
        let (train, _serial) = self.train();
        let mut counts = vec![0i32; self.size];
        train.all_gather_into(&len, &mut counts[..]);
        let mut displs = Vec::with_capacity(self.size);
        let mut total: i64 = 0;
        for &c in &counts {
            displs.push(mpi_count(total as usize, "a gather")?);
            total += i64::from(c);
        }
        mpi_count(total as usize, "a gather")?;
        let mut all = vec![0u8; total as usize];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            train.all_gather_varcount_into(mine, &mut part);
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
            .collect())
    }

    fn background_barriers(&self) -> bool {
        self.threads
    }

    fn abort(&self, code: i32) -> ! {
        eprintln!(
            "kiln: rank {} of {} ending every rank (MPI_Abort, status {code})",
            self.rank, self.size
        );
        // MPI_COMM_WORLD, without the locks: another thread may hang inside a call.
        SimpleCommunicator::world().abort(code)
    }
}
