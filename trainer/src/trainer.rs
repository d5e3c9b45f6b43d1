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
//! - **Saving.** With `async_save` (default) training stalls only while weights and
//!   optimizer state are copied to host memory; a background writer commits the
//!   checkpoint and rotates old ones; an error of that writer stops training at the
//!   next save or at the end, never silently. Each save adds `save_stall` and (once the
//!   write finished) `save_runtime` to the next log entries' numbers via the log.
//! - **Host snapshot.** The weights are copied through the backend of the model's
//!   device ([`kiln_backend::HostSnapshot`]: page-locked memory where the backend
//!   offers it, as CUDA does), into a buffer reused by the next save once the writer is
//!   done with it; the files are byte for byte those of [`crate::weights::export`].
//! - **Mixed precision.** With `bf16`/`fp16` the model computes on a 16-bit working
//!   copy and the optimizer, checkpoints and `save_model` hold f32 master weights
//!   ([`crate::precision`]); fp16's loss scaler is saved in `scaler.json`.
//! - **Best model.** `best_model_checkpoint` names the checkpoint of `best_global_step`
//!   once that step was saved; rotation never deletes it; `load_best_model_at_end`
//!   copies its weights back into the model.
//! - **Several processes.** With a [`Collective`] of more than one rank (`mpirun -np N
//!   kiln train`), training is data-parallel as [`crate::dist`] describes: rank 0's
//!   weights broadcast, disjoint shards of every global batch, gradients averaged in
//!   buckets, losses and evaluation reduced over ranks, rank 0 writing the model files,
//!   every rank its RNG state, and with `zero_stage = 1` every rank its optimizer shard.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use kiln_backend::Backend;
use kiln_checkpoint::async_save::{AsyncSaver, SaveJob};
use kiln_checkpoint::commit::{Coordinator, SingleProcess};

use crate::dist::Collective;
use kiln_checkpoint::model::{SaveOptions, save_pretrained};
use kiln_checkpoint::state::{TRAINER_STATE_NAME, TrainerState};
use kiln_checkpoint::training::{CheckpointSnapshot, load_checkpoint};
use kiln_formats::pyjson::PyValue;
use serde_json::{Value, json};

use crate::args::{SaveErrorPolicy, Strategy, TrainingArguments, resolve_steps};
use crate::callback::{
    TrainerCallback, TrainerControl, default_flow_on_epoch_end, default_flow_on_step_end,
};
use crate::model::{Batch, Model};
use crate::optim::{Grads, Hyper, Optimizer};
use crate::precision::{GradScaler, MixedPrecision};
use crate::rng::{Rng, RngState};
use crate::schedule::Schedule;
use crate::weights::HostWeights;
use crate::{Error, Result};

/// A dataset as the trainer sees it: a number of examples, and a collated batch for any
/// list of example indices (tokenized, padded, on `device`).
pub trait BatchSource: Send + Sync {
    /// Number of examples.
    fn len(&self) -> usize;
    /// Whether there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The batch of these examples, in this order.
    fn batch(&self, indices: &[usize], device: &Device) -> Result<Batch>;
}

/// Predictions and labels of an evaluation, for [`Trainer::with_compute_metrics`].
#[derive(Debug, Clone)]
pub struct EvalPrediction {
    /// Logits of every example, `[n, ...]`.
    pub logits: Tensor,
    /// Labels of every example, if the data has them.
    pub labels: Option<Tensor>,
}

/// Metrics computed from an [`EvalPrediction`] (`{"accuracy": 0.9}`; the trainer adds
/// the `eval_` prefix).
pub type ComputeMetrics = Box<dyn Fn(&EvalPrediction) -> Result<BTreeMap<String, f64>> + Send>;

/// What [`Trainer::train`] returns.
#[derive(Debug, Clone)]
pub struct TrainOutput {
    /// Optimizer steps taken in total.
    pub global_step: u64,
    /// Mean training loss over the steps of this call.
    pub training_loss: f64,
    /// `train_runtime`, `train_samples_per_second`, `train_steps_per_second`,
    /// `total_flos`, `train_loss`, `epoch`.
    pub metrics: BTreeMap<String, f64>,
}

/// The argmax accuracy of classification logits against i64 labels.
pub fn accuracy(p: &EvalPrediction) -> Result<BTreeMap<String, f64>> {
    let Some(labels) = &p.labels else {
        return Ok(BTreeMap::new());
    };
    let pred = p
        .logits
        .argmax(candle_core::D::Minus1)?
        .to_dtype(candle_core::DType::I64)?;
    let labels = labels.to_dtype(candle_core::DType::I64)?;
    let n = labels.dims().iter().product::<usize>().max(1);
    let correct = pred
        .eq(&labels)?
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(BTreeMap::from([(
        "accuracy".to_string(),
        correct / n as f64,
    )]))
}

/// Where the data loader is, saved in `data_state.json`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Position {
    epoch: u64,
    micro_batches_done: u64,
    epoch_end_done: bool,
}

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
    last_logged: u64,
    quiet: bool,
    backend: Option<&'static dyn Backend>,
    host_weights: Vec<Arc<HostWeights>>,
    precision: Option<MixedPrecision>,
    scaler: Option<GradScaler>,
    skipped_steps: u64,
}

impl<M: Model> std::fmt::Debug for Trainer<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("args", &self.args)
            .field("global_step", &self.state.global_step)
            .finish()
    }
}

fn py(x: f64) -> PyValue {
    PyValue::Float(x)
}

fn round_to(x: f64, places: i32) -> f64 {
    let m = 10f64.powi(places);
    (x * m).round() / m
}

impl<M: Model> Trainer<M> {
    /// A trainer for `model` with `args`.
    pub fn new(model: M, args: TrainingArguments) -> Self {
        let rng = Rng::seed_from_u64(args.seed);
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
            last_logged: 0,
            quiet: false,
            backend: None,
            host_weights: Vec::new(),
            precision: None,
            scaler: None,
            skipped_steps: 0,
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
    /// [`crate::dist::from_env`]. Every rank's dropout generator is its own stream of
    /// `seed` (rank 0's is a single process's).
    pub fn with_collective(mut self, dist: Arc<dyn Collective>) -> Self {
        self.rng = rank_rng(self.args.seed, dist.rank());
        self.dist = dist;
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

    fn device(&self) -> Device {
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

    fn say(&self, line: &str) {
        if !self.quiet && self.dist.is_main() {
            eprintln!("{line}");
        }
    }

    fn save_options(&self) -> SaveOptions {
        SaveOptions {
            safetensors: self.args.save_safetensors,
            ..SaveOptions::default()
        }
    }

    /// Saves the model folder (config, weights, tokenizer, `training_args.json`) into
    /// `dir`, or `output_dir`; only the main process writes.
    pub fn save_model(&self, dir: Option<&Path>) -> Result<PathBuf> {
        let dir = dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.output_dir());
        if self.writer().is_main() {
            let export = crate::weights::export_parameters(&self.model, &self.parameters())?;
            let mut save = export.model_save();
            save.tokenizer_files = self.tokenizer_files.clone();
            save.training_args = Some(self.args.to_json());
            save_pretrained(&dir, &save, &self.save_options())?;
        }
        Ok(dir)
    }

    /// Writes `trainer_state.json` into `output_dir` (main process only).
    pub fn save_state(&self) -> Result<PathBuf> {
        let path = self.output_dir().join(TRAINER_STATE_NAME);
        if self.writer().is_main() {
            std::fs::create_dir_all(self.output_dir())
                .map_err(|e| kiln_checkpoint::Error::io(self.output_dir(), e))?;
            self.state.save(&path)?;
        }
        Ok(path)
    }

    /// Loads the weights of a model or checkpoint folder of this model into its
    /// variables (all or nothing); every parameter must be in the folder.
    pub fn load_weights(&mut self, dir: &Path) -> Result<()> {
        let info = match &self.precision {
            // Into the f32 masters, then the working copy follows.
            Some(p) => {
                let info = crate::weights::load_into(
                    p.masters(),
                    &self.model.tied_weights(),
                    dir,
                    &self.model.load_rules(),
                )?;
                p.refresh(&self.model)?;
                info
            }
            None => self.model.init_from(dir)?,
        };
        if let Some(name) = info.fresh.first() {
            return Err(Error::Config(format!(
                "{}: weight {name:?} is missing; a checkpoint of this run holds every weight",
                dir.display()
            )));
        }
        Ok(())
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
            Some(p) => optimizer.with_working_copies(
                p.working_copies(&self.model)
                    .into_iter()
                    .zip(owners)
                    .filter(|(_, o)| **o == self.dist.rank())
                    .map(|(w, _)| w)
                    .collect(),
            ),
            None => Ok(optimizer),
        }
    }

    fn resolve_resume(&self, resume: Option<&str>) -> Result<Option<PathBuf>> {
        let out = self.output_dir();
        match resume.or(self.args.resume_from_checkpoint.as_deref()) {
            None => Ok(None),
            Some("last") | Some("true") => kiln_checkpoint::scan::last_checkpoint(&out)?
                .map(Some)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "no complete checkpoint to resume in {}",
                        out.display()
                    ))
                }),
            Some(p) => Ok(Some(PathBuf::from(p))),
        }
    }

    fn check_output_dir(&self, resuming: bool) -> Result<()> {
        let out = self.output_dir();
        if out.exists() && !out.is_dir() {
            return Err(Error::Config(format!(
                "output_dir {} is a file; give a folder",
                out.display()
            )));
        }
        std::fs::create_dir_all(&out).map_err(|e| {
            Error::Config(format!(
                "output_dir {} cannot be created: {e}",
                out.display()
            ))
        })?;
        // One probe per process: the ranks of a run check the same folder at once.
        let probe = out.join(format!(".kiln-write-test-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| {
                Error::Config(format!("output_dir {} is not writable: {e}", out.display()))
            })?;
        if !resuming && !self.args.overwrite_output_dir {
            let existing = kiln_checkpoint::scan::list_checkpoints(&out)?;
            if let Some(c) = existing.first() {
                return Err(Error::Config(format!(
                    "output_dir {} already holds checkpoints ({}); pass --resume_from_checkpoint last to continue, --overwrite_output_dir true to train anew there, or choose another output_dir",
                    out.display(),
                    c.path.display()
                )));
            }
        }
        Ok(())
    }

    /// Trains; `resume` is `"last"` or a checkpoint folder (overriding
    /// `resume_from_checkpoint`).
    pub fn train(&mut self, resume: Option<&str>) -> Result<TrainOutput> {
        self.args.validate()?;
        let train = self
            .train_data
            .clone()
            .ok_or_else(|| Error::Config("no training data: call with_train_dataset".into()))?;
        if train.is_empty() {
            return Err(Error::Config("the training data is empty".into()));
        }
        if self.args.eval_strategy != Strategy::No && self.eval_data.is_none() {
            return Err(Error::Config(
                "eval_strategy needs evaluation data (validation_file)".into(),
            ));
        }
        self.prepare_precision()?;
        let resuming = resume
            .or(self.args.resume_from_checkpoint.as_deref())
            .is_some();
        self.check_output_dir(resuming)?;
        if self.writer().is_main() {
            kiln_checkpoint::scan::clean_leftovers(&self.output_dir())?;
        }
        // The other ranks look for checkpoints only once the clean-up (which may put a
        // checkpoint back) is done, so that every rank resumes the same one.
        self.sync()?;
        let resume_dir = self.resolve_resume(resume)?;
        self.saver = AsyncSaver::new(1);
        let a = self.args.clone();
        let world = self.dist.world_size();
        let rank = self.dist.rank();
        let batch_size = a.per_device_train_batch_size;
        let n = train.len();
        // Each rank's share of an epoch (DistributedSampler pads to a multiple of world).
        let n_rank = n.div_ceil(world);
        let batches_per_epoch = if a.dataloader_drop_last {
            n_rank / batch_size
        } else {
            n_rank.div_ceil(batch_size)
        };
        if batches_per_epoch == 0 {
            return Err(Error::Config(format!(
                "{n_rank} training examples per process make no full batch of {batch_size} with dataloader_drop_last"
            )));
        }
        let ga = a.gradient_accumulation_steps;
        let updates_per_epoch = (batches_per_epoch.div_ceil(ga)).max(1) as u64;
        let max_steps = if a.max_steps > 0 {
            a.max_steps as u64
        } else {
            (a.num_train_epochs * updates_per_epoch as f64).ceil() as u64
        };
        let num_epochs = max_steps.div_ceil(updates_per_epoch);
        let schedule = Schedule::from_name(
            &a.lr_scheduler_type,
            &a.lr_scheduler_kwargs,
            a.learning_rate,
        )?;
        let warmup = a.warmup_steps_for(max_steps);

        // The parameters the optimizer updates (f32 masters in mixed precision) and
        // the variables the model computes with (their 16-bit copies, or the same).
        let vars: Vec<Var> = self.parameters().into_iter().map(|(_, v)| v).collect();
        let sources: Vec<Var> = self
            .model
            .parameters()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        // ZeRO-1: the rank that keeps (and steps, and saves) each parameter's state.
        let owners = if self.sharded_optimizer() {
            let counts: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
            crate::dist::partition(&counts, world)
        } else {
            vec![rank; vars.len()]
        };
        let mut optimizer = self.make_optimizer(&owners)?;
        let mut position = Position {
            epoch: 0,
            micro_batches_done: 0,
            epoch_end_done: false,
        };
        self.state = TrainerState {
            max_steps,
            logging_steps: resolve_steps(a.logging_steps, max_steps),
            eval_steps: resolve_steps(a.eval_steps(), max_steps),
            save_steps: resolve_steps(a.save_steps, max_steps),
            train_batch_size: Some((batch_size * world) as u64),
            num_train_epochs: PyValue::Int(num_epochs as i64),
            is_local_process_zero: self.dist.local_rank() == 0,
            is_world_process_zero: self.dist.is_main(),
            epoch: Some(0.0),
            ..TrainerState::default()
        };
        self.tr_loss = 0.0;
        self.total_loss = 0.0;
        self.last_logged = 0;
        self.saved_steps.clear();
        self.scaler = a.fp16.then(GradScaler::new);
        self.skipped_steps = 0;
        if let Some(dir) = &resume_dir {
            position = self.restore(
                dir,
                &mut optimizer,
                &owners,
                updates_per_epoch,
                ga as u64,
                batches_per_epoch as u64,
            )?;
            self.say(&format!(
                "resuming from {} at step {}",
                dir.display(),
                self.state.global_step
            ));
        }
        // The same initial weights everywhere (as DDP): rank 0's.
        self.broadcast_parameters(&vars)?;
        let start_step = self.state.global_step;
        let start = Instant::now();
        self.control = TrainerControl::default();
        self.each_callback(|cb, a, s, c| cb.on_train_begin(a, s, c));
        let bar = self.progress_bar(max_steps, start_step);
        let device = self.device();

        let mut epoch = position.epoch;
        'epochs: while epoch < num_epochs && !self.control.should_training_stop {
            let skip = if epoch == position.epoch && !a.ignore_data_skip {
                position.micro_batches_done as usize
            } else {
                0
            };
            let skip_epoch_end = epoch == position.epoch && position.epoch_end_done;
            if skip_epoch_end {
                epoch += 1;
                continue;
            }
            let order = crate::data::epoch_order(n, a.shuffle_seed(), epoch);
            let order = crate::dist::shard_indices(&order, rank, world);
            let batches: Vec<&[usize]> = order.chunks(batch_size).take(batches_per_epoch).collect();
            self.control.should_epoch_stop = false;
            self.each_callback(|cb, a, s, c| cb.on_epoch_begin(a, s, c));
            let mut grads: Grads = Vec::new();
            for (i, idx) in batches.iter().enumerate().skip(skip) {
                let batch = train.batch(idx, &device)?;
                let out = self.model.forward(&batch, Some(&mut self.rng))?;
                let loss = out.loss.ok_or_else(|| {
                    Error::Config(
                        "the model returned no loss: do the training data have labels?".into(),
                    )
                })?;
                let loss = if ga > 1 {
                    loss.affine(1.0 / ga as f64, 0.0)?
                } else {
                    loss
                };
                let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                if value.is_finite() {
                    self.tr_loss += value;
                } else {
                    // transformers' logging_nan_inf_filter
                    self.tr_loss +=
                        self.tr_loss / (1 + self.state.global_step - self.last_logged) as f64;
                }
                let loss = match &self.scaler {
                    Some(s) => s.scale_loss(&loss)?,
                    None => loss,
                };
                // Gradients of what the model computed with (the 16-bit working copy in
                // mixed precision), in the dtype of the parameters the optimizer updates.
                let store = loss.backward()?;
                let local = sources
                    .iter()
                    .zip(&vars)
                    .map(|(src, master)| {
                        store
                            .get(src.as_tensor())
                            .map(|g| g.to_dtype(master.dtype()))
                            .transpose()
                            .map_err(Error::from)
                    })
                    .collect::<Result<Grads>>()?;
                Optimizer::accumulate(&mut grads, local)?;
                let sync = (i + 1) % ga == 0 || i + 1 == batches.len();
                if !sync {
                    continue;
                }
                self.reduce_gradients(&mut grads, &vars)?;
                let found_inf = match &self.scaler {
                    Some(s) => s.unscale(&mut grads)?,
                    None => false,
                };
                let grad_norm = if a.max_grad_norm > 0.0 {
                    Optimizer::clip(&mut grads, a.max_grad_norm)?
                } else {
                    Optimizer::grad_norm(&grads)?
                };
                // The schedule counts the steps taken (fp16 skips those that overflow).
                let lr = a.learning_rate
                    * schedule.factor(
                        self.state.global_step - self.skipped_steps,
                        warmup,
                        max_steps,
                        a.learning_rate,
                    );
                if found_inf {
                    self.skipped_steps += 1;
                } else if world > 1 && self.sharded_optimizer() {
                    let mine: Grads = grads
                        .iter()
                        .zip(&owners)
                        .filter(|(_, o)| **o == rank)
                        .map(|(g, _)| g.clone())
                        .collect();
                    optimizer.step(&mine, lr)?;
                    self.share_updated_parameters(&vars, &owners)?;
                } else {
                    optimizer.step(&grads, lr)?;
                }
                if let Some(s) = &mut self.scaler {
                    s.update(found_inf);
                }
                grads.clear();
                self.state.global_step += 1;
                self.state.epoch = Some(epoch as f64 + (i + 1) as f64 / batches.len() as f64);
                let pos = Position {
                    epoch,
                    micro_batches_done: (i + 1) as u64,
                    epoch_end_done: false,
                };
                self.control.should_log = false;
                self.control.should_evaluate = false;
                self.control.should_save = false;
                default_flow_on_step_end(&a, &self.state, &mut self.control);
                self.each_callback(|cb, a, s, c| cb.on_step_end(a, s, c));
                if let Some(b) = &bar {
                    b.set_position(self.state.global_step);
                }
                self.maybe_log_save_evaluate(
                    Some(grad_norm),
                    Some(lr),
                    &optimizer,
                    pos,
                    bar.as_ref(),
                )?;
                if self.control.should_epoch_stop || self.control.should_training_stop {
                    break;
                }
            }
            self.control.should_log = false;
            self.control.should_evaluate = false;
            self.control.should_save = false;
            default_flow_on_epoch_end(&a, &self.state, &mut self.control);
            self.each_callback(|cb, a, s, c| cb.on_epoch_end(a, s, c));
            let pos = Position {
                epoch,
                micro_batches_done: batches.len() as u64,
                epoch_end_done: true,
            };
            self.maybe_log_save_evaluate(None, None, &optimizer, pos, bar.as_ref())?;
            epoch += 1;
            if self.control.should_training_stop {
                break 'epochs;
            }
        }
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        self.finish_saves()?;
        self.tr_loss = self.mean_over_ranks(self.tr_loss)?;
        let runtime = start.elapsed().as_secs_f64();
        let steps = self.state.global_step - start_step;
        // As transformers: the loss not yet logged joins the total, divided by every
        // step of the run (kiln restores the total on resume, so this is the whole run's).
        self.total_loss += self.tr_loss;
        self.tr_loss = 0.0;
        let train_loss = self.total_loss / (self.state.global_step.max(1)) as f64;
        let samples = steps as f64 * (batch_size * ga * world) as f64;
        let mut metrics = BTreeMap::from([
            ("train_runtime".to_string(), round_to(runtime, 4)),
            (
                "train_samples_per_second".to_string(),
                round_to(samples / runtime.max(1e-9), 3),
            ),
            (
                "train_steps_per_second".to_string(),
                round_to(steps as f64 / runtime.max(1e-9), 3),
            ),
            ("total_flos".to_string(), self.state.total_flos),
            ("train_loss".to_string(), train_loss),
        ]);
        self.log(
            metrics.iter().map(|(k, v)| (k.clone(), py(*v))).collect(),
            None,
        );
        metrics.insert("epoch".into(), self.state.epoch.unwrap_or(0.0));
        if a.load_best_model_at_end
            && let Some(best) = self.state.best_model_checkpoint.clone()
        {
            self.say(&format!(
                "loading best model from {best} (score: {:?})",
                self.state.best_metric
            ));
            self.load_weights(Path::new(&best))?;
        }
        self.each_callback(|cb, a, s, c| cb.on_train_end(a, s, c));
        Ok(TrainOutput {
            global_step: self.state.global_step,
            training_loss: train_loss,
            metrics,
        })
    }

    fn progress_bar(&self, max_steps: u64, at: u64) -> Option<indicatif::ProgressBar> {
        use std::io::IsTerminal;
        if self.quiet
            || self.args.disable_tqdm
            || !self.dist.is_main()
            || !std::io::stderr().is_terminal()
        {
            return None;
        }
        let bar = indicatif::ProgressBar::new(max_steps);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{wide_bar} {pos}/{len} [{elapsed}<{eta}, {per_sec}]",
        ) {
            bar.set_style(style);
        }
        bar.set_position(at);
        Some(bar)
    }

    fn each_callback(
        &mut self,
        mut f: impl FnMut(
            &mut dyn TrainerCallback,
            &TrainingArguments,
            &TrainerState,
            &mut TrainerControl,
        ),
    ) {
        for cb in &mut self.callbacks {
            f(cb.as_mut(), &self.args, &self.state, &mut self.control);
        }
    }

    fn log(&mut self, mut logs: BTreeMap<String, PyValue>, bar: Option<&indicatif::ProgressBar>) {
        if let Some(e) = self.state.epoch {
            logs.insert("epoch".into(), py(e));
        }
        let line = log_line(&logs);
        match bar {
            Some(b) => b.println(line),
            None => self.say(&line),
        }
        let mut entry = logs.clone();
        entry.insert("step".into(), PyValue::Int(self.state.global_step as i64));
        self.state.log_history.push(entry);
        let mut control = self.control;
        for cb in &mut self.callbacks {
            cb.on_log(&self.args, &self.state, &mut control, &logs);
        }
        self.control = control;
    }

    fn maybe_log_save_evaluate(
        &mut self,
        grad_norm: Option<f64>,
        lr: Option<f64>,
        optimizer: &Optimizer,
        pos: Position,
        bar: Option<&indicatif::ProgressBar>,
    ) -> Result<()> {
        if self.control.should_log && self.state.global_step > self.last_logged {
            self.tr_loss = self.mean_over_ranks(self.tr_loss)?;
            let steps = (self.state.global_step - self.last_logged) as f64;
            let mut logs =
                BTreeMap::from([("loss".to_string(), py(round_to(self.tr_loss / steps, 4)))]);
            if let Some(g) = grad_norm {
                logs.insert("grad_norm".into(), py(g));
            }
            if let Some(lr) = lr {
                logs.insert("learning_rate".into(), py(lr));
            }
            self.total_loss += self.tr_loss;
            self.tr_loss = 0.0;
            self.last_logged = self.state.global_step;
            self.log(logs, bar);
        }
        if self.control.should_evaluate {
            let metrics = self.evaluate_inner(bar)?;
            let improved = self.update_best(&metrics)?;
            if self.args.save_strategy == Strategy::Best {
                self.control.should_save = improved;
            }
        }
        if self.control.should_save {
            self.save_checkpoint(optimizer, pos, bar)?;
            self.each_callback(|cb, a, s, c| cb.on_save(a, s, c));
        }
        Ok(())
    }

    fn update_best(&mut self, metrics: &BTreeMap<String, f64>) -> Result<bool> {
        let Some(name) = self.args.best_metric_name() else {
            return Ok(false);
        };
        let key = if name.starts_with("eval_") {
            name
        } else {
            format!("eval_{name}")
        };
        let value = *metrics.get(&key).ok_or_else(|| {
            Error::Config(format!(
                "metric_for_best_model {key:?} is not among the evaluation metrics: {}",
                metrics.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let better = match self.state.best_metric {
            None => true,
            Some(best) if self.args.is_greater_better() => value > best,
            Some(best) => value < best,
        };
        if better {
            self.state.best_metric = Some(value);
            self.state.best_global_step = Some(self.state.global_step);
        }
        Ok(better)
    }

    /// Evaluates on the evaluation data; metrics are prefixed `eval_` and logged.
    pub fn evaluate(&mut self) -> Result<BTreeMap<String, f64>> {
        self.evaluate_inner(None)
    }

    fn evaluate_inner(
        &mut self,
        bar: Option<&indicatif::ProgressBar>,
    ) -> Result<BTreeMap<String, f64>> {
        self.prepare_precision()?;
        let data = self
            .eval_data
            .clone()
            .ok_or_else(|| Error::Config("no evaluation data".into()))?;
        let start = Instant::now();
        let (loss, logits, labels, batches) = self.run_prediction(data.as_ref())?;
        let runtime = start.elapsed().as_secs_f64();
        let mut metrics = BTreeMap::new();
        if let Some(l) = loss {
            metrics.insert("eval_loss".to_string(), l);
        }
        if let Some(f) = &self.compute_metrics {
            for (k, v) in f(&EvalPrediction { logits, labels })? {
                let key = if k.starts_with("eval_") {
                    k
                } else {
                    format!("eval_{k}")
                };
                metrics.insert(key, v);
            }
        }
        metrics.insert("eval_runtime".into(), round_to(runtime, 4));
        metrics.insert(
            "eval_samples_per_second".into(),
            round_to(data.len() as f64 / runtime.max(1e-9), 3),
        );
        metrics.insert(
            "eval_steps_per_second".into(),
            round_to(batches as f64 / runtime.max(1e-9), 3),
        );
        self.log(
            metrics.iter().map(|(k, v)| (k.clone(), py(*v))).collect(),
            bar,
        );
        let mut control = self.control;
        for cb in &mut self.callbacks {
            cb.on_evaluate(&self.args, &self.state, &mut control, &metrics);
        }
        self.control = control;
        Ok(metrics)
    }

    /// Logits (and labels, and the mean loss when labels are present) for every example
    /// of `data`, in order, with dropout off.
    pub fn predict(&mut self, data: &dyn BatchSource) -> Result<EvalPrediction> {
        self.prepare_precision()?;
        let (_, logits, labels, _) = self.run_prediction(data)?;
        Ok(EvalPrediction { logits, labels })
    }

    fn run_prediction(
        &self,
        data: &dyn BatchSource,
    ) -> Result<(Option<f64>, Tensor, Option<Tensor>, usize)> {
        let device = self.device();
        let bs = self.args.per_device_eval_batch_size;
        let world = self.dist.world_size();
        // Several processes: each predicts a disjoint part, gathered back in order below.
        let idx = crate::dist::eval_indices(data.len(), self.dist.rank(), world);
        let mut loss_sum = 0.0;
        let mut loss_n = 0usize;
        let mut all_logits = Vec::new();
        let mut all_labels = Vec::new();
        let mut batches = 0;
        for chunk in idx.chunks(bs) {
            let batch = data.batch(chunk, &device)?;
            let out = self.model.forward(&batch, None)?;
            if let Some(l) = &out.loss {
                loss_sum +=
                    l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
                loss_n += chunk.len();
            }
            // f32 logits from a bf16/fp16 model, as transformers hands them to metrics.
            all_logits.push(crate::precision::upcast(&out.logits)?);
            if let Some(l) = batch.labels {
                all_labels.push(l);
            }
            batches += 1;
        }
        let logits = concat_padded(&all_logits)?;
        let labels = if all_labels.len() == all_logits.len() && !all_labels.is_empty() {
            Some(concat_padded(&all_labels)?)
        } else {
            None
        };
        if world > 1 {
            let mut sums = [loss_sum, loss_n as f64];
            self.dist.all_reduce_f64(&mut sums)?;
            let loss = (sums[1] > 0.0).then(|| sums[0] / sums[1]);
            let (logits, labels) = self.gather_predictions(data.len(), &logits, labels.as_ref())?;
            return Ok((loss, logits, labels, batches));
        }
        let loss = (loss_n > 0).then(|| loss_sum / loss_n as f64);
        Ok((loss, logits, labels, batches))
    }

    /// Every rank's predictions (rank `r` predicted examples `r, r + world, …`) put
    /// back into the order of the data, on every rank.
    fn gather_predictions(
        &self,
        n: usize,
        logits: &Tensor,
        labels: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let world = self.dist.world_size();
        let has_rows = |t: &Tensor| t.rank() > 0 && t.dims()[0] > 0;
        let mine = encode_tensors(&[Some(logits).filter(|t| has_rows(t)), labels])?;
        let parts = self.dist.all_gather_bytes(&mine)?;
        let mut logit_rows: Vec<Option<Tensor>> = vec![None; n];
        let mut label_rows: Vec<Option<Tensor>> = vec![None; n];
        let mut all_labels = true;
        for (r, bytes) in parts.iter().enumerate() {
            let mut ts = decode_tensors(bytes, &self.device())?.into_iter();
            let (lg, lb) = (ts.next().flatten(), ts.next().flatten());
            let expected = crate::dist::eval_indices(n, r, world).len();
            all_labels &= lb.is_some() || expected == 0;
            for (k, index) in crate::dist::eval_indices(n, r, world)
                .into_iter()
                .enumerate()
            {
                if let Some(t) = &lg {
                    logit_rows[index] = Some(t.narrow(0, k, 1)?);
                }
                if let Some(t) = &lb {
                    label_rows[index] = Some(t.narrow(0, k, 1)?);
                }
            }
        }
        let logits: Vec<Tensor> = logit_rows.into_iter().flatten().collect();
        if logits.len() != n {
            return Err(Error::Config(format!(
                "gathered {} predictions of {n} examples from {world} processes",
                logits.len()
            )));
        }
        let labels: Vec<Tensor> = label_rows.into_iter().flatten().collect();
        let labels = if all_labels && labels.len() == n {
            Some(concat_padded(&labels)?)
        } else {
            None
        };
        Ok((concat_padded(&logits)?, labels))
    }

    /// Who writes files: rank 0, or with `save_on_each_node` the first process of every
    /// node ([`crate::dist::EachNode`]).
    fn writer(&self) -> Arc<dyn Coordinator> {
        if self.args.save_on_each_node {
            Arc::new(crate::dist::EachNode(self.dist.clone()))
        } else {
            self.dist.clone()
        }
    }

    /// Whether every rank keeps only its part of the optimizer state (ZeRO stage 1).
    fn sharded_optimizer(&self) -> bool {
        self.args.zero_stage == 1 && self.dist.world_size() > 1
    }

    /// Waits for every rank (a reduction on the training stream; nothing to do alone).
    fn sync(&self) -> Result<()> {
        if self.dist.world_size() > 1 {
            self.dist.all_reduce_f64(&mut [0.0])?;
        }
        Ok(())
    }

    /// The mean of `x` over ranks.
    fn mean_over_ranks(&self, x: f64) -> Result<f64> {
        let world = self.dist.world_size();
        if world <= 1 {
            return Ok(x);
        }
        let mut v = [x];
        self.dist.all_reduce_f64(&mut v)?;
        Ok(v[0] / world as f64)
    }

    /// Elements of f32 per all-reduce bucket (`ddp_bucket_cap_mb`, default 25 MiB).
    fn bucket_elems(&self) -> usize {
        let mb = self.args.ddp_bucket_cap_mb.unwrap_or(25) as usize;
        (mb.saturating_mul(1 << 20) / 4).max(1)
    }

    /// Averages the accumulated gradients over ranks: flattened into f32 buckets, one
    /// all-reduce per bucket. A parameter without a gradient on every rank keeps none.
    fn reduce_gradients(&self, grads: &mut Grads, vars: &[Var]) -> Result<()> {
        let world = self.dist.world_size();
        if world <= 1 {
            return Ok(());
        }
        let mut present: Vec<f64> = grads
            .iter()
            .map(|g| if g.is_some() { 1.0 } else { 0.0 })
            .collect();
        self.dist.all_reduce_f64(&mut present)?;
        // Tests make one rank hang here (the others then wait in the gradient all-reduce).
        fail::fail_point!("kiln-train-before-all-reduce");
        let counts: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
        for range in crate::dist::buckets(&counts, self.bucket_elems()) {
            let mut flat = Vec::with_capacity(range.len());
            for i in range.clone() {
                let g = match &grads[i] {
                    Some(g) => g.flatten_all()?.to_dtype(DType::F32)?,
                    None => Tensor::zeros(counts[i], DType::F32, vars[i].device())?,
                };
                flat.push(g);
            }
            let summed = self
                .dist
                .all_reduce_sum(&Tensor::cat(&flat, 0)?)?
                .affine(1.0 / world as f64, 0.0)?;
            let mut offset = 0;
            for i in range {
                let dtype = grads[i].as_ref().map_or(vars[i].dtype(), |g| g.dtype());
                grads[i] = if present[i] > 0.0 {
                    Some(
                        summed
                            .narrow(0, offset, counts[i])?
                            .reshape(vars[i].dims())?
                            .to_dtype(dtype)?,
                    )
                } else {
                    None
                };
                offset += counts[i];
            }
        }
        Ok(())
    }

    /// Overwrites every parameter with rank `root`'s values, in buckets.
    fn broadcast_from(&self, vars: &[&Var], root: usize) -> Result<()> {
        let counts: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
        for range in crate::dist::buckets(&counts, self.bucket_elems()) {
            let flat = vars[range.clone()]
                .iter()
                .map(|v| Ok(v.as_tensor().flatten_all()?.to_dtype(DType::F32)?))
                .collect::<Result<Vec<_>>>()?;
            let got = self.dist.broadcast(&Tensor::cat(&flat, 0)?, root)?;
            let mut offset = 0;
            for i in range {
                let v = vars[i];
                let t = got
                    .narrow(0, offset, counts[i])?
                    .reshape(v.dims())?
                    .to_dtype(v.dtype())?;
                v.set(&t)?;
                offset += counts[i];
            }
        }
        Ok(())
    }

    /// Rank 0's weights on every rank (before training, as DDP's construction does).
    fn broadcast_parameters(&self, vars: &[Var]) -> Result<()> {
        if self.dist.world_size() <= 1 {
            return Ok(());
        }
        self.broadcast_from(&vars.iter().collect::<Vec<_>>(), 0)?;
        self.refresh_working_copies()
    }

    /// Mixed precision: the model's 16-bit copy from the (just overwritten) masters.
    fn refresh_working_copies(&self) -> Result<()> {
        match &self.precision {
            Some(p) => p.refresh(&self.model),
            None => Ok(()),
        }
    }

    /// ZeRO-1, after each rank stepped its own parameters: every owner's new values
    /// to every rank.
    fn share_updated_parameters(&self, vars: &[Var], owners: &[usize]) -> Result<()> {
        for root in 0..self.dist.world_size() {
            let mine: Vec<&Var> = vars
                .iter()
                .zip(owners)
                .filter(|(_, o)| **o == root)
                .map(|(v, _)| v)
                .collect();
            if !mine.is_empty() {
                self.broadcast_from(&mine, root)?;
            }
        }
        self.refresh_working_copies()
    }

    fn save_checkpoint(
        &mut self,
        optimizer: &Optimizer,
        pos: Position,
        bar: Option<&indicatif::ProgressBar>,
    ) -> Result<()> {
        let step = self.state.global_step;
        let out = self.output_dir();
        let stall_start = Instant::now();
        // Best bookkeeping before the state is written, as transformers does.
        if let Some(best) = self.state.best_global_step
            && (self.saved_steps.contains(&best) || best == step)
        {
            self.state.best_model_checkpoint =
                Some(out.join(format!("checkpoint-{best}")).display().to_string());
        }
        let mut callbacks_state =
            BTreeMap::from([("TrainerControl".to_string(), self.control.to_state())]);
        for cb in &self.callbacks {
            if let Some(s) = cb.state() {
                callbacks_state.insert(cb.name().to_string(), s);
            }
        }
        self.state.stateful_callbacks = callbacks_state;
        let only_model = self.args.save_only_model;
        let coord = self.writer();
        let main = coord.is_main();
        let sharded = self.sharded_optimizer();
        // The loss accumulated since the last log, averaged over ranks (a collective:
        // every rank saves at the same steps).
        let tr_loss = self.mean_over_ranks(self.tr_loss)?;
        // The copy to host memory: the only part of an asynchronous save that blocks.
        // Only the main process writes the model; with a sharded optimizer every rank
        // writes its part of the state.
        let weights: Arc<dyn kiln_formats::TensorCollection> = if main {
            self.host_weights()?
        } else {
            Arc::new(kiln_formats::TensorMap::new())
        };
        let opt_state = if only_model || !(main || sharded) {
            None
        } else {
            Some(optimizer.state()?)
        };
        let stall = stall_start.elapsed().as_secs_f64();
        let background = self.args.async_save && self.dist.background_barriers();
        if background {
            // Logged before the state is snapshotted, so the checkpoint's log_history
            // holds its own save entry and a resumed run's history matches.
            self.log(
                BTreeMap::from([("save_stall".to_string(), py(round_to(stall, 4)))]),
                bar,
            );
        }
        let snapshot = CheckpointSnapshot {
            step,
            config: self.model.config(),
            generation_config: self.model.generation_config(),
            weights,
            tied: self.model.tied_weights(),
            tokenizer_files: self.tokenizer_files.clone(),
            training_args: Some(self.args.to_json()),
            optimizer: opt_state,
            optimizer_sharded: sharded,
            // The schedule's own step count: fp16 steps skipped for overflow are not in it.
            scheduler: (!only_model).then(|| {
                json!({"step": step - self.skipped_steps, "lr_scheduler_type": self.args.lr_scheduler_type})
            }),
            scaler: self
                .scaler
                .as_ref()
                .filter(|_| !only_model)
                .map(GradScaler::state),
            rng: (!only_model)
                .then(|| serde_json::to_value(self.rng.state()).unwrap_or(Value::Null)),
            data: (!only_model).then(|| {
                json!({
                    "epoch": pos.epoch,
                    "micro_batches_done": pos.micro_batches_done,
                    "epoch_end_done": pos.epoch_end_done,
                    "data_seed": self.args.shuffle_seed(),
                    "tr_loss": tr_loss,
                    "total_loss": self.total_loss,
                    "last_logged_step": self.last_logged,
                })
            }),
            state: self.state.clone(),
            save_options: self.save_options(),
        };
        let limit = self.args.save_total_limit;
        let best = self.state.best_model_checkpoint.clone();
        let write = move |snap: CheckpointSnapshot| -> kiln_checkpoint::Result<PathBuf> {
            let path = snap.write(&out, coord.as_ref())?;
            if let Some(limit) = limit
                && coord.is_main()
                && limit > 0
            {
                kiln_checkpoint::rotate::rotate(&out, limit, best.as_deref().map(Path::new))?;
            }
            Ok(path)
        };
        let target = self.output_dir().join(format!("checkpoint-{step}"));
        if background {
            if self.args.on_save_error == SaveErrorPolicy::Continue {
                // Collect the previous save's outcome first, so that its failure is
                // logged and this save still starts (with one save in flight, `submit`
                // would wait for it anyway).
                match self.saver.wait() {
                    Ok(reports) => self.record_reports(&reports, bar),
                    Err(e) => self.save_failed(&e.into(), bar),
                }
            }
            let job = SaveJob::new(&target, move || write(snapshot))
                .with_snapshot_time(stall_start.elapsed());
            self.saver.submit(job)?;
            let reports = self.saver.reports();
            self.record_reports(&reports, bar);
        } else {
            let t = Instant::now();
            if let Err(e) = write(snapshot) {
                let e = Error::from(e);
                if self.args.on_save_error == SaveErrorPolicy::Stop {
                    return Err(e);
                }
                self.save_failed(&e, bar);
                return Ok(());
            }
            let runtime = t.elapsed().as_secs_f64();
            self.log(
                BTreeMap::from([
                    ("save_stall".to_string(), py(round_to(stall + runtime, 4))),
                    ("save_runtime".to_string(), py(round_to(runtime, 4))),
                ]),
                bar,
            );
        }
        self.saved_steps.push(step);
        Ok(())
    }

    /// The weights copied to host memory through the device's backend (the old export
    /// when no backend is linked for the device), into the buffer of an earlier
    /// snapshot that the writer has dropped.
    fn host_weights(&mut self) -> Result<Arc<dyn kiln_formats::TensorCollection>> {
        let params = self.parameters();
        let Some(backend) = self.backend() else {
            let export = crate::weights::export_parameters(&self.model, &params)?;
            return Ok(Arc::new(export.weights));
        };
        // Only this trainer holds a snapshot whose write finished.
        let reuse = self
            .host_weights
            .iter()
            .position(|w| Arc::strong_count(w) == 1)
            .map(|i| self.host_weights.swap_remove(i))
            .and_then(|w| Arc::try_unwrap(w).ok())
            .map(HostWeights::into_buffer);
        let weights = Arc::new(HostWeights::take(backend, &params, reuse)?);
        self.host_weights.push(Arc::clone(&weights));
        // One save is written at a time: the buffer being written and this one.
        while self.host_weights.len() > 2 {
            self.host_weights.remove(0);
        }
        Ok(weights)
    }

    /// Logs the write time of background saves that finished (`save_runtime`).
    fn record_reports(
        &mut self,
        reports: &[kiln_checkpoint::async_save::SaveReport],
        bar: Option<&indicatif::ProgressBar>,
    ) {
        for r in reports {
            let mut logs = BTreeMap::from([
                (
                    "save_runtime".to_string(),
                    py(round_to(r.write.as_secs_f64(), 4)),
                ),
                ("save_bytes".to_string(), PyValue::Int(r.bytes as i64)),
            ]);
            if let Some(step) = r
                .path
                .file_name()
                .and_then(|n| kiln_checkpoint::scan::parse_step(&n.to_string_lossy()))
            {
                logs.insert("save_step".to_string(), PyValue::Int(step as i64));
            }
            self.log(logs, bar);
        }
    }

    fn finish_saves(&mut self) -> Result<()> {
        match self.saver.wait() {
            Ok(reports) => self.record_reports(&reports, None),
            Err(e) if self.args.on_save_error == SaveErrorPolicy::Continue => {
                self.save_failed(&e.into(), None)
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// With `on_save_error = "continue"`: a failed save is logged (`save_error`) and
    /// training goes on; earlier checkpoints are untouched by the commit protocol.
    fn save_failed(&mut self, e: &Error, bar: Option<&indicatif::ProgressBar>) {
        let msg = e.to_string();
        self.say(&format!(
            "warning: checkpoint save failed, training continues: {msg}"
        ));
        self.log(
            BTreeMap::from([("save_error".to_string(), PyValue::Str(msg))]),
            bar,
        );
    }

    fn restore(
        &mut self,
        dir: &Path,
        optimizer: &mut Optimizer,
        owners: &[usize],
        updates_per_epoch: u64,
        ga: u64,
        batches_per_epoch: u64,
    ) -> Result<Position> {
        let resume = load_checkpoint(dir, self.dist.rank(), self.dist.world_size())?;
        self.load_weights(dir)?;
        let fresh = self.state.clone();
        self.state = resume.state;
        // What this run computes takes precedence over what the checkpoint recorded.
        self.state.max_steps = fresh.max_steps;
        self.state.logging_steps = fresh.logging_steps;
        self.state.eval_steps = fresh.eval_steps;
        self.state.save_steps = fresh.save_steps;
        self.state.train_batch_size = fresh.train_batch_size;
        self.state.num_train_epochs = fresh.num_train_epochs;
        if let Some(mut opt) = resume.optimizer.clone() {
            // Consolidated from whatever world size saved it; keep this rank's part.
            if self.sharded_optimizer() {
                let rank = self.dist.rank();
                let mine: std::collections::BTreeSet<String> = self
                    .parameters()
                    .into_iter()
                    .zip(owners)
                    .filter(|(_, o)| **o == rank)
                    .map(|((n, _), _)| n)
                    .collect();
                opt.retain(|p| mine.contains(p));
            }
            optimizer.load_state(&opt)?;
        }
        if resume.rng.is_none() && self.dist.world_size() > 1 {
            eprintln!(
                "kiln: rank {}: {} has no RNG state for this rank (it was saved by fewer \
                 processes); this rank's dropout continues from a fresh generator",
                self.dist.rank(),
                dir.display()
            );
        }
        if let (Some(scaler), Some(state)) = (&mut self.scaler, &resume.scaler) {
            *scaler = GradScaler::from_state(state)
                .map_err(|e| Error::Config(format!("{}: {e}", dir.display())))?;
        }
        // Steps fp16 skipped: the checkpoint's global step less the schedule's count.
        self.skipped_steps = resume
            .scheduler
            .as_ref()
            .and_then(|s| s["step"].as_u64())
            .map_or(0, |s| self.state.global_step.saturating_sub(s));
        if let Some(rng) = &resume.rng {
            let s: RngState = serde_json::from_value(rng.clone())
                .map_err(|e| Error::Config(format!("{}: rng state: {e}", dir.display())))?;
            self.rng = Rng::from_state(&s)
                .map_err(|e| Error::Config(format!("{}: {e}", dir.display())))?;
        }
        for cb in &mut self.callbacks {
            if let Some(s) = self.state.stateful_callbacks.get(cb.name()) {
                cb.load_state(s);
            }
        }
        let step = self.state.global_step;
        self.last_logged = step;
        self.saved_steps.push(step);
        let position = match &resume.data {
            Some(d) => {
                self.tr_loss = d["tr_loss"].as_f64().unwrap_or(0.0);
                self.total_loss = d["total_loss"].as_f64().unwrap_or(0.0);
                self.last_logged = d["last_logged_step"].as_u64().unwrap_or(step);
                Position {
                    epoch: d["epoch"].as_u64().unwrap_or(0),
                    micro_batches_done: d["micro_batches_done"].as_u64().unwrap_or(0),
                    epoch_end_done: d["epoch_end_done"].as_bool().unwrap_or(false),
                }
            }
            // A checkpoint without kiln's data state (transformers', or save_only_model):
            // transformers' rule from the step count.
            None => {
                let epoch = step / updates_per_epoch;
                let done = ((step % updates_per_epoch) * ga).min(batches_per_epoch);
                Position {
                    epoch,
                    micro_batches_done: done,
                    epoch_end_done: false,
                }
            }
        };
        Ok(position)
    }
}

/// One log entry as a line: `{"loss": 0.6931, "learning_rate": 5e-05, "epoch": 0.5}`.
fn log_line(logs: &BTreeMap<String, PyValue>) -> String {
    let items: Vec<String> = logs
        .iter()
        .map(|(k, v)| {
            let v = match v {
                PyValue::Float(f) => kiln_formats::pyjson::float_repr(*f),
                other => kiln_formats::pyjson::dumps_py(other),
            };
            format!("{k:?}: {v}")
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// Concatenates tensors along the first dimension, padding later dimensions with -100
/// where they differ (as transformers pads predictions of different lengths).
/// The generator of `rank`: rank 0 draws what a single process draws; others draw
/// from their own stream of the same seed (far from the epochs' shuffle streams).
fn rank_rng(seed: u64, rank: usize) -> Rng {
    if rank == 0 {
        Rng::seed_from_u64(seed)
    } else {
        Rng::with_stream(seed, (1 << 63) | rank as u64)
    }
}

/// Tensors (or their absence) as bytes for a gather: per tensor a presence byte, the
/// dtype's name, the dims, and the values as little-endian f64 (exact for f32, bf16,
/// f16 and the integer labels kiln uses).
fn encode_tensors(ts: &[Option<&Tensor>]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for t in ts {
        let Some(t) = t else {
            out.push(0);
            continue;
        };
        out.push(1);
        let name = t.dtype().as_str().as_bytes();
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&(t.rank() as u32).to_le_bytes());
        for &d in t.dims() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        for x in t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()? {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    Ok(out)
}

/// The inverse of [`encode_tensors`].
fn decode_tensors(mut bytes: &[u8], device: &Device) -> Result<Vec<Option<Tensor>>> {
    let bad = || Error::Config("a gathered prediction is malformed".into());
    let mut take = |n: usize| -> Result<&[u8]> {
        if bytes.len() < n {
            return Err(bad());
        }
        let (head, rest) = bytes.split_at(n);
        bytes = rest;
        Ok(head)
    };
    let mut out = Vec::new();
    loop {
        let Ok(flag) = take(1) else { break };
        if flag[0] == 0 {
            out.push(None);
            continue;
        }
        let len = take(1)?[0] as usize;
        let name = std::str::from_utf8(take(len)?)
            .map_err(|_| bad())?
            .to_string();
        let dtype: DType = name.parse().map_err(|_| bad())?;
        let rank = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad())?) as usize;
        let mut dims = Vec::with_capacity(rank);
        for _ in 0..rank {
            dims.push(u64::from_le_bytes(take(8)?.try_into().map_err(|_| bad())?) as usize);
        }
        let count: usize = dims.iter().product();
        let raw = take(count.checked_mul(8).ok_or_else(bad)?)?;
        let values: Vec<f64> = raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        out.push(Some(
            Tensor::from_vec(values, dims, device)?.to_dtype(dtype)?,
        ));
    }
    Ok(out)
}

fn concat_padded(ts: &[Tensor]) -> Result<Tensor> {
    if ts.is_empty() {
        return Ok(Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)?);
    }
    let rank = ts[0].rank();
    if ts.iter().all(|t| t.dims()[1..] == ts[0].dims()[1..]) || rank < 2 {
        return Ok(Tensor::cat(ts, 0)?);
    }
    let max: Vec<usize> = (1..rank)
        .map(|d| ts.iter().map(|t| t.dims()[d]).max().unwrap_or(0))
        .collect();
    let mut padded = Vec::with_capacity(ts.len());
    for t in ts {
        let mut t = t.clone();
        for (k, &m) in max.iter().enumerate() {
            let d = k + 1;
            let have = t.dims()[d];
            if have < m {
                let mut shape = t.dims().to_vec();
                shape[d] = m - have;
                let pad = Tensor::full(-100f32, shape, t.device())?.to_dtype(t.dtype())?;
                t = Tensor::cat(&[&t, &pad], d)?;
            }
        }
        padded.push(t);
    }
    Ok(Tensor::cat(&padded, 0)?)
}
