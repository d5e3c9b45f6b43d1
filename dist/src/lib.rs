//! Data-parallel training over an existing distributed engine: the collective
//! operations kiln's `Trainer` needs, behind one trait, [`Collective`]; it implements
//! kiln-checkpoint's [`Coordinator`] so that checkpoint commits meet at its barriers.
//!
//! | implementation | when | started by |
//! |---|---|---|
//! | [`SingleProcess`] | the default | `kiln train …` |
//! | `MpiCollective` (cargo feature `mpi`) | CPUs, clusters | `mpirun -np N kiln train …` |
//! | `NcclCollective` (cargo feature `nccl`, kiln-cli's `cuda`) | CUDA GPUs, one per process | `torchrun --nproc_per_node N $(which kiln) train …` |
//!
//! [`from_env`] picks the implementation from the launcher's environment: OpenMPI's
//! `OMPI_COMM_WORLD_SIZE` (or the PMI/PMIx variables other MPI launchers set) selects
//! MPI; torchrun's `WORLD_SIZE`/`RANK` selects NCCL (a build without the `nccl` feature
//! refuses it with a one-line reason). Without any of them the run is one process.
//!
//! # torchrun + NCCL
//!
//! torchrun only sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR` and `MASTER_PORT` and starts the processes, so
//! `torchrun --nproc_per_node N $(which kiln) train …` works (`--nnodes`, `--node_rank`
//! and `--master_addr` for several hosts), as does any launcher that sets these
//! variables (all six are required; a missing or invalid one is a one-line error).
//! Each process uses the GPU `cuda:<LOCAL_RANK>` (`device = "cuda"` or `"auto"`).
//!
//! - kiln meets the other processes through a [`rendezvous`] of its own (TCP, rank 0
//!   listening on `MASTER_PORT`; no torch, no c10d store): it hands NCCL's unique id
//!   from rank 0 to every rank, and stays open for the host-side operations.
//! - Gradient buckets and weight broadcasts are all-reduced/broadcast by NCCL on the
//!   GPU, never through host memory.
//! - Losses, evaluation predictions and checkpoint barriers go through the rendezvous
//!   connections, two channels (training, checkpoint writer) so that saves run in the
//!   background; each operation fails after `ddp_timeout` seconds naming the rank that
//!   did not answer, and a rank that died is noticed at once (its connections close).
//!   NCCL's own operations have no timeout: each is waited for under a
//!   [`watchdog::Watchdog`] that aborts the run after `ddp_timeout`; a rank's fatal
//!   error or panic ends every rank through a third channel ([`AbortLine`]), as
//!   `MPI_Abort` does.
//!
//! # Semantics (as transformers with accelerate)
//!
//! - The same initial weights on every rank: rank 0's are broadcast before training.
//! - Every rank takes a disjoint part of each global batch: one seeded shuffle, equal
//!   on every rank, padded to a multiple of the world size by repeating its start, and
//!   rank `r` takes positions `r, r + world, …` (torch's `DistributedSampler`), then
//!   batches of `per_device_train_batch_size` ([`shard_indices`]).
//! - Gradients are summed over ranks in buckets of `ddp_bucket_cap_mb` (flattened, one
//!   collective per bucket, not per tensor) and divided by the world size, after local
//!   accumulation and before clipping, so every rank steps with the same gradients.
//! - Logged losses are averaged over ranks; evaluation runs on a disjoint part of the
//!   evaluation data on every rank and the predictions are gathered back into their
//!   order, so metrics are those of the whole set, equal on every rank.
//! - Only rank 0 writes model files and `trainer_state.json`; every rank writes its
//!   `rng_state_<rank>.json` (and, with `zero_stage = 1`, its optimizer shard); the
//!   checkpoint commit meets at [`Coordinator::barrier`], which fails after
//!   `ddp_timeout` seconds instead of hanging.
//! - A training collective that waits longer than `ddp_timeout` (another rank died or
//!   hangs) ends the run with a line naming the rank and the operation: MPI's and
//!   NCCL's operations through a [`watchdog::Watchdog`] beside the blocking call or the
//!   stream's synchronisation, the rendezvous operations of the NCCL run by their own
//!   deadlines.
//!
//! # Threads
//!
//! The background checkpoint writer calls [`Coordinator::barrier`] while the training
//! thread all-reduces gradients. Implementations keep the two apart (MPI: two
//! communicators, concurrent when MPI granted `MPI_THREAD_MULTIPLE`); one that cannot
//! says so with [`Collective::background_barriers`], and the trainer then saves in the
//! foreground. Every collective is `Sync` in safe code: below `MPI_THREAD_MULTIPLE`
//! (MPI granted `MPI_THREAD_SERIALIZED`) a lock serialises every MPI call, and a
//! library that grants less is refused.
//!
//! # Side effects
//!
//! None by default: no panic hook, no exit. [`Options::with_abort_on_panic`] installs the
//! hook that ends every rank when one panics (the `kiln` command turns it on); a fatal
//! error reaches the caller, which ends the run with [`Collective::abort`].
#![deny(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;
pub use kiln_checkpoint::commit::{Coordinator, SingleProcess};

mod error;

pub use error::{Error, Result};

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "mpi")]
pub use self::mpi::MpiCollective;
#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
pub use self::nccl::NcclCollective;
pub mod rendezvous;
pub mod watchdog;
pub use self::rendezvous::{AbortLine, TcpGroup, TorchrunEnv};

/// The collective operations of data-parallel training, for one process of a run.
///
/// Every method is collective: all ranks call it, in the same order, with buffers of
/// the same length (where it has one).
pub trait Collective: Coordinator {
    /// The implementation's name (`single`, `mpi`).
    fn name(&self) -> &'static str;

    /// Processes on this node.
    fn local_world_size(&self) -> usize {
        1
    }

    /// The element-wise sum of `t` over all ranks (`t` is 1-D f32; the result is on
    /// `t`'s device).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// Rank `root`'s `t` (1-D f32, the same length everywhere) on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;

    /// Sums `values` element-wise over all ranks, in place.
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()>;

    /// Every rank's bytes, by rank (lengths may differ).
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Whether [`Coordinator::barrier`] may run on another thread while the training
    /// thread uses the other operations (background checkpoint saves).
    fn background_barriers(&self) -> bool {
        true
    }

    /// Ends every process of the run after a fatal error on this one (MPI: `MPI_Abort`),
    /// so that no rank waits forever for it. A single process just exits.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

impl Collective for SingleProcess {
    fn name(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_reduce_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
}

/// The checkpoint writers of a run as `save_on_each_node` wants them: the main process
/// of every node (local rank 0) writes and commits, as transformers' `should_save`
/// does, for nodes that do not share a file system. Barriers and ranks are the run's.
/// On one node this is the run itself (local rank 0 is rank 0).
#[derive(Clone)]
pub struct EachNode(pub Arc<dyn Collective>);

impl std::fmt::Debug for EachNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EachNode")
            .field("rank", &self.0.rank())
            .field("local_rank", &self.0.local_rank())
            .finish()
    }
}

impl Coordinator for EachNode {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn local_rank(&self) -> usize {
        self.0.local_rank()
    }
    fn barrier(&self) -> kiln_checkpoint::Result<()> {
        self.0.barrier()
    }
    fn is_main(&self) -> bool {
        self.0.local_rank() == 0
    }
}

/// What the environment says about how this process was launched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// No launcher: a single process.
    Single,
    /// An MPI launcher (`mpirun`, `srun --mpi`, …), with the variable that told.
    Mpi(String),
    /// torchrun-style variables (`RANK`, `WORLD_SIZE`, …).
    Torchrun,
}

/// Reads how this process was started from the environment (without initialising
/// anything).
pub fn launch_from_env() -> Launch {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    for var in ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"] {
        if set(var) {
            return Launch::Mpi(var.to_string());
        }
    }
    if set("WORLD_SIZE") && set("RANK") {
        return Launch::Torchrun;
    }
    Launch::Single
}

/// How a collective of several processes behaves.
///
/// Process-wide effects are the program's choice: a library that calls [`from_env`]
/// with [`Options::new`] installs no panic hook. What every multi-process collective
/// does regardless, because a hung or dead rank leaves nothing else to do, is end the
/// run (`MPI_Abort`, or exit after telling the other ranks) when an operation that
/// cannot be cancelled waits longer than `timeout`, or when another rank aborts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    /// Bounds every collective and barrier (transformers' `ddp_timeout`).
    pub timeout: Duration,
    /// Whether a panic on this rank ends every rank at once (a panic hook that calls
    /// `MPI_Abort`, or tells the other ranks and exits with status 101). Off by default;
    /// the `kiln` command turns it on, since unwinding into `MPI_Finalize` would wait
    /// for the other ranks, and they for this one, forever.
    pub abort_on_panic: bool,
}

impl Options {
    /// Operations bounded by `timeout`; no panic hook.
    pub fn new(timeout: Duration) -> Self {
        Options {
            timeout,
            abort_on_panic: false,
        }
    }

    /// Sets [`Options::abort_on_panic`].
    pub fn with_abort_on_panic(mut self, on: bool) -> Self {
        self.abort_on_panic = on;
        self
    }
}

/// The collective of this process, from the launcher's environment ([`launch_from_env`]):
/// MPI under an MPI launcher (feature `mpi`), NCCL under torchrun (feature `nccl`), else
/// a single process. A launcher this build cannot serve is a one-line error.
pub fn from_env(options: &Options) -> Result<Arc<dyn Collective>> {
    match launch_from_env() {
        Launch::Single => Ok(Arc::new(SingleProcess)),
        Launch::Mpi(var) => mpi_collective(&var, options),
        Launch::Torchrun => nccl_collective(options),
    }
}

#[cfg(feature = "nccl")]
fn nccl_collective(options: &Options) -> Result<Arc<dyn Collective>> {
    Ok(Arc::new(NcclCollective::init(options)?))
}

#[cfg(not(feature = "nccl"))]
fn nccl_collective(_options: &Options) -> Result<Arc<dyn Collective>> {
    Err(Error::Launch(
        "launched by torchrun (RANK/WORLD_SIZE are set), but this kiln was built without \
         NCCL; rebuild with `cargo build --release -p kiln-cli --features cuda`, or start it \
         with `mpirun -np N kiln train …` (--features mpi)"
            .into(),
    ))
}

#[cfg(feature = "mpi")]
fn mpi_collective(_var: &str, options: &Options) -> Result<Arc<dyn Collective>> {
    Ok(Arc::new(MpiCollective::init(options)?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_collective(var: &str, _options: &Options) -> Result<Arc<dyn Collective>> {
    let size = std::env::var(var).unwrap_or_default();
    Err(Error::Launch(format!(
        "launched by an MPI launcher ({var}={size}) but this kiln was built without MPI; \
         rebuild with `cargo build --release -p kiln-cli --features mpi`"
    )))
}

/// The example indices rank `rank` of `world` trains on in one epoch, from the epoch's
/// shuffled `order` (equal on every rank): torch's `DistributedSampler` without
/// `drop_last`: `order` padded by repeating its start to a multiple of `world`, then
/// every `world`-th position from `rank`.
pub fn shard_indices(order: &[usize], rank: usize, world: usize) -> Vec<usize> {
    if world <= 1 || order.is_empty() {
        return order.to_vec();
    }
    let total = order.len().div_ceil(world) * world;
    (rank..total)
        .step_by(world)
        .map(|i| order[i % order.len()])
        .collect()
}

/// The evaluation examples of rank `rank`: positions `rank, rank + world, …` of
/// `0..n` without padding (the gathered predictions are put back in order, so no
/// example is counted twice).
pub fn eval_indices(n: usize, rank: usize, world: usize) -> Vec<usize> {
    (rank..n).step_by(world.max(1)).collect()
}

/// Groups tensors of the given element counts, in order, into buckets of at most
/// `cap` elements (a larger tensor is a bucket of its own); returns index ranges.
pub fn buckets(counts: &[usize], cap: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, &c) in counts.iter().enumerate() {
        if i > start && size + c > cap {
            out.push(start..i);
            start = i;
            size = 0;
        }
        size += c;
    }
    if start < counts.len() {
        out.push(start..counts.len());
    }
    out
}

/// Assigns parameters (by element count) to ranks as torch's `ZeroRedundancyOptimizer`
/// does: largest first, each to the rank with the fewest elements so far (ties to the
/// lower rank). Returns the owner rank of each parameter, in input order.
pub fn partition(counts: &[usize], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; world];
    let mut owner = vec![0usize; counts.len()];
    for i in order {
        let (r, _) = load
            .iter()
            .enumerate()
            .min_by_key(|&(r, &l)| (l, r))
            .unwrap_or((0, &0));
        owner[i] = r;
        load[r] += counts[i];
    }
    owner
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_as_distributed_sampler() {
        // torch: DistributedSampler(range(10), num_replicas=4, shuffle=False) gives
        // [0,4,8,2], [1,5,9,3], [2,6,0,...]: padded with the first two indices.
        let order: Vec<usize> = (0..10).collect();
        assert_eq!(shard_indices(&order, 0, 4), [0, 4, 8]);
        assert_eq!(shard_indices(&order, 1, 4), [1, 5, 9]);
        assert_eq!(shard_indices(&order, 2, 4), [2, 6, 0]);
        assert_eq!(shard_indices(&order, 3, 4), [3, 7, 1]);
        assert_eq!(shard_indices(&order, 0, 1), order);
        // Every example appears, padding only repeats the start.
        let order = [5, 3, 9, 1, 7];
        let mut all: Vec<usize> = (0..2).flat_map(|r| shard_indices(&order, r, 2)).collect();
        all.sort();
        assert_eq!(all, [1, 3, 5, 5, 7, 9]);
    }

    #[test]
    fn two_ranks_of_b_are_one_rank_of_2b() {
        // Global batch j of 2 ranks x b is batch j of 1 rank x 2b (as sets).
        let order: Vec<usize> = (0..16).rev().collect();
        let b = 2;
        let r0 = shard_indices(&order, 0, 2);
        let r1 = shard_indices(&order, 1, 2);
        for (j, one) in order.chunks(2 * b).enumerate() {
            let mut two: Vec<usize> = r0[j * b..(j + 1) * b].to_vec();
            two.extend_from_slice(&r1[j * b..(j + 1) * b]);
            two.sort();
            let mut one = one.to_vec();
            one.sort();
            assert_eq!(one, two);
        }
    }

    #[test]
    fn eval_shards_cover_once() {
        let mut all: Vec<usize> = (0..3).flat_map(|r| eval_indices(7, r, 3)).collect();
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn buckets_respect_cap() {
        assert_eq!(buckets(&[3, 3, 3, 10, 1], 6), [0..2, 2..3, 3..4, 4..5]);
        assert_eq!(
            buckets(&[1, 1, 1], 100),
            vec![std::ops::Range { start: 0, end: 3 }]
        );
        assert!(buckets(&[], 5).is_empty());
    }

    #[test]
    fn partitions_greedily_by_size() {
        // Sizes 8, 5, 4, 3 over 2 ranks: 8 -> r0, 5 -> r1, 4 -> r1 (5 < 8), 3 -> r0 (8 < 9).
        assert_eq!(partition(&[4, 8, 3, 5], 2), [1, 0, 0, 1]);
        assert_eq!(partition(&[4, 8], 1), [0, 0]);
    }

    #[cfg(not(feature = "nccl"))]
    #[test]
    fn torchrun_without_nccl_says_how_to_build() {
        let e = nccl_collective(&Options::new(Duration::from_secs(1)))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--features cuda"), "{e}");
        assert!(!e.contains('\n'));
    }

    /// Rank 3 of 4, the first process of the second node.
    #[derive(Debug)]
    struct SecondNode;
    impl Coordinator for SecondNode {
        fn rank(&self) -> usize {
            2
        }
        fn world_size(&self) -> usize {
            4
        }
        fn local_rank(&self) -> usize {
            0
        }
        fn barrier(&self) -> kiln_checkpoint::Result<()> {
            Ok(())
        }
    }
    impl Collective for SecondNode {
        fn name(&self) -> &'static str {
            "test"
        }
        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            Ok(t.clone())
        }
        fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
            Ok(t.clone())
        }
        fn all_reduce_f64(&self, _values: &mut [f64]) -> Result<()> {
            Ok(())
        }
        fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
            Ok(vec![mine.to_vec()])
        }
    }

    #[test]
    fn each_node_makes_local_rank_zero_a_writer() {
        let node: Arc<dyn Collective> = Arc::new(SecondNode);
        assert!(!node.is_main());
        let each = EachNode(node);
        assert!(each.is_main());
        assert_eq!((each.rank(), each.world_size()), (2, 4));
        // The RNG file keeps the global rank.
        assert_eq!(
            kiln_checkpoint::training::rng_state_name(each.rank(), each.world_size()),
            "rng_state_2.json"
        );
        let single = EachNode(Arc::new(SingleProcess));
        assert!(single.is_main());
    }

    #[test]
    fn single_process_is_identity() {
        let c = SingleProcess;
        let t = Tensor::new(&[1f32, 2.0], &candle_core::Device::Cpu).unwrap();
        assert_eq!(
            c.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 2.0]
        );
        let mut v = [3.0];
        c.all_reduce_f64(&mut v).unwrap();
        assert_eq!(v, [3.0]);
        assert_eq!(c.all_gather_bytes(b"ab").unwrap(), [b"ab".to_vec()]);
    }
}
