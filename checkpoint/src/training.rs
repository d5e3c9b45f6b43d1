//! A whole training checkpoint, `output_dir/checkpoint-<step>/`:
//!
//! | file | written by | holds |
//! |---|---|---|
//! | `config.json`, weights, tokenizer files, `training_args.json` | main process | the model folder ([`model`](crate::model)) |
//! | `optimizer.pt` | main process | the optimizer state as torch's `state_dict()`, numbered as transformers numbers the parameters ([`torch_state`](crate::torch_state)) |
//! | `optimizer.rank<r>-of-<w>.safetensors`, instead, with sharded optimizer state (ZeRO-1) | every rank | that rank's part of the optimizer state, by parameter name ([`optimizer`](crate::optimizer)); transformers cannot resume it |
//! | `scheduler.json`, `scheduler.pt` | main process | the learning-rate schedule's state: kiln's, and `LambdaLR.state_dict()` |
//! | `scaler.json`, `scaler.pt` | main process, fp16 runs | the loss scaler's state (torch's `GradScaler.state_dict()` keys), as JSON and as torch saves it |
//! | `data_state.json` | main process | the data loader's position (epoch, batches taken, seed) |
//! | `rng_state.json`, or `rng_state_<rank>.json` with several processes | every rank | that rank's generator state |
//! | `trainer_state.json` | main process, last | transformers' `TrainerState` ([`state`](crate::state)) |
//! | `kiln_checkpoint.json` | the commit | the manifest that makes the folder complete ([`commit`](crate::commit)) |
//!
//! A [`CheckpointSnapshot`] owns everything (tensors copied to host memory), so it can
//! be handed to a background writer ([`async_save`](crate::async_save)) while training
//! goes on. A checkpoint holds what transformers' `Trainer.train(resume_from_checkpoint=…)`
//! reads (the model files, `trainer_state.json`, `optimizer.pt`, `scheduler.pt`,
//! `scaler.pt`), and kiln's own small files beside them for exact resume (its
//! generator's state, the data position, the schedule's step count). transformers'
//! `rng_state.pth` is not written (its resume skips a missing one): torch's generators
//! are not kiln's. Older kiln checkpoints with `optimizer.safetensors` still resume.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_formats::TensorCollection;
use serde_json::Value;

use crate::commit::{Coordinator, Staging};
use crate::error::IoContext;
use crate::model::{ModelSave, SaveOptions, save_pretrained};
use crate::optimizer::{OptimizerState, load_optimizer, sharded_optimizer_name};
use crate::scan::{Completeness, completeness};
use crate::state::{TRAINER_STATE_NAME, TrainerState};
use crate::torch_state::{
    OPTIMIZER_PT_NAME, SCALER_PT_NAME, SCHEDULER_PT_NAME, TorchOptimizer, TorchScheduler,
    load_scaler_pt, rng_state_pth_name, save_scaler_pt,
};
use crate::{Error, Result};

/// The scheduler state file.
pub const SCHEDULER_NAME: &str = "scheduler.json";
/// The data loader position file.
pub const DATA_STATE_NAME: &str = "data_state.json";
/// The loss scaler's state file (fp16 training; transformers writes `scaler.pt`).
pub const SCALER_NAME: &str = "scaler.json";

/// The RNG state file of `rank` among `world_size` processes: `rng_state.json` alone,
/// `rng_state_<rank>.json` with several (as transformers names its `.pth` files).
pub fn rng_state_name(rank: usize, world_size: usize) -> String {
    if world_size <= 1 {
        "rng_state.json".into()
    } else {
        format!("rng_state_{rank}.json")
    }
}

/// Everything that goes into one checkpoint, owned, so that it can be written on
/// another thread while training continues. Built with [`CheckpointSnapshot::new`] and
/// the `with_*` setters.
#[derive(Clone)]
#[non_exhaustive]
pub struct CheckpointSnapshot {
    /// The optimizer step the checkpoint is for (its folder is `checkpoint-<step>`).
    pub step: u64,
    /// `config.json` keys of the model.
    pub config: Value,
    /// `generation_config.json`, for generative models.
    pub generation_config: Option<Value>,
    /// The weights, in the model's parameter order, copied to host memory: a
    /// [`TensorMap`](kiln_formats::TensorMap), or any collection that owns its bytes
    /// (kiln's trainer hands over the backend's host snapshot, whose buffer it reuses
    /// once the writer has dropped it).
    pub weights: Arc<dyn TensorCollection>,
    /// Tied weights as (tied name, source name).
    pub tied: Vec<(String, String)>,
    /// Tokenizer files (name, bytes).
    pub tokenizer_files: Vec<(String, Vec<u8>)>,
    /// `training_args.json`.
    pub training_args: Option<Value>,
    /// Optimizer state (`None` with `save_only_model`).
    pub optimizer: Option<OptimizerState>,
    /// Scheduler state (`None` with `save_only_model`).
    pub scheduler: Option<Value>,
    /// Whether `optimizer` is only this rank's shard (ZeRO stage 1): every rank then
    /// writes `optimizer.rank<r>-of-<w>.safetensors`; otherwise the main process writes
    /// `optimizer.safetensors`.
    pub optimizer_sharded: bool,
    /// The schedule as torch's `LambdaLR` holds it (`scheduler.pt`).
    pub torch_scheduler: Option<TorchScheduler>,
    /// Loss scaler state of fp16 training (`None` otherwise and with `save_only_model`).
    pub scaler: Option<Value>,
    /// This rank's RNG state.
    pub rng: Option<Value>,
    /// Data loader position (`None` with `save_only_model`).
    pub data: Option<Value>,
    /// The trainer state, written last.
    pub state: TrainerState,
    /// Weight format and shard size.
    pub save_options: SaveOptions,
}

impl std::fmt::Debug for CheckpointSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointSnapshot")
            .field("step", &self.step)
            .field("weights", &self.weights.tensors().len())
            .field("weight_bytes", &self.weights.total_bytes())
            .field("optimizer", &self.optimizer.is_some())
            .field("scheduler", &self.scheduler)
            .field("scaler", &self.scaler)
            .field("data", &self.data)
            .finish_non_exhaustive()
    }
}

impl CheckpointSnapshot {
    /// A checkpoint of the model at `step`: its `config.json` keys and its weights
    /// (host copies, in the model's parameter order). Nothing else is written unless set
    /// with the `with_*` setters; the trainer state is transformers' default with
    /// `global_step = step`.
    pub fn new(step: u64, config: Value, weights: Arc<dyn TensorCollection>) -> Self {
        CheckpointSnapshot {
            step,
            config,
            generation_config: None,
            weights,
            tied: Vec::new(),
            tokenizer_files: Vec::new(),
            training_args: None,
            optimizer: None,
            scheduler: None,
            optimizer_sharded: false,
            torch_scheduler: None,
            scaler: None,
            rng: None,
            data: None,
            state: TrainerState {
                global_step: step,
                ..TrainerState::default()
            },
            save_options: SaveOptions::default(),
        }
    }

    /// The weights, replacing those given to [`new`](Self::new) (a snapshot built
    /// before its weights were copied, as the trainer's background copy does).
    pub fn with_weights(mut self, weights: Arc<dyn TensorCollection>) -> Self {
        self.weights = weights;
        self
    }

    /// `generation_config.json`, for generative models.
    pub fn with_generation_config(mut self, config: Value) -> Self {
        self.generation_config = Some(config);
        self
    }

    /// Tied weights as (tied name, source name).
    pub fn with_tied(mut self, tied: Vec<(String, String)>) -> Self {
        self.tied = tied;
        self
    }

    /// Tokenizer files (name, bytes).
    pub fn with_tokenizer_files(mut self, files: Vec<(String, Vec<u8>)>) -> Self {
        self.tokenizer_files = files;
        self
    }

    /// `training_args.json`.
    pub fn with_training_args(mut self, args: Value) -> Self {
        self.training_args = Some(args);
        self
    }

    /// The optimizer state.
    pub fn with_optimizer(mut self, state: OptimizerState) -> Self {
        self.optimizer = Some(state);
        self
    }

    /// Whether the optimizer state is only this rank's shard (ZeRO-1).
    pub fn with_optimizer_sharded(mut self, sharded: bool) -> Self {
        self.optimizer_sharded = sharded;
        self
    }

    /// The scheduler state (`scheduler.json`).
    pub fn with_scheduler(mut self, state: Value) -> Self {
        self.scheduler = Some(state);
        self
    }

    /// The schedule as torch's `LambdaLR` holds it (`scheduler.pt`).
    pub fn with_torch_scheduler(mut self, state: TorchScheduler) -> Self {
        self.torch_scheduler = Some(state);
        self
    }

    /// The loss scaler state (`scaler.json` and `scaler.pt`).
    pub fn with_scaler(mut self, state: Value) -> Self {
        self.scaler = Some(state);
        self
    }

    /// This rank's RNG state.
    pub fn with_rng(mut self, state: Value) -> Self {
        self.rng = Some(state);
        self
    }

    /// The data loader position (`data_state.json`).
    pub fn with_data(mut self, state: Value) -> Self {
        self.data = Some(state);
        self
    }

    /// The trainer state (`trainer_state.json`, written last).
    pub fn with_state(mut self, state: TrainerState) -> Self {
        self.state = state;
        self
    }

    /// Weight format and shard size.
    pub fn with_save_options(mut self, options: SaveOptions) -> Self {
        self.save_options = options;
        self
    }

    /// Bytes of tensor data the snapshot holds (weights and optimizer state).
    pub fn nbytes(&self) -> u64 {
        self.weights.total_bytes() + self.optimizer.as_ref().map_or(0, OptimizerState::nbytes)
    }

    /// Writes and commits `output_dir/checkpoint-<step>`; returns its path.
    ///
    /// Every process of the run calls it: the main process writes the model, optimizer,
    /// scheduler, data position and trainer state; every rank writes its RNG state; the
    /// commit makes the folder appear complete or not at all.
    pub fn write(&self, output_dir: &Path, coord: &dyn Coordinator) -> Result<PathBuf> {
        let staging = Staging::begin(output_dir, self.step, coord)?;
        match self.write_files(&staging, coord) {
            Ok(()) => {
                // Fault tests make one rank crash or hang here: its files are written,
                // the commit's barrier not reached (feature `failpoints`).
                fail::fail_point!("kiln-save-before-commit");
                staging.commit(coord)
            }
            Err(e) => {
                // Best effort: the error that matters is the one that stopped the save.
                let _ = staging.abort();
                Err(e)
            }
        }
    }

    fn write_files(&self, staging: &Staging, coord: &dyn Coordinator) -> Result<()> {
        let json = |v: &Value| (kiln_formats::pyjson::dumps(v) + "\n").into_bytes();
        if let Some(rng) = &self.rng {
            staging.write(rng_state_name(coord.rank(), coord.world_size()), &json(rng))?;
        }
        if self.optimizer_sharded
            && let Some(opt) = &self.optimizer
        {
            let name = sharded_optimizer_name(coord.rank(), coord.world_size());
            opt.save(&staging.dir().join(name))?;
        }
        if !coord.is_main() {
            return Ok(());
        }
        let mut model = ModelSave::new(self.config.clone(), self.weights.as_ref());
        model.generation_config = self.generation_config.clone();
        model.tied = self.tied.clone();
        model.tokenizer_files = self.tokenizer_files.clone();
        model.training_args = self.training_args.clone();
        save_pretrained(staging.dir(), &model, &self.save_options)?;
        if let Some(opt) = self.optimizer.as_ref().filter(|_| !self.optimizer_sharded) {
            TorchOptimizer::from_kiln(opt)?.save(&staging.dir().join(OPTIMIZER_PT_NAME))?;
        }
        if let Some(s) = &self.scheduler {
            staging.write(SCHEDULER_NAME, &json(s))?;
        }
        if let Some(s) = &self.torch_scheduler {
            s.save(&staging.dir().join(SCHEDULER_PT_NAME))?;
        }
        if let Some(s) = &self.scaler {
            staging.write(SCALER_NAME, &json(s))?;
            save_scaler_pt(&staging.dir().join(SCALER_PT_NAME), s)?;
        }
        if let Some(d) = &self.data {
            staging.write(DATA_STATE_NAME, &json(d))?;
        }
        staging.write(TRAINER_STATE_NAME, self.state.to_json().as_bytes())
    }
}

/// What a resumed run reads back from a checkpoint (the weights are loaded separately,
/// with [`load_pretrained`](crate::model::load_pretrained) on the same folder).
#[derive(Debug, Clone)]
pub struct ResumeState {
    /// The checkpoint folder.
    pub path: PathBuf,
    /// `trainer_state.json`.
    pub state: TrainerState,
    /// kiln's optimizer state by parameter name, if saved (`optimizer.safetensors` of
    /// older kiln checkpoints, or ZeRO-1 shards, consolidated: the caller keeps the part
    /// it needs).
    pub optimizer: Option<OptimizerState>,
    /// Otherwise torch's (`optimizer.pt`, kiln's or transformers'), numbered by index:
    /// [`TorchOptimizer::to_kiln`] names the parameters with the model's.
    pub torch_optimizer: Option<TorchOptimizer>,
    /// kiln's scheduler state, if saved.
    pub scheduler: Option<Value>,
    /// Otherwise torch's (`scheduler.pt`), if saved.
    pub torch_scheduler: Option<TorchScheduler>,
    /// The loss scaler state, if saved (fp16 runs): `scaler.json`, else `scaler.pt`.
    pub scaler: Option<Value>,
    /// Whether the checkpoint holds transformers' generator states for this rank
    /// (`rng_state.pth`), which kiln cannot continue.
    pub torch_rng: bool,
    /// This rank's RNG state, if saved: `rng_state_<rank>.json` (several processes) or
    /// `rng_state.json` (one); a single process resuming a multi-process checkpoint gets
    /// rank 0's. `None` for a rank the checkpoint has no file for (it was written by
    /// fewer processes): that rank starts a fresh generator, as transformers does.
    pub rng: Option<Value>,
    /// The data position, if saved.
    pub data: Option<Value>,
}

impl ResumeState {
    /// The optimizer state by parameter name: kiln's, or torch's `optimizer.pt` named by
    /// `params` (the trainable parameters in the model's order, each with whether weight
    /// decay applies: transformers' groups, [`TorchOptimizer::to_kiln`]). `None` when
    /// the checkpoint holds none (`save_only_model`).
    pub fn optimizer_for(&self, params: &[(String, bool)]) -> Result<Option<OptimizerState>> {
        match (&self.optimizer, &self.torch_optimizer) {
            (Some(o), _) => Ok(Some(o.clone())),
            (None, Some(t)) => t
                .to_kiln(params)
                .map(Some)
                .map_err(|e| Error::json(self.path.join(OPTIMIZER_PT_NAME), e)),
            (None, None) => Ok(None),
        }
    }
}

/// Reads the resumable state of checkpoint `dir` for `rank` of `world_size`.
///
/// An incomplete folder (a crash or a half copy) is refused with the reason, never
/// resumed silently. A transformers checkpoint (no kiln manifest) is accepted; it has
/// none of kiln's optimizer, scheduler, RNG or data files, so those come back `None`.
pub fn load_checkpoint(dir: &Path, rank: usize, world_size: usize) -> Result<ResumeState> {
    if let Completeness::Incomplete(reason) = completeness(dir)? {
        return Err(Error::Incomplete {
            path: dir.to_path_buf(),
            reason,
        });
    }
    let read_json = |name: &str| -> Result<Option<Value>> {
        let path = dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).at(&path)?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::json(&path, e))
    };
    let state = TrainerState::load(&dir.join(TRAINER_STATE_NAME))?;
    let optimizer = load_optimizer(dir)?;
    let torch_optimizer = match (&optimizer, dir.join(OPTIMIZER_PT_NAME)) {
        (None, pt) if pt.exists() => Some(TorchOptimizer::load(&pt)?),
        _ => None,
    };
    let scheduler = read_json(SCHEDULER_NAME)?;
    let torch_scheduler = match (&scheduler, dir.join(SCHEDULER_PT_NAME)) {
        (None, pt) if pt.exists() => Some(TorchScheduler::load(&pt)?),
        _ => None,
    };
    let scaler = match (read_json(SCALER_NAME)?, dir.join(SCALER_PT_NAME)) {
        (None, pt) if pt.exists() => Some(load_scaler_pt(&pt)?),
        (found, _) => found,
    };
    let rng = match read_json(&rng_state_name(rank, world_size))? {
        None if world_size <= 1 => read_json(&rng_state_name(0, 2))?,
        found => found,
    };
    Ok(ResumeState {
        path: dir.to_path_buf(),
        state,
        optimizer,
        torch_optimizer,
        scheduler,
        torch_scheduler,
        scaler,
        torch_rng: dir.join(rng_state_pth_name(rank, world_size)).exists(),
        rng,
        data: read_json(DATA_STATE_NAME)?,
    })
}

/// Writes a copy of checkpoint `src` whose optimizer state is consolidated into one
/// `optimizer.pt` (from the `optimizer.rank<r>-of-<w>` shards of a ZeRO-1 run, which
/// record every parameter's name in order), as `output_dir/checkpoint-<step>`, through
/// the commit protocol; returns its path. The result is a checkpoint transformers'
/// Trainer resumes too.
///
/// Every other file is copied unchanged (the per-rank `rng_state_<r>.json` too). `src`
/// must be complete; an existing `output_dir/checkpoint-<step>` is refused rather than
/// replaced. A checkpoint that is already consolidated is refused too (nothing to do).
pub fn consolidate_checkpoint(src: &Path, output_dir: &Path) -> Result<PathBuf> {
    use std::io::Write;

    use crate::commit::{Manifest, SingleProcess};
    use crate::optimizer::parse_sharded_optimizer_name;

    if let Completeness::Incomplete(reason) = completeness(src)? {
        return Err(Error::Incomplete {
            path: src.to_path_buf(),
            reason,
        });
    }
    let manifest = Manifest::read(src)?;
    if !manifest
        .files
        .keys()
        .any(|f| parse_sharded_optimizer_name(f).is_some())
    {
        return Err(Error::Invalid(format!(
            "{}: the optimizer state is not sharded; nothing to consolidate",
            src.display()
        )));
    }
    let merged = load_optimizer(src)?
        .ok_or_else(|| Error::Invalid(format!("{}: no optimizer state", src.display())))?;
    let target = output_dir.join(crate::commit::checkpoint_name(manifest.step));
    if target.exists() {
        return Err(Error::Invalid(format!(
            "{} exists; consolidate into another folder",
            target.display()
        )));
    }
    let staging = Staging::begin(output_dir, manifest.step, &SingleProcess)?;
    for rel in manifest.files.keys() {
        if parse_sharded_optimizer_name(rel).is_some() {
            continue;
        }
        let from = src.join(rel);
        let mut input = std::fs::File::open(&from).at(&from)?;
        let mut out = staging.create(rel)?;
        let to = out.path().to_path_buf();
        std::io::copy(&mut input, &mut out).at(&to)?;
        out.flush().at(&to)?;
        out.finish()?;
    }
    TorchOptimizer::from_kiln(&merged)?.save(&staging.dir().join(OPTIMIZER_PT_NAME))?;
    staging.commit(&SingleProcess)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::commit::SingleProcess;

    #[test]
    fn new_writes_the_model_and_trainer_state_and_setters_add_files() {
        let weights = Arc::new(kiln_formats::TensorMap::new());
        let config = serde_json::json!({"model_type": "m", "architectures": ["M"]});
        let bare = CheckpointSnapshot::new(7, config.clone(), weights.clone());
        assert_eq!(bare.state.global_step, 7);
        assert!(bare.optimizer.is_none() && bare.data.is_none() && !bare.optimizer_sharded);

        let out = tempfile::tempdir().unwrap();
        let dir = CheckpointSnapshot::new(7, config, weights)
            .with_scheduler(serde_json::json!({"step": 7}))
            .with_rng(serde_json::json!({"seed": 1}))
            .with_data(serde_json::json!({"batches": 7}))
            .write(out.path(), &SingleProcess)
            .unwrap();
        assert_eq!(dir, out.path().join("checkpoint-7"));
        let resume = load_checkpoint(&dir, 0, 1).unwrap();
        assert_eq!(resume.state.global_step, 7);
        assert_eq!(resume.scheduler, Some(serde_json::json!({"step": 7})));
        assert_eq!(resume.rng, Some(serde_json::json!({"seed": 1})));
        assert_eq!(resume.data, Some(serde_json::json!({"batches": 7})));
        assert!(resume.optimizer.is_none() && resume.scaler.is_none());
    }
}
