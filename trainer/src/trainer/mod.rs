//! The [`Trainer`]: transformers' `Trainer` loop over a kiln [`Model`], with
//! checkpoints that are crash-safe, written in the background, and exactly resumable.
//!
//! Decisions (where transformers is silent or kiln does better):
//! - **Exact resume.** A checkpoint holds the weights, the optimizer state, the dropout
//!   generator's state, the data position (epoch, micro-batches taken, and whether that
//!   epoch's end was processed) and the loss accumulated since the last log. The
//!   shuffle of epoch `e` is a pure function of (`data_seed`, `e`). A run resumed from
//!   any checkpoint therefore finishes with the same weights, optimizer state and
//!   `log_history` (timings aside) as the uninterrupted run.
//! - **Saving.** With `async_save` (default) the save's background job copies the
//!   weights and optimizer state to host memory (CPU parameters; a device's are copied
//!   before it starts) while training goes on; only the next optimizer step, which
//!   updates them in place, waits for the copy (`deferred`). The job commits the
//!   checkpoint and rotates old ones; an error of that writer stops training at the
//!   next save or at the end, never silently. Each save adds `save_stall` and (once the
//!   write finished) `save_runtime` to the next log entries' numbers via the log.
//! - **Host snapshot.** The weights are copied through the backend of the model's
//!   device ([`kiln_backend::HostSnapshot`]: page-locked memory where the backend
//!   offers it, as CUDA does), into a buffer reused by the next save once the writer is
//!   done with it; the files are byte for byte those of [`crate::weights::export()`].
//! - **Mixed precision.** With `bf16`/`fp16` the model computes on a 16-bit working
//!   copy and the optimizer, checkpoints and `save_model` hold f32 master weights
//!   ([`crate::precision`]); fp16's loss scaler is saved in `scaler.json`.
//! - **Best model.** `best_model_checkpoint` names the checkpoint of `best_global_step`
//!   once that step was saved; rotation never deletes it; `load_best_model_at_end`
//!   copies its weights back into the model.
//! - **Several processes.** With a [`Collective`] of more than one rank (`mpirun -np N
//!   kiln train`), training is data-parallel as kiln-dist describes: rank 0's
//!   weights broadcast, disjoint shards of every global batch, gradients averaged in
//!   buckets, losses and evaluation reduced over ranks, rank 0 writing the model files,
//!   every rank its RNG state, and with `zero_stage = 1` every rank its optimizer shard.
//!
//! The loop is cut by concern, one file each: `plan` (what a run will do, from the
//! arguments and the data), `step` (the loop and one optimizer update), `evaluation`,
//! `reduce` (data-parallel reduction and broadcast), `checkpointing` (save, resume)
//! and `logging` (log entries, callbacks, the progress bar).

mod checkpointing;
mod deferred;
mod evaluation;
mod logging;
mod plan;
mod reduce;
mod step;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Var};
use kiln_backend::Backend;
use kiln_checkpoint::async_save::AsyncSaver;
use kiln_checkpoint::commit::SingleProcess;
use kiln_checkpoint::model::SaveOptions;
use kiln_checkpoint::state::TrainerState;
use kiln_dist::Collective;
use kiln_optim::{Hyper, Optimizer};

use crate::args::{LogLevel, TrainingArguments};
use crate::callback::{TrainerCallback, TrainerControl};
use crate::data::BatchSource;
use crate::memory::MemoryTracker;
use crate::model::Model;
use crate::precision::{GradScaler, MixedPrecision};
use crate::rng::Rng;
use crate::stop::StopRequest;
use crate::weights::HostWeights;
use crate::{Error, Result};

pub use evaluation::{ComputeMetrics, EvalPrediction, accuracy};
pub use step::TrainOutput;

/// The training loop.
pub struct Trainer<M: Model> {
    model: M,
    args: TrainingArguments,
    train_data: Option<Arc<dyn BatchSource>>,
    eval_data: Option<Arc<dyn BatchSource>>,
    compute_metrics: Option<ComputeMetrics>,
    callbacks: Vec<Box<dyn TrainerCallback>>,
    tokenizer_files: Vec<(String, Vec<u8>)>,
    dist: Arc<dyn Collective>,
    state: TrainerState,
    control: TrainerControl,
    rng: Rng,
    saver: AsyncSaver,
    saved_steps: Vec<u64>,
    tr_loss: f64,
    total_loss: f64,
    /// The step `total_loss` counts from: 0 (kiln's checkpoints carry the loss of the
    /// steps before them), or the step a transformers checkpoint was resumed at (whose
    /// `train_loss`, as transformers', averages the steps of this run only).
    loss_counted_from: u64,
    /// Floating-point operations since the last `store_flos` (this rank's).
    current_flos: f64,
    last_logged: u64,
    quiet: bool,
    backend: Option<&'static dyn Backend>,
    host_weights: Vec<Arc<HostWeights>>,
    /// The last background save's copy of the weights and optimizer state, until done.
    pending_copy: Option<deferred::CopyDone>,
    precision: Option<MixedPrecision>,
    scaler: Option<GradScaler>,
    skipped_steps: u64,
    /// The learning rate of the next optimizer step (what torch's `optimizer.pt` and
    /// `scheduler.pt` hold).
    next_lr: f64,
    stop: Option<StopRequest>,
    /// Training tokens of this rank's micro-batches since the last optimizer step
    /// (`include_num_input_tokens_seen`).
    tokens_pending: u64,
    /// When this `train` call started and `num_input_tokens_seen` then: the train
    /// logs' `train_tokens_per_second`.
    session: Option<(std::time::Instant, u64)>,
    /// `skip_memory_metrics = false`: the stages' memory, and the line saying why it
    /// cannot be measured here (said when training starts).
    memory: MemoryTracker,
    memory_note: Option<String>,
}

impl<M: Model> std::fmt::Debug for Trainer<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("args", &self.args)
            .field("global_step", &self.state.global_step)
            .finish()
    }
}

impl<M: Model> Trainer<M> {
    /// A trainer for `model` with `args`.
    pub fn new(model: M, args: TrainingArguments) -> Self {
        let rng = Rng::seed_from_u64(args.seed);
        let (memory, memory_note) = MemoryTracker::new(!args.skip_memory_metrics);
        Trainer {
            model,
            args,
            train_data: None,
            eval_data: None,
            compute_metrics: None,
            callbacks: Vec::new(),
            tokenizer_files: Vec::new(),
            dist: Arc::new(SingleProcess),
            state: TrainerState::default(),
            control: TrainerControl::default(),
            rng,
            saver: AsyncSaver::new(1),
            saved_steps: Vec::new(),
            tr_loss: 0.0,
            total_loss: 0.0,
            loss_counted_from: 0,
            current_flos: 0.0,
            last_logged: 0,
            quiet: false,
            backend: None,
            host_weights: Vec::new(),
            pending_copy: None,
            precision: None,
            scaler: None,
            skipped_steps: 0,
            next_lr: 0.0,
            stop: None,
            tokens_pending: 0,
            session: None,
            memory,
            memory_note,
        }
    }

    /// The backend of the model's device (default: the registered backend of the
    /// device's kind). Checkpoint snapshots go through it and bf16/fp16 training checks
    /// its capabilities.
    pub fn with_backend(mut self, backend: &'static dyn Backend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// The training data.
    pub fn with_train_dataset(mut self, data: Arc<dyn BatchSource>) -> Self {
        self.train_data = Some(data);
        self
    }

    /// The evaluation data.
    pub fn with_eval_dataset(mut self, data: Arc<dyn BatchSource>) -> Self {
        self.eval_data = Some(data);
        self
    }

    /// Metrics computed at each evaluation (e.g. [`accuracy`]).
    pub fn with_compute_metrics(
        mut self,
        f: impl Fn(&EvalPrediction) -> Result<BTreeMap<String, f64>> + Send + 'static,
    ) -> Self {
        self.compute_metrics = Some(Box::new(f));
        self
    }

    /// Adds a callback.
    pub fn with_callback(mut self, cb: impl TrainerCallback + 'static) -> Self {
        self.callbacks.push(Box::new(cb));
        self
    }

    /// Tokenizer files saved with every model and checkpoint.
    pub fn with_tokenizer(mut self, files: Vec<(String, Vec<u8>)>) -> Self {
        self.tokenizer_files = files;
        self
    }

    /// The processes of a data-parallel run (default: a single process); see
    /// `kiln_dist::from_env`. Every rank's dropout generator is its own stream of
    /// `seed` (rank 0's is a single process's).
    pub fn with_collective(mut self, dist: Arc<dyn Collective>) -> Self {
        self.rng = reduce::rank_rng(self.args.seed, dist.rank());
        self.dist = dist;
        self
    }

    /// Stops the run when `request` is set (by a signal handler): after the optimizer
    /// step under way, `checkpoint-<step>` is saved and [`train`](Trainer::train)
    /// returns [`Error::Stopped`]; ignored when `save_on_signal` is off.
    pub fn with_stop_request(mut self, request: StopRequest) -> Self {
        self.stop = Some(request);
        self
    }

    /// Silences the per-log lines and the progress bar (tests).
    pub fn with_quiet(mut self, quiet: bool) -> Self {
        self.quiet = quiet;
        self
    }

    /// The model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The arguments.
    pub fn args(&self) -> &TrainingArguments {
        &self.args
    }

    /// The state (`log_history`, best metric, …).
    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    pub(crate) fn device(&self) -> Device {
        self.model
            .parameters()
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(Device::Cpu)
    }

    fn backend(&self) -> Option<&'static dyn Backend> {
        self.backend
            .or_else(|| crate::precision::backend_for(&self.device()))
    }

    /// The parameters the optimizer updates and checkpoints hold: the model's, or with
    /// `bf16`/`fp16` (once training or evaluation started) their f32 master copies.
    pub fn parameters(&self) -> Vec<(String, Var)> {
        match &self.precision {
            Some(p) => p.masters().to_vec(),
            None => self.model.parameters(),
        }
    }

    /// With `bf16`/`fp16`: checks the device supports the dtype and gives the model its
    /// 16-bit working copy (once).
    fn prepare_precision(&mut self) -> Result<()> {
        let Some(dtype) = self.args.mixed_precision()? else {
            return Ok(());
        };
        if self.precision.is_some() {
            return Ok(());
        }
        let flag = crate::precision::dtype_flag(dtype);
        let backend = self.backend().ok_or_else(|| {
            Error::Config(format!(
                "{flag} training: no backend is linked for the model's device {:?}, so whether it supports {} is unknown; link its backend crate",
                self.device(),
                dtype.as_str()
            ))
        })?;
        crate::precision::check_device(backend, &self.args)?;
        self.precision = Some(MixedPrecision::apply(&mut self.model, dtype)?);
        Ok(())
    }

    fn output_dir(&self) -> PathBuf {
        PathBuf::from(&self.args.output_dir)
    }

    /// Prints an informational line (`log_level`).
    fn say(&self, line: &str) {
        self.say_at(LogLevel::Info, line);
    }

    /// Prints a line of `level` if this process's level (`log_level` on the main
    /// process, `log_level_replica` on the others, prefixed with the rank) lets it.
    fn say_at(&self, level: LogLevel, line: &str) {
        let main = self.dist.is_main();
        if self.quiet || !self.args.prints(level, main) {
            return;
        }
        if main {
            eprintln!("{line}");
        } else {
            eprintln!("kiln: rank {}: {line}", self.dist.rank());
        }
    }

    fn save_options(&self) -> SaveOptions {
        SaveOptions {
            safetensors: self.args.save_safetensors,
            ..SaveOptions::default()
        }
    }

    /// An optimizer over the parameters this rank keeps state for (all of them unless
    /// the optimizer is sharded).
    fn make_optimizer(&self, owners: &[usize]) -> Result<Optimizer> {
        let a = &self.args;
        let hyper = Hyper {
            beta1: a.adam_beta1,
            beta2: a.adam_beta2,
            eps: a.adam_epsilon,
            weight_decay: a.weight_decay,
        };
        let params = self
            .parameters()
            .into_iter()
            .zip(owners)
            .filter(|(_, o)| **o == self.dist.rank())
            .map(|((n, v), _)| {
                let decay = !self.model.no_weight_decay(&n);
                (n, v, decay)
            })
            .collect();
        let optimizer = Optimizer::new(a.optim_kind()?, hyper, params);
        match &self.precision {
            Some(p) => Ok(optimizer.with_working_copies(
                p.working_copies(&self.model)
                    .into_iter()
                    .zip(owners)
                    .filter(|(_, o)| **o == self.dist.rank())
                    .map(|(w, _)| w)
                    .collect(),
            )?),
            None => Ok(optimizer),
        }
    }
}
