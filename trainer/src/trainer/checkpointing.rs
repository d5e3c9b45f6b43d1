//! Saving and resuming: model folders, `trainer_state.json`, `checkpoint-<step>`
//! folders written in the background (host snapshot, commit, rotation), and the typed
//! state a resumed run reads back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kiln_checkpoint::async_save::{SaveJob, SaveReport};
use kiln_checkpoint::model::save_pretrained;
use kiln_checkpoint::state::TRAINER_STATE_NAME;
use kiln_checkpoint::torch_state::TorchScheduler;
use kiln_checkpoint::training::{
    CheckpointSnapshot, DATA_STATE_NAME, SCALER_NAME, SCHEDULER_NAME, load_checkpoint,
    rng_state_name,
};
use kiln_formats::pyjson::PyValue;
use kiln_optim::{Optimizer, PendingState};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Trainer;
use super::logging::{py, round_to};
use super::plan::Plan;
use crate::args::{LogLevel, SamplingStrategy, SaveErrorPolicy};
use crate::model::Model;
use crate::precision::GradScaler;
use crate::rng::{Rng, RngState};
use crate::weights::HostWeights;
use crate::{Error, Result};

/// Where the data loader is and the loss not yet logged: `data_state.json` (the
/// position's keys first, then these).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(super) struct DataState {
    /// Where the loop was.
    #[serde(flatten)]
    pub position: Position,
    /// The shuffle seed (`data_seed`, else `seed`), for the record.
    pub data_seed: u64,
    /// The loss accumulated since the last log, averaged over ranks.
    pub tr_loss: f64,
    /// The loss of every logged step so far.
    pub total_loss: f64,
    /// The step of the last log entry.
    pub last_logged_step: u64,
    /// The batch geometry the position counts in (per-device batch size, accumulation,
    /// processes); absent in checkpoints of kiln before it was recorded.
    #[serde(default)]
    pub geometry: Option<Geometry>,
}

/// How micro-batches were cut: what a data position means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Geometry {
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub world_size: usize,
}

/// The schedule's position: `scheduler.json`. `step` counts the steps the schedule
/// took, which fp16 runs that skip overflowing steps make smaller than `global_step`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SchedulerState {
    /// Steps the schedule has taken.
    pub step: u64,
    /// The schedule's name (`lr_scheduler_type`).
    pub lr_scheduler_type: String,
}

/// Where the loop is: the epoch, the micro-batches of it done, whether its end was
/// processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Position {
    pub epoch: u64,
    pub micro_batches_done: u64,
    pub epoch_end_done: bool,
}

impl Position {
    /// The start of training.
    pub(super) const START: Position = Position {
        epoch: 0,
        micro_batches_done: 0,
        epoch_end_done: false,
    };
}

/// `name` of checkpoint `dir`, parsed as `T`: a malformed file is an [`Error::Resume`]
/// naming it.
fn parse_state<T: serde::de::DeserializeOwned>(dir: &Path, name: &str, value: &Value) -> Result<T> {
    serde_json::from_value(value.clone()).map_err(|e| Error::Resume {
        path: dir.join(name),
        reason: format!("malformed: {e}"),
    })
}
impl<M: Model> Trainer<M> {
    /// Saves the model folder (config, weights, tokenizer, `training_args.json`) into
    /// `dir`, or `output_dir`; only the main process writes.
    pub fn save_model(&self, dir: Option<&Path>) -> Result<PathBuf> {
        let dir = dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.output_dir());
        if self.writer().is_main() {
            let params = self.parameters();
            let export = match self.model.saved_dtype() {
                Some(dtype) => {
                    let cast = params
                        .iter()
                        .map(|(n, v)| {
                            Ok((
                                n.clone(),
                                candle_core::Var::from_tensor(&v.to_dtype(dtype)?)?,
                            ))
                        })
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    crate::weights::export_parameters(&self.model, &cast)?
                }
                None => crate::weights::export_parameters(&self.model, &params)?,
            };
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
            return Err(Error::Resume {
                path: dir.to_path_buf(),
                reason: format!(
                    "weight {name:?} is missing; a checkpoint of this run holds every weight"
                ),
            });
        }
        Ok(())
    }

    pub(super) fn save_checkpoint(
        &mut self,
        optimizer: &Optimizer,
        pos: Position,
        bar: Option<&indicatif::ProgressBar>,
    ) -> Result<()> {
        // The last save's copy must be done before this one reads the same buffers.
        self.finish_snapshot_copy();
        let step = self.state.global_step;
        let out = self.output_dir();
        let stall_start = Instant::now();
        self.store_flos()?;
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
        // Only the main process writes the model; with a sharded optimizer every rank
        // writes its part of the state.
        let mut opt_source = if only_model || !(main || sharded) {
            None
        } else {
            let mut source = optimizer.state_source();
            self.torch_ready(&mut source.meta);
            Some(source)
        };
        let background = self.args.async_save && self.dist.background_barriers();
        // The copy to host memory. In a background save of CPU parameters the save's job
        // makes it while training goes on, and the next optimizer step waits for it;
        // otherwise it is made now, the part of an asynchronous save that blocks.
        let deferred = if background && main {
            self.defer_copy(&mut opt_source)
        } else {
            None
        };
        let weights: Arc<dyn kiln_formats::TensorCollection> = if main && deferred.is_none() {
            self.host_weights()?
        } else {
            Arc::new(kiln_formats::TensorMap::new())
        };
        let opt_state = opt_source.map(PendingState::take).transpose()?;
        let stall = stall_start.elapsed().as_secs_f64();
        if background {
            // Logged before the state is snapshotted, so the checkpoint's log_history
            // holds its own save entry and a resumed run's history matches.
            self.log(
                BTreeMap::from([("save_stall".to_string(), py(round_to(stall, 4)))]),
                bar,
            );
        }
        let mut snapshot = CheckpointSnapshot::new(step, self.model.config(), weights)
            .with_tied(self.model.tied_weights())
            .with_tokenizer_files(self.tokenizer_files.clone())
            .with_training_args(self.args.to_json())
            .with_optimizer_sharded(sharded)
            .with_state(self.state.clone())
            .with_save_options(self.save_options());
        if let Some(g) = self.model.generation_config() {
            snapshot = snapshot.with_generation_config(g);
        }
        if let Some(o) = opt_state {
            snapshot = snapshot.with_optimizer(o);
        }
        if !only_model {
            // The schedule's own step count: fp16 steps skipped for overflow are not in it.
            let scheduler = SchedulerState {
                step: step - self.skipped_steps,
                lr_scheduler_type: self.args.lr_scheduler_type.clone(),
            };
            let data = DataState {
                position: pos,
                data_seed: self.args.shuffle_seed(),
                tr_loss,
                total_loss: self.total_loss,
                last_logged_step: self.last_logged,
                geometry: Some(self.geometry()),
            };
            let lr = self.args.learning_rate;
            snapshot = snapshot
                .with_torch_scheduler(TorchScheduler {
                    last_epoch: scheduler.step,
                    base_lrs: vec![lr; 2],
                    last_lr: vec![self.next_lr; 2],
                })
                .with_scheduler(serde_json::to_value(scheduler).unwrap_or(Value::Null))
                .with_rng(serde_json::to_value(self.rng.state()).unwrap_or(Value::Null))
                .with_data(serde_json::to_value(data).unwrap_or(Value::Null));
            if let Some(s) = &self.scaler {
                snapshot = snapshot.with_scaler(s.state());
            }
        }
        let limit = self.args.save_total_limit;
        let best = self.state.best_model_checkpoint.clone();
        let write = move |snap: CheckpointSnapshot| -> kiln_checkpoint::Result<PathBuf> {
            let path = snap.write(&out, coord.as_ref())?;
            if let Some(limit) = limit
                && coord.is_main()
                && limit > 0
            {
                kiln_checkpoint::rotate::rotate_after_save(
                    &out,
                    limit,
                    best.as_deref().map(Path::new),
                    &path,
                )?;
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
            let job = SaveJob::new(&target, move || match deferred {
                Some(copy) => {
                    let (weights, opt) = copy.run()?;
                    let snapshot = snapshot.with_weights(weights);
                    write(match opt {
                        Some(o) => snapshot.with_optimizer(o),
                        None => snapshot,
                    })
                }
                None => write(snapshot),
            })
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

    /// The optimizer state with what torch's `optimizer.pt` holds besides kiln's: every
    /// parameter's name in order, the learning rate of the next step, the base one, and
    /// whether transformers' optim
    /// name is the fused AdamW (`adamw_torch_fused`, transformers' default, which kiln's
    /// `adamw` stands for).
    fn torch_ready(&self, meta: &mut Value) {
        if let Value::Object(meta) = meta {
            // Every parameter, also in a ZeRO-1 shard's state, so that consolidated shards
            // number them as transformers does.
            let names: Vec<String> = self.parameters().into_iter().map(|(n, _)| n).collect();
            meta.insert("params".into(), serde_json::json!(names));
            meta.insert("lr".into(), serde_json::json!(self.next_lr));
            meta.insert(
                "initial_lr".into(),
                serde_json::json!(self.args.learning_rate),
            );
            let fused = match self.args.optim.as_str() {
                "adamw_torch" => Some(false),
                "sgd" => None,
                _ => Some(true),
            };
            meta.insert("torch_fused".into(), serde_json::json!(fused));
        }
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
        let reuse = self.reusable_buffer();
        let weights = Arc::new(HostWeights::take(backend, &params, reuse)?);
        self.keep_host_weights(Arc::clone(&weights));
        Ok(weights)
    }

    /// Logs the write time of background saves that finished (`save_runtime`).
    fn record_reports(&mut self, reports: &[SaveReport], bar: Option<&indicatif::ProgressBar>) {
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

    pub(super) fn finish_saves(&mut self) -> Result<()> {
        self.finish_snapshot_copy();
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
        self.say_at(
            LogLevel::Warning,
            &format!("warning: checkpoint save failed, training continues: {msg}"),
        );
        self.log(
            BTreeMap::from([("save_error".to_string(), PyValue::Str(msg))]),
            bar,
        );
    }

    /// The batch geometry of this run.
    fn geometry(&self) -> Geometry {
        Geometry {
            per_device_train_batch_size: self.args.per_device_train_batch_size,
            gradient_accumulation_steps: self.args.gradient_accumulation_steps,
            world_size: self.dist.world_size(),
        }
    }

    /// The callbacks' saved states (`stateful_callbacks`, but `TrainerControl`, whose
    /// flags the loop resets anyway), given back with
    /// `restore_callback_states_from_checkpoint`, as transformers' `_load_callback_state`;
    /// otherwise one line names the callbacks that start afresh.
    fn restore_callbacks(&mut self, dir: &Path) {
        let saved = |name: &str| name != "TrainerControl";
        if self.args.restore_callback_states_from_checkpoint {
            for cb in &mut self.callbacks {
                if let Some(s) = self.state.stateful_callbacks.get(cb.name()) {
                    cb.load_state(s);
                }
            }
            let absent: Vec<&str> = self
                .state
                .stateful_callbacks
                .keys()
                .map(String::as_str)
                .filter(|n| saved(n) && !self.callbacks.iter().any(|c| c.name() == *n))
                .collect();
            if !absent.is_empty() {
                self.say_at(LogLevel::Warning, &format!(
                    "note: {} holds the state of callbacks this run does not have ({}); ignored",
                    dir.display(),
                    absent.join(", ")
                ));
            }
            return;
        }
        let fresh: Vec<&str> = self
            .callbacks
            .iter()
            .map(|c| c.name())
            .filter(|n| saved(n) && self.state.stateful_callbacks.contains_key(*n))
            .collect();
        if !fresh.is_empty() {
            self.say_at(
                LogLevel::Warning,
                &format!(
                    "note: {} starts afresh, as restore_callback_states_from_checkpoint is false; \
                 set it to true to continue from the state {} saved",
                    fresh.join(", "),
                    dir.display()
                ),
            );
        }
    }

    pub(super) fn restore(
        &mut self,
        dir: &Path,
        optimizer: &mut Optimizer,
        owners: &[usize],
        plan: &Plan,
    ) -> Result<Position> {
        let resume = load_checkpoint(dir, self.dist.rank(), self.dist.world_size())?;
        self.load_weights(dir)?;
        let fresh = self.state.clone();
        self.state = resume.state.clone();
        // What this run computes takes precedence over what the checkpoint recorded.
        self.state.max_steps = fresh.max_steps;
        self.state.logging_steps = fresh.logging_steps;
        self.state.eval_steps = fresh.eval_steps;
        self.state.save_steps = fresh.save_steps;
        self.state.train_batch_size = fresh.train_batch_size;
        self.state.num_train_epochs = fresh.num_train_epochs;
        // torch's numbering is named with transformers' groups of this model's parameters.
        let params: Vec<(String, bool)> = self
            .parameters()
            .into_iter()
            .map(|(n, _)| {
                let decay = !self.model.no_weight_decay(&n);
                (n, decay)
            })
            .collect();
        let saved = resume
            .optimizer_for(&params)?
            .ok_or_else(|| Error::Resume {
                path: dir.to_path_buf(),
                reason: "it holds no optimizer state (it was saved with save_only_model): \
                     resuming would restart AdamW's moments and the schedule; to train on \
                     from its weights, give it as --model_name_or_path instead"
                    .into(),
            })?;
        {
            let mut opt = saved;
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
            // Every rank says it (the main process too), so not through say_at's prefix.
            if self.args.prints(LogLevel::Warning, self.dist.is_main()) {
                eprintln!(
                    "kiln: rank {}: {} has no RNG state for this rank (it was saved by fewer \
                     processes); this rank's dropout continues from a fresh generator",
                    self.dist.rank(),
                    dir.display()
                );
            }
        }
        if let (Some(scaler), Some(state)) = (&mut self.scaler, &resume.scaler) {
            *scaler = GradScaler::from_state(state).map_err(|e| Error::Resume {
                path: dir.join(SCALER_NAME),
                reason: e.to_string(),
            })?;
        }
        // Steps fp16 skipped: the checkpoint's global step less the schedule's count.
        self.skipped_steps = match (&resume.scheduler, &resume.torch_scheduler) {
            (Some(s), _) => {
                let s: SchedulerState = parse_state(dir, SCHEDULER_NAME, s)?;
                self.state.global_step.saturating_sub(s.step)
            }
            (None, Some(t)) => self.state.global_step.saturating_sub(t.last_epoch),
            (None, None) => 0,
        };
        if let Some(rng) = &resume.rng {
            let name = rng_state_name(self.dist.rank(), self.dist.world_size());
            let s: RngState = parse_state(dir, &name, rng)?;
            self.rng = Rng::from_state(&s).map_err(|e| Error::Resume {
                path: dir.join(&name),
                reason: e.to_string(),
            })?;
        }
        self.restore_callbacks(dir);
        if resume.rng.is_none() && resume.torch_rng {
            self.say_at(
                LogLevel::Warning,
                &format!(
                    "note: {} holds torch's generator states (rng_state.pth), which kiln's \
                     generator cannot take: dropout goes on from kiln's, seeded with seed {}",
                    dir.display(),
                    self.args.seed
                ),
            );
        }
        let step = self.state.global_step;
        self.last_logged = step;
        self.saved_steps.push(step);
        let data = match &resume.data {
            Some(d) => Some(parse_state::<DataState>(dir, DATA_STATE_NAME, d)?),
            None => None,
        };
        let changed = data
            .as_ref()
            .and_then(|d| d.geometry)
            .filter(|g| *g != self.geometry());
        if let Some(g) = changed {
            let now = self.geometry();
            self.say_at(
                LogLevel::Warning,
                &format!(
                    "note: {} was saved with batch size {} × accumulation {} × {} processes, \
                     this run has {} × {} × {}: its data position is recomputed from the step \
                     count, as transformers does, and the run is no longer the one that was \
                     interrupted",
                    dir.display(),
                    g.per_device_train_batch_size,
                    g.gradient_accumulation_steps,
                    g.world_size,
                    now.per_device_train_batch_size,
                    now.gradient_accumulation_steps,
                    now.world_size
                ),
            );
        }
        // transformers' rule: whole epochs from the step count, then the rest of the
        // current epoch's micro-batches.
        let ga = plan.ga as u64;
        let by_steps = Position {
            epoch: step / plan.updates_per_epoch,
            micro_batches_done: ((step % plan.updates_per_epoch) * ga)
                .min(plan.batches_per_epoch as u64),
            epoch_end_done: false,
        };
        let position = match data {
            Some(d) => {
                self.tr_loss = d.tr_loss;
                self.total_loss = d.total_loss;
                self.last_logged = d.last_logged_step;
                match changed {
                    None => d.position,
                    Some(_) => by_steps,
                }
            }
            // A checkpoint without kiln's data state (transformers'), over kiln's order of
            // the data.
            None => {
                self.loss_counted_from = step;
                let skipped = format!(
                    "{} has no kiln data position: {} epochs and {} steps of data are \
                     skipped, as transformers skips them",
                    dir.display(),
                    by_steps.epoch,
                    step % plan.updates_per_epoch,
                );
                // One process drawing transformers' random order continues its batches;
                // anything else takes kiln's order of the data.
                if self.args.sampling() == SamplingStrategy::Random && plan.world == 1 {
                    self.say(&format!("{skipped}, in the order transformers draws them"));
                } else {
                    self.say_at(
                        LogLevel::Warning,
                        &format!(
                            "note: {skipped}, but the examples come in kiln's order, not the \
                             one transformers' sampler would draw"
                        ),
                    );
                }
                by_steps
            }
        };
        Ok(position)
    }
}
